"""HTTP side of authentication: the Docker token endpoint, challenges, identifying a request."""

from __future__ import annotations

import json

from aiohttp import web

from skyreg.auth.service import (
    ANONYMOUS,
    Authenticator,
    AuthFailed,
    Identity,
    Throttled,
    parse_scopes,
)
from skyreg.meta.platform import TokenRecord
from skyreg.oci.errors import ErrorCode, RegistryError

AUTHENTICATOR_KEY = web.AppKey("authenticator", Authenticator)
IDENTITY_KEY = "skyreg.identity"
TOKEN_PATH = "/auth/token"


def client_of(request: web.Request) -> str:
    """The key failed attempts are counted under: the peer address."""
    return request.remote or "unknown"


def challenge(
    request: web.Request, service: str, scope: str | None = None, error: str | None = None
) -> str:
    """A `WWW-Authenticate: Bearer ...` value pointing clients at the token endpoint."""
    realm = f"{request.scheme}://{request.host}{TOKEN_PATH}"
    parts = [f'realm="{realm}"', f'service="{service}"']
    if scope:
        parts.append(f'scope="{scope}"')
    if error:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def _too_many(retry_after: int) -> RegistryError:
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
        raise _too_many(e.retry_after) from None
    except AuthFailed:
        raise RegistryError(
            ErrorCode.UNAUTHORIZED,
            "invalid, expired or revoked credentials",
            headers={"WWW-Authenticate": challenge(request, auth.service, error="invalid_token")},
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
        headers={"WWW-Authenticate": challenge(request, auth.service, scope, error)},
    )


async def token_endpoint(request: web.Request) -> web.StreamResponse:
    """GET (Basic or anonymous) and POST (OAuth2 password grant) `/auth/token`."""
    auth = request.app[AUTHENTICATOR_KEY]
    scope_values = request.query.getall("scope", [])
    password: str | None = None  # set for the POST grant; GET uses the Authorization header
    if request.method == "POST":
        form = await request.post()
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
        return auth.identify(request.headers.get("Authorization")).token

    try:
        token = auth.limited(client_of(request), check)
    except Throttled as e:
        raise _too_many(e.retry_after) from None
    except AuthFailed:
        raise RegistryError(ErrorCode.UNAUTHORIZED, "invalid, expired or revoked token") from None
    scopes, catalog = parse_scopes(scope_values)
    body = auth.issue(token, scopes, catalog)
    if request.method == "POST":
        body["scope"] = " ".join(scope_values)
    return web.Response(
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
