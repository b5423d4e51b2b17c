"""Seekable layer indexes (skyreg/lazy/): the entries of gzip, zstd and plain tar layers as
tarfile reads them, every file's bytes read back by offset through the index with each chunk
verified, a flipped byte detected, and the bounds a hostile layer meets."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from skyreg.lazy.index import (
    GZIP_SPACING,
    UNSET_MTIME,
    IndexLimits,
    LayerIndex,
    LayerIndexError,
    NotIndexable,
    build,
    decode_index,
)
from skyreg.lazy.reader import CorruptChunk, LayerReader

CHUNK = 64 * 1024  # small chunks: many per file, so chunk edges are crossed


def _info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _layer_tar() -> bytes:
    """A layer with every kind of entry the unpacker meets."""
    buf = io.BytesIO()
    big = os.urandom(3 * 1024 * 1024 + 123)  # crosses chunks and gzip seek points
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
        errors="surrogateescape",
    ) as tar:  # fmt: skip
        tar.addfile(_info("etc", tarfile.DIRTYPE, mode=0o755))
        tar.addfile(
            _info("etc/hostname", size=6, uid=10, gid=20, mode=0o600), io.BytesIO(b"box\n\n\n")
        )
        tar.addfile(_info("usr/lib/big.bin", size=len(big), mode=0o755), io.BytesIO(big))
        tar.addfile(_info("empty", size=0))
        tar.addfile(_info("bin/sh", tarfile.SYMTYPE, linkname="/usr/bin/busybox", mode=0o777))
        tar.addfile(_info("etc/hostname.link", tarfile.LNKTYPE, linkname="etc/hostname"))
        tar.addfile(_info("dev/fifo", tarfile.FIFOTYPE))
        tar.addfile(_info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3))
        text = "caf\u00e9/\u65e5\u672c\u8a9e.txt"
        tar.addfile(_info(text, size=5), io.BytesIO(b"hello"))
        raw = b"latin1-\xe9-name".decode("utf-8", "surrogateescape")
        tar.addfile(_info(raw, size=3), io.BytesIO(b"raw"))
        with_xattr = _info("cap", size=1)
        with_xattr.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x02"}
        tar.addfile(with_xattr, io.BytesIO(b"c"))
        tar.addfile(_info("old/.wh.gone", size=0))
        tar.addfile(_info("opaque/.wh..wh..opq", size=0))
    return buf.getvalue()


def _zstd_frames(data: bytes, frame: int) -> bytes:
    """`data` as zstd frames of `frame` uncompressed bytes each (as zstd:chunked writes)."""
    compressor = zstandard.ZstdCompressor()
    return b"".join(compressor.compress(data[i : i + frame]) for i in range(0, len(data), frame))


class CountingSource:
    """A blob in memory, by range, counting the bytes asked for (as Range requests would)."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.read_bytes = 0
        self.requests = 0

    def read_range(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        self.requests += 1
        return self.blob[offset : offset + length]


def _index(blob: bytes, **kw: object) -> tuple[LayerIndex, bytes | None]:
    index, points = build(io.BytesIO(blob), "sha256:test", chunk_size=CHUNK, **kw)  # type: ignore[arg-type]
    return decode_index(index.encode()), points  # through its JSON, as a reader gets it


COMPRESSIONS = {
    "none": lambda tar: tar,
    "gzip": lambda tar: gzip.compress(tar, 6, mtime=0),
    "zstd": lambda tar: _zstd_frames(tar, 256 * 1024),
}


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_the_index_lists_every_entry_as_tarfile_reads_it(compression: str) -> None:
    tar = _layer_tar()
    index, _ = _index(COMPRESSIONS[compression](tar))
    assert index.compression == compression
    assert index.uncompressed_size == len(tar)
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as t:
        members = t.getmembers()
    assert len(index.entries) == len(members)
    for entry, member in zip(index.entries, members, strict=True):
        assert entry.raw_name() == member.name.encode("utf-8", "surrogateescape")
        assert (entry.mode, entry.uid, entry.gid, entry.mtime) == (
            member.mode, member.uid, member.gid, int(member.mtime),
        )  # fmt: skip
        assert entry.size == (member.size if member.isreg() else 0)
        if member.issym() or member.islnk():
            assert entry.raw_link() == member.linkname.encode()
    by_name = {e.name: e for e in index.entries}
    assert by_name["bin/sh"].type == "symlink" and by_name["bin/sh"].link == "/usr/bin/busybox"
    assert by_name["etc/hostname.link"].type == "hardlink"
    assert by_name["dev/fifo"].type == "fifo"
    assert (by_name["dev/null"].devmajor, by_name["dev/null"].devminor) == (1, 3)
    assert by_name["cap"].xattrs == {"security.capability": "AQI="}
    assert by_name["caf\u00e9/\u65e5\u672c\u8a9e.txt"].name_b64 is None
    [raw] = [e for e in index.entries if e.name_b64]
    assert raw.raw_name() == b"latin1-\xe9-name" and raw.name == "latin1-\ufffd-name"
    assert {e.name for e in index.entries if "/.wh." in e.name} == {
        "old/.wh.gone", "opaque/.wh..wh..opq",
    }  # fmt: skip


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_every_file_reads_back_through_the_index(compression: str) -> None:
    tar = _layer_tar()
    blob = COMPRESSIONS[compression](tar)
    index, points = _index(blob)
    reader = LayerReader(index, CountingSource(blob), points)
    with tarfile.open(fileobj=io.BytesIO(tar), encoding="utf-8", errors="surrogateescape") as t:
        for entry, member in zip(index.entries, t.getmembers(), strict=True):
            if member.isreg():
                extracted = t.extractfile(member)
                assert extracted is not None
                assert reader.read_file(entry) == extracted.read(), entry.name
    # Any range of the stream, across chunk edges.
    for offset, size in ((0, 10), (CHUNK - 5, 10), (len(tar) - 7, 100), (123_456, 3 * CHUNK)):
        assert reader.read(offset, size) == tar[offset : offset + size]
    reader.close()


def test_a_file_deep_in_a_gzip_layer_costs_one_seek_span_not_the_blob() -> None:
    data = os.urandom(24 * 1024 * 1024)  # incompressible: compressed offsets track these
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_info("filler", size=len(data)), io.BytesIO(data))
        tar.addfile(_info("app/main", size=11), io.BytesIO(b"entrypoint!"))
    blob = gzip.compress(buf.getvalue(), 6, mtime=0)
    index, points = _index(blob)
    source = CountingSource(blob)
    reader = LayerReader(index, source, points)
    [main] = [e for e in index.entries if e.name == "app/main"]
    assert reader.read_file(main) == b"entrypoint!"
    assert source.read_bytes <= 2 * GZIP_SPACING < len(blob) / 2


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_a_file_read_in_small_pieces_costs_one_range_request(compression: str) -> None:
    """A reader that says where its file ends (`until`) gets the file's compressed bytes in one
    range, however small its reads: over a long link every request is a round trip."""
    app = os.urandom(3 * 1024 * 1024 + 12345)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("filler", os.urandom(5 * 1024 * 1024)), ("app.bin", app),
                           ("after", os.urandom(6 * 1024 * 1024))):  # fmt: skip
            tar.addfile(_info(name, size=len(data)), io.BytesIO(data))
    blob = COMPRESSIONS[compression](buf.getvalue())
    index, points = _index(blob)
    [entry] = [e for e in index.entries if e.name == "app.bin"]
    assert entry.offset is not None
    source = CountingSource(blob)
    reader = LayerReader(index, source, points)
    got = b"".join(
        reader.read(entry.offset + at, min(128 * 1024, len(app) - at), entry.offset + entry.size)
        for at in range(0, len(app), 128 * 1024)
    )
    assert got == app
    assert source.requests == 1
    # From the seek point before the file's first chunk (one spacing back, two when a point
    # lies just after that chunk's start) to a little past its end; never the whole blob.
    assert source.read_bytes <= 2 * GZIP_SPACING + len(app) + 256 * 1024 < len(blob)


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_a_flipped_byte_is_detected_never_served(compression: str) -> None:
    tar = _layer_tar()
    blob = bytearray(COMPRESSIONS[compression](tar))
    index, points = _index(bytes(blob))
    [big] = [e for e in index.entries if e.name == "usr/lib/big.bin"]
    assert big.offset is not None
    # A byte in the middle of the big file's compressed bytes (for plain tar, its data).
    at = big.offset + big.size // 2 if compression == "none" else len(blob) // 2
    blob[at] ^= 0x40
    reader = LayerReader(index, CountingSource(bytes(blob)), points)
    with pytest.raises(CorruptChunk):
        reader.read_file(big)


