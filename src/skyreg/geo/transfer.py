"""Moving one blob into this region: from the nearest region holding it, through the registry's
own blob API, into this region's store, verified before it counts.

One `Transfer` per blob per process at a time (`Transfers.get` is a single flight); across the
processes and nodes of a region, the replication job's lease (`GeoMeta.claim`) elects the one
that moves the bytes while the others wait for the copy to appear. Clients that ask while the
bytes are on their way subscribe to a `Feed` and receive them as they arrive; a feed that falls
too far behind (or joins once bytes have passed) is detached and continues from this region's
store once the copy is complete — content addressing makes bytes from any source identical.

A source that fails mid-transfer (region down, connection cut) is replaced by the next nearest;
the upload continues where it stopped (`Range: bytes=N-`). Nothing is visible in this region
until the store has verified the digest and the job is marked done with the copy recorded.

Garbage collection: a transfer never brings a deleted blob back. Its verified bytes are
installed only after `GeoMeta.prepare_install` committed (the store's `before_install` hook):
that cancels a pending deletion of them in this region and refuses once GC has deleted the
blob, and then the upload is aborted. A copy that lands while GC deletes the blob is not
recorded (`finish` / `add_copy` queue the deletion of its bytes instead). Both end the
transfer with `BlobDeleted`.

Range reads (`read_range`): a client reading a few bytes of a blob on its way here (the lazy
reader of a far machine) need not wait for the whole copy. The bytes it asked for come from the
nearest holder by a peer request with the same Range, accepted only as a 206 of exactly that
range (Content-Range and Content-Length), and go straight to the client, stored nowhere; the
whole copy is the caller's single `Transfer`. A range's bytes cannot be checked against the
blob's digest alone: the reader checks them (the lazy index's chunk digests).

Priority on the WAN (`WanPriority`, one per `Transfers`): what a starting machine waits for goes
first, while every whole copy still crosses the WAN once. Foreground fetches are every Range read
passed through (while it waits on its peer: a client that stops taking its bytes does not hold
the link) and whole copies of blobs of at most `FOREGROUND_BLOB` bytes (index documents,
configs: what a start waits for). Whole copies of
larger blobs are background: they come as Range requests of at most `PIECE` bytes, one at a time,
and before asking for each piece they wait while a foreground fetch is in flight or one ended
less than `LINGER` seconds ago (a machine's sequential reads leave small gaps that must not hand
the link back), but never more than `MAX_YIELD` seconds per piece, so a background copy is
slowed, never starved. Pieces, not one long answer read slowly: a paused copy then has at most
one piece on the way, where a long answer would keep the link busy with whatever the socket
buffers and every hop between the regions had queued (measured: several MB per connection).
The time waited is `Counters.yield_seconds`.

No double transfer: a Range read of a blob whose whole copy runs in this process, beyond what
the copy has received, keeps its bytes (at most `MAX_KEPT` for the process); the copy appends
them from memory when it gets there and asks its source only for the rest (`spliced_bytes`).
They are checked with the whole blob's digest as any other byte of it; a copy that does not
match forgets them before it tries the next source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from skyreg.client.aio import READ_SIZE, AsyncRegistryClient
from skyreg.client.protocol import RegistryClientError, basic_authorization, blob_path
from skyreg.geo.regions import RegionMap
from skyreg.meta.geo import GeoMeta, Job
from skyreg.oci.digest import Digest
from skyreg.store.base import BlobStore, DigestMismatch, UploadUnknown

log = logging.getLogger("skyreg.geo")

LEASE_SECONDS = 30.0
PEER_HEADER = "X-Skyreg-Peer"  # set on requests between regions: answer from local bytes only
PIECE_HEADER = "X-Skyreg-Copy-Piece"  # on a whole copy's piece requests (logs, relays, tests)
_FEED_LIMIT = 32  # chunks (~1 MiB each) a subscriber may lag before it is detached
_WAIT_POLL = 0.2
_WAIT_LIMIT = 3600.0
MAX_RANGE_THROUGH = (
    64 << 20
)  # bytes one Range read may ask through regions (more: wait for the copy)
RANGE_PARALLEL = 32  # peer Range requests of this process at once (the session holds 64)
# One peer Range request: connect and read stalls as the transfer's, and an end (a reader gives
# up on a range after 120 s: `machines/lazymount.py`).
RANGE_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10, sock_read=60)
# WAN priority (module doc): whole copies up to this size are foreground, larger ones background.
FOREGROUND_BLOB = 16 << 20
PIECE = 4 << 20  # bytes one request of a large copy asks for (what a pause leaves in flight)
MAX_KEPT = 256 << 20  # bytes of Range reads kept for whole copies, in all
LINGER = 1.0  # seconds after the last foreground fetch ended before background copies go on
MAX_YIELD = 2.0  # seconds a background copy waits at most (one such copy goes per MAX_YIELD)


class TransferFailed(Exception):
    """No region could supply the blob (the message names the regions tried: logs only)."""


class BlobDeleted(TransferFailed):
    """Garbage collection deleted the blob: nothing of it is installed or recorded here."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"{digest}: deleted by garbage collection")


