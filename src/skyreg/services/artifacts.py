"""What the server attaches to images itself (SBOMs, layer indexes): small blobs stored and
linked into a repository, as a push would."""

from __future__ import annotations

from collections.abc import AsyncIterator

from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import digest_of
from skyreg.store.base import BlobStore


async def put_blob(store: BlobStore, registry: RegistryMeta, repository: str, data: bytes) -> None:
    """Store `data` (held in memory) and link it into `repository`."""
    digest = digest_of(data)

    async def body() -> AsyncIterator[bytes]:
        yield data

    async def link(size: int) -> None:
        await registry.run(registry.link_blob, repository, str(digest), size)

    await store.put(digest, body(), before_install=link)