def test_gzip_seek_points_that_do_not_match_the_index_are_refused() -> None:
    blob = gzip.compress(_layer_tar(), 6, mtime=0)
    index, points = _index(blob)
    assert points is not None
    with pytest.raises(CorruptChunk, match="seek points"):
        LayerReader(index, CountingSource(blob), points[:-1] + bytes([points[-1] ^ 1]))


def test_a_zstd_layer_of_one_frame_is_not_indexable() -> None:
    blob = zstandard.ZstdCompressor().compress(_layer_tar())
    with pytest.raises(NotIndexable):
        _index(blob)


def test_sparse_files_read_back_with_their_holes(tmp_path: Path) -> None:
    sparse = tmp_path / "tree" / "sparse.img"
    sparse.parent.mkdir()
    with sparse.open("wb") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"middle data")
        f.seek(9 * 1024 * 1024)
        f.write(b"end")
    archive = tmp_path / "layer.tar"
    subprocess.run(
        ["tar", "--format=gnu", "--sparse", "-cf", str(archive), "-C", str(sparse.parent), "."],
        check=True,
    )
    blob = gzip.compress(archive.read_bytes(), 6, mtime=0)
    index, points = _index(blob)
    [entry] = [e for e in index.entries if e.name.endswith("sparse.img")]
    assert entry.sparse is not None and entry.size == sparse.stat().st_size
    reader = LayerReader(index, CountingSource(blob), points)
    assert reader.read_file(entry) == sparse.read_bytes()


