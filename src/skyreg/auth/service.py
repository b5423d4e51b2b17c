"""Authentication: access tokens (Basic), signed registry tokens (Bearer JWT), issuance."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt

from skyreg.auth.keys import KeyRing
from skyreg.auth.policy import DELETE, PULL, PUSH, TOKEN_KINDS, AccessPolicy
from skyreg.auth.ratelimit import FailureLimiter
from skyreg.auth.secrets import new_token_id, new_token_secret, secret_sha256
from skyreg.clock import utc_iso
from skyreg.meta.platform import PlatformMeta, TokenRecord
from skyreg.netaddr import client_key
from skyreg.oci.names import NAME_RE

REGISTRY_TOKEN_TTL = 300
PROXY_FACTOR = 10
T = TypeVar("T")
_SCOPE_RE = re.compile(r"^repository(?:\([a-z0-9]+\))?:([^:]+):([a-z*,]+)\Z")
_KNOWN_ACTIONS = frozenset({PULL, PUSH, DELETE})


@dataclass(frozen=True)
class Client:
    """Whom failed attempts are counted against: the client's address and, when it came through
    a trusted proxy, that proxy's own address."""

    address: str
    proxy: str | None = None


class AuthFailed(Exception):
    """Credentials were presented and are wrong, expired or revoked."""


class Throttled(Exception):
    """The client failed authentication too often lately and must wait."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token (None: anonymous) and, for Bearer, what its JWT grants."""

    token: TokenRecord | None
    via: str  # anonymous | basic | bearer
    granted: dict[str, frozenset[str]] = field(default_factory=dict)
    catalog: bool = False

    @property
    def subject(self) -> str:
        return self.token.id if self.token else "anonymous"


ANONYMOUS = Identity(token=None, via="anonymous")


@dataclass(frozen=True)
class Scope:
    """One `repository:<name>:<actions>` request."""

    repository: str
    actions: frozenset[str]


def parse_scopes(values: list[str]) -> tuple[list[Scope], bool]:
    """Repository scopes requested (space- or repeat-separated), and whether the catalog was asked.

    Malformed scopes are ignored: they grant nothing.
    """
    scopes: list[Scope] = []
    catalog = False
    for value in values:
        for item in value.split():
            if item == "registry:catalog:*":
                catalog = True
                continue
            m = _SCOPE_RE.match(item)
            if m is None or NAME_RE.match(m.group(1)) is None:
                continue
            actions = set(m.group(2).split(","))
            if "*" in actions:
                actions = set(_KNOWN_ACTIONS)
            scopes.append(Scope(m.group(1), frozenset(actions & _KNOWN_ACTIONS)))
    return scopes, catalog


def basic_password(header: str) -> str | None:
    """The password of a Basic Authorization header (the username is ignored)."""
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise AuthFailed("malformed Basic credentials") from None
    _, sep, password = decoded.partition(":")
    if not sep:
        raise AuthFailed("malformed Basic credentials")
    return password


ANONYMOUS_AUDIT_PER_MINUTE = 30


