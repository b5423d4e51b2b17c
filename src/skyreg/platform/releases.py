"""Releases: deploying an image to an app records which image (pinned by digest) it runs.

A release is recorded `pending`, becomes `running` once its machines are created, then
`complete` (all started) or `failed` (see `MachineMeta.reconcile_release`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from skyreg.clock import utc_iso
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import Release, ReleaseMeta
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.names import validate_name, validate_tag

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

STRATEGIES = ("rolling", "immediate")
MAX_LIST = 1000


@dataclass
class ReleaseService:
    """What deploys need beyond the platform tables: the registry's manifests and tags."""

    registry: RegistryMeta
    releases: ReleaseMeta
    machines: MachineMeta
    geo: GeoNode | None = None  # multi-region: deploys queue copies of the image


RELEASES_KEY = web.AppKey("releases", ReleaseService)


@dataclass(frozen=True)
class ImageReference:
    """`[HOST/]REPOSITORY[:TAG|@DIGEST]` within this registry."""

    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"


def parse_image_reference(text: str) -> ImageReference:
    """Parse an image reference; the registry host, when present, is dropped (it is this one).

    Raises ValueError with a message a user can act on.
    """
    rest = text.strip()
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        rest = remainder
    digest = tag = None
    if "@" in rest:
        rest, _, digest_text = rest.partition("@")
        try:
            digest = str(Digest.parse(digest_text))
        except RegistryError as e:
            raise ValueError(e.message) from None
    else:
        name, _, last = rest.rpartition("/")
        if ":" in last:
            last, _, tag = last.partition(":")
            rest = f"{name}/{last}" if name else last
    try:
        validate_name(rest)
        if tag is not None:
            validate_tag(tag)
    except RegistryError as e:
        raise ValueError(e.message) from None
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(rest, tag, digest)


def deployment_tag(now: datetime | None = None) -> str:
    """`deployment-YYYYMMDD-HHMMSS` in UTC, as Fly.io names the tags of deployed images."""
    return (now or datetime.now(UTC)).strftime("deployment-%Y%m%d-%H%M%S")


def release_json(release: Release) -> dict[str, Any]:
    return {
        "id": str(release.id),
        "app": release.app_name,
        "version": release.version,
        "status": release.status,
        "description": release.description,
        "reason": release.reason,
        "image_ref": release.image_ref,
        "image_repository": release.image_repository,
        "image_digest": release.image_digest,
        "strategy": release.strategy,
        "regions": list(release.regions),
        "count": release.machine_count,
        "stable": release.stable,
        "user": {"id": release.user_id, "name": release.user_name},
        "created_at": utc_iso(release.created_at),
        "updated_at": utc_iso(release.updated_at),
    }
