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
a crash leaves at most a `.<hex>.*` temporary, removed by the next fetch of that digest.

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
import subprocess
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from skyreg.machines.unpack import UnpackLimits, unpack_layers
from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError
from skyreg.privatefs import private_dir

log = logging.getLogger(__name__)

Opener = Callable[[], Awaitable[AsyncIterator[bytes]]]
"""Starts a download: returns an async iterator over the blob's bytes."""

_BATCH = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Threads that may block on another process's lock live apart from the default executor, so
# waiting for locks can never starve the I/O that lock holders in this process need.
_LOCK_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="layercache-lock")


class BlobVerificationError(Exception):
    """Downloaded bytes do not match the expected digest or size; nothing was stored."""


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


def _remove_stale(directory: Path, prefix: str) -> None:
    """Remove temporaries named `prefix…` left by a crashed process (caller holds the lock)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if entry.name.startswith(prefix):
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
        _remove_stale(target.parent, f".{d.hex}.")
        await _download(d, size, opener, target)
    return target


async def _download(d: Digest, size: int, opener: Opener, target: Path) -> None:
    """Stream into a temporary next to `target`, verify, fsync, rename; clean up on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{d.hex}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            hasher = d.hasher()
            written = await _receive(await opener(), out, hasher, size)
            if written != size:
                raise BlobVerificationError(f"{d}: got {written} bytes, expected {size}")
            if hasher.hexdigest() != d.hex:
                raise BlobVerificationError(f"{d}: content does not match the digest")
            await asyncio.to_thread(_publish, out, tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def _receive(
    stream: AsyncIterator[bytes], out: BinaryIO, hasher: hashlib._Hash, size: int
) -> int:
    """Hash and write `stream` in ~1 MiB batches in a worker thread; returns the byte count."""
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
                await asyncio.to_thread(_write_batch, out, hasher, batch)
                batch, pending = [], 0
        if batch:
            await asyncio.to_thread(_write_batch, out, hasher, batch)
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()
    return written


def _write_batch(out: BinaryIO, hasher: hashlib._Hash, batch: list[bytes]) -> None:
    for chunk in batch:
        hasher.update(chunk)
        out.write(chunk)


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
