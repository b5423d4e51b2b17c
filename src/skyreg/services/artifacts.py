"""What the server attaches to images itself (SBOMs, layer indexes): small blobs stored and
linked into a repository, as a push would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest, digest_of
from skyreg.store.base import BlobStore

# Records that this region's store now holds a blob (`GeoNode.stored` of a multi-region
# registry): other regions' nodes then know where to fetch it from, as for a pushed blob.
Stored = Callable[[Digest, int], Awaitable[bool]]


async def put_blob(
    store: BlobStore,
    registry: RegistryMeta,
    repository: str,
    data: bytes,
    stored: Stored | None = None,
) -> None:
    """Store `data` (held in memory) and link it into `repository`; with `stored`, record the
    region's copy before returning (a referrer naming a blob no region is known to hold could
    not be read from any other region)."""
    digest = digest_of(data)

    async def body() -> AsyncIterator[bytes]:
        yield data

    async def link(size: int) -> None:
        await registry.run(registry.link_blob, repository, str(digest), size)

    await store.put(digest, body(), before_install=link)
    if stored is not None:
        await stored(digest, len(data))
