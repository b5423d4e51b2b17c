"""The reverse proxy against real aiohttp machines on loopback ports, driven by real clients."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import select
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from skyreg.proxy.server import ProxyServer, app_from_host
from skyreg.proxy.table import Backend, RoutingTable
from tests.support.waiting import free_port

pytestmark = pytest.mark.timeout(180)

DEADLINE = 30.0
MIB = 1024 * 1024


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` on the loop until it holds; fail at the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Machine:
    """A real aiohttp server standing for one machine of an app: every answer names it."""

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        self.seen: list[tuple[str, str, dict[str, list[str]]]] = []
        self.waiting = 0
        self.gate = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    def backend(self, **kw: Any) -> Backend:
        return Backend(self.machine_id, "127.0.0.1", self.port, "local", **kw)

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/ws", self._ws)
        app.router.add_route("*", "/slow", self._slow)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/download", self._download)
        app.router.add_route("*", "/hop", self._hop)
        app.router.add_route("*", "/truncated", self._truncated)
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.gate.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request) -> None:
        headers: dict[str, list[str]] = {}
        for k, v in request.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        self.seen.append((request.method, request.raw_path, headers))

    async def _echo(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await request.read()
        return web.json_response(
            {
                "machine": self.machine_id,
                "method": request.method,
                "path": request.raw_path,
                "body": len(body),
                "headers": self.seen[-1][2],
            }
        )

    async def _slow(self, request: web.Request) -> web.Response:
        self._record(request)
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        return web.Response(text=self.machine_id)

    async def _upload(self, request: web.Request) -> web.Response:
        self._record(request)
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        size = int(request.query["n"])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for chunk in pattern(size) if request.method != "HEAD" else ():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"partial")
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _hop(self, request: web.Request) -> web.Response:
        self._record(request)
        response = web.Response(text=self.machine_id)
        response.headers["Connection"] = "X-Up-Secret"
        response.headers["X-Up-Secret"] = "1"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Connection"] = "keep-alive"
        response.headers["skyreg-machine"] = "forged"
        response.headers["X-Up-Plain"] = "kept"
        return response

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(protocols=("echo",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.machine_id}:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws


def pattern(size: int, chunk: int = 65536) -> list[bytes]:
    block = bytes(range(256)) * (chunk // 256)
    whole, rest = divmod(size, chunk)
    return [block] * whole + ([block[:rest]] if rest else [])


@contextlib.asynccontextmanager
async def machines(*ids: str) -> AsyncIterator[list[Machine]]:
    started = [Machine(i) for i in ids]
    try:
        for m in started:
            await m.start()
        yield started
    finally:
        for m in started:
            await m.stop()


@contextlib.asynccontextmanager
async def proxy(table: RoutingTable, **kw: Any) -> AsyncIterator[tuple[ProxyServer, str]]:
    server = ProxyServer(table, "localhost", connect_timeout=5, request_timeout=30, **kw)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(grace=5)


@dataclass
class Stage:
    """Machines serving app `web` behind a running proxy, and a client session."""

    machines: list[Machine]
    table: RoutingTable
    session: aiohttp.ClientSession
    server: ProxyServer
    url: str


@contextlib.asynccontextmanager
async def web_app(*ids: str, **kw: Any) -> AsyncIterator[Stage]:
    """Machines `ids`, all backends of app `web`, behind a proxy (`kw`: ProxyServer options)."""
    async with machines(*ids) as started, aiohttp.ClientSession() as session:
        table = RoutingTable()
        table.replace("web", [m.backend() for m in started])
        async with proxy(table, **kw) as (server, url):
            yield Stage(started, table, session, server, url)


def host(app: str) -> dict[str, str]:
    return {"Host": f"{app}.localhost"}


async def get(
    session: aiohttp.ClientSession, url: str | URL, app: str, path: str = "/", **kw: Any
) -> tuple[int, str, str | None]:
    headers = {**host(app), **kw.pop("headers", {})}
    target = url if isinstance(url, URL) else url + path
    async with session.request(kw.pop("method", "GET"), target, headers=headers, **kw) as resp:
        return resp.status, await resp.text(), resp.headers.get("skyreg-machine")


async def raw(url: str, data: bytes) -> bytes:
    """Send `data` on one TCP connection; everything the proxy answers until it closes."""
    _, _, hostport = url.partition("://")
    h, _, p = hostport.partition(":")
    reader, writer = await asyncio.open_connection(h, int(p))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (aiohttp answers a malformed request in HTTP/1.0)."""
    return int(answer.split(b" ", 2)[1])