class Authenticator:
    """Turns credentials into identities and identities into signed registry tokens."""

    def __init__(
        self,
        platform: PlatformMeta,
        keys: KeyRing,
        *,
        service: str,
        token_ttl: int = REGISTRY_TOKEN_TTL,
        limiter: FailureLimiter | None = None,
        public_url: str = "http://127.0.0.1:5000",
    ) -> None:
        self.platform = platform
        self.public_url = public_url.rstrip("/")  # what the server calls itself (token realm)
        self.keys = keys
        self.service = service
        self.token_ttl = token_ttl
        self.policy = AccessPolicy(platform)
        self.limiter = limiter or FailureLimiter()
        # Every client behind one trusted proxy together gets PROXY_FACTOR clients' allowance.
        self.proxy_limiter = FailureLimiter(
            limit=self.limiter.limit * PROXY_FACTOR, window=self.limiter.window
        )
        # Audit entries of calls without a valid token, per client: anyone may make them by
        # naming an org's things, so past this many a minute they are counted, not written.
        self.anonymous_audit = FailureLimiter(limit=ANONYMOUS_AUDIT_PER_MINUTE, window=60.0)
        self.anonymous_audit_dropped = 0

    def audit_anonymous(self, address: str) -> bool:
        """Whether an audit entry of a call from `address` without a valid token is written
        (False past ANONYMOUS_AUDIT_PER_MINUTE a minute from that client: counted instead)."""
        if self.anonymous_audit.failed(client_key(address)) is None:
            return True
        self.anonymous_audit_dropped += 1
        return False

    @property
    def public_host(self) -> str:
        """HOST[:PORT] of the public URL: how image references made by the server begin."""
        return urlsplit(self.public_url).netloc

    # -- access tokens -------------------------------------------------------------------------

    def create_token(
        self,
        kind: str,
        *,
        name: str = "",
        org_id: int | None = None,
        app_id: int | None = None,
        expires_in: timedelta | None = None,
    ) -> tuple[str, TokenRecord]:
        """A new access token: (secret, shown once; its record)."""
        if kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        if kind not in ("admin", "agent", "proxy") and org_id is None:
            raise ValueError(f"a {kind} token needs an organization")
        if kind == "deploy" and app_id is None:
            raise ValueError("a deploy token needs an app")
        secret = new_token_secret()
        expires_at = datetime.now(UTC) + expires_in if expires_in else None
        record = self.platform.create_token(
            token_id=new_token_id(),
            name=name or kind,
            kind=kind,
            secret_sha256=secret_sha256(secret),
            org_id=org_id,
            app_id=app_id,
            expires_at=expires_at,
        )
        return secret, record

    def token_for_secret(self, secret: str) -> TokenRecord:
        """The active token a secret belongs to; AuthFailed otherwise."""
        record = self.platform.token_by_secret(secret_sha256(secret))
        if record is None or not record.active():
            raise AuthFailed("invalid, expired or revoked token")
        return record

    def access_token(self, authorization: str) -> TokenRecord:
        """The active access token of an Authorization header: Bearer or Basic (password) with
        the token's secret. A registry JWT is not an access token and fails like a wrong one."""
        if authorization.lower().startswith("bearer "):
            secret: str | None = authorization[7:].strip()
        else:
            secret = basic_password(authorization)
        if not secret:
            raise AuthFailed("unsupported Authorization scheme")
        return self.token_for_secret(secret)

    # -- requests ------------------------------------------------------------------------------

    def limited(self, client: Client, check: Callable[[], T]) -> T:
        """Run a credential check for `client` under the failed-authentication limiter.

        Valid credentials always pass, whatever others at the client's address did: the check
        runs first. A failed check (AuthFailed) counts against the client (and, behind a proxy,
        against that proxy's larger allowance, so inventing a new forwarded address for every
        attempt does not escape the limit) and is re-raised, or raised as Throttled once either
        is over its limit.
        """
        try:
            return check()
        except AuthFailed:
            retry_after = self.limiter.failed(client.address)
            if client.proxy is not None:
                proxy_retry = self.proxy_limiter.failed(client.proxy)
                if proxy_retry is not None:
                    retry_after = max(retry_after or 0, proxy_retry)
            if retry_after is not None:
                raise Throttled(retry_after) from None
            raise

    def identify(self, authorization: str | None) -> Identity:
        """The identity behind an Authorization header (None or empty: anonymous)."""
        if not authorization:
            return ANONYMOUS
        if authorization.lower().startswith("bearer "):
            return self._bearer(authorization[7:].strip())
        password = basic_password(authorization)
        if password is None:
            raise AuthFailed("unsupported Authorization scheme")
        return Identity(token=self.token_for_secret(password), via="basic")

    def _bearer(self, token: str) -> Identity:
        try:
            claims = self.keys.verify(token, self.service)
        except jwt.InvalidTokenError as e:
            raise AuthFailed(f"invalid registry token: {e}") from None
        subject = claims["sub"]
        record = None
        if subject != "anonymous":
            record = self.platform.token_by_id(str(subject))
            if record is None or not record.active():
                raise AuthFailed("the token behind this registry token is expired or revoked")
        granted: dict[str, frozenset[str]] = {}
        catalog = False
        for entry in claims.get("access") or []:
            if not isinstance(entry, dict):
                continue
            if entry.get("type") == "registry" and entry.get("name") == "catalog":
                catalog = True
            elif entry.get("type") == "repository" and isinstance(entry.get("name"), str):
                actions = entry.get("actions") or []
                granted[entry["name"]] = frozenset(a for a in actions if isinstance(a, str))
        return Identity(token=record, via="bearer", granted=granted, catalog=catalog)

    def actions(self, identity: Identity, repository: str) -> frozenset[str]:
        """What `identity` may do on `repository` now (a Bearer token: what it was granted,
        still allowed)."""
        allowed = self.policy.allowed(identity.token, repository)
        if identity.via == "bearer":
            return allowed & identity.granted.get(repository, frozenset())
        return allowed

    def may_list_catalog(self, identity: Identity) -> bool:
        return identity.via != "bearer" or identity.catalog

    # -- registry tokens -----------------------------------------------------------------------

    def issue(
        self, token: TokenRecord | None, scopes: list[Scope], catalog: bool
    ) -> dict[str, Any]:
        """A signed registry token holding only the granted actions (the token endpoint's body)."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            granted = sorted(scope.actions & self.policy.allowed(token, scope.repository))
            access.append({"type": "repository", "name": scope.repository, "actions": granted})
        if catalog and token is not None:
            access.append({"type": "registry", "name": "catalog", "actions": ["*"]})
        now = int(time.time())
        claims = {
            "iss": "skyreg",
            "sub": token.id if token else "anonymous",
            "aud": self.service,
            "iat": now,
            "nbf": now - 5,
            "exp": now + self.token_ttl,
            "jti": secrets.token_hex(12),
            "access": access,
        }
        signed = self.keys.sign(claims)
        issued_at = utc_iso(datetime.fromtimestamp(now, UTC))
        return {
            "token": signed,
            "access_token": signed,
            "expires_in": self.token_ttl,
            "issued_at": issued_at,
        }
