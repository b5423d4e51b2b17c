"""What the management API and GraphQL share over HTTP: error answers, reading a bounded body
on the event loop, and identifying the caller by its access token."""

from __future__ import annotations

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.http import client_of
from skyreg.auth.service import Authenticator, AuthFailed, Throttled
from skyreg.meta.platform import TokenRecord

MAX_BODY = 64 * 1024


class ApiError(Exception):
    """A failure rendered as `{"error": {"code": ..., "message": ...}}` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        """The error as an aiohttp response."""
        body = {"error": {"code": self.code, "message": self.message}}
        return web.json_response(body, status=self.status, headers=self.headers)


def too_large(limit: int) -> ApiError:
    """413 for a body over `limit` bytes."""
    return ApiError(413, "too_large", f"request body larger than {limit} bytes")


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole request body, at most `limit` bytes (413 beyond; chunked bodies too).
    RequestPayloadError for a body the client mis-encoded."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    raw = b""
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            raise too_large(limit)
    return raw


AGENT_PREFIX = "/api/v1/agent/"  # what an agent token may call of the management API
PROXY_PATH = "/api/v1/agent/routes"  # all a proxy token may call


class Identifier:
    """Turns a request's Authorization header into its access token under the failed-auth
    limiter: 401 when wrong, 429 when throttled. The client address is read at construction
    (on the event loop); `identify` may then run on a database thread."""

    def __init__(self, request: web.Request, auth: Authenticator) -> None:
        self.header = request.headers.get("Authorization")
        self.path = request.path
        self.method = request.method
        self.client = client_of(request)
        self.auth = auth

    def identify(self) -> TokenRecord | None:
        """The caller's token (None: no Authorization header). Queries: use `Database.read`."""
        header = self.header
        if not header:
            return None
        auth = self.auth
        try:
            token = auth.limited(self.client, lambda: auth.access_token(header))
        except Throttled as e:
            raise ApiError(
                429,
                "too_many_requests",
                "too many failed authentication attempts; retry later",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except AuthFailed:
            raise ApiError(
                401,
                "unauthorized",
                "invalid, expired or revoked token",
                headers={"WWW-Authenticate": 'Bearer realm="skyreg",error="invalid_token"'},
            ) from None
        if token is not None and token.kind == "build":
            # A build's credential lives on a builder host that runs tenant code: registry only.
            raise ApiError(403, "forbidden", "a build token may be used with the registry only")
        if token is not None and token.kind == "agent" and not self.path.startswith(AGENT_PREFIX):
            # An agent's credential receives machines' secrets: nothing else of the API.
            raise ApiError(403, "forbidden", "an agent token may be used with /api/v1/agent/ only")
        if (
            token is not None
            and token.kind == "proxy"
            and (self.path != PROXY_PATH or self.method != "GET")
        ):
            # The proxy faces the internet: its credential reads routes, nothing else.
            raise ApiError(403, "forbidden", f"a proxy token may only GET {PROXY_PATH}")
        return token


__all__ = ["MAX_BODY", "ApiError", "Identifier", "RequestPayloadError", "read_body", "too_large"]