# The routing table ---------------------------------------------------------------------------


def test_table_least_connections_ties_round_robin_exclude_and_draining() -> None:
    table = RoutingTable()
    a, b, c = (Backend(i, "127.0.0.1", 1, "r") for i in "abc")
    table.replace("app", [a, b, c])
    assert [table.pick("app").machine_id for _ in range(6)] == list("abcabc")  # type: ignore[union-attr]
    table.acquire("a")
    table.acquire("b")
    assert {table.pick("app").machine_id for _ in range(4)} == {"c"}  # type: ignore[union-attr]
    assert table.pick("app", exclude={"c"}).machine_id in {"a", "b"}  # type: ignore[union-attr]
    table.set_draining("app", "c")
    assert table.pick("app", exclude={"a", "b"}) is None
    assert table.in_flight_by_machine() == {"a": 1, "b": 1}
    table.release("a")
    table.release("b")
    assert table.in_flight_by_machine() == {}
    table.replace("app", [Backend("d", "h", 1, healthy=False)])
    assert table.pick("app") is None and table.knows("app")
    assert table.pick("other") is None and not table.knows("other")


def test_table_ejection_skips_a_machine_for_a_while_unless_none_is_left() -> None:
    now = [100.0]
    table = RoutingTable(ejection=2.0, clock=lambda: now[0])
    a, b = (Backend(i, "127.0.0.1", 1, "r") for i in "ab")
    table.replace("app", [a, b])
    table.eject("a")
    assert {table.pick("app").machine_id for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    # Every poll replaces the backends: the ejection stays.
    table.replace("app", [a, b])
    assert table.ejected() == {"a"}
    assert table.pick("app", exclude={"b"}) == a  # none left but the ejected one: try it
    now[0] += 2.0
    assert table.ejected() == set()
    assert {table.pick("app").machine_id for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]
    off = RoutingTable(ejection=0)
    off.replace("app", [a, b])
    off.eject("a")
    assert off.ejected() == set()


def test_app_from_host() -> None:
    assert app_from_host("web.localhost", "localhost") == "web"
    assert app_from_host("WEB.LocalHost:8080", "localhost") == "web"
    assert app_from_host("web.localhost.", "localhost") == "web"
    assert app_from_host("a-1.apps.example.com", "apps.example.com") == "a-1"
    for bad in (
        None,
        "",
        "localhost",
        ".localhost",
        "..localhost",
        "a..localhost",
        "x.web.localhost",
        "-web.localhost",
        "web-.localhost",
        "web_1.localhost",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]:80",
        "web.localhost:http",
        "web.localhost..",
        "a" * 64 + ".localhost",
        "web.localhostx",
        "web.example.com",
    ):
        assert app_from_host(bad, "localhost") is None, bad
    assert app_from_host("a" * 63 + ".localhost", "localhost") == "a" * 63


# Routing -----------------------------------------------------------------------------------