def test_a_layer_that_is_not_a_tar_is_refused() -> None:
    with pytest.raises(LayerIndexError, match="not a readable"):
        _index(gzip.compress(os.urandom(4096)))


def test_too_many_entries_or_bytes_stop_the_index() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(50):
            tar.addfile(_info(f"f{i}", size=1000), io.BytesIO(b"x" * 1000))
    tar_bytes = buf.getvalue()
    with pytest.raises(LayerIndexError, match="more than 10 entries"):
        _index(tar_bytes, limits=IndexLimits(max_entries=10))
    with pytest.raises(LayerIndexError, match="larger than 20000 bytes"):
        _index(gzip.compress(tar_bytes), limits=IndexLimits(max_bytes=20_000))


def test_an_index_that_does_not_cover_its_stream_is_refused() -> None:
    index, _ = _index(_layer_tar())
    index.chunks = index.chunks[:-1]
    with pytest.raises(LayerIndexError, match="do not cover"):
        decode_index(index.encode())


@pytest.mark.parametrize("mtime", ["nan", "inf", "1e400", "-1e30"])
def test_a_time_no_file_system_takes_is_indexed_as_unset(mtime: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = _info("f", size=1)
        info.pax_headers = {"mtime": mtime}
        tar.addfile(info, io.BytesIO(b"x"))
    index, _ = _index(buf.getvalue())
    assert index.entries[0].mtime == UNSET_MTIME
