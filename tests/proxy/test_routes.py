"""The proxy following the server's routes (`GET /api/v1/agent/routes`, issue 14's contract):
against a real HTTP server on loopback that serves a routes document the test controls, and
`skyreg proxy` itself as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from skyreg.proxy.routes import RouteSync, prefer_region
from skyreg.proxy.table import Backend, RoutingTable
from tests.support.waiting import children

pytestmark = pytest.mark.timeout(180)

TOKEN = "routes-token"
DEADLINE = 30.0


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def machine(
    mid: str,
    region: str = "ams",
    port: int = 8080,
    *,
    address: str = "10.0.0.2",
    healthy: bool = True,
    draining: bool = False,
) -> dict[str, Any]:
    return {
        "id": mid,
        "region": region,
        "address": address,
        "port": port,
        "healthy": healthy,
        "draining": draining,
    }


def routes(apps: dict[str, list[dict[str, Any]]], truncated: bool = False) -> dict[str, Any]:
    return {
        "apps": [{"app": a, "machines": ms} for a, ms in apps.items()],
        "truncated": truncated,
    }


class RoutesServer:
    """A server's `GET /api/v1/agent/routes` on a loopback port, answering `answer`: a document
    (as JSON), raw bytes, or an error status."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] | bytes | int = routes({})
        self.asked = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/agent/routes", self._routes)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _routes(self, request: web.Request) -> web.StreamResponse:
        self.asked += 1
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        if isinstance(self.answer, int):
            return web.json_response({"error": {"code": "oops"}}, status=self.answer)
        if isinstance(self.answer, bytes):
            return web.Response(body=self.answer, content_type="application/json")
        return web.json_response(self.answer)


@contextlib.asynccontextmanager
async def routes_server() -> AsyncIterator[RoutesServer]:
    server = RoutesServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def following(
    server: RoutesServer, region: str | None = "ams", **kw: Any
) -> AsyncIterator[RouteSync]:
    sync = RouteSync(RoutingTable(), server.url, kw.pop("token", TOKEN), region, **kw)
    try:
        yield sync
    finally:
        await sync.close()


def ids(backends: tuple[Backend, ...]) -> list[str]:
    return [b.machine_id for b in backends]


def test_the_table_follows_the_routes_apps_and_all() -> None:
    async def main() -> None:
        async with routes_server() as server, following(server) as sync:
            table = sync.table
            server.answer = routes(
                {
                    "web": [
                        machine("w1", port=8080),
                        machine("w2", port=9000, address="fd00::2", healthy=False),
                    ],
                    "api": [],
                }
            )
            assert await sync.poll_once()
            assert table.backends("web") == (
                Backend("w1", "10.0.0.2", 8080, "ams"),
                Backend("w2", "fd00::2", 9000, "ams", healthy=False),
            )
            assert table.knows("api") and table.backends("api") == ()
            assert table.pick("web") == Backend("w1", "10.0.0.2", 8080, "ams")
            # The app gone from the answer is removed; the other follows its changes.
            server.answer = routes({"web": [machine("w3", draining=True)]})
            assert await sync.poll_once()
            assert table.apps() == {"web"}
            assert table.backends("web") == (Backend("w3", "10.0.0.2", 8080, "ams", draining=True),)
            # A truncated answer removes nothing: what was cut may still exist.
            table.replace("old", [Backend("o1", "10.0.0.9", 80)])
            server.answer = routes({"web": [machine("w1")]}, truncated=True)
            assert await sync.poll_once()
            assert table.apps() == {"web", "old"} and ids(table.backends("web")) == ["w1"]
            server.answer = routes({})
            assert await sync.poll_once()
            assert table.apps() == set()

    run(main)


