"""Organizations: listing (admin: all; others: their own) and creating (admin only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from skyreg.meta.platform import AlreadyExists, Org, PlatformMeta, TokenRecord
from skyreg.services.errors import Conflict, Forbidden, Invalid
from skyreg.services.inputs import Body, CreateOrg, given
from skyreg.services.names import is_dns_label

log = logging.getLogger("skyreg.services")

NAME_INVALID = "name must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters"


@dataclass
class OrgService:
    """Organizations over `PlatformMeta`."""

    platform: PlatformMeta

    async def list_orgs(self, caller: TokenRecord) -> list[Org]:
        """The orgs `caller` sees: every org for an admin, else its own (if any)."""
        return await self.platform.read(self._list_orgs, caller)

    def _list_orgs(self, caller: TokenRecord) -> list[Org]:
        if caller.kind == "admin":
            return self.platform.list_orgs()
        return [] if caller.org_id is None else self.platform.list_orgs(caller.org_id)

    async def create_org(self, caller: TokenRecord, body: Body[CreateOrg]) -> Org:
        """A new org (admin only: Forbidden, whatever the body); Invalid for a name that is not
        a DNS label, Conflict when it exists."""
        if caller.kind != "admin":
            raise Forbidden("only an admin token may create organizations")
        name = given(body).name
        if not is_dns_label(name):
            raise Invalid(NAME_INVALID)
        return await self.platform.run(self._create_org, caller, name)

    def _create_org(self, caller: TokenRecord, name: str) -> Org:
        try:
            org = self.platform.create_org(name)
        except AlreadyExists:
            raise Conflict(f"organization {name!r} already exists") from None
        log.info("organization %s created by token %s", name, caller.id)
        return org
