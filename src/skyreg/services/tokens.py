"""Access tokens: listing (never their secrets), creating org/deploy/readonly tokens and
revoking (never the last active admin token)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from skyreg.auth.service import Authenticator
from skyreg.meta.platform import App, Org, TokenRecord
from skyreg.services.access import may_manage, org_or_own, visible_app, visible_org
from skyreg.services.errors import Conflict, Forbidden, Invalid, NotFound
from skyreg.services.inputs import CreateToken
from skyreg.services.names import MAX_TOKEN_NAME, parse_expiry

log = logging.getLogger("skyreg.services")

CREATABLE_KINDS = ("org", "deploy", "readonly", "agent", "proxy")


@dataclass
class TokenService:
    """Tokens over the `Authenticator` (which makes secrets) and its `PlatformMeta`."""

    auth: Authenticator

    async def list_tokens(self, caller: TokenRecord, org: str | None) -> list[TokenRecord]:
        """The tokens of `org` (default: the caller's; an admin naming none: every token);
        admin and org tokens only."""
        if caller.kind not in ("admin", "org"):
            raise Forbidden(f"a {caller.kind} token may not list tokens")
        return await self.auth.platform.read(self._list_tokens, caller, org)

    def _list_tokens(self, caller: TokenRecord, org_name: str | None) -> list[TokenRecord]:
        org = org_or_own(self.auth.platform, caller, org_name)
        return self.auth.platform.list_tokens(None if org is None else org.id)

    async def create_token(
        self, caller: TokenRecord, body: Callable[[], CreateToken]
    ) -> tuple[str, TokenRecord]:
        """A new token: (its secret, shown once; its record). Only admin and org tokens create
        tokens, and only in an org they manage. `body` gives the request (it is asked for after
        the caller's kind is checked, so a refused caller is refused whatever it sent)."""
        if caller.kind not in ("admin", "org"):
            raise Forbidden(f"a {caller.kind} token may not create tokens")
        return await self.auth.platform.run(self._create_token, caller, body)

    def _create_token(
        self, caller: TokenRecord, body: Callable[[], CreateToken]
    ) -> tuple[str, TokenRecord]:
        request = body()
        kind = request.kind
        if kind not in CREATABLE_KINDS:
            raise Invalid(
                "kind must be one of org, deploy, readonly, agent, proxy (admin tokens are not "
                "created via the API)"
            )
        if kind == "agent" and caller.kind != "admin":
            # An agent token receives machines' secrets: an org token that could make one
            # could read back the values it may only set.
            raise Forbidden("only an admin token creates agent tokens")
        if kind == "proxy" and caller.kind != "admin":
            # A proxy routes to every app of its scope: the operator's, not a tenant's, to make.
            raise Forbidden("only an admin token creates proxy tokens")
        name = request.name or ""
        if len(name) > MAX_TOKEN_NAME or not name.isprintable():
            raise Invalid(f"name must be printable text of at most {MAX_TOKEN_NAME} characters")
        try:
            expires_in = parse_expiry(request.expiry)
        except ValueError as e:
            raise Invalid(str(e)) from None
        platform = self.auth.platform
        app: App | None = None
        if kind == "deploy":
            if request.app is None:
                raise Invalid("a deploy token needs an app")
            app = visible_app(platform, caller, request.app)
            if request.org is not None and request.org != app.org_name:
                raise Invalid(f"app {app.name!r} is not in organization {request.org!r}")
            org: Org = visible_org(platform, caller, app.org_name)
        elif kind in ("agent", "proxy") and request.org is None:  # of every org's machines
            if request.app is not None:
                raise Invalid(f"a {kind} token is not tied to an app; leave app out")
            secret, record = self.auth.create_token(
                kind, name=name, org_id=None, expires_in=expires_in
            )
            log.info("%s token %s (every org) created by token %s", kind, record.id, caller.id)
            return secret, record
        else:
            if request.app is not None:
                raise Invalid(f"a {kind} token is not tied to an app; leave app out")
            found = org_or_own(platform, caller, request.org)
            if found is None:
                raise Invalid("org is required")
            org = found
        if not may_manage(caller, org.id):
            raise Forbidden("only an admin or org token of this organization may create its tokens")
        secret, record = self.auth.create_token(
            kind,
            name=name,
            org_id=org.id,
            app_id=None if app is None else app.id,
            expires_in=expires_in,
        )
        log.info("%s token %s created by token %s", kind, record.id, caller.id)
        return secret, record

    async def revoke_token(self, caller: TokenRecord, token_id: str) -> TokenRecord:
        """Revoke a token at once: an admin any, an org token its org's, any token itself;
        others' answer NotFound. Conflict for the last active admin token."""
        return await self.auth.platform.run(self._revoke_token, caller, token_id)

    def _revoke_token(self, caller: TokenRecord, token_id: str) -> TokenRecord:
        platform = self.auth.platform
        target = platform.token_by_id(token_id)
        same_org = (
            target is not None and caller.org_id is not None and caller.org_id == target.org_id
        )
        if target is None or not (caller.kind == "admin" or caller.id == target.id or same_org):
            raise NotFound("token", token_id)
        if not (caller.kind == "admin" or caller.id == target.id or caller.kind == "org"):
            raise Forbidden(f"a {caller.kind} token may revoke only itself")
        if target.kind == "admin" and target.active():
            others = [t for t in platform.list_tokens() if t.kind == "admin" and t.active()]
            if len(others) <= 1:
                raise Conflict("refusing to revoke the last active admin token")
        platform.revoke_token(target.id)
        log.info("token %s revoked by token %s", target.id, caller.id)
        revoked = platform.token_by_id(target.id)
        assert revoked is not None
        return revoked
