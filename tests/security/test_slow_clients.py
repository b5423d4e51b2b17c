"""Slow, idle and greedy clients cannot starve `skyreg serve` of connections or descriptors.

Every test runs a real server with small timeouts and talks to it over raw sockets, so it can
stop half-way through a request. "Closed" means the server ended the connection (EOF or reset);
each wait has a generous deadline that only a server which never closes would reach.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import resource
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from skyreg.netaddr import client_key
from skyreg.registry.connections import ConnectionGuard, ConnectionLimits
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import sha256
from tests.support.platform import Tenancy
from tests.support.servers import RunningRegistry, ServedRegistry

DEADLINE = 30.0  # seconds: far beyond every timeout the tests configure


_LIMITS = {
    "--header-timeout": "header_timeout",
    "--keepalive-timeout": "keepalive_timeout",
    "--body-timeout": "body_timeout",
    "--request-timeout": "request_timeout",
}


def _serve_options(args: tuple[str, ...], auth: bool) -> dict[str, object]:
    """The `skyreg serve` flags these tests use, as `ServeConfig` fields."""
    options: dict[str, object] = {"auth": auth}
    limits: dict[str, Any] = {}
    proxies: list[str] = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in _LIMITS:
            limits[_LIMITS[flag]] = float(value)
        elif flag == "--max-connections-per-client":
            limits["max_per_client"] = int(value)
        elif flag == "--trusted-proxy":
            proxies.append(value)
        elif flag == "--auth-failure-limit":
            options["auth_failure_limit"] = int(value)
        else:
            raise ValueError(f"no ServeConfig field for {flag}")
    options["connections"] = ConnectionLimits(**limits)
    options["trusted_proxies"] = tuple(proxies)
    return options


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str, auth: bool = False) -> Iterator[ServedRegistry]:
    """A server in this process (tests/support/inprocess.py) with `skyreg serve` flags `args`."""
    reg = InProcessRegistry(data_dir=tmp_path / "data", options=_serve_options(args, auth))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@contextlib.contextmanager
def serving_process(tmp_path: Path, *args: str) -> Iterator[RunningRegistry]:
    """`skyreg serve --no-auth` as a process of its own, for tests of its descriptors."""
    reg = RunningRegistry(data_dir=tmp_path / "data", extra_args=["--no-auth", *args])
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def connect(reg: ServedRegistry, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the registry from `source` (any 127/8 address is loopback)."""
    return socket.create_connection(
        ("127.0.0.1", reg.port), timeout=DEADLINE, source_address=(source, 0)
    )


