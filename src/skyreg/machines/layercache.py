"""A host-wide, content-addressed cache of layer blobs and unpacked image trees.

Layout under the cache root (shared by every agent process on the host):

    blobs/<alg>/<hex>          verified blobs, read-only; visible only once complete
    rootfs/<hex>               one unpacked tree per image (manifest) digest, never modified
    locks/<hex>.lock           flock files serialising downloads across processes
    locks/rootfs-<hex>.lock    ... and unpacks (lock files are left in place, by design)

Single flight: inside a process concurrent requests for one digest share one asyncio task (the
callers await it shielded, so one caller giving up does not cancel the others); across processes
the work runs under an exclusive `flock` on the digest's lock file, taken in a worker thread, and
whoever gets the lock second finds the result in place. Results appear by atomic rename only, so
a crash leaves at most a `.<hex>.*` temporary: the next fetch of that digest resumes a blob's
part file (below) and removes any other.

Resumable downloads: blob `<hex>` is downloaded into `blobs/<alg>/.<hex>.part` (one writer at a
time, under the blob's flock), flushed batch by batch, so an agent killed mid-download leaves a
prefix of the blob there (a failed download keeps it too, unless its bytes did not verify).
The next fetch hashes that prefix (in a worker thread) and asks the opener for the rest only; a
source that cannot resume (`ResumeRefused`) makes it start over from byte 0. The digest of the
whole is checked before anything is published, as always: a part file with wrong bytes ends in
`BlobVerificationError` and is removed, so the next fetch starts at 0.

Machines never run in `rootfs/<hex>` itself: `clone_rootfs` gives each start a fresh copy.

Modes are set explicitly, whatever the umask: the root and every directory of the layout are
0700, blobs 0400, lock files 0600. The unpacked trees keep the image's own modes, setuid bits
included; they are safe only because no other host user can traverse the 0700 directories above
them (an older cache with looser modes is tightened when a `LayerCache` is created).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from skyreg.machines.unpack import UnpackLimits, unpack_layers
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.privatefs import private_dir

log = logging.getLogger(__name__)

Opener = Callable[[int], Awaitable[AsyncIterator[bytes]]]
"""Starts a download at a byte offset: returns an async iterator over the blob's bytes from
there on. For an offset above 0 a source that cannot start there raises `ResumeRefused` (when
called or before the first byte), and the download starts over at 0."""

_BATCH = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PART_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_T = TypeVar("_T")
# Threads that may block on another process's lock live apart from the default executor, so
# waiting for locks can never starve the I/O that lock holders in this process need.
_LOCK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="layercache-lock")


class BlobVerificationError(Exception):
    """Downloaded bytes do not match the expected digest or size; nothing was stored."""


class ResumeRefused(Exception):
    """Raised by an `Opener` asked for bytes from an offset above 0 that it cannot serve from
    there (say the registry ignored the Range and sent the whole blob): start over at 0."""


class CloneError(Exception):
    """A rootfs could not be copied."""


class LayerCache:
    """Verified blobs and unpacked image trees under `root`, safe to share between processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        private_dir(root)
        for sub in ("blobs", "rootfs", "locks"):
            # Only the top levels: what lies below is unreachable through them (no tree walk).
            private_dir(root / sub)
        self._blob_tasks: dict[str, asyncio.Task[Path]] = {}
        self._rootfs_tasks: dict[str, asyncio.Task[Path]] = {}

    def path(self, digest: str) -> Path:
        """Where the blob `digest` (`sha256:…` or `sha512:…`) lives once cached."""
        d = _parse(digest)
        return self.root / "blobs" / d.algorithm / d.hex

    def has(self, digest: str) -> bool:
        """Whether the blob `digest` is cached (and therefore verified)."""
        return self.path(digest).is_file()

    def rootfs_path(self, image_digest: str) -> Path:
        """Where the unpacked tree of the image `image_digest` lives once built."""
        return self.root / "rootfs" / _parse(image_digest).hex

    async def fetch(self, digest: str, size: int, opener: Opener) -> Path:
        """The path of the verified blob `digest`, downloading it with `opener` if missing.

        Raises `BlobVerificationError` (and stores nothing) if the bytes do not match.
        """
        d = _parse(digest)
        target = self.path(digest)
        if target.is_file():
            return target
        lock = self._lock_path(d.hex)
        task = _shared(
            self._blob_tasks, str(d), lambda: _fetch_locked(d, size, opener, target, lock)
        )
        return await asyncio.shield(task)

    async def rootfs_for(
        self,
        image_digest: str,
        layers: list[tuple[Path, str]],
        limits: UnpackLimits | None = None,
    ) -> Path:
        """The unpacked tree of `image_digest`, unpacking `layers` (path, media type) once.

        A layer breaking `limits` raises `UnpackLimitError`; no partial tree is kept.
        """
        d = _parse(image_digest)
        target = self.rootfs_path(image_digest)
        if target.is_dir():
            return target
        lock = self._lock_path(f"rootfs-{d.hex}")
        task = _shared(
            self._rootfs_tasks,
            str(d),
            lambda: _in_lock_thread(list(layers), target, lock, limits),
        )
        return await asyncio.shield(task)

    def _lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"


