"""The web console: server-rendered pages over the management API's operations.

`add_console` mounts it on the server's application next to /v2/ and /api/v1 (whose services it
reads). Each module of `pages/` declares its pages; `base.py` holds sessions, CSRF, rendering and
the in-process API calls every page makes as its session's token.
"""

from __future__ import annotations

from aiohttp import web

from skyreg.meta.console import ConsoleSessionMeta
from skyreg.platform.api.base import SERVICES_KEY
from skyreg.web.base import (
    CONSOLE_KEY,
    SECURITY_HEADERS,
    Console,
    Page,
    load_static,
    serve,
    templates,
)
from skyreg.web.pages import images, machines, orgs, session, settings
from skyreg.workers import PeriodicWorker

PAGES: list[Page] = [
    *session.PAGES,
    *orgs.PAGES,
    *images.PAGES,
    *machines.PAGES,
    *settings.PAGES,
]

SESSION_EXPIRY_INTERVAL = 3600.0  # seconds


def add_console(app: web.Application) -> PeriodicWorker:
    """Mount the console on `app` (which serves the management API already); the worker that
    deletes ended sessions, for the caller to run."""
    services = app[SERVICES_KEY]
    static = load_static()
    console = Console(
        services=services,
        sessions=ConsoleSessionMeta(services.auth.platform),
        templates=templates({name: f"/static/{hashed}" for name, (hashed, _, _) in static.items()}),
        static=static,
    )
    app[CONSOLE_KEY] = console
    by_path: dict[str, list[Page]] = {}
    for entry in PAGES:
        by_path.setdefault(entry.path, []).append(entry)
    for path, entries in by_path.items():
        app.router.add_route("*", path, serve(console, entries))
    files = {hashed: (data, ctype) for hashed, data, ctype in static.values()}

    async def static_file(request: web.Request) -> web.StreamResponse:
        found = files.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404, text="not found", headers=SECURITY_HEADERS)
        data, ctype = found
        return web.Response(
            body=data,
            content_type=ctype,
            headers={
                "Cache-Control": "public, max-age=31536000, immutable",
                "X-Content-Type-Options": "nosniff",
            },
        )

    app.router.add_get("/static/{name}", static_file)

    async def expire() -> None:
        sessions = console.sessions
        while await sessions.run(sessions.expire):
            pass

    return PeriodicWorker("console_sessions", SESSION_EXPIRY_INTERVAL, expire)


__all__ = ["add_console"]