@dataclass
class Counters:
    """What this process moved across regions (Prometheus counters)."""

    bytes_in: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    range_bytes_in: int = 0  # bytes of Range reads passed through from other regions
    spliced_bytes: int = 0  # bytes of whole copies taken from Range reads, not fetched again
    ranges_done: int = 0
    ranges_failed: int = 0
    yield_seconds: float = 0.0  # background copies waited for foreground fetches, summed


class WanPriority:
    """The priority gate between foreground fetches and background copies (module doc).

    `foreground()` marks a fetch in flight; `background_turn()` returns once none is in flight
    and none ended within `LINGER` seconds, or after waiting `MAX_YIELD` seconds regardless —
    one waiting copy at a time, at most one every `MAX_YIELD` seconds (were all to go at once
    when their bounds end together, their pieces would take the link back in a burst).
    Waiting is event-driven: an Event set when the last foreground fetch ends, and bounded
    sleeps; every step is O(1) on the event loop."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.active = 0  # foreground fetches in flight
        self.waiting = 0  # background turns waiting now
        self._ended = -float("inf")  # loop time the last foreground fetch ended
        self._next_escape = -float("inf")  # loop time the next waiting copy may go regardless
        self._idle = asyncio.Event()  # set while no foreground fetch is in flight
        self._idle.set()

    @contextlib.asynccontextmanager
    async def foreground(self) -> AsyncIterator[None]:
        """A foreground fetch in flight for the block's duration (nested or concurrent ones
        count each: the gate opens after the last)."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._ended = asyncio.get_running_loop().time()
                self._idle.set()

    async def background_turn(self) -> None:
        """Return when the link is the background's: at once if no foreground fetch is in
        flight or ended within `LINGER`, else when that holds, but after `MAX_YIELD` at most."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        if self.active == 0 and start >= self._ended + LINGER:
            return
        deadline = start + MAX_YIELD
        self.waiting += 1
        try:
            while True:
                now = loop.time()
                if now >= deadline:
                    if now >= self._next_escape:  # this copy goes: the next one in MAX_YIELD
                        self._next_escape = now + MAX_YIELD
                        return
                    deadline = self._next_escape
                    continue
                if self.active:  # until the last foreground fetch ends (or the bound)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await self._idle.wait()
                    continue
                quiet = self._ended + LINGER
                if now >= quiet:
                    return
                # The linger: one bounded sleep, then check again (a fetch may have begun).
                await asyncio.sleep(min(quiet, deadline) - now)
        finally:
            self.waiting -= 1
            self.counters.yield_seconds += loop.time() - start


class Feed:
    """Bytes of an in-flight transfer for one subscriber, in order, from offset 0."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.detached = False
        self.closed = False

    def _push(self, chunk: bytes) -> None:
        if self.detached:
            return
        if len(self._chunks) >= _FEED_LIMIT:
            self.detached = True  # too slow: it will read the rest from the store
        else:
            self._chunks.append(chunk)
        self._wake.set()

    def _end(self, *, detach: bool = False) -> None:
        self.detached = self.detached or detach
        self.closed = True
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield self._chunks.popleft()
                continue
            if self.detached or self.closed:
                return
            self._wake.clear()
            await self._wake.wait()


