"""HTTP side of authentication: the Docker token endpoint, challenges, identifying a request."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from skyreg.auth.service import (
    ANONYMOUS,
    Authenticator,
    AuthFailed,
    Client,
    Identity,
    Throttled,
    parse_scopes,
)
from skyreg.meta.platform import TokenRecord
from skyreg.netaddr import client_key
from skyreg.oci.errors import ErrorCode, RegistryError

AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)
IDENTITY_KEY = "skyreg.identity"
TOKEN_PATH = "/auth/token"


def client_of(request: web.Request) -> Client:
    """Whom failed attempts are counted against: the client (behind a trusted proxy, the one
    the proxies forwarded) and the proxy it came through, if any; each as `client_key` has it
    (an IPv4 address, an IPv6 /64), so one IPv6 host cannot rotate through its addresses."""
    address = request.remote or "unknown"
    peer = request.transport.get_extra_info("peername") if request.transport else None
    proxy = str(peer[0]) if isinstance(peer, tuple) and peer else None
    return Client(client_key(address), client_key(proxy) if proxy not in (None, address) else None)


class BearerRefused(AuthFailed):
    """A registry JWT was offered to the token endpoint, which mints only from access tokens."""


def challenge(auth: Authenticator, scope: str | None = None, error: str | None = None) -> str:
    """A `WWW-Authenticate: Bearer ...` value pointing clients at the token endpoint.

    The realm is the server's configured public URL, never built from the request's Host or
    X-Forwarded-* headers: a caller must not choose where other clients send credentials.
    """
    realm = f"{auth.public_url}{TOKEN_PATH}"
    parts = [f'realm="{realm}"', f'service="{auth.service}"']
    if scope:
        parts.append(f'scope="{scope}"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def too_many(retry_after: int) -> RegistryError:
    """429 for a client that failed authentication too often lately."""
    return RegistryError(
        ErrorCode.TOOMANYREQUESTS,
        "too many failed authentication attempts; retry later",
        headers={"Retry-After": str(retry_after)},
    )


def identify(request: web.Request, auth: Authenticator) -> Identity:
    """The caller's identity; 401 for bad credentials, 429 after repeated failures."""
    header = request.headers.get("Authorization")
    if not header:
        return ANONYMOUS
    try:
        return auth.limited(client_of(request), lambda: auth.identify(header))
    except Throttled as e:
        raise too_many(e.retry_after) from None
    except AuthFailed:
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "invalid, expired or revoked credentials",
            headers={"WWW-Authenticate": challenge(auth, error="invalid_token")},
        ) from None


def unauthorized(
    request: web.Request, auth: Authenticator, identity: Identity, scope: str, detail: object = None
) -> RegistryError:
    """The answer to a caller who may not do this: the same whether the target exists or not.

    Anonymous and Bearer callers get 401 with a challenge for the scope (so a client can fetch a
    token for it); a caller whose access token is known but lacks the right gets 403 DENIED.
    """
    if identity.via == "basic":
        return RegistryError(ErrorCode.DENIED, "requested access to the resource is denied", detail)
    error = "insufficient_scope" if identity.via == "bearer" else None
    return RegistryError(
        ErrorCode.UNAUTHORIZED,
        "authentication required",
        detail,
        headers={"WWW-Authenticate": challenge(auth, scope, error)},
    )


async def token_endpoint(request: web.Request) -> web.StreamResponse:
    """GET (Basic or anonymous) and POST (OAuth2 password grant) `/auth/token`."""
    auth = request.app[AUTHENTICATOR_KEY]
    scope_values = request.query.getall("scope", [])
    password: str | None = None  # set for the POST grant; GET uses the Authorization header
    if request.method == "POST":
        try:
            form = await request.post()
        except (ValueError, LookupError, web.HTTPException, RequestPayloadError) as e:
            # Unknown charset, bytes that are not that charset, a multipart body without a
            # boundary, a Content-Encoding the body is not in: the client's mistake, said once.
            return web.json_response(
                {
                    "error": "invalid_request",
                    "error_description": f"unreadable form body ({e})"[:200],
                },
                status=400,
            )
        if form.get("grant_type") != "password":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        value = form.get("password")
        password = value if isinstance(value, str) else ""
        scope_values = [v for v in form.getall("scope", []) if isinstance(v, str)] or scope_values

    def check() -> TokenRecord | None:
        if password is not None:
            if not password:
                raise AuthFailed("password required")
            return auth.token_for_secret(password)
        header = request.headers.get("Authorization")
        if header and header.lower().startswith("bearer "):
            # A registry token is never traded for another: that would let a narrow, short-lived
            # JWT become a wider or longer-lived one. Only access tokens mint JWTs.
            raise BearerRefused
        return auth.identify(header).token

    client = client_of(request)

    def mint() -> dict[str, Any]:  # token, app and key lookups: on a database thread
        token = auth.limited(client, check)
        scopes, catalog = parse_scopes(scope_values)
        return auth.issue(token, scopes, catalog)

    try:
        body = await auth.platform.run(mint)
    except Throttled as e:
        raise too_many(e.retry_after) from None
    except BearerRefused:
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "the token endpoint takes an access token (Basic or the password grant), "
            "not a registry token",
        ) from None
    except AuthFailed:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "invalid, expired or revoked token") from None
    if request.method == "POST":
        body["scope"] = " ".join(scope_values)
    return web.Response(
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