def test_without_its_own_region_the_proxy_takes_the_nearest_serving_region() -> None:
    def backend(mid: str, region: str = "ams", **kw: bool) -> Backend:
        return Backend(mid, "10.0.0.2", 8080, region, **kw)

    rtt = {"fra": 15.0, "iad": 90.0, "syd": 280.0}
    web = [
        backend("ams-1", healthy=False),
        backend("syd-1", "syd"),
        backend("fra-1", "fra", healthy=False),
        backend("iad-1", "iad"),
        backend("iad-2", "iad", draining=True),
    ]
    # fra is nearest but has no machine serving: iad's, draining one included (it is counted).
    assert ids(tuple(prefer_region(web, "ams", rtt.__getitem__))) == ["iad-1", "iad-2"]
    assert ids(tuple(prefer_region(web, "ams", None))) == ids(tuple(web))  # no distances: all
    web[2] = backend("fra-1", "fra")
    assert ids(tuple(prefer_region(web, "ams", rtt.__getitem__))) == ["fra-1"]
    web[0] = backend("ams-1")
    assert ids(tuple(prefer_region(web, "ams", rtt.__getitem__))) == ["ams-1"]


def test_own_region_first_then_the_other_regions() -> None:
    async def main() -> None:
        async with routes_server() as server, following(server, "ams") as sync:
            table = sync.table
            fra = machine("fra-1", "fra")
            server.answer = routes({"web": [machine("ams-1"), fra]})
            assert await sync.poll_once()
            assert ids(table.backends("web")) == ["ams-1"]
            # A draining machine of the region stays (its requests in flight are counted) while
            # another one of the region serves.
            server.answer = routes(
                {"web": [machine("ams-1", draining=True), machine("ams-2"), fra]}
            )
            assert await sync.poll_once()
            assert ids(table.backends("web")) == ["ams-1", "ams-2"]
            assert {table.pick("web").machine_id for _ in range(4)} == {"ams-2"}  # type: ignore[union-attr]
            # None of the region is healthy and not draining: the other regions serve.
            server.answer = routes(
                {
                    "web": [
                        machine("ams-1", draining=True),
                        machine("ams-2", healthy=False),
                        fra,
                        machine("syd-1", "syd"),
                    ]
                }
            )
            assert await sync.poll_once()
            assert {table.pick("web").machine_id for _ in range(4)} == {"fra-1", "syd-1"}  # type: ignore[union-attr]
            # And back to the region as soon as it has a healthy machine again.
            server.answer = routes({"web": [machine("ams-2"), fra]})
            assert await sync.poll_once()
            assert ids(table.backends("web")) == ["ams-2"]
        async with routes_server() as server, following(server, None) as sync:
            server.answer = routes({"web": [machine("ams-1"), machine("fra-1", "fra")]})
            assert await sync.poll_once()
            assert ids(sync.table.backends("web")) == ["ams-1", "fra-1"]

    run(main)


MALFORMED: list[dict[str, Any] | bytes | int] = [
    b"not json",
    b"\xff\xfe",
    b"[]",
    b'{"apps": {}}',
    {"apps": [{"app": "web"}]},
    {"apps": [{"machines": []}]},
    {"apps": ["web"]},
    {"apps": [], "truncated": "no"},
    routes({"web": [], "api": []}) | {"apps": [{"app": "web", "machines": []}] * 2},
    routes({"web": [machine("w9") | {"port": True}]}),
    routes({"web": [machine("w9", port=0)]}),
    routes({"web": [machine("w9", port=65536)]}),
    routes({"web": [machine("w9", address="example.com")]}),
    routes({"web": [machine("w9", address="10.0.0.2:80")]}),
    routes({"web": [machine("w9") | {"healthy": "yes"}]}),
    routes({"web": [machine("w9") | {"id": ""}]}),
    routes({"web": [{k: v for k, v in machine("w9").items() if k != "draining"}]}),
    routes({"web": [machine("w1"), "w9"]}),  # type: ignore[list-item]
    # Past the bound (max_bytes=4096 below), as JSON that would otherwise parse.
    routes({"web": [machine(f"w{i}") for i in range(200)]}),
    500,
    404,
]


