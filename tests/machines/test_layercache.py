"""The host-wide layer cache: verification, single flight (tasks and processes), rootfs trees."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import multiprocessing
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from skyreg.machines import layercache
from skyreg.machines.layercache import (
    BlobVerificationError,
    LayerCache,
    Opener,
    ResumeRefused,
    clone_rootfs,
)
from skyreg.machines.unpack import UnpackError, UnpackLimits, UnpackReport, unpack_layers
from tests.support.layers import OCI_GZIP, OCI_ZSTD, dir_, file, hard, sym, write_layer

DATA = bytes(range(256)) * 1200  # 300 KiB
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
DEADLINE = 60.0


def opener_for(
    data: bytes, calls: list[int], chunk: int = 65536, streamed: list[int] | None = None
) -> Opener:
    """An opener that records the offset of each call and yields `data` from there in chunks,
    letting others run (and adds each chunk's length to `streamed`)."""

    async def opener(offset: int) -> AsyncIterator[bytes]:
        calls.append(offset)

        async def stream() -> AsyncIterator[bytes]:
            for i in range(offset, len(data), chunk):
                await asyncio.sleep(0)
                piece = data[i : i + chunk]
                if streamed is not None:
                    streamed.append(len(piece))
                yield piece

        return stream()

    return opener


async def never_called(offset: int) -> AsyncIterator[bytes]:
    raise AssertionError("the opener must not be called")


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def test_fetch_stores_a_verified_read_only_blob(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    calls: list[int] = []
    path = asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert path == tmp_path / "blobs/sha256" / DIGEST.split(":")[1] == cache.path(DIGEST)
    assert path.read_bytes() == DATA
    assert stat.S_IMODE(path.stat().st_mode) == 0o400  # read-only, root's alone
    assert cache.has(DIGEST)
    assert blob_files(tmp_path) == [path]


def test_present_blobs_are_not_fetched_again(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, [])))
    path = asyncio.run(LayerCache(tmp_path).fetch(DIGEST, len(DATA), never_called))
    assert path.read_bytes() == DATA


def test_sha512_digests_are_accepted(tmp_path: Path) -> None:
    digest = "sha512:" + hashlib.sha512(DATA).hexdigest()
    path = asyncio.run(LayerCache(tmp_path).fetch(digest, len(DATA), opener_for(DATA, [])))
    assert path == tmp_path / "blobs/sha512" / digest.split(":")[1]
    assert path.read_bytes() == DATA


@pytest.mark.parametrize(
    ("data", "size"),
    [(DATA[:-1] + b"!", len(DATA)), (DATA[:-1], len(DATA)), (DATA, len(DATA) - 1)],
    ids=["wrong-bytes", "too-short", "too-long"],
)
def test_wrong_content_leaves_nothing_behind(tmp_path: Path, data: bytes, size: int) -> None:
    cache = LayerCache(tmp_path)
    with pytest.raises(BlobVerificationError):
        asyncio.run(cache.fetch(DIGEST, size, opener_for(data, [])))
    assert blob_files(tmp_path) == []
    assert not cache.has(DIGEST)


def test_temporaries_of_a_crashed_process_are_removed(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    hexpart = DIGEST.split(":")[1]
    stale_blob = tmp_path / "blobs/sha256" / f".{hexpart}.crashed.part"
    stale_tree = tmp_path / "rootfs" / f".{IMAGE.split(':')[1]}.crashed"
    stale_blob.parent.mkdir(parents=True)
    stale_blob.write_bytes(b"partial")
    (stale_tree / "sub").mkdir(parents=True)
    asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, [])))
    asyncio.run(cache.rootfs_for(IMAGE, image_layers(tmp_path)))
    assert not stale_blob.exists()
    assert not stale_tree.exists()


def test_invalid_digests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LayerCache(tmp_path).path("md5:abc")
    with pytest.raises(ValueError):
        asyncio.run(LayerCache(tmp_path).fetch("sha256:../../etc", 1, never_called))


