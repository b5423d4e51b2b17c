"""Unpack OCI/Docker image layers, in order, into a fresh rootfs directory, safely.

Every layer is streamed (gzip, zstd or plain tar; never read whole into memory) and applied
entry by entry with directory file descriptors (`dir_fd=`, `O_NOFOLLOW`), so nothing is ever
written outside the rootfs:

- Entry names are cleaned lexically: a leading `/` is dropped (absolute names land inside the
  root), `.` is ignored and a `..` that would climb above the root rejects the entry.
- Parent directories are resolved component by component inside the rootfs. A symlink met on
  the way is followed *as if the rootfs were `/`* (an absolute target restarts at the rootfs; a
  relative one whose `..` would climb above the rootfs rejects the entry), at most 40 hops.
  Missing parents are created (0755). A parent that is a file rejects the entry.
- The last component is never followed: a file, directory, symlink or hard link replaces
  whatever is there (a symlink is removed, never written through; a directory over a directory
  keeps its contents, anything else over a directory removes it first).
- Hard links must name an entry already in the rootfs, through real directories only (no
  symlink in the target's path), and not a directory.
- Symlink targets are stored verbatim; they may point anywhere.
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
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
MAX_DEPTH = 512
MAX_REJECTED_NAMES = 1000
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FORMAT_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)

RelPath = tuple[str, ...]


class UnpackError(Exception):
    """A layer cannot be read (bad compression, corrupt tar) or the rootfs cannot be used."""


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


@contextmanager
def open_layer(path: Path, media_type: str) -> Iterator[tarfile.TarFile]:
    """A streaming `TarFile` over the (decompressed) layer at `path`."""
    with ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        head = raw.read(4)
        raw.seek(0)
        kind = layer_compression(media_type, head)
        stream: IO[bytes] | gzip.GzipFile | zstandard.ZstdDecompressionReader = raw
        if kind == "gzip":
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif kind == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream = stack.enter_context(reader)
        # A plain tar may still be bzip2/xz: `r|*` detects those by itself.
        if kind == "tar":
            yield stack.enter_context(tarfile.open(fileobj=stream, mode="r|*"))
        else:
            yield stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))


def unpack_layers(
    layers: Iterable[tuple[Path, str]], rootfs: Path, *, privileged: bool | None = None
) -> UnpackReport:
    """Apply `layers` (file, media type), lowest first, to `rootfs` (missing or empty).

    `privileged` (default: running as root) decides whether owners and setuid/setgid bits are
    kept. Raises `UnpackError` for unreadable layers; the rootfs is then partial.
    """
    report = UnpackReport()
    root_fd = _open_empty_rootfs(rootfs)
    try:
        keep_ids = os.geteuid() == 0 if privileged is None else privileged
        unpacker = _Unpacker(root_fd, report, keep_ids)
        for index, (path, media_type) in enumerate(layers, 1):
            try:
                with open_layer(path, media_type) as tar:
                    unpacker.apply_layer(index, tar)
            except _FORMAT_ERRORS as e:
                raise UnpackError(f"layer {index} ({path.name}) is unreadable: {e}") from e
            report.layers += 1
        unpacker.finish()
    finally:
        os.close(root_fd)
    return report


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


def _split(name: str) -> RelPath:
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
    if len(parts) > MAX_DEPTH:
        raise _Reject("path too deep")
    return tuple(parts)


def _write_all(src: IO[bytes], fd: int) -> None:
    """Copy `src` to `fd` in bounded chunks."""
    while chunk := src.read(_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def _set_mtime(
    target: int | str, mtime: float, *, dir_fd: int | None = None, follow: bool = True
) -> None:
    """Set atime and mtime; out-of-range times are ignored."""
    ns = int(mtime * 1_000_000_000)
    try:
        os.utime(target, ns=(ns, ns), dir_fd=dir_fd, follow_symlinks=follow)
    except (OSError, OverflowError, ValueError):
        log.debug("cannot set mtime %r on %r", mtime, target)


class _Unpacker:
    """Applies layers to the directory `root_fd`; one instance per rootfs."""

    def __init__(self, root_fd: int, report: UnpackReport, privileged: bool) -> None:
        self.root_fd = root_fd
        self.report = report
        self.privileged = privileged
        self.layer = 0
        # Paths written by the current layer, and those plus all their ancestors.
        self._touched: set[RelPath] = set()
        self._keep: set[RelPath] = set()
        # Directory (mode, mtime), applied by `finish`.
        self._dir_meta: dict[RelPath, tuple[int, float]] = {}

    # -- layers ------------------------------------------------------------------------------

    def apply_layer(self, index: int, tar: tarfile.TarFile) -> None:
        """Apply every entry of one layer."""
        self.layer = index
        self._touched.clear()
        self._keep.clear()
        for info in tar:
            try:
                self._apply(info, tar)
            except _Reject as e:
                self._reject(info.name, str(e))

    def finish(self) -> None:
        """Apply directory modes and mtimes, deepest first."""
        for rel, (mode, mtime) in sorted(self._dir_meta.items(), key=lambda kv: -len(kv[0])):
            try:
                fd, _ = self._walk(rel, create=False, follow=False)
            except (_NotFound, _Reject):
                continue
            try:
                os.fchmod(fd, mode)
                _set_mtime(fd, mtime)
            finally:
                os.close(fd)

    def _reject(self, name: str, reason: str) -> None:
        log.warning("layer %d: skipping %r: %s", self.layer, name, reason)
        self.report.rejected_count += 1
        if len(self.report.rejected) < MAX_REJECTED_NAMES:
            self.report.rejected.append(RejectedEntry(self.layer, name, reason))

    def _apply(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = _split(info.name)
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
                src = tar.extractfile(info)
                if src is not None:
                    _write_all(src, fd)
                self._chown(fd, info)
                os.fchmod(fd, self._mode(info))
                _set_mtime(fd, info.mtime)
            finally:
                os.close(fd)
        self._touch(rel)
        self.report.files += 1

    def _symlink(self, parts: RelPath, info: tarfile.TarInfo) -> None:
        with self._parent(parts) as (pfd, rel):
            name = parts[-1]
            self._clear(pfd, name, rel)
            os.symlink(info.linkname, name, dir_fd=pfd)
            self._chown(name, info, dir_fd=pfd, follow=False)
            _set_mtime(name, info.mtime, dir_fd=pfd, follow=False)
        self._touch(rel)
        self.report.symlinks += 1

    def _hardlink(self, parts: RelPath, info: tarfile.TarInfo) -> None:
        target = _split(info.linkname)
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
                if rel in self._keep:  # written by this layer: only lower contents go
                    self._prune_below(pfd, name, rel)
                else:
                    self._clear(pfd, name, rel)
        except _NotFound:
            pass

    def _opaque(self, dir_parts: RelPath) -> None:
        self.report.opaque_dirs += 1
        try:
            fd, rel = self._walk(dir_parts, create=False, follow=True)
        except _NotFound:  # not a directory yet: no lower contents to hide
            return
        try:
            self._prune(fd, rel)
        finally:
            os.close(fd)
        self._touch(rel)

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
        except OSError as e:
            log.debug("cannot chown %r: %s", info.name, e)

    def _dir_attrs(self, fd: int, rel: RelPath, info: tarfile.TarInfo) -> None:
        self._chown(fd, info)
        self._dir_meta[rel] = (self._mode(info), info.mtime)

    def _touch(self, rel: RelPath) -> None:
        self._touched.add(rel)
        self._keep.update(rel[:i] for i in range(len(rel) + 1))

    def _forget(self, rel: RelPath) -> None:
        """Drop deferred directory metadata at or below `rel` (it was removed)."""
        n = len(rel)
        for key in [k for k in self._dir_meta if k[:n] == rel]:
            del self._dir_meta[key]

    def _clear(self, pfd: int, name: str, rel: RelPath, *, keep_dir: bool = False) -> bool:
        """Remove `name` in `pfd` (never following it); True if it is a directory kept."""
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
            return False
        if keep_dir:
            return True
        shutil.rmtree(name, dir_fd=pfd)
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
        stack = [(os.dup(top_fd), top_rel)]
        try:
            while stack:
                fd, rel = stack.pop()
                try:
                    for name in os.listdir(fd):
                        child = (*rel, name)
                        if child not in self._keep:
                            self._clear(fd, name, child)
                        elif stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                            stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), child))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)

    @contextmanager
    def _parent(
        self, parts: RelPath, *, create: bool = True, follow: bool = True
    ) -> Iterator[tuple[int, RelPath]]:
        """Open the parent directory of `parts`; yields its fd and the entry's resolved path."""
        fd, prel = self._walk(parts[:-1], create=create, follow=follow)
        try:
            yield fd, (*prel, parts[-1])
        finally:
            os.close(fd)

    def _walk(self, parts: RelPath, *, create: bool, follow: bool) -> tuple[int, RelPath]:
        """Open directory `parts` below the root, resolving symlinks inside the root only.

        Returns a new fd and the physical path. Raises `_NotFound` (missing or not a directory,
        when not creating) or `_Reject` (escaping symlink, symlink with `follow=False`, loop,
        a file in the way when creating).
        """
        pending = list(reversed(parts))
        names: list[str] = []
        fds: list[int] = []
        hops = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if not names:
                        raise _Reject("a symlink in the path points outside the root")
                    names.pop()
                    os.close(fds.pop())
                    continue
                cur = fds[-1] if fds else self.root_fd
                link = self._lookup(cur, name, create=create, follow=follow)
                if link is not None:
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise _Reject("too many levels of symbolic links")
                    if link.startswith("/"):
                        while fds:
                            os.close(fds.pop())
                        names.clear()
                    pending.extend(reversed(link.split("/")))
                    continue
                fds.append(os.open(name, _DIR_FLAGS, dir_fd=cur))
                names.append(name)
                if len(names) > MAX_DEPTH:
                    raise _Reject("path too deep")
            return (fds.pop() if fds else os.dup(self.root_fd)), tuple(names)
        finally:
            for fd in fds:
                os.close(fd)

    def _lookup(self, cur: int, name: str, *, create: bool, follow: bool) -> str | None:
        """Make sure `name` in `cur` is a directory; returns a symlink's target to follow."""
        try:
            st = os.lstat(name, dir_fd=cur)
        except FileNotFoundError:
            if not create:
                raise _NotFound from None
            os.mkdir(name, 0o755, dir_fd=cur)
            return None
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                raise _Reject("path passes through a symlink")
            link = os.readlink(name, dir_fd=cur)
            if not link:
                raise _Reject("empty symlink in the path")
            return link
        if not stat.S_ISDIR(st.st_mode):
            if not create:
                raise _NotFound
            raise _Reject("a parent is not a directory")
        return None
