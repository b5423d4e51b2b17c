"""Reading a layer's uncompressed stream at any offset through its index, from a source of the
compressed blob's byte ranges (a local file, Range requests to a registry). Every chunk served
is checked against the index's SHA-256 first: a corrupted range raises `CorruptChunk` and is
never returned (the caller fetches it again, from elsewhere if it must)."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from typing import Protocol

import indexed_gzip
import zstandard

from skyreg.lazy.index import Entry, LayerIndex, LayerIndexError

CACHED_CHUNKS = 16  # decoded chunks kept per reader
GZIP_READ = 256 * 1024  # compressed bytes one read of a gzip layer asks for


class CorruptChunk(LayerIndexError):
    """Bytes that do not match the index's digest of their chunk."""


class RangeSource(Protocol):
    """The compressed blob, by byte range."""

    def read_range(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer only at the blob's end)."""
        ...


class FileSource:
    """A blob in a local file."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def read_range(self, offset: int, length: int) -> bytes:
        with self._lock:
            self._file.seek(offset)
            return self._file.read(length)

    def close(self) -> None:
        self._file.close()


class _RangeFile(io.RawIOBase):
    """A RangeSource as the seekable file indexed_gzip reads."""

    def __init__(self, source: RangeSource, size: int) -> None:
        self._source = source
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._source.read_range(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class LayerReader:
    """The uncompressed stream of one layer, read by offset through its index."""

    def __init__(
        self, index: LayerIndex, source: RangeSource, gzip_points: bytes | None = None
    ) -> None:
        if index.compression == "gzip" and gzip_points is None:
            raise LayerIndexError("a gzip layer's reader needs its seek points")
        if gzip_points is not None:
            digest = "sha256:" + hashlib.sha256(gzip_points).hexdigest()
            if digest != index.gzip_points:
                raise CorruptChunk("the gzip seek points do not match the index's digest")
        self.index = index
        self._source = source
        self._points = gzip_points
        self._gzip: indexed_gzip.IndexedGzipFile | None = None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
            self._gzip = None

    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes of the uncompressed stream from `offset` (fewer at its end)."""
        end = min(offset + size, self.index.uncompressed_size)
        if offset >= end:
            return b""
        step = self.index.chunk_size
        parts = []
        for number in range(offset // step, (end - 1) // step + 1):
            chunk = self.chunk(number)
            start = number * step
            parts.append(chunk[max(offset - start, 0) : end - start])
        return b"".join(parts)

    def read_file(self, entry: Entry) -> bytes:
        """A regular file's whole contents (a sparse file with its holes as zeros)."""
        if entry.type != "file" or entry.offset is None:
            raise LayerIndexError(f"{entry.name} is not a regular file")
        if entry.sparse is None:
            return self.read(entry.offset, entry.size)
        out = bytearray(entry.size)
        at = entry.offset
        for start, length in entry.sparse:
            out[start : start + length] = self.read(at, length)
            at += length
        return bytes(out)

    def chunk(self, number: int) -> bytes:
        """The verified uncompressed chunk `number`."""
        with self._lock:
            found = self._cache.get(number)
            if found is not None:
                self._cache.move_to_end(number)
                return found
            data = self._decode(number)
            expected = self.index.chunks[number]
            if hashlib.sha256(data).hexdigest() != expected:
                self.close()  # decoder state may hold the bad bytes
                raise CorruptChunk(
                    f"layer {self.index.digest}: chunk {number} does not match its digest"
                )
            self._cache[number] = data
            if len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
            return data

    def _decode(self, number: int) -> bytes:
        index = self.index
        start = number * index.chunk_size
        length = min(index.chunk_size, index.uncompressed_size - start)
        if index.compression == "none":
            return self._source.read_range(start, length)
        if index.compression == "zstd":
            return self._zstd(start, length)
        return self._gzip_read(start, length)

    def _gzip_read(self, start: int, length: int) -> bytes:
        if self._gzip is None:
            raw = _RangeFile(self._source, self.index.compressed_size)
            # Small reads of the compressed blob (each is a Range request), no read-ahead
            # beyond a chunk: a random read costs its seek span, not 16 MiB.
            stream = indexed_gzip.IndexedGzipFile(
                fileobj=raw,
                drop_handles=False,
                readbuf_size=GZIP_READ,
                buffer_size=self.index.chunk_size,
            )
            assert self._points is not None
            stream.import_index(fileobj=io.BytesIO(self._points))
            self._gzip = stream
        try:
            self._gzip.seek(start)
            return bytes(self._gzip.read(length))
        except (indexed_gzip.ZranError, OSError, EOFError) as e:
            self.close()
            raise CorruptChunk(f"layer {self.index.digest}: {e}") from e

    def _zstd(self, start: int, length: int) -> bytes:
        frames = self.index.frames
        first = max(i for i, f in enumerate(frames) if f.uncompressed <= start)
        out = bytearray()
        at = frames[first].uncompressed
        number = first
        while at + len(out) < start + length and number < len(frames):
            begin = frames[number].compressed
            stop = (
                frames[number + 1].compressed
                if number + 1 < len(frames)
                else self.index.compressed_size
            )
            try:
                obj = zstandard.ZstdDecompressor().decompressobj()
                out += obj.decompress(self._source.read_range(begin, stop - begin))
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"layer {self.index.digest}: {e}") from e
            number += 1
        offset = start - at
        return bytes(out[offset : offset + length])
