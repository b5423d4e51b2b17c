"""What every backend's uploads share, written once above the storage: per-upload locking, the
offset check and verify-then-commit (as Distribution does above its storage drivers).

A backend inherits `VerifiedUploads` and implements only storage work: open an upload (its
size), write bytes at its end, compute the digest of what it holds, install verified bytes as
the blob, discard an upload. The public `append`, `commit`, `abort` and `reclaim` are final
here, so no backend can skip the lock or the digest comparison (nor the `before_install` hook a
commit awaits between that comparison and the install: `skyreg.store.base.BeforeInstall`).
"""

from __future__ import annotations

import abc
import contextlib
import re
from asyncio import Lock
from collections.abc import AsyncIterable, AsyncIterator
from typing import Generic, Protocol, TypeVar, final

from skyreg.oci.digest import Digest
from skyreg.store.base import (
    BeforeInstall,
    DigestMismatch,
    UploadOffsetMismatch,
    UploadUnknown,
)

UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}\Z")


def check_upload_id(upload_id: str) -> str:
    """`upload_id` if an upload can have it (a key or file name, never a path); else
    UploadUnknown."""
    if UPLOAD_ID_RE.match(upload_id) is None:
        raise UploadUnknown(upload_id)
    return upload_id


def verify(expected: Digest, actual: Digest) -> None:
    """Raise DigestMismatch unless the bytes' digest is the one the client named."""
    if actual != expected:
        raise DigestMismatch(expected, actual)


class OpenUpload(Protocol):
    """A backend's view of one upload, read under its lock."""

    @property
    def size(self) -> int:
        """Bytes the upload holds."""
        ...

    @property
    def sealed(self) -> bool:
        """True once a commit began assembling the bytes: no more may be appended."""
        ...


_U = TypeVar("_U", bound=OpenUpload)


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = Lock()
        self.users = 0  # requests holding or waiting for the lock


class UploadLocks:
    """One lock per upload id, kept only while a request of this process holds or awaits it.

    The table is as large as the requests under way, whatever ids clients send: an id that
    never existed leaves nothing behind, and an upload's entry goes when its last request ends.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @contextlib.asynccontextmanager
    async def hold(self, upload_id: str) -> AsyncIterator[None]:
        """Hold `upload_id`'s lock for the body of the `async with`."""
        entry = self._entries.get(upload_id)
        if entry is None:
            entry = self._entries[upload_id] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[upload_id]

    def requests(self, upload_id: str) -> int:
        """Requests holding or waiting for `upload_id`'s lock."""
        entry = self._entries.get(upload_id)
        return 0 if entry is None else entry.users

    def __len__(self) -> int:
        """Upload ids with a request under way."""
        return len(self._entries)


class VerifiedUploads(abc.ABC, Generic[_U]):
    """Resumable uploads over a backend's storage: locked, offset-checked, verified."""

    def __init__(self) -> None:
        self.upload_locks = UploadLocks()

    # -- what the backend provides ---------------------------------------------------------

    @abc.abstractmethod
    async def _open_upload(self, upload_id: str) -> _U:
        """The upload as stored; raises UploadUnknown when there is none."""

    @abc.abstractmethod
    async def _write_upload(self, upload_id: str, upload: _U, chunks: AsyncIterable[bytes]) -> int:
        """Append `chunks` at the upload's end (`upload.size`); its new size. Whatever reached
        the storage stays, even when the stream or a write fails part way."""

    @abc.abstractmethod
    async def _upload_digest(self, upload_id: str, upload: _U, algorithm: str) -> Digest:
        """The `algorithm` digest of the bytes the upload holds."""

    @abc.abstractmethod
    async def _install_upload(self, upload_id: str, upload: _U, digest: Digest) -> None:
        """Make the verified upload the blob `digest` (it may already exist), durably, then
        remove the upload."""

    @abc.abstractmethod
    async def _discard_upload(self, upload_id: str, upload: _U | None) -> None:
        """Remove whatever the upload left (`upload`: as opened, None when not read)."""

    async def _upload_footprint(self, upload_id: str) -> int:
        """Bytes the upload occupies, for `reclaim` (0 when unknown to the backend)."""
        return 0

    # -- the shared promises ---------------------------------------------------------------

    @final
    async def append(self, upload_id: str, chunks: AsyncIterable[bytes], offset: int | None) -> int:
        """Append bytes at `offset` (None: at the end); returns the new size.

        Raises UploadOffsetMismatch when `offset` is not the current size (or a commit has
        begun): a second request racing the first for the same offset waits for it, then gets
        the mismatch with the size the first left.
        """
        check_upload_id(upload_id)
        async with self.upload_locks.hold(upload_id):
            upload = await self._open_upload(upload_id)
            if upload.sealed or (offset is not None and offset != upload.size):
                raise UploadOffsetMismatch(upload.size)
            return await self._write_upload(upload_id, upload, chunks)

    @final
    async def commit(
        self, upload_id: str, digest: Digest, *, before_install: BeforeInstall | None = None
    ) -> int:
        """Verify the upload against `digest` and make it the blob; returns its size.

        On DigestMismatch the upload is discarded, nothing becomes visible and `before_install`
        is not called. Once the digest matches, `before_install(size)` is awaited, still under
        the upload's lock (no append, abort or reclaim of it runs meanwhile), before the bytes
        become the blob; if it raises, nothing is installed, the upload keeps its bytes (the
        client may finish it again) and the exception propagates. The blob is visible only
        after this returns.
        """
        check_upload_id(upload_id)
        async with self.upload_locks.hold(upload_id):
            upload = await self._open_upload(upload_id)
            actual = await self._upload_digest(upload_id, upload, digest.algorithm)
            try:
                verify(digest, actual)
            except DigestMismatch:
                await self._discard_upload(upload_id, upload)
                raise
            if before_install is not None:
                await before_install(upload.size)
            await self._install_upload(upload_id, upload, digest)
            return upload.size

    @final
    async def abort(self, upload_id: str) -> None:
        """Discard an upload and its bytes (no error if it is already gone), once any request
        using it has finished."""
        with contextlib.suppress(UploadUnknown):
            check_upload_id(upload_id)
            async with self.upload_locks.hold(upload_id):
                try:
                    upload: _U | None = await self._open_upload(upload_id)
                except UploadUnknown:
                    upload = None
                await self._discard_upload(upload_id, upload)

    @final
    async def reclaim(self, upload_id: str) -> int | None:
        """Remove an upload unless a request of this process is using it, never waiting for
        one (the expiry worker and low-space reclaim use it: a request trickling bytes into an
        upload must not stall them): the bytes freed (0 if there was no such upload), or None
        when it is busy."""
        try:
            check_upload_id(upload_id)
        except UploadUnknown:
            return 0
        if self.upload_locks.requests(upload_id):
            return None
        async with self.upload_locks.hold(upload_id):
            size = await self._upload_footprint(upload_id)
            try:
                upload: _U | None = await self._open_upload(upload_id)
            except UploadUnknown:
                upload = None
            await self._discard_upload(upload_id, upload)  # as opened: S3 aborts its multipart
        return size
