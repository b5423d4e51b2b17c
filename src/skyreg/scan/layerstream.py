"""Layer blobs as tar streams for the indexer: decompression told by magic bytes (gzip, zstd,
else plain tar), every decompressed byte counted against the image's limit, and extended tar
headers (PAX, GNU long names) bounded before `tarfile` reads them whole."""

from __future__ import annotations

import gzip
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, BinaryIO, Protocol, Self, cast

import zstandard

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_CHAINED_HEADERS = 8
_EXTENDED_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


class ScanError(Exception):
    """A layer is not a tar, is corrupt, or breaks one of the indexer's limits (`IndexLimits`);
    the message names the layer and the limit."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Counted:
    """The decompressed bytes of a layer, counted against the image's byte limit (the size of
    extended headers is checked by `checked_tarinfo` before tarfile reads them)."""

    def __init__(self, raw: Readable, limit: int, total: list[int], label: str) -> None:
        self._raw = raw
        self._limit = limit
        self._total = total
        self.label = label

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ScanError(f"{self.label}: unbounded read")
        data = self._raw.read(size)
        self._total[0] += len(data)
        if self._total[0] > self._limit:
            raise ScanError(
                f"{self.label}: the image is larger than {self._limit} bytes once "
                "decompressed (limit max_bytes)"
            )
        return data


@contextmanager
def open_layer(opener: Callable[[], BinaryIO]) -> Iterator[Readable]:
    """The decompressed bytes of the blob `opener` opens (by its magic bytes, whatever the
    media type says)."""
    with ExitStack() as stack:
        raw: IO[bytes] = stack.enter_context(opener())
        head = _Peek(raw)
        magic = head.peek(4)
        if magic.startswith(_GZIP_MAGIC):
            yield stack.enter_context(gzip.GzipFile(fileobj=cast(IO[bytes], head), mode="rb"))
        elif magic.startswith(_ZSTD_MAGIC):
            reader = zstandard.ZstdDecompressor().stream_reader(
                cast(IO[bytes], head), read_across_frames=True
            )
            yield stack.enter_context(reader)
        else:
            yield head


class _Peek:
    """A reader that can look at its first bytes without a seek (blobs may be streams)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self._raw.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            if len(data) < size:
                data += self._raw.read(size - len(data))
            return data
        return self._raw.read(size)


@contextmanager
def open_tar(
    stream: Counted, tarinfo: type[tarfile.TarInfo], label: str
) -> Iterator[tarfile.TarFile]:
    """`stream` as a tar read in stream mode (each member once, forward only)."""
    try:
        # closed by the `with` below
        # Names that are not UTF-8 get U+FFFD (not surrogate escapes): what the indexer keeps
        # is stored and served as JSON, which holds no lone surrogates.
        tar = tarfile.open(  # noqa: SIM115
            fileobj=cast(IO[bytes], stream),
            mode="r|",
            tarinfo=tarinfo,
            encoding="utf-8",
            errors="replace",
        )
    except ValueError as e:
        raise ScanError(f"{label} is not a readable tar: {e}") from e
    with tar:
        yield tar


def checked_tarinfo(max_header_bytes: int, label: str) -> type[tarfile.TarInfo]:
    """TarInfo whose extended headers are bounded before tarfile reads them (it reads a PAX
    header, and keeps global ones, whole)."""
    chained = 0
    chained_bytes = 0
    global_bytes = 0

    class _Checked(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
            nonlocal chained, chained_bytes, global_bytes
            info = super().frombuf(buf, encoding, errors)
            # An old GNU sparse entry chains extension blocks that tarfile reads until one
            # says stop, keeping 21 (offset, size) pairs of each: memory grows with the
            # stream. Layers are written by Go's archive/tar, which writes no sparse entries.
            if info.type == tarfile.GNUTYPE_SPARSE and buf[482]:
                raise ScanError(f"{label}: a GNU sparse entry with extension blocks")
            if info.type not in _EXTENDED_TYPES:
                chained = chained_bytes = 0
                return info
            chained += 1
            chained_bytes += info.size
            if info.type == tarfile.XGLTYPE:
                global_bytes += info.size
            if max(chained_bytes, global_bytes) > max_header_bytes:
                raise ScanError(
                    f"{label}: extended tar headers of more than {max_header_bytes} "
                    "bytes for one entry (limit max_header_bytes)"
                )
            if chained > _MAX_CHAINED_HEADERS:
                raise ScanError(f"{label}: more than {_MAX_CHAINED_HEADERS} extended headers")
            return info

        def _proc_gnusparse_10(self, _next: object, _pax: object, _tar: object) -> None:
            # tarfile reads GNU sparse 1.0's map (a count, then numbers, one a line) until it
            # has as many numbers as the count says, keeping each: unbounded for a lying count.
            raise ScanError(f"{label}: a GNU sparse 1.0 entry (sparse map in its data)")

    return _Checked
