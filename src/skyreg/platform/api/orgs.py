"""`/whoami` and `/orgs`."""

from __future__ import annotations

from skyreg.meta.platform import Org as OrgRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route
from skyreg.platform.api.tokens import token_model
from skyreg.services.inputs import CreateOrg


def org_model(org: OrgRecord) -> models.Org:
    """An org as the API shows it."""
    return models.Org(name=org.name, created_at=models.time(org.created_at))


async def whoami(call: Call) -> models.Token:
    """The caller's own token."""
    return token_model(call.caller())


async def list_orgs(call: Call) -> models.OrgList:
    """The orgs the caller sees."""
    orgs = await call.services.orgs.list_orgs(call.caller())
    return models.OrgList(orgs=[org_model(o) for o in orgs])


async def create_org(call: Call) -> models.Org:
    """A new org (admin only)."""
    caller = call.caller()
    return org_model(await call.services.orgs.create_org(caller, call.lazy_body(CreateOrg)))


ROUTES = [
    Route(
        "GET", "/whoami", whoami, "whoami", "The caller's token", models.Token,
        response_description="The token the request was made with",
    ),
    Route(
        "GET", "/orgs", list_orgs, "listOrgs",
        "List organizations (admin: all; others: their own)", models.OrgList,
        response_description="Organizations",
    ),
    Route(
        "POST", "/orgs", create_org, "createOrg", "Create an organization (admin only)",
        models.Org, status=201, request=CreateOrg, errors=(400, 403, 409),
        response_description="Created",
    ),
]  # fmt: skip
