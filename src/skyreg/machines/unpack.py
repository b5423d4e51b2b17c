"""Unpack OCI/Docker image layers, in order, into a fresh rootfs directory, safely.

Every layer is streamed (gzip, zstd or plain tar; never read whole into memory) and applied
entry by entry with directory file descriptors (`dir_fd=`, `O_NOFOLLOW`), so nothing is ever
written outside the rootfs:

- Entry names are cleaned lexically: a leading `/` is dropped (absolute names land inside the
  root), `.` is ignored and a `..` that would climb above the root rejects the entry (a tar
  name is not a path in the rootfs yet: no honest tar writer makes one, GNU tar refuses it).
- The cleaned name is then resolved by `rootpath` (see there: the same rule as the runtime's,
  the one the machine itself sees). Its parents are walked component by component from the
  rootfs fd; a symlink met on the way is followed *as if the rootfs were `/`* (an absolute
  target restarts at the rootfs, a `..` at the rootfs stays there), at most 40 hops. Missing
  parents are created (0755). A parent that is a file, a symlink loop, a name with NUL or of
  more than 255 bytes, or a resolved path deeper than the depth limit rejects the entry.
- The last component is never followed: a file, directory, symlink or hard link replaces
  whatever is there (a symlink is removed, never written through; a directory over a directory
  keeps its contents, anything else over a directory removes it first).
- Hard links must name an entry already in the rootfs, through real directories only (no
  symlink in the target's path), and not a directory.
- Symlink targets are stored verbatim; they may point anywhere (one holding a NUL byte, which
  no file system can store, rejects the entry).
- Device nodes and FIFOs are skipped and counted; owners are applied only when running as root
  (errors ignored), setuid/setgid bits are dropped otherwise. Directory modes and mtimes are
  applied once at the end, deepest first, so read-only directories never block later layers.

Whiteouts: `.wh.<name>` removes `<name>` left by lower layers; `.wh..wh..opq` empties its
directory of lower-layer contents. Entries of the layer itself are kept whatever the order in
the tar: every path written by the current layer (and its ancestors) is remembered, and a
whiteout or opaque marker removes only what is not in that set - so a marker before the entries
clears everything lower, a marker after them clears everything lower but spares them. (One
single pass; no second decompression.) A marker whose directory is missing or not a directory
has nothing to hide and is a no-op; AUFS `.wh..wh.*` metadata is ignored.

Unsafe or impossible entries are skipped and listed in `UnpackReport.rejected` (as containerd
does); a layer that cannot be read at all (bad compression, corrupt tar) raises `UnpackError`.

Limits (`UnpackLimits`, all configurable): decompressed bytes per layer and per image, entries
per layer, the size of extended headers (PAX, GNU long name/link), the length and depth of path
names. A breach raises `UnpackLimitError` and the caller throws the partial tree away. Memory
stays bounded whatever a layer holds: the decompressed stream is read through `_BoundedStream`,
which counts every byte and, while tarfile parses the headers of one entry, refuses any read
beyond the header budget *before* reading it; every header block is also checked by
`_checked_tarinfo` before tarfile reads the extended header it announces (tarfile would read a
PAX header whole); members are not kept once applied. The bookkeeping (paths the layer wrote,
deferred directory metadata) is a tree of path components (`_PathNode`): a path costs one node
per component not seen before, at most 4 x the entries limit nodes are alive at once, and
removing a directory drops its subtree.

Sparse files (old GNU 'S' entries, PAX `GNU.sparse.*` 0.0/0.1/1.0) are supported: tarfile gives
their real size and data map, the map must be ordered and inside the file, the real size counts
against the byte limits before the file is created (see `_charge_file`), and the holes are
written as holes (only the stored chunks are written, then the file is extended).
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, Self, cast

import zstandard

from skyreg.machines import rootpath
from skyreg.oci.layerlimits import UnpackLimits as UnpackLimits  # defined beside lazy/tree.py's

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_SYMLINK_MAX = 4096  # PATH_MAX: a symlink target holds at most 4095 bytes
MAX_REJECTED_NAMES = 1000
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZIP2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FORMAT_ERRORS = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    zstandard.ZstdError,
    lzma.LZMAError,
)
_EXTENDED_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
# Extended headers chained before one entry (PAX + GNU long name + long link is 3 in practice).
MAX_CHAINED_HEADERS = 8
# Room for the 512-byte header blocks of one entry around its extended headers.
_HEADER_SLACK = 16 * tarfile.BLOCKSIZE

RelPath = tuple[str, ...]


class UnpackError(Exception):
    """A layer cannot be read (bad compression, corrupt tar) or the rootfs cannot be used."""


class UnpackLimitError(UnpackError):
    """A layer or the image breaks one of the `UnpackLimits`."""


@dataclass(frozen=True, slots=True)
class RejectedEntry:
    """A tar entry that was not applied because it was unsafe or impossible."""

    layer: int
    name: str
    reason: str


@dataclass(slots=True)
class UnpackReport:
    """What `unpack_layers` did; `rejected` lists at most `MAX_REJECTED_NAMES` entries."""

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped_special: int = 0
    rejected_count: int = 0
    rejected: list[RejectedEntry] = field(default_factory=list)


class _Reject(Exception):
    """The current entry is unsafe or impossible; `args[0]` says why."""


class _NotFound(Exception):
    """A path looked up without creating does not lead to a directory."""


def layer_compression(media_type: str, head: bytes) -> str:
    """`gzip`, `zstd` or `tar` for a layer: by media type, else by its first bytes."""
    mt = media_type.split(";", 1)[0].strip().lower()
    if mt.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if mt.endswith(("+zstd", ".tar.zstd")):
        return "zstd"
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "tar"


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@contextmanager
def _open_decompressed(path: Path, media_type: str) -> Iterator[_Readable]:
    """The decompressed bytes of the layer at `path` (gzip, zstd, bzip2, xz or plain)."""
    with ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        head = raw.read(6)
        raw.seek(0)
        kind = layer_compression(media_type, head)
        if kind == "gzip":
            yield stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif kind == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            yield stack.enter_context(reader)
        elif head.startswith(_BZIP2_MAGIC):
            yield stack.enter_context(bz2.BZ2File(raw, "rb"))
        elif head.startswith(_XZ_MAGIC):
            yield stack.enter_context(lzma.LZMAFile(raw, "rb"))
        else:
            yield raw


@dataclass(slots=True)
class _Totals:
    """Decompressed bytes read so far for the whole image."""

    image_bytes: int = 0


@contextmanager
def _open_bounded(
    path: Path, media_type: str, limits: UnpackLimits, totals: _Totals, index: int = 1
) -> Iterator[tuple[tarfile.TarFile, _BoundedStream]]:
    with _open_decompressed(path, media_type) as decompressed:
        label = f"layer {index} ({_blob_name(path)})"
        stream = _BoundedStream(decompressed, limits, totals, label)
        tarinfo = _checked_tarinfo(limits, label)
        with stream.headers(), _corrupt_headers(label):
            tar = tarfile.TarFile(fileobj=stream, mode="r", tarinfo=tarinfo)  # type: ignore[arg-type]
        with tar:
            yield tar, stream


class _BoundedStream:
    """A forward-only reader over a decompressed layer for `tarfile` that enforces the limits.

    Every byte counts against the layer and image limits (with the holes of sparse files,
    `charge`d when their entry is accepted). Inside `headers()` (tarfile parsing
    the headers of one entry) reads draw on a budget of `header_bytes` plus a few blocks, and a
    read larger than what is left is refused before anything is read.
    """

    def __init__(self, raw: _Readable, limits: UnpackLimits, totals: _Totals, label: str) -> None:
        self._raw = raw
        self._limits = limits
        self._totals = totals
        self.label = label
        self._pos = 0
        self._extra = 0  # bytes charged that are not in the stream: holes of sparse files
        self._header_budget: int | None = None

    @contextmanager
    def headers(self) -> Iterator[None]:
        """Reads inside are header reads, bounded together by the header limit."""
        self._header_budget = self._limits.header_bytes + _HEADER_SLACK
        try:
            yield
        finally:
            self._header_budget = None

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (never "all": a tar layer is read in bounded pieces)."""
        if size < 0:
            raise UnpackError("unbounded read of a layer")
        if self._header_budget is not None:
            if size > self._header_budget:
                raise UnpackLimitError(
                    f"{self.label}: the tar headers of one entry take more than "
                    f"{self._limits.header_bytes} bytes (limit of extended headers)"
                )
            self._header_budget -= size
        data = self._raw.read(size)
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        self._pos += n
        self._totals.image_bytes += n
        self._check(0)

    def charge(self, n: int, why: str) -> None:
        """Count `n` bytes the layer expands to that are not in the stream (sparse holes)."""
        self._extra += n
        self._totals.image_bytes += n
        self._check(0, why)

    def ensure_room(self, n: int, why: str) -> None:
        """Refuse now if reading `n` more bytes would break a limit; they are counted when
        read, not here."""
        self._check(n, why)

    def _check(self, ahead: int, why: str = "") -> None:
        """Raise if the bytes counted so far, plus `ahead`, break the layer or image limit."""
        why = f" ({why})" if why else ""
        if self._pos + self._extra + ahead > self._limits.layer_bytes:
            raise UnpackLimitError(
                f"{self.label} is larger than allowed: more than "
                f"{self._limits.layer_bytes} bytes once decompressed{why}"
            )
        if self._totals.image_bytes + ahead > self._limits.image_bytes:
            raise UnpackLimitError(
                f"the image is larger than {self._limits.image_bytes} bytes once decompressed "
                f"(reached in {self.label}){why}"
            )

    def tell(self) -> int:
        """The position in the decompressed stream."""
        return self._pos

    def seekable(self) -> bool:
        """Only forward seeks (skipping bytes) are possible."""
        return False

    def skip_to(self, pos: int) -> None:
        """Read and drop bytes up to `pos` (they are not kept: no header budget); stops at
        the end of the stream."""
        while self._pos < pos:
            data = self._raw.read(min(pos - self._pos, _CHUNK))
            if not data:
                break
            self._count(len(data))

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        """Forward seeks only, like tarfile's own stream mode (skipped bytes are not kept)."""
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise tarfile.StreamError("seeking from the end is not allowed")
        if pos < self._pos:
            raise tarfile.StreamError("seeking backwards is not allowed")
        self.skip_to(pos)
        return self._pos


