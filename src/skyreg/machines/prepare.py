"""Preparing an image for machines: manifest by digest from the region's registry, the host's
platform from an index, config and layers into the host-wide layer cache (in parallel, each
downloaded once), and one unpacked tree per image that machines clone.

The cache is shared by every app on the host, so it is a speed-up, never an authorization:
before any cached blob or tree is used, a HEAD through the release's repository proves that the
repository may read every blob of the image (the registry answers 404 for a blob not linked to
it), also when the unpacked tree is already there. The manifest is always read through that
repository (never from the cache), which proves the same for it.

`prepare_image` is `resolve_image` (manifest, platform, that proof) then `pull_image` (blobs into
the cache, the unpacked tree); a lazy start (`machines/lazystart.py`) resolves first and pulls in
the background."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from skyreg.client.aio import AsyncRegistryClient
from skyreg.client.protocol import RegistryClientError, ResponseTooLarge
from skyreg.machines.layercache import LayerCache, ResumeRefused
from skyreg.machines.unpack import UnpackLimits
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest
from skyreg.oci.manifest import Descriptor, Manifest, parse_manifest
from skyreg.oci.platforms import host_architecture, platform_entry

_ACCEPT = sorted(mt.MANIFEST_TYPES)
MAX_MANIFEST_BYTES = 4 << 20  # what the registry accepts at push
MAX_CONFIG_BYTES = 16 << 20  # image configs are JSON, read whole into memory
_MAX_NAMED_BLOBS = 5


class PrepareError(Exception):
    """The image cannot be prepared (missing, not for this platform, corrupt)."""


@dataclass
class RegistrySource:
    """Reads images through a registry's OCI API with a service credential (Basic token), by
    way of `AsyncRegistryClient`."""

    base_url: str
    token: str | None
    session: aiohttp.ClientSession
    blobs_fetched: list[str] = field(default_factory=list)
    client: AsyncRegistryClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = AsyncRegistryClient(self.base_url, self.session, password=self.token)

    async def manifest(self, repository: str, digest: str) -> tuple[bytes, str]:
        """The exact bytes and media type of a manifest, verified against `digest`."""
        what = f"manifest {repository}@{digest}"
        try:
            answer = await self.client.get_manifest(
                repository, digest, MAX_MANIFEST_BYTES, accept=_ACCEPT
            )
        except ResponseTooLarge as e:
            raise PrepareError(str(e)) from None
        if answer.status != 200:
            raise PrepareError(f"{what}: HTTP {answer.status} {answer.error_code()}")
        raw = answer.body
        media_type = answer.headers.get("Content-Type", "")
        want = Digest.parse(digest)
        if hashlib.new(want.algorithm, raw).hexdigest() != want.hex:
            raise PrepareError(f"{what}: content does not match digest")
        return raw, media_type

    def opener(self, repository: str, digest: str) -> _BlobOpener:
        """Starts the download of blob `digest` through `repository` (for `LayerCache.fetch`)."""
        return _BlobOpener(self, repository, digest)

    async def check_readable(self, repository: str, digests: list[str]) -> None:
        """Prove that `repository` may read every blob of `digests` (concurrent HEADs);
        PrepareError names the blobs it may not read."""
        results = await asyncio.gather(
            *(self._head_blob(repository, d) for d in digests), return_exceptions=True
        )
        denied: list[tuple[str, str]] = []
        for d, r in zip(digests, results, strict=True):
            if isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancelled
            if r is not None:
                denied.append((d, r if isinstance(r, str) else f"cannot check: {r!r}"))
        if denied:
            named = "; ".join(f"{d} ({why})" for d, why in denied[:_MAX_NAMED_BLOBS])
            extra = len(denied) - _MAX_NAMED_BLOBS
            more = f" and {extra} more" if extra > 0 else ""
            raise PrepareError(
                f"repository {repository} may not read blob {named}{more}: the image refers "
                "to blobs it does not hold, and cached copies are never used without that right"
            )

    async def _head_blob(self, repository: str, digest: str) -> str | None:
        """None if `repository` serves blob `digest`, else why not."""
        try:
            answer = await self.client.head_blob(repository, digest)
        except aiohttp.ClientError as e:
            return f"cannot check: {e}"
        if answer.status == 200:
            return None
        return f"HTTP {answer.status} {answer.reason}".strip()


@dataclass
class _BlobOpener:
    """The `Opener` of one blob through one repository: a GET from an offset (`Range`)."""

    source: RegistrySource
    repository: str
    digest: str

    async def __call__(self, offset: int = 0) -> AsyncIterator[bytes]:
        self.source.blobs_fetched.append(self.digest)
        return self._stream(offset)

    async def _stream(self, offset: int) -> AsyncIterator[bytes]:
        """The blob's bytes from `offset`. Asked for more than 0, anything but a 206 from there
        (a 200: the registry ignored the Range; an error) is ResumeRefused: the cache starts
        over at 0, and that request gives the error, if any, for good."""
        what = f"blob {self.repository}@{self.digest}"
        async with contextlib.AsyncExitStack() as stack:
            try:
                blob = await stack.enter_async_context(
                    self.source.client.blob(self.repository, self.digest, offset=offset)
                )
            except RegistryClientError as e:  # a 206 from elsewhere than `offset`
                if not offset:
                    raise
                raise ResumeRefused(f"{what} from byte {offset}: {e}") from e
            if offset and blob.status != 206:
                raise ResumeRefused(f"{what} from byte {offset}: HTTP {blob.status}")
            if not offset and blob.status != 200:
                raise PrepareError(f"{what}: HTTP {blob.status} {blob.error_code()}")
            async for chunk in blob.chunks():
                yield chunk


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for machines: its config and the shared unpacked tree to clone."""

    manifest_digest: str  # of the platform manifest (an index resolved to one entry)
    config: bytes
    rootfs: Path


