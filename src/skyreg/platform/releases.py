"""Releases: deploying an image to an app records which image (pinned by digest) it runs.

A release is recorded `pending`, becomes `running` once its machines are created, then
`complete` (all started) or `failed` (see `MachineMeta.reconcile_release`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from skyreg.clock import utc_iso
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import Release, ReleaseMeta
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.manifest import parse_manifest

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

STRATEGIES = ("rolling", "immediate")
MAX_LIST = 1000
MAX_IMAGE_MANIFESTS = 256  # an index and its children, walked to check a deploy's blobs


@dataclass(frozen=True)
class DeployLimits:
    """How many machines deploys may create (`skyreg serve --max-machines-...`).

    A live machine is one desired `started` (`MachineMeta.live_count`): a rolling deploy counts
    the app's current live machines plus its own, an immediate one (which stops the others at
    once) its own only.
    """

    per_region: int = 100  # `count`
    per_release: int = 1000  # count x regions
    per_app: int = 1000  # live machines of an app
    regions: int = 50  # regions one release names


@dataclass
class ReleaseService:
    """What deploys need beyond the platform tables: the registry's manifests and tags.

    Every store shares the process's one `Database`; their methods query, so callers use
    them on a database thread (`store.run`), never on the event loop.
    """

    registry: RegistryMeta
    releases: ReleaseMeta
    machines: MachineMeta
    geo: GeoNode | None = None  # multi-region: deploys queue copies of the image
    limits: DeployLimits = field(default_factory=DeployLimits)

    def unavailable_blobs(self, source: str, digest: str, target: str) -> list[str]:
        """`unavailable_blobs` with this service's stores. Queries, and walking an index parses
        up to MAX_IMAGE_MANIFESTS manifests: call it on a database thread."""
        return unavailable_blobs(self.registry, self.releases, source, digest, target)


def unavailable_blobs(
    registry: RegistryMeta, releases: ReleaseMeta, source: str, digest: str, target: str
) -> list[str]:
    """Blobs a machine of image `source@digest` needs that `target` will not serve.

    Every config and layer of the image counts (of an index, of every child manifest). When
    the image is copied from `source` into `target`, the copy links the blobs the source's
    manifests reference (config and layers without `urls`) as far as `source` has them;
    anything else, a foreign layer named only by its `urls` in particular, must already be
    linked to `target`. Raises ValueError for an image too large to walk.
    """
    needed: dict[str, bool] = {}  # digest -> linked along by a copy
    pending, seen = [digest], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if len(seen) > MAX_IMAGE_MANIFESTS:
            raise ValueError(f"the image has more than {MAX_IMAGE_MANIFESTS} manifests")
        stored = registry.get_manifest(source, current, by_digest=True)
        if stored is None:
            raise ValueError(f"manifest {current} is not in repository {source}")
        try:
            manifest = parse_manifest(
                stored.content, stored.media_type, Digest.parse(stored.digest)
            )
        except RegistryError as e:
            raise ValueError(f"manifest {current}: {e.message}") from None
        pending += [str(child.digest) for child in manifest.manifests]
        copied = {str(d.digest) for d in manifest.required_blobs()}
        for blob in [*([manifest.config] if manifest.config else []), *manifest.layers]:
            key = str(blob.digest)
            needed[key] = needed.get(key, False) or key in copied
    digests = sorted(needed)
    present = releases.linked_blobs(target, digests)
    if source != target:
        present |= {d for d in releases.linked_blobs(source, digests) if needed[d]}
    return [d for d in digests if d not in present]


RELEASES_KEY = web.AppKey("releases", ReleaseService)


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
