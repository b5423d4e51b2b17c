"""Connection hygiene: slow, idle and greedy clients cannot hold the server's connections.

Every connection is an aiohttp `RequestHandler` of the subclass below, created by
`ConnectionGuard.protocol_factory`. One timer per connection enforces whichever limit applies:

- header timeout: a new connection must send a complete request head within `header_timeout`
  of connecting; after a response, within `header_timeout` of the first byte of the next head
  (a slowloris client trickling header bytes is closed however fast it trickles);
- keep-alive timeout: after a response, a connection that sends nothing for
  `keepalive_timeout` is closed;
- body timeout: while a handler waits for a request body, no byte for `body_timeout` closes
  the connection. Time while the server itself stopped reading (flow control: the handler is
  busy and the buffer is full) does not count. The handler's next read fails as for any client
  that disconnects, so an upload keeps what reached the store and can be resumed;
- request timeout: every request but a blob upload (PATCH/PUT/POST under
  `/v2/<name>/blobs/uploads/`, whose body may be gigabytes) must have sent its whole body
  within `request_timeout` of its head being complete, however steadily it trickles;
- per-client cap: at most `max_per_client` concurrent connections per client (an IPv4
  address, an IPv6 /64: `skyreg.netaddr.client_key`); the next one gets a canned 429 with
  Retry-After and is closed at once, before anything is parsed. Trusted proxies
  (`--trusted-proxy`) carry many clients and are not capped.

Limits are per worker process (`serve --workers N` allows N times as many connections per
client in total). Responses being written are never timed out here (a slow download is fine).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from skyreg.netaddr import client_key
from skyreg.registry.forwarded import Network, trusted
from skyreg.registry.routing import Endpoint, match_route

log = logging.getLogger("skyreg.connections")

RETRY_AFTER = 1  # seconds a refused client is told to wait
_REFUSAL = (
    "HTTP/1.1 429 Too Many Requests\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    f"Retry-After: {RETRY_AFTER}\r\n"
    "Connection: close\r\n"
    "Content-Length: 40\r\n"
    "\r\n"
    "too many connections from this address\r\n"
).encode()


@dataclass(frozen=True)
class ConnectionLimits:
    """Timeouts (seconds) and the per-client connection cap (0: none) of `skyreg serve`."""

    header_timeout: float = 30.0
    keepalive_timeout: float = 30.0
    body_timeout: float = 60.0
    request_timeout: float = 120.0
    max_per_client: int = 128

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keepalive_timeout", "body_timeout", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_per_client < 0:
            raise ValueError("max_per_client must be 0 (no cap) or more")

    @property
    def aiohttp_keepalive(self) -> float:
        """aiohttp's own keep-alive timer, set so that it never fires before ours."""
        return self.keepalive_timeout + self.header_timeout + 1.0