def test_a_malformed_answer_is_refused_whole_and_the_table_kept() -> None:
    async def main() -> None:
        async with routes_server() as server, following(server, max_bytes=4096) as sync:
            table = sync.table
            server.answer = routes({"web": [machine("w1")], "api": [machine("a1")]})
            assert await sync.poll_once()
            before = {app: table.backends(app) for app in table.apps()}
            for answer in MALFORMED:
                server.answer = answer
                assert not await sync.poll_once(), answer
                assert {app: table.backends(app) for app in table.apps()} == before, answer
            assert sync.failures == len(MALFORMED)

    run(main)


def test_a_failed_poll_keeps_the_table_and_polling_goes_on() -> None:
    async def main() -> None:
        server = RoutesServer()
        await server.start()
        port = server.port
        server.answer = routes({"web": [machine("w1")]})
        sync = RouteSync(RoutingTable(), server.url, "wrong-token", "ams", poll=0.05)
        assert not await sync.poll_once()  # 401: nothing changes
        assert sync.table.apps() == set()
        sync = RouteSync(RoutingTable(), server.url, TOKEN, "ams", poll=0.05)
        stop = asyncio.Event()
        polling = asyncio.create_task(sync.run(stop))
        try:
            await until(lambda: sync.table.knows("web"), "the first routes")
            await server.stop()  # the server goes away: connections refused
            failures = sync.failures
            await until(lambda: sync.failures >= failures + 3, "failed polls")
            assert not polling.done()
            assert ids(sync.table.backends("web")) == ["w1"]
            server = RoutesServer()
            server.answer = routes({"web": [machine("w2")]})
            await server.start(port)
            await until(lambda: ids(sync.table.backends("web")) == ["w2"], "the server back")
        finally:
            stop.set()
            await asyncio.wait_for(polling, DEADLINE)
            await server.stop()

    run(main)


# `skyreg proxy`, the process ------------------------------------------------------------------


async def backend_server() -> tuple[web.AppRunner, int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from the backend, {request.host}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize("workers", [1, 2])
def test_skyreg_proxy_serves_an_app_from_the_routes_and_stops_on_sigterm(workers: int) -> None:
    async def main() -> None:
        runner, port = await backend_server()
        async with routes_server() as server:
            server.answer = routes(
                {"web": [machine("m1", "local", port, address="127.0.0.1")], "down": []}
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
            env["SKYREG_TOKEN"] = TOKEN
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "skyreg", "proxy", "--server", server.url,
                "--listen", "127.0.0.1:0", "--poll", "0.2", "--workers", str(workers),
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
                assert line.startswith("skyreg proxy listening on http://127.0.0.1:"), line
                url = line.split()[4]
                async with aiohttp.ClientSession() as s:
                    for app, status in (("web", 200), ("down", 503), ("nope", 404)):
                        async with s.get(url + "/x", headers={"Host": f"{app}.localhost"}) as r:
                            assert r.status == status, app
                            if status == 200:
                                assert r.headers["skyreg-machine"] == "m1"
                                assert "hello from the backend" in await r.text()
                    # The routes change: the proxy follows within a poll or two.
                    server.answer = routes({})
                    await until_async(s, url, "web", 404)
                forked = children(proc.pid)
                assert len(forked) == (workers if workers > 1 else 0), forked
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
                assert not [pid for pid in forked if os.path.exists(f"/proc/{pid}")]
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await runner.cleanup()
            assert proc.stderr is not None
            assert b"Traceback" not in await proc.stderr.read()

    run(main)


async def until_async(s: aiohttp.ClientSession, url: str, app: str, status: int) -> None:
    for _ in range(int(DEADLINE / 0.05)):
        async with s.get(url + "/", headers={"Host": f"{app}.localhost"}) as r:
            if r.status == status:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{app} never answered {status}")
