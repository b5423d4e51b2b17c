"""The HTTP reverse proxy in front of each app's machines (`skyreg proxy`).

A request for `<app>.<domain>` goes to the least busy healthy machine of `app` in the routing
table (`proxy/table.py`); bodies stream both ways, WebSocket upgrades are relayed message by
message, and `skyreg-machine` in the answer names the machine that gave it.

Limits come from aiohttp's server and are left at its defaults: a request or status line of at
most 8190 bytes, each header field at most 8190 bytes, at most 32768 bytes of headers in all
(`http_parser.HttpParser`); its parser refuses a request with both Content-Length and
Transfer-Encoding, so such a request never reaches a machine. A client that sends its headers
slowly (slowloris) or sits idle between requests is cut off by `idle_timeout` (aiohttp's
`keepalive_timeout`, armed from the moment the connection opens).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
import socket
from collections.abc import AsyncGenerator, Mapping
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, istr
from yarl import URL

from skyreg.proxy.table import Backend, RoutingTable

_log = logging.getLogger(__name__)

MACHINE_HEADER: Final = istr("skyreg-machine")

# RFC 9110 §7.6.1: Connection and the fields it names, plus the ones a proxy must drop even when
# Connection forgets them. Trailer too: trailers are not relayed, so announcing them would lie.
_HOP_BY_HOP: Final = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Proxy-Connection",
        "Keep-Alive",
        "TE",
        "Transfer-Encoding",
        "Upgrade",
        "Trailer",
    )
)
# Connection may name any field, but these frame the message: dropping them would change it.
_FRAMING: Final = frozenset((istr("Host"), istr("Content-Length")))
# Set by the proxy alone: a client's own values would let it forge its address or a machine.
_PROXY_SET: Final = frozenset(
    istr(h)
    for h in (
        "skyreg-machine",
        "Forwarded",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        # The proxy's server already answered 100 Continue; the machine would wait for nothing.
        "Expect",
    )
)
# Negotiated separately on each side of a relayed WebSocket.
_WEBSOCKET_HANDSHAKE: Final = frozenset(
    istr(h)
    for h in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Accept",
    )
)
_IDEMPOTENT: Final = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
_DNS_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_CHUNK: Final = 64 * 1024
_MAX_MESSAGE: Final = 1 << 20  # bytes of one relayed WebSocket message (each is held whole)


class _BodyTooLarge(Exception):
    """The client sent more than `max_body` bytes."""


class _BodyStalled(Exception):
    """The client sent nothing of its announced body for `body_timeout` seconds."""


def _refused_requests_in_one_line(record: logging.LogRecord) -> bool:
    """aiohttp's server logs every request its parser refuses (a bad request line, obs-fold,
    Content-Length with Transfer-Encoding, ...) at ERROR with a traceback: on an edge any
    client could fill the log that way. One INFO line instead."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args, record.exc_info, record.exc_text = (
            "refused request: %s",
            (str(exc).replace("\n", " ")[:200],),
            None,
            None,
        )
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def _host_only(cookie: str) -> str:
    """A Set-Cookie value without its Domain attributes: a host-only cookie of the app's own
    name. An app must not set cookies for `<domain>`, which every other app shares."""
    name_value, *attrs = cookie.split(";")
    kept = [a for a in attrs if not a.strip().lower().startswith("domain")]
    return ";".join([name_value, *kept])


def app_from_host(host: str | None, domain: str) -> str | None:
    """The app a Host header names under `domain` (`App.Example.COM.:8080` -> `app`), or None
    when it names none: no Host, an IP address, another domain, or a name that is not one DNS
    label."""
    if not host or host.startswith("["):
        return None
    name, sep, port = host.rpartition(":")
    if sep:
        if not port.isdigit():
            return None
        host = name
    host = host.lower()
    host = host.removesuffix(".")
    suffix = "." + domain
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    if not _DNS_LABEL.fullmatch(label):
        return None
    return label