def client_address(transport: asyncio.BaseTransport) -> str | None:
    """The peer's IP address in canonical form (IPv4-mapped IPv6 as IPv4); None if not IP."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


_UPLOAD_METHODS = frozenset({"PATCH", "PUT", "POST"})
_UPLOAD_ENDPOINTS = (Endpoint.UPLOAD_START, Endpoint.UPLOAD)


def is_blob_upload(request: web.BaseRequest) -> bool:
    """Whether `request` sends blob bytes (its body is bounded by inactivity, not in total)."""
    path = request.rel_url.path
    if request.method not in _UPLOAD_METHODS or not path.startswith("/v2/"):
        return False
    route = match_route(path.removeprefix("/v2/"))
    return route is not None and route.endpoint in _UPLOAD_ENDPOINTS


class ConnectionGuard:
    """One worker's limits and its count of open connections per client (`client_key`)."""

    def __init__(self, limits: ConnectionLimits, trusted_proxies: tuple[Network, ...] = ()):
        self.limits = limits
        self.trusted_proxies = trusted_proxies
        self._open: dict[str, int] = {}
        self._refusing: set[str] = set()

    def capped(self, address: str | None) -> bool:
        """Whether connections from `address` count against a cap (not trusted proxies)."""
        if address is None or self.limits.max_per_client <= 0:
            return False
        return not trusted(address, self.trusted_proxies)

    def admit(self, address: str) -> bool:
        """Count a new connection from a capped `address`; False (not counted) over the cap."""
        key = client_key(address)
        count = self._open.get(key, 0)
        if count >= self.limits.max_per_client:
            if key not in self._refusing:  # once per burst, not per refused connection
                self._refusing.add(key)
                log.warning(
                    "refusing connections from %s: %d open (--max-connections-per-client)",
                    key,
                    count,
                )
            return False
        self._open[key] = count + 1
        return True

    def release(self, address: str) -> None:
        """Forget one admitted connection from `address`."""
        key = client_key(address)
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
        self._refusing.discard(key)

    def open_connections(self, address: str) -> int:
        """Connections from `address`'s client currently counted against its cap."""
        return self._open.get(client_key(address), 0)

    def protocol_factory(
        self, server: web.Server, **handler_kwargs: Any
    ) -> Callable[[], GuardedRequestHandler]:
        """What `loop.create_server` calls for each accepted connection.

        `server` is the runner's `web.Server` (it dispatches requests and tracks connections
        for a graceful shutdown); `handler_kwargs` are the RequestHandler settings the runner
        was given.
        """
        loop = asyncio.get_running_loop()

        def factory() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, guard=self, **handler_kwargs)

        return factory


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol plus the limits of a `ConnectionGuard`.

    The state it reads from aiohttp (`_request_count`: request heads parsed on this connection,
    `_current_request`: the request whose handler runs, `_reading_paused`: flow control) is
    checked at construction, so an aiohttp that renamed them fails loudly at the first
    connection instead of silently enforcing nothing.
    """

    __slots__ = (
        "_address",
        "_answered",
        "_answered_at",
        "_connected_at",
        "_counted",
        "_guard",
        "_head_done_at",
        "_head_started_at",
        "_last_data",
        "_resumed_at",
        "_timed_out",
        "_timer",
        "_timer_at",
    )

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        for name in ("_request_count", "_current_request", "_reading_paused"):
            if not hasattr(self, name):
                raise RuntimeError(f"aiohttp's RequestHandler has no {name}: update connections.py")
        self._guard = guard
        self._address: str | None = None
        self._counted = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timed_out = False  # a limit here closed the connection
        now = self._loop.time()
        self._connected_at = now
        self._answered = 0  # responses finished; fewer than heads parsed means a request runs
        self._answered_at = now
        self._head_started_at: float | None = None
        self._head_done_at = now  # when the last request head parsed was complete
        self._last_data = now
        self._resumed_at = now

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (or refuse it over the client's cap) and start the clock."""
        super().connection_made(transport)
        now = self._loop.time()
        self._connected_at = self._answered_at = self._last_data = self._resumed_at = now
        address = self._address = client_address(transport)
        if address is not None and self._guard.capped(address):
            if not self._guard.admit(address):
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(_REFUSAL)  # buffered; close() sends it before closing
                self.force_close()
                return
            self._counted = True
        self._arm(now + self._guard.limits.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the timer and give the client's slot back."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted and self._address is not None:
            self._counted = False
            self._guard.release(self._address)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Note the activity, then let aiohttp parse."""
        if data:
            now = self._loop.time()
            self._last_data = now
            if self._head_started_at is None and self._idle():
                self._head_started_at = now
                if self._answered:  # a new connection's deadline already runs from connect
                    self._arm(now + self._guard.limits.header_timeout)
        heads = self._request_count
        super().data_received(data)
        if self._request_count > heads:
            # The parser emits a head only once the body before it is complete, so the newest
            # head is the only one whose body may still be arriving.
            self._head_done_at = self._loop.time()
            self._arm(self._head_done_at + self._guard.limits.request_timeout)
        if data and not self._idle():  # a head is complete: its body must keep coming
            self._arm(self._last_data + self._guard.limits.body_timeout)

    def resume_reading(self, resume_parser: bool = True) -> None:
        """Flow control let the body flow again: the client's inactivity clock restarts."""
        self._resumed_at = self._loop.time()
        super().resume_reading(resume_parser)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """After each response the connection is idle: the keep-alive clock starts."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            now = self._loop.time()
            self._answered += 1
            self._answered_at = now
            self._head_started_at = None
            if self._idle():
                self._arm(now + self._guard.limits.keepalive_timeout)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """The server is stopping: a request whose body is still arriving can never finish
        (once stopping, aiohttp drops every byte that arrives), so its connection is closed
        now rather than after the grace: an upload keeps what reached the store and the client
        resumes it on the next server. Every other request gets the usual grace."""
        request = self._current_request
        if request is not None and not request.content.is_eof() and self.transport is not None:
            log.info(
                "server stopping: closing %s %s from %s, its body still arriving",
                request.method,
                request.rel_url.path[:200],
                self._address,
            )
            self.transport.close()
        await super().shutdown(timeout)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A handler that failed because its connection closed is no server error, and
        nothing can be sent: one INFO line, no traceback. A limit here that closed it was
        logged already (the access log says 408); a blob upload names itself in its line
        (`registry/blobs.py`); for any other request the client's leaving is logged here
        (the access log says 499, "client closed request")."""
        if isinstance(exc, ConnectionError):
            if self._timed_out:
                return web.Response(status=408)
            if self.transport is None or self.transport.is_closing():
                if not is_blob_upload(request):
                    log.info(
                        "client %s went away during %s %s",
                        self._address,
                        request.method,
                        request.rel_url.path[:200],
                    )
                return web.Response(status=499)
        return super().handle_error(request, status, exc, message)

    def _idle(self) -> bool:
        """No request head is waiting for or getting an answer."""
        return bool(self._request_count <= self._answered)

    def _deadline(self, now: float) -> tuple[float, str | None]:
        """When to look again, and what is violated if that time has passed (None: nothing)."""
        limits = self._guard.limits
        if not self._idle():
            request = self._current_request
            if request is None or request.content.is_eof():
                # Not waiting for the client (a handler starting, or running on a whole body).
                return now + min(limits.body_timeout, limits.request_timeout), None
            silent = max(self._last_data, self._resumed_at) + limits.body_timeout
            if is_blob_upload(request):
                if self._reading_paused:
                    return now + limits.body_timeout, None
                return silent, "request body"
            # A small body: its total time counts even while the handler is not reading it.
            total = self._head_done_at + limits.request_timeout
            if self._reading_paused or total <= silent:
                return total, "request deadline"
            return silent, "request body"
        if self._answered == 0:
            return self._connected_at + limits.header_timeout, "request head"
        if self._head_started_at is not None:
            return self._head_started_at + limits.header_timeout, "request head"
        return self._answered_at + limits.keepalive_timeout, None

    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than `when`."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        when, waiting_for = self._deadline(now)
        if now < when:
            self._arm(when)
            return
        if waiting_for is None and not self._idle():
            self._arm(now + self._guard.limits.body_timeout)
            return
        if waiting_for == "request deadline":
            log.info(
                "closing connection from %s: request body incomplete %.0fs after its head "
                "(--request-timeout)",
                self._address,
                now - self._head_done_at,
            )
        elif waiting_for == "request body":
            log.info(
                "closing connection from %s: no %s byte for %.0fs",
                self._address,
                waiting_for,
                now - max(self._last_data, self._resumed_at),
            )
        else:
            log.debug("closing connection from %s: %s", self._address, waiting_for or "idle")
        self._timed_out = True
        self.force_close()