def count_lock_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every cross-process lock taken (single flight must need only one)."""
    real = layercache._lock_file
    taken: list[Path] = []

    def counting(path: Path) -> int:
        taken.append(path)
        return real(path)

    monkeypatch.setattr(layercache, "_lock_file", counting)
    return taken


def test_concurrent_fetches_share_one_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = LayerCache(tmp_path)
    calls: list[int] = []
    locks = count_lock_calls(monkeypatch)

    async def main() -> list[Path]:
        opener = opener_for(DATA, calls, chunk=4096)
        return await asyncio.gather(*(cache.fetch(DIGEST, len(DATA), opener) for _ in range(8)))

    paths = asyncio.run(main())
    assert calls == [0]
    assert len(locks) == 1  # one task did the work; the others awaited it
    assert set(paths) == {cache.path(DIGEST)}


def test_a_failed_shared_download_fails_everyone_then_can_be_retried(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    calls: list[int] = []

    async def main() -> list[Path | BaseException]:
        opener = opener_for(b"x" * len(DATA), calls)
        fetches = (cache.fetch(DIGEST, len(DATA), opener) for _ in range(4))
        return await asyncio.gather(*fetches, return_exceptions=True)

    results = asyncio.run(main())
    assert calls == [0]
    assert all(isinstance(r, BlobVerificationError) for r in results)
    assert asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls))).is_file()
    assert calls == [0, 0]


def test_a_cancelled_caller_does_not_cancel_the_shared_download(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)

    async def main() -> Path:
        opener = opener_for(DATA, [], chunk=1024)
        first = asyncio.ensure_future(cache.fetch(DIGEST, len(DATA), opener))
        second = asyncio.ensure_future(cache.fetch(DIGEST, len(DATA), opener))
        await asyncio.sleep(0)
        first.cancel()
        return await second

    assert asyncio.run(main()).read_bytes() == DATA


# -- resuming a download ----------------------------------------------------------------------

HALF = len(DATA) // 2


def part_file(cache: LayerCache, digest: str = DIGEST) -> Path:
    """Where a download of `digest` is written before it is verified (what a kill leaves)."""
    return cache.path(digest).parent / f".{digest.split(':')[1]}.part"


def leave_part(cache: LayerCache, data: bytes) -> Path:
    part = part_file(cache)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    return part


def test_a_part_file_with_a_correct_prefix_is_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = LayerCache(tmp_path)
    part = leave_part(cache, DATA[:HALF])
    calls: list[int] = []
    streamed: list[int] = []
    with caplog.at_level(logging.INFO, logger="skyreg.machines.layercache"):
        path = asyncio.run(
            cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls, streamed=streamed))
        )
    assert calls == [HALF]
    assert sum(streamed) == len(DATA) - HALF  # only the rest came from the source
    assert path.read_bytes() == DATA
    assert blob_files(tmp_path) == [path]  # the part file became the blob
    assert not part.exists()
    assert f"resuming blob {DIGEST} at {HALF} of {len(DATA)} bytes" in caplog.text


def test_a_part_file_with_wrong_bytes_is_not_published_and_the_next_fetch_starts_at_0(
    tmp_path: Path,
) -> None:
    cache = LayerCache(tmp_path)
    part = leave_part(cache, b"x" * HALF)
    calls: list[int] = []
    with pytest.raises(BlobVerificationError):
        asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert calls == [HALF]
    assert not cache.has(DIGEST)
    assert not part.exists()
    assert blob_files(tmp_path) == []
    assert asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls))).read_bytes() == DATA
    assert calls == [HALF, 0]


@pytest.mark.parametrize("when", ["at-call", "at-first-byte"])
def test_a_source_that_cannot_resume_makes_the_download_start_over(
    tmp_path: Path, when: str
) -> None:
    cache = LayerCache(tmp_path)
    leave_part(cache, DATA[:HALF])
    calls: list[int] = []
    whole = opener_for(DATA, calls)

    async def opener(offset: int) -> AsyncIterator[bytes]:
        if offset and when == "at-call":
            calls.append(offset)
            raise ResumeRefused("no ranges here")
        if offset:  # like a registry answering 200 to a Range: found out on the first read
            calls.append(offset)

            async def refused() -> AsyncIterator[bytes]:
                raise ResumeRefused("HTTP 200")
                yield b""  # an async generator

            return refused()
        return await whole(offset)

    path = asyncio.run(cache.fetch(DIGEST, len(DATA), opener))
    assert calls == [HALF, 0]
    assert path.read_bytes() == DATA  # the old prefix was cut off, not kept before the rest
    assert blob_files(tmp_path) == [path]


def test_a_part_file_longer_than_the_blob_is_discarded(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    leave_part(cache, DATA + b"more")
    calls: list[int] = []
    path = asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert calls == [0]
    assert path.read_bytes() == DATA
    assert blob_files(tmp_path) == [path]


def test_a_complete_part_file_is_published_without_downloading(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    leave_part(cache, DATA)  # killed between the last write and the rename
    path = asyncio.run(cache.fetch(DIGEST, len(DATA), never_called))
    assert path.read_bytes() == DATA
    assert blob_files(tmp_path) == [path]


def test_a_complete_part_file_with_wrong_bytes_is_downloaded_again(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    leave_part(cache, b"x" * len(DATA))
    calls: list[int] = []
    path = asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert calls == [0]
    assert path.read_bytes() == DATA


def test_an_interrupted_download_keeps_its_part_and_the_next_fetch_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layercache, "_BATCH", 65536)  # each 64 KiB chunk is written at once
    cache = LayerCache(tmp_path)
    calls: list[int] = []

    async def dropped(offset: int) -> AsyncIterator[bytes]:
        calls.append(offset)

        async def stream() -> AsyncIterator[bytes]:
            for i in range(3):
                yield DATA[i * 65536 : (i + 1) * 65536]
            raise ConnectionResetError("the connection dropped")

        return stream()

    with pytest.raises(ConnectionResetError):
        asyncio.run(cache.fetch(DIGEST, len(DATA), dropped))
    assert part_file(cache).read_bytes() == DATA[: 3 * 65536]
    assert not cache.has(DIGEST)
    path = asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert calls == [0, 3 * 65536]
    assert path.read_bytes() == DATA


def test_a_download_failing_before_its_first_byte_leaves_no_part_file(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)

    async def refused(offset: int) -> AsyncIterator[bytes]:
        raise ConnectionRefusedError("no registry")

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(cache.fetch(DIGEST, len(DATA), refused))
    assert blob_files(tmp_path) == []


def test_stale_temporaries_go_but_the_part_file_stays(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path)
    part = leave_part(cache, DATA[:HALF])
    stale = part.parent / f".{DIGEST.split(':')[1]}.abc123.part"  # the old random names
    stale.write_bytes(b"junk")
    calls: list[int] = []
    asyncio.run(cache.fetch(DIGEST, len(DATA), opener_for(DATA, calls)))
    assert calls == [HALF]
    assert not stale.exists()


# -- across processes -------------------------------------------------------------------------


def _fetch_in_child(root: str, data_path: str, count_path: str) -> None:
    """Child process: fetch DIGEST with an opener that logs each call to `count_path`."""

    async def opener(offset: int) -> AsyncIterator[bytes]:
        assert offset == 0
        with open(count_path, "a") as f:
            f.write(f"{os.getpid()}\n")

        async def stream() -> AsyncIterator[bytes]:
            yield Path(data_path).read_bytes()

        return stream()

    path = asyncio.run(LayerCache(Path(root)).fetch(DIGEST, len(DATA), opener))
    assert path.read_bytes() == DATA


def _flock_waiters(lock: Path) -> int:
    """How many processes wait for a flock on `lock` (`->` lines of /proc/locks)."""
    inode = f":{lock.stat().st_ino} "
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line and inode in line)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_two_processes_download_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data_path, count_path = tmp_path / "data", tmp_path / "count"
    data_path.write_bytes(DATA)
    count_path.touch()
    lock = root / "locks" / f"{DIGEST.split(':')[1]}.lock"
    lock.parent.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    # Hold the lock ourselves until both children provably wait for it, so they contend.
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        args = (str(root), str(data_path), str(count_path))
        procs = [ctx.Process(target=_fetch_in_child, args=args) for _ in range(2)]
        for p in procs:
            p.start()
        _wait_for(lambda: _flock_waiters(lock) == 2, "both children to wait for the lock")
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0
    assert len(count_path.read_text().splitlines()) == 1
    assert LayerCache(root).path(DIGEST).read_bytes() == DATA


# -- unpacked trees ---------------------------------------------------------------------------


def image_layers(tmp_path: Path) -> list[tuple[Path, str]]:
    lower = [dir_("etc"), file("etc/os-release", b"ID=test\n"), dir_("bin", mode=0o755)]
    lower += [file("bin/sh", b"#!", mode=0o755), hard("bin/ash", "bin/sh"), sym("sh", "bin/sh")]
    upper = [file("etc/hostname", b"box\n"), file("etc/.wh.os-release")]
    return [
        (write_layer(tmp_path / "l1", lower, "gzip"), OCI_GZIP),
        (write_layer(tmp_path / "l2", upper, "zstd"), OCI_ZSTD),
    ]


IMAGE = "sha256:" + "ab" * 32


def test_rootfs_for_unpacks_once_for_concurrent_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layers = image_layers(tmp_path)
    real = unpack_layers
    unpacks: list[int] = []

    def counting(
        layers: list[tuple[Path, str]], rootfs: Path, limits: UnpackLimits | None = None
    ) -> UnpackReport:
        unpacks.append(1)
        return real(layers, rootfs, limits=limits)

    monkeypatch.setattr(layercache, "unpack_layers", counting)
    locks = count_lock_calls(monkeypatch)
    cache = LayerCache(tmp_path / "cache")

    async def main() -> list[Path]:
        return await asyncio.gather(*(cache.rootfs_for(IMAGE, layers) for _ in range(6)))

    paths = asyncio.run(main())
    assert unpacks == [1]
    assert len(locks) == 1
    assert set(paths) == {tmp_path / "cache/rootfs" / IMAGE.split(":")[1]}
    rootfs = paths[0]
    assert sorted(os.listdir(rootfs)) == ["bin", "etc", "sh"]
    assert os.listdir(rootfs / "etc") == ["hostname"]
    assert os.listdir(tmp_path / "cache/rootfs") == [rootfs.name]  # no temporaries left
    assert asyncio.run(cache.rootfs_for(IMAGE, [])) == rootfs
    assert unpacks == [1]


def test_rootfs_for_a_broken_image_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    cache = LayerCache(tmp_path / "cache")
    with pytest.raises(UnpackError):
        asyncio.run(cache.rootfs_for(IMAGE, [(bad, OCI_GZIP)]))
    assert os.listdir(tmp_path / "cache/rootfs") == []


def test_clone_rootfs_gives_an_independent_writable_copy(tmp_path: Path) -> None:
    src = asyncio.run(LayerCache(tmp_path / "cache").rootfs_for(IMAGE, image_layers(tmp_path)))
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    dst = tmp_path / "machines/m1/rootfs"
    method = clone_rootfs(src, dst)
    assert method in ("reflink", "copy")
    assert os.readlink(dst / "sh") == "bin/sh"
    assert stat.S_IMODE((dst / "bin/sh").stat().st_mode) == 0o755
    assert (dst / "bin/ash").stat().st_ino == (dst / "bin/sh").stat().st_ino
    assert (dst / "bin/sh").stat().st_ino != (src / "bin/sh").stat().st_ino
    (dst / "bin/sh").write_bytes(b"changed")
    (dst / "etc/hostname").unlink()
    (dst / "new").write_bytes(b"new")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not (src / "new").exists()
    with pytest.raises(FileExistsError):
        clone_rootfs(src, dst)