def _end_to_end(headers: Mapping[str, str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """`headers` without the hop-by-hop ones (RFC 9110 §7.6.1)."""
    multi = CIMultiDict(headers)
    named = {
        istr(token.strip())
        for value in multi.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in multi.items():
        if key in _HOP_BY_HOP or (key in named and key not in _FRAMING):
            continue
        out.add(key, value)
    return out


def _page(status: int, title: str, detail: str) -> web.Response:
    """A short HTML error page from the proxy itself."""
    text = (
        f"<!doctype html><html><head><title>{status} {html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(detail)}</p></body></html>\n"
    )
    return web.Response(status=status, text=text, content_type="text/html")


def _close_code(code: int | None) -> int:
    """A close code that may be sent on the wire (1005, 1006 and 1015 are never sent)."""
    if code is None or not 1000 <= code < 5000 or code in (1004, 1005, 1006, 1015):
        return 1000
    return code


class _ClientBody:
    """The client's request body, streamed once to whichever machine gets it."""

    def __init__(self, request: web.BaseRequest, max_body: int | None, timeout: float) -> None:
        self._request = request
        self._max_body = max_body
        self._timeout = timeout
        self.sent = 0
        self.too_large = False
        self.stalled = False

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            try:
                # Each wait is bounded: a client announcing a body and then sending nothing
                # would otherwise hold a connection to a machine for as long as it likes.
                chunk = await asyncio.wait_for(self._request.content.readany(), self._timeout)
            except TimeoutError:
                self.stalled = True
                raise _BodyStalled from None
            if not chunk:
                return
            self.sent += len(chunk)
            if self._max_body is not None and self.sent > self._max_body:
                self.too_large = True
                raise _BodyTooLarge
            yield chunk


class ProxyServer:
    """Routes `<app>.<domain>` to `app`'s machines in `table`.

    `connect_timeout` bounds each TCP connect to a machine. A connect that fails (refused,
    unreachable, or not answered in time) sends the request to another machine, whatever its
    method (nothing reached the machine), and ejects the machine from the table for a while
    (`RoutingTable.eject`): a killed machine costs the requests that raced to it, each at most
    `connect_timeout` late, rather than one failure per request until the health checks notice.
    `request_timeout` bounds the wait for a machine's response headers and then each wait for
    more of its body. `max_body`, when set, refuses larger request bodies with 413;
    `body_timeout` bounds each wait for more of a client's body (408 when it passes).
    `max_connections` bounds the connections to all machines (one `aiohttp.ClientSession`), and
    `max_per_app` the requests and WebSockets in flight to one app (503 beyond it): one app's
    slow machines or clients never take the connections every other app needs.
    """

    def __init__(
        self,
        table: RoutingTable,
        domain: str = "localhost",
        *,
        connect_timeout: float = 1.0,
        request_timeout: float = 60.0,
        max_body: int | None = None,
        body_timeout: float = 30.0,
        max_connections: int = 4096,
        max_per_app: int = 256,
        idle_timeout: float = 75.0,
    ) -> None:
        self.table = table
        self.domain = domain.lower().strip(".")
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=request_timeout
        )
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._max_connections = max_connections
        self._max_per_app = max_per_app
        self._per_app: dict[str, int] = {}
        self._idle_timeout = idle_timeout
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False

    @property
    def in_flight(self) -> int:
        """Requests (and WebSocket sessions) the proxy is relaying now."""
        return self._in_flight

    async def start(self, host: str, port: int, *, sock: socket.socket | None = None) -> int:
        """Listen on `host`:`port` (0 for any free port), or on `sock` when given (a listening
        socket a master process bound for its workers); returns the bound port."""
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections),
            timeout=self._timeout,
            auto_decompress=False,
            # Cookies belong to the clients, never to the proxy's one shared session.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Send what the client sent, not aiohttp's defaults.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        logging.getLogger("aiohttp.server").addFilter(_refused_requests_in_one_line)  # idempotent
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # The proxy waits for its own in-flight requests in stop(); what is left after the grace
        # is cut at once.
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=self._idle_timeout, shutdown_timeout=0.5
        )
        await self._runner.setup()
        if sock is None:
            sock = socket.create_server((host, port))
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()
        return int(sock.getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting connections, let requests in flight finish for up to `grace` seconds,
        then close everything."""
        self._stopping = True
        if self._site is not None:
            await self._site.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hosts = request.headers.getall("Host", [])
        if len(hosts) > 1:
            return _page(400, "Bad Request", "More than one Host header.")
        app = app_from_host(hosts[0] if hosts else None, self.domain)
        if app is None or not self.table.knows(app):
            return _page(404, "Not Found", "No app is served at this address.")
        busy = self._per_app.get(app, 0)
        if busy >= self._max_per_app:
            page = _page(503, "Service Unavailable", f"{app} has too many requests in flight.")
            page.headers["Retry-After"] = "1"
            return page
        self._per_app[app] = busy + 1
        self._in_flight += 1
        self._idle.clear()
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self._relay_websocket(request, app)
            return await self._forward(request, app)
        finally:
            self._in_flight -= 1
            left = self._per_app[app] - 1
            if left:
                self._per_app[app] = left
            else:
                del self._per_app[app]
            if self._in_flight == 0:
                self._idle.set()

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = _end_to_end(request.headers)
        for name in _PROXY_SET:
            headers.popall(name, None)
        headers["X-Forwarded-For"] = request.remote or ""
        headers["X-Forwarded-Proto"] = "https" if request.secure else "http"
        headers["X-Forwarded-Host"] = request.headers.get("Host", "")
        return headers

    @staticmethod
    def _target(request: web.Request, backend: Backend) -> URL:
        host = f"[{backend.host}]" if ":" in backend.host else backend.host
        # rel_url: an absolute-form request target keeps only its path and query.
        return URL(f"http://{host}:{backend.port}{request.rel_url.raw_path_qs}", encoded=True)

    def _connect_failed(self, app: str, backend: Backend, exc: Exception) -> None:
        _log.warning("%s: cannot connect to machine %s: %r", app, backend.machine_id, exc)
        self.table.eject(backend.machine_id)

    def _next_machine(self, app: str, tried: set[str]) -> Backend | web.Response:
        """The next machine to try (counted busy: release it), or the page to answer when none
        is left: 503 when none was healthy, 502 when every one tried failed."""
        backend = self.table.pick(app, exclude=tried)
        if backend is None:
            if tried:
                return _page(502, "Bad Gateway", f"No machine of {app} answered.")
            return _page(503, "Service Unavailable", f"No machine of {app} is healthy.")
        tried.add(backend.machine_id)
        self.table.acquire(backend.machine_id)
        return backend

    async def _forward(self, request: web.Request, app: str) -> web.StreamResponse:
        assert self._session is not None
        if (
            self._max_body is not None
            and request.content_length is not None
            and request.content_length > self._max_body
        ):
            return _page(413, "Content Too Large", f"The body is over {self._max_body} bytes.")
        headers = self._upstream_headers(request)
        body = _ClientBody(request, self._max_body, self._body_timeout)
        tried: set[str] = set()
        while True:
            backend = self._next_machine(app, tried)
            if isinstance(backend, web.Response):
                return backend
            try:
                return await self._exchange(request, app, backend, headers, body)
            except _Retry:
                continue
            except (_BodyTooLarge, _BodyStalled, TimeoutError, aiohttp.ClientError) as exc:
                if body.too_large:
                    return _page(
                        413, "Content Too Large", f"The body is over {self._max_body} bytes."
                    )
                if body.stalled:
                    page = _page(408, "Request Timeout", "The request body stopped coming.")
                    page.force_close()
                    return page
                _log.warning("%s: machine %s failed: %r", app, backend.machine_id, exc)
                if isinstance(exc, TimeoutError):
                    return _page(504, "Gateway Timeout", f"The machine of {app} did not answer.")
                return _page(502, "Bad Gateway", f"The machine of {app} failed to answer.")
            finally:
                self.table.release(backend.machine_id)

    async def _exchange(
        self,
        request: web.Request,
        app: str,
        backend: Backend,
        headers: CIMultiDict[str],
        body: _ClientBody,
    ) -> web.StreamResponse:
        """One attempt on one machine; raises _Retry when another machine may take it."""
        assert self._session is not None
        chunks = body.chunks() if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                self._target(request, backend),
                headers=headers,
                data=chunks,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # No connection (refused, unreachable, timed out): nothing was sent, safe for any
            # method.
            self._connect_failed(app, backend, exc)
            await _discard(chunks)
            if body.too_large:
                raise _BodyTooLarge from exc
            if body.stalled:
                raise _BodyStalled from exc
            if body.sent == 0:
                raise _Retry from exc
            raise
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            # Sent, and nothing came back: another machine may take it again if that is safe.
            await _discard(chunks)
            if body.too_large:
                raise _BodyTooLarge from exc
            if body.stalled:
                raise _BodyStalled from exc
            if request.method in _IDEMPOTENT and body.sent == 0:
                raise _Retry from exc
            raise
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            headers = _end_to_end(upstream.headers)
            cookies = headers.popall("Set-Cookie", [])
            response.headers.extend(headers)
            for cookie in cookies:
                response.headers.add("Set-Cookie", _host_only(cookie))
            response.headers.popall(MACHINE_HEADER, None)
            response.headers[MACHINE_HEADER] = backend.machine_id
            if self._stopping:
                response.force_close()
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                # The client has the status line already: cut its connection, so that it sees
                # the answer end short instead of a complete-looking one.
                _log.info("answer from machine %s cut: %r", backend.machine_id, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    async def _relay_websocket(self, request: web.Request, app: str) -> web.StreamResponse:
        assert self._session is not None
        headers = self._upstream_headers(request)
        for name in _WEBSOCKET_HANDSHAKE:
            headers.popall(name, None)
        protocols = tuple(
            p.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", [])
            for p in value.split(",")
            if p.strip()
        )
        tried: set[str] = set()
        while True:
            backend = self._next_machine(app, tried)
            if isinstance(backend, web.Response):
                return backend
            try:
                try:
                    upstream = await self._session.ws_connect(
                        self._target(request, backend),
                        headers=headers,
                        protocols=protocols,
                        autoclose=False,
                        max_msg_size=_MAX_MESSAGE,
                    )
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    self._connect_failed(app, backend, exc)
                    continue
                except aiohttp.WSServerHandshakeError as exc:
                    return _page(502, "Bad Gateway", f"The machine of {app} refused: {exc.status}")
                except (aiohttp.ClientError, TimeoutError):
                    return _page(502, "Bad Gateway", f"The machine of {app} failed to answer.")
                async with upstream:
                    client = web.WebSocketResponse(
                        protocols=(upstream.protocol,) if upstream.protocol else (),
                        autoclose=False,
                        max_msg_size=_MAX_MESSAGE,
                    )
                    client.headers[MACHINE_HEADER] = backend.machine_id
                    await client.prepare(request)
                    await _pipe_websockets(client, upstream)
                    return client
            finally:
                self.table.release(backend.machine_id)


class _Retry(Exception):
    """The attempt failed in a way another machine may safely take over."""


async def _discard(chunks: AsyncGenerator[bytes, None] | None) -> None:
    """Close a failed attempt's body stream (the next attempt starts its own)."""
    if chunks is not None:
        with contextlib.suppress(RuntimeError):
            await chunks.aclose()


async def _pipe_websockets(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relay messages both ways until either side closes, then close the other with its code."""

    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for msg in source:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is aiohttp.WSMsgType.CLOSE:
                reason = msg.extra.encode() if isinstance(msg.extra, str) else b""
                await sink.close(code=_close_code(msg.data), message=reason)
                await source.close()
                return
        await sink.close(code=_close_code(source.close_code))

    tasks = [
        asyncio.create_task(pump(client, upstream)),
        asyncio.create_task(pump(upstream, client)),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, aiohttp.ClientError | ConnectionError):
            raise exc
