"""The lazy mount helper: `python -m skyreg.machines.lazymount`, one process per image (pyfuse3
serves one filesystem per process), started by the agent (`machines/lazystart.py`).

It reads one line of JSON on stdin (`MountSpec`: the mountpoint, the registry, the repository
and the credentials to read it with, and per layer its digest, its index document, its gzip seek
points and where the layer cache keeps the whole blob once it has landed), merges the image's
tree from the indexes (`lazy/tree.py`), mounts it read-only (`machines/lazyfs.py`), prints
`ready` on stdout (`error: <why>` when it cannot) and serves until SIGTERM, SIGINT or the end
of stdin (the agent closing its end, or dying), then unmounts. Credentials come through stdin
only, never argv or the environment.

A layer's bytes are read from its blob in the layer cache as soon as that is there (the agent
pulls the whole image meanwhile: reads switch to local bytes as layers land), else by HTTP Range
requests to the registry, each with bounded timeouts and retried (`ATTEMPTS`). Every chunk is
checked against the index before it is served (`LayerReader`); a corrupt one is fetched once
more by `lazyfs`, then EIO, never served.

Learned prefetch (`lazy/prefetch.py`): the spec may carry the image's prefetch list (what an
earlier start of it read first). Before mounting, the helper reads those chunks, `PREFETCH_THREADS`
at a time, through verified readers, into its spool (`spool`, a private directory of the
agent's: each chunk a file, checked again against the index whenever it is read), and logs how
many it got; a chunk it could not get is left to the machine's own read. From `ready` it records
the chunks the machine reads for `record` seconds and then prints them on stdout as one line,
`prefetch <JSON list of ranges>`, for the agent to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from types import FrameType

import aiohttp
import msgspec

from skyreg.client.protocol import basic_authorization, blob_path, content_range_start
from skyreg.lazy.index import LayerIndex, LayerIndexError, decode_index
from skyreg.lazy.prefetch import LayerGeometry, PrefetchRange, Recorder, plan
from skyreg.lazy.reader import CorruptChunk, FileSource, LayerReader
from skyreg.lazy.tree import MergeError, merge
from skyreg.oci.layerlimits import UnpackLimits

log = logging.getLogger("skyreg.lazymount")

READY = b"ready\n"
PREFETCH_LINE = b"prefetch "  # then the JSON list of ranges the machine read first
PREFETCH_THREADS = 8  # chunk reads of a prefetch at once
PREFETCH_TASK_CHUNKS = 64  # chunks one prefetch task reads (one range request)
PREFETCH_GAP = 4  # chunks between two listed ones that one task reads along
PREFETCH_TIMEOUT = 60.0  # seconds of prefetching before the mount goes ahead without the rest
MAX_SPEC = 16 << 20  # bytes of the JSON line on stdin
ATTEMPTS = 3  # tries of one Range request
BACKOFF = 0.25  # seconds before the second try, doubled after
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0  # seconds without a byte from the registry
REQUEST_TIMEOUT = 120.0  # seconds for one Range request, whatever its progress


class LayerSpec(msgspec.Struct, forbid_unknown_fields=True):
    digest: str  # of the layer blob
    size: int  # of the layer blob (the manifest's)
    index: str  # path of its index document (verified by the agent)
    blob: str  # where the layer cache keeps the whole blob once it has landed
    points: str | None = None  # path of its gzip seek points


class MountSpec(msgspec.Struct, forbid_unknown_fields=True):
    mountpoint: str
    registry: str  # base URL
    repository: str
    layers: list[LayerSpec]
    username: str = "x"
    password: str | None = None
    limits: UnpackLimits | None = None  # the agent's (None: the defaults)
    prefetch: list[PrefetchRange] = msgspec.field(default_factory=list)  # read before `ready`
    spool: str | None = None  # a private directory for prefetched chunks (None: no prefetch)
    record: float = 0.0  # seconds after `ready` whose reads are reported (0: none)


class RangeError(OSError):
    """The registry did not give the bytes asked for."""


class RegistryRanges:
    """Range GETs of blobs to one registry, from any thread, on an event loop of its own."""

    def __init__(self, spec: MountSpec) -> None:
        self._base = spec.registry.rstrip("/")
        self._repository = spec.repository
        self._headers = {}
        if spec.password:
            self._headers["Authorization"] = basic_authorization(spec.username, spec.password)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ranges", daemon=True)
        self._thread.start()
        self._session = asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(
            total=REQUEST_TIMEOUT, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
        )
        return aiohttp.ClientSession(timeout=timeout)

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """`length` bytes of blob `digest` from `offset` (fewer only at its end)."""
        job = asyncio.run_coroutine_threadsafe(self._read(digest, offset, length), self._loop)
        return job.result(timeout=ATTEMPTS * (REQUEST_TIMEOUT + 10))

    async def _read(self, digest: str, offset: int, length: int) -> bytes:
        delay = BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._get(digest, offset, length)
            except (aiohttp.ClientError, TimeoutError, RangeError) as e:
                if attempt == ATTEMPTS:
                    raise RangeError(f"blob {digest} bytes {offset}+{length}: {e}") from e
                log.warning("blob %s bytes %d+%d, try %d: %s", digest, offset, length, attempt, e)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def _get(self, digest: str, offset: int, length: int) -> bytes:
        headers = {**self._headers, "Range": f"bytes={offset}-{offset + length - 1}"}
        url = self._base + blob_path(self._repository, digest)
        # A redirect to storage keeps the Range; aiohttp drops Authorization for another origin.
        async with self._session.get(url, headers=headers) as resp:
            if resp.status == 206:
                start = content_range_start(resp.headers.get("Content-Range", ""))
                if start != offset:
                    raise RangeError(f"asked for bytes from {offset}, got a range from {start}")
                return await _read_up_to(resp, length)
            if resp.status == 200:  # the Range was ignored: skip to it, bounded
                data = await _read_up_to(resp, offset + length)
                return data[offset:]
            raise RangeError(f"HTTP {resp.status} {resp.reason or ''}".strip())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    while len(body) < limit:
        chunk = await resp.content.read(min(limit - len(body), 1 << 20))
        if not chunk:
            break
        body += chunk
    return bytes(body)


class LayerSource:
    """A layer blob by byte range: the layer cache's copy once it is there, else the registry."""

    def __init__(self, digest: str, blob: Path, ranges: RegistryRanges) -> None:
        self._digest = digest
        self._blob = blob
        self._ranges = ranges
        self._local: FileSource | None = None
        self._lock = threading.Lock()
        self.remote_bytes = 0

    def _local_copy(self) -> FileSource | None:
        with self._lock:
            # The cache publishes a blob by rename once verified: present means complete.
            if self._local is None and self._blob.is_file():
                self._local = FileSource(str(self._blob))
                log.info("layer %s: reading the local copy now", self._digest)
            return self._local

    def read_range(self, offset: int, length: int) -> bytes:
        local = self._local_copy()
        if local is not None:
            return local.read_range(offset, length)
        data = self._ranges.read(self._digest, offset, length)
        self.remote_bytes += len(data)
        return data

    def close(self) -> None:
        if self._local is not None:
            self._local.close()


