"""Images of an app (every tag of `<app>` and `<app>/...`), one image's blobs and regions, the
deletion of a tag or a manifest, and the replication queue."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from skyreg.auth.policy import DELETE, AccessPolicy
from skyreg.meta.errors import ManifestInUse
from skyreg.meta.geo import Job
from skyreg.meta.platform import App, ImageTag, PlatformMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.oci.manifest import Descriptor, Manifest, parse_manifest
from skyreg.services.access import required, visible_app
from skyreg.services.errors import Conflict, Forbidden, Invalid, NotFound

if TYPE_CHECKING:
    from skyreg.geo.node import GeoNode

RECENT_JOBS = 50
MAX_IMAGE_PAGE = 1000  # tags one page of an app's images holds (each costs its size's queries)
MAX_PLATFORMS = 64  # manifests of an index one image's detail reads (each one query)
MAX_REFERRERS = 100  # referrers one image's detail lists


def image_cursor(tag: ImageTag) -> str:
    """The cursor of the page after `tag`: REPOSITORY:TAG (neither part holds a colon)."""
    return f"{tag.repository}:{tag.tag}"


@dataclass(frozen=True)
class BlobCopies:
    """A blob of an image and the regions holding a verified copy."""

    digest: str
    size: int
    regions: list[str]


@dataclass(frozen=True)
class Part:
    """A descriptor as an image's detail shows it."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    """One image manifest of an image (the image itself, or a platform of an index): its
    platform (`os/arch[/variant]`, from the index; None for a single image), config and
    layers (empty when the index names a manifest the repository does not hold)."""

    digest: str
    media_type: str
    size: int
    platform: str | None
    config: Part | None
    layers: list[Part]


@dataclass(frozen=True)
class ImageReferrer:
    """A manifest whose subject is the image: a signature, an SBOM, an attestation."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None


@dataclass(frozen=True)
class ImageDetail:
    """One image of an app: its manifests (platforms) with their layers, its referrers, when it
    was last pulled; `blobs` and `regions` (region -> (complete, bytes held)) only in a
    multi-region registry."""

    repository: str
    reference: str
    digest: str
    media_type: str
    manifests: list[ImageManifest] = field(default_factory=list)
    referrers: list[ImageReferrer] = field(default_factory=list)
    pulled_at: datetime | None = None
    blobs: list[BlobCopies] | None = None
    regions: dict[str, tuple[bool, int]] | None = None
    platforms_left_out: int = 0  # an index's manifests past MAX_PLATFORMS
    referrers_left_out: int = 0  # referrers past MAX_REFERRERS
    manifest_size: int = 0  # the bytes of the manifest itself

    @property
    def size(self) -> int:
        """The bytes of the manifests and every distinct blob they reference (as the image
        listing counts them)."""
        if self.blobs is not None:
            return sum(b.size for b in self.blobs)
        seen: dict[str, int] = {self.digest: self.manifest_size}
        for manifest in self.manifests:
            seen[manifest.digest] = manifest.size
            for part in ([manifest.config] if manifest.config else []) + manifest.layers:
                seen[part.digest] = part.size
        return sum(seen.values())


def _part(descriptor: Descriptor) -> Part:
    return Part(str(descriptor.digest), descriptor.media_type, descriptor.size)


def _platform(descriptor: Descriptor) -> str | None:
    """`os/architecture[/variant]` of an index's descriptor."""
    platform = descriptor.platform or {}
    names = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
    text = "/".join(str(n)[:40] for n in names if isinstance(n, str) and n)
    return text or None


def _parsed(raw: bytes, media_type: str, digest: str) -> Manifest | None:
    try:
        return parse_manifest(raw, media_type, Digest.parse(digest))
    except RegistryError:  # stored manifests were valid when pushed; never fail the page
        return None


@dataclass(frozen=True)
class DeletedImage:
    """What a deletion removed: a tag of `repository` (`digest` None: the manifest stays until
    garbage collection finds nothing else holds it), or a manifest with all its tags (`tag`
    None)."""

    repository: str
    tag: str | None = None
    digest: str | None = None


