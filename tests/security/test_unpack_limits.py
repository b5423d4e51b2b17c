"""Unpacking is bounded: decompressed bytes per layer and per image, entries per layer, the size
of extended tar headers and the length of paths. A breach fails with a clear `UnpackLimitError`,
keeps memory bounded, and leaves no partial tree (neither the temporary nor the cached rootfs).

Hostile layers are written as streams (gzip of zeros), never held in memory."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from skyreg.machines.layercache import LayerCache
from skyreg.machines.unpack import UnpackError, UnpackLimitError, UnpackLimits, unpack_layers

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MiB = 1 << 20
IMAGE_DIGEST = "sha256:" + "ab" * 32
PEAK_RSS_LIMIT_KIB = 200 * 1024


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o644, 1_600_000_000
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _zeros(n: int) -> Iterator[bytes]:
    chunk = bytes(MiB)
    while n > 0:
        yield chunk[: min(n, MiB)]
        n -= min(n, MiB)


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def _member(name: str, data: bytes) -> Iterator[bytes]:
    yield _header(name, len(data))
    yield data + _padding(len(data))


def _big_member(name: str, size: int) -> Iterator[bytes]:
    yield _header(name, size)
    yield from _zeros(size)
    yield _padding(size)


def _end() -> Iterator[bytes]:
    yield bytes(2 * tarfile.BLOCKSIZE)


def _write_gzip(path: Path, *parts: Iterable[bytes]) -> Path:
    """A gzip layer written piece by piece (never whole in memory)."""
    with gzip.GzipFile(path, "wb", compresslevel=6, mtime=0) as out:
        for part in parts:
            for piece in part:
                out.write(piece)
    return path


def _small_layer(path: Path, files: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def _build_in_cache(
    cache_root: Path, layers: list[Path], limits: UnpackLimits
) -> tuple[LayerCache, UnpackLimitError]:
    """Unpack through the layer cache (as the agent does) and return the limit error."""
    cache = LayerCache(cache_root)
    with pytest.raises(UnpackLimitError) as caught:
        asyncio.run(cache.rootfs_for(IMAGE_DIGEST, [(p, OCI_GZIP) for p in layers], limits))
    return cache, caught.value


def _assert_nothing_left(cache: LayerCache) -> None:
    assert not cache.rootfs_path(IMAGE_DIGEST).exists()
    rootfs_dir = cache.root / "rootfs"
    assert not rootfs_dir.exists() or list(rootfs_dir.iterdir()) == []


def test_a_small_gzip_layer_inflating_past_the_layer_limit_is_refused(tmp_path: Path) -> None:
    bomb = _write_gzip(tmp_path / "bomb", _big_member("big", 64 * MiB), _end())
    assert bomb.stat().st_size < MiB // 4
    cache, error = _build_in_cache(
        tmp_path / "cache", [bomb], UnpackLimits(layer_bytes=4 * MiB, image_bytes=8 * MiB)
    )
    assert "more than 4194304 bytes once decompressed" in str(error)
    assert "layer 1" in str(error)
    _assert_nothing_left(cache)


def test_layers_together_past_the_image_limit_are_refused(tmp_path: Path) -> None:
    one = _write_gzip(tmp_path / "one", _big_member("a", 3 * MiB), _end())
    two = _write_gzip(tmp_path / "two", _big_member("b", 3 * MiB), _end())
    cache, error = _build_in_cache(
        tmp_path / "cache", [one, two], UnpackLimits(layer_bytes=4 * MiB, image_bytes=5 * MiB)
    )
    assert "image is larger than 5242880 bytes once decompressed" in str(error)
    _assert_nothing_left(cache)


def test_too_many_entries_in_a_layer_are_refused(tmp_path: Path) -> None:
    layer = _small_layer(tmp_path / "many", {f"f{i}": b"x" for i in range(30)})
    cache, error = _build_in_cache(tmp_path / "cache", [layer], UnpackLimits(entries=10))
    assert "more than 10 entries" in str(error)
    _assert_nothing_left(cache)


def test_a_too_long_path_is_refused(tmp_path: Path) -> None:
    name = "d/" * 100 + "f" * 100  # 300 bytes
    layer = _small_layer(tmp_path / "long", {"ok": b"1", name: b"2"})
    cache, error = _build_in_cache(tmp_path / "cache", [layer], UnpackLimits(path_bytes=200))
    assert "path of 300 bytes" in str(error) and "limit is 200" in str(error)
    _assert_nothing_left(cache)


def test_default_limits_refuse_a_path_longer_than_4096_bytes(tmp_path: Path) -> None:
    layer = _small_layer(tmp_path / "long", {"a" * 5000: b"2"})
    with pytest.raises(UnpackLimitError, match="limit is 4096"):
        unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs")


def test_an_extended_header_over_the_limit_is_refused(tmp_path: Path) -> None:
    # a 2,000-byte path lives in a PAX header of a bit more than 2,000 bytes
    layer = _small_layer(tmp_path / "pax", {"p" * 2000: b"2"})
    cache, error = _build_in_cache(tmp_path / "cache", [layer], UnpackLimits(header_bytes=1024))
    assert "extended tar header" in str(error) and "limit is 1024" in str(error)
    _assert_nothing_left(cache)


_CHILD = """
import json, sys
from pathlib import Path
from skyreg.machines.unpack import UnpackError, unpack_layers
try:
    unpack_layers([(Path(sys.argv[1]), sys.argv[2])], Path(sys.argv[3]))
    outcome = "unpacked"