class SpooledReader(LayerReader):
    """A `LayerReader` that serves the chunks prefetched into `spool` (each checked against the
    index again as it is read: a bad one is dropped and read as if never prefetched)."""

    def __init__(
        self,
        index: LayerIndex,
        source: LayerSource,
        points: bytes | None,
        spool: Path | None,
        position: int,
    ) -> None:
        super().__init__(index, source, points)
        self.layer_source = source
        self.points = points
        self._spool = spool
        self._position = position
        self._spooled: set[int] = set()
        self._spool_lock = threading.Lock()

    def _path(self, number: int) -> Path:
        assert self._spool is not None
        return self._spool / f"{self._position}-{number}"

    def chunk(self, number: int, until: int | None = None) -> bytes:
        with self._spool_lock:
            spooled = number in self._spooled
        if spooled:
            path = self._path(number)
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("layer %s chunk %d: spool unreadable: %s", self.index.digest, number, e)
            else:
                if hashlib.sha256(data).hexdigest() == self.index.chunks[number]:
                    return data
                log.warning("layer %s chunk %d: spooled bytes corrupt", self.index.digest, number)
            with self._spool_lock:
                self._spooled.discard(number)
            path.unlink(missing_ok=True)
        return super().chunk(number, until)

    def prefetch(self, numbers: list[int]) -> int:
        """Read chunks `numbers` (verified, by a decoder of their own so machine reads are not
        held up) into the spool; the bytes it kept."""
        if self._spool is None:
            return 0
        reader = LayerReader(self.index, self.layer_source, self.points)
        kept = 0
        try:
            for number in numbers:
                with self._spool_lock:
                    if number in self._spooled:
                        continue
                until = (numbers[-1] + 1) * self.index.chunk_size  # the task's chunks: one range
                try:
                    data = reader.chunk(number, until)
                except CorruptChunk:
                    data = reader.chunk(number, until)  # once more, from a fresh decoder state
                path = self._path(number)
                partial = path.with_name(path.name + ".partial")
                partial.write_bytes(data)
                partial.rename(path)
                with self._spool_lock:
                    self._spooled.add(number)
                kept += len(data)
        finally:
            reader.close()
        return kept

    def spooled(self) -> set[int]:
        """The chunk numbers in the spool now."""
        with self._spool_lock:
            return set(self._spooled)