def split_reference(app: str, reference: str) -> tuple[str, str, bool]:
    """(repository, tag or digest, whether a digest) of `TAG`, `DIGEST`, `REPO:TAG` or
    `REPO@DIGEST`, the repository defaulting to `app`."""
    if "@" in reference:  # REPO@DIGEST
        repository, _, ref = reference.partition("@")
        return repository, ref, True
    if reference.startswith(("sha256:", "sha512:")):  # DIGEST
        return app, reference, True
    if ":" in reference:  # REPO:TAG
        repository, _, ref = reference.rpartition(":")
        return repository, ref, False
    return app, reference, False


@dataclass(frozen=True)
class JobCount:
    """Replication jobs of one region in one state."""

    region: str
    state: str
    count: int
    bytes: int


@dataclass(frozen=True)
class ReplicationStatus:
    """The replication queue as the node that answers sees it (`region` None: single region)."""

    region: str | None
    regions: list[str]
    jobs: list[JobCount]
    recent: list[Job]


@dataclass
class ImageService:
    """Image listings over `PlatformMeta` and `RegistryMeta`, regions over the `GeoNode`."""

    platform: PlatformMeta
    registry: RegistryMeta
    geo: GeoNode | None = None
    policy: AccessPolicy = field(init=False)

    def __post_init__(self) -> None:
        self.policy = AccessPolicy(self.platform)

    async def list_images(
        self,
        caller: TokenRecord | None,
        app: str,
        limit: int = MAX_IMAGE_PAGE,
        cursor: str | None = None,
    ) -> tuple[App, list[ImageTag]]:
        """A page of the tags of the app's repositories (public apps: anyone), by repository
        and tag: at most `limit` (1 to MAX_IMAGE_PAGE), after `cursor` (`image_cursor` of the
        previous page's last tag)."""
        if not 1 <= limit <= MAX_IMAGE_PAGE:
            raise Invalid(f"limit must be a whole number from 1 to {MAX_IMAGE_PAGE}")
        after = None
        if cursor:
            repository, colon, tag = cursor.rpartition(":")
            if not (colon and repository and tag):
                raise Invalid("cursor must be the next_cursor of a previous page")
            after = (repository, tag)
        # On a database thread even on SQLite: a page of distinct manifests costs a query or two
        # each (their sizes), too long to run inline on the event loop.
        return await self.platform.run(self._list_images, caller, app, limit, after)

    def _list_images(
        self, caller: TokenRecord | None, name: str, limit: int, after: tuple[str, str] | None
    ) -> tuple[App, list[ImageTag]]:
        app = visible_app(self.platform, caller, name, public_ok=True)
        return app, self.platform.image_tags(app.name, limit=limit, after=after)

    async def show_image(self, caller: TokenRecord | None, app: str, reference: str) -> ImageDetail:
        """One image of the app (`TAG`, `DIGEST`, `APP:TAG` or `APP@DIGEST`)."""
        if self.geo is not None:
            # Its regions need every manifest of the image parsed (an index: each child) and
            # their blobs' copies looked up: too much to do inline on the event loop.
            return await self.platform.run(self._show_image, caller, app, reference)
        return await self.platform.read(self._show_image, caller, app, reference)

    def _show_image(self, caller: TokenRecord | None, name: str, reference: str) -> ImageDetail:
        app = visible_app(self.platform, caller, name, public_ok=True)
        repository, ref, by_digest = split_reference(app.name, reference)
        if repository != app.name and not repository.startswith(app.name + "/"):
            raise NotFound("image", reference[:200])
        stored = self.registry.get_manifest(repository, ref, by_digest=by_digest)
        if stored is None:
            raise NotFound("image", reference[:200])
        manifests, left_out = self._manifests(repository, stored.digest, stored.media_type,
                                              stored.content)  # fmt: skip
        found = self.registry.referrers(repository, stored.digest, None)
        referrers = [
            ImageReferrer(r.digest, r.media_type, r.size, r.artifact_type)
            for r in found[:MAX_REFERRERS]
        ]
        detail = ImageDetail(
            repository,
            ref,
            stored.digest,
            stored.media_type,
            manifests,
            referrers,
            self.platform.pulled_at(repository, stored.digest),
            platforms_left_out=left_out,
            referrers_left_out=max(0, len(found) - MAX_REFERRERS),
            manifest_size=len(stored.content),
        )
        geo = self.geo
        if geo is None or repository != app.name:
            return detail
        blobs = geo.image_blobs(repository, stored.digest)
        copies = geo.meta.copies([d for d, _ in blobs])
        return replace(
            detail,
            blobs=[BlobCopies(d, size, sorted(copies[d])) for d, size in blobs],
            regions={
                region: (
                    all(region in copies[d] for d, _ in blobs),
                    sum(size for d, size in blobs if region in copies[d]),
                )
                for region in geo.regions.codes
            },
        )

    def _manifests(
        self, repository: str, digest: str, media_type: str, content: bytes
    ) -> tuple[list[ImageManifest], int]:
        """The image manifests of a manifest (itself, or an index's: at most MAX_PLATFORMS,
        with how many more it names)."""
        manifest = _parsed(content, media_type, digest)
        if manifest is None:
            return [], 0
        if not manifest.is_index:
            config = _part(manifest.config) if manifest.config else None
            layers = [_part(d) for d in manifest.layers]
            return [ImageManifest(digest, media_type, len(content), None, config, layers)], 0
        found = []
        for child in manifest.manifests[:MAX_PLATFORMS]:
            child_digest = str(child.digest)
            stored = self.registry.get_manifest(repository, child_digest, by_digest=True)
            parsed = None
            if stored is not None:
                parsed = _parsed(stored.content, stored.media_type, child_digest)
            config = _part(parsed.config) if parsed is not None and parsed.config else None
            layers = [_part(d) for d in parsed.layers] if parsed is not None else []
            found.append(
                ImageManifest(
                    child_digest, child.media_type, child.size, _platform(child), config, layers
                )
            )
        return found, max(0, len(manifest.manifests) - MAX_PLATFORMS)

    async def delete_image(
        self, caller: TokenRecord | None, app: str, reference: str
    ) -> DeletedImage:
        """Delete a tag (`TAG`, `REPO:TAG`: the tag goes, its manifest is queued for garbage
        collection) or a manifest with its tags (`DIGEST`, `REPO@DIGEST`) of one of the app's
        repositories (`<app>`, `<app>/...`), for callers that may push to the app (others of
        its org: Forbidden). A manifest an index of the repository references is refused
        (Conflict, naming the index): delete the index first."""
        return await self.platform.run(self._delete_image, caller, app, reference)

    def _delete_image(self, caller: TokenRecord | None, name: str, reference: str) -> DeletedImage:
        app = visible_app(self.platform, caller, name)
        repository, ref, by_digest = split_reference(app.name, reference)
        if repository != app.name and not repository.startswith(app.name + "/"):
            raise NotFound("image", reference[:200])
        if DELETE not in self.policy.allowed(caller, repository):
            raise Forbidden(f"this token may not delete images of app {app.name}")
        if not ref:
            raise NotFound("image", reference[:200])
        try:
            deleted = (
                self.registry.delete_manifest(repository, ref)
                if by_digest
                else self.registry.delete_tag(repository, ref)
            )
        except ManifestInUse as e:
            raise Conflict(str(e)) from None
        if not deleted:
            raise NotFound("image", reference[:200])
        if by_digest:
            return DeletedImage(repository, digest=ref)
        return DeletedImage(repository, tag=ref)

    async def replication_status(self, caller: TokenRecord | None) -> ReplicationStatus:
        """Job counts and bytes per region and state, and the latest jobs (admin only)."""
        token = required(caller)
        if token.kind != "admin":
            raise Forbidden("only an admin token may see the replication queue")
        if self.geo is None:
            return ReplicationStatus(None, [], [], [])
        return await self.platform.read(self._replication_status, self.geo)

    @staticmethod
    def _replication_status(geo: GeoNode) -> ReplicationStatus:
        counts = geo.meta.counts()
        return ReplicationStatus(
            geo.region,
            list(geo.regions.codes),
            [JobCount(r, s, n, b) for (r, s), (n, b) in sorted(counts.items())],
            geo.meta.jobs(limit=RECENT_JOBS),
        )
