"""A read-only FUSE filesystem over an image's merged tree (`skyreg.lazy.tree`): the lower layer
of a machine's rootfs while its image is still on its way (lazy pull).

Names, types, modes, owners, sizes, link counts, mtimes and link targets come from the tree (what
a root unpack of the same layers writes); a file's bytes are read through its layer's
`LayerReader`, every chunk verified: a chunk that fails twice (`CorruptChunk`: the first failure
drops the reader's decoder state and refetches) is EIO, never served. Writes of any kind are
refused (the mount is `ro`: EROFS). Extended attributes are the tree's (none unless it was merged
with `keep_xattrs`).

`mount` runs pyfuse3's trio loop in a thread of its own and returns once the kernel mount is in
place; `Mount.unmount` ends the loop and unmounts (lazily, so an open file cannot keep the mount
alive), idempotently, and is what a `with` block ends with. Reads run in worker threads (at most
`READ_THREADS` at once) so a slow Range request never stalls lookups. pyfuse3 serves one
filesystem per process: a second `mount` while one is live raises `LazyFSError`.

Memory: the tree (already bounded by its limits), the readers' own chunk caches (bounded) and
one listing per open directory (released with it); nothing else is cached here. The kernel
caches attributes and entries for `ATTR_TIMEOUT` seconds: the tree never changes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

import pyfuse3
import trio

from skyreg.lazy.index import LayerIndexError
from skyreg.lazy.prefetch import Recorder
from skyreg.lazy.reader import CorruptChunk, LayerReader
from skyreg.lazy.tree import MAX_NAME_BYTES, Node, Tree, read

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 300.0
READ_THREADS = 4
READ_ATTEMPTS = 2  # a corrupt chunk is fetched once more before the read fails
_TYPES = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}
_BLOCK = 4096

_active = threading.Lock()  # pyfuse3 holds one session per process


class LazyFSError(Exception):
    """The filesystem cannot be mounted (the message says why)."""


class LazyFS(pyfuse3.Operations):
    """pyfuse3 operations over `tree`, reading files through `readers` (one per layer, in the
    order the tree was merged from); `recorder` (learned prefetch) notes what is read."""

    def __init__(
        self, tree: Tree, readers: list[LayerReader], recorder: Recorder | None = None
    ) -> None:
        super().__init__()
        self.tree = tree
        self.readers = readers
        self.recorder = recorder
        self._limiter = trio.CapacityLimiter(READ_THREADS)
        self._dirs: dict[int, list[tuple[bytes, Node]]] = {}
        self._next_dir = 0
        self._mounted_ns = time.time_ns()

    # -- attributes --------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        """The stat of `node` as the kernel gets it."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = node.ino
        attrs.generation = 0
        attrs.entry_timeout = ATTR_TIMEOUT
        attrs.attr_timeout = ATTR_TIMEOUT
        attrs.st_mode = _TYPES[node.kind] | node.mode
        attrs.st_nlink = node.nlink
        attrs.st_uid = node.uid
        attrs.st_gid = node.gid
        attrs.st_rdev = 0
        size = node.size if node.kind != "dir" else _BLOCK
        attrs.st_size = size
        attrs.st_blksize = _BLOCK
        attrs.st_blocks = -(-size // 512)
        when = node.mtime_ns if node.mtime_ns is not None else self._mounted_ns
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = when
        return attrs

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if len(name) > MAX_NAME_BYTES:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(child)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attributes(self._node(inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if node.target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = _BLOCK
        data.f_blocks = data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.tree.nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = MAX_NAME_BYTES
        return data

    # -- directories -------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._next_dir += 1
        self._dirs[self._next_dir] = [(os.fsencode(n), c) for n, c in node.children.items()]
        return self._next_dir

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for number in range(start_id, len(listing)):
            name, child = listing[number]
            if not pyfuse3.readdir_reply(token, name, self.attributes(child), number + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind == "dir" else errno.ELOOP)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        if node.kind != "file" or not 0 <= node.layer < len(self.readers):
            raise pyfuse3.FUSEError(errno.EIO)
        reader = self.readers[node.layer]
        return await trio.to_thread.run_sync(
            self._read, node, reader, off, size, limiter=self._limiter
        )

    def _read(self, node: Node, reader: LayerReader, off: int, size: int) -> bytes:
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                data = read(node, reader, off, size)
            except CorruptChunk as e:
                log.warning("inode %d, attempt %d: %s", node.ino, attempt, e)
            except (LayerIndexError, OSError) as e:
                log.warning("inode %d: cannot read its layer: %s", node.ino, e)
                break
            else:
                if self.recorder is not None and data:
                    self._record(node, off, len(data))
                return data
        raise pyfuse3.FUSEError(errno.EIO)

    def _record(self, node: Node, off: int, length: int) -> None:
        """Note the bytes of the layer's stream this read used (a sparse file: its stored
        runs, whole)."""
        assert self.recorder is not None and node.entry is not None
        entry = node.entry
        if entry.offset is None:
            return
        if entry.sparse is None:
            self.recorder.read(node.layer, entry.offset + off, length)
        else:
            self.recorder.read(node.layer, entry.offset, sum(n for _, n in entry.sparse))

    async def release(self, fh: int) -> None:
        return None

    # -- extended attributes ----------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        xattrs = self._node(inode).xattrs or {}
        value = xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(name) for name in self._node(inode).xattrs or {}]


class Mount:
    """A live mount of a `LazyFS`; `unmount` (or leaving a `with` block) ends it."""

    def __init__(self, mountpoint: Path, ops: LazyFS) -> None:
        self.mountpoint = mountpoint
        self.ops = ops
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, name="lazyfs", daemon=True)
        self._done = False

    def _start(self, options: set[str]) -> None:
        self._options = options
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise LazyFSError(f"cannot mount {self.mountpoint}: {self._error}") from self._error

    def _run(self) -> None:
        try:
            pyfuse3.init(self.ops, str(self.mountpoint), self._options)
        except BaseException as e:  # reported to the caller of mount
            self._error = e
            self._ready.set()
            return
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("lazy filesystem at %s failed", self.mountpoint)
        finally:
            self._ready.set()
            pyfuse3.close(unmount=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._ready.set()
        await pyfuse3.main()

    def unmount(self, timeout: float = 30.0) -> None:
        """End the loop and unmount (idempotent); falls back to `fusermount3 -u -z`."""
        if self._done:
            return
        self._done = True
        try:
            if self._token is not None and self._thread.is_alive():
                with contextlib.suppress(trio.RunFinishedError):
                    trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._token)
            self._thread.join(timeout)
            if self._thread.is_alive() or _mounted(self.mountpoint):
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.mountpoint)],
                    check=False,
                    capture_output=True,
                    timeout=timeout,
                )
                self._thread.join(timeout)
        finally:
            if not self._thread.is_alive():
                _active.release()

    def __enter__(self) -> Mount:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmount()


