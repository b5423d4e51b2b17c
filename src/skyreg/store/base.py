"""The blob-store interface every backend implements.

A blob store holds verified, content-addressed bytes and in-progress uploads. It knows nothing
about repositories: which repository may see which blob is metadata (`skyreg.meta`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Protocol, TypeAlias

from skyreg.oci.digest import Digest


class UploadUnknown(Exception):
    """The upload id names no upload in this store."""


class UploadOffsetMismatch(Exception):
    """A chunk did not start where the upload ends."""

    def __init__(self, size: int) -> None:
        super().__init__(f"upload is {size} bytes long")
        self.size = size


class StorageFull(Exception):
    """The backend has no room left for the bytes (no space, or over a quota).

    Nothing of the failed write counts: an upload keeps exactly the bytes it held before and can
    resume once space is freed. Reads of stored blobs are unaffected.
    """


class StorageUnavailable(Exception):
    """The backend cannot be reached (down, restarting, or the network to it is cut).

    An upload holds the bytes its last acknowledged write left (or, when the backend failed
    after storing a write but before answering it, that write too: its size says which), and
    resumes from there once the backend is back. Stored blobs are untouched.
    """


class DigestMismatch(Exception):
    """The bytes written do not have the digest the client claimed."""

    def __init__(self, expected: Digest, actual: Digest) -> None:
        super().__init__(f"expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


BeforeInstall: TypeAlias = Callable[[int], Awaitable[None]]
"""Awaited with the verified size once the bytes match the digest, before they become the
blob (`put`, `commit`): the registry links the blob in its metadata there, so nothing can see
bytes installed that the metadata does not know (and garbage collection, which deletes bytes
only of blobs the metadata has dropped, never deletes bytes just acknowledged). If it raises,
nothing is installed and the exception propagates."""


class BlobStore(Protocol):
    """Content-addressed blob bytes plus resumable uploads."""

    async def stat(self, digest: Digest) -> int | None:
        """Size of the blob, or None when it is not stored."""
        ...

    def local_path(self, digest: Digest) -> Path | None:
        """A local file holding the blob, for zero-copy sends; None if the backend has none."""
        ...

    def read(
        self, digest: Digest, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """Stream the blob's bytes from `offset`, `length` bytes (to the end when None)."""
        ...

    async def redirect_url(self, digest: Digest) -> str | None:
        """A URL the client may fetch the blob from directly, or None."""
        ...

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob's bytes; False if there were none."""
        ...

    async def put(
        self,
        digest: Digest,
        chunks: AsyncIterable[bytes],
        *,
        before_install: BeforeInstall | None = None,
    ) -> int:
        """Write a whole blob, verifying `digest` as the bytes stream in; returns its size.

        On DigestMismatch nothing is stored and `before_install` is not called. Once the bytes
        match, `before_install(size)` is awaited before they become the blob; if it raises, the
        bytes written are discarded, nothing is installed and its exception propagates.
        """
        ...

    async def create_upload(self, upload_id: str) -> None:
        """Start an empty upload named `upload_id`."""
        ...

    async def upload_size(self, upload_id: str) -> int:
        """Bytes received so far; raises UploadUnknown."""
        ...

    async def append(self, upload_id: str, chunks: AsyncIterable[bytes], offset: int | None) -> int:
        """Append bytes at `offset` (None: at the end); returns the new size.

        Raises UploadOffsetMismatch when `offset` is not the current size.
        """
        ...

    async def commit(
        self, upload_id: str, digest: Digest, *, before_install: BeforeInstall | None = None
    ) -> int:
        """Verify the upload against `digest` and make it the blob; returns its size.

        On DigestMismatch the upload is discarded (`before_install` is not called). Once the
        bytes match, `before_install(size)` is awaited under the upload's lock before they
        become the blob; if it raises, nothing is installed, the upload stays as it was (the
        client may finish it again) and its exception propagates. The blob is visible only
        after this returns.
        """
        ...

    async def abort(self, upload_id: str) -> None:
        """Discard an upload and its bytes (no error if it is already gone)."""
        ...

    async def reclaim(self, upload_id: str) -> int | None:
        """Discard an upload unless a request of this process is using it, without waiting:
        the bytes freed, or None when it is busy (for the expiry worker and low-space reclaim,
        which a request holding an upload must not stall)."""
        ...

    async def idle_uploads(self, idle_since: datetime) -> list[str]:
        """Uploads whose bytes have not changed since `idle_since` (including orphans whose
        session record is gone, e.g. after a crash mid-request)."""
        ...

    async def check(self) -> None:
        """Fail, with the reason, unless the storage can be used (run once at start)."""
        ...

    async def aclose(self) -> None:
        """Release what this event loop holds (connections); call before the loop ends."""
        ...

    def close(self) -> None:
        """Release the store's threads; the last call, after `aclose`."""
        ...
