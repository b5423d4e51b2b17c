"""An image's merged tree from its layers' indexes: what `machines/unpack.py` would write to disk,
kept in memory, for a lazy mount (`machines/lazyfs.py`) to present before the layers arrive.

`merge` applies the layers' entries, lowest first, exactly as the unpacker applies tar entries,
as root (owners applied, setuid/setgid kept), on a tree of nodes instead of a directory:

- names are cleaned lexically (a leading `/` dropped, `.` ignored, a `..` that climbs above the
  root rejects the entry), then resolved as `machines/rootpath.py` resolves them: parents walked
  from the root, a symlink on the way followed as if the rootfs were `/` (an absolute target
  restarts at the root, `..` at the root stays there, at most 40 hops and 1024 names looked up),
  missing parents made (0755, root's), the last component never followed;
- a directory over a directory keeps its contents, anything else replaces what is there (a
  directory with its subtree); hard links name an entry already present, through real
  directories only, not a directory, and share its node; symlink targets are kept verbatim;
  device nodes and FIFOs are skipped;
- whiteouts `.wh.<name>` and opaque markers `.wh..wh..opq` remove what lower layers left and
  spare every path the layer itself wrote, whatever the order in the tar; AUFS `.wh..wh.*`
  metadata is ignored;
- a directory's mode and mtime are the last ones a layer gave it; owners follow `chown`'s rules
  (an id of -1 or 2^32-1 keeps the current one, one out of range keeps both);
- the unpacker's limits (`UnpackLimits`, defined in `oci/layerlimits.py` for both;
  `MergeLimits` here) raise `MergeLimitError` where it raises `UnpackLimitError`; rejected
  entries are listed as it lists them.

A file node points at its layer (`layer`: the position in the list `merge` was given) and its
index `Entry`; `read` serves its bytes through that layer's `LayerReader`. Xattrs: the unpacker
writes none, so neither does the tree unless `keep_xattrs` is set.

The bookkeeping is the unpacker's: the paths the current layer wrote (and their ancestors) in a
tree of components, directories already pruned in this layer. Memory is bounded by the number of
nodes (`max_nodes`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from skyreg.lazy.index import Entry, LayerIndex
from skyreg.lazy.reader import LayerReader
from skyreg.oci.layerlimits import UnpackLimits

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_STEPS = 1024  # names one resolution may look up (rootpath.MAX_STEPS)
MAX_REJECTED_NAMES = 1000
_SYMLINK_MAX = 4096
_ID_UNCHANGED = (-1, 0xFFFF_FFFF)
_NS_MAX = 2**63

RelPath = tuple[str, ...]


class MergeError(Exception):
    """The layers cannot make a tree: an entry the unpacker would refuse the image for."""


class MergeLimitError(MergeError):
    """A layer or the image breaks one of the `MergeLimits`."""


# The unpacker's own bounds (same class): the tree refuses exactly the images it refuses.
MergeLimits = UnpackLimits


def max_nodes(limits: UnpackLimits) -> int:
    """Nodes the merged tree may hold."""
    return 4 * limits.entries


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry that was not applied (`layer` counts from 1, as the unpacker's report)."""

    layer: int
    name: str
    reason: str


@dataclass(slots=True)
class MergeReport:
    """What `merge` did, counted as `UnpackReport` counts."""

    layers: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped_special: int = 0
    rejected_count: int = 0
    rejected: list[Rejected] = field(default_factory=list)


class Node:
    """A directory, regular file or symlink of the merged tree. `mtime_ns` is None where the
    unpacker leaves the time of unpacking (directories made as missing parents)."""

    __slots__ = (
        "children",
        "entry",
        "gid",
        "ino",
        "kind",
        "layer",
        "mode",
        "mtime_ns",
        "nlink",
        "target",
        "uid",
        "xattrs",
    )

    def __init__(self, kind: str, mode: int) -> None:
        self.kind = kind  # "dir", "file" or "symlink"
        self.mode = mode  # permission bits (with setuid, setgid, sticky)
        self.uid = 0
        self.gid = 0
        self.mtime_ns: int | None = None
        self.ino = 0
        self.nlink = 0  # names of a file or symlink; 2 + subdirectories of a directory
        self.children: dict[str, Node] | None = {} if kind == "dir" else None
        self.layer = -1
        self.entry: Entry | None = None
        self.target: str | None = None
        self.xattrs: dict[str, bytes] | None = None

    @property
    def size(self) -> int:
        """Bytes of a file, of a symlink's target; 0 for a directory."""
        if self.kind == "file":
            assert self.entry is not None
            return self.entry.size
        if self.kind == "symlink":
            assert self.target is not None
            return len(os.fsencode(self.target))
        return 0


