"""A hostile tenant (its machine's code, its app's clients) against machine networking and the
proxy (issue 14). Each test is a reproduction of an attack that works today: it fails until the
fix it names is made.

- One app's machines, or any client of any app, hold every connection of the proxy's one client
  pool (`ProxyServer`'s `TCPConnector(limit=max_connections)`, 1000 by default, no per-machine
  limit, no deadline on waiting for a connection): every other app on the proxy waits forever.
- One app's machine sets cookies for every app under the proxy's domain.
- Every request the proxy's parser refuses costs an ERROR with a traceback in its log.
- A machine reaches the cloud's metadata address (169.254.169.254) through its host: FORWARD
  accepts whatever leaves an org bridge, and the masquerade gives it the host's address."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from ipaddress import IPv4Network
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from skyreg.machines.network import Attachment, HostNetwork, enter_command
from skyreg.proxy.server import ProxyServer
from skyreg.proxy.table import Backend, RoutingTable
from tests.support.netns import free_subnet, fresh_prefix, host_routes, leftovers, network_problem

pytestmark = pytest.mark.timeout(180)

POOL = 1000  # requests one tenant piles on its app: past the per-app bound, past the old pool


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 150))


class Machine:
    """A real aiohttp server standing for one machine: `/` answers at once, `/hang` never,
    `/ws` is a WebSocket that stays open, `/upload` reads the whole body first."""

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        self.hanging = 0
        self.sockets = 0
        self.uploads = 0
        self.port = 0
        self._forever = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def backend(self) -> Backend:
        return Backend(self.machine_id, "127.0.0.1", self.port, "local")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._ok)
        app.router.add_get("/hang", self._hang)
        app.router.add_get("/ws", self._ws)
        app.router.add_post("/upload", self._upload)
        app.router.add_get("/login", self._login)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._forever.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ok(self, request: web.Request) -> web.Response:
        # Leaves no idle connection in the proxy's pool for a later request to take (a busy
        # app uses its idle ones at once, a quiet app's expire after 15 s): each request of
        # the victim's needs a connection of the pool.
        response = web.Response(text=self.machine_id)
        response.force_close()
        return response

    async def _hang(self, request: web.Request) -> web.Response:
        # A tenant's machine that takes its time: each read of the proxy's is answered by
        # nothing for request_timeout (60 s) at most, so a trickle keeps it forever.
        self.hanging += 1
        await self._forever.wait()
        return web.Response(text="late")

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets += 1
        async for _ in ws:
            pass
        return ws

    async def _login(self, request: web.Request) -> web.Response:
        # A tenant's page planting a session of its choosing in every app under the domain.
        response = web.Response(text="welcome")
        response.headers.add("Set-Cookie", "session=chosen-by-hog; Domain=localhost; Path=/")
        response.headers.add("Set-Cookie", "csrf=x; Domain=.victim.localhost; Path=/")
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploads += 1
        body = await request.read()
        return web.Response(text=str(len(body)))


@contextlib.asynccontextmanager
async def two_apps() -> AsyncIterator[tuple[Machine, Machine, str]]:
    """App `hog` (a tenant's) and app `victim` (another org's) behind one proxy, as `skyreg
    proxy` makes it (default limits)."""
    hog, victim = Machine("hog-1"), Machine("victim-1")
    await hog.start()
    await victim.start()
    table = RoutingTable()
    table.replace("hog", [hog.backend()])
    table.replace("victim", [victim.backend()])
    proxy = ProxyServer(table, "localhost")
    port = await proxy.start("127.0.0.1", 0)
    try:
        yield hog, victim, f"http://127.0.0.1:{port}"
    finally:
        await proxy.stop(grace=0.1)
        await hog.stop()
        await victim.stop()


async def launch(hold: Callable[[], Coroutine[Any, Any, None]]) -> list[asyncio.Task[None]]:
    """POOL tasks running `hold`, started 50 at a time (the proxy's listen backlog is 128: a
    burst past it costs SYN retries of seconds)."""
    held = []
    for _ in range(0, POOL, 50):
        held += [asyncio.create_task(hold()) for _ in range(50)]
        await asyncio.sleep(0.05)
    return held


async def settle(count: Callable[[], int], target: int, what: str) -> None:
    """Wait until `count()` reaches `target`, or stops growing for 3 s once above zero
    (a proxy that bounds an app lets fewer through): the attack is then in place."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    last, since = -1, loop.time()
    while (now := count()) < target:
        if now != last:
            last, since = now, loop.time()
        elif now > 0 and loop.time() - since > 3.0:
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def victim_answers(url: str) -> str:
    """What app `victim` answers through the proxy, or why it did not within 5 s."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        try:
            async with s.get(url + "/", headers={"Host": "victim.localhost"}) as r:
                return f"{r.status} {await r.text()}"
        except TimeoutError:
            return "no answer in 5 s"


def test_one_apps_slow_machine_does_not_starve_every_other_app() -> None:
    """A tenant's machine that answers slowly (or never, within the proxy's 60 s per read) and
    1000 requests to it from the tenant's own clients take every connection of the pool; the
    proxy then waits, without a deadline, for a free one for any other app's request.
    Fix: a per-machine (or per-app) bound (`TCPConnector(limit_per_host=...)` or a semaphore
    per app in ProxyServer, answering 503 past it), and a deadline on getting a connection
    (`ClientTimeout(connect=...)`, counted as a 503, not a retry)."""

    async def main() -> None:
        async with two_apps() as (hog, _, url):
            assert await victim_answers(url) == "200 victim-1"
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:

                async def hold() -> None:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with s.get(url + "/hang", headers={"Host": "hog.localhost"}) as r:
                            await r.read()

                held = await launch(hold)
                await settle(lambda: hog.hanging, POOL, "requests at hog's machine")
                try:
                    assert await victim_answers(url) == "200 victim-1"
                finally:
                    for t in held:
                        t.cancel()
                    await asyncio.gather(*held, return_exceptions=True)

    run(main)


def test_websockets_to_one_app_do_not_starve_every_other_app() -> None:
    """WebSockets relayed to a machine hold a connection of the same pool for their whole life
    (no timeout at all): 1000 idle WebSockets to the tenant's app, and the proxy serves no
    other app any more. Fix: as above (WebSockets count against a per-app bound, and relayed
    sessions could use a pool of their own)."""

    async def main() -> None:
        async with two_apps() as (hog, _, url):
            assert await victim_answers(url) == "200 victim-1"
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:

                async def hold() -> None:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with s.ws_connect(url + "/ws", headers={"Host": "hog.localhost"}):
                            await asyncio.Event().wait()

                held = await launch(hold)
                await settle(lambda: hog.sockets, POOL, "WebSockets at hog's machine")
                try:
                    assert await victim_answers(url) == "200 victim-1"
                finally:
                    for t in held:
                        t.cancel()
                    await asyncio.gather(*held, return_exceptions=True)

    run(main)


def test_clients_trickling_request_bodies_do_not_starve_every_app() -> None:
    """No tenant machine needed: any client on the internet sends headers announcing a body
    and then nothing (or a byte now and then). The proxy has already opened a connection to
    the machine and streams the body to it; nothing bounds how long it waits for the client's
    body, so 1000 such clients hold the whole pool. Fix: a deadline on each read of the
    client's body (and the bounds above)."""

    async def main() -> None:
        async with two_apps() as (hog, _, url):
            assert await victim_answers(url) == "200 victim-1"
            port = int(url.rsplit(":", 1)[1])
            writers = []
            try:
                for _ in range(POOL):
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(
                        b"POST /upload HTTP/1.1\r\nHost: hog.localhost\r\n"
                        b"Content-Length: 1000000\r\n\r\nx"
                    )
                    writers.append(w)
                await asyncio.gather(*(w.drain() for w in writers))
                await settle(lambda: hog.uploads, POOL, "uploads at hog's machine")
                assert await victim_answers(url) == "200 victim-1"
            finally:
                for w in writers:
                    w.close()

    run(main)


