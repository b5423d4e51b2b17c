"""The filesystem blob store: verified bytes renamed atomically into place, read with sendfile.

Layout under the root directory:
    blobs/<algorithm>/<first two hex>/<hex>    verified blobs, never modified
    uploads/<upload id>                        bytes of an upload in progress
    uploads/<upload id>.sha256                 its saved hash state (a cache for restarts)
    uploads/<upload id>.sha256.tmp             that state while it is being written

Every directory is 0700 and every file 0600, set explicitly whatever the umask: blobs are
tenants' private images. A root (the data dir) from an older version with looser modes is
tightened on start at its top levels only: walking millions of blobs would take too long, and
a 0700 root makes everything below it unreachable anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from skyreg.oci.digest import Digest
from skyreg.privatefs import private_dir
from skyreg.store import resumable
from skyreg.store.base import BeforeInstall, StorageFull, UploadUnknown
from skyreg.store.resumable import ResumableSha256
from skyreg.store.uploads import UPLOAD_ID_RE, VerifiedUploads, check_upload_id

_WRITE_BATCH = 1 << 20
_READ_CHUNK = 1 << 20
_FLUSH_EVERY = 32 << 20
_STATE_SUFFIX = ".sha256"
_TMP_SUFFIX = ".tmp"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# Running hashes kept between chunks; one dropped (its upload ended in another process, or too
# many are under way) only costs restoring it from the saved state.
_MAX_HASHES = 4096


def _create_private_file(path: Path, data: bytes = b"") -> None:
    """Create `path` (it must not exist) as a 0600 file holding `data`."""
    fd = os.open(path, _NEW_FILE, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


@contextlib.contextmanager
def _storage_full_on_enospc() -> Iterator[None]:
    """Raise a full disk (or quota) as StorageFull; every other OSError as it is."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL_ERRNOS:
            raise StorageFull(f"no space left for blob bytes: {e.strerror}") from e
        raise


class _UploadHash:
    """A running SHA-256 of an upload's first `offset` bytes."""

    __slots__ = ("hasher", "offset")

    def __init__(self, hasher: ResumableSha256 | Any = None, offset: int = 0) -> None:
        if hasher is None:
            hasher = ResumableSha256() if resumable.available() else hashlib.sha256()
        self.hasher = hasher
        self.offset = offset

    def encode(self) -> bytes | None:
        """`offset` and the hash state, or None when the hash cannot be saved."""
        if not isinstance(self.hasher, ResumableSha256):
            return None
        return self.offset.to_bytes(8, "big") + self.hasher.state()

    @classmethod
    def decode(cls, data: bytes) -> _UploadHash | None:
        if len(data) != 8 + resumable.STATE_SIZE or not resumable.available():
            return None
        try:
            hasher = ResumableSha256(data[8:])
        except ValueError:
            return None
        return cls(hasher, int.from_bytes(data[:8], "big"))


@dataclass(frozen=True)
class _OpenUpload:
    """An upload's file and its size when opened under the upload's lock."""

    path: Path
    size: int
    sealed: bool = False


