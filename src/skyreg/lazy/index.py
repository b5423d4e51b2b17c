"""Seekable indexes of layer blobs: what a machine needs to read one file of a layer without the
whole blob (lazy pull; the format is docs/lazy-index.md).

An index lists the layer's tar entries as the unpacker sees them (name, type, mode, owner, size,
link target, extended attributes, sparse map) with the offset of each file's data in the
*uncompressed* stream, the SHA-256 of every `chunk_size` bytes of that stream (every byte a
reader serves is verified), and how to start decompressing near any offset:

- gzip: seek points about every `GZIP_SPAN` compressed bytes, each with zlib's 32 KiB window
  (indexed_gzip's export, a blob of its own: `GZIP_POINTS_MEDIA_TYPE`), so reading any file costs
  one Range request from the point before it;
- zstd: the blob's frames (compressed and uncompressed offsets); a blob of one frame has no
  index (reading anything means reading it all: `NotIndexable`);
- uncompressed tar: offsets are the blob's own.

`build` reads the blob once, sequentially, bounded by `IndexLimits`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import tarfile
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

import indexed_gzip
import msgspec
import zstandard

from skyreg.scan.layerstream import ScanError, checked_tarinfo

INDEX_VERSION = 1
INDEX_MEDIA_TYPE = "application/vnd.skyreg.layer-index.v1+json"
GZIP_POINTS_MEDIA_TYPE = "application/vnd.skyreg.gzip-seek-points.v1"
ARTIFACT_TYPE = "application/vnd.skyreg.lazy-index.v1"
LAYER_ANNOTATION = "dev.skyreg.lazy.layer"  # on a referrer's blob: the layer it describes
CHUNK_SIZE = 64 << 10  # uncompressed bytes one digest covers (a read's smallest unit)
GZIP_SPAN = 512 << 10  # compressed bytes aimed for between gzip seek points
GZIP_SPACING = 4 << 20  # uncompressed bytes between gzip seek points, at most
MIN_GZIP_SPACING = 256 << 10  # ... and at least
_READ = 1 << 16
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR = "SCHILY.xattr."


class LayerIndexError(Exception):
    """A layer that cannot be indexed: not a tar, corrupt, over a limit (the message says)."""


class NotIndexable(LayerIndexError):
    """A layer whose compression allows no random access (a single zstd frame)."""


@dataclass(frozen=True)
class IndexLimits:
    """Bounds on what one layer's index may hold and cost."""

    max_entries: int = 500_000
    max_bytes: int = 64 << 30  # uncompressed bytes of the layer
    max_header_bytes: int = 1 << 20  # extended tar headers of one entry
    max_name_bytes: int = 4096
    max_frames: int = 1 << 20  # zstd frames