@dataclass(slots=True)
class Tree:
    """The merged tree: `nodes[ino - 1]` is the node numbered `ino` (the root is 1)."""

    root: Node
    nodes: list[Node]
    report: MergeReport

    def node(self, ino: int) -> Node | None:
        """The node numbered `ino`, if any."""
        return self.nodes[ino - 1] if 0 < ino <= len(self.nodes) else None

    def lookup(self, path: str) -> Node | None:
        """The node at `path` (physical: no symlink followed), if any."""
        node: Node | None = self.root
        for name in path.split("/"):
            if not name:
                continue
            if node is None or node.children is None:
                return None
            node = node.children.get(name)
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every node but the root with its path ("a/b"), parents before children."""
        stack: list[tuple[str, Node]] = [("", self.root)]
        while stack:
            prefix, node = stack.pop()
            assert node.children is not None
            for name, child in node.children.items():
                path = f"{prefix}{name}"
                yield path, child
                if child.children is not None:
                    stack.append((f"{path}/", child))


def read(node: Node, reader: LayerReader, offset: int, size: int) -> bytes:
    """`size` bytes of the file `node` from `offset` (fewer at its end; a sparse file's holes
    read as zeros), through its layer's `reader`. `CorruptChunk` if the bytes are not the
    index's."""
    entry = node.entry
    if entry is None or entry.offset is None:
        raise MergeError("not a regular file")
    end = min(offset + size, entry.size)
    if offset >= end:
        return b""
    if entry.sparse is None:  # the file's end: what a reader of it likely reads up to
        return reader.read(entry.offset + offset, end - offset, entry.offset + entry.size)
    out = bytearray(end - offset)
    stored = entry.offset
    until = entry.offset + sum(length for _, length in entry.sparse)
    for start, length in entry.sparse:
        lo, hi = max(start, offset), min(start + length, end)
        if lo < hi:
            out[lo - offset : hi - offset] = reader.read(stored + lo - start, hi - lo, until)
        stored += length
    return bytes(out)


def merge(
    layers: list[LayerIndex], limits: MergeLimits | None = None, *, keep_xattrs: bool = False
) -> Tree:
    """The tree of an image from its layers' indexes, lowest first (see the module docstring).

    Raises `MergeLimitError` where the unpacker raises `UnpackLimitError`, `MergeError` where
    it raises `UnpackError` for an entry (a negative size, a corrupt sparse map)."""
    merger = _Merger(limits or MergeLimits(), keep_xattrs)
    image_bytes = 0
    for position, index in enumerate(layers):
        image_bytes += merger.apply_layer(position, index, image_bytes)
    return merger.finish()


# -- resolution (machines/rootpath.py, on nodes) ---------------------------------------------