def test_one_app_cannot_set_cookies_for_every_app_under_the_domain() -> None:
    """Every app is `<app>.<domain>`, and `<domain>` is on no public suffix list: a cookie a
    machine sets with `Domain=<domain>` is sent by browsers to every other app (session
    fixation, CSRF-token tossing, cookie bombs that make another app answer 400 to its own
    users), and `Domain=<other app>.<domain>` is refused by browsers but not by other clients.
    The proxy relays Set-Cookie as the machine wrote it. Fix: the proxy drops a Set-Cookie
    whose Domain attribute is not the request's own `<app>.<domain>` (or removes the
    attribute, making it a host-only cookie), and the operator's guide asks for `<domain>` on
    the public suffix list (as herokuapp.com and fly.dev are)."""

    async def main() -> None:
        async with two_apps() as (_, _v, url), aiohttp.ClientSession() as s:
            async with s.get(url + "/login", headers={"Host": "hog.localhost"}) as r:
                assert r.status == 200
                cookies = r.headers.getall("Set-Cookie", [])
            # A Domain naming the app's own host changes nothing; any other reaches further.
            wide = [
                c
                for c in cookies
                for attr in c.split(";")[1:]
                if attr.strip().lower().startswith("domain=")
                and attr.split("=", 1)[1].strip().lower().lstrip(".") != "hog.localhost"
            ]
            assert wide == [], wide

    run(main)