@dataclass
class Transfer:
    digest: Digest
    size: int
    repository: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: TransferFailed | None = None
    received: int = 0
    source: str | None = None
    _feeds: list[Feed] = field(default_factory=list)
    _live: bool = True  # bytes flow from offset 0: subscribers may still join
    splicing: bool = False  # copied here in pieces now: Range reads' bytes are of use to it

    def subscribe(self) -> Feed | None:
        """A live feed, or None when bytes have already passed (read the store afterwards)."""
        if not self._live or self.received > 0 or self.done.is_set():
            return None
        feed = Feed()
        self._feeds.append(feed)
        return feed

    async def wait(self) -> None:
        """Until the copy is in this region's store; raises TransferFailed."""
        await self.done.wait()
        if self.error is not None:
            raise self.error

    def _publish(self, chunk: bytes) -> None:
        self.received += len(chunk)
        for feed in self._feeds:
            feed._push(chunk)

    def _detach_all(self) -> None:
        self._live = False
        for feed in self._feeds:
            feed._end(detach=True)

    def _finish(self, error: TransferFailed | None) -> None:
        self.error = error
        for feed in self._feeds:
            feed._end(detach=error is not None)
        self.done.set()


class Transfers:
    """This process's transfers into its region."""

    def __init__(
        self,
        region: str,
        regions: RegionMap,
        store: BlobStore,
        meta: GeoMeta,
        session: Callable[[], aiohttp.ClientSession],
        peer_token: Callable[[], str | None],
    ) -> None:
        self.region = region
        self.regions = regions
        self.store = store
        self.meta = meta
        self._session = session
        self.peer_token = peer_token
        self.owner = f"{region}/{uuid.uuid4().hex[:12]}"
        self.lease = LEASE_SECONDS
        self.counters = Counters()
        self._active: dict[str, Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ranges = asyncio.Semaphore(RANGE_PARALLEL)
        self.priority = WanPriority(self.counters)
        # Range reads' bytes of blobs whose whole copy runs here, by blob, by first byte.
        self._kept: dict[str, dict[int, bytes]] = {}
        self._kept_bytes = 0

    def get(self, repository: str, digest: Digest, size: int, job: Job | None = None) -> Transfer:
        """The transfer of `digest` into this region: joined if running, else started."""
        key = str(digest)
        running = self._active.get(key)
        if running is not None:
            return running
        transfer = Transfer(digest, size, repository)
        self._active[key] = transfer
        task = asyncio.create_task(self._run(transfer, job), name=f"transfer-{digest.hex[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return transfer

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- the work ----------------------------------------------------------------------------

    async def _run(self, t: Transfer, job: Job | None) -> None:
        error: TransferFailed | None = None
        try:
            await self._move(t, job)
            self.counters.transfers_done += 1
        except TransferFailed as e:
            error = e
            self.counters.transfers_failed += 1
        except asyncio.CancelledError:
            error = TransferFailed("the node is shutting down")
            raise
        except Exception as e:  # a bug: never leave waiters hanging
            log.exception("transfer of %s failed", t.digest)
            error = TransferFailed(f"internal error: {e}")
        finally:
            self._active.pop(str(t.digest), None)
            self._forget_kept(t.digest)
            t._finish(error)

    async def _move(self, t: Transfer, job: Job | None) -> None:
        digest = str(t.digest)
        deadline = time.monotonic() + _WAIT_LIMIT
        while job is None:
            if await self.store.stat(t.digest) is not None and await self._adopt(t, None):
                return
            current = await self.meta.run(self.meta.job, digest, self.region)
            if (
                current is not None
                and current.state == "running"
                and current.lease_owner == self.owner
            ):
                job = current  # this process's replication worker claimed it and joined us
                break
            if not _leased_elsewhere(current):  # a read first: waiting costs no write
                job = await self.meta.run(
                    self.meta.claim,
                    digest,
                    t.size,
                    t.repository,
                    self.region,
                    self.owner,
                    self.lease,
                )
                if job is not None:
                    break
            if time.monotonic() > deadline:
                raise TransferFailed(f"{digest}: waited too long for another node's transfer")
            t._live = False  # another node moves it; we read the store once it lands
            await asyncio.sleep(_WAIT_POLL)
        renewer = asyncio.create_task(self._renew(job))
        moved = 0
        try:
            # pushed or copied here meanwhile?
            if await self.store.stat(t.digest) is not None and await self._adopt(t, job):
                return
            small = t.size <= FOREGROUND_BLOB  # what a start waits for: foreground
            priority: AbstractAsyncContextManager[None] = (
                self.priority.foreground() if small else contextlib.nullcontext()
            )
            async with priority:
                moved, source = await self._fetch(t)
            await self._record(t, job, moved, source)
            t.source = source
            log.info("copied %s (%d bytes) from %s into %s", digest, t.size, source, self.region)
        except BlobDeleted as e:
            await self.meta.run(self.meta.drop_job_of_deleted_blob, job.id)
            log.info("not copying %s into %s: %s", digest, self.region, e)
            raise
        except TransferFailed as e:
            await self.meta.run(self.meta.fail, job.id, self.owner, str(e), t.received)
            log.warning("cannot copy %s into %s: %s", digest, self.region, e)
            raise
        except asyncio.CancelledError:
            await self.meta.run(self.meta.release, job.id, self.owner, t.received)
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _adopt(self, t: Transfer, job: Job | None) -> bool:
        """The store holds the blob already (pushed here, or another process copied it):
        record that copy and end the transfer (True). A pending deletion of those bytes is
        cancelled first, and only bytes still there after that count; False when they are
        gone by then (the transfer goes on). Raises BlobDeleted when GC deleted the blob."""
        digest = str(t.digest)
        if not await self.meta.run(self.meta.prepare_install, digest, self.region):
            raise BlobDeleted(digest)
        if await self.store.stat(t.digest) is None:
            return False  # a deletion removed them before it was cancelled
        t._detach_all()
        await self._record(t, job, 0, None)
        return True

    async def _record(self, t: Transfer, job: Job | None, moved: int, source: str | None) -> None:
        """Record this region's copy (and the job done); raises BlobDeleted when GC deleted
        the blob meanwhile (a deletion of the bytes just installed is queued instead)."""
        digest = str(t.digest)
        if job is not None and await self.meta.run(
            self.meta.finish, job.id, self.owner, moved, source
        ):
            return
        # No job, or it is gone (GC deletes a deleted blob's jobs), or so is the blob.
        if not await self.meta.run(self.meta.add_copy, digest, self.region, t.size):
            raise BlobDeleted(digest)

    def _before_install(self, t: Transfer) -> Callable[[int], Awaitable[None]]:
        """The store's hook between verifying a copy and installing it (see the module doc)."""

        async def prepare(size: int) -> None:
            if not await self.meta.run(self.meta.prepare_install, str(t.digest), self.region):
                raise BlobDeleted(str(t.digest))

        return prepare

    async def _renew(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            if not await self.meta.run(self.meta.renew, job.id, self.owner, self.lease):
                log.warning("lost the lease of replication job %d", job.id)
                return

    async def _fetch(self, t: Transfer) -> tuple[int, str]:
        """Copy the blob from the nearest region that has it; (bytes moved, source region)."""
        digest = str(t.digest)
        holders = await self.meta.run(self.meta.regions_of, digest)
        sources = self.regions.nearest(holders)
        if not sources and not await self.meta.read(self.meta.blob_exists, digest):
            raise BlobDeleted(digest)  # GC took its copies with it
        if not sources:
            raise TransferFailed(f"{digest}: no other region holds it (holders: {holders})")
        upload_id = uuid.uuid4().hex
        await self.store.create_upload(upload_id)
        tried: list[str] = []
        moved = 0
        try:
            for source in sources:
                try:
                    moved += await self._from(t, source, upload_id)
                    await self.store.commit(
                        upload_id, t.digest, before_install=self._before_install(t)
                    )
                    return moved, source
                except DigestMismatch as e:
                    tried.append(f"{source}: content does not match the digest ({e})")
                    self._forget_kept(t.digest)  # they may be what was wrong
                    t._detach_all()
                    await self.store.abort(upload_id)
                    upload_id = uuid.uuid4().hex
                    await self.store.create_upload(upload_id)
                except (aiohttp.ClientError, TimeoutError, RegistryClientError, _SourceError) as e:
                    tried.append(f"{source}: {e or type(e).__name__}")
                    t._detach_all()
                    log.warning("copy of %s from %s failed: %s", digest, source, e)
            raise TransferFailed(f"{digest}: every region failed: {'; '.join(tried)}")
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.abort(upload_id)
            raise

    async def _from(self, t: Transfer, source: str, upload_id: str) -> int:
        """Append the blob's bytes from `source` to the upload (continuing it); bytes moved."""
        try:
            offset = await self.store.upload_size(upload_id)
        except UploadUnknown:
            await self.store.create_upload(upload_id)
            offset = 0
        if offset >= t.size:
            return 0  # every byte is here already: the commit verifies them
        if t.size > FOREGROUND_BLOB:
            try:
                return await self._in_pieces(t, source, upload_id, offset)
            except _NoRanges:  # a source that ignores Range (an older node): one answer
                log.info("%s answers %s without ranges: copying it in one answer", source, t.digest)
                offset = await self.store.upload_size(upload_id)
                if offset >= t.size:
                    return 0
        token = self.peer_token()
        client = AsyncRegistryClient(
            self.regions.url_of(source),
            self._session(),
            password=token,
            username="skyreg-peer",
            token_flow=False,  # peers take Basic: the credential goes nowhere else
            headers={PEER_HEADER: self.region},
        )
        moved = 0
        async with client.blob(t.repository, str(t.digest), offset, t.size) as blob:
            if offset and blob.status == 200:  # no range support: start again
                await self.store.abort(upload_id)
                await self.store.create_upload(upload_id)
                offset = 0
                t._detach_all()
            elif blob.status not in (200, 206):
                raise _SourceError(f"HTTP {blob.status}")

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal moved
                async for chunk in blob.chunks():
                    moved += len(chunk)
                    self.counters.bytes_in += len(chunk)
                    t._publish(chunk)
                    yield chunk

            size = await self.store.append(upload_id, chunks(), offset)
        if size != t.size:
            raise _SourceError(f"got {size} of {t.size} bytes")
        return moved

    async def _in_pieces(self, t: Transfer, source: str, upload_id: str, offset: int) -> int:
        """A large blob's copy as Range requests of at most `PIECE` bytes, one at a time, each
        asked for only when the link is the background's (`WanPriority`): a paused copy leaves
        at most one piece on the way. What Range reads brought here meanwhile (`_kept`) is
        appended from memory instead of crossing the link again. Bytes moved."""
        moved = 0
        t.splicing = True

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal moved
            position = offset
            while position < t.size:
                kept = self._kept_at(t, position)
                if not kept:  # splicing uses no link; a piece waits for the background's turn
                    await self.priority.background_turn()
                    kept = self._kept_at(t, position)  # a Range read may have kept them meanwhile
                if kept:
                    self.counters.spliced_bytes += len(kept)
                    position += len(kept)
                    t._publish(kept)
                    yield kept
                    continue
                last = min(t.size, position + PIECE, self._next_kept(t, position)) - 1
                async with self._range_request(
                    t.repository, t.digest, source, position, last, piece=True
                ) as resp:
                    if resp.status == 200:
                        raise _NoRanges
                    _check_range(resp, position, last, t.size)
                    async for chunk in resp.content.iter_chunked(READ_SIZE):
                        chunk = chunk[: last + 1 - position]
                        position += len(chunk)
                        moved += len(chunk)
                        self.counters.bytes_in += len(chunk)
                        t._publish(chunk)
                        yield chunk
                if position <= last:
                    raise _SourceError(f"the answer ended at byte {position} of a piece")

        try:
            size = await self.store.append(upload_id, chunks(), offset)
        finally:
            t.splicing = False
        if size != t.size:
            raise _SourceError(f"got {size} of {t.size} bytes")
        return moved

    def _keep(self, digest: Digest, first: int, data: bytes) -> None:
        """Keep a Range read's bytes `first`... for the whole copy of `digest` running here, when
        it has not passed them yet (bounded by `MAX_KEPT` for the process)."""
        t = self._active.get(str(digest))
        if t is None or not t.splicing or first < t.received:
            return  # no copy here that will use them (a copy whose lease is elsewhere waits)
        pieces = self._kept.setdefault(str(digest), {})
        end = first + len(data)
        if any(at < end and first < at + len(kept) for at, kept in pieces.items()):
            return  # overlaps what is kept: kept pieces stay disjoint (no byte kept twice)
        if self._kept_bytes + len(data) > MAX_KEPT:
            return
        pieces[first] = data
        self._kept_bytes += len(data)

    def _kept_at(self, t: Transfer, position: int) -> bytes:
        """Kept bytes of `t`'s blob from `position` on (b"" when none starts at or covers it);
        what lies behind `position` is dropped."""
        pieces = self._kept.get(str(t.digest))
        if not pieces:
            return b""
        found = b""
        for first in sorted(pieces):
            data = pieces[first]
            if first + len(data) <= position:  # passed: no use any more
                self._kept_bytes -= len(pieces.pop(first))
            elif first <= position and not found:
                found = data[position - first :]
                self._kept_bytes -= len(pieces.pop(first))
        return found

    def _next_kept(self, t: Transfer, position: int) -> int:
        """Where the next kept bytes of `t`'s blob after `position` start (else the blob's end)."""
        after = [first for first in self._kept.get(str(t.digest), {}) if first > position]
        return min(after, default=t.size)

    def _forget_kept(self, digest: Digest) -> None:
        for data in self._kept.pop(str(digest), {}).values():
            self._kept_bytes -= len(data)

    # -- range reads ---------------------------------------------------------------------------

    async def holders(self, digest: Digest) -> list[str]:
        """The other regions holding a copy of `digest`, nearest first."""
        return self.regions.nearest(await self.meta.run(self.meta.regions_of, str(digest)))

    async def read_range(
        self, repository: str, digest: Digest, size: int, first: int, last: int, sources: list[str]
    ) -> AsyncGenerator[bytes, None]:
        """Bytes `first`..`last` of the blob (`size` bytes) from the first of `sources` that
        answers with exactly them, led by one empty chunk once a source did (the caller may
        send its headers then). A source failing before or during its answer is replaced by the
        next, asked for the bytes still missing. Raises TransferFailed when none supplied them
        all (a stream already begun is then cut by the caller)."""
        position = first
        tried: list[str] = []
        started = False
        # The bytes, for the whole copy of the blob running here (`_keep`): never twice.
        keep: bytearray | None = bytearray() if str(digest) in self._active else None
        # Foreground while waiting on the peer only: a client that stops taking the bytes
        # (the generator suspended at `yield`) does not hold background copies back.
        foreground = self.priority.foreground
        async with self._ranges:
            for source in sources:
                try:
                    async with contextlib.AsyncExitStack() as stack:
                        async with foreground():
                            resp = await stack.enter_async_context(
                                self._range_request(repository, digest, source, position, last)
                            )
                            _check_range(resp, position, last, size)
                        if not started:
                            started = True
                            yield b""
                        while True:
                            async with foreground():
                                chunk = await resp.content.read(READ_SIZE)
                            if not chunk:
                                break
                            chunk = chunk[: last + 1 - position]  # Content-Length bounds it too
                            if keep is not None and position == first + len(keep):
                                keep += chunk
                            position += len(chunk)
                            self.counters.range_bytes_in += len(chunk)
                            yield chunk
                    if position <= last:  # aiohttp holds a source to its Content-Length
                        raise _SourceError(f"the answer ended at byte {position} of {first}-{last}")
                except (aiohttp.ClientError, TimeoutError, _SourceError) as e:
                    tried.append(f"{source}: {e or type(e).__name__}")
                    log.warning(
                        "bytes %d-%d of %s from %s failed: %s", position, last, digest, source, e
                    )
                if position > last:  # every byte arrived (a failure after the last one is moot)
                    self.counters.ranges_done += 1
                    if keep is not None and len(keep) == last - first + 1:
                        self._keep(digest, first, bytes(keep))
                    return
            self.counters.ranges_failed += 1
            raise TransferFailed(
                f"{digest} bytes {first}-{last}: every region failed: {'; '.join(tried) or 'none'}"
            )

    @contextlib.asynccontextmanager
    async def _range_request(
        self,
        repository: str,
        digest: Digest,
        source: str,
        first: int,
        last: int,
        *,
        piece: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A peer's answer to GET `Range: bytes=first-last` of the blob: Basic credentials (the
        peer token, no token flow, as `_from`) and `PEER_HEADER`, so the source never chains;
        `piece`: a piece of a whole copy (`PIECE_HEADER` says so), not a Range read."""
        headers = {PEER_HEADER: self.region, "Range": f"bytes={first}-{last}"}
        if piece:
            headers[PIECE_HEADER] = "1"
        token = self.peer_token()
        if token:
            headers["Authorization"] = basic_authorization("skyreg-peer", token)
        url = self.regions.url_of(source) + blob_path(repository, str(digest))
        async with self._session().get(url, headers=headers, timeout=RANGE_TIMEOUT) as resp:
            yield resp


def _check_range(resp: aiohttp.ClientResponse, first: int, last: int, size: int) -> None:
    """Only a 206 of exactly bytes `first`..`last` of a blob of `size` bytes is passed on: a
    200 (the Range ignored), another range or another length is the source's error."""
    if resp.status != 206:
        raise _SourceError(f"HTTP {resp.status} to a Range request")
    expected = f"bytes {first}-{last}/{size}"
    got = resp.headers.get("Content-Range", "")
    if got.strip() != expected:
        raise _SourceError(f"Content-Range {got[:100]!r}, asked for {expected!r}")
    if resp.content_length != last - first + 1:
        raise _SourceError(f"Content-Length {resp.content_length} for {last - first + 1} bytes")


def _leased_elsewhere(job: Job | None) -> bool:
    """Another process holds a live lease on the job: it is moving the bytes."""
    return (
        job is not None
        and job.state == "running"
        and job.lease_until is not None
        and job.lease_until > datetime.now(UTC)
    )


class _SourceError(Exception):
    """A source region answered, but not with the blob."""


class _NoRanges(Exception):
    """A source answered a piece request with the whole blob (it does not serve ranges)."""