def prefetch(readers: list[SpooledReader], ranges: list[PrefetchRange]) -> tuple[int, int, int]:
    """Read the chunks of `ranges` into the readers' spools, `PREFETCH_THREADS` tasks at once,
    for at most `PREFETCH_TIMEOUT` seconds: (chunks asked for, chunks kept, bytes kept). A
    chunk that cannot be read is left for the machine's own read (logged, never fatal)."""
    geometry = [_geometry(r.index) for r in readers]
    tasks = _tasks(plan(ranges, geometry))
    wanted = sum(len(numbers) for _, numbers in tasks)
    if not tasks:
        return 0, 0, 0
    pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch")
    try:
        futures = [pool.submit(readers[layer].prefetch, numbers) for layer, numbers in tasks]
        done, pending = wait(futures, timeout=PREFETCH_TIMEOUT)
        if pending:
            log.warning("prefetch: %d tasks not done in %ss", len(pending), PREFETCH_TIMEOUT)
        kept_bytes = 0
        for future in done:
            error = future.exception()
            if error is None:
                kept_bytes += future.result()
            else:
                log.warning("prefetch: %s", error)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    kept = sum(len(r.spooled()) for r in readers)
    return wanted, kept, kept_bytes


def _tasks(planned: list[tuple[int, list[int]]]) -> list[tuple[int, list[int]]]:
    """The planned chunks as prefetch tasks: per layer, its chunks in stream order, cut into
    runs of neighbours (a gap of up to `PREFETCH_GAP` chunks is read along: decoding passes
    through it anyway) of at most `PREFETCH_TASK_CHUNKS` — each task one range request and one
    decode from one seek point, where the list's own order (a machine's reads as they came,
    interleaved) would decode the same span several times. Layers in the list's order."""
    by_layer: dict[int, set[int]] = {}
    for layer, numbers in planned:
        by_layer.setdefault(layer, set()).update(numbers)
    tasks: list[tuple[int, list[int]]] = []
    for layer, wanted in by_layer.items():
        run: list[int] = []
        for number in sorted(wanted):
            if run and (number - run[-1] > PREFETCH_GAP + 1 or len(run) >= PREFETCH_TASK_CHUNKS):
                tasks.append((layer, run))
                run = []
            run.append(number)
        if run:
            tasks.append((layer, run))
    return tasks


def _geometry(index: LayerIndex) -> LayerGeometry:
    return LayerGeometry(index.digest, index.chunk_size, index.uncompressed_size)


