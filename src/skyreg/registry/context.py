"""What every registry handler works with: metadata, blob store and settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from skyreg.auth.http import IDENTITY_KEY
from skyreg.auth.policy import PULL
from skyreg.auth.service import Authenticator
from skyreg.meta.audit import AuditMeta
from skyreg.meta.registry import RegistryMeta
from skyreg.registry.forwarded import Network
from skyreg.store.base import BlobStore

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode
    from skyreg.registry.pulls import PullTimes
    from skyreg.registry.quotas import QuotaGate
    from skyreg.registry.space import SpaceGuard


@dataclass
class Registry:
    """The registry's collaborators, shared by all handlers of one server process."""

    meta: RegistryMeta
    store: BlobStore
    upload_ttl: float = 24 * 3600.0
    auth: Authenticator | None = None  # None: no authentication (a private, single-user registry)
    geo: GeoNode | None = None  # None: one region (no copies elsewhere, no pull-through)
    trusted_proxies: tuple[Network, ...] = ()  # whose X-Forwarded-For/-Proto are believed
    space: SpaceGuard | None = None  # None: no low-space watermark (S3, or turned off)
    quotas: QuotaGate | None = None  # None: no org quotas (a registry without the platform)
    pulls: PullTimes | None = None  # None: manifest pull times are not recorded
    audit: AuditMeta | None = None  # None: pushes and deletions are not audited (no platform)


REGISTRY_KEY = web.AppKey("registry", Registry)


def registry_of(request: web.Request) -> Registry:
    """The Registry a request is served by."""
    return request.app[REGISTRY_KEY]


def may_pull(request: web.Request, repository: str) -> bool:
    """Whether the caller of `request` may read `repository` (always, without auth); it may
    query the database: call it on a database thread (`RegistryMeta.run`)."""
    auth = registry_of(request).auth
    if auth is None:
        return True
    return PULL in auth.actions(request[IDENTITY_KEY], repository)