def request_head(method: str, path: str, **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: registry",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Closed(Exception):
    """The server closed the connection before a whole response."""


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise Closed(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise Closed("connection closed in the middle of a response body")
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, deadline: float, trickle: bytes = b"") -> bool:
    """Wait until the server closes `sock` (True) or `deadline` passes (False).

    With `trickle`, send it one byte every 0.25 s meanwhile: a client that never finishes.
    """
    pending = trickle
    while time.monotonic() < deadline:
        try:
            if pending:
                sock.send(pending[:1])
                pending = pending[1:]
            sock.settimeout(0.25)
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def get_base(reg: ServedRegistry, source: str = "127.0.0.1") -> int:
    """Status of `GET /v2/` on a new connection from `source`."""
    with connect(reg, source) as sock:
        sock.sendall(request_head("GET", "/v2/", Connection="close"))
        status, _, _ = read_response(sock)
        return status


def endless_head() -> bytes:
    """A request head that never ends: a header value growing one byte at a time."""
    return b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nX-Slow: " + b"a" * 4000


def test_header_timeout_closes_silent_and_trickling_clients_while_others_are_served(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, "--header-timeout", "1", "--keepalive-timeout", "60") as reg:
        silent = connect(reg)
        trickling = connect(reg)
        # A head trickled after a first answered request is bounded the same way.
        kept = connect(reg)
        kept.sendall(request_head("GET", "/v2/"))
        assert read_response(kept)[0] == 200
        assert get_base(reg) == 200  # others are answered while those hang on
        deadline = time.monotonic() + DEADLINE
        with silent, trickling, kept:
            assert closed_by_server(trickling, deadline, trickle=endless_head())
            assert closed_by_server(kept, deadline, trickle=endless_head())
            assert closed_by_server(silent, deadline)
        assert get_base(reg) == 200


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(tmp_path: Path) -> None:
    args = ["--keepalive-timeout", "1", "--header-timeout", "60"]
    with serving(tmp_path, *args) as reg, connect(reg) as sock:
        sock.sendall(request_head("GET", "/v2/"))
        status, headers, _ = read_response(sock)
        assert status == 200
        assert headers.get("connection", "").lower() != "close"
        # The same connection serves a second request: it is kept alive, then dropped.
        sock.sendall(request_head("GET", "/v2/"))
        assert read_response(sock)[0] == 200
        assert closed_by_server(sock, time.monotonic() + DEADLINE)


def _upload_status(reg: ServedRegistry, location: str) -> int:
    """Bytes the upload holds, from its status (`Range: 0-<last>`; "0-0" for none)."""
    req = urllib.request.Request(f"{reg.url}{location}", method="GET")
    with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
        assert resp.status == 204
        last = int(resp.headers["Range"].split("-")[1])
    return last + 1 if last > 0 else 0


def test_stalled_upload_body_is_abandoned_and_upload_stays_resumable(tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    # Long header and keep-alive timeouts: only the body timeout may end the stalled request.
    args = ["--body-timeout", "1", "--header-timeout", "600", "--keepalive-timeout", "600"]
    with serving(tmp_path, *args) as reg:
        req = urllib.request.Request(f"{reg.url}/v2/slow/upload/blobs/uploads/", method="POST")
        with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        with connect(reg) as sock:
            sock.sendall(
                request_head(
                    "PATCH",
                    location,
                    **{
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(len(blob)),
                    },
                )
            )
            sock.sendall(blob[: len(blob) // 2])  # then nothing more
            assert closed_by_server(sock, time.monotonic() + DEADLINE)
        # The upload is still there, holds a prefix of what was sent, and can be finished.
        held = _upload_status(reg, location)
        assert 0 <= held <= len(blob) // 2
        with connect(reg) as sock:
            rest = blob[held:]
            sock.sendall(
                request_head(
                    "PATCH",
                    location,
                    **{
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(len(rest)),
                        "Content-Range": f"{held}-{len(blob) - 1}",
                    },
                )
                + rest
            )
            status, headers, _ = read_response(sock)
            assert status == 202, headers
            sock.sendall(request_head("PUT", f"{location}?digest={sha256(blob)}"))
            status, headers, _ = read_response(sock)
            assert status == 201, headers
        with urllib.request.urlopen(f"{reg.url}/v2/slow/upload/blobs/{sha256(blob)}") as resp:
            assert resp.read() == blob


def test_connections_per_client_are_capped_except_for_trusted_proxies(tmp_path: Path) -> None:
    cap = 4
    args = ["--max-connections-per-client", str(cap), "--header-timeout", "60"]
    with (
        serving(tmp_path, *args, "--trusted-proxy", "127.0.0.3") as reg,
        contextlib.ExitStack() as held,
    ):
        greedy = [held.enter_context(connect(reg, "127.0.0.2")) for _ in range(cap)]
        for _ in range(3):
            with connect(reg, "127.0.0.2") as extra:
                # Refused at once with a reason, before the client has said anything.
                status, headers, _ = read_response(extra)
                assert status == 429
                assert int(headers["retry-after"]) >= 1
                assert closed_by_server(extra, time.monotonic() + DEADLINE)
        assert get_base(reg, "127.0.0.1") == 200
        # A proxy carries many clients: its connections are not capped.
        for _ in range(cap + 2):
            held.enter_context(connect(reg, "127.0.0.3"))
        assert get_base(reg, "127.0.0.3") == 200
        # Slots come back when connections end.
        for sock in greedy:
            sock.close()
        deadline = time.monotonic() + DEADLINE
        while _try_get_base(reg, "127.0.0.2") != 200:
            assert time.monotonic() < deadline, "the cap never released closed connections"
            time.sleep(0.05)


def _try_get_base(reg: ServedRegistry, source: str) -> int | None:
    """`GET /v2/`'s status, or None when the server hung up (a refusal racing the request)."""
    try:
        return get_base(reg, source)
    except (Closed, ConnectionResetError, BrokenPipeError):
        return None


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_server_out_of_descriptors_recovers_and_answers_a_new_client(tmp_path: Path) -> None:
    limit = 64
    with (
        serving_process(tmp_path, "--header-timeout", "1") as reg,
        contextlib.ExitStack() as held,
    ):
        assert reg.proc is not None
        pid = reg.proc.pid
        assert _open_files(pid) < limit - 8, "the server needs room to accept a few clients"
        # The hard limit too, so the server cannot raise it again.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        for i in range(2 * limit):
            held.enter_context(connect(reg, f"127.0.0.{2 + i % 5}"))
        with connect(reg) as sock:
            sock.sendall(request_head("GET", "/v2/", Connection="close"))
            # Idle sockets are closed after the header timeout, asyncio accepts again, and
            # this request (queued behind them) is answered.
            status, _, _ = read_response(sock)
            assert status == 200
        assert "out of system resource" in reg.log()  # it did run out of descriptors


def test_serve_raises_its_descriptor_soft_limit_to_the_hard_limit(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"hard descriptor limit {hard} leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the server
    try:
        reg = RunningRegistry(data_dir=tmp_path / "data", extra_args=["--no-auth"])
        reg.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert reg.proc is not None
        server_soft, server_hard = resource.prlimit(reg.proc.pid, resource.RLIMIT_NOFILE)
        assert server_hard == hard
        assert server_soft > low
        with urllib.request.urlopen(f"{reg.url}/v2/", timeout=DEADLINE) as resp:
            assert resp.status == 200
    finally:
        reg.stop()


# Small timeouts: a body trickled every half second is never inactive for --body-timeout.
TRICKLE_INTERVAL = 0.5
REQUEST_TIMEOUT_ARGS = ["--request-timeout", "3", "--body-timeout", "2"]


def trickle(
    streams: dict[str, tuple[socket.socket, bytes]], deadline: float
) -> dict[str, tuple[bool, bytes]]:
    """Send every stream's bytes one at a time, one byte per stream every TRICKLE_INTERVAL,
    until each stream is closed by the server or has a response head, or `deadline` passes.

    Returns, per stream, whether the server closed it and what it answered before that.
    """
    pending = {name: data for name, (_, data) in streams.items()}
    received = dict.fromkeys(streams, b"")
    closed: set[str] = set()

    def done(name: str) -> bool:
        return name in closed or b"\r\n\r\n" in received[name]

    while not all(done(name) for name in streams) and time.monotonic() < deadline:
        for name, (sock, _) in streams.items():
            if done(name) or not pending[name]:
                continue
            try:
                sock.send(pending[name][:1])
            except (BrokenPipeError, ConnectionResetError):
                closed.add(name)
                continue
            pending[name] = pending[name][1:]
        round_end = time.monotonic() + TRICKLE_INTERVAL
        while (left := round_end - time.monotonic()) > 0:
            waiting = {sock: name for name, (sock, _) in streams.items() if not done(name)}
            if not waiting:
                break
            readable, _, _ = select.select(list(waiting), [], [], left)
            for sock in readable:
                name = waiting[sock]
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[name] += data
                else:
                    closed.add(name)
    return {name: (name in closed, received[name]) for name in streams}


def test_small_request_bodies_trickled_never_idle_are_closed_after_request_timeout(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, *REQUEST_TIMEOUT_ARGS, auth=True) as reg:
        tenancy = Tenancy(reg.data_dir)
        tenancy.org("slow")
        tenancy.app("trickled", "slow")
        admin = tenancy.admin_secret()
        basic = "Basic " + base64.b64encode(f"x:{admin}".encode()).decode()
        endless = b'{"name": "' + b"a" * 4096  # far more than a trickle sends before DEADLINE
        heads = {
            "api": request_head(
                "POST",
                "/api/v1/orgs",
                Authorization=f"Bearer {admin}",
                **{"Content-Type": "application/json", "Content-Length": "8192"},
            ),
            "manifest": request_head(
                "PUT",
                "/v2/trickled/manifests/latest",
                Authorization=basic,
                **{
                    "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                    "Content-Length": "8192",
                },
            ),
            "token": request_head(
                "POST",
                "/auth/token",
                **{
                    "Content-Type": "application/x-www-form-urlencoded",
                    "Content-Length": "8192",
                },
            ),
            "graphql-chunked": request_head(
                "POST",
                "/graphql",
                Authorization=f"Bearer {admin}",
                **{"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            ),
        }
        bodies = {name: endless for name in heads}
        bodies["token"] = b"grant_type=password&password=" + b"a" * 4096
        bodies["graphql-chunked"] = b"1\r\na\r\n" * 1000  # one-byte chunks, never the last
        with contextlib.ExitStack() as held:
            streams = {}
            for name, head in heads.items():
                sock = held.enter_context(connect(reg))
                sock.sendall(head)
                streams[name] = (sock, bodies[name])
            outcome = trickle(streams, time.monotonic() + DEADLINE)
        # Closed without an answer (never a response to half a body), and by the request
        # timeout: the body was never silent for --body-timeout.
        assert outcome == dict.fromkeys(heads, (True, b""))
        assert reg.log().count("request body incomplete") == len(heads), reg.log()
        assert "Error handling request" not in reg.log()  # one INFO line each, no traceback
        assert get_base_status_with_auth(reg) == 401  # the server goes on serving


def get_base_status_with_auth(reg: ServedRegistry) -> int:
    try:
        with urllib.request.urlopen(f"{reg.url}/v2/", timeout=DEADLINE) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_blob_upload_trickled_past_request_timeout_is_not_closed_by_it(tmp_path: Path) -> None:
    blob = os.urandom(12)  # twelve bytes at TRICKLE_INTERVAL outlast --request-timeout 3
    with serving(tmp_path, *REQUEST_TIMEOUT_ARGS) as reg:
        req = urllib.request.Request(f"{reg.url}/v2/slow/upload/blobs/uploads/", method="POST")
        with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
            assert resp.status == 202
            location = resp.headers["Location"]
        with connect(reg) as upload, connect(reg) as manifest:
            upload.sendall(
                request_head(
                    "PATCH",
                    location,
                    **{
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(len(blob)),
                    },
                )
            )
            # Beside it, on the same server, a manifest trickled the same way is cut off.
            manifest.sendall(
                request_head(
                    "PUT",
                    "/v2/slow/upload/manifests/latest",
                    **{
                        "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                        "Content-Length": "8192",
                    },
                )
            )
            outcome = trickle(
                {"upload": (upload, blob), "manifest": (manifest, b"{" * 4096)},
                time.monotonic() + DEADLINE,
            )
        assert outcome["manifest"] == (True, b"")
        closed, answer = outcome["upload"]
        assert answer.startswith(b"HTTP/1.1 202 "), (closed, answer)
        assert _upload_status(reg, location) == len(blob)
        digest = sha256(blob)
        put = urllib.request.Request(f"{reg.url}{location}?digest={digest}", method="PUT")
        with urllib.request.urlopen(put, timeout=DEADLINE) as resp:
            assert resp.status == 201
        assert reg.log().count("request body incomplete") == 1, reg.log()


def test_client_key_groups_ipv6_by_64_and_keeps_ipv4_whole() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.8") != client_key("192.0.2.7")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"  # IPv4-mapped: the IPv4 client
    one_host = {client_key(a) for a in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff")}
    assert one_host == {"2001:db8:1:2::/64"}
    assert client_key("2001:DB8:1:2:0:0:0:9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"  # the next /64 is another
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("unknown") == "unknown"  # not an address: itself


def test_connection_cap_counts_an_ipv6_64_as_one_client() -> None:
    guard = ConnectionGuard(ConnectionLimits(max_per_client=2))
    assert guard.admit("2001:db8::1")
    assert guard.admit("2001:db8::2:3")
    assert not guard.admit("2001:db8::ffff:4")  # a third address of the same /64
    assert guard.open_connections("2001:db8::5") == 2
    assert guard.admit("2001:db8:0:1::1")  # another /64 is another client
    guard.release("2001:db8::1")
    assert guard.admit("2001:db8::7")
    assert guard.admit("192.0.2.1") and guard.admit("192.0.2.1")
    assert not guard.admit("::ffff:192.0.2.1")


def _failed_login_through_proxy(reg: ServedRegistry, client: str) -> int:
    """Status of `GET /v2/` with a wrong token, as forwarded by the proxy at 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", reg.port, timeout=DEADLINE)
    try:
        wrong = base64.b64encode(b"x:skyreg_wrong").decode()
        conn.request(
            "GET", "/v2/", headers={"Authorization": f"Basic {wrong}", "X-Forwarded-For": client}
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_failed_logins_from_one_ipv6_64_are_limited_as_one_client(tmp_path: Path) -> None:
    # Loopback has one IPv6 address, so the clients are forwarded by a trusted proxy.
    args = ["--trusted-proxy", "127.0.0.1", "--auth-failure-limit", "3"]
    with serving(tmp_path, *args, auth=True) as reg:
        statuses = [_failed_login_through_proxy(reg, f"2001:db8:1:2::{i:x}") for i in range(1, 6)]
        assert statuses == [401, 401, 401, 429, 429]  # a new address per try does not help
        assert _failed_login_through_proxy(reg, "2001:db8:1:3::1") == 401  # another /64
        assert _failed_login_through_proxy(reg, "192.0.2.1") == 401
