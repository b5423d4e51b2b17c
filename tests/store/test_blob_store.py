"""One behavioural suite that every blob-store backend must pass."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from skyreg.oci.digest import Digest
from skyreg.store import FilesystemBlobStore
from skyreg.store.base import BlobStore, DigestMismatch, UploadOffsetMismatch, UploadUnknown
from skyreg.store.s3 import S3BlobStore
from skyreg.store.uploads import UploadLocks, VerifiedUploads
from tests.support.s3 import S3Bucket


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


# -- the shared upload layer (store/uploads.py): locking, offsets, verify-then-commit ----------


def locks_of(store: BlobStore) -> UploadLocks:
    """The per-upload locks of a backend (every backend is built on the shared layer)."""
    assert isinstance(store, VerifiedUploads)
    return store.upload_locks


async def until_waiting(store: BlobStore, upload_id: str, requests: int) -> None:
    """Let other tasks run until `requests` requests hold or wait for the upload's lock
    (bounded in event-loop turns, not time)."""
    for _ in range(10_000):
        if locks_of(store).requests(upload_id) == requests:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{requests} requests never reached upload {upload_id}'s lock")


class PausedBody:
    """A request body that sends `head`, then waits for `release` before sending `rest`."""

    def __init__(self, head: bytes, rest: bytes) -> None:
        self.head, self.rest = head, rest
        self.paused, self.release = asyncio.Event(), asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        self.paused.set()
        await self.release.wait()
        yield self.rest


def test_concurrent_appends_to_one_upload_serialise_and_the_second_gets_the_offset_mismatch(
    store: BlobStore,
) -> None:
    head, rest = os.urandom(1_500_000), os.urandom(300_000)
    second_read: list[bytes] = []

    async def second_body() -> AsyncIterator[bytes]:
        second_read.append(b"started")
        yield b"y" * 1000

    async def go() -> None:
        await store.create_upload("race")
        body = PausedBody(head, rest)
        first = asyncio.create_task(store.append("race", body, 0))
        await body.paused.wait()
        second = asyncio.create_task(store.append("race", second_body(), 0))
        await until_waiting(store, "race", 2)
        body.release.set()
        assert await first == len(head) + len(rest)
        with pytest.raises(UploadOffsetMismatch) as info:
            await second
        assert info.value.size == len(head) + len(rest)
        assert second_read == []  # refused before reading a byte of its body
        assert await store.commit("race", digest(head + rest)) == len(head) + len(rest)
        assert await read_all(store, digest(head + rest)) == head + rest

    run(go())


def test_commit_with_wrong_digest_leaves_the_blob_absent_and_the_upload_discarded(
    store: BlobStore,
) -> None:
    data = os.urandom(200_000)
    wrong = digest(data + b"x")

    async def go() -> None:
        await store.create_upload("bad")
        await store.append("bad", chunks(data), 0)
        with pytest.raises(DigestMismatch) as info:
            await store.commit("bad", wrong)
        assert (info.value.expected, info.value.actual) == (wrong, digest(data))
        assert await store.stat(wrong) is None
        assert await store.stat(digest(data)) is None
        with pytest.raises(UploadUnknown):
            await store.upload_size("bad")
        with pytest.raises(UploadUnknown):
            await store.append("bad", chunks(data), len(data))
        await store.abort("bad")  # already gone: no error
        assert await store.idle_uploads(datetime.now(UTC) + timedelta(hours=1)) == []
        assert len(locks_of(store)) == 0

    run(go())


def test_upload_locks_do_not_outlive_their_requests(store: BlobStore) -> None:
    """Locks go when the upload ends (commit, abort, mismatch) and ids that never existed
    leave none: the table is bounded by the requests under way."""
    data = os.urandom(50_000)

    async def go() -> None:
        await store.create_upload("kept")
        await store.append("kept", chunks(data), 0)
        assert len(locks_of(store)) == 0  # between requests too
        await store.commit("kept", digest(data))
        await store.create_upload("dropped")
        await store.append("dropped", chunks(data), 0)
        await store.abort("dropped")
        await store.create_upload("wrong")
        with pytest.raises(DigestMismatch):
            await store.commit("wrong", digest(b"not empty"))
        for i in range(200):
            with pytest.raises(UploadUnknown):
                await store.append(f"never-{i}", chunks(b"x"), 0)
            with pytest.raises(UploadUnknown):
                await store.commit(f"never-{i}", digest(b"x"))
            await store.abort(f"never-{i}")
        with pytest.raises(UploadUnknown):
            await store.append("../" * 100, chunks(b"x"), None)
        assert len(locks_of(store)) == 0

    run(go())


def test_abort_during_an_append_waits_for_it_and_leaves_nothing(store: BlobStore) -> None:
    head, rest = os.urandom(1_500_000), os.urandom(1000)

    async def go() -> None:
        await store.create_upload("cut")
        body = PausedBody(head, rest)
        writing = asyncio.create_task(store.append("cut", body, 0))
        await body.paused.wait()
        aborting = asyncio.create_task(store.abort("cut"))
        await until_waiting(store, "cut", 2)
        assert not aborting.done()
        body.release.set()
        assert await writing == len(head) + len(rest)
        await aborting
        with pytest.raises(UploadUnknown):
            await store.upload_size("cut")
        assert await store.idle_uploads(datetime.now(UTC) + timedelta(hours=1)) == []
        assert len(locks_of(store)) == 0

    run(go())


def test_reclaim_skips_an_upload_in_use_and_removes_it_once_idle(store: BlobStore) -> None:
    head, rest = os.urandom(1_500_000), os.urandom(1000)
    assert isinstance(store, VerifiedUploads)
    layer = store

    async def go() -> None:
        await store.create_upload("busy")
        body = PausedBody(head, rest)
        writing = asyncio.create_task(store.append("busy", body, 0))
        await body.paused.wait()
        assert await layer.reclaim("busy") is None
        body.release.set()
        await writing
        freed = await layer.reclaim("busy")
        assert freed is not None and freed >= len(head) + len(rest)
        with pytest.raises(UploadUnknown):
            await store.upload_size("busy")
        assert await layer.reclaim("busy") == 0
        assert await layer.reclaim("../x") == 0
        assert len(locks_of(store)) == 0

    run(go())


# -- before_install: the hook between verification and installation (the registry links there) --


class Hook:
    """A `before_install` that records what the store looked like when it ran, and can pause
    (until `release` is set) or fail."""

    def __init__(self, store: BlobStore, d: Digest, *, fail: bool = False, pause: bool = False):
        self.store, self.digest, self.fail = store, d, fail
        self.sizes: list[int] = []
        self.blob_then: list[int | None] = []
        self.locks_then: list[int] = []
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        if not pause:
            self.release.set()

    async def __call__(self, size: int) -> None:
        self.sizes.append(size)
        self.blob_then.append(await self.store.stat(self.digest))
        self.locks_then.append(len(locks_of(self.store)))
        self.entered.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("before_install refused")


def hashed(algorithm: str, data: bytes) -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def test_commit_runs_before_install_under_the_lock_once_verified_and_before_the_blob_exists(
    store: BlobStore,
) -> None:
    data = os.urandom(1_200_000)
    d = digest(data)

    async def go() -> None:
        await store.create_upload("hooked")
        await store.append("hooked", chunks(data), 0)
        hook = Hook(store, d, pause=True)
        committing = asyncio.create_task(store.commit("hooked", d, before_install=hook))
        await hook.entered.wait()
        # The upload's lock is held: an append racing the hook waits, then finds it gone.
        racing = asyncio.create_task(store.append("hooked", chunks(b"late"), len(data)))
        await until_waiting(store, "hooked", 2)
        assert await store.stat(d) is None
        assert await store.upload_size("hooked") == len(data)
        hook.release.set()
        assert await committing == len(data)
        with pytest.raises(UploadUnknown):
            await racing
        assert (hook.sizes, hook.blob_then, hook.locks_then) == ([len(data)], [None], [1])
        assert await read_all(store, d) == data
        assert len(locks_of(store)) == 0

    run(go())


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
def test_a_failing_before_install_leaves_no_blob_and_the_upload_can_be_finished_again(
    store: BlobStore, algorithm: str
) -> None:
    data = os.urandom(700_000)
    d = hashed(algorithm, data)

    async def go() -> None:
        await store.create_upload("refused")
        await store.append("refused", chunks(data), 0)
        hook = Hook(store, d, fail=True)
        with pytest.raises(RuntimeError, match="before_install refused"):
            await store.commit("refused", d, before_install=hook)
        assert hook.sizes == [len(data)]
        assert await store.stat(d) is None
        assert await store.upload_size("refused") == len(data)  # kept: the client may PUT again
        again = Hook(store, d)
        assert await store.commit("refused", d, before_install=again) == len(data)
        assert again.sizes == [len(data)]
        assert await read_all(store, d) == data
        assert await store.idle_uploads(datetime.now(UTC) + timedelta(hours=1)) == []
        assert len(locks_of(store)) == 0

    run(go())


def test_before_install_is_not_called_when_the_digest_does_not_match(store: BlobStore) -> None:
    data = os.urandom(100_000)
    wrong = digest(data + b"x")

    async def go() -> None:
        hook = Hook(store, wrong)
        await store.create_upload("mismatch")
        await store.append("mismatch", chunks(data), 0)
        with pytest.raises(DigestMismatch):
            await store.commit("mismatch", wrong, before_install=hook)
        with pytest.raises(DigestMismatch):
            await store.put(wrong, chunks(data), before_install=hook)
        assert hook.sizes == []
        assert await store.stat(wrong) is None and await store.stat(digest(data)) is None

    run(go())


# 100 kB: one object on S3; 9 MiB: a multipart upload at the blob key (parts are 8 MiB).
PUT_SIZES = [100_000, 9 * 1024 * 1024 + 1]


@pytest.mark.parametrize("size", PUT_SIZES)
def test_put_runs_before_install_once_verified_and_before_the_blob_exists(
    store: BlobStore, size: int
) -> None:
    data = os.urandom(size)
    d = digest(data)

    async def go() -> None:
        hook = Hook(store, d)
        assert await store.put(d, chunks(data, 1 << 20), before_install=hook) == size
        # Its own upload's lock is held meanwhile (reclaim leaves a put alone).
        assert (hook.sizes, hook.blob_then, hook.locks_then) == ([size], [None], [1])
        assert await read_all(store, d) == data

    run(go())


@pytest.mark.parametrize("size", PUT_SIZES)
def test_a_failing_before_install_in_put_stores_nothing_and_leaves_no_upload(
    store: BlobStore, size: int
) -> None:
    data = os.urandom(size)
    d = digest(data)

    async def go() -> None:
        hook = Hook(store, d, fail=True)
        with pytest.raises(RuntimeError, match="before_install refused"):
            await store.put(d, chunks(data, 1 << 20), before_install=hook)
        assert hook.sizes == [size]
        assert await store.stat(d) is None
        # The written bytes are gone (test_s3_store.py shows S3's multipart upload aborted).
        assert await store.idle_uploads(datetime.now(UTC) + timedelta(hours=1)) == []
        assert len(locks_of(store)) == 0

    run(go())