def _mounted(path: Path) -> bool:
    """Whether `path` is a mount point now (its own line in /proc/self/mountinfo)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if len(fields) > 4 and _unescape(fields[4]) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """A mountinfo path: spaces, tabs, newlines and backslashes are octal escapes."""
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def mount(
    tree: Tree,
    readers: list[LayerReader],
    mountpoint: Path,
    *,
    allow_other: bool | None = None,
    recorder: Recorder | None = None,
) -> Mount:
    """Mount `tree` read-only at `mountpoint` (an existing directory), its files read through
    `readers` (one per layer, the order `merge` got), each read noted by `recorder` if any.
    `allow_other` (default: when root) lets other users (the machine's) in; the kernel checks
    modes and owners (`default_permissions`). Raises `LazyFSError` when FUSE is missing or a
    mount is already live in this process."""
    if not _active.acquire(blocking=False):
        raise LazyFSError("a lazy filesystem is already mounted by this process")
    options = set(pyfuse3.default_options) | {"ro", "fsname=skyreg-lazy", "subtype=skyreg"}
    if allow_other if allow_other is not None else os.geteuid() == 0:
        options.add("allow_other")
    handle = Mount(Path(mountpoint), LazyFS(tree, readers, recorder))
    try:
        handle._start(options)
    except BaseException:
        _active.release()
        raise
    return handle