def test_routes_by_host_and_names_the_machine() -> None:
    async def main() -> None:
        async with machines("m1", "m2") as (m1, m2), aiohttp.ClientSession() as s:
            table = RoutingTable()
            table.replace("web", [m1.backend()])
            table.replace("api", [m2.backend()])
            async with proxy(table) as (_, url):
                status, text, machine = await get(
                    s, URL(url + "/a/b?x=1&y=%2F", encoded=True), "web"
                )
                assert (status, machine) == (200, "m1")
                assert json.loads(text)["path"] == "/a/b?x=1&y=%2F"
                for h in ("API.LOCALHOST", "api.localhost:8080", "api.localhost."):
                    async with s.get(url + "/", headers={"Host": h}) as resp:
                        assert resp.status == 200, h
                        assert resp.headers["skyreg-machine"] == "m2"
                        assert (await resp.json())["machine"] == "m2"
                status, text, _ = await get(s, url, "web", "/x", method="DELETE")
                assert (status, json.loads(text)["method"]) == (200, "DELETE")

    run(main)


def test_unknown_app_and_hostile_hosts_are_404_without_reaching_a_machine() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            [m1] = st.machines
            s, url = st.session, st.url
            for h in (
                "nope.localhost",
                "localhost",
                "..localhost",
                "x.web.localhost",
                "127.0.0.1",
                "[::1]",
                "web.example.com",
                "a" * 300 + ".localhost",
            ):
                async with s.get(url + "/", headers={"Host": h}) as resp:
                    assert resp.status == 404, h
                    assert "text/html" in resp.headers["Content-Type"]
            # Two Host headers: refused, not guessed.
            answer = await raw(
                url,
                b"GET / HTTP/1.1\r\nHost: web.localhost\r\nHost: web.localhost\r\n"
                b"Connection: close\r\n\r\n",
            )
            assert status_of(answer) == 400, answer[:100]
            # A header line past aiohttp's 8190-byte limit.
            answer = await raw(
                url,
                b"GET / HTTP/1.1\r\nHost: web.localhost\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            )
            assert 400 <= status_of(answer) < 500, answer[:100]
            assert m1.seen == []

    run(main)


def test_no_healthy_machine_is_a_503_page_naming_the_app() -> None:
    async def main() -> None:
        async with machines("m1", "m2") as (m1, m2), aiohttp.ClientSession() as s:
            table = RoutingTable()
            table.replace("web", [m1.backend(healthy=False), m2.backend(draining=True)])
            table.replace("empty", [])
            async with proxy(table) as (_, url):
                for app in ("web", "empty"):
                    async with s.get(url + "/", headers=host(app)) as resp:
                        assert resp.status == 503
                        assert "text/html" in resp.headers["Content-Type"]
                        assert app in await resp.text()
                        assert "skyreg-machine" not in resp.headers
            assert m1.seen == m2.seen == []

    run(main)


def test_least_connections_avoids_a_busy_machine_and_spreads_the_rest() -> None:
    async def main() -> None:
        async with web_app("m1", "m2", "m3") as st:
            ms = st.machines
            s, table, url = st.session, st.table, st.url
            slow = asyncio.create_task(get(s, url, "web", "/slow"))
            await until(lambda: sum(m.waiting for m in ms) == 1, "the slow request")
            busy = next(m for m in ms if m.waiting)
            assert table.in_flight_by_machine() == {busy.machine_id: 1}
            answered = [(await get(s, url, "web"))[2] for _ in range(6)]
            others = sorted(m.machine_id for m in ms if m is not busy)
            assert sorted(answered) == sorted(others * 3)
            # Concurrent slow requests fill the least busy machines first.
            more = [asyncio.create_task(get(s, url, "web", "/slow")) for _ in range(5)]
            await until(lambda: sum(m.waiting for m in ms) == 6, "six slow requests")
            assert [m.waiting for m in ms] == [2, 2, 2]
            for m in ms:
                m.gate.set()
            results = await asyncio.gather(slow, *more)
            assert all(status == 200 for status, _, _ in results)
            await until(lambda: table.in_flight_by_machine() == {}, "in-flight counts to drop")

    run(main)


def test_a_refused_machine_is_retried_on_another_and_no_request_fails() -> None:
    async def main() -> None:
        async with machines("live") as (live,), aiohttp.ClientSession() as s:
            table = RoutingTable()
            dead = Backend("dead", "127.0.0.1", free_port(), "local")
            table.replace("web", [dead, live.backend()])
            async with proxy(table) as (_, url):
                for i in range(6):
                    assert (await get(s, url, "web"))[::2] == (200, "live")
                    status, text, machine = await get(
                        s, url, "web", "/p", method="POST", data=b"x" * (1000 + i)
                    )
                    assert (status, machine) == (200, "live")
                    assert json.loads(text)["body"] == 1000 + i
                    # A streamed (chunked) body, never read before the retry, goes whole.
                    status, text, _ = await get(
                        s, url, "web", "/upload", method="PUT", data=chunks(pattern(300_000))
                    )
                    assert json.loads(text)["size"] == 300_000
                assert len(live.seen) == 18
                table.replace("web", [dead])
                status, text, _ = await get(s, url, "web")
                assert status == 502 and "web" in text

    run(main)


def test_a_machine_that_hangs_up_unanswered_is_retried_only_for_idempotent_requests() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung_up.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    hung_up: list[bytes] = []

    async def main() -> None:
        rude = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        rude_port = rude.sockets[0].getsockname()[1]
        try:
            async with machines("live") as (live,), aiohttp.ClientSession() as s:
                table = RoutingTable()
                table.replace("web", [Backend("rude", "127.0.0.1", rude_port), live.backend()])
                async with proxy(table) as (_, url):
                    for _ in range(4):
                        assert (await get(s, url, "web"))[::2] == (200, "live")
                    # (aiohttp's client itself tries a GET twice on the same machine.)
                    gets = len(hung_up)
                    assert gets >= 2
                    # A POST reached the rude machine: sending it again could do it twice.
                    answers = [
                        (await get(s, url, "web", method="POST", data=b"once"))[0] for _ in range(4)
                    ]
                    assert sorted(answers) == [200, 200, 502, 502]
                    assert len(hung_up) - gets == 2
        finally:
            rude.close()

    run(main)


def test_a_machine_slower_than_request_timeout_is_a_504() -> None:
    async def main() -> None:
        async with machines("m1") as (m1,), aiohttp.ClientSession() as s:
            table = RoutingTable()
            table.replace("web", [m1.backend()])
            server = ProxyServer(table, connect_timeout=5, request_timeout=0.2)
            port = await server.start("127.0.0.1", 0)
            try:
                status, text, _ = await get(s, f"http://127.0.0.1:{port}", "web", "/slow")
                assert status == 504 and "web" in text
            finally:
                await server.stop(grace=5)

    run(main)


async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


# Headers -------------------------------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_both_ways_and_skyreg_machine_is_the_proxys() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            s, url = st.session, st.url
            _, text, _ = await get(
                s,
                url,
                "web",
                headers={
                    "Connection": "keep-alive, X-Secret",
                    "X-Secret": "1",
                    "Keep-Alive": "timeout=5",
                    "Proxy-Connection": "keep-alive",
                    "TE": "trailers",
                    "Trailer": "X-T",
                    "skyreg-machine": "forged",
                    "X-Plain": "kept",
                },
            )
            seen = json.loads(text)["headers"]
            for name in ("x-secret", "keep-alive", "proxy-connection", "te", "trailer"):
                assert name not in seen, name
            assert "skyreg-machine" not in seen
            assert seen["x-plain"] == ["kept"]
            assert seen["host"] == ["web.localhost"]
            async with s.get(url + "/hop", headers=host("web")) as resp:
                assert resp.status == 200
                assert resp.headers.getall("skyreg-machine") == ["m1"]
                assert "X-Up-Secret" not in resp.headers
                assert "Keep-Alive" not in resp.headers
                assert "Proxy-Connection" not in resp.headers
                assert resp.headers["X-Up-Plain"] == "kept"

    run(main)


def test_x_forwarded_headers_are_set_by_the_proxy_alone() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            s, url = st.session, st.url
            _, text, _ = await get(
                s,
                url,
                "web",
                headers={
                    "Host": "Web.localhost:8443",
                    "X-Forwarded-For": "6.6.6.6",
                    "X-Forwarded-Host": "evil.example",
                    "X-Forwarded-Proto": "https",
                    "Forwarded": "for=6.6.6.6",
                },
            )
            seen = json.loads(text)["headers"]
            assert seen["x-forwarded-for"] == ["127.0.0.1"]
            assert seen["x-forwarded-proto"] == ["http"]
            assert seen["x-forwarded-host"] == ["Web.localhost:8443"]
            assert "forwarded" not in seen

    run(main)


# Bodies --------------------------------------------------------------------------------------


def test_20_mib_stream_both_ways_without_buffering() -> None:
    size = 20 * MIB
    parts = pattern(size)
    want = hashlib.sha256(b"".join(parts)).hexdigest()

    async def main() -> None:
        async with web_app("m1") as st:
            s, url = st.session, st.url
            # Everything runs in this process (client, proxy, machine): if any of them held
            # the whole body, the traced peak would pass 20 MiB.
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                async with s.put(url + "/upload", headers=host("web"), data=chunks(parts)) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"size": size, "sha256": want}
                up_peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.reset_peak()
                digest = hashlib.sha256()
                got = 0
                async with s.get(url + f"/download?n={size}", headers=host("web")) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Length"] == str(size)
                    async for chunk in resp.content.iter_chunked(65536):
                        digest.update(chunk)
                        got += len(chunk)
                down_peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            assert (got, digest.hexdigest()) == (size, want)
            assert up_peak < 8 * MIB, up_peak
            assert down_peak < 8 * MIB, down_peak

    run(main)


