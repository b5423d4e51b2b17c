"""One behavioural suite that every blob-store backend must pass."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from skyreg.oci.digest import Digest
from skyreg.store import FilesystemBlobStore
from skyreg.store.base import BlobStore, DigestMismatch, UploadOffsetMismatch, UploadUnknown
from skyreg.store.s3 import S3BlobStore
from tests.s3_fixtures import S3Bucket


def s3_store(request: pytest.FixtureRequest, _root: Path) -> S3BlobStore:
    """An S3 store in the test's own bucket on the session's SeaweedFS (same bucket each call)."""
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    server = bucket.server
    return S3BlobStore(
        bucket.name,
        prefix="registry/v1",
        endpoint_url=server.endpoint,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )


# Each factory builds a store over the test's storage; called again, a fresh instance over the
# same storage (another process or node).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], BlobStore]] = {
    "filesystem": lambda _request, root: FilesystemBlobStore(root),
    "s3": s3_store,
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    backend = BACKENDS[request.param](request, tmp_path)
    yield backend
    backend.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def chunks(data: bytes, size: int = 7919) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(
    store: BlobStore, d: Digest, offset: int = 0, length: int | None = None
) -> bytes:
    return b"".join([c async for c in store.read(d, offset, length)])


def test_put_then_read_stat_and_ranges(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    d = digest(data)

    async def go() -> None:
        assert await store.stat(d) is None
        assert await store.put(d, chunks(data)) == len(data)
        assert await store.stat(d) == len(data)
        assert await read_all(store, d) == data
        assert await read_all(store, d, 1000, 5000) == data[1000:6000]
        assert await read_all(store, d, len(data) - 3) == data[-3:]

    run(go())


def test_put_with_wrong_digest_stores_nothing(store: BlobStore) -> None:
    data = b"payload"
    wrong = digest(b"other")

    async def go() -> None:
        with pytest.raises(DigestMismatch):
            await store.put(wrong, chunks(data))
        assert await store.stat(wrong) is None
        assert await store.stat(digest(data)) is None

    run(go())


def test_chunked_upload_appends_in_order_and_commits(store: BlobStore) -> None:
    data = os.urandom(2_500_000)
    d = digest(data)

    async def go() -> None:
        await store.create_upload("u1")
        assert await store.upload_size("u1") == 0
        assert await store.append("u1", chunks(data[:1_000_000]), 0) == 1_000_000
        with pytest.raises(UploadOffsetMismatch) as info:
            await store.append("u1", chunks(data[1_000_000:]), 999_999)
        assert info.value.size == 1_000_000
        assert await store.append("u1", chunks(data[1_000_000:]), None) == len(data)
        assert await store.stat(d) is None  # not visible before commit
        assert await store.commit("u1", d) == len(data)
        assert await read_all(store, d) == data
        with pytest.raises(UploadUnknown):
            await store.upload_size("u1")

    run(go())


def test_commit_with_wrong_digest_discards_upload(store: BlobStore) -> None:
    async def go() -> None:
        await store.create_upload("u2")
        await store.append("u2", chunks(b"abc"), 0)
        with pytest.raises(DigestMismatch):
            await store.commit("u2", digest(b"abd"))
        assert await store.stat(digest(b"abc")) is None
        with pytest.raises(UploadUnknown):
            await store.upload_size("u2")

    run(go())


def test_upload_resumes_in_a_new_store_instance(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A restarted process (a fresh store over the same storage) finishes an upload."""
    data = os.urandom(1_500_000)
    d = digest(data)
    backend = request.node.callspec.params["store"]

    async def go() -> None:
        await store.create_upload("u3")
        await store.append("u3", chunks(data[:700_000]), 0)
        again = BACKENDS[backend](request, tmp_path)
        assert await again.upload_size("u3") == 700_000
        await again.append("u3", chunks(data[700_000:]), 700_000)
        assert await again.commit("u3", d) == len(data)
        assert await read_all(again, d) == data

    run(go())


def test_sha512_digest_is_verified(store: BlobStore) -> None:
    data = b"sha512 content"
    d = Digest("sha512", hashlib.sha512(data).hexdigest())

    async def go() -> None:
        assert await store.put(d, chunks(data)) == len(data)
        assert await read_all(store, d) == data

    run(go())


def test_delete_and_abort(store: BlobStore) -> None:
    data = b"to delete"
    d = digest(data)

    async def go() -> None:
        await store.put(d, chunks(data))
        assert await store.delete(d) is True
        assert await store.delete(d) is False
        assert await store.stat(d) is None
        await store.create_upload("u4")
        await store.abort("u4")
        await store.abort("u4")
        with pytest.raises(UploadUnknown):
            await store.upload_size("u4")
        with pytest.raises(UploadUnknown):
            await store.upload_size("../../etc/passwd")

    run(go())


def test_same_blob_committed_twice_stays_readable(store: BlobStore) -> None:
    data = os.urandom(10_000)
    d = digest(data)

    async def go() -> None:
        await store.put(d, chunks(data))
        await store.put(d, chunks(data))
        assert await read_all(store, d) == data

    run(go())


def test_idle_uploads_lists_only_untouched_ones(store: BlobStore) -> None:
    from datetime import UTC, datetime, timedelta

    async def go() -> None:
        await store.create_upload("old")
        await store.create_upload("new")
        assert sorted(await store.idle_uploads(datetime.now(UTC) + timedelta(seconds=5))) == [
            "new",
            "old",
        ]
        assert await store.idle_uploads(datetime.now(UTC) - timedelta(hours=1)) == []

    run(go())


def test_resumed_upload_continues_saved_hash_without_rereading(tmp_path: Path) -> None:
    """A new process picks up the saved hash state: the bytes already written are not re-read
    (shown by altering them on disk: the saved state still describes the original bytes)."""
    from skyreg.store import resumable

    if not resumable.available():
        pytest.skip("OpenSSL libcrypto with SHA256_* not found")
    data = os.urandom(300_000)

    async def go() -> None:
        first = FilesystemBlobStore(tmp_path)
        await first.create_upload("u5")
        await first.append("u5", chunks(data[:200_000]), 0)
        first.close()
        upload = tmp_path / "uploads" / "u5"
        with open(upload, "r+b") as f:
            f.write(b"X")
        second = FilesystemBlobStore(tmp_path)
        await second.append("u5", chunks(data[200_000:]), 200_000)
        assert await second.commit("u5", digest(data)) == len(data)
        second.close()

    run(go())


def test_check_passes_on_usable_storage_and_aclose_then_close_release_it(
    store: BlobStore,
) -> None:
    async def check_then_release() -> None:
        await store.check()
        await store.aclose()

    run(check_then_release())  # the fixture closes it