class Entry(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """One tar entry. `name`/`link` are the tar's text; where a name is not UTF-8, `name_b64`
    (`link_b64`) holds its bytes and `name` shows them with U+FFFD. `offset`: where a file's
    data starts in the uncompressed stream; `sparse`: (file offset, length) of each stored run
    of a sparse file, stored one after the other from `offset`."""

    name: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    offset: int | None = None
    link: str | None = None
    name_b64: str | None = None
    link_b64: str | None = None
    uname: str | None = None
    gname: str | None = None
    devmajor: int | None = None
    devminor: int | None = None
    xattrs: dict[str, str] | None = None  # name -> base64 of the value
    sparse: list[tuple[int, int]] | None = None

    def raw_name(self) -> bytes:
        """The entry's name as the tar holds it."""
        return base64.b64decode(self.name_b64) if self.name_b64 else self.name.encode()

    def raw_link(self) -> bytes | None:
        if self.link_b64:
            return base64.b64decode(self.link_b64)
        return None if self.link is None else self.link.encode()


class Frame(msgspec.Struct, array_like=True):
    """Where a zstd frame starts: in the blob and in the uncompressed stream."""

    compressed: int
    uncompressed: int


class LayerIndex(msgspec.Struct, forbid_unknown_fields=True):
    """A layer blob's index (docs/lazy-index.md)."""

    digest: str  # of the compressed blob
    compression: str  # "gzip", "zstd" or "none"
    compressed_size: int
    uncompressed_size: int
    chunk_size: int
    chunks: list[str]  # hex SHA-256 of each `chunk_size` bytes of the uncompressed stream
    entries: list[Entry]
    frames: list[Frame] = msgspec.field(default_factory=list)  # zstd
    gzip_points: str | None = None  # digest of the gzip seek points blob
    version: int = INDEX_VERSION

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def decode_index(raw: bytes) -> LayerIndex:
    """An index from its JSON; LayerIndexError when it is not one (or of another version)."""
    try:
        index = msgspec.json.decode(raw, type=LayerIndex)
    except msgspec.DecodeError as e:
        raise LayerIndexError(f"not a layer index: {e}") from None
    if index.version != INDEX_VERSION:
        raise LayerIndexError(f"layer index version {index.version} is not {INDEX_VERSION}")
    if index.chunk_size <= 0 or len(index.chunks) != -(
        -index.uncompressed_size // index.chunk_size
    ):
        raise LayerIndexError("layer index: its chunk digests do not cover its stream")
    return index


def compression_of(magic: bytes) -> str:
    """The compression a blob's first bytes say."""
    if magic.startswith(_GZIP_MAGIC):
        return "gzip"
    if magic.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Digests:
    """The uncompressed stream as tarfile reads it: counted, bounded, hashed by chunk."""

    def __init__(self, raw: IO[bytes], limit: int, chunk_size: int) -> None:
        self._raw = raw
        self._limit = limit
        self._chunk_size = chunk_size
        self._hash = hashlib.sha256()
        self._in_chunk = 0
        self.chunks: list[str] = []
        self.total = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = _READ
        data = self._raw.read(size)
        self._take(data)
        return data

    def _take(self, data: bytes) -> None:
        self.total += len(data)
        if self.total > self._limit:
            raise LayerIndexError(f"the layer is larger than {self._limit} bytes uncompressed")
        view = memoryview(data)
        while view:
            room = self._chunk_size - self._in_chunk
            part, view = view[:room], view[room:]
            self._hash.update(part)
            self._in_chunk += len(part)
            if self._in_chunk == self._chunk_size:
                self.chunks.append(self._hash.hexdigest())
                self._hash = hashlib.sha256()
                self._in_chunk = 0

    def drain(self) -> None:
        """Read to the end (tar padding, trailing blocks) and close the last chunk."""
        while self.read(_READ):
            pass
        if self._in_chunk:
            self.chunks.append(self._hash.hexdigest())
            self._hash = hashlib.sha256()
            self._in_chunk = 0


class _ZstdFrames:
    """A zstd blob decompressed frame by frame, noting where each frame starts."""

    def __init__(self, raw: IO[bytes], max_frames: int) -> None:
        self._raw = raw
        self._max = max_frames
        self._decompressor = zstandard.ZstdDecompressor()
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._pending = b""  # compressed bytes not yet fed
        self._consumed = 0  # compressed bytes fed to finished frames and the current one
        self._out = 0
        self._buffer = b""
        self.frames: list[Frame] = []
        self._eof = False

    def _start_frame(self) -> None:
        self.frames.append(Frame(self._consumed, self._out))
        if len(self.frames) > self._max:
            raise LayerIndexError(f"more than {self._max} zstd frames")
        self._obj = self._decompressor.decompressobj()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = _READ
        while len(self._buffer) < size and not self._eof:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _fill(self) -> None:
        if not self._pending:
            self._pending = self._raw.read(_READ)
            if not self._pending:
                if self._obj is not None and not self._obj.eof:
                    raise LayerIndexError("the zstd stream ends inside a frame")
                self._eof = True
                return
        if self._obj is None or self._obj.eof:
            self._start_frame()
        obj = self._obj
        assert obj is not None
        fed = self._pending
        out = obj.decompress(fed)
        unused = obj.unused_data if obj.eof else b""
        self._consumed += len(fed) - len(unused)
        self._pending = unused
        self._out += len(out)
        self._buffer += out


def _text(raw: str, what: str, limit: int) -> tuple[str, str | None]:
    """(UTF-8 text, base64 of the bytes when they are not UTF-8) of a tar name."""
    data = raw.encode("utf-8", "surrogateescape")
    if len(data) > limit:
        raise LayerIndexError(f"a {what} of more than {limit} bytes")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), base64.b64encode(data).decode()


UNSET_MTIME = 1 << 62  # a time no file system takes: the unpacker leaves such a time unset


def _mtime(value: float) -> int:
    """Whole seconds of a tar time; UNSET_MTIME for NaN, infinities and times past 2^62 s."""
    if not math.isfinite(value) or abs(value) >= UNSET_MTIME:
        return UNSET_MTIME
    return int(value)


def _entry(info: tarfile.TarInfo, limits: IndexLimits) -> Entry:
    kind = _TYPES.get(info.type)
    if kind is None:
        raise LayerIndexError(f"tar entry type {info.type!r} is not indexed")
    name, name_b64 = _text(info.name, "name", limits.max_name_bytes)
    entry = Entry(
        name=name,
        name_b64=name_b64,
        type=kind,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        size=info.size if kind == "file" else 0,
        mtime=_mtime(info.mtime),
        uname=info.uname or None,
        gname=info.gname or None,
    )
    if kind == "file":
        entry.offset = info.offset_data
        sparse = cast(list[tuple[int, int]] | None, getattr(info, "sparse", None))
        if sparse is not None:
            entry.sparse = [(int(o), int(n)) for o, n in sparse]
    if kind in ("symlink", "hardlink"):
        entry.link, entry.link_b64 = _text(info.linkname, "link target", limits.max_name_bytes)
    if kind in ("char", "block"):
        entry.devmajor, entry.devminor = info.devmajor, info.devminor
    xattrs = {
        key[len(_XATTR) :]: base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
        for key, value in info.pax_headers.items()
        if key.startswith(_XATTR)
    }
    if xattrs:
        entry.xattrs = xattrs
    return entry


