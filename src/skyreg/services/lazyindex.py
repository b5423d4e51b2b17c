"""Layer indexes for lazy pull, made by the scan worker after it scanned a pushed image: each
layer of the image gets its seekable index once (per layer digest, whatever images share it),
kept as blobs of the store, and the image gets an OCI 1.1 referrer (`ARTIFACT_TYPE`) listing the
index of each of its layers (and, for gzip, the seek points), each annotated with its layer's
digest. A layer with no index (one zstd frame, over a limit) is left out: an agent then pulls
that image whole. Format: docs/lazy-index.md."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from skyreg.lazy.index import (
    ARTIFACT_TYPE,
    GZIP_POINTS_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    LAYER_ANNOTATION,
    IndexLimits,
    LayerIndex,
    LayerIndexError,
    NotIndexable,
    build,
)
from skyreg.meta.lazy import DONE, FAILED, UNINDEXABLE, LayerIndexMeta, LayerIndexRecord
from skyreg.meta.registry import RegistryMeta
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest, digest_of
from skyreg.oci.manifest import Manifest, parse_manifest
from skyreg.services.artifacts import Stored, put_blob
from skyreg.store.base import BlobStore

log = logging.getLogger("skyreg.lazy")

_EMPTY = b"{}"
MAX_INDEXED_BLOB = 16 << 30  # compressed bytes of a layer worth indexing
COPY_AHEAD_SHARE = 0.1  # indexes copied to every region when at most this share of the image


@dataclass
class LazyIndexer:
    """Makes layer indexes and attaches them to images, over the registry's store."""

    indexes: LayerIndexMeta
    registry: RegistryMeta
    store: BlobStore
    limits: IndexLimits = field(default_factory=IndexLimits)
    stored: Stored | None = None  # records this region's copy of each blob put (multi-region)
    # Queues copies of an image's index referrer into every other region (multi-region).
    copy_ahead: Callable[[str, str], Awaitable[object]] | None = None
    made: int = 0  # layers indexed by this process
    attached: int = 0  # images given their referrer

    async def attach(
        self,
        repository: str,
        manifest: Manifest,
        open_blob: Callable[[Digest], Callable[[], BinaryIO]],
    ) -> bool:
        """Give the image `manifest` of `repository` its layer-index referrer (once); False when
        none of its layers has an index. `open_blob(digest)` opens a layer blob for reading."""
        subject = str(manifest.digest)
        present = await self.registry.read(
            self.registry.referrers, repository, subject, ARTIFACT_TYPE
        )
        if present:
            return True
        layers = [
            d for d in manifest.layers if d.media_type not in mt.FOREIGN_LAYERS and not d.urls
        ]
        records = await self.indexes.read(self.indexes.find, [str(d.digest) for d in layers])
        descriptors: list[dict[str, object]] = []
        for layer in layers:
            digest = str(layer.digest)
            record = records.get(digest)
            if (
                record is not None
                and record.state == DONE
                and not await self._link(repository, record)
            ):
                record = None  # its blobs were collected: made again
            if record is None:
                record = await self._make(repository, layer.digest, layer.size, open_blob)
            if record.state != DONE:
                continue
            assert record.index_digest is not None and record.index_size is not None
            note = {LAYER_ANNOTATION: digest}
            descriptors.append({"mediaType": INDEX_MEDIA_TYPE, "digest": record.index_digest,
                                "size": record.index_size, "annotations": note})  # fmt: skip
            if record.points_digest is not None:
                descriptors.append({"mediaType": GZIP_POINTS_MEDIA_TYPE,
                                    "digest": record.points_digest,
                                    "size": record.points_size, "annotations": note})  # fmt: skip
        if not descriptors:
            return False
        await self._put_blob(repository, _EMPTY)
        raw = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_MANIFEST,
                "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": mt.OCI_EMPTY_CONFIG, "digest": str(digest_of(_EMPTY)),
                           "size": len(_EMPTY)},
                "layers": descriptors,
                "subject": {"mediaType": manifest.media_type, "digest": subject,
                            "size": len(manifest.raw)},
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()  # fmt: skip
        referrer = parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))
        await self.registry.run(self.registry.put_manifest, repository, referrer, [])
        self.attached += 1
        index_bytes = sum(int(str(d["size"])) for d in descriptors)
        image_bytes = sum(d.size for d in layers)
        if self.copy_ahead is not None and index_bytes <= COPY_AHEAD_SHARE * image_bytes:
            # Every region gets the indexes now (not the image): a far first start reads them
            # nearby. Indexes as large as a good part of the image (layers that compress
            # very well) are fetched when a start asks instead.
            await self.copy_ahead(repository, str(referrer.digest))
        return True

    async def _link(self, repository: str, record: LayerIndexRecord) -> bool:
        """Make a layer's existing index blobs visible in `repository`; False when the store no
        longer has them."""
        pairs = [
            (record.index_digest, record.index_size),
            (record.points_digest, record.points_size),
        ]
        for digest, size in pairs:
            if digest is None or size is None:
                continue
            if await self.store.stat(Digest.parse(digest)) is None:
                return False
            linked = await self.registry.run(
                self.registry.link_blob, repository, digest, size, require_existing=True
            )
            if not linked:
                return False
        return True

    async def _make(
        self,
        repository: str,
        digest: Digest,
        size: int,
        open_blob: Callable[[Digest], Callable[[], BinaryIO]],
    ) -> LayerIndexRecord:
        """Index one layer (in a thread: it reads and inflates the whole blob), store the
        index's blobs, record it."""
        layer = str(digest)
        if size > MAX_INDEXED_BLOB:
            record = LayerIndexRecord(layer, UNINDEXABLE, reason="larger than the indexed limit")
        else:
            try:
                index, points = await asyncio.to_thread(
                    _build_spooled, open_blob(digest), layer, self.limits
                )
            except NotIndexable as e:
                record = LayerIndexRecord(layer, UNINDEXABLE, reason=str(e))
            except LayerIndexError as e:
                record = LayerIndexRecord(layer, FAILED, reason=str(e))
            else:
                document = index.encode()
                await self._put_blob(repository, document)
                if points is not None:
                    await self._put_blob(repository, points)
                record = LayerIndexRecord(
                    layer,
                    DONE,
                    str(digest_of(document)),
                    len(document),
                    None if points is None else str(digest_of(points)),
                    None if points is None else len(points),
                )
                self.made += 1
        if record.state != DONE:
            log.info("layer %s has no index: %s", layer, record.reason)
        await self.indexes.run(self.indexes.record, record)
        return record

    async def _put_blob(self, repository: str, data: bytes) -> None:
        await put_blob(self.store, self.registry, repository, data, self.stored)


def _build_spooled(
    opener: Callable[[], BinaryIO], layer: str, limits: IndexLimits
) -> tuple[LayerIndex, bytes | None]:
    """`build` over a seekable copy of the blob (a store's stream may not seek), opened
    read-only as indexed_gzip wants it."""
    with tempfile.TemporaryDirectory(prefix="skyreg-layer-index-") as work:
        path = Path(work) / "layer"
        with opener() as source, path.open("wb") as spool:
            shutil.copyfileobj(source, spool, 1 << 20)
        with path.open("rb") as raw:
            return build(raw, layer, limits)
