"""Resolve a path inside a rootfs, the one way both the unpacker and the runtime do it.

Every path is walked component by component from an open directory fd of the rootfs
(`openat`-style: `dir_fd=` with `O_NOFOLLOW | O_DIRECTORY`), so the kernel is never handed a
path that could start at the host's root, and every symlink is read and resolved here, never by
the kernel.

The rule, for every caller: a path means what it will mean to the machine, whose `/` is the
rootfs (a chroot).

- An absolute path, and a relative one, start at the rootfs root.
- `.` and empty components are ignored; `..` goes to the parent directory *actually walked
  through* (not a lexical parent), and `..` at the root stays at the root.
- A symlink met on the way is followed: an absolute target restarts at the rootfs root, a
  relative one continues from the directory holding the link. At most `MAX_SYMLINK_HOPS` (40,
  the kernel's own limit) symlinks per resolution; more is `SymlinkLoop`.
- The last component is followed only when asked (`follow_last`); otherwise it is returned
  unresolved as a name in its parent directory, for the caller to create, replace or inspect
  without ever writing through a link.
- `follow_symlinks=False` refuses any symlink on the way (`SymlinkNotAllowed`): hard link
  targets must be named through real directories.
- `create_dirs` makes missing directories (`dir_mode`, 0755 by default) on the way; a
  non-directory in the way is `NotADirectory`, whether creating or not.
- Bounds: the path given is at most `max_path_bytes` (4096) bytes, every name at most 255 bytes
  and free of NUL (`BadName`, which the kernel would otherwise refuse as a crash-like
  `ValueError`/`ENAMETOOLONG`), the resolved path at most `max_depth` (256) components
  (`PathTooDeep`); one resolution looks up at most `MAX_STEPS` (1024) names (every component
  but `..`, symlink targets included; `SymlinkLoop` beyond), so its work is a small constant.

Why chroot semantics rather than refusing a `..` that climbs above the root: both keep every
access inside the rootfs (containment comes from walking from the root fd and never handing the
kernel a path, not from the `..` rule), but only the chroot rule matches what the machine sees.
The kernel resolves the machine's own paths that way once bwrap has made the rootfs its `/`, so
an unpacked `a -> ../../..` followed by `a/x` writes exactly the file the machine will read as
`a/x`, and the runtime reads the same `/etc/passwd` the machine's libc will. It is also what
containerd (`fs.RootPath`), moby (`FollowSymlinkInScope`) and runc (`securejoin`) do, so an
image unpacks here as it does elsewhere; refusing would reject images that run everywhere else,
and would not protect anything more.

Errors are typed (`RootPathError` and subclasses) for callers to map to their own (`_Reject` in
the unpacker, `MachineError` in the runtime). OS errors (a full disk, permissions) pass through.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MAX_SYMLINK_HOPS = 40
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
DEFAULT_MAX_DEPTH = 256
# Names one resolution may look up (every component but `..`, symlink targets included). A real
# path needs far fewer; 40 hops of 4095-byte targets like `d/../d/../…` would otherwise open
# ~32,000 directories for one tar entry (and a layer may hold a million entries).
MAX_STEPS = 4 * DEFAULT_MAX_DEPTH
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

RelPath = tuple[str, ...]


class RootPathError(Exception):
    """A path cannot be resolved inside the rootfs; the message says why."""


class PathNotFound(RootPathError):
    """A directory on the way (or a symlink's target) does not exist and is not created."""


class NotADirectory(RootPathError):
    """Something other than a directory is where a directory is needed."""


class SymlinkLoop(RootPathError):
    """More than `MAX_SYMLINK_HOPS` symlinks in one resolution."""


class SymlinkNotAllowed(RootPathError):
    """A symlink on the way while `follow_symlinks` is off."""


class PathTooDeep(RootPathError):
    """The resolved path has more than `max_depth` components."""


class BadName(RootPathError):
    """A name with a NUL byte, longer than 255 bytes, or a path longer than allowed."""


@dataclass(slots=True)
class Location:
    """Where a path leads: an open directory inside the rootfs and, unless the path is that
    directory itself, the (unresolved) `name` of the last component in it.

    `parts` is the physical path of `dir_fd` below the root. The caller owns `dir_fd`: close it
    (`close`, or use the location as a context manager).
    """

    dir_fd: int
    parts: RelPath
    name: str | None

    def close(self) -> None:
        """Close `dir_fd` (idempotent)."""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> Location:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_root(rootfs: Path) -> int:
    """An fd of the rootfs directory itself (it must be a real directory, not a symlink)."""
    return os.open(rootfs, DIR_FLAGS)


def resolve(
    root_fd: int,
    path: str | Sequence[str],
    *,
    follow_last: bool = True,
    create_dirs: bool = False,
    follow_symlinks: bool = True,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_path_bytes: int = MAX_PATH_BYTES,
    dir_mode: int = 0o755,
) -> Location:
    """Resolve `path` (a string, or names already split) inside the rootfs open as `root_fd`.

    Returns the parent directory of the last component and its name (None when the path
    resolves to a directory itself: the root, or a path ending in `..`). See the module
    docstring for the rule; raises a `RootPathError` subclass when the path cannot be resolved.
    """
    walk = _Walk(root_fd, follow_symlinks, create_dirs, max_depth, dir_mode)
    return walk.run(_names(path, max_path_bytes), want_dir=False, follow_last=follow_last)


def open_dir(
    root_fd: int,
    path: str | Sequence[str],
    *,
    create: bool = False,
    follow_symlinks: bool = True,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_path_bytes: int = MAX_PATH_BYTES,
    dir_mode: int = 0o755,
) -> Location:
    """Open the directory `path` leads to (every symlink followed, the last one too); `create`
    makes missing directories, the last one included. The result's `name` is None."""
    walk = _Walk(root_fd, follow_symlinks, create, max_depth, dir_mode)
    return walk.run(_names(path, max_path_bytes), want_dir=True, follow_last=True)


def _names(path: str | Sequence[str], max_path_bytes: int) -> list[str]:
    """The components of `path`, last first (a stack), after checking its size."""
    if isinstance(path, str):
        size = _size(path)
        names = path.split("/")
    else:
        names = list(path)
        if any("/" in name for name in names):
            raise BadName("invalid name: a component holds '/'")
        size = sum(_size(name) + 1 for name in names)
    if size > max_path_bytes:
        raise BadName(f"invalid path: {size} bytes (the limit is {max_path_bytes})")
    names = [name for name in reversed(names) if name not in ("", ".")]
    for name in names:
        _check_name(name)  # all of them before anything is opened
    return names


def _size(text: str) -> int:
    """Bytes of `text` as a file name (what the kernel would be given)."""
    try:
        return len(os.fsencode(text))
    except UnicodeEncodeError:
        raise BadName(f"invalid name {text!r}: not encodable as a file name") from None


def _check_name(name: str) -> None:
    if "\0" in name:
        raise BadName(f"invalid name {name!r}: it holds a NUL byte")
    size = _size(name)
    if size > MAX_NAME_BYTES:
        raise BadName(f"invalid name: {size} bytes (the limit is {MAX_NAME_BYTES})")


class _Walk:
    """One resolution: the stack of directories walked through, as open fds and names."""

    def __init__(
        self, root_fd: int, follow_symlinks: bool, create: bool, max_depth: int, dir_mode: int
    ) -> None:
        self.root_fd = root_fd
        self.follow_symlinks = follow_symlinks
        self.create = create
        self.max_depth = max_depth
        self.dir_mode = dir_mode
        self.fds: list[int] = []
        self.names: list[str] = []
        self.hops = 0
        self.steps = 0

    def run(self, pending: list[str], *, want_dir: bool, follow_last: bool) -> Location:
        """Walk `pending` (a stack of names, no empty ones or `.`); see `resolve`, `open_dir`."""
        try:
            last = self._walk(pending, want_dir=want_dir, follow_last=follow_last)
            if len(self.names) + (last is not None) > self.max_depth:
                raise PathTooDeep(self._too_deep())
            fd = self.fds.pop() if self.fds else os.dup(self.root_fd)
            return Location(fd, tuple(self.names), last)
        finally:
            for fd in self.fds:
                os.close(fd)
            self.fds.clear()

    def _walk(self, pending: list[str], *, want_dir: bool, follow_last: bool) -> str | None:
        while pending:
            name = pending.pop()
            if name == "..":
                if self.names:  # at the root, `..` is the root
                    self.names.pop()
                    os.close(self.fds.pop())
                continue
            _check_name(name)
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise SymlinkLoop(f"resolving the path looks up more than {MAX_STEPS} names")
            cur = self.fds[-1] if self.fds else self.root_fd
            if not pending and not want_dir:
                target = self._link_of(cur, name) if follow_last else None
                if target is None:
                    return name
                self._follow(target, pending)
                continue
            fd, target = self._enter(cur, name)
            if target is not None:
                self._follow(target, pending)
                continue
            assert fd is not None
            self.fds.append(fd)
            self.names.append(name)
            if len(self.names) > self.max_depth:
                raise PathTooDeep(self._too_deep())
        return None

    def _too_deep(self) -> str:
        return f"path too deep once symlinks are resolved: more than {self.max_depth} components"

    def _here(self, name: str) -> str:
        return "/" + "/".join((*self.names, name))

    def _follow(self, target: str, pending: list[str]) -> None:
        """Continue with a symlink's `target` in place of the link."""
        self.hops += 1
        if self.hops > MAX_SYMLINK_HOPS:
            raise SymlinkLoop("too many levels of symbolic links")
        if not target:
            raise PathNotFound("empty symlink in the path")
        if target.startswith("/"):
            while self.fds:
                os.close(self.fds.pop())
            self.names.clear()
        pending.extend(name for name in reversed(target.split("/")) if name not in ("", "."))

    def _link_of(self, cur: int, name: str) -> str | None:
        """The target of `name` in `cur` if it is a symlink to follow; None otherwise
        (missing, or anything else)."""
        try:
            st = os.lstat(name, dir_fd=cur)
        except FileNotFoundError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
        if not self.follow_symlinks:
            raise SymlinkNotAllowed(f"the path passes through a symlink: {self._here(name)}")
        return os.readlink(name, dir_fd=cur)

    def _enter(self, cur: int, name: str) -> tuple[int | None, str | None]:
        """Open directory `name` in `cur` (made when missing and creating): (fd, None); or
        (None, target) when it is a symlink to follow."""
        try:
            return os.open(name, DIR_FLAGS, dir_fd=cur), None
        except FileNotFoundError:
            if not self.create:
                raise PathNotFound(f"{self._here(name)} does not exist") from None
            if len(self.names) >= self.max_depth:  # never make one beyond the limit
                raise PathTooDeep(self._too_deep()) from None
            # made meanwhile: opened (or refused) below like any other
            with suppress(FileExistsError):
                os.mkdir(name, self.dir_mode, dir_fd=cur)
            return self._enter_existing(cur, name)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        return self._enter_existing(cur, name)

    def _enter_existing(self, cur: int, name: str) -> tuple[int | None, str | None]:
        target = self._link_of(cur, name)
        if target is not None:
            return None, target
        try:
            return os.open(name, DIR_FLAGS, dir_fd=cur), None
        except FileNotFoundError:
            raise PathNotFound(f"{self._here(name)} does not exist") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise NotADirectory(f"{self._here(name)} is not a directory") from None
            raise