class _Stdout:
    """The helper's stdout, written from the main thread (`ready`) and the recorder's timer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def line(self, data: bytes) -> None:
        with self._lock:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()


def _report_later(recorder: Recorder, out: _Stdout) -> threading.Timer:
    """Print what the machine read once the recorder's window has closed."""

    def report() -> None:
        ranges = recorder.ranges()
        if not ranges:
            return
        with contextlib.suppress(OSError):  # the agent went away
            out.line(PREFETCH_LINE + msgspec.json.encode(ranges) + b"\n")
        log.info(
            "recorded %d ranges (%d bytes) read in the first %ss",
            len(ranges),
            sum(r.length for r in ranges),
            recorder.window,
        )

    timer = threading.Timer(recorder.window, report)
    timer.daemon = True
    return timer


class _Stop(Exception):
    """SIGTERM or SIGINT: unmount and exit."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(spec: MountSpec) -> None:
    """Merge, prefetch, mount, say `ready`, record, serve until stdin ends or a signal comes,
    unmount."""
    from skyreg.machines.lazyfs import mount  # pyfuse3: the agent imports this module without

    ranges = RegistryRanges(spec)
    sources: list[LayerSource] = []
    readers: list[SpooledReader] = []
    spool = None if spec.spool is None else Path(spec.spool)
    timer: threading.Timer | None = None
    try:
        for position, layer in enumerate(spec.layers):
            index = decode_index(Path(layer.index).read_bytes())
            if index.digest != layer.digest or index.compressed_size != layer.size:
                raise LayerIndexError(f"the index of layer {layer.digest} describes another blob")
            points = Path(layer.points).read_bytes() if layer.points else None
            source = LayerSource(layer.digest, Path(layer.blob), ranges)
            sources.append(source)
            readers.append(SpooledReader(index, source, points, spool, position))
        limits = spec.limits
        tree = merge([r.index for r in readers], limits)
        if spool is not None and spec.prefetch:
            began = time.monotonic()
            wanted, kept, kept_bytes = prefetch(readers, spec.prefetch)
            log.info(
                "prefetched %d of %d chunks (%d ranges listed, %d bytes) in %.2fs before ready",
                kept,
                wanted,
                len(spec.prefetch),
                kept_bytes,
                time.monotonic() - began,
            )
        recorder = None
        if spec.record > 0:
            recorder = Recorder([_geometry(r.index) for r in readers], spec.record)
        out = _Stdout()
        # No signal between the kernel mount and holding its handle: it would be left behind.
        blocked = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        handle = mount(tree, list(readers), Path(spec.mountpoint), recorder=recorder)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            if recorder is not None:
                recorder.start()
                timer = _report_later(recorder, out)
                timer.start()
            out.line(READY)
            log.info(
                "%s mounted at %s (%d layers, %d nodes)",
                spec.repository,
                spec.mountpoint,
                len(readers),
                len(tree.nodes),
            )
            while os.read(0, 4096):  # until the agent closes stdin (or dies)
                pass
        except _Stop as e:
            log.info("%s: unmounting", e)
        finally:
            for sig in blocked:  # the unmount is not cut short (the agent SIGKILLs if it hangs)
                signal.signal(sig, signal.SIG_IGN)
            handle.unmount()
        log.info("unmounted %s (%d bytes by Range)", spec.mountpoint, _remote(sources))
    finally:
        if timer is not None:
            timer.cancel()
        for reader in readers:
            reader.close()
        for source in sources:
            source.close()
        ranges.close()


def _remote(sources: list[LayerSource]) -> int:
    return sum(s.remote_bytes for s in sources)


def main() -> int:
    """Run the helper (see the module docstring); 0 after a clean unmount, 2 when it cannot
    mount (the reason on stderr)."""
    from skyreg.machines.lazyfs import LazyFSError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        line = sys.stdin.buffer.readline(MAX_SPEC)
        spec = msgspec.json.decode(line, type=MountSpec)
        serve(spec)
    except _Stop:
        return 0
    except (msgspec.DecodeError, LayerIndexError, MergeError, LazyFSError, OSError) as e:
        log.error("cannot mount: %s", e)
        # The agent reads this line in place of `ready`: its reason to pull the image whole.
        with contextlib.suppress(OSError):
            sys.stdout.buffer.write(f"error: {e}".replace("\n", " ")[:1000].encode() + b"\n")
            sys.stdout.buffer.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