def test_an_answer_cut_short_by_the_machine_reaches_the_client_cut_short() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            s, table, url = st.session, st.table, st.url
            async with s.get(url + "/truncated", headers=host("web")) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            await until(lambda: table.in_flight_by_machine() == {}, "the request to end")
            assert (await get(s, url, "web"))[0] == 200

    run(main)


def test_max_body_is_refused_before_or_while_streaming() -> None:
    async def main() -> None:
        async with web_app("m1", max_body=100_000) as st:
            [m1] = st.machines
            s, url = st.session, st.url
            status, _, _ = await get(s, url, "web", "/upload", method="PUT", data=b"x" * 100_001)
            assert status == 413
            assert m1.seen == []
            status, _, _ = await get(
                s, url, "web", "/upload", method="PUT", data=chunks(pattern(300_000))
            )
            assert status == 413
            status, text, _ = await get(s, url, "web", "/upload", method="PUT", data=b"ok")
            assert (status, json.loads(text)["size"]) == (200, 2)

    run(main)


def test_a_client_whose_body_stops_coming_gets_a_408_and_the_connection_is_to_close() -> None:
    async def main() -> None:
        async with web_app("m1", body_timeout=0.5) as st:
            request = (
                b"PUT /upload HTTP/1.1\r\nHost: web.localhost\r\n"
                b"Content-Length: 1000\r\n\r\nonly this"
            )
            port = int(st.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)  # and then nothing more
                status = await asyncio.wait_for(reader.readline(), DEADLINE)
                assert status.startswith(b"HTTP/1.1 408 "), status
                assert b"Connection: close" in await reader.readuntil(b"\r\n\r\n")
            finally:
                writer.close()
            # The app still answers others.
            status, _, machine = await get(st.session, st.url, "web")
            assert (status, machine) == (200, "m1")

    run(main)


