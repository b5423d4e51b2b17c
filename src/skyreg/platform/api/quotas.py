"""`/orgs/{org}/usage` and `/orgs/{org}/quota`: what an org holds, and its limits (admin)."""

from __future__ import annotations

from skyreg.meta.quotas import OrgUsage
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Route
from skyreg.services.inputs import SetQuota


def usage_model(usage: OrgUsage) -> models.OrgUsage:
    """An org's usage and limits as the API shows them."""
    quota = usage.quota
    return models.OrgUsage(
        org=usage.org,
        bytes=usage.bytes,
        blobs=usage.blobs,
        quota=None if quota is None else models.Quota(soft=quota.soft, hard=quota.hard),
        state=usage.state,
    )


async def get_usage(call: Call) -> models.OrgUsage:
    """What the org holds against its limits."""
    return usage_model(await call.services.quotas.usage(call.caller(), call.path("org")))


async def set_quota(call: Call) -> models.OrgUsage:
    """Set the org's limits (admin)."""
    caller = call.caller()
    body = call.lazy_body(SetQuota)
    return usage_model(await call.services.quotas.set(caller, call.path("org"), body))


async def delete_quota(call: Call) -> bytes:
    """Remove the org's limits (admin)."""
    await call.services.quotas.unset(call.caller(), call.path("org"))
    return b""


ROUTES = [
    Route(
        "GET", "/orgs/{org}/usage", get_usage, "getOrgUsage",
        "The bytes an organization's apps hold (each unique blob once) against its quota "
        "(admin, or any token of the organization)", models.OrgUsage, errors=(404,),
        response_description="Usage, limits and state",
    ),
    Route(
        "PUT", "/orgs/{org}/quota", set_quota, "setOrgQuota",
        "Set an organization's quota (admin tokens only)", models.OrgUsage,
        request=SetQuota, errors=(400, 403, 404),
        description="`hard`: pushes that would take the organization over it are refused; "
        "`soft`: a warning level (default: none). Sizes are bytes, or strings such as 500MB "
        "or 1.5GiB. A body with neither limit removes the quota.",
        response_description="Usage against the new limits",
    ),
    Route(
        "DELETE", "/orgs/{org}/quota", delete_quota, "deleteOrgQuota",
        "Remove an organization's quota (admin tokens only)", None, status=204,
        errors=(403, 404), response_description="Removed (or there was none)",
    ),
]  # fmt: skip