def clone_rootfs(src: Path, dst: Path) -> str:
    """Make `dst` (which must not exist) a fresh, writable copy of the tree `src`.

    Tries `cp -a --reflink=always` (copy-on-write: instant on btrfs/XFS), else a plain
    `cp -a` (hard links between files inside the tree are kept; nothing links to `src`).
    Returns `"reflink"` or `"copy"` to say which one worked.
    """
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} already exists")
    cp = shutil.which("cp")
    if cp is None:
        raise CloneError("`cp` (coreutils) is needed to clone a rootfs")
    dst.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for method, extra in (("reflink", ["--reflink=always"]), ("copy", [])):
        proc = subprocess.run(
            [cp, "-a", *extra, "--no-target-directory", "--", str(src), str(dst)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0:
            log.debug("cloned %s to %s by %s", src, dst, method)
            return method
        errors.append(proc.stderr.strip())
        if dst.exists() or dst.is_symlink():
            remove_tree(dst)
    raise CloneError(f"cannot copy {src} to {dst}: {errors[-1][:500]}")


def remove_tree(path: Path) -> None:
    """Remove a directory tree, even one holding read-only directories (when not root)."""
    if not path.is_symlink() and path.is_dir():
        with contextlib.suppress(OSError):
            path.chmod(0o700)
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    with contextlib.suppress(OSError):
                        os.chmod(sub, 0o700)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- single flight and locks -----------------------------------------------------------------


def _parse(digest: str) -> Digest:
    try:
        return Digest.parse(digest)
    except RegistryError as e:
        raise ValueError(f"invalid digest {digest[:200]!r}: {e}") from e


def _shared(
    tasks: dict[str, asyncio.Task[Path]],
    key: str,
    start: Callable[[], Coroutine[Any, Any, Path]],
) -> asyncio.Task[Path]:
    """The running task for `key`, or a new one made by `start`."""
    loop = asyncio.get_running_loop()
    task = tasks.get(key)
    if task is None or task.done() or task.get_loop() is not loop:
        task = loop.create_task(start())
        tasks[key] = task
        task.add_done_callback(lambda t: _task_done(tasks, key, t))
    return task


def _task_done(tasks: dict[str, asyncio.Task[Path]], key: str, task: asyncio.Task[Path]) -> None:
    if tasks.get(key) is task:
        del tasks[key]
    if not task.cancelled():
        task.exception()  # retrieved: callers that gave up must not cause a warning


def _lock_file(path: Path) -> int:
    """Open `path` and take an exclusive flock on it (blocking); returns the fd."""
    if not path.parent.is_dir():
        private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_acquired(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result())


@contextlib.asynccontextmanager
async def _async_lock(path: Path) -> AsyncIterator[None]:
    """Hold the flock on `path`, waiting for it in a worker thread."""
    fut = asyncio.get_running_loop().run_in_executor(_LOCK_THREADS, _lock_file, path)
    try:
        fd = await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_acquired)  # the thread may still get the lock: drop it
        raise
    try:
        yield
    finally:
        os.close(fd)  # the only fd of this open file: closing releases the lock


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = _lock_file(path)
    try:
        yield
    finally:
        os.close(fd)


def _remove_stale(directory: Path, prefix: str, keep: str | None = None) -> None:
    """Remove temporaries named `prefix…` left by a crashed process (caller holds the lock),
    except the one named `keep` (a download's part file, which the next download resumes)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if entry.name.startswith(prefix) and entry.name != keep:
                log.info("removing stale temporary %s", entry)
                remove_tree(entry)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- blobs -----------------------------------------------------------------------------------


async def _fetch_locked(d: Digest, size: int, opener: Opener, target: Path, lock: Path) -> Path:
    async with _async_lock(lock):
        if target.is_file():  # another process fetched it while we waited
            return target
        if not target.parent.is_dir():
            private_dir(target.parent)
        part = _part_path(d, target)
        _remove_stale(target.parent, f".{d.hex}.", keep=part.name)
        await _download(d, size, opener, target, part)
    return target


def _part_path(d: Digest, target: Path) -> Path:
    """The fixed name the download of `d` is written to, so that a later one can resume it."""
    return target.parent / f".{d.hex}.part"


async def _download(d: Digest, size: int, opener: Opener, target: Path, part: Path) -> None:
    """Stream into `part` (resuming what it holds), verify, fsync, rename it to `target`.

    Bytes that do not verify remove `part`; any other failure (a lost connection, a
    cancellation) keeps it, a valid prefix of the blob for the next download to resume.
    """
    offset, hasher = await asyncio.to_thread(_resume_point, part, d, size)
    if offset == 0:
        await asyncio.to_thread(_discard, part)
    try:
        with _open_part(part, offset) as out:
            if offset and offset == size:  # verified: killed between the last write and rename
                log.info("blob %s: the part file is complete, publishing it", d)
            else:
                if offset:
                    log.info("resuming blob %s at %d of %d bytes", d, offset, size)
                    try:
                        await _receive(await opener(offset), out, hasher, size - offset)
                    except ResumeRefused as e:
                        log.info("blob %s cannot be resumed (%s): starting over at 0", d, e)
                        await _write_to_end(_truncate, out)
                        offset, hasher = 0, d.hasher()
                if offset == 0:
                    await _receive(await opener(0), out, hasher, size)
            written = await _write_to_end(_position, out)
            if written != size:
                raise BlobVerificationError(f"{d}: got {written} bytes, expected {size}")
            if hasher.hexdigest() != d.hex:
                raise BlobVerificationError(f"{d}: content does not match the digest")
            await _write_to_end(_publish, out, part, target)
    except BlobVerificationError:
        part.unlink(missing_ok=True)
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            if part.stat().st_size == 0:  # nothing arrived: nothing worth keeping
                part.unlink()
        raise


def _resume_point(part: Path, d: Digest, size: int) -> tuple[int, hashlib._Hash]:
    """How many bytes of `part` to keep and their hash (worker thread: reads up to `size`).

    0 (start over) when there is no part file, or it is empty, not a regular file, longer
    than the blob, or as long as the blob but not matching its digest.
    """
    hasher = d.hasher()
    try:
        fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return 0, hasher
    except OSError as e:  # a symlink, say: not ours, discarded
        log.warning("discarding %s: %s", part, e)
        return 0, hasher
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not _own_file(info) or info.st_size == 0:
            return 0, hasher
        if info.st_size > size:
            log.warning("discarding %s: %d bytes, the blob has %d", part, info.st_size, size)
            return 0, hasher
        kept = 0
        while kept < info.st_size:
            chunk = f.read(min(_BATCH, info.st_size - kept))
            if not chunk:
                break
            hasher.update(chunk)
            kept += len(chunk)
    if kept == size and hasher.hexdigest() != d.hex:  # complete, and wrong: nothing to resume
        log.warning("discarding %s: its %d bytes do not match the digest", part, size)
        return 0, d.hasher()
    return kept, hasher


def _own_file(info: os.stat_result) -> bool:
    """A regular file of this process's user with one name: what a download may resume or
    write into (a hard link to any other file, or someone else's file, never is)."""
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_uid == os.geteuid()


def _discard(part: Path) -> None:
    """Remove whatever lies at `part` (a file, or a directory a crash could not have made)."""
    if part.exists() or part.is_symlink():
        remove_tree(part)


@contextlib.contextmanager
def _open_part(part: Path, offset: int) -> Iterator[BinaryIO]:
    """`part` opened for writing at `offset`, anything after it cut off (mode 0600)."""
    fd = os.open(part, _PART_FLAGS | (os.O_EXCL if offset == 0 else 0), 0o600)
    try:
        if not _own_file(os.fstat(fd)):  # a link planted since it was checked: not written to
            raise OSError(f"{part} is not this process's own file")
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        out = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    with out:
        yield out


def _truncate(out: BinaryIO) -> None:
    out.flush()
    out.seek(0)
    out.truncate(0)


def _position(out: BinaryIO) -> int:
    out.flush()
    return out.tell()


async def _write_to_end(func: Callable[..., _T], *args: Any) -> _T:
    """`func(*args)` in a worker thread that uses the part file. A cancelled caller still
    waits for the thread (unless cancelled again), so that the file is not closed under it and
    nothing writes to it once the flock is released and another process may resume it."""
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def _receive(
    stream: AsyncIterator[bytes], out: BinaryIO, hasher: hashlib._Hash, size: int
) -> int:
    """Hash and write `stream` in ~1 MiB batches in a worker thread, each flushed to the file
    (what a killed process leaves is a prefix of the blob); returns the byte count. More than
    `size` bytes is BlobVerificationError."""
    batch: list[bytes] = []
    pending = written = 0
    try:
        async for chunk in stream:
            written += len(chunk)
            if written > size:
                raise BlobVerificationError(f"more than the expected {size} bytes")
            batch.append(chunk)
            pending += len(chunk)
            if pending >= _BATCH:
                await _write_to_end(_write_batch, out, hasher, batch)
                batch, pending = [], 0
        if batch:
            await _write_to_end(_write_batch, out, hasher, batch)
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()
    return written


def _write_batch(out: BinaryIO, hasher: hashlib._Hash, batch: list[bytes]) -> None:
    for chunk in batch:
        hasher.update(chunk)
        out.write(chunk)
    out.flush()


def _publish(out: BinaryIO, tmp: Path, target: Path) -> None:
    out.flush()
    os.fsync(out.fileno())
    os.chmod(tmp, 0o400)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


# -- unpacked trees --------------------------------------------------------------------------


async def _in_lock_thread(
    layers: list[tuple[Path, str]], target: Path, lock: Path, limits: UnpackLimits | None
) -> Path:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _LOCK_THREADS, _build_rootfs_locked, layers, target, lock, limits
    )


def _build_rootfs_locked(
    layers: list[tuple[Path, str]], target: Path, lock: Path, limits: UnpackLimits | None
) -> Path:
    """Unpack under the cross-process lock unless another process already did (worker thread)."""
    with _locked(lock):
        if not target.is_dir():
            _build_rootfs(layers, target, limits)
    return target


def _build_rootfs(
    layers: list[tuple[Path, str]], target: Path, limits: UnpackLimits | None = None
) -> None:
    """Unpack into a temporary directory, flush it to disk, then rename it to `target`."""
    if not target.parent.is_dir():
        private_dir(target.parent)
    _remove_stale(target.parent, f".{target.name}.")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tmp.chmod(0o755)
        report = unpack_layers(layers, tmp, limits=limits)
        if report.rejected_count:
            log.warning("%s: %d unsafe entries skipped", target.name, report.rejected_count)
        _syncfs(tmp)
        tmp.rename(target)
        _fsync_dir(target.parent)
    except BaseException:
        remove_tree(tmp)
        raise


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` (syncfs(2); sync(2) where unavailable)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
