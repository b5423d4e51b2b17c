"""Quotas per org, as the management API shows and sets them: usage against the limits (any
token of the org), and the limits themselves (admin tokens only: an org never raises its own).
Usage is counted by `meta/quotas.py`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skyreg.meta.platform import Org, PlatformMeta, TokenRecord
from skyreg.meta.quotas import OrgUsage, Quota, QuotaInvalid, QuotaMeta
from skyreg.services.access import required, visible_org
from skyreg.services.errors import Forbidden, Invalid
from skyreg.services.inputs import Body, SetQuota, given
from skyreg.services.sizes import parse_size

if TYPE_CHECKING:
    from skyreg.registry.quotas import QuotaGate

log = logging.getLogger("skyreg.services")

ADMIN_ONLY = "only an admin token may change an organization's quota"


def quota_of(body: SetQuota) -> Quota:
    """The limits a body asks for; Invalid (with the reason) when malformed or inconsistent."""
    try:
        hard = None if body.hard is None else parse_size(body.hard, "hard")
        soft = None if body.soft is None else parse_size(body.soft, "soft")
        return Quota(soft=soft, hard=hard)
    except ValueError as e:  # QuotaInvalid too
        raise Invalid(str(e)) from None


@dataclass
class QuotaService:
    """Org quotas and usage over `QuotaMeta` (sharing `PlatformMeta`'s Database).

    `gate`: the registry's `QuotaGate`, whose usage figure (a walk over the org's links) is
    computed at most once per few seconds per org and shared with the pushes it checks; so no
    caller of `usage` makes the walk run more often. Without one, every call walks.
    """

    platform: PlatformMeta
    quotas: QuotaMeta
    gate: QuotaGate | None = None

    async def usage(self, caller: TokenRecord | None, org: str) -> OrgUsage:
        """What the org holds and its limits: admin tokens, and any token of the org (org,
        deploy, readonly); another org's answer NotFound like a missing one."""
        if self.gate is None:
            return await self.quotas.read(self._usage, caller, org)
        found, quota = await self.quotas.read(self._org_quota, caller, org)
        used, blobs = await self.gate.usage(found.id)
        return OrgUsage(found.name, used, blobs, quota)

    def _usage(self, caller: TokenRecord | None, name: str) -> OrgUsage:
        org = visible_org(self.platform, required(caller), name)
        return self.quotas.usage(org.id)

    def _org_quota(self, caller: TokenRecord | None, name: str) -> tuple[Org, Quota | None]:
        org = visible_org(self.platform, required(caller), name)
        return org, self.quotas.get_quota(org.id)

    def _admin_org(self, caller: TokenRecord, name: str) -> Org:
        if caller.kind != "admin":
            # Said after the org check, so a stranger cannot tell which orgs exist.
            visible_org(self.platform, caller, name)
            raise Forbidden(ADMIN_ONLY)
        return visible_org(self.platform, caller, name)

    async def set(self, caller: TokenRecord, org: str, body: Body[SetQuota]) -> OrgUsage:
        """Set the org's limits (admin only; the body is looked at after that) and answer its
        usage against them. Limits with neither soft nor hard remove the quota."""
        return await self.quotas.run(self._set, caller, org, body)

    def _set(self, caller: TokenRecord, name: str, lazy: Body[SetQuota]) -> OrgUsage:
        org = self._admin_org(caller, name)
        quota = quota_of(given(lazy))
        self.quotas.set_quota(org.id, quota)
        log.info(
            "quota of org %s set by token %s: hard=%s soft=%s",
            org.name,
            caller.id,
            quota.hard,
            quota.soft,
        )
        return self.quotas.usage(org.id)

    async def unset(self, caller: TokenRecord, org: str) -> None:
        """Remove the org's limits (admin only)."""
        await self.quotas.run(self._unset, caller, org)

    def _unset(self, caller: TokenRecord, name: str) -> None:
        org = self._admin_org(caller, name)
        self.quotas.set_quota(org.id, None)
        log.info("quota of org %s removed by token %s", org.name, caller.id)


__all__ = ["QuotaInvalid", "QuotaService", "quota_of"]
