"""The management API under /api/v1: one module per resource, each declaring its routes.

Callers authenticate with an access token (`Authorization: Bearer <secret>`, or Basic with the
secret as password). What a caller may see follows its token (the services hold the rules): an
admin token sees everything, any other token its own organization (and public apps). Resources
of other organizations answer 404, exactly as if they did not exist.

`ROUTES` (path -> method -> `Route`) is what the router serves and what the OpenAPI document
(`openapi.py`, generated at start and served at /api/v1/openapi.json) lists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from skyreg.auth.service import Authenticator
from skyreg.meta.scans import ScanMeta
from skyreg.platform.api import (
    agent,
    apps,
    audit,
    builds,
    gc,
    images,
    machines,
    orgs,
    quotas,
    releases,
    replication,
    retention,
    scans,
    secrets,
    tokens,
    webhooks,
)
from skyreg.platform.api.base import (
    PREFIX,
    SERVICES_KEY,
    Call,
    Route,
    Services,
    endpoint,
    no_endpoint,
)
from skyreg.platform.api.openapi import encoded
from skyreg.platform.graphql import add_graphql
from skyreg.platform.http import ApiError
from skyreg.platform.releases import RELEASES_KEY
from skyreg.registry.context import REGISTRY_KEY
from skyreg.services.gc import GcService
from skyreg.services.releases import ReleaseService
from skyreg.services.scans import ScanService

if TYPE_CHECKING:
    from skyreg.auth.envelope import MasterKeys


async def get_openapi(call: Call) -> bytes:
    """This document."""
    return call.services.openapi


OPENAPI = Route(
    "GET", "/openapi.json", get_openapi, "getOpenapi", "This document", None,
    security="none", response_description="The OpenAPI document",
)  # fmt: skip

ROUTE_LIST: list[Route] = [
    OPENAPI,
    *orgs.ROUTES,
    *quotas.ROUTES,
    *apps.ROUTES,
    *retention.ROUTES,
    *images.ROUTES,
    *replication.ROUTES,
    *gc.ROUTES,
    *releases.ROUTES,
    *builds.ROUTES,
    *machines.ROUTES,
    *agent.ROUTES,
    *tokens.ROUTES,
    *secrets.ROUTES,
    *scans.ROUTES,
    *audit.ROUTES,
    *webhooks.ROUTES,
]

# Every path served, with its routes by method (the OpenAPI document lists the same).
ROUTES: dict[str, dict[str, Route]] = {}
for _route in ROUTE_LIST:
    ROUTES.setdefault(_route.path, {})[_route.method] = _route


def add_management_routes(
    app: web.Application,
    auth: Authenticator,
    releases: ReleaseService,
    gc_service: GcService | None,
    secret_keys: Callable[[], MasterKeys],
) -> None:
    """Mount the management API under /api/v1, and the GraphQL endpoint, on `app`; the /gc
    routes answer through `gc_service` (without one, 404); app secrets use the master keys
    `secret_keys` loads."""
    services = Services.over(auth, releases, secret_keys)
    registry = app.get(REGISTRY_KEY)
    if registry is not None:  # usage shares the registry's quota checks' cached figure
        services.quotas.gate = registry.quotas
    if registry is not None:  # scans read the registry's blobs
        services.scan_service = ScanService(
            ScanMeta(releases.platform.db),
            releases.registry,
            releases.platform,
            releases.releases,
            registry.store,
            stored=None if registry.geo is None else registry.geo.stored,
        )
    services.openapi = encoded(ROUTE_LIST)
    app[SERVICES_KEY] = services
    if gc_service is not None:
        app[gc.GC_KEY] = gc_service
    app[RELEASES_KEY] = releases
    add_graphql(app, auth, releases)
    for path, methods in ROUTES.items():
        app.router.add_route("*", PREFIX + path, endpoint(methods))
    app.router.add_route("*", PREFIX + "/{tail:.*}", no_endpoint)


__all__ = ["PREFIX", "ROUTES", "ApiError", "Route", "Services", "add_management_routes"]