class FilesystemBlobStore(VerifiedUploads[_OpenUpload]):
    """Blobs as files under one root directory."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        super().__init__()
        self.root = root
        self.blob_dir = root / "blobs"
        self.upload_dir = root / "uploads"
        for directory in (root, self.blob_dir, self.upload_dir):
            private_dir(directory)
        self._fsync = fsync
        self._hashes: dict[str, _UploadHash] = {}  # insertion-ordered: oldest first
        # One writer thread per concurrent upload would be wasteful; hashing and writing release
        # the GIL, so a small pool overlaps them with the event loop reading the socket.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="blobwrite")

    # -- paths -------------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> Path:
        return self.blob_dir / digest.algorithm / digest.hex[:2] / digest.hex

    def _upload_path(self, upload_id: str) -> Path:
        return self.upload_dir / check_upload_id(upload_id)

    @staticmethod
    def _state_path(path: Path) -> Path:
        """Where an upload's saved hash state lives (beside its bytes)."""
        return path.with_name(path.name + _STATE_SUFFIX)

    @classmethod
    def _upload_files(cls, path: Path) -> tuple[Path, ...]:
        """Every file an upload can leave: its bytes, its hash state, a half-written state."""
        state = cls._state_path(path)
        return path, state, state.with_name(state.name + _TMP_SUFFIX)

    # -- blobs -------------------------------------------------------------------------------

    async def stat(self, digest: Digest) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def local_path(self, digest: Digest) -> Path | None:
        return self._blob_path(digest)

    async def read(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        with open(self._blob_path(digest), "rb") as f:
            f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                want = _READ_CHUNK if remaining is None else min(_READ_CHUNK, remaining)
                chunk = await loop.run_in_executor(self._executor, f.read, want)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    async def redirect_url(self, digest: Digest) -> str | None:
        return None

    async def delete(self, digest: Digest) -> bool:
        def unlink() -> bool:
            try:
                self._blob_path(digest).unlink()
            except FileNotFoundError:
                return False
            return True

        # Unlinking a large file takes long enough to stall every other request on the loop.
        return await asyncio.get_running_loop().run_in_executor(self._executor, unlink)

    async def put(
        self,
        digest: Digest,
        chunks: AsyncIterable[bytes],
        *,
        before_install: BeforeInstall | None = None,
    ) -> int:
        """An upload of its own, committed with `before_install`; whatever fails (the stream,
        the digest, the hook), its bytes are removed."""
        upload_id = f"put-{uuid.uuid4().hex}"
        await self.create_upload(upload_id)
        try:
            await self.append(upload_id, chunks, 0)
            return await self.commit(upload_id, digest, before_install=before_install)
        finally:
            await self.abort(upload_id)

    # -- uploads -----------------------------------------------------------------------------

    async def create_upload(self, upload_id: str) -> None:
        path = self._upload_path(upload_id)
        with _storage_full_on_enospc():
            _create_private_file(path)
        self._keep_hash(upload_id, _UploadHash())

    def _keep_hash(self, upload_id: str, running: _UploadHash) -> None:
        self._hashes.pop(upload_id, None)
        self._hashes[upload_id] = running
        while len(self._hashes) > _MAX_HASHES:
            self._hashes.pop(next(iter(self._hashes)))

    async def upload_size(self, upload_id: str) -> int:
        try:
            return self._upload_path(upload_id).stat().st_size
        except FileNotFoundError:
            raise UploadUnknown(upload_id) from None

    async def _open_upload(self, upload_id: str) -> _OpenUpload:
        path = self._upload_path(upload_id)
        try:
            return _OpenUpload(path, path.stat().st_size)
        except FileNotFoundError:
            raise UploadUnknown(upload_id) from None

    async def _write_upload(
        self, upload_id: str, upload: _OpenUpload, chunks: AsyncIterable[bytes]
    ) -> int:
        try:
            fd = os.open(upload.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            raise UploadUnknown(upload_id) from None
        try:
            running = await self._running_hash(upload_id, upload.path, os.fstat(fd).st_size)
            try:
                with _storage_full_on_enospc():
                    await self._pump(fd, running, chunks)
            finally:
                # Whatever reached the file stays: the client may resume from there.
                if running.offset == os.fstat(fd).st_size:
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._save_state, upload.path, running
                    )
                else:
                    self._hashes.pop(upload_id, None)
            return running.offset
        finally:
            os.close(fd)

    async def _running_hash(self, upload_id: str, path: Path, size: int) -> _UploadHash:
        """The hash of the upload's current bytes: kept in memory from the last chunk, else
        restored from the state saved beside the upload, else (state missing or stale after a
        crash) recomputed from the bytes."""
        running = self._hashes.get(upload_id)
        if running is not None and running.offset == size:
            return running
        loop = asyncio.get_running_loop()

        def restore() -> _UploadHash:
            try:
                saved = _UploadHash.decode(self._state_path(path).read_bytes())
            except FileNotFoundError:
                saved = None
            if saved is not None and saved.offset == size:
                return saved
            fresh = _UploadHash()
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    fresh.hasher.update(chunk)
                    fresh.offset += len(chunk)
            return fresh

        running = await loop.run_in_executor(self._executor, restore)
        self._keep_hash(upload_id, running)
        return running

    def _save_state(self, path: Path, running: _UploadHash) -> None:
        """Save the hash state beside the upload, if possible.

        The state only spares a restart rehashing the bytes, so failing to save it (a full disk)
        fails nothing: an older state stays behind but is never used, as its offset is not the
        upload's size.
        """
        encoded = running.encode()
        if encoded is None:
            return
        _, state, tmp = self._upload_files(path)
        try:
            tmp.unlink(missing_ok=True)  # left by a crash: recreated with our mode
            _create_private_file(tmp, encoded)
            os.replace(tmp, state)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    async def _pump(self, fd: int, running: _UploadHash, chunks: AsyncIterable[bytes]) -> None:
        """Write and hash `chunks`, one batch in a worker thread while the next one arrives.

        With fsync on, written ranges are flushed to disk in the background as the upload goes,
        so the fsync before the final rename has only the tail left to wait for.
        """
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[None] | None = None
        flushing: asyncio.Future[None] | None = None
        flushed_at = running.offset

        def write(data: bytearray) -> None:
            # Hash exactly what reached the file, even when a write fails part way (a full
            # disk): the running hash must always be the hash of the upload's bytes.
            done = 0
            try:
                with memoryview(data) as view:
                    while done < len(data):
                        done += os.write(fd, view[done:])
            finally:
                running.hasher.update(data if done == len(data) else data[:done])
                running.offset += done

        buf = bytearray()
        try:
            async for chunk in chunks:
                buf += chunk
                if len(buf) >= _WRITE_BATCH:
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(self._executor, write, buf)
                    buf = bytearray()
                    if (
                        self._fsync
                        and running.offset - flushed_at >= _FLUSH_EVERY
                        and (flushing is None or flushing.done())
                    ):
                        flushed_at = running.offset
                        flushing = loop.run_in_executor(self._executor, os.fdatasync, fd)
        finally:
            if pending is not None:
                await pending
            if flushing is not None:
                await flushing
        if buf:
            await loop.run_in_executor(self._executor, write, buf)

    async def _upload_digest(self, upload_id: str, upload: _OpenUpload, algorithm: str) -> Digest:
        if algorithm == "sha256":
            running = await self._running_hash(upload_id, upload.path, upload.size)
            return Digest("sha256", running.hasher.hexdigest())
        return await self._hash_file(upload.path, algorithm)

    async def _install_upload(self, upload_id: str, upload: _OpenUpload, digest: Digest) -> None:
        loop = asyncio.get_running_loop()
        with _storage_full_on_enospc():
            await loop.run_in_executor(
                self._executor, self._install, upload.path, self._blob_path(digest)
            )
        self._hashes.pop(upload_id, None)

    def _install(self, path: Path, target: Path) -> None:
        """fsync the verified bytes, then rename them into place (atomic on one filesystem)."""
        self._state_path(path).unlink(missing_ok=True)
        if target.exists():
            path.unlink()
            return
        if self._fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if not target.parent.is_dir():
            private_dir(target.parent)
        os.replace(path, target)
        if self._fsync:
            dfd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    async def _hash_file(self, path: Path, algorithm: str) -> Digest:
        loop = asyncio.get_running_loop()

        def run() -> Digest:
            h = hashlib.new(algorithm)
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    h.update(chunk)
            return Digest(algorithm, h.hexdigest())

        return await loop.run_in_executor(self._executor, run)

    async def _upload_footprint(self, upload_id: str) -> int:
        path = self._upload_path(upload_id)

        def sizes() -> int:
            total = 0
            for file in self._upload_files(path):
                with contextlib.suppress(FileNotFoundError):
                    total += file.stat().st_size
            return total

        return await asyncio.get_running_loop().run_in_executor(self._executor, sizes)

    async def _discard_upload(self, upload_id: str, upload: _OpenUpload | None) -> None:
        path = self._upload_path(upload_id)
        self._hashes.pop(upload_id, None)

        def unlink() -> None:
            for file in reversed(self._upload_files(path)):  # the bytes last: they mark the upload
                file.unlink(missing_ok=True)

        await asyncio.get_running_loop().run_in_executor(self._executor, unlink)

    async def idle_uploads(self, idle_since: datetime) -> list[str]:
        cutoff = idle_since.timestamp()

        def scan() -> list[str]:
            newest: dict[str, float] = {}  # an upload is its bytes plus its saved hash state
            with os.scandir(self.upload_dir) as entries:
                for entry in entries:
                    upload_id = entry.name.split(".", 1)[0]
                    if UPLOAD_ID_RE.match(upload_id) is None:
                        continue  # not an upload's file: abort() could not remove it anyway
                    with contextlib.suppress(FileNotFoundError):
                        mtime = entry.stat().st_mtime
                        newest[upload_id] = max(mtime, newest.get(upload_id, mtime))
            return sorted(u for u, mtime in newest.items() if mtime < cutoff)

        return await asyncio.get_running_loop().run_in_executor(self._executor, scan)

    async def check(self) -> None:
        """Fail unless the blob and upload directories are writable by this process."""
        for directory in (self.blob_dir, self.upload_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is not writable by this process")

    async def aclose(self) -> None:
        """Nothing is bound to the event loop."""

    def close(self) -> None:
        """Stop the writer threads."""
        self._executor.shutdown(wait=False)