def test_malformed_requests_cost_no_traceback_each(caplog: pytest.LogCaptureFixture) -> None:
    """The proxy faces the internet; aiohttp logs every request its parser refuses (a bad
    request line, an obs-folded header, CL and TE together, two Hosts) at ERROR with a full
    traceback, ~12 lines for a 60-byte request: anyone fills the proxy's log (and its disk, and
    whoever is paged on errors). `skyreg serve` turns one such case into an INFO line
    (`server/process.py` `_unreadable_bodies_in_one_line`); the proxy has no such filter.
    Fix: a filter on `aiohttp.server` in `cli/proxy.py` (and `serve`) that logs a refused
    request (`aiohttp.http_exceptions.HttpProcessingError`) as one INFO or DEBUG line."""
    bad = [
        b"GET @x/ HTTP/1.1\r\nHost: hog.localhost\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hog.localhost\r\nX-A: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hog.localhost\r\nHost: victim.localhost\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: hog.localhost\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]

    async def main() -> None:
        async with two_apps() as (_, _v, url):
            port = int(url.rsplit(":", 1)[1])
            for request in bad:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                assert (await reader.read(12)).startswith(b"HTTP/1.")
                writer.close()

    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        run(main)
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]
    assert tracebacks == [], [r.getMessage() for r in tracebacks]


# --------------------------------------------------------------------------- machine networks

_WHY = network_problem()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

_CLIENT = """
import errno, socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("ok", s.recv(100).decode())
except socket.timeout:
    print("timeout")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"""

_METADATA_SERVER = """
import socket
s = socket.create_server(("169.254.169.254", 80))
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    conn.sendall(b"iam-credentials-of-the-host")
    conn.close()
"""


def _connect_from(att: Attachment, address: str, port: int) -> str:
    argv = [*enter_command(att), sys.executable, "-c", _CLIENT, address, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()


@pytest.fixture
def cloud_host() -> Iterator[tuple[HostNetwork, list[Callable[[], object]]]]:
    """A HostNetwork with NAT (the default) on a fresh prefix and subnet; cleans up after."""
    prefix = fresh_prefix("t")
    net = HostNetwork(prefix, free_subnet(16))
    cleanups: list[Callable[[], object]] = []
    try:
        net.ensure()
        yield net, cleanups
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        net.teardown()
    assert leftovers(prefix) == []


@needs_netns
def test_a_machine_cannot_reach_the_clouds_metadata_address(
    cloud_host: tuple[HostNetwork, list[Callable[[], object]]],
) -> None:
    """On a cloud VM, 169.254.169.254 answers the VM itself with its instance identity and the
    credentials of its role; the agent's host is such a VM. A machine connects there through
    its host today (FORWARD: `-i <prefix>b+ -j ACCEPT`, then MASQUERADE as the host), as a
    RUN step of a build cannot (SECURITY.md promises that for builds). Here the metadata
    service is a namespace of the test's own behind a veth pair with 169.254.169.254, reached
    from the host by a /30 route; the internet is never touched.
    Fix: in the FORWARD chain, before the accept, `-i <prefix>b+ -d 169.254.0.0/16 -j REJECT`
    (link-local: metadata on AWS, GCP, Azure, OpenStack; also fd00:ec2::254 if IPv6 is ever
    on), and an operator option for other ranges the machines must not reach (the host's LAN,
    the registry's database)."""
    net, cleanups = cloud_host
    link = IPv4Network("169.254.169.252/30")  # .253 the host's end, .254 the metadata service
    if any(link.overlaps(r) for r in host_routes()):
        pytest.skip("this host already routes 169.254.169.252/30")
    att = net.attach("m1", "orga")
    ns, veth = f"{net.prefix}md", f"{net.prefix}md0"

    def quiet(*argv: str) -> None:
        subprocess.run(list(argv), capture_output=True)

    cleanups.append(lambda: quiet("ip", "netns", "del", ns))
    cleanups.append(lambda: quiet("ip", "link", "del", veth))
    for argv in (
        ("ip", "netns", "add", ns),
        ("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns),
        ("ip", "addr", "add", "169.254.169.253/30", "dev", veth),
        ("ip", "link", "set", veth, "up"),
        ("ip", "-n", ns, "addr", "add", "169.254.169.254/30", "dev", "eth0"),
        ("ip", "-n", ns, "link", "set", "eth0", "up"),
    ):
        subprocess.run(list(argv), check=True, capture_output=True)
    server = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", _METADATA_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    cleanups.append(server.wait)
    cleanups.append(server.kill)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    got = _connect_from(att, "169.254.169.254", 80)
    assert got in (errno.errorcode[errno.EHOSTUNREACH], "timeout"), got