def test_a_websocket_message_over_the_bound_closes_the_session_with_1009() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            s, url = st.session, st.url
            async with s.ws_connect(url + "/ws", headers=host("web"), protocols=("echo",)) as ws:
                await ws.send_str("x" * 100)
                assert await ws.receive_str(timeout=DEADLINE) == "m1:" + "x" * 100
                await ws.send_bytes(b"y" * (MIB + 1))
                closed = await ws.receive(timeout=DEADLINE)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
                assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, ws.close_code
            await until(lambda: st.table.in_flight("m1") == 0, "the session to end")

    run(main)


def test_smuggling_attempts_never_reach_a_machine() -> None:
    attempts = [
        b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
        b"Host: web.localhost\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web.localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web.localhost\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web.localhost\r\nContent-Length: 5\r\n"
        b"Content-Length: 40\r\n\r\nhello",
    ]

    async def main() -> None:
        async with machines("m1") as (m1,):
            table = RoutingTable()
            table.replace("web", [m1.backend()])
            async with proxy(table) as (_, url):
                for attempt in attempts:
                    answer = await raw(url, attempt)
                    assert status_of(answer) == 400, (attempt, answer[:200])
                assert m1.seen == []
                # A transfer coding list aiohttp accepts is decoded by the proxy and framed anew:
                # the machine gets plain chunked framing and exactly the 5 body bytes.
                answer = await raw(
                    url,
                    b"POST /one HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n"
                    b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                )
                assert status_of(answer) == 200, answer[:200]
                assert b'"body": 5' in answer
            assert [path for _, path, _ in m1.seen] == ["/one"]
            assert m1.seen[0][2]["transfer-encoding"] == ["chunked"]

    run(main)