except UnpackError as e:
    outcome = str(e)
with open("/proc/self/status") as status:
    peak = next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "peak_kib": peak}))
"""


def _unpack_in_child(layer: Path, rootfs: Path) -> tuple[str, int]:
    """Unpack with the default limits in a fresh interpreter: (outcome, its peak RSS in KiB)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(layer), OCI_GZIP, str(rootfs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    return str(result["outcome"]), int(result["peak_kib"])


def test_a_100_mb_pax_header_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    size = 100 * MiB
    layer = _write_gzip(
        tmp_path / "pax",
        [_header("././@PaxHeader", size, tarfile.XHDTYPE)],
        _zeros(size),
        [_padding(size)],
        _member("after", b"hello"),
        _end(),
    )
    assert layer.stat().st_size < MiB
    outcome, peak_kib = _unpack_in_child(layer, tmp_path / "rootfs")
    print(f"peak RSS of the unpacking process: {peak_kib / 1024:.1f} MiB")
    assert "extended tar header of 104857600 bytes" in outcome
    assert peak_kib < PEAK_RSS_LIMIT_KIB, f"peak RSS {peak_kib} KiB"
    assert not (tmp_path / "rootfs" / "after").exists()


def _dir_header(name: str, mode: int = 0o755) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_600_000_000
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _deep_dirs(count: int, depth: int) -> Iterator[bytes]:
    """`count` directories `d<i>/a/a/.../a`, `depth` components each: no two share a parent."""
    tail = "/a" * (depth - 1)
    for i in range(count):
        yield _dir_header(f"d{i}{tail}")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one (hundreds of thousands of mkdirs are slow on
    disk), removed afterwards."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    with tempfile.TemporaryDirectory(dir=parent, prefix="skyreg-unpack-") as name:
        yield Path(name)


def test_many_distinct_deep_paths_keep_the_unpacker_memory_bounded(
    tmp_path: Path, scratch: Path
) -> None:
    # 2,000 entries of 200 components (~400 bytes each, within every limit): 400,000 distinct
    # path components, where remembering each ancestor path whole would take ~400 MB.
    layer = _write_gzip(tmp_path / "deep", _deep_dirs(2000, 200), _end())
    outcome, peak_kib = _unpack_in_child(layer, scratch / "rootfs")
    print(f"peak RSS of the unpacking process: {peak_kib / 1024:.1f} MiB")
    assert outcome == "unpacked"
    assert (scratch / "rootfs" / "d1999").joinpath(*["a"] * 199).is_dir()
    assert peak_kib < PEAK_RSS_LIMIT_KIB, f"peak RSS {peak_kib} KiB"


def test_a_path_deeper_than_the_depth_limit_is_refused(tmp_path: Path) -> None:
    assert UnpackLimits().path_depth == 256
    layer = _small_layer(tmp_path / "deep", {"ok": b"1", "a/" * 300 + "f": b"2"})
    with pytest.raises(UnpackLimitError, match="path of 301 components; the limit is 256"):
        unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs")
    cache, error = _build_in_cache(tmp_path / "cache", [layer], UnpackLimits(path_depth=100))
    assert "layer 1" in str(error) and "the limit is 100" in str(error)
    _assert_nothing_left(cache)


def test_path_components_past_four_times_the_entries_limit_are_refused(tmp_path: Path) -> None:
    # 10 entries (limit 100) of 50 distinct components each: 500 components to track > 400
    layer = _write_gzip(tmp_path / "deep", _deep_dirs(10, 50), _end())
    cache, error = _build_in_cache(tmp_path / "cache", [layer], UnpackLimits(entries=100))
    assert "more than 400 path components" in str(error), error
    _assert_nothing_left(cache)


def test_many_directories_then_many_whiteouts_unpack_correctly(tmp_path: Path) -> None:
    count = 10_000
    lower = _write_gzip(
        tmp_path / "lower",
        [_dir_header("w", 0o750)],
        (_dir_header(f"w/d{i}/sub", 0o700) for i in range(count)),
        _end(),
    )
    upper = _write_gzip(
        tmp_path / "upper",
        (piece for i in range(0, count, 2) for piece in _member(f"w/.wh.d{i}", b"")),
        _end(),
    )
    report = unpack_layers([(lower, OCI_GZIP), (upper, OCI_GZIP)], tmp_path / "rootfs")
    assert report.whiteouts == count // 2
    left = sorted(p.name for p in (tmp_path / "rootfs" / "w").iterdir())
    assert left == sorted(f"d{i}" for i in range(1, count, 2))
    assert (tmp_path / "rootfs" / "w").stat().st_mode & 0o7777 == 0o750
    assert (tmp_path / "rootfs" / "w" / "d1" / "sub").stat().st_mode & 0o7777 == 0o700


# -- sparse entries: holes cost disk like stored bytes ----------------------------------------

SPARSE_FLAVOURS = ("gnu-old", "pax-0.0", "pax-0.1", "pax-1.0")


def _octal(n: int, width: int) -> bytes:
    return b"%0*o" % (width - 1, n) + b"\0"


def _gnu_old_sparse_header(name: str, real: int, chunks: list[tuple[int, int]]) -> bytes:
    """An old GNU 'S' header (at most 4 chunks, no extension blocks), as GNU tar writes it."""
    h = bytearray(tarfile.BLOCKSIZE)
    h[0 : len(name)] = name.encode()
    h[100:108], h[108:116], h[116:124] = _octal(0o644, 8), _octal(0, 8), _octal(0, 8)
    h[124:136] = _octal(sum(size for _, size in chunks), 12)  # stored bytes
    h[136:148] = _octal(1_600_000_000, 12)
    h[156:157] = tarfile.GNUTYPE_SPARSE
    h[257:265] = tarfile.GNU_MAGIC
    for i, (offset, size) in enumerate(chunks):
        h[386 + 24 * i : 398 + 24 * i] = _octal(offset, 12)
        h[398 + 24 * i : 410 + 24 * i] = _octal(size, 12)
    h[483:495] = _octal(real, 12)  # the real size
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax_record(key: str, value: object) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _ustar_header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o644, 1_600_000_000
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _sparse_entry(flavour: str, name: str, real: int, chunks: list[tuple[int, bytes]]) -> bytes:
    """One sparse tar entry of `real` bytes holding `chunks` (offset, data), in `flavour`."""
    data = b"".join(d for _, d in chunks)
    sizes = [(offset, len(d)) for offset, d in chunks]
    if flavour == "gnu-old":
        return _gnu_old_sparse_header(name, real, sizes) + data + _padding(len(data))
    records = [_pax_record("GNU.sparse.numblocks", len(sizes))]
    stored_name = name
    if flavour == "pax-0.0":
        records.insert(0, _pax_record("GNU.sparse.size", real))
        for offset, size in sizes:
            records += [
                _pax_record("GNU.sparse.offset", offset),
                _pax_record("GNU.sparse.numbytes", size),
            ]
    elif flavour == "pax-0.1":
        records.insert(0, _pax_record("GNU.sparse.size", real))
        flat = ",".join(str(n) for pair in sizes for n in pair)
        records.append(_pax_record("GNU.sparse.map", flat))
    else:  # pax-1.0: the map is at the start of the data
        records = [
            _pax_record("GNU.sparse.major", 1),
            _pax_record("GNU.sparse.minor", 0),
            _pax_record("GNU.sparse.name", name),
            _pax_record("GNU.sparse.realsize", real),
        ]
        stored_name = f"GNUSparseFile.0/{name}"
        lines = [len(sizes)] + [n for pair in sizes for n in pair]
        sparse_map = "".join(f"{n}\n" for n in lines).encode()
        data = sparse_map + _padding(len(sparse_map)) + data
    pax = b"".join(records)
    return (
        _ustar_header("././@PaxHeader", len(pax), tarfile.XHDTYPE)
        + pax
        + _padding(len(pax))
        + _ustar_header(stored_name, len(data), tarfile.REGTYPE)
        + data
        + _padding(len(data))
    )


def _sparse_layer(path: Path, *entries: bytes) -> Path:
    path.write_bytes(gzip.compress(b"".join(entries) + bytes(2 * tarfile.BLOCKSIZE), mtime=0))
    return path


def test_the_87_byte_sparse_layer_claiming_256_mib_is_refused_before_writing(
    tmp_path: Path,
) -> None:
    # the reviewer's layer: one old GNU sparse entry, 512 stored bytes, 256 MiB real size
    entry = _sparse_entry("gnu-old", "big", 256 * MiB, [(0, b"A" * 512)])
    layer = _sparse_layer(tmp_path / "sparse", entry)
    assert layer.stat().st_size < 100
    limits = UnpackLimits(layer_bytes=MiB, image_bytes=MiB)
    with pytest.raises(UnpackLimitError, match="more than 1048576 bytes once decompressed"):
        unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs", limits=limits)
    assert not (tmp_path / "rootfs" / "big").exists()  # refused before anything was written
    cache, error = _build_in_cache(tmp_path / "cache", [layer], limits)
    assert "layer 1" in str(error) and "268434944 of them sparse holes" in str(error), error
    _assert_nothing_left(cache)


@pytest.mark.parametrize("flavour", SPARSE_FLAVOURS)
def test_every_sparse_flavour_is_charged_its_real_size(tmp_path: Path, flavour: str) -> None:
    entry = _sparse_entry(flavour, "big", 256 * MiB, [(0, b"A" * 512), (200 * MiB, b"B" * 512)])
    layer = _sparse_layer(tmp_path / "sparse", entry)
    limits = UnpackLimits(layer_bytes=MiB, image_bytes=MiB)
    cache, error = _build_in_cache(tmp_path / "cache", [layer], limits)
    assert "layer 1" in str(error) and "once decompressed" in str(error), error
    _assert_nothing_left(cache)


def test_sparse_layers_together_past_the_image_limit_are_refused(tmp_path: Path) -> None:
    one = _sparse_layer(tmp_path / "one", _sparse_entry("pax-1.0", "a", 3 * MiB, [(0, b"a")]))
    two = _sparse_layer(tmp_path / "two", _sparse_entry("pax-0.1", "b", 3 * MiB, [(0, b"b")]))
    limits = UnpackLimits(layer_bytes=4 * MiB, image_bytes=5 * MiB)
    cache, error = _build_in_cache(tmp_path / "cache", [one, two], limits)
    assert "image is larger than 5242880 bytes once decompressed" in str(error), error
    _assert_nothing_left(cache)


@pytest.mark.parametrize("flavour", SPARSE_FLAVOURS)
def test_a_sparse_entry_within_the_limits_keeps_its_holes(tmp_path: Path, flavour: str) -> None:
    real = 64 * MiB
    chunks = [(4096, b"A" * 4096), (32 * MiB, b"B" * 8192)]
    layer = _sparse_layer(tmp_path / "sparse", _sparse_entry(flavour, "big", real, chunks))
    limits = UnpackLimits(layer_bytes=real + MiB, image_bytes=real + MiB)
    report = unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs", limits=limits)
    assert report.files == 1 and report.rejected == []
    big = tmp_path / "rootfs" / "big"
    st = big.stat()
    assert st.st_size == real
    assert st.st_blocks * 512 < 4 * MiB  # holes stay holes (64 MiB of zeros were not written)
    with big.open("rb") as f:
        assert f.read(4096) == bytes(4096)
        assert f.read(4096) == b"A" * 4096
        f.seek(32 * MiB - 1)
        assert f.read(8194) == b"\0" + b"B" * 8192 + b"\0"
        f.seek(real - 1)
        assert f.read() == b"\0"


def test_a_sparse_entry_with_a_corrupt_map_is_a_clear_unpack_error(tmp_path: Path) -> None:
    records = _pax_record("GNU.sparse.size", MiB) + _pax_record("GNU.sparse.map", "0,x")
    layer = _sparse_layer(
        tmp_path / "bad",
        _ustar_header("././@PaxHeader", len(records), tarfile.XHDTYPE)
        + records
        + _padding(len(records))
        + _ustar_header("big", 0, tarfile.REGTYPE),
    )
    with pytest.raises(UnpackError, match="layer 1"):
        unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs")
    assert not (tmp_path / "rootfs" / "big").exists()


@pytest.mark.parametrize(
    "chunks",
    [[(MiB - 10, b"x" * 20)], [(4096, b"a" * 4096), (6000, b"b" * 10)], [(-1, b"x")]],
    ids=["past-the-end", "overlapping", "negative"],
)
def test_a_sparse_map_outside_the_file_is_refused(
    tmp_path: Path, chunks: list[tuple[int, bytes]]
) -> None:
    layer = _sparse_layer(tmp_path / "bad", _sparse_entry("pax-0.1", "big", MiB, chunks))
    with pytest.raises(UnpackError, match="sparse map"):
        unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs")
    assert not (tmp_path / "rootfs" / "big").exists()


def test_hard_links_to_a_large_file_cost_no_extra_bytes(tmp_path: Path) -> None:
    links = []
    for i in range(20):
        info = tarfile.TarInfo(f"link{i}")
        info.type, info.linkname = tarfile.LNKTYPE, "big"
        links.append(info.tobuf(format=tarfile.PAX_FORMAT))
    layer = _write_gzip(tmp_path / "links", _big_member("big", 3 * MiB), links, _end())
    limits = UnpackLimits(layer_bytes=4 * MiB, image_bytes=4 * MiB)
    report = unpack_layers([(layer, OCI_GZIP)], tmp_path / "rootfs", limits=limits)
    assert report.hardlinks == 20
    assert (tmp_path / "rootfs" / "link19").stat().st_nlink == 21