def _blob_name(path: Path) -> str:
    """`sha256:<hex>` for a layer in a `LayerCache`, else the file name."""
    if path.parent.name in ("sha256", "sha512"):
        return f"{path.parent.name}:{path.name}"
    return path.name


def _checked_tarinfo(limits: UnpackLimits, label: str) -> type[tarfile.TarInfo]:
    """A TarInfo class whose header blocks are checked before tarfile reads what they announce:
    each extended header's size, the extended headers chained before one entry, and the global
    PAX headers of the layer (tarfile keeps those for the whole layer)."""
    chained = 0
    chained_bytes = 0
    global_bytes = 0

    class _Checked(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
            nonlocal chained, chained_bytes, global_bytes
            info = super().frombuf(buf, encoding, errors)
            if info.type not in _EXTENDED_TYPES:
                chained = chained_bytes = 0
                return info
            chained += 1
            chained_bytes += info.size
            if info.type == tarfile.XGLTYPE:
                global_bytes += info.size
            worst = max(chained_bytes, global_bytes)
            if info.size > limits.header_bytes or worst > limits.header_bytes:
                raise UnpackLimitError(
                    f"{label}: an extended tar header of {info.size} bytes "
                    f"({max(info.size, worst)} with the ones before it); "
                    f"the limit is {limits.header_bytes}"
                )
            if chained > MAX_CHAINED_HEADERS:
                raise UnpackLimitError(
                    f"{label}: more than {MAX_CHAINED_HEADERS} extended tar headers for one entry"
                )
            return info

    return _Checked


def unpack_layers(
    layers: Iterable[tuple[Path, str]],
    rootfs: Path,
    *,
    privileged: bool | None = None,
    limits: UnpackLimits | None = None,
) -> UnpackReport:
    """Apply `layers` (file, media type), lowest first, to `rootfs` (missing or empty).

    `privileged` (default: running as root) decides whether owners and setuid/setgid bits are
    kept. Raises `UnpackError` for unreadable layers and `UnpackLimitError` when `limits`
    (default: `UnpackLimits()`) are broken; the rootfs is then partial.
    """
    limits = limits or UnpackLimits()
    report = UnpackReport()
    totals = _Totals()
    root_fd = _open_empty_rootfs(rootfs)
    try:
        keep_ids = os.geteuid() == 0 if privileged is None else privileged
        unpacker = _Unpacker(root_fd, report, keep_ids, limits)
        for index, (path, media_type) in enumerate(layers, 1):
            try:
                with _open_bounded(path, media_type, limits, totals, index) as (tar, stream):
                    unpacker.apply_layer(index, tar, _bounded_members(tar, stream, limits))
            except UnpackError:
                raise
            except _FORMAT_ERRORS as e:
                raise UnpackError(f"layer {index} ({_blob_name(path)}) is unreadable: {e}") from e
            report.layers += 1
        unpacker.finish()
    finally:
        os.close(root_fd)
    return report


def _bounded_members(
    tar: tarfile.TarFile, stream: _BoundedStream, limits: UnpackLimits
) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`, one at a time, within the entry and path limits.

    Unread data of the previous member is skipped before its successor's headers are parsed
    (so it does not count as header bytes), and members are not kept once handed out.
    """
    count = 0
    while True:
        if count:  # the first member was parsed when `tar` was opened: nothing to skip
            stream.skip_to(tar.offset)
        with stream.headers(), _corrupt_headers(stream.label):
            info = tar.next()
        if info is None:
            return
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps all it read
        count += 1
        if count > limits.entries:
            raise UnpackLimitError(f"{stream.label} has more than {limits.entries} entries")
        for what, value in (("path", info.name), ("link target", info.linkname)):
            size = len(value.encode("utf-8", "surrogateescape"))
            if size > limits.path_bytes:
                raise UnpackLimitError(
                    f"{stream.label}: an entry has a {what} of {size} bytes; "
                    f"the limit is {limits.path_bytes}"
                )
            # a symlink's target is stored, never tracked: only its length is bounded
            depth = _depth(value) if what == "path" or info.islnk() else 0
            if depth > limits.path_depth:
                raise UnpackLimitError(
                    f"{stream.label}: an entry has a {what} of {depth} components; "
                    f"the limit is {limits.path_depth}"
                )
        if info.isreg():
            _charge_file(stream, info)
        yield info


@contextmanager
def _corrupt_headers(label: str) -> Iterator[None]:
    """tarfile lets `ValueError` out of headers with bad numbers (PAX sizes, sparse maps)."""
    try:
        yield
    except ValueError as e:
        raise UnpackError(f"{label} is unreadable: a corrupt tar header: {e}") from e


def _charge_file(stream: _BoundedStream, info: tarfile.TarInfo) -> None:
    """Make sure every byte the regular file `info` will occupy fits the limits before it is
    written.

    One accounting, no byte counted twice: the limits count what a layer expands to, that is
    every decompressed byte of the stream as it is read (headers, data, padding) plus the holes
    of sparse files, which tarfile would fill without reading anything. The holes (real size
    minus stored data) are charged here; the stored data is counted when it is read, and here
    only checked to fit. So a file's whole real size is within the budget before its creation.
    """
    if info.size < 0:
        raise UnpackError(f"{stream.label}: {info.name!r} has a negative size")
    stored = info.size if info.sparse is None else _sparse_stored(stream.label, info)
    why = f"{info.name!r} is a file of {info.size} bytes"
    if info.sparse is not None:
        why += f", {info.size - stored} of them sparse holes"
    stream.charge(info.size - stored, why)
    stream.ensure_room(stored, why)


def _sparse_map(info: tarfile.TarInfo) -> list[tuple[int, int]]:
    """The (offset, size) data chunks of a sparse entry (typeshed calls them `bytes`)."""
    chunks: object = info.sparse
    return cast(list[tuple[int, int]], chunks) if chunks is not None else []


def _sparse_stored(label: str, info: tarfile.TarInfo) -> int:
    """The stored bytes of a sparse file: its map must be ordered, without overlaps and inside
    the real size (tarfile does not check; empty chunks are padding in old GNU headers)."""
    end = stored = 0
    for offset, size in _sparse_map(info):
        if size == 0 and offset >= 0:
            continue
        if offset < end or size < 0 or offset + size > info.size:
            raise UnpackError(
                f"{label} is unreadable: {info.name!r} has a corrupt sparse map "
                f"(chunk of {size} bytes at {offset} in a file of {info.size} bytes)"
            )
        end = offset + size
        stored += size
    return stored


def _depth(name: str) -> int:
    """The components of a tar name before cleaning (`..` counts, empty ones and `.` do not)."""
    return sum(1 for part in name.split("/") if part not in ("", "."))


def _open_empty_rootfs(rootfs: Path) -> int:
    """Create `rootfs` if needed and open it; it must be a real, empty directory."""
    try:
        rootfs.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(rootfs, _DIR_FLAGS)
    except OSError as e:
        raise UnpackError(f"cannot use {rootfs} as rootfs: {e}") from e
    if os.listdir(fd):
        os.close(fd)
        raise UnpackError(f"rootfs {rootfs} is not empty")
    return fd


def _split(name: str, max_depth: int) -> RelPath:
    """Clean a tar name lexically into components below the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _Reject("path escapes the root")
            parts.pop()
        else:
            parts.append(part)
    if len(parts) > max_depth:
        raise _Reject("path too deep")
    return tuple(parts)


def _remove(pfd: int, name: str) -> bool:
    """Remove `name` in `pfd` if present, never following it; True if it was a directory."""
    try:
        st = os.lstat(name, dir_fd=pfd)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=pfd)
        return False
    shutil.rmtree(name, dir_fd=pfd)
    return True


def _write_all(src: IO[bytes], fd: int) -> None:
    """Copy `src` to `fd` in bounded chunks."""
    while chunk := src.read(_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _write_sparse(stream: _BoundedStream, info: tarfile.TarInfo, fd: int) -> None:
    """Write the stored chunks of the sparse file `info` at their offsets in `fd`, leaving the
    holes as holes (its map was checked by `_sparse_stored`)."""
    if stream.tell() > info.offset_data:
        raise UnpackError(f"{stream.label}: the data of {info.name!r} was already read")
    stream.skip_to(info.offset_data)
    for offset, size in _sparse_map(info):
        if size == 0:
            continue
        os.lseek(fd, offset, os.SEEK_SET)
        while size > 0:
            chunk = stream.read(min(size, _CHUNK))
            if not chunk:
                raise UnpackError(f"{stream.label}: unexpected end of data in {info.name!r}")
            size -= len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
    os.ftruncate(fd, info.size)


def _set_mtime(
    target: int | str, mtime: float, *, dir_fd: int | None = None, follow: bool = True
) -> None:
    """Set atime and mtime; out-of-range times (NaN and infinities too) are ignored."""
    try:
        ns = int(mtime * 1_000_000_000)
        os.utime(target, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=follow)
    except (OSError, OverflowError, ValueError):
        log.debug("cannot set mtime %r on %r", mtime, target)


class _PathNode:
    """One path component in a tree of paths: a path costs one node per component not already
    in the tree. A node with one child keeps it inline (no dict: deep chains stay small)."""

    __slots__ = ("_kids", "_name", "meta")

    def __init__(self) -> None:
        self._name: str | None = None  # the name of the only child, when `_kids` is that child
        self._kids: _PathNode | dict[str, _PathNode] | None = None
        self.meta: tuple[int, float] | None = None  # a directory's deferred (mode, mtime)

    def get(self, name: str) -> _PathNode | None:
        """The child `name`, if present."""
        kids = self._kids
        if isinstance(kids, dict):
            return kids.get(name)
        return kids if kids is not None and name == self._name else None

    def add(self, name: str) -> tuple[_PathNode, bool]:
        """The child `name`, created if missing; and whether it was created."""
        kids = self._kids
        if isinstance(kids, dict):
            node = kids.get(name)
            if node is not None:
                return node, False
            node = kids[name] = _PathNode()
        elif kids is None:
            node = self._kids = _PathNode()
            self._name = name
        elif name == self._name:
            return kids, False
        else:
            assert self._name is not None
            node = _PathNode()
            self._kids, self._name = {self._name: kids, name: node}, None
        return node, True

    def pop(self, name: str) -> _PathNode | None:
        """Detach and return the child `name`, if present."""
        kids = self._kids
        if isinstance(kids, dict):
            return kids.pop(name, None)
        if kids is None or name != self._name:
            return None
        self._kids = self._name = None
        return kids

    def children(self) -> Iterator[tuple[str, _PathNode]]:
        """The children (none may be added or removed while they are iterated)."""
        kids = self._kids
        if isinstance(kids, dict):
            return iter(kids.items())
        return iter(() if kids is None or self._name is None else ((self._name, kids),))

    def find(self, rel: RelPath) -> _PathNode | None:
        """The node of `rel` below this one, if present."""
        node: _PathNode | None = self
        for name in rel:
            if node is None:
                return None
            node = node.get(name)
        return node

    def insert(self, rel: RelPath) -> tuple[_PathNode, int]:
        """The node of `rel` below this one, made with its ancestors; and how many were made."""
        node, made = self, 0
        for name in rel:
            node, created = node.add(name)
            made += created
        return node, made

    def size(self) -> int:
        """The nodes in this subtree, this one included."""
        count, stack = 0, [self]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(child for _, child in node.children())
        return count


class _Unpacker:
    """Applies layers to the directory `root_fd`; one instance per rootfs."""

    def __init__(
        self,
        root_fd: int,
        report: UnpackReport,
        privileged: bool,
        limits: UnpackLimits | None = None,
    ) -> None:
        self.root_fd = root_fd
        self.report = report
        self.privileged = privileged
        self.limits = limits or UnpackLimits()
        self.layer = 0
        # Paths written by the current layer, with their ancestors.
        self._keep = _PathNode()
        self._keep_nodes = 0
        # Directory (mode, mtime) by path, applied by `finish`; a removed directory's subtree
        # is dropped with it.
        self._dirs = _PathNode()
        self._dir_nodes = 0
        self._pruned: set[RelPath] = set()  # see apply_layer

    # -- layers ------------------------------------------------------------------------------

    def apply_layer(
        self, index: int, tar: tarfile.TarFile, members: Iterable[tarfile.TarInfo] | None = None
    ) -> None:
        """Apply every entry of one layer (`members`: the entries of `tar` to apply)."""
        self.layer = index
        self._keep = _PathNode()
        self._keep_nodes = 0
        # Directories (physical paths) already rid of lower contents in this layer: below them
        # only this layer's entries remain, so another marker or whiteout there has nothing to
        # do (without this, K markers in a directory of K entries cost K * K lookups).
        self._pruned = set()
        for info in tar if members is None else members:
            try:
                self._apply(info, tar)
            except _Reject as e:
                self._reject(info.name, str(e))

    def finish(self) -> None:
        """Apply directory modes and mtimes, each directory after everything below it."""
        top = (os.dup(self.root_fd), self._dirs, iter(self._dirs.children()))
        stack = [top]
        try:
            while stack:
                fd, node, pending = stack[-1]
                for name, child in pending:
                    try:
                        child_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:  # gone, or not a directory (a symlink is not followed)
                        continue
                    stack.append((child_fd, child, iter(child.children())))
                    break
                else:
                    stack.pop()
                    try:
                        if node.meta is not None:
                            os.fchmod(fd, node.meta[0])
                            _set_mtime(fd, node.meta[1])
                    finally:
                        os.close(fd)
        finally:
            for fd, _, _ in stack:
                os.close(fd)

    def _check_nodes(self) -> None:
        """The layer's paths and the image's directories stay within `limits.path_nodes`."""
        if self._keep_nodes + self._dir_nodes > self.limits.path_nodes:
            raise UnpackLimitError(
                f"layer {self.layer}: more than {self.limits.path_nodes} path components to "
                f"keep track of (4 x the limit of {self.limits.entries} entries): the paths this "
                "layer writes and the directories of the image are too many or too deep"
            )

    def _reject(self, name: str, reason: str) -> None:
        log.warning("layer %d: skipping %r: %s", self.layer, name, reason)
        self.report.rejected_count += 1
        if len(self.report.rejected) < MAX_REJECTED_NAMES:
            self.report.rejected.append(RejectedEntry(self.layer, name, reason))

    def _apply(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = _split(info.name, self.limits.path_depth)
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
        elif info.isdir():
            self._dir(parts, info)
        elif not parts:
            raise _Reject("only a directory may replace the root")
        elif info.isreg():
            self._file(parts, info, tar)
        elif info.issym():
            self._symlink(parts, info)
        elif info.islnk():
            self._hardlink(parts, info)
        else:
            self.report.skipped_special += 1
            log.info("layer %d: skipping special file %r", self.layer, info.name)

    # -- entries -----------------------------------------------------------------------------

    def _dir(self, parts: RelPath, info: tarfile.TarInfo) -> None:
        if not parts:
            self._dir_attrs(self.root_fd, (), info)
            return
        with self._parent(parts) as (pfd, rel):
            name = parts[-1]
            if not self._clear(pfd, name, rel, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._dir_attrs(fd, rel, info)
            finally:
                os.close(fd)
        self._touch(rel)
        self.report.dirs += 1

    def _file(self, parts: RelPath, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        with self._parent(parts) as (pfd, rel):
            name = parts[-1]
            self._clear(pfd, name, rel)
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                stream = tar.fileobj
                if info.sparse is not None and isinstance(stream, _BoundedStream):
                    _write_sparse(stream, info, fd)
                elif (src := tar.extractfile(info)) is not None:
                    _write_all(src, fd)
                self._chown(fd, info)
                os.fchmod(fd, self._mode(info))
                _set_mtime(fd, info.mtime)
            finally:
                os.close(fd)
        self._touch(rel)
        self.report.files += 1

    def _symlink(self, parts: RelPath, info: tarfile.TarInfo) -> None:
        if "\0" in info.linkname:
            raise _Reject("symlink target holds a NUL byte")
        if not info.linkname:
            raise _Reject("symlink with an empty target")
        if len(os.fsencode(info.linkname)) >= _SYMLINK_MAX:
            raise _Reject(f"symlink target longer than the kernel's {_SYMLINK_MAX - 1} bytes")
        with self._parent(parts) as (pfd, rel):
            name = parts[-1]
            self._clear(pfd, name, rel)
            os.symlink(info.linkname, name, dir_fd=pfd)
            self._chown(name, info, dir_fd=pfd, follow=False)
            _set_mtime(name, info.mtime, dir_fd=pfd, follow=False)
        self._touch(rel)
        self.report.symlinks += 1

    def _hardlink(self, parts: RelPath, info: tarfile.TarInfo) -> None:
        target = _split(info.linkname, self.limits.path_depth)
        if not target:
            raise _Reject("hard link to the root")
        try:
            with self._parent(target, follow=False, create=False) as (tfd, trel):
                st = os.lstat(target[-1], dir_fd=tfd)
                if stat.S_ISDIR(st.st_mode):
                    raise _Reject("hard link to a directory")
                self._link(tfd, target[-1], trel, parts)
        except (_NotFound, FileNotFoundError):
            raise _Reject(f"hard link target {info.linkname!r} does not exist") from None

    def _link(self, tfd: int, tname: str, trel: RelPath, parts: RelPath) -> None:
        with self._parent(parts) as (pfd, rel):
            if rel != trel:
                self._clear(pfd, parts[-1], rel)
                try:
                    os.link(tname, parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
                except OSError as e:
                    raise _Reject(f"hard link failed: {e.strerror}") from None
        self._touch(rel)
        self.report.hardlinks += 1

    def _whiteout(self, parts: RelPath) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self._opaque(parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX * 2):
            log.debug("layer %d: ignoring AUFS metadata %r", self.layer, "/".join(parts))
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise _Reject("invalid whiteout name")
        self.report.whiteouts += 1
        try:
            with self._parent(parts, create=False) as (pfd, marker):
                rel = (*marker[:-1], name)
                if self._keep.find(rel) is not None:  # this layer wrote it: only lower contents go
                    self._prune_below(pfd, name, rel)
                else:
                    self._clear(pfd, name, rel)
        except _NotFound:
            pass

    def _opaque(self, dir_parts: RelPath) -> None:
        self.report.opaque_dirs += 1
        try:
            loc = self._resolved(dir_parts, create=False, follow=True, last=True)
        except _NotFound:  # not a directory yet: no lower contents to hide
            return
        with loc:
            self._prune(loc.dir_fd, loc.parts)
        self._touch(loc.parts)

    # -- helpers -----------------------------------------------------------------------------

    def _mode(self, info: tarfile.TarInfo) -> int:
        mode = info.mode & 0o7777
        return mode if self.privileged else mode & ~(stat.S_ISUID | stat.S_ISGID)

    def _chown(
        self,
        target: int | str,
        info: tarfile.TarInfo,
        *,
        dir_fd: int | None = None,
        follow: bool = True,
    ) -> None:
        if not self.privileged:
            return
        try:
            os.chown(target, info.uid, info.gid, dir_fd=dir_fd, follow_symlinks=follow)
        except (OSError, OverflowError) as e:  # OverflowError: an owner id beyond uid_t
            log.debug("cannot chown %r: %s", info.name, e)

    def _dir_attrs(self, fd: int, rel: RelPath, info: tarfile.TarInfo) -> None:
        self._chown(fd, info)
        node, made = self._dirs.insert(rel)
        node.meta = (self._mode(info), info.mtime)
        self._dir_nodes += made
        self._check_nodes()

    def _touch(self, rel: RelPath) -> None:
        """Remember that the current layer wrote `rel` (and so its ancestors)."""
        _, made = self._keep.insert(rel)
        self._keep_nodes += made
        self._check_nodes()

    def _forget(self, rel: RelPath) -> None:
        """Drop deferred directory metadata at or below `rel` (it was removed)."""
        parent = self._dirs.find(rel[:-1])
        gone = parent.pop(rel[-1]) if parent is not None and rel else None
        if gone is not None:
            self._dir_nodes -= gone.size()

    def _clear(self, pfd: int, name: str, rel: RelPath, *, keep_dir: bool = False) -> bool:
        """Remove `name` in `pfd` (never following it); True if it is a directory kept."""
        if keep_dir:
            try:
                if stat.S_ISDIR(os.lstat(name, dir_fd=pfd).st_mode):
                    return True
            except FileNotFoundError:
                return False
        if _remove(pfd, name):
            self._forget(rel)
        return False

    def _prune_below(self, pfd: int, name: str, rel: RelPath) -> None:
        """Remove the lower-layer contents of `name` if it is a real directory."""
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError:
            return
        try:
            self._prune(fd, rel)
        finally:
            os.close(fd)

    def _prune(self, top_fd: int, top_rel: RelPath) -> None:
        """Remove everything below directory `top_fd` not written by the current layer."""
        if any(top_rel[:n] in self._pruned for n in range(len(top_rel) + 1)):
            return
        self._pruned.add(top_rel)
        top = (os.dup(top_fd), self._keep.find(top_rel), self._dirs.find(top_rel))
        stack = [top]
        try:
            while stack:
                fd, keep, dirs = stack.pop()
                try:
                    for name in os.listdir(fd):
                        kept = keep.get(name) if keep is not None else None
                        if kept is None:
                            gone = (
                                dirs.pop(name) if _remove(fd, name) and dirs is not None else None
                            )
                            if gone is not None:
                                self._dir_nodes -= gone.size()
                        elif stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                            child_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                            below = dirs.get(name) if dirs is not None else None
                            stack.append((child_fd, kept, below))
                finally:
                    os.close(fd)
        finally:
            for fd, _, _ in stack:
                os.close(fd)

    @contextmanager
    def _parent(
        self, parts: RelPath, *, create: bool = True, follow: bool = True
    ) -> Iterator[tuple[int, RelPath]]:
        """Open the parent directory of `parts` (its last component is never followed); yields
        its fd and the entry's physical path. Raises `_NotFound` (not creating: a parent is
        missing or not a directory) or `_Reject` (any other reason it cannot be resolved)."""
        with self._resolved(parts, create=create, follow=follow, last=False) as loc:
            assert loc.name is not None  # cleaned by `_split`: `parts` ends with a name
            yield loc.dir_fd, (*loc.parts, loc.name)

    def _resolved(
        self, parts: RelPath, *, create: bool, follow: bool, last: bool
    ) -> rootpath.Location:
        """`parts` resolved by `rootpath` (with `last`: as a directory, fully followed), its
        errors mapped to `_NotFound` and `_Reject`."""
        depth = self.limits.path_depth
        size = max(self.limits.path_bytes, rootpath.MAX_PATH_BYTES) + 1
        try:
            if last:
                return rootpath.open_dir(
                    self.root_fd, parts, create=create, max_depth=depth, max_path_bytes=size
                )
            return rootpath.resolve(
                self.root_fd,
                parts,
                follow_last=False,
                create_dirs=create,
                follow_symlinks=follow,
                max_depth=depth,
                max_path_bytes=size,
            )
        except (rootpath.PathNotFound, rootpath.NotADirectory) as e:
            if not create:
                raise _NotFound from None
            raise _Reject(str(e)) from None
        except rootpath.RootPathError as e:
            raise _Reject(str(e)) from None
