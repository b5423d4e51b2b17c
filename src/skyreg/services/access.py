"""Who sees what: the visibility rules every service applies (sync: on a database thread).

An admin token sees everything, any other token its own organization; public apps are visible
to anyone. Another organization's resource raises `NotFound` exactly like a missing one.
"""

from __future__ import annotations

from skyreg.meta.platform import App, Org, PlatformMeta, TokenRecord
from skyreg.services.errors import NotFound, Unauthenticated

AUTHENTICATION_REQUIRED = (
    "authentication required: send an access token as `Authorization: Bearer <token>`"
)


def required(caller: TokenRecord | None) -> TokenRecord:
    """The caller's token; `Unauthenticated` for an anonymous caller."""
    if caller is None:
        raise Unauthenticated(AUTHENTICATION_REQUIRED)
    return caller


def sees_org(caller: TokenRecord, org_id: int) -> bool:
    """Whether `caller` may see things of the org `org_id`."""
    return caller.kind == "admin" or caller.org_id == org_id


def may_manage(caller: TokenRecord, org_id: int) -> bool:
    """Whether the caller may create and change apps and tokens of an org."""
    return caller.kind == "admin" or (caller.kind == "org" and caller.org_id == org_id)


def visible_org(platform: PlatformMeta, caller: TokenRecord, name: str) -> Org:
    """An org the caller belongs to (admin: any); NotFound otherwise."""
    org = platform.get_org(name)
    if org is None or not sees_org(caller, org.id):
        raise NotFound("organization", name)
    return org


def org_or_own(platform: PlatformMeta, caller: TokenRecord, name: str | None) -> Org | None:
    """The org a request names, else the caller's own (None for an admin naming none)."""
    if name is not None:
        return visible_org(platform, caller, name)
    if caller.org_name is None:
        return None
    return visible_org(platform, caller, caller.org_name)


def visible_app(
    platform: PlatformMeta, caller: TokenRecord | None, name: str, *, public_ok: bool = False
) -> App:
    """An app of the caller's org (admin: any; with `public_ok`, also any public app).

    Anonymous callers get `Unauthenticated` unless the app is public (and `public_ok`); callers
    of another org `NotFound`, the same as for an app that does not exist.
    """
    app = platform.get_app(name)
    if app is not None and public_ok and app.public:
        return app
    token = required(caller)
    if app is None or not sees_org(token, app.org_id):
        raise NotFound("app", name)
    return app