def test_head_keeps_the_length_and_sends_no_body() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            s, url = st.session, st.url
            async with s.head(url + "/download?n=1234", headers=host("web")) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == "1234"
                assert await resp.read() == b""
            assert (await get(s, url, "web"))[0] == 200  # the connection is still in step

    run(main)


# WebSocket -----------------------------------------------------------------------------------


def test_websocket_echo_through_the_proxy() -> None:
    async def main() -> None:
        async with web_app("m1") as st:
            [m1] = st.machines
            s, table, url, server = st.session, st.table, st.url, st.server
            async with s.ws_connect(url + "/ws", headers=host("web"), protocols=("echo",)) as ws:
                assert ws.protocol == "echo"
                await ws.send_str("hello")
                assert await ws.receive_str(timeout=DEADLINE) == "m1:hello"
                await ws.send_bytes(b"abc")
                assert await ws.receive_bytes(timeout=DEADLINE) == b"cba"
                assert table.in_flight("m1") == 1
                assert server.in_flight == 1
                await ws.close()
            await until(lambda: table.in_flight("m1") == 0, "the session to end")
            assert m1.seen[0][2]["x-forwarded-host"] == ["web.localhost"]

    run(main)


def full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that never accepts, its backlog filled: the kernel drops further SYNs,
    so a connect to it hangs as to a machine that vanished from the network."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    while len(fillers) < 64:
        s = socket.socket()
        s.setblocking(False)
        fillers.append(s)
        s.connect_ex(listener.getsockname())
        _, connected, _ = select.select([], [s], [], 0.2)
        if not connected:  # this SYN went unanswered: the next connects hang too
            return listener, fillers
    raise AssertionError("the backlog never filled")


def test_a_machine_that_does_not_answer_connects_costs_one_connect_timeout() -> None:
    async def main() -> None:
        listener, fillers = full_backlog()
        port = listener.getsockname()[1]
        try:
            async with machines("live") as (live,), aiohttp.ClientSession() as s:
                table = RoutingTable(ejection=30)
                table.replace("web", [Backend("mute", "127.0.0.1", port), live.backend()])
                server = ProxyServer(table, connect_timeout=0.5, request_timeout=30)
                proxy_port = await server.start("127.0.0.1", 0)
                url = f"http://127.0.0.1:{proxy_port}"
                try:
                    # The first request goes to "mute", waits out the connect timeout and is
                    # answered by "live"; a POST too: nothing reached "mute".
                    start = time.monotonic()
                    status, _, machine = await get(s, url, "web", method="POST", data=b"x")
                    first = time.monotonic() - start
                    assert (status, machine) == (200, "live")
                    assert 0.5 <= first < 5, first
                    assert table.ejected() == {"mute"}
                    # "mute" is ejected: the next requests never wait for it.
                    start = time.monotonic()
                    for _ in range(10):
                        assert (await get(s, url, "web"))[::2] == (200, "live")
                    assert time.monotonic() - start < 0.5
                    assert len(live.seen) == 11
                finally:
                    await server.stop(grace=5)
        finally:
            for f in fillers:
                f.close()
            listener.close()

    run(main)