def _pick_platform(index: Manifest, arch: str) -> Descriptor:
    """The index entry for linux/`arch`; PrepareError names what the index offers instead."""
    entry = platform_entry(index, arch)
    if entry is not None:
        return entry
    offered = sorted(
        f"{(e.platform or {}).get('os')}/{(e.platform or {}).get('architecture')}"
        for e in index.manifests
    )
    raise PrepareError(f"no linux/{arch} image in the index (it has {', '.join(offered)})")


@dataclass(frozen=True)
class ResolvedImage:
    """An image's platform manifest, read through `repository`, which was shown to hold every
    blob of it (`resolve_image`): what the full pull and the lazy start both begin with."""

    repository: str
    manifest_digest: str  # of the platform manifest (an index resolved to one entry)
    manifest: Manifest


async def resolve_image(
    source: RegistrySource, repository: str, digest: str, *, arch: str | None = None
) -> ResolvedImage:
    """The manifest of `repository@digest` (linux/`arch` chosen from an index), once
    `repository` is shown to hold its config and every layer."""
    raw, media_type = await source.manifest(repository, digest)
    manifest = parse_manifest(raw, media_type, Digest.parse(digest))
    if manifest.is_index:
        entry = _pick_platform(manifest, arch or host_architecture())
        digest = str(entry.digest)
        raw, media_type = await source.manifest(repository, digest)
        manifest = parse_manifest(raw, media_type, entry.digest)
        if manifest.is_index:
            raise PrepareError(f"{repository}@{digest}: nested indexes are not images")
    assert manifest.config is not None
    if manifest.config.size > MAX_CONFIG_BYTES:
        raise PrepareError(
            f"{repository}@{digest}: config of {manifest.config.size} bytes, "
            f"more than {MAX_CONFIG_BYTES}"
        )
    blobs = [manifest.config, *manifest.layers]
    await source.check_readable(repository, [str(d.digest) for d in blobs])
    return ResolvedImage(repository, digest, manifest)


async def fetch_config(source: RegistrySource, cache: LayerCache, image: ResolvedImage) -> bytes:
    """The image's config (through the layer cache)."""
    config = image.manifest.config
    assert config is not None
    digest = str(config.digest)
    path = await cache.fetch(digest, config.size, source.opener(image.repository, digest))
    return path.read_bytes()


async def pull_image(
    source: RegistrySource,
    cache: LayerCache,
    image: ResolvedImage,
    *,
    limits: UnpackLimits | None = None,
) -> PreparedImage:
    """Fetch the config and layers of a resolved image into `cache` (concurrently, those
    already cached are not downloaded) and unpack it once (within `limits`)."""
    manifest, repository = image.manifest, image.repository
    assert manifest.config is not None
    blobs = [manifest.config, *manifest.layers]
    paths = await asyncio.gather(
        *(
            cache.fetch(str(d.digest), d.size, source.opener(repository, str(d.digest)))
            for d in blobs
        )
    )
    config = paths[0].read_bytes()
    layers = [(path, d.media_type) for path, d in zip(paths[1:], manifest.layers, strict=True)]
    rootfs = await cache.rootfs_for(image.manifest_digest, layers, limits)
    return PreparedImage(manifest_digest=image.manifest_digest, config=config, rootfs=rootfs)


async def prepare_image(
    source: RegistrySource,
    cache: LayerCache,
    repository: str,
    digest: str,
    *,
    arch: str | None = None,
    limits: UnpackLimits | None = None,
) -> PreparedImage:
    """Fetch `repository@digest` (choosing linux/`arch` from an index) into `cache` and unpack
    it once (within `limits`); layers already cached are not downloaded, layers are fetched
    concurrently. Nothing cached is used before `repository` is shown to hold every blob."""
    image = await resolve_image(source, repository, digest, arch=arch)
    return await pull_image(source, cache, image, limits=limits)
