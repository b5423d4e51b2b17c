"""One registry node's part in a multi-region registry.

- Every blob this node stores (a push, a copy) is recorded as held by its region.
- A GET of a blob its region lacks is a pull-through (`pull_through`): the bytes come from the
  nearest region holding them, stream to the client and land in this region's store. A Range
  GET of at most `MAX_RANGE_THROUGH` bytes is answered with just that range from the nearest
  holder while the one whole copy goes on in the background (lazy pull reads single files of
  layers this way); a larger one waits for the whole copy.
- A replication worker claims this region's queued jobs and runs them through the same
  transfers (`MAX_PARALLEL` at once), so a pull and a job for one blob share one transfer.
- `enqueue_image` asks for every blob of an image (the host platform's child of an index) in
  the given regions: deploys call it, and pushes do for apps that keep their images in their
  regions (`replicate_ahead`).
- Garbage collection: a copy is recorded only while the blob exists (else its bytes are queued
  for deletion), and a transfer never installs bytes of a blob GC deleted (`geo.transfer`).
  `regions.codes` (every region of the map) is where GC queues a dead blob's deletions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from skyreg.geo.errors import BlobNotInRegion, RegionsUnavailable
from skyreg.geo.regions import RegionMap
from skyreg.geo.transfer import (
    LEASE_SECONDS,
    MAX_RANGE_THROUGH,
    BlobDeleted,
    Feed,
    Transfer,
    TransferFailed,
    Transfers,
)
from skyreg.meta.geo import JOB_STATES, GeoMeta
from skyreg.meta.registry import RegistryMeta
from skyreg.oci.digest import Digest
from skyreg.oci.manifest import Descriptor, parse_manifest
from skyreg.oci.platforms import host_architecture, platform_entry
from skyreg.store.base import BlobStore
from skyreg.workers import PeriodicWorker

log = logging.getLogger("skyreg.geo")

MAX_PARALLEL = 4
POLL_INTERVAL = 1.0


@dataclass
class GeoNode:
    region: str
    regions: RegionMap
    store: BlobStore
    meta: GeoMeta
    registry: RegistryMeta
    peer_token: str | None = None  # the service credential for other regions' nodes
    peer_token_file: Path | None = None  # or a file holding it (read when first needed)
    replicate: bool = True  # the server runs `replication_worker`
    lease: float = LEASE_SECONDS  # a claimed job is claimable again this long after a crash
    _session: aiohttp.ClientSession | None = None
    transfers: Transfers = field(init=False)
    _replicating: set[asyncio.Task[None]] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.transfers = Transfers(
            self.region, self.regions, self.store, self.meta, self.session, self._peer_token
        )
        self.transfers.lease = self.lease

    def _peer_token(self) -> str | None:
        if self.peer_token is None and self.peer_token_file is not None:
            with contextlib.suppress(OSError):
                self.peer_token = self.peer_token_file.read_text().strip() or None
        return self.peer_token

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
            connector = aiohttp.TCPConnector(limit=64, force_close=False)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._session

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: once the app stops, end this process's transfers and close
        the peer session (the server stops `replication_worker` before)."""
        yield
        await self.transfers.close()
        if self._session is not None:
            await self._session.close()
        self.meta.close()

    # -- copies ------------------------------------------------------------------------------------

    async def stored(self, digest: Digest, size: int = 0) -> bool:
        """This region's store now holds `digest` (pushed here): recorded as this region's
        copy, True. False when garbage collection deleted the blob since it was linked: the
        bytes are not recorded, a deletion of them (`size` bytes, when known) is queued."""
        return await self.meta.run(self.meta.add_copy, str(digest), self.region, size)

    def refuse_chained(self, digest: Digest, *, for_peer: bool) -> None:
        """Raises BlobNotInRegion when another region's node asks for a blob this region lacks
        (it sent `transfer.PEER_HEADER`): pull-throughs never chain."""
        if for_peer:
            raise BlobNotInRegion(str(digest))

    async def pull_through(
        self,
        repository: str,
        digest: Digest,
        size: int,
        *,
        byte_range: tuple[int, int] | None = None,
    ) -> AsyncGenerator[bytes, None] | None:
        """Bring a blob this region lacks here from the nearest region holding it.

        Returns None once the blob is in this region's store, for the caller to serve it as
        any local blob (clients joining a transfer whose bytes have passed, and Range reads of
        more than `MAX_RANGE_THROUGH` bytes, wait for that); otherwise the bytes as they
        arrive — of the whole blob, or with `byte_range` (first, last: a satisfiable range)
        just those, from a holder, while the whole copy starts or goes on in the background —
        led by one empty chunk as soon as they flow (the caller may send its headers then).
        Raises RegionsUnavailable when no holder answers: from the iterator once it has begun,
        so a stream is cut.
        """
        transfer = self.transfers.get(repository, digest, size)
        if byte_range is not None:
            return await self._range(transfer, repository, digest, size, *byte_range)
        feed = transfer.subscribe()
        if feed is None:
            await self._wait(transfer, digest)
            return None
        return self._stream(transfer, feed, digest, size)

    async def _range(
        self, transfer: Transfer, repository: str, digest: Digest, size: int, first: int, last: int
    ) -> AsyncGenerator[bytes, None] | None:
        if last - first + 1 > MAX_RANGE_THROUGH or transfer.done.is_set():
            await self._wait(transfer, digest)
            return None
        sources = await self.transfers.holders(digest)
        if not sources:  # GC took its copies, or they are all gone: the copy says which
            await self._wait(transfer, digest)
            return None
        return self._ranged(repository, digest, size, first, last, sources)

    async def _ranged(
        self, repository: str, digest: Digest, size: int, first: int, last: int, sources: list[str]
    ) -> AsyncGenerator[bytes, None]:
        chunks = self.transfers.read_range(repository, digest, size, first, last, sources)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except TransferFailed as e:
            log.warning("range read of %s through %s failed: %s", digest, self.region, e)
            raise RegionsUnavailable(str(digest)) from None

    async def _stream(
        self, transfer: Transfer, feed: Feed, digest: Digest, size: int
    ) -> AsyncGenerator[bytes, None]:
        started = False
        sent = 0
        held = b""  # the latest chunk goes out only once the copy is verified: a client never
        # holds the whole body of bytes that turned out wrong (the stream is cut instead)
        async for chunk in feed:
            if not started:
                started = True
                yield b""
            if held:
                yield held
                sent += len(held)
            held = chunk
        await self._wait(transfer, digest)
        if held:
            yield held
            sent += len(held)
        if sent < size:
            async for chunk in self.store.read(digest, sent):
                yield chunk

    async def _wait(self, transfer: Transfer, digest: Digest) -> None:
        try:
            await asyncio.shield(transfer.wait())
        except BlobDeleted:
            # GC deleted it while it was asked for: in no region now (404, not "try again")
            raise BlobNotInRegion(str(digest)) from None
        except TransferFailed as e:
            log.warning("pull-through of %s into %s failed: %s", digest, self.region, e)
            raise RegionsUnavailable(str(digest)) from None

    # -- replication -------------------------------------------------------------------------------

    def image_blobs(self, repository: str, digest: str) -> list[tuple[str, int]]:
        """(digest, size) of every blob an image needs: config and layers; of an index, the
        host platform's child (all children when none matches)."""
        stored = self.registry.get_manifest(repository, digest, True)
        if stored is None:
            return []
        manifest = parse_manifest(stored.content, stored.media_type, Digest.parse(stored.digest))
        if manifest.manifests:
            entry = platform_entry(manifest, host_architecture())
            children = [entry] if entry is not None else list(manifest.manifests)
            found: list[tuple[str, int]] = []
            for child in children:
                found += self.image_blobs(repository, str(child.digest))
            return list(dict.fromkeys(found))
        blobs: list[Descriptor] = [
            *([manifest.config] if manifest.config else []),
            *manifest.layers,
        ]
        return [(str(d.digest), d.size) for d in blobs]

    def enqueue_image(self, repository: str, digest: str, regions: list[str]) -> int:
        """Queue a copy of each blob of the image into each region lacking it; jobs queued."""
        blobs = self.image_blobs(repository, digest)
        copies = self.meta.copies([d for d, _ in blobs])
        queued = 0
        for region in regions:
            if not self.regions.knows(region):
                continue
            for blob, size in blobs:
                if region not in copies[blob] and self.meta.enqueue(blob, size, repository, region):
                    queued += 1
        return queued

    async def copy_everywhere(self, repository: str, digest: str) -> int:
        """Queue copies of the blobs of `digest` — a small artifact this server made for an
        image (its layer indexes) — into every other region, so that a machine starting there
        lazily finds them nearby before the image arrives; jobs queued."""
        others = [code for code in self.regions.codes if code != self.region]
        return await self.meta.run(self.enqueue_image, repository, digest, others)

    def after_push(self, repository: str, digest: str) -> None:
        """A manifest was pushed: apps that keep images in their regions copy it ahead."""
        placement = self.meta.app_placement(repository.split("/", 1)[0])
        if placement is not None and placement[1] and placement[0]:
            self.enqueue_image(repository, digest, placement[0])

    def replication_worker(self) -> PeriodicWorker:
        """The worker claiming this region's due jobs every `POLL_INTERVAL` seconds."""
        return PeriodicWorker("replication", POLL_INTERVAL, self._replicate, logger=log)

    async def _replicate(self) -> None:
        """Claim due jobs until `MAX_PARALLEL` of the ones claimed here are moving."""
        while len(self._replicating) < MAX_PARALLEL:
            job = await self.meta.run(
                self.meta.claim_next, self.region, self.transfers.owner, self.lease
            )
            if job is None:
                return
            transfer = self.transfers.get(job.repository, Digest.parse(job.digest), job.size, job)
            task = asyncio.create_task(_settle(transfer))
            self._replicating.add(task)
            task.add_done_callback(self._replicating.discard)

    # -- metrics -----------------------------------------------------------------------------------

    def metrics(self) -> str:
        """Prometheus text: jobs by region and state, bytes moved, this process's transfers
        (a query: call it on a database thread)."""
        counts = self.meta.counts()
        lines = [
            "# HELP skyreg_replication_jobs Replication jobs by target region and state.",
            "# TYPE skyreg_replication_jobs gauge",
        ]
        regions = sorted({r for r, _ in counts} | {self.region})
        for region in regions:
            for state in JOB_STATES:
                n = counts.get((region, state), (0, 0))[0]
                lines.append(f'skyreg_replication_jobs{{region="{region}",state="{state}"}} {n}')
        lines += [
            "# HELP skyreg_replication_bytes_total Bytes copied into each region by replication.",
            "# TYPE skyreg_replication_bytes_total counter",
        ]
        for region in regions:
            moved = sum(b for (r, _), (_, b) in counts.items() if r == region)
            lines.append(f'skyreg_replication_bytes_total{{region="{region}"}} {moved}')
        c, me = self.transfers.counters, f'region="{self.region}"'
        lines += [
            "# HELP skyreg_transfer_bytes_in_total Bytes this process fetched from other regions.",
            "# TYPE skyreg_transfer_bytes_in_total counter",
            f"skyreg_transfer_bytes_in_total{{{me}}} {c.bytes_in}",
            "# TYPE skyreg_transfers_total counter",
            f'skyreg_transfers_total{{{me},result="done"}} {c.transfers_done}',
            f'skyreg_transfers_total{{{me},result="failed"}} {c.transfers_failed}',
            "# HELP skyreg_range_bytes_in_total Bytes of Range reads this process passed through"
            " from other regions (not stored: the whole copy is counted above).",
            "# TYPE skyreg_range_bytes_in_total counter",
            f"skyreg_range_bytes_in_total{{{me}}} {c.range_bytes_in}",
            "# HELP skyreg_transfer_yield_seconds_total Seconds whole-blob copies of large blobs"
            " waited for foreground fetches (Range reads, small blobs) to leave the link.",
            "# TYPE skyreg_transfer_yield_seconds_total counter",
            f"skyreg_transfer_yield_seconds_total{{{me}}} {c.yield_seconds:.6f}",
            "# HELP skyreg_transfer_spliced_bytes_total Bytes of whole-blob copies taken from"
            " Range reads passed through before (not fetched twice).",
            "# TYPE skyreg_transfer_spliced_bytes_total counter",
            f"skyreg_transfer_spliced_bytes_total{{{me}}} {c.spliced_bytes}",
            "# TYPE skyreg_range_reads_total counter",
            f'skyreg_range_reads_total{{{me},result="done"}} {c.ranges_done}',
            f'skyreg_range_reads_total{{{me},result="failed"}} {c.ranges_failed}',
            "",
        ]
        return "\n".join(lines)

    def status_json(self) -> dict[str, object]:
        counts = self.meta.counts()
        return {
            "region": self.region,
            "regions": self.regions.codes,
            "jobs": [
                {"region": r, "state": s, "count": n, "bytes": b}
                for (r, s), (n, b) in sorted(counts.items())
            ],
        }


async def _settle(transfer: Transfer) -> None:
    with contextlib.suppress(TransferFailed):
        await transfer.wait()