def test_a_killed_machine_is_ejected_and_gets_requests_again_once_back() -> None:
    async def main() -> None:
        async with machines("m1", "m2") as (m1, m2), aiohttp.ClientSession() as s:
            table = RoutingTable(ejection=0.5)
            table.replace("web", [m1.backend(), m2.backend()])
            async with proxy(table) as (_, url):
                port = m1.port
                await m1.stop()  # killed: its port refuses
                for _ in range(6):
                    assert (await get(s, url, "web"))[::2] == (200, "m2")
                assert table.ejected() == {"m1"}
                # m1 back on the same address: once the ejection is over it gets requests.
                back = Machine("m1")
                await back.start(port)
                try:
                    await until(lambda: not table.ejected(), "the ejection to end")
                    answered = {(await get(s, url, "web"))[2] for _ in range(4)}
                    assert answered == {"m1", "m2"}
                    assert back.seen
                finally:
                    await back.stop()

    run(main)


# Draining and stopping -----------------------------------------------------------------------


def test_a_draining_machine_finishes_its_request_and_gets_no_new_one() -> None:
    async def main() -> None:
        async with web_app("m1", "m2") as st:
            ms = st.machines
            s, table, url = st.session, st.table, st.url
            slow = asyncio.create_task(get(s, url, "web", "/slow"))
            await until(lambda: sum(m.waiting for m in ms) == 1, "the slow request")
            busy, other = ms if ms[0].waiting else ms[::-1]
            table.set_draining("web", busy.machine_id)
            seen_before = len(busy.seen)
            answered = {(await get(s, url, "web"))[2] for _ in range(4)}
            assert answered == {other.machine_id}
            assert len(busy.seen) == seen_before
            assert table.in_flight_by_machine() == {busy.machine_id: 1}
            busy.gate.set()
            assert await slow == (200, busy.machine_id, busy.machine_id)
            assert table.in_flight_by_machine() == {}

    run(main)


def test_stop_waits_for_requests_in_flight_and_refuses_new_connections() -> None:
    async def main() -> None:
        async with machines("m1") as (m1,), aiohttp.ClientSession() as s:
            table = RoutingTable()
            table.replace("web", [m1.backend()])
            server = ProxyServer(table, connect_timeout=5, request_timeout=60)
            port = await server.start("127.0.0.1", 0)
            url = f"http://127.0.0.1:{port}"
            slow = asyncio.create_task(get(s, url, "web", "/slow"))
            await until(lambda: m1.waiting == 1, "the slow request")
            stopping = asyncio.create_task(server.stop(grace=60))
            await until(lambda: not _accepts(port), "the listener to close")
            assert not stopping.done()
            m1.gate.set()
            assert await slow == (200, "m1", "m1")
            await asyncio.wait_for(stopping, DEADLINE)

    run(main)


def test_stop_cuts_what_is_left_after_the_grace() -> None:
    async def main() -> None:
        async with machines("m1") as (m1,), aiohttp.ClientSession() as s:
            table = RoutingTable()
            table.replace("web", [m1.backend()])
            server = ProxyServer(table)
            port = await server.start("127.0.0.1", 0)
            slow = asyncio.create_task(get(s, f"http://127.0.0.1:{port}", "web", "/slow"))
            await until(lambda: m1.waiting == 1, "the slow request")
            await asyncio.wait_for(server.stop(grace=0.2), DEADLINE)
            with pytest.raises(aiohttp.ClientError):
                await slow
            assert server.in_flight == 0

    run(main)


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
