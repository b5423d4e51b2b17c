"""A full disk under the filesystem blob store: uploads survive it, clients get a clear 507,
pulls keep working, and nothing is left behind.

Each server test runs `skyreg serve` with its data dir on a 16 MiB tmpfs the test mounts itself
(tests run as root; where mounting is not permitted they are skipped), and fills that disk with a
filler file it deletes to free the space again.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from skyreg.store.filesystem import FilesystemBlobStore
from tests.support.oci import error_codes, patch_chunk, push_blob, push_image, sha256, start_upload
from tests.support.servers import RunningRegistry

_CHUNK = 256 << 10  # below the store's 1 MiB write batch: the whole body is read before a write


@pytest.fixture
def full_disk_registry(small_disk: Path) -> Iterator[RunningRegistry]:
    """`skyreg serve --no-auth` whose data dir (SQLite and blobs) is the small tmpfs, with no
    low-space watermark: these tests run the disk really full (tests/faults/test_low_space.py
    covers the watermark)."""
    reg = RunningRegistry(data_dir=small_disk, extra_args=["--no-auth", "--min-free-space", "0"])
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def _fill(disk: Path) -> Path:
    """Write a filler file until the disk has not one free block left; returns it."""
    filler = disk / "filler"
    block = bytes(1 << 20)
    with open(filler, "ab", buffering=0) as f:
        for _ in range(1024):  # far more than 16 MiB: the loop ends at ENOSPC
            try:
                f.write(block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return filler
    raise AssertionError("the disk never filled up")


def _upload_files(disk: Path) -> list[str]:
    return sorted(os.listdir(disk / "uploads"))


def test_upload_that_hit_a_full_disk_finishes_once_space_is_freed(
    full_disk_registry: RunningRegistry,
) -> None:
    reg = full_disk_registry
    base, repo = reg.url, "app/full"
    first, second = os.urandom(_CHUNK), os.urandom(_CHUNK)
    location = start_upload(base, repo)
    assert patch_chunk(base, location, first, 0).status_code == 202

    filler = _fill(reg.data_dir)
    refused = patch_chunk(base, location, second, len(first))
    assert refused.status_code >= 500, refused.text  # nothing was written
    status = requests.get(base + location, timeout=30)
    assert status.status_code == 204, status.text
    assert status.headers["Range"] == f"0-{len(first) - 1}"

    filler.unlink()
    resumed = patch_chunk(base, location, second, len(first))
    assert resumed.status_code == 202, resumed.text
    assert resumed.headers["Range"] == f"0-{len(first) + len(second) - 1}"
    digest = sha256(first + second)
    done = requests.put(base + location, params={"digest": digest}, timeout=30)
    assert done.status_code == 201, done.text
    pulled = requests.get(f"{base}/v2/{repo}/blobs/{digest}", timeout=30)
    assert pulled.status_code == 200 and pulled.content == first + second
    # A state write that failed on the full disk left no temp file behind.
    assert not [name for name in _upload_files(reg.data_dir) if name.endswith(".tmp")]


def _assert_storage_full(resp: requests.Response) -> None:
    assert resp.status_code == 507, resp.text
    assert error_codes(resp) == ["UNAVAILABLE"]
    assert "storage is full" in resp.json()["errors"][0]["message"]


def test_full_disk_answers_507_once_logged_and_pulls_keep_working(
    full_disk_registry: RunningRegistry,
) -> None:
    reg = full_disk_registry
    base, repo = reg.url, "app/full"
    image = push_image(base, repo, "v1", layer_size=64 << 10)
    location = start_upload(base, repo)

    filler = _fill(reg.data_dir)
    _assert_storage_full(patch_chunk(base, location, os.urandom(_CHUNK), 0))
    _assert_storage_full(
        requests.post(
            f"{base}/v2/{repo}/blobs/uploads/",
            params={"digest": sha256(data := os.urandom(_CHUNK))},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
    )
    opened = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    # Opening a session writes a row and an empty file: refused when SQLite has no room left.
    assert opened.status_code in (202, 507), opened.text
    if opened.status_code == 507:
        _assert_storage_full(opened)

    # Pulls of what is stored keep working while the disk is full.
    layer = requests.get(f"{base}/v2/{repo}/blobs/{sha256(image.layers[0])}", timeout=30)
    assert layer.status_code == 200 and layer.content == image.layers[0]
    manifest = requests.get(
        f"{base}/v2/{repo}/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    assert manifest.status_code == 200 and manifest.content == image.manifest

    log = reg.log()
    assert "Traceback" not in log
    assert log.count("storage full") == 1, log

    filler.unlink()
    push_blob(base, repo, os.urandom(_CHUNK))
    log = reg.log()
    assert log.count("storage full") == 1, log
    assert log.count("storage has space again") == 1, log


def test_full_disk_at_upload_start_answers_507(full_disk_registry: RunningRegistry) -> None:
    reg = full_disk_registry
    base, repo = reg.url, "app/full"
    # Enough rows that the SQLite WAL has to grow for the next one.
    for _ in range(4):
        push_blob(base, repo, os.urandom(1024))
    filler = _fill(reg.data_dir)
    try:
        answers = [requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30) for _ in range(64)]
    finally:
        filler.unlink()
    refused = [r for r in answers if r.status_code != 202]
    assert refused, "every upload start succeeded on a full disk"
    for resp in refused:
        _assert_storage_full(resp)
    assert "Traceback" not in reg.log()


def test_sweeper_removes_every_file_an_upload_leaves(tmp_path: Path) -> None:
    """An orphaned upload's bytes, hash state and half-written state temp file all go at once,
    so the sweeper finds (and logs) it once, not on every pass."""

    async def run() -> None:
        store = FilesystemBlobStore(tmp_path, fsync=False)
        try:
            upload_id = "orphan"
            for suffix in ("", ".sha256", ".sha256.tmp"):
                (store.upload_dir / f"{upload_id}{suffix}").write_bytes(b"x")
            later = datetime.now(UTC) + timedelta(seconds=5)
            assert await store.idle_uploads(later) == [upload_id]
            await store.abort(upload_id)
            assert os.listdir(store.upload_dir) == []
            assert await store.idle_uploads(later) == []

            # Only a temp file left (the crash came before the upload's bytes went).
            (store.upload_dir / "lonely.sha256.tmp").write_bytes(b"x")
            assert await store.idle_uploads(later) == ["lonely"]
            await store.abort("lonely")
            assert await store.idle_uploads(later) == []
        finally:
            store.close()

    asyncio.run(run())
