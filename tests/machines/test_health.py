"""Health checks (`skyreg.machines.health`) against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from skyreg.machines.health import MAX_BODY, Check, HealthChecker, checks_from_service
from tests.support.waiting import free_port

Transitions = list[tuple[str, str | None, float]]


class Recorder:
    """The checker's callback: every transition, with the time it came."""

    def __init__(self, fail_first: int = 0) -> None:
        self.seen: Transitions = []
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self, status: str, message: str | None) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise RuntimeError("the server is away")
        self.seen.append((status, message, time.monotonic()))

    async def wait(self, count: int, timeout: float = 8.0) -> Transitions:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"only {self.seen} after {timeout}s"
            await asyncio.sleep(0.05)
        return self.seen

    def statuses(self) -> list[str]:
        return [s for s, _, _ in self.seen]


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


async def _served(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> TestServer:
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


def http(port: int, path: str = "/healthz", **kw: Any) -> Check:
    return Check("http", port, path, **{"interval": 1.0, "timeout": 1.0, "grace_period": 0, **kw})


def test_a_2xx_answer_passes_and_the_request_says_host_localhost() -> None:
    seen: list[tuple[str, str | None]] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Host")))
        return web.Response(text="fine")

    async def main() -> None:
        server = await _served(ok)
        rec = Recorder()
        began = time.monotonic()
        async with HealthChecker("127.0.0.1", [http(server.port)], rec) as checker:
            await rec.wait(1)
            assert checker.status == "passing"
        await server.close()
        assert rec.seen[0][:2] == ("passing", None)
        assert rec.seen[0][2] - began < 2.5  # the first check comes soon after the start
        assert seen[0] == ("/healthz", "localhost")

    run(main)


def test_a_redirect_passes_and_is_not_followed() -> None:
    paths: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        paths.append(request.path)
        if request.path == "/healthz":
            return web.Response(status=302, headers={"Location": "/broken"})
        return web.Response(status=500)

    async def main() -> None:
        server = await _served(handler)
        rec = Recorder()
        async with HealthChecker("127.0.0.1", [http(server.port)], rec):
            await rec.wait(1)
        await server.close()
        assert rec.statuses() == ["passing"] and "/broken" not in paths

    run(main)


def test_a_failing_status_is_critical_and_names_the_check() -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    async def main() -> None:
        server = await _served(broken)
        rec = Recorder()
        async with HealthChecker("127.0.0.1", [http(server.port)], rec) as checker:
            await rec.wait(1)
            await asyncio.sleep(2.2)  # more failures: transitions only, no more calls
            assert checker.status == "critical"
        await server.close()
        [(status, message, _)] = rec.seen
        assert status == "critical"
        assert message is not None and "/healthz" in message and "HTTP 503" in message

    run(main)


def test_a_slow_answer_times_out() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def main() -> None:
        server = await _served(slow)
        rec = Recorder()
        began = time.monotonic()
        async with HealthChecker("127.0.0.1", [http(server.port, timeout=0.3)], rec):
            await rec.wait(1)
        await server.close()
        [(status, message, when)] = rec.seen
        assert status == "critical" and message is not None and "timed out after 0.3s" in message
        assert when - began < 3

    run(main)


def test_refused_connections_are_critical_for_tcp_and_http() -> None:
    async def main() -> None:
        port = free_port()  # nothing listens there
        for check in (Check("tcp", port, interval=1, timeout=1, grace_period=0), http(port)):
            rec = Recorder()
            async with HealthChecker("127.0.0.1", [check], rec):
                await rec.wait(1)
            [(status, message, _)] = rec.seen
            assert status == "critical" and message is not None
            assert "connection refused" in message and f":{port}" in message

    run(main)


def test_a_tcp_check_passes_on_a_listener() -> None:
    async def main() -> None:
        accepted: list[bool] = []

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(True)
            w.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        rec = Recorder()
        async with HealthChecker("127.0.0.1", [Check("tcp", port, interval=1)], rec):
            await rec.wait(1)
        server.close()
        await server.wait_closed()
        assert rec.statuses() == ["passing"] and accepted

    run(main)


def _kernel_socket_buffers() -> int:
    """The most a sender's and a receiver's kernel may hold of one TCP stream, in bytes."""
    return sum(
        int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        for name in ("tcp_wmem", "tcp_rmem")
    )


def test_an_endless_body_is_read_to_a_bound_and_passes() -> None:
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * (1 << 16)
        while True:  # until the checker hangs up
            await resp.write(chunk)
            sent[0] += len(chunk)

    async def main() -> None:
        server = await _served(endless)
        rec = Recorder()
        async with HealthChecker("127.0.0.1", [http(server.port, timeout=5)], rec):
            await rec.wait(1)
        await server.close()
        assert rec.statuses() == ["passing"]
        # The checker hung up rather than read it all: what was sent is its bound plus what the
        # two kernels' socket buffers took (which differ between hosts: 4 MiB sent was seen).
        assert sent[0] <= MAX_BODY + _kernel_socket_buffers() + (1 << 20)

    run(main)


def test_failures_within_the_grace_period_keep_starting() -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def main() -> None:
        server = await _served(broken)
        rec = Recorder()
        began = time.monotonic()
        check = http(server.port, grace_period=2.5)
        async with HealthChecker("127.0.0.1", [check], rec, started_at=began) as checker:
            await asyncio.sleep(2.0)  # two failures so far, both within the grace period
            assert rec.seen == [] and checker.status == "starting"
            await rec.wait(1)
        await server.close()
        assert rec.statuses() == ["critical"] and rec.seen[0][2] - began >= 2.5

    run(main)


def test_recovery_and_relapse_are_reported_once_each() -> None:
    healthy = [False]

    async def toggled(request: web.Request) -> web.Response:
        return web.Response(status=200 if healthy[0] else 500)

    async def main() -> None:
        server = await _served(toggled)
        rec = Recorder()
        tcp = Check("tcp", server.port, interval=1, timeout=1, grace_period=0)
        async with HealthChecker("127.0.0.1", [http(server.port), tcp], rec):
            await rec.wait(1)
            healthy[0] = True
            await rec.wait(2)
            healthy[0] = False
            await rec.wait(3)
            await asyncio.sleep(1.5)
        await server.close()
        assert rec.statuses() == ["critical", "passing", "critical"]
        assert rec.seen[1][1] is None

    run(main)


def test_a_failed_report_is_retried() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response()

    async def main() -> None:
        server = await _served(ok)
        rec = Recorder(fail_first=1)
        async with HealthChecker("127.0.0.1", [http(server.port)], rec):
            await rec.wait(1, timeout=6)
        await server.close()
        assert rec.statuses() == ["passing"] and rec.calls == 2

    run(main)


def test_service_checks_get_their_defaults() -> None:
    service = {
        "internal_port": 8080,
        "checks": [{"type": "http", "path": "/healthz"}, {"type": "tcp", "port": 9000}],
    }
    assert checks_from_service(service) == [
        Check("http", 8080, "/healthz", 10.0, 2.0, 5.0),
        Check("tcp", 9000, "/", 10.0, 2.0, 5.0),
    ]
    assert checks_from_service(None) == [] == checks_from_service({"internal_port": 1})
    for bad in (
        {"internal_port": 0},
        {"internal_port": 80, "checks": [{"type": "udp"}]},
        {"internal_port": 80, "checks": [{"type": "http", "path": "/a b"}]},
        {"internal_port": 80, "checks": [{"type": "http", "interval": 0}]},
    ):
        with pytest.raises(ValueError):
            checks_from_service(bad)
