"""The S3 blob store against a real S3 server (SeaweedFS): multipart uploads whose state lives
in the bucket, part sizes, crash points, digest checks, redirects, and `skyreg serve` on S3."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import urllib.request
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.oci.digest import Digest
from skyreg.store import resumable
from skyreg.store.base import DigestMismatch, UploadUnknown
from skyreg.store.s3 import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, PartSizes, S3BlobStore
from tests.support.inprocess import InProcessRegistry, environment
from tests.support.s3 import S3Bucket
from tests.support.servers import RunningRegistry, ServedRegistry

MiB = 1 << 20
GiB = 1 << 30
PREFIX = "reg"
SMALL_PARTS = PartSizes(base=MIN_PART_SIZE)  # the smallest parts S3 allows: cheap multi-part tests


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def sha256(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def make_store(bucket: S3Bucket, **kwargs: Any) -> S3BlobStore:
    """A fresh store over the bucket: each call is a new instance, as another node would be."""
    server = bucket.server
    return S3BlobStore(
        bucket.name,
        prefix=PREFIX,
        endpoint_url=server.endpoint,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        **kwargs,
    )


async def chunks(data: bytes, sizes: Iterable[int] = (7919,)) -> AsyncIterator[bytes]:
    """`data` in pieces cycling through `sizes`."""
    pattern = list(sizes)
    i = n = 0
    while i < len(data):
        size = pattern[n % len(pattern)]
        yield data[i : i + size]
        i += size
        n += 1


async def read_all(
    store: S3BlobStore, d: Digest, offset: int = 0, length: int | None = None
) -> bytes:
    return b"".join([c async for c in store.read(d, offset, length)])


def upload_state(bucket: S3Bucket, upload_id: str) -> dict[str, Any]:
    body = bucket.server.client().get_object(
        Bucket=bucket.name, Key=f"{PREFIX}/uploads/{upload_id}/state"
    )["Body"]
    return dict(json.loads(body.read()))


def pending_multipart_uploads(bucket: S3Bucket) -> list[str]:
    resp = bucket.server.client().list_multipart_uploads(Bucket=bucket.name)
    return [u["Key"] for u in resp.get("Uploads", [])]


def s3_part_sizes(bucket: S3Bucket, state: dict[str, Any]) -> list[int]:
    """The parts S3 itself holds for an upload (ListParts), by size."""
    resp = bucket.server.client().list_parts(
        Bucket=bucket.name, Key=state["key"], UploadId=state["upload_id"]
    )
    return [p["Size"] for p in sorted(resp["Parts"], key=lambda p: p["PartNumber"])]


# -- part sizes --------------------------------------------------------------------------------


def test_part_sizes_cover_a_6_gib_blob_within_10000_parts() -> None:
    sizes = PartSizes()
    assert sizes.parts_for(6 * GiB) <= MAX_PARTS
    assert sizes.parts_for(6 * GiB) == 6 * GiB // sizes.base  # 8 MiB parts: 768


def test_part_sizes_grow_so_10000_parts_hold_the_largest_s3_object() -> None:
    sizes = PartSizes()
    assert sizes.capacity(MAX_PARTS) >= 5 * 1024 * GiB
    every = [sizes.size(n) for n in range(1, MAX_PARTS + 1)]
    assert all(MIN_PART_SIZE <= s <= MAX_PART_SIZE for s in every)
    assert every == sorted(every) and every[0] == 8 * MiB and every[-1] > every[0]


def test_part_sizes_double_every_tier() -> None:
    sizes = PartSizes(base=5 * MiB, per_tier=2)
    assert [sizes.size(n) // MiB for n in range(1, 8)] == [5, 5, 10, 10, 20, 20, 40]
    assert sizes.parts_for(0) == 1 and sizes.parts_for(5 * MiB + 1) == 2


def test_part_sizes_refuse_parts_s3_would_reject() -> None:
    with pytest.raises(ValueError):
        PartSizes(base=MIN_PART_SIZE - 1)
    with pytest.raises(ValueError):
        PartSizes(per_tier=0)


def test_a_real_upload_uses_growing_parts(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=PartSizes(base=5 * MiB, per_tier=1))
    data = os.urandom(5 * MiB + 10 * MiB + 3 * MiB + 123)

    async def go() -> None:
        await store.create_upload("grow")
        assert await store.append("grow", chunks(data, (MiB + 1,)), 0) == len(data)
        state = upload_state(s3_bucket, "grow")
        assert [p[2] for p in state["parts"]] == [5 * MiB, 10 * MiB]
        assert s3_part_sizes(s3_bucket, state) == [5 * MiB, 10 * MiB]
        assert state["tail_size"] == 3 * MiB + 123
        assert await store.commit("grow", sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data

    run(go())


# -- uploads across instances and crashes ------------------------------------------------------


def test_upload_continues_on_another_instance_without_rereading_bytes(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not resumable.available():
        pytest.skip("OpenSSL libcrypto with SHA256_* not found")
    data = os.urandom(13 * MiB + 4321)
    split = 7 * MiB + 77

    async def first_node() -> None:
        store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
        await store.create_upload("moving")
        assert await store.append("moving", chunks(data[:split]), 0) == split
        await store.aclose()
        store.close()

    async def second_node() -> None:
        store = make_store(s3_bucket, part_sizes=SMALL_PARTS)

        async def no_rereading(*_args: object) -> Digest:
            raise AssertionError("the upload's bytes were read back to hash them")

        monkeypatch.setattr(store, "_hash_object", no_rereading)
        assert await store.upload_size("moving") == split
        assert await store.append("moving", chunks(data[split:]), split) == len(data)
        assert await store.commit("moving", sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data

    run(first_node())
    state = upload_state(s3_bucket, "moving")
    assert state["size"] == split and len(state["parts"]) == 1 and state["sha256"]
    run(second_node())
    assert s3_bucket.keys(f"{PREFIX}/uploads/") == []
    assert pending_multipart_uploads(s3_bucket) == []


def test_odd_sized_chunks_make_exact_parts_and_a_tail(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(12 * MiB + 999)
    # Appends of awkward lengths (one byte, a prime, across part boundaries), each streamed in
    # pieces of awkward lengths too.
    cuts = [1, 7919, 1, 3 * MiB, 7919, 2 * MiB + 1, 5 * MiB, 1]
    bounds = [0]
    for cut in cuts:
        bounds.append(bounds[-1] + cut)
    bounds.append(len(data))

    async def go() -> None:
        await store.create_upload("odd")
        for start, end in itertools.pairwise(bounds):
            size = await store.append("odd", chunks(data[start:end], (1, 7919, 65536)), start)
            assert size == end
            state = upload_state(s3_bucket, "odd")
            assert state["size"] == end
            assert [p[2] for p in state["parts"]] == [MIN_PART_SIZE] * (end // MIN_PART_SIZE)
            assert state["tail_size"] == end % MIN_PART_SIZE
        state = upload_state(s3_bucket, "odd")
        assert s3_part_sizes(s3_bucket, state) == [MIN_PART_SIZE, MIN_PART_SIZE]
        # Only the current tail is kept: earlier ones went when their state was replaced.
        tails = [k for k in s3_bucket.keys(f"{PREFIX}/uploads/odd/") if "/tail-" in k]
        assert tails == [state["tail"]]
        assert await store.commit("odd", sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data
        assert (
            await read_all(store, sha256(data), 5 * MiB - 3, 7) == data[5 * MiB - 3 : 5 * MiB + 4]
        )

    run(go())


def test_crash_before_the_state_write_resumes_from_the_previous_state(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts and a tail uploaded, then the process dies before writing the state: the state is
    the commit point, so the upload is as it was and the client's retry of that chunk works."""
    data = os.urandom(16 * MiB + 5)
    first = 3 * MiB

    async def before_crash() -> None:
        store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
        await store.create_upload("crash")
        await store.append("crash", chunks(data[:first]), 0)
        real_save = store._save

        async def die(client: Any, upload_id: str, state: Any) -> None:
            if state.size > first:
                raise SystemExit("killed before the state write")
            await real_save(client, upload_id, state)

        monkeypatch.setattr(store, "_save", die)
        with pytest.raises(SystemExit):
            await store.append("crash", chunks(data[first : first + 11 * MiB]), first)

    async def after_restart() -> None:
        store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
        assert await store.upload_size("crash") == first
        assert await store.append("crash", chunks(data[first:], (4099,)), first) == len(data)
        assert await store.commit("crash", sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data

    run(before_crash())
    # The parts of the lost append were uploaded (and its tail written) but nothing refers to them.
    assert pending_multipart_uploads(s3_bucket) != []
    state = upload_state(s3_bucket, "crash")
    assert state["size"] == first and state["parts"] == [] and state["tail_size"] == first
    run(after_restart())
    assert s3_bucket.keys(f"{PREFIX}/uploads/") == []
    assert pending_multipart_uploads(s3_bucket) == []


def test_a_client_that_goes_away_keeps_what_arrived(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(8 * MiB)

    async def broken(upto: int) -> AsyncIterator[bytes]:
        async for chunk in chunks(data[:upto], (MiB,)):
            yield chunk
        raise ConnectionResetError("client went away")

    async def go() -> None:
        await store.create_upload("gone")
        with pytest.raises(ConnectionResetError):
            await store.append("gone", broken(6 * MiB), 0)
        assert await store.upload_size("gone") == 6 * MiB
        await store.append("gone", chunks(data[6 * MiB :]), 6 * MiB)
        assert await store.commit("gone", sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data

    run(go())


# -- digests -----------------------------------------------------------------------------------


def test_wrong_digest_leaves_nothing_visible(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(11 * MiB + 1)
    wrong = sha256(data + b"x")

    async def go() -> None:
        await store.create_upload("bad")
        await store.append("bad", chunks(data, (MiB - 1,)), 0)
        with pytest.raises(DigestMismatch):
            await store.commit("bad", wrong)
        with pytest.raises(UploadUnknown):
            await store.upload_size("bad")
        with pytest.raises(DigestMismatch):
            await store.put(wrong, chunks(data, (MiB - 1,)))
        assert await store.stat(wrong) is None
        assert await store.stat(sha256(data)) is None

    run(go())
    assert s3_bucket.keys() == []
    assert pending_multipart_uploads(s3_bucket) == []


def test_put_of_a_multipart_blob_is_invisible_until_verified(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(12 * MiB)
    d = sha256(data)
    seen: list[int | None] = []

    async def go() -> None:
        async def watched() -> AsyncIterator[bytes]:
            async for chunk in chunks(data, (MiB,)):
                seen.append(await store.stat(d))
                yield chunk

        assert await store.put(d, watched()) == len(data)
        assert await read_all(store, d) == data

    run(go())
    assert seen and set(seen) == {None}
    assert s3_bucket.keys(f"{PREFIX}/uploads/") == []
    assert pending_multipart_uploads(s3_bucket) == []


def test_sha512_upload_with_parts_is_checked_by_reading_it_back(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(11 * MiB + 17)
    d = Digest("sha512", hashlib.sha512(data).hexdigest())
    wrong = Digest("sha512", hashlib.sha512(b"other").hexdigest())

    async def go() -> None:
        await store.create_upload("s512")
        await store.append("s512", chunks(data, (MiB,)), 0)
        assert await store.commit("s512", d) == len(data)
        assert await read_all(store, d) == data
        await store.create_upload("s512b")
        await store.append("s512b", chunks(data, (MiB,)), 0)
        with pytest.raises(DigestMismatch):
            await store.commit("s512b", wrong)
        assert await store.stat(wrong) is None

    run(go())
    assert s3_bucket.keys(f"{PREFIX}/uploads/") == []


def test_blob_larger_than_one_copy_is_installed_by_multipart_copy(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS, max_copy_size=6 * MiB)
    data = os.urandom(14 * MiB + 3)

    async def go() -> None:
        await store.create_upload("copy")
        await store.append("copy", chunks(data, (MiB,)), 0)
        assert await store.commit("copy", sha256(data)) == len(data)
        assert await store.stat(sha256(data)) == len(data)
        assert await read_all(store, sha256(data)) == data

    run(go())
    head = s3_bucket.server.client().head_object(
        Bucket=s3_bucket.name,
        Key=f"{PREFIX}/blobs/sha256/{sha256(data).hex[:2]}/{sha256(data).hex}",
    )
    assert head["ETag"].strip('"').endswith("-3")  # three copied ranges
    assert pending_multipart_uploads(s3_bucket) == []


# -- layout, orphans, redirects ----------------------------------------------------------------


def test_blobs_live_at_content_addressed_keys_under_the_prefix(s3_bucket: S3Bucket) -> None:
    store = make_store(s3_bucket)
    data = b"layout"
    d = sha256(data)

    async def go() -> None:
        await store.put(d, chunks(data))
        assert store.local_path(d) is None

    run(go())
    assert s3_bucket.keys() == [f"{PREFIX}/blobs/sha256/{d.hex[:2]}/{d.hex}"]


def test_orphaned_multipart_uploads_are_idle_and_aborted(s3_bucket: S3Bucket) -> None:
    """A multipart upload whose state object never got written (a crash right after creating
    it) is still found by idle_uploads and removed by abort."""
    from datetime import UTC, datetime, timedelta

    client = s3_bucket.server.client()
    client.create_multipart_upload(Bucket=s3_bucket.name, Key=f"{PREFIX}/uploads/orphan/data")
    store = make_store(s3_bucket)

    async def go() -> None:
        assert await store.idle_uploads(datetime.now(UTC) + timedelta(seconds=5)) == ["orphan"]
        assert await store.idle_uploads(datetime.now(UTC) - timedelta(hours=1)) == []
        await store.abort("orphan")

    run(go())
    assert pending_multipart_uploads(s3_bucket) == []


def test_redirect_url_is_a_presigned_url_serving_the_blob(s3_bucket: S3Bucket) -> None:
    data = os.urandom(100_000)
    d = sha256(data)

    async def go() -> tuple[str | None, str | None]:
        plain = make_store(s3_bucket)
        await plain.put(d, chunks(data))
        return await plain.redirect_url(d), await make_store(s3_bucket, redirect=True).redirect_url(
            d
        )

    off, url = run(go())
    assert off is None
    assert url is not None and url.startswith(s3_bucket.endpoint + "/")
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == data


def test_missing_bucket_fails_the_check(s3_bucket: S3Bucket) -> None:
    store = S3BlobStore(
        s3_bucket.name + "-missing",
        endpoint_url=s3_bucket.endpoint,
        access_key_id=s3_bucket.server.access_key,
        secret_access_key=s3_bucket.server.secret_key,
    )
    with pytest.raises(Exception, match=r"404|NoSuchBucket|Not Found"):
        run(store.check())


def test_credentials_come_from_the_standard_aws_environment(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_bucket.server.aws_env().items():
        monkeypatch.setenv(name, value)
    store = S3BlobStore(s3_bucket.name, endpoint_url=s3_bucket.endpoint)
    data = b"from the environment"

    async def go() -> bytes:
        await store.check()
        await store.put(sha256(data), chunks(data))
        return await read_all(store, sha256(data))

    assert run(go()) == data


def test_credentials_come_from_an_aws_profile(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = s3_bucket.server
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[skyreg]\naws_access_key_id = {server.access_key}\n"
        f"aws_secret_access_key = {server.secret_key}\n"
    )
    (tmp_path / "config").write_text(f"[profile skyreg]\nregion = {server.region}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "skyreg")
    store = S3BlobStore(s3_bucket.name, endpoint_url=s3_bucket.endpoint)
    data = b"from a profile"

    async def go() -> bytes:
        await store.put(sha256(data), chunks(data))
        return await read_all(store, sha256(data))

    assert run(go()) == data
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(Exception, match="nobody"):
        S3BlobStore(s3_bucket.name, endpoint_url=s3_bucket.endpoint)


# -- skyreg serve on S3 ------------------------------------------------------------------------


@contextlib.contextmanager
def _serve_on_s3(tmp_path: Path, bucket: S3Bucket, **options: object) -> Iterator[ServedRegistry]:
    with environment(bucket.server.aws_env()):
        reg = InProcessRegistry(
            data_dir=tmp_path / "data",
            options={
                "auth": False,
                "storage": f"s3://{bucket.name}/registry",
                "s3_endpoint": bucket.endpoint,
                **options,
            },
        )
        reg.start()
        try:
            yield reg
        finally:
            reg.stop()


def test_serve_on_s3_pushes_and_pulls_blobs(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    with _serve_on_s3(tmp_path, s3_bucket) as reg:
        base = reg.url
        mono = os.urandom(3 * MiB + 5)
        r = requests.post(f"{base}/v2/app/blobs/uploads/?digest={sha256(mono)}", data=mono)
        assert r.status_code == 201, r.text

        chunked = os.urandom(20 * MiB + 7)
        r = requests.post(f"{base}/v2/app/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = base + r.headers["Location"]
        offset = 0
        for size in (1, 7919, 9 * MiB, 6 * MiB + 3):
            piece = chunked[offset : offset + size]
            r = requests.patch(
                location,
                data=piece,
                headers={
                    "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                    "Content-Type": "application/octet-stream",
                },
            )
            assert r.status_code == 202, r.text
            offset += len(piece)
            assert r.headers["Range"] == f"0-{offset - 1}"
            location = base + r.headers["Location"]
        r = requests.put(f"{location}?digest={sha256(chunked)}", data=chunked[offset:])
        assert r.status_code == 201, r.text

        for blob in (mono, chunked):
            url = f"{base}/v2/app/blobs/{sha256(blob)}"
            r = requests.get(url)
            assert r.status_code == 200 and r.content == blob
            assert r.headers["Docker-Content-Digest"] == str(sha256(blob))
            r = requests.get(url, headers={"Range": "bytes=100-199"})
            assert r.status_code == 206 and r.content == blob[100:200]
            assert r.headers["Content-Range"] == f"bytes 100-199/{len(blob)}"
            r = requests.get(url, headers={"Range": "bytes=-10"})
            assert r.status_code == 206 and r.content == blob[-10:]
            r = requests.get(url, headers={"Range": f"bytes={len(blob)}-"})
            assert r.status_code == 416
            r = requests.head(url)
            assert r.status_code == 200 and r.headers["Content-Length"] == str(len(blob))
        keys = s3_bucket.keys("registry/blobs/")
        assert sorted(keys) == sorted(
            f"registry/blobs/sha256/{sha256(b).hex[:2]}/{sha256(b).hex}" for b in (mono, chunked)
        )
        assert s3_bucket.keys("registry/uploads/") == []


def test_serve_with_s3_redirect_answers_307_to_the_object(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    with _serve_on_s3(tmp_path, s3_bucket, s3_redirect=True) as reg:
        blob = os.urandom(50_000)
        url = f"{reg.url}/v2/app/blobs/{sha256(blob)}"
        r = requests.post(f"{reg.url}/v2/app/blobs/uploads/?digest={sha256(blob)}", data=blob)
        assert r.status_code == 201, r.text
        r = requests.get(url, allow_redirects=False)
        assert r.status_code == 307
        assert r.headers["Location"].startswith(s3_bucket.endpoint + "/")
        assert requests.get(r.headers["Location"]).content == blob
        assert requests.get(url).content == blob  # followed by the client
        r = requests.head(url, allow_redirects=False)
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(blob))


def test_serve_refuses_a_storage_it_cannot_reach(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    reg = RunningRegistry(
        data_dir=tmp_path / "data",
        extra_args=["--no-auth", "--storage", f"s3://{s3_bucket.name}-nope"],
        env={**s3_bucket.server.aws_env(), "SKYREG_S3_ENDPOINT": s3_bucket.endpoint},
    )
    with pytest.raises(RuntimeError, match="cannot use blob storage"):
        reg.start()


def test_storage_setting_parses_file_and_s3_urls() -> None:
    from skyreg.server.config import parse_storage

    assert parse_storage("file") is None
    assert parse_storage("s3://bucket") == ("bucket", "")
    assert parse_storage("s3://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("s3://", "gs://bucket", "/var/lib/skyreg", ""):
        with pytest.raises(ValueError):
            parse_storage(bad)


def test_serve_help_documents_the_storage_options() -> None:
    from typer.testing import CliRunner

    from skyreg.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for option in ("--storage", "--s3-endpoint", "--s3-region", "--s3-redirect"):
        assert option in result.output


def test_a_put_refused_by_before_install_leaves_no_object_and_no_multipart_upload(
    s3_bucket: S3Bucket,
) -> None:
    store = make_store(s3_bucket, part_sizes=SMALL_PARTS)
    data = os.urandom(11 * MiB + 1)  # two parts and a tail: a multipart upload at the blob key
    d = sha256(data)
    called: list[int] = []

    async def refuse(size: int) -> None:
        called.append(size)
        assert pending_multipart_uploads(s3_bucket) != []  # the parts are up, not completed
        raise RuntimeError("not linked")

    async def go() -> None:
        with pytest.raises(RuntimeError, match="not linked"):
            await store.put(d, chunks(data, (MiB - 1,)), before_install=refuse)
        assert await store.stat(d) is None

    run(go())
    assert called == [len(data)]
    assert s3_bucket.keys() == []
    assert pending_multipart_uploads(s3_bucket) == []
