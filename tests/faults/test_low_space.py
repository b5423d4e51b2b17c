"""Low space on the data dir's disk: new uploads are refused at a watermark before the disk is
full, and unused uploads are reclaimed first (failed ones, then the longest idle).

Each server test runs `skyreg serve` on a 16 MiB tmpfs the test mounts (the `small_disk` fixture)
and takes space away with a filler file of a computed size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from skyreg.registry.space import Watermark, parse_watermark
from tests.support.oci import error_codes, patch_chunk, push_image, sha256
from tests.support.servers import RunningRegistry

_MiB = 1 << 20


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def _leave_free(disk: Path, free: int) -> Path:
    """Grow a filler file on `disk` until about `free` bytes are left; returns it."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:
        while (short := _free(disk) - free) > 0:
            f.write(bytes(min(short, _MiB)))
    return filler


def _serve(disk: Path, *args: str) -> RunningRegistry:
    reg = RunningRegistry(data_dir=disk, extra_args=["--no-auth", *args])
    reg.start()
    return reg


@pytest.fixture
def registry_on_small_disk(small_disk: Path) -> Iterator[RunningRegistry]:
    """A registry keeping 4 MiB free on the 16 MiB disk; abandoned uploads are never old enough."""
    reg = _serve(small_disk, "--min-free-space", "4MiB", "--reclaim-idle", "3600")
    try:
        yield reg
    finally:
        reg.stop()


def _start(base: str, repo: str) -> requests.Response:
    return requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)


def _upload(base: str, repo: str, data: bytes) -> str:
    """An open upload holding `data` (one PATCH); its Location."""
    opened = _start(base, repo)
    assert opened.status_code == 202, opened.text
    location = str(opened.headers["Location"])
    patched = patch_chunk(base, location, data, 0)
    assert patched.status_code == 202, patched.text
    return location


def _status(base: str, location: str) -> int:
    return requests.get(base + location, timeout=30).status_code


def test_new_uploads_are_refused_below_the_watermark_before_the_disk_is_full(
    registry_on_small_disk: RunningRegistry,
) -> None:
    reg = registry_on_small_disk
    base, repo = reg.url, "app/low"
    image = push_image(base, repo, "v1", layer_size=64 << 10)
    in_flight = _upload(base, repo, os.urandom(64 << 10))

    filler = _leave_free(reg.data_dir, 3 * _MiB)
    refused = [
        _start(base, repo),
        requests.post(
            f"{base}/v2/{repo}/blobs/uploads/",
            params={"digest": sha256(data := os.urandom(4096))},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        ),
    ]
    for resp in refused:
        assert resp.status_code == 507, resp.text
        assert error_codes(resp) == ["UNAVAILABLE"]
        assert "low on space" in resp.json()["errors"][0]["message"]
    assert _free(reg.data_dir) > 2 * _MiB  # refused before the disk was full, not after
    assert requests.head(f"{base}/v2/{repo}/blobs/{sha256(data)}", timeout=30).status_code == 404

    # An upload already under way may finish, and pulls keep working.
    assert patch_chunk(base, in_flight, os.urandom(4096), 64 << 10).status_code == 202
    layer = requests.get(f"{base}/v2/{repo}/blobs/{sha256(image.layers[0])}", timeout=30)
    assert layer.status_code == 200 and layer.content == image.layers[0]

    filler.unlink()
    assert _start(base, repo).status_code == 202
    log = reg.log()
    assert "Traceback" not in log
    assert log.count("low on space: ") == 1, log  # a condition, logged when it starts
    assert log.count("space is above the watermark again") == 1, log


def test_low_space_reclaims_an_upload_that_failed_for_lack_of_space_first(
    registry_on_small_disk: RunningRegistry,
) -> None:
    reg = registry_on_small_disk
    base, repo = reg.url, "app/low"
    idle = _upload(base, repo, os.urandom(_MiB))  # abandoned, but not for an hour
    failed = _upload(base, repo, os.urandom(3 * _MiB))

    filler = _leave_free(reg.data_dir, 2 * _MiB)
    full = patch_chunk(base, failed, os.urandom(4 * _MiB), 3 * _MiB)  # more than is left
    assert full.status_code == 507, full.text
    assert _status(base, failed) == 204  # failed, and still resumable until space is needed

    # The failed upload's 3 MiB bring the free space back above 4 MiB: the new upload starts.
    started = _start(base, repo)
    assert started.status_code == 202, started.text
    unknown = requests.get(base + failed, timeout=30)
    assert unknown.status_code == 404 and error_codes(unknown) == ["BLOB_UPLOAD_UNKNOWN"]
    assert _status(base, idle) == 204  # not idle long enough to be taken
    assert "reclaimed 1 unused upload(s)" in reg.log()
    filler.unlink()


def test_low_space_reclaims_the_longest_idle_uploads_until_there_is_room(
    small_disk: Path,
) -> None:
    reg = _serve(small_disk, "--min-free-space", "4MiB", "--reclaim-idle", "0")
    try:
        base, repo = reg.url, "app/low"
        oldest = _upload(base, repo, os.urandom(3 * _MiB))
        newer = _upload(base, repo, os.urandom(3 * _MiB))
        filler = _leave_free(reg.data_dir, 2 * _MiB)

        # Freeing the oldest (3 MiB) is enough; the newer one stays.
        assert _start(base, repo).status_code == 202
        assert _status(base, oldest) == 404
        assert _status(base, newer) == 204
        assert "reclaimed 1 unused upload(s)" in reg.log()

        # Not enough to reclaim: the filler alone keeps the disk below the watermark.
        filler.unlink()
        filler = _leave_free(reg.data_dir, _MiB // 2)
        refused = _start(base, repo)
        assert refused.status_code == 507, refused.text
        assert _status(base, newer) == 404  # taken too, and still not enough
        assert "Traceback" not in reg.log()
        filler.unlink()
    finally:
        reg.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Watermark()),
        ("2%", Watermark(percent=2.0)),
        ("0.5%", Watermark(percent=0.5)),
        ("512MiB", Watermark(absolute=512 << 20)),
        ("1G", Watermark(absolute=1 << 30)),
        ("4096", Watermark(absolute=4096)),
        ("3 kib", Watermark(absolute=3 << 10)),
    ],
)
def test_watermark_reads_bytes_and_shares_of_the_disk(text: str, expected: Watermark) -> None:
    assert parse_watermark(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "lots", "10 apples", "51%", "1e9", "12MB/s"])
def test_watermark_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError):
        parse_watermark(text)


def test_serve_refuses_a_watermark_that_is_not_a_size(tmp_path: Path) -> None:
    serve = [sys.executable, "-m", "skyreg", "serve", "--data-dir", str(tmp_path / "d")]
    run = subprocess.run(
        [*serve, "--min-free-space", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "--min-free-space" in run.stderr and "not a size" in run.stderr
