"""Reading a layer's uncompressed stream at any offset through its index, from a source of the
compressed blob's byte ranges (a local file, Range requests to a registry). Every chunk served
is checked against the index's SHA-256 first: a corrupted range raises `CorruptChunk` and is
never returned (the caller fetches it again, from elsewhere if it must).

One request per read, not one per buffer: a read says how far its caller will likely go (`until`:
the end of the file being read, at most `READAHEAD` past the chunk), and the compressed bytes
from the chunk's seek point to an estimate of where that end lies in the blob (interpolated
between the seek points around it, plus a margin) come in one range, kept as a window that the
decoder then reads from. Over a long link a range costs a round trip more than its bytes, so a
file is mostly one round trip, whatever its number of chunks; an estimate that falls short costs
one more request, never wrong bytes."""

from __future__ import annotations

import bisect
import hashlib
import io
import threading
from collections import OrderedDict
from typing import Protocol

import indexed_gzip
import zstandard

from skyreg.lazy.index import Entry, LayerIndex, LayerIndexError

CACHED_CHUNKS = 256  # decoded chunks kept per reader (16 MiB)
GZIP_READ = 64 * 1024  # compressed bytes the gzip decoder takes from its window at a time
READAHEAD = 16 << 20  # uncompressed bytes past a chunk one read may fetch for its caller
MIN_FETCH = 256 * 1024  # the smallest range asked for beyond what a read needs
WINDOW_MARGIN = 64 * 1024 + GZIP_READ  # past an estimated end: a deflate block, and a decoder read


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


class _Window:
    """The compressed blob through one window of bytes: a read outside it fetches a new one
    from there to at least `want_until` (set before each decode), in one range."""

    def __init__(self, source: RangeSource, size: int) -> None:
        self._source = source
        self._size = size
        self._start = 0
        self._data = b""
        self.want_until = 0

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer only at the blob's end)."""
        end = min(offset + length, self._size)
        if offset >= end:
            return b""
        if not (self._start <= offset and end <= self._start + len(self._data)):
            stop = min(self._size, max(end, offset + MIN_FETCH, self.want_until))
            self._start, self._data = offset, self._source.read_range(offset, stop - offset)
        at = offset - self._start
        return self._data[at : at + end - offset]

    def drop(self) -> None:
        self._data = b""


class _RangeFile(io.RawIOBase):
    """A `_Window` over the compressed blob as the seekable file indexed_gzip reads."""

    def __init__(self, window: _Window, size: int) -> None:
        self._source = window
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
        data = self._source.read(self._pos, want)
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
        self._points_at: list[tuple[int, int]] = []  # (uncompressed, compressed), ascending
        self._window = _Window(source, index.compressed_size)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
            self._gzip = None
        self._window.drop()

    def read(self, offset: int, size: int, until: int | None = None) -> bytes:
        """`size` bytes of the uncompressed stream from `offset` (fewer at its end); `until`:
        how far the caller will likely read (the end of its file), fetched along if near."""
        end = min(offset + size, self.index.uncompressed_size)
        if offset >= end:
            return b""
        step = self.index.chunk_size
        parts = []
        for number in range(offset // step, (end - 1) // step + 1):
            chunk = self.chunk(number, until)
            start = number * step
            parts.append(chunk[max(offset - start, 0) : end - start])
        return b"".join(parts)

    def read_file(self, entry: Entry) -> bytes:
        """A regular file's whole contents (a sparse file with its holes as zeros)."""
        if entry.type != "file" or entry.offset is None:
            raise LayerIndexError(f"{entry.name} is not a regular file")
        if entry.sparse is None:
            return self.read(entry.offset, entry.size, entry.offset + entry.size)
        out = bytearray(entry.size)
        at = entry.offset
        stored = sum(length for _, length in entry.sparse)
        for start, length in entry.sparse:
            out[start : start + length] = self.read(at, length, entry.offset + stored)
            at += length
        return bytes(out)

    def chunk(self, number: int, until: int | None = None) -> bytes:
        """The verified uncompressed chunk `number` (`until`: as for `read`)."""
        with self._lock:
            found = self._cache.get(number)
            if found is not None:
                self._cache.move_to_end(number)
                return found
            data = self._decode(number, until)
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

    def _decode(self, number: int, until: int | None) -> bytes:
        index = self.index
        start = number * index.chunk_size
        length = min(index.chunk_size, index.uncompressed_size - start)
        # How far this read goes, uncompressed: its chunk, and up to READAHEAD more its caller
        # will likely want, to the end of a chunk (never past the stream).
        reach = max(start + length, min(until or 0, start + length + READAHEAD))
        step = index.chunk_size
        reach = min(index.uncompressed_size, -(-reach // step) * step)
        if index.compression == "none":
            self._window.want_until = reach
            return self._window.read(start, length)
        if index.compression == "zstd":  # whole frames, up to the one holding `reach`
            after = [f.compressed for f in index.frames if f.uncompressed > reach]
            self._window.want_until = after[0] if after else index.compressed_size
            return self._zstd(start, length)
        return self._gzip_read(start, length, reach)

    def _compressed_end(self, reach: int) -> int:
        """Where in the blob the uncompressed offset `reach` likely lies (a little past it):
        interpolated between the seek points around it, plus `WINDOW_MARGIN`."""
        points = self._points_at
        index = self.index
        i = bisect.bisect_right(points, (reach, index.compressed_size))
        u0, c0 = points[i - 1] if i > 0 else (0, 0)
        u1, c1 = points[i] if i < len(points) else (index.uncompressed_size, index.compressed_size)
        span = max(u1 - u0, 1)
        estimate = c0 + (c1 - c0) * (reach - u0) // span
        # The margin: 2 % of the span between the points (compression is not even within
        # it) and a deflate block's worth.
        return min(index.compressed_size, estimate + (c1 - c0) // 50 + WINDOW_MARGIN)

    def _gzip_read(self, start: int, length: int, reach: int) -> bytes:
        if self._gzip is None:
            raw = _RangeFile(self._window, self.index.compressed_size)
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
            self._points_at = sorted((int(u), int(c)) for u, c in stream.seek_points())
        self._window.want_until = self._compressed_end(reach)
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
                out += obj.decompress(self._window.read(begin, stop - begin))
            except zstandard.ZstdError as e:
                raise CorruptChunk(f"layer {self.index.digest}: {e}") from e
            number += 1
        offset = start - at
        return bytes(out[offset : offset + length])
