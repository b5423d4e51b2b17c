"""Hostile layer blobs, package databases and OSV exports, built in memory and fast (bombs are
made from repeated blocks or read lazily, never written out whole)."""

from __future__ import annotations

import io
import sqlite3
import struct
import tarfile
import zlib
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from skyreg.scan.index import Layer

BLOCK = 512
_ZEROS = bytes(1 << 20)


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, **attrs: object) -> bytes:
    """One ustar/GNU header block for `name` (GNU long-name blocks first when it is long)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, 0o644, 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def pax_header(records: dict[str, str], name: str = "f", size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 1_600_000_000
    info.pax_headers = records
    return info.tobuf(format=tarfile.PAX_FORMAT)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs: object) -> bytes:
    return header(name, len(data), kind, **attrs) + padded(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


def gnu_sparse_bomb(extensions: int) -> bytes:
    """An old-style GNU sparse entry followed by `extensions` extension blocks, each saying
    another follows (tarfile keeps 21 pairs of each)."""
    raw = bytearray(header("sparse", 0, tarfile.GNUTYPE_SPARSE))
    raw[482] = 1  # isextended
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\x00 " % sum(raw[:BLOCK])
    ext = bytearray(BLOCK)
    for i in range(21):
        ext[i * 24 : i * 24 + 24] = b"%011o\x00%011o\x00" % (i + 1, 1)
    ext[504] = 1
    return bytes(raw[:BLOCK]) + bytes(ext) * extensions


def gnu_sparse10_bomb(numbers: int) -> bytes:
    """A PAX GNU sparse 1.0 entry whose map claims 10**15 pairs and lists `numbers` of them."""
    pax = pax_header(
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1"},
        size=(numbers * 2) + 32,
    )
    return pax + b"1000000000000000\n" + b"1\n" * numbers


def gzip_stream(parts: list[bytes | tuple[int]]) -> bytes:
    """gzip of the concatenated parts; a `(n,)` part is n zero bytes, compressed a MiB at a
    time."""
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [comp.compress(p) if isinstance(p, bytes) else _zeros(comp.compress, p[0]) for p in parts]
    out.append(comp.flush())
    return b"".join(out)


def zstd_stream(parts: list[bytes | tuple[int]]) -> bytes:
    comp = zstandard.ZstdCompressor(level=1).compressobj()
    out = [comp.compress(p) if isinstance(p, bytes) else _zeros(comp.compress, p[0]) for p in parts]
    out.append(comp.flush())
    return b"".join(out)


def _zeros(compress: Callable[[bytes], bytes], n: int) -> bytes:
    out = []
    while n > 0:
        chunk = _ZEROS[: min(n, len(_ZEROS))]
        out.append(compress(chunk))
        n -= len(chunk)
    return b"".join(out)


class ZeroTail(io.RawIOBase):
    """`head` followed by `size` zero bytes, made as they are read (a huge plain tar member
    without holding it)."""

    def __init__(self, head: bytes, size: int) -> None:
        self._head = head
        self._left = size
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(target), len(self._head))
            target[:n] = self._head[:n]
            self._head = self._head[n:]
        else:
            n = min(len(target), self._left)
            target[:n] = bytes(n)
            self._left -= n
        self.served += n
        return n


def layer(data: bytes | Callable[[], BinaryIO], digest: str = "sha256:" + "a" * 64) -> Layer:
    """A `Layer` of `data` (bytes, or an opener)."""
    if isinstance(data, bytes):
        blob = data
        return Layer(digest, "application/vnd.oci.image.layer.v1.tar", lambda: io.BytesIO(blob))
    return Layer(digest, "application/vnd.oci.image.layer.v1.tar", data)


# -- package databases ----------------------------------------------------------------------------


def rpm_header(tags: list[tuple[int, int, int, int]], store: bytes) -> bytes:
    """An RPM header blob: index entries (tag, type, offset, count) over `store`."""
    index = b"".join(struct.pack(">IIiI", *t) for t in tags)
    return struct.pack(">II", len(tags), len(store)) + index + store


def rpmdb(blobs: list[bytes] | None = None, schema: str | None = None) -> bytes:
    """A valid SQLite database with a `Packages` table of `blobs`, or the given schema."""
    conn = sqlite3.connect(":memory:")
    try:
        if schema is not None:
            conn.executescript(schema)
        else:
            conn.execute("CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, blob BLOB NOT NULL)")
            conn.executemany("INSERT INTO Packages (blob) VALUES (?)", [(b,) for b in blobs or []])
            conn.commit()
        return conn.serialize()
    finally:
        conn.close()


def fake_go_elf(version_len: int, info_len: int, body: bytes = b"", pad: int = 0) -> bytes:
    """An ELF file with Go's build-info magic (inline format) whose two varint lengths say
    `version_len` and `info_len`, followed by `body` (lying lengths: more than follows)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            if n:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return bytes(out)

    magic = b"\xff Go buildinf:" + bytes([8, 0x2])
    head = magic + bytes(32 - len(magic))
    return b"\x7fELF" + bytes(12 + pad) + head + varint(version_len) + varint(info_len) + body


# -- OSV exports --------------------------------------------------------------------------------


def zip_many_members(count: int) -> bytes:
    """A zip whose central directory lists `count` (empty, stored) members that share one
    local header: what `ZipFile` parses whole when it opens the file."""
    name = b"a.json"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0)
    local += name
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII",
        *(b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0),
    )
    central += name
    directory = central * count
    if count < 0xFFFF:
        eocd = struct.pack(
            "<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(local), 0
        )
        return local + directory + eocd
    offset = len(local) + len(directory)
    zip64_eocd = struct.pack(
        "<4sQHHIIQQQQ",
        *(b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), len(local)),
    )
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, offset, 1)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + zip64_eocd + locator + eocd
