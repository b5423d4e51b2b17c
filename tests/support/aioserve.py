"""An aiohttp handler served on 127.0.0.1 for the length of an `async with` (fake peers and
holders of the region tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serve_on_loopback(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str = "/v2/{tail:.*}"
) -> AsyncIterator[int]:
    """GETs of `path` answered by `handler` on a free port of 127.0.0.1 (yielded); the server
    is cleaned up on exit, also on failure."""
    app = web.Application()
    app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()