class _PathError(Exception):
    """A path cannot be resolved; `not_found` when rootpath says PathNotFound/NotADirectory."""

    def __init__(self, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


class _Reject(Exception):
    """The current entry is unsafe or impossible; `args[0]` says why."""


class _NotFound(Exception):
    """A path looked up without creating does not lead to a directory."""


def _fs_size(text: str) -> int:
    try:
        return len(os.fsencode(text))
    except UnicodeEncodeError:
        raise _PathError(f"invalid name {text!r}: not encodable as a file name") from None


def _check_name(name: str) -> None:
    if "\0" in name:
        raise _PathError(f"invalid name {name!r}: it holds a NUL byte")
    size = _fs_size(name)
    if size > MAX_NAME_BYTES:
        raise _PathError(f"invalid name: {size} bytes (the limit is {MAX_NAME_BYTES})")


@dataclass(slots=True)
class _Place:
    """Where a path leads: a directory node, its physical path, the last name in it (if any)."""

    dir: Node
    parts: RelPath
    name: str | None


class _Walk:
    """One resolution, as rootpath's `_Walk`; missing directories are made when `create`."""

    def __init__(
        self, merger: _Merger, *, follow_symlinks: bool, create: bool, max_depth: int
    ) -> None:
        self.merger = merger
        self.follow_symlinks = follow_symlinks
        self.create = create
        self.max_depth = max_depth
        self.dirs: list[Node] = []
        self.names: list[str] = []
        self.hops = 0
        self.steps = 0

    def run(self, parts: RelPath, max_path_bytes: int, *, want_dir: bool) -> _Place:
        size = sum(_fs_size(name) + 1 for name in parts)
        if size > max_path_bytes:
            raise _PathError(f"invalid path: {size} bytes (the limit is {max_path_bytes})")
        pending = [name for name in reversed(parts) if name not in ("", ".")]
        for name in pending:
            _check_name(name)
        last = self._walk(pending, want_dir=want_dir)
        if len(self.names) + (last is not None) > self.max_depth:
            raise _PathError(self._too_deep())
        here = self.dirs[-1] if self.dirs else self.merger.root
        return _Place(here, tuple(self.names), last)

    def _too_deep(self) -> str:
        return f"path too deep once symlinks are resolved: more than {self.max_depth} components"

    def _walk(self, pending: list[str], *, want_dir: bool) -> str | None:
        while pending:
            name = pending.pop()
            if name == "..":
                if self.names:
                    self.names.pop()
                    self.dirs.pop()
                continue
            _check_name(name)
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise _PathError(f"resolving the path looks up more than {MAX_STEPS} names")
            cur = self.dirs[-1] if self.dirs else self.merger.root
            if not pending and not want_dir:
                return name  # the last component is never followed here
            child = self._enter(cur, name)
            if child.kind == "symlink":
                self._follow(child.target or "", pending)
                continue
            self.dirs.append(child)
            self.names.append(name)
            if len(self.names) > self.max_depth:
                raise _PathError(self._too_deep())
        return None

    def _enter(self, cur: Node, name: str) -> Node:
        assert cur.children is not None
        child = cur.children.get(name)
        if child is None:
            if not self.create:
                where = "/" + "/".join((*self.names, name))
                raise _PathError(f"{where} does not exist", not_found=True)
            if len(self.names) >= self.max_depth:
                raise _PathError(self._too_deep())
            child = self.merger.new_node("dir", 0o755)
            cur.children[name] = child
            return child
        if child.kind == "dir":
            return child
        if child.kind == "symlink":
            if not self.follow_symlinks:
                where = "/" + "/".join((*self.names, name))
                raise _PathError(f"the path passes through a symlink: {where}")
            return child
        where = "/" + "/".join((*self.names, name))
        raise _PathError(f"{where} is not a directory", not_found=True)

    def _follow(self, target: str, pending: list[str]) -> None:
        self.hops += 1
        if self.hops > MAX_SYMLINK_HOPS:
            raise _PathError("too many levels of symbolic links")
        if not target:
            raise _PathError("empty symlink in the path", not_found=True)
        if target.startswith("/"):
            self.dirs.clear()
            self.names.clear()
        pending.extend(name for name in reversed(target.split("/")) if name not in ("", "."))


# -- the merge (machines/unpack.py's _Unpacker, on nodes) ------------------------------------


class _Keep:
    """A tree of path components: the paths a layer wrote, with their ancestors."""

    __slots__ = ("kids",)

    def __init__(self) -> None:
        self.kids: dict[str, _Keep] = {}

    def find(self, rel: RelPath) -> _Keep | None:
        node: _Keep | None = self
        for name in rel:
            if node is None:
                return None
            node = node.kids.get(name)
        return node

    def insert(self, rel: RelPath) -> int:
        """Add `rel`; the nodes made."""
        node, made = self, 0
        for name in rel:
            child = node.kids.get(name)
            if child is None:
                child = node.kids[name] = _Keep()
                made += 1
            node = child
        return made


def _split(name: str, max_depth: int) -> RelPath:
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


def _depth(name: str) -> int:
    return sum(1 for part in name.split("/") if part not in ("", "."))


def _text(raw: bytes) -> str:
    """A tar name as tarfile gives it to the unpacker (UTF-8, other bytes escaped)."""
    return raw.decode("utf-8", "surrogateescape")


def _sparse_stored(label: str, entry: Entry, name: str) -> int:
    end = stored = 0
    for offset, size in entry.sparse or []:
        if size == 0 and offset >= 0:
            continue
        if offset < end or size < 0 or offset + size > entry.size:
            raise MergeError(
                f"{label} is unreadable: {name!r} has a corrupt sparse map "
                f"(chunk of {size} bytes at {offset} in a file of {entry.size} bytes)"
            )
        end = offset + size
        stored += size
    return stored


class _Merger:
    def __init__(self, limits: MergeLimits, keep_xattrs: bool) -> None:
        self.limits = limits
        self.keep_xattrs = keep_xattrs
        self.report = MergeReport()
        self.nodes = 0
        self.root = self.new_node("dir", 0o755)
        self.layer = 0
        self.position = 0
        self._keep = _Keep()
        self._keep_nodes = 0
        self._pruned: set[RelPath] = set()

    def new_node(self, kind: str, mode: int) -> Node:
        self.nodes += 1
        if self.nodes > max_nodes(self.limits):
            raise MergeLimitError(f"the image's tree has more than {max_nodes(self.limits)} nodes")
        return Node(kind, mode)

    # -- layers ------------------------------------------------------------------------------

    def apply_layer(self, position: int, index: LayerIndex, image_bytes: int) -> int:
        """Apply one layer's entries; the bytes it expands to (stream and sparse holes)."""
        self.layer, self.position = position + 1, position
        self._keep = _Keep()
        self._keep_nodes = 0
        self._pruned = set()
        label = f"layer {self.layer} ({index.digest})"
        expands = index.uncompressed_size
        for count, entry in enumerate(index.entries, 1):
            name = _text(entry.raw_name())
            link = _text(raw) if (raw := entry.raw_link()) is not None else ""
            self._check_entry(label, count, entry, name, link)
            if entry.type == "file":
                expands += entry.size - _sparse_stored(label, entry, name)
                if expands > self.limits.layer_bytes:
                    raise MergeLimitError(f"{label} is larger than allowed")
                if image_bytes + expands > self.limits.image_bytes:
                    raise MergeLimitError(
                        f"the image is larger than {self.limits.image_bytes} bytes once "
                        f"decompressed (reached in {label})"
                    )
            try:
                self._apply(entry, name, link)
            except _Reject as e:
                self._reject(name, str(e))
        if expands > self.limits.layer_bytes or image_bytes + expands > self.limits.image_bytes:
            raise MergeLimitError(f"{label} is larger than allowed once decompressed")
        self.report.layers += 1
        return expands

    def _check_entry(self, label: str, count: int, entry: Entry, name: str, link: str) -> None:
        """The checks of the unpacker's `_bounded_members` and `_charge_file`."""
        limits = self.limits
        if count > limits.entries:
            raise MergeLimitError(f"{label} has more than {limits.entries} entries")
        for what, value in (("path", name), ("link target", link)):
            size = len(value.encode("utf-8", "surrogateescape"))
            if size > limits.path_bytes:
                raise MergeLimitError(
                    f"{label}: an entry has a {what} of {size} bytes; "
                    f"the limit is {limits.path_bytes}"
                )
            depth = _depth(value) if what == "path" or entry.type == "hardlink" else 0
            if depth > limits.path_depth:
                raise MergeLimitError(
                    f"{label}: an entry has a {what} of {depth} components; "
                    f"the limit is {limits.path_depth}"
                )
        if entry.type == "file" and entry.size < 0:
            raise MergeError(f"{label}: {name!r} has a negative size")

    def finish(self) -> Tree:
        """Number the nodes (root 1, parents first) and count directory links."""
        nodes: list[Node] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.ino:
                continue  # a hard link's node, numbered at its first name
            nodes.append(node)
            node.ino = len(nodes)
            if node.children is not None:
                node.nlink = 2 + sum(1 for c in node.children.values() if c.kind == "dir")
                stack.extend(reversed(list(node.children.values())))
        return Tree(self.root, nodes, self.report)

    def _reject(self, name: str, reason: str) -> None:
        self.report.rejected_count += 1
        if len(self.report.rejected) < MAX_REJECTED_NAMES:
            self.report.rejected.append(Rejected(self.layer, name, reason))

    def _apply(self, entry: Entry, name: str, link: str) -> None:
        parts = _split(name, self.limits.path_depth)
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._whiteout(parts)
        elif entry.type == "dir":
            self._dir(parts, entry)
        elif not parts:
            raise _Reject("only a directory may replace the root")
        elif entry.type == "file":
            self._file(parts, entry)
        elif entry.type == "symlink":
            self._symlink(parts, entry, link)
        elif entry.type == "hardlink":
            self._hardlink(parts, link)
        else:
            self.report.skipped_special += 1

    # -- entries -----------------------------------------------------------------------------

    def _dir(self, parts: RelPath, entry: Entry) -> None:
        if not parts:
            self._attrs(self.root, entry)
            return
        place = self._parent(parts)
        assert place.name is not None and place.dir.children is not None
        rel = (*place.parts, place.name)
        node = place.dir.children.get(place.name)
        if node is None or node.kind != "dir":
            self._clear(place.dir, place.name)
            node = self.new_node("dir", 0o700)
            place.dir.children[place.name] = node
        self._attrs(node, entry)
        self._touch(rel)
        self.report.dirs += 1

    def _file(self, parts: RelPath, entry: Entry) -> None:
        place = self._parent(parts)
        assert place.name is not None and place.dir.children is not None
        self._clear(place.dir, place.name)
        node = self.new_node("file", 0)
        node.layer, node.entry, node.nlink = self.position, entry, 1
        self._attrs(node, entry)
        place.dir.children[place.name] = node
        self._touch((*place.parts, place.name))
        self.report.files += 1

    def _symlink(self, parts: RelPath, entry: Entry, target: str) -> None:
        if "\0" in target:
            raise _Reject("symlink target holds a NUL byte")
        if not target:
            raise _Reject("symlink with an empty target")
        if len(os.fsencode(target)) >= _SYMLINK_MAX:
            raise _Reject(f"symlink target longer than the kernel's {_SYMLINK_MAX - 1} bytes")
        place = self._parent(parts)
        assert place.name is not None and place.dir.children is not None
        self._clear(place.dir, place.name)
        node = self.new_node("symlink", 0o777)
        node.target, node.nlink = target, 1
        self._chown(node, entry)
        node.mtime_ns = _mtime_ns(entry.mtime)
        place.dir.children[place.name] = node
        self._touch((*place.parts, place.name))
        self.report.symlinks += 1

    def _hardlink(self, parts: RelPath, link: str) -> None:
        target = _split(link, self.limits.path_depth)
        if not target:
            raise _Reject("hard link to the root")
        try:
            tplace = self._parent(target, follow=False, create=False)
        except _NotFound:
            raise _Reject(f"hard link target {link!r} does not exist") from None
        assert tplace.name is not None and tplace.dir.children is not None
        node = tplace.dir.children.get(tplace.name)
        if node is None:
            raise _Reject(f"hard link target {link!r} does not exist")
        if node.kind == "dir":
            raise _Reject("hard link to a directory")
        trel = (*tplace.parts, tplace.name)
        place = self._parent(parts)
        assert place.name is not None and place.dir.children is not None
        rel = (*place.parts, place.name)
        if rel != trel:
            self._clear(place.dir, place.name)
            if self._at(trel) is not node:  # the clearing took the target with it
                raise _Reject("hard link failed: No such file or directory")
            place.dir.children[place.name] = node
            node.nlink += 1
        self._touch(rel)
        self.report.hardlinks += 1

    def _whiteout(self, parts: RelPath) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            self._opaque(parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX * 2):
            return  # AUFS metadata
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise _Reject("invalid whiteout name")
        self.report.whiteouts += 1
        try:
            place = self._parent(parts, create=False)
        except _NotFound:
            return
        rel = (*place.parts, name)
        if self._keep.find(rel) is not None:  # this layer wrote it: only lower contents go
            assert place.dir.children is not None
            child = place.dir.children.get(name)
            if child is not None and child.kind == "dir":
                self._prune(child, rel)
        else:
            self._clear(place.dir, name)

    def _opaque(self, dir_parts: RelPath) -> None:
        self.report.opaque_dirs += 1
        try:
            place = self._resolve(dir_parts, create=False, follow=True, want_dir=True)
        except _NotFound:
            return
        self._prune(place.dir, place.parts)
        self._touch(place.parts)

    # -- helpers -----------------------------------------------------------------------------

    def _attrs(self, node: Node, entry: Entry) -> None:
        self._chown(node, entry)
        node.mode = entry.mode & 0o7777
        node.mtime_ns = _mtime_ns(entry.mtime)
        if self.keep_xattrs and entry.xattrs:
            node.xattrs = {k: base64.b64decode(v) for k, v in entry.xattrs.items()}

    def _chown(self, node: Node, entry: Entry) -> None:
        """As `os.chown` by root: an id out of range changes neither; -1 keeps one."""
        ids = (entry.uid, entry.gid)
        if not all(-1 <= i <= 0xFFFF_FFFF for i in ids):
            return
        if entry.uid not in _ID_UNCHANGED:
            node.uid = entry.uid
        if entry.gid not in _ID_UNCHANGED:
            node.gid = entry.gid

    def _touch(self, rel: RelPath) -> None:
        self._keep_nodes += self._keep.insert(rel)
        if self._keep_nodes > self.limits.path_nodes:
            raise MergeLimitError(
                f"layer {self.layer}: more than {self.limits.path_nodes} path components to "
                "keep track of"
            )

    def _at(self, rel: RelPath) -> Node | None:
        node: Node | None = self.root
        for name in rel:
            if node is None or node.children is None:
                return None
            node = node.children.get(name)
        return node

    def _clear(self, parent: Node, name: str) -> None:
        """Remove `name` from `parent` with everything below it."""
        assert parent.children is not None
        gone = parent.children.pop(name, None)
        stack = [gone] if gone is not None else []
        while stack:
            node = stack.pop()
            if node.children is None:
                node.nlink -= 1
                if node.nlink == 0:
                    self.nodes -= 1
            else:
                self.nodes -= 1
                stack.extend(node.children.values())

    def _prune(self, top: Node, top_rel: RelPath) -> None:
        """Remove everything below directory `top` not written by the current layer."""
        if any(top_rel[:n] in self._pruned for n in range(len(top_rel) + 1)):
            return
        self._pruned.add(top_rel)
        stack: list[tuple[Node, _Keep | None]] = [(top, self._keep.find(top_rel))]
        while stack:
            node, keep = stack.pop()
            assert node.children is not None
            for name, child in list(node.children.items()):
                kept = keep.kids.get(name) if keep is not None else None
                if kept is None:
                    self._clear(node, name)
                elif child.kind == "dir":
                    stack.append((child, kept))

    def _parent(self, parts: RelPath, *, create: bool = True, follow: bool = True) -> _Place:
        return self._resolve(parts, create=create, follow=follow, want_dir=False)

    def _resolve(self, parts: RelPath, *, create: bool, follow: bool, want_dir: bool) -> _Place:
        limits = self.limits
        walk = _Walk(self, follow_symlinks=follow, create=create, max_depth=limits.path_depth)
        try:
            return walk.run(parts, max(limits.path_bytes, MAX_PATH_BYTES) + 1, want_dir=want_dir)
        except _PathError as e:
            if e.not_found and not create:
                raise _NotFound from None
            raise _Reject(str(e)) from None


def _mtime_ns(mtime: int) -> int | None:
    """As the unpacker's `_set_mtime`: a time utime cannot take is left unset."""
    ns = mtime * 1_000_000_000
    return ns if -_NS_MAX <= ns < _NS_MAX else None