def build(
    raw: BinaryIO,
    digest: str,
    limits: IndexLimits | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[LayerIndex, bytes | None]:
    """The index of the layer blob `raw` (a seekable file, read from its start) and, for gzip,
    its seek points. NotIndexable for a single-frame zstd blob; LayerIndexError for a layer
    that is not a readable tar or breaks a limit."""
    limits = limits or IndexLimits()
    raw.seek(0)
    magic = raw.read(4)
    raw.seek(0, io.SEEK_END)
    compressed_size = raw.tell()
    raw.seek(0)
    compression = compression_of(magic)
    try:
        if compression == "gzip":
            return _build_gzip(raw, digest, compressed_size, limits, chunk_size)
        if compression == "zstd":
            frames = _ZstdFrames(raw, limits.max_frames)
            index = _walk(frames, digest, "zstd", compressed_size, limits, chunk_size)
            if len(frames.frames) < 2:
                raise NotIndexable("a zstd layer of one frame: no random access")
            index.frames = frames.frames
            return index, None
        return _walk(raw, digest, "none", compressed_size, limits, chunk_size), None
    except (ScanError, tarfile.TarError, EOFError, zstandard.ZstdError, OSError) as e:
        raise LayerIndexError(f"layer {digest}: {e}") from e


def _gzip_spacing(raw: BinaryIO, compressed_size: int) -> int:
    """Uncompressed bytes between seek points such that about `GZIP_SPAN` compressed bytes lie
    between two (a read decodes from the point before it: that is what it costs beyond its own
    bytes; each point holds a 32 KiB window, so the points are about 6 % of the blob whatever
    its compression), from the ratio the gzip trailer's size gives. A trailer that cannot be
    the whole size (a multi-member blob, 4 GiB or more) gives `GZIP_SPACING`."""
    if compressed_size < 18:
        return GZIP_SPACING
    raw.seek(compressed_size - 4)
    isize = int.from_bytes(raw.read(4), "little")  # uncompressed size mod 2**32
    raw.seek(0)
    if isize < compressed_size * 9 // 10:
        return GZIP_SPACING
    spacing = GZIP_SPAN * isize // compressed_size
    return max(MIN_GZIP_SPACING, min(GZIP_SPACING, spacing))


def _build_gzip(
    raw: BinaryIO, digest: str, compressed_size: int, limits: IndexLimits, chunk_size: int
) -> tuple[LayerIndex, bytes]:
    spacing = _gzip_spacing(raw, compressed_size)
    stream = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=spacing, drop_handles=False)
    try:
        index = _walk(cast(IO[bytes], stream), digest, "gzip", compressed_size, limits, chunk_size)
        stream.build_full_index()  # reading creates points only some way behind the reads
        points = io.BytesIO()
        stream.export_index(fileobj=points)
        data = points.getvalue()
    except indexed_gzip.ZranError as e:
        raise LayerIndexError(f"layer {digest}: not a readable gzip stream: {e}") from e
    finally:
        stream.close()
    index.gzip_points = "sha256:" + hashlib.sha256(data).hexdigest()
    return index, data


def _walk(
    stream: IO[bytes] | _ZstdFrames,
    digest: str,
    compression: str,
    compressed_size: int,
    limits: IndexLimits,
    chunk_size: int,
) -> LayerIndex:
    counted = _Digests(cast(IO[bytes], stream), limits.max_bytes, chunk_size)
    tarinfo = checked_tarinfo(limits.max_header_bytes, f"layer {digest}")
    entries: list[Entry] = []
    try:
        tar = tarfile.open(  # noqa: SIM115 - closed below
            fileobj=cast(IO[bytes], counted),
            mode="r|",
            tarinfo=tarinfo,
            encoding="utf-8",
            errors="surrogateescape",
        )
    except tarfile.ReadError as e:
        raise LayerIndexError(f"layer {digest} is not a readable tar: {e}") from e
    with tar:
        for info in tar:
            if len(entries) >= limits.max_entries:
                raise LayerIndexError(f"more than {limits.max_entries} entries")
            entries.append(_entry(info, limits))
    counted.drain()
    return LayerIndex(
        digest=digest,
        compression=compression,
        compressed_size=compressed_size,
        uncompressed_size=counted.total,
        chunk_size=chunk_size,
        chunks=counted.chunks,
        entries=entries,
    )
