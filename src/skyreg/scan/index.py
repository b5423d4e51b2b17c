"""Index an image from its layer blobs: the final file tree and the packages it holds.

`index_image` reads each layer once, bottom to top, as a stream (gzip, zstd or plain tar, told
apart by their first bytes; `tarfile` in stream mode), and never writes to disk. The tree is
kept in memory as nodes without contents; whiteouts (`.wh.NAME`, opaque `.wh..wh..opq`) remove
nodes the way `machines/unpack.py` removes files: what the current layer wrote itself is kept,
whatever the order of the entries in its tar. A file a cataloger wants (package databases,
os-release, Python metadata, `package.json`, ...) is read into memory (at most
`max_record_bytes`) and parsed at once; its packages hang on its node, so a file deleted or
replaced by an upper layer takes its packages away, and so does the whiteout of a parent
directory. ELF executables are scanned for Go build information in chunks as they stream by.

Entry names are taken lexically (`./`, `/` and `..` above the root are dropped): layer tars
are diffs of real file systems and do not write through symlinks. Symlinks are only followed
when the os-release file is looked up at the end, inside the image tree (at most 40 hops).

Limits (`IndexLimits`): entries and decompressed bytes per image, the extended headers of one
entry, path length and depth, records read into memory, bytes of a binary scanned, packages.
A breach, a layer that is not a tar or is corrupt raises `ScanError` naming the layer.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

import msgspec

from skyreg.scan import catalog, golang, rpmdb
from skyreg.scan.layerstream import (
    FORMAT_ERRORS,
    Counted,
    ScanError,
    checked_tarinfo,
    open_layer,
    open_tar,
)
from skyreg.scan.model import FileEntry, ImageIndex, OsRelease, Package

__all__ = ["IndexLimits", "Layer", "ScanError", "index_image"]

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_ELF_MAGIC = b"\x7fELF"
_CHUNK = 1 << 20
_MAX_HOPS = 40


@dataclass(frozen=True, slots=True)
class IndexLimits:
    """Bounds on what indexing one image may cost."""

    max_files: int = 200_000  # entries kept in `ImageIndex.files` (past it: files_truncated)
    max_entries: int = 2_000_000  # tar entries of all layers together
    max_bytes: int = 16 << 30  # decompressed tar bytes of all layers together
    max_record_bytes: int = 64 << 20  # one cataloged file read into memory
    max_binary_bytes: int = 512 << 20  # bytes of one ELF file searched for Go build info
    max_path_bytes: int = 4096  # an entry's name or link target (UTF-8)
    max_depth: int = 256  # components of an entry's name
    max_packages: int = 200_000  # packages found (alive at once)
    max_header_bytes: int = 1 << 20  # extended tar headers (PAX, GNU long names) of one entry


class Layer(NamedTuple):
    """One layer blob as stored (gzip, zstd or plain tar) and how to open it."""

    digest: str
    media_type: str
    open: Callable[[], BinaryIO]


# -- the tree ------------------------------------------------------------------------------------


class _Node:
    """One path of the tree: its last writer and, for cataloged files, what they listed."""

    __slots__ = ("children", "found", "kind", "layer", "link", "mode", "os_text", "seen", "size")

    def __init__(self, kind: str, layer: str, seen: int, mode: int = 0o755) -> None:
        self.children: dict[str, _Node] | None = {} if kind == "dir" else None
        self.kind = kind
        self.size = 0
        self.mode = mode
        self.layer = layer
        self.link = ""
        self.seen = seen  # index of the last layer that wrote this node or something below it
        self.found: tuple[Package, ...] = ()
        self.os_text: bytes | None = None


class _Tree:
    def __init__(self, limits: IndexLimits) -> None:
        self.limits = limits
        self.root = _Node("dir", "", 0)
        self.nodes = 1
        self.packages = 0
        self.layer_no = 0
        self.layer = ""
        self.label = ""
        self._pruned: set[tuple[str, ...]] = set()

    def start_layer(self, number: int, layer: Layer) -> None:
        self.layer_no = number
        self.layer = layer.digest
        self.label = f"layer {number} ({layer.digest})"
        self._pruned = set()

    # bookkeeping

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > 2 * self.limits.max_entries:
            raise ScanError(
                f"{self.label}: more than {2 * self.limits.max_entries} paths in the tree "
                f"(2 x the limit of {self.limits.max_entries} entries)"
            )

    def _drop(self, node: _Node) -> None:
        """Account for `node` and its subtree leaving the tree."""
        stack = [node]
        while stack:
            n = stack.pop()
            self.nodes -= 1
            self.packages -= len(n.found)
            if n.children:
                stack.extend(n.children.values())

    def set_found(self, node: _Node, found: Sequence[Package]) -> None:
        self.packages += len(found) - len(node.found)
        node.found = tuple(found)
        if self.packages > self.limits.max_packages:
            raise ScanError(
                f"{self.label}: more than {self.limits.max_packages} packages (limit max_packages)"
            )

    # lookups

    def parent(self, parts: tuple[str, ...]) -> _Node:
        """The directory holding `parts`, created (as directories written by this layer) as
        needed; a non-directory in the way is replaced."""
        node = self.root
        node.seen = self.layer_no
        for name in parts[:-1]:
            assert node.children is not None
            child = node.children.get(name)
            if child is None or child.children is None:
                if child is not None:
                    self._drop(child)
                child = _Node("dir", self.layer, self.layer_no)
                node.children[name] = child
                self._count(1)
            child.seen = self.layer_no
            node = child
        return node

    def find(self, parts: tuple[str, ...]) -> _Node | None:
        node: _Node | None = self.root
        for name in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(name)
        return node

    # changes

    def put(self, parts: tuple[str, ...], kind: str, info: tarfile.TarInfo) -> _Node:
        """Write an entry; a directory over a directory keeps its contents."""
        if not parts:
            self.root.mode, self.root.layer = info.mode & 0o7777, self.layer
            self.root.seen = self.layer_no
            return self.root
        parent = self.parent(parts)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if kind == "dir" and old is not None and old.children is not None:
            node = old
        else:
            if old is not None:
                self._drop(old)
            node = _Node(kind, self.layer, self.layer_no)
            parent.children[parts[-1]] = node
            self._count(1)
        node.kind, node.layer, node.seen = kind, self.layer, self.layer_no
        node.mode = info.mode & 0o7777
        node.size = info.size if kind == "file" else 0
        node.link = info.linkname if kind in ("symlink", "hardlink") else ""
        return node

    def whiteout(self, parts: tuple[str, ...]) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            target = self.find(parts[:-1])
            if target is not None and target.children is not None:
                self._prune(target, parts[:-1])
            return
        if base.startswith(WHITEOUT_PREFIX * 2):  # AUFS metadata
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            return
        rel = (*parts[:-1], name)
        parent = self.find(parts[:-1])
        if parent is None or parent.children is None or name not in parent.children:
            return
        node = parent.children[name]
        if node.seen == self.layer_no:  # this layer wrote it: only lower contents go
            if node.children is not None:
                self._prune(node, rel)
        else:
            self._drop(parent.children.pop(name))

    def _prune(self, top: _Node, rel: tuple[str, ...]) -> None:
        """Remove everything below `top` not written by the current layer."""
        if any(rel[:n] in self._pruned for n in range(len(rel) + 1)):
            return
        self._pruned.add(rel)
        stack = [top]
        while stack:
            node = stack.pop()
            assert node.children is not None
            for name in list(node.children):
                child = node.children[name]
                if child.seen != self.layer_no:
                    self._drop(node.children.pop(name))
                elif child.children is not None:
                    stack.append(child)

    def resolve(self, parts: tuple[str, ...]) -> _Node | None:
        """The node at `parts`, symlinks followed inside the tree (absolute targets restart at
        the root, `..` at the root stays there), at most `_MAX_HOPS` of them."""
        hops = 0
        todo = list(reversed(parts))
        stack: list[_Node] = [self.root]
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            here = stack[-1]
            if here.children is None:
                return None
            child = here.children.get(name)
            if child is None:
                return None
            if child.kind == "symlink":
                hops += 1
                if hops > _MAX_HOPS or not child.link:
                    return None
                if child.link.startswith("/"):
                    stack = [self.root]
                todo.extend(reversed(child.link.split("/")))
                continue
            if child.kind == "hardlink":
                target = self.find(_split_lexical(child.link))
                if target is None:
                    return None
                child = target
            stack.append(child)
        return stack[-1]

    def entries(self) -> tuple[list[FileEntry], bool]:
        """The tree's entries in path order, at most `max_files` of them."""
        out: list[FileEntry] = []
        assert self.root.children is not None
        stack: list[tuple[str, _Node]] = [
            (name, child) for name, child in sorted(self.root.children.items(), reverse=True)
        ]
        while stack:
            path, node = stack.pop()
            if len(out) >= self.limits.max_files:
                return out, True
            out.append(
                FileEntry(
                    path=path,
                    type=node.kind,
                    size=node.size,
                    mode=node.mode,
                    layer=node.layer,
                    link=node.link,
                )
            )
            if node.children:
                stack.extend(
                    (f"{path}/{name}", child)
                    for name, child in sorted(node.children.items(), reverse=True)
                )
        return out, False

    def found(self) -> list[Package]:
        """Every package still listed by a file of the tree, in path order."""
        out: list[Package] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.found)
            if node.children:
                stack.extend(child for _, child in sorted(node.children.items(), reverse=True))
        return out


def _split_lexical(name: str) -> tuple[str, ...]:
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


# -- what catalogers want ------------------------------------------------------------------------


def _wanted(path: str) -> str:
    """Which cataloger reads the file at `path` ("" = none; ELF files are found by content)."""
    if path in catalog.OS_RELEASE_PATHS:
        return "os"
    if path == catalog.DPKG_STATUS:
        return "dpkg"
    if path.startswith(catalog.DPKG_STATUS_D + "/") and not path.endswith(".md5sums"):
        return "dpkg" if path.count("/") == 4 else ""
    if path == catalog.APK_INSTALLED:
        return "apk"
    if path in catalog.RPMDB_PATHS:
        return "rpm"
    if catalog.is_python_metadata(path):
        return "python"
    if catalog.is_npm_package_json(path):
        return "npm"
    if catalog.is_npm_lock(path):
        return "npm-lock"
    return ""


class _Indexer:
    def __init__(self, limits: IndexLimits) -> None:
        self.limits = limits
        self.tree = _Tree(limits)
        self.entries = 0
        self.total = [0]

    def layer(self, number: int, layer: Layer) -> None:
        label = f"layer {number} ({layer.digest})"
        self.tree.start_layer(number, layer)
        try:
            with open_layer(layer.open) as raw:
                stream = Counted(raw, self.limits.max_bytes, self.total, label)
                tarinfo = checked_tarinfo(self.limits.max_header_bytes, label)
                with open_tar(stream, tarinfo, label) as tar:
                    while True:
                        try:
                            info = tar.next()
                        except ValueError as e:  # tarfile lets bad numbers through as this
                            raise ScanError(f"{label}: a corrupt tar header: {e}") from e
                        if info is None:
                            break
                        tar.members.clear()  # type: ignore[attr-defined]  # kept otherwise
                        self._entry(tar, info, label)
        except ScanError:
            raise
        except FORMAT_ERRORS as e:
            raise ScanError(f"{label} is not a readable tar layer: {e}") from e

    def _entry(self, tar: tarfile.TarFile, info: tarfile.TarInfo, label: str) -> None:
        limits = self.limits
        self.entries += 1
        if self.entries > limits.max_entries:
            raise ScanError(f"{label}: more than {limits.max_entries} entries (limit max_entries)")
        for what, value in (("name", info.name), ("link target", info.linkname)):
            if len(value.encode("utf-8", "surrogateescape")) > limits.max_path_bytes:
                raise ScanError(
                    f"{label}: an entry {what} longer than {limits.max_path_bytes} bytes "
                    "(limit max_path_bytes)"
                )
        parts = _split_lexical(info.name)
        if len(parts) > limits.max_depth:
            raise ScanError(
                f"{label}: an entry name of more than {limits.max_depth} components "
                "(limit max_depth)"
            )
        if info.size < 0:
            raise ScanError(f"{label}: {info.name!r} has a negative size")
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self.tree.whiteout(parts)
            return
        if info.isdir():
            self.tree.put(parts, "dir", info)
            return
        if not parts:
            return
        if info.isreg():
            node = self.tree.put(parts, "file", info)
            self._file(tar, info, node, "/".join(parts), label)
        elif info.issym():
            self.tree.put(parts, "symlink", info)
        elif info.islnk():
            target = self.tree.find(_split_lexical(info.linkname))
            node = self.tree.put(parts, "hardlink", info)
            if target is not None and target.children is None:
                node.size = target.size
                node.os_text = target.os_text
                path = "/".join(parts)
                self.tree.set_found(
                    node, [msgspec.structs.replace(p, path=path) for p in target.found]
                )
        else:
            self.tree.put(parts, "other", info)

    def _file(
        self, tar: tarfile.TarFile, info: tarfile.TarInfo, node: _Node, path: str, label: str
    ) -> None:
        kind = _wanted(path)
        src = tar.extractfile(info)
        if src is None:
            return
        if kind:
            if info.size > self.limits.max_record_bytes:
                raise ScanError(
                    f"{label}: {path!r} is {info.size} bytes; a cataloged file may hold "
                    f"{self.limits.max_record_bytes} (limit max_record_bytes)"
                )
            data = src.read(info.size)
            self._catalog(kind, data, node, path, label)
            return
        head = src.read(min(info.size, _CHUNK))
        if not head.startswith(_ELF_MAGIC):
            return  # the rest is skipped by tarfile without being kept
        scanner = golang.BuildInfoScanner(self.limits.max_record_bytes)
        scanned = 0
        chunk = head
        while chunk and not scanner.done:
            scanner.feed(chunk[: max(self.limits.max_binary_bytes - scanned, 0)])
            scanned += len(chunk)
            if scanned >= self.limits.max_binary_bytes:
                break
            chunk = src.read(_CHUNK)
        result = scanner.result()
        if result is not None:
            found = golang.go_packages(*result, layer=self.tree.layer, path=path)
            self.tree.set_found(node, found)

    def _catalog(self, kind: str, data: bytes, node: _Node, path: str, label: str) -> None:
        layer = self.tree.layer
        limits = self.limits
        found: list[Package]
        if kind == "os":
            node.os_text = data
            return
        if kind == "dpkg":
            found = catalog.parse_dpkg_status(data, layer=layer, path=path)
        elif kind == "apk":
            found = catalog.parse_apk_installed(data, layer=layer, path=path)
        elif kind == "rpm":
            try:
                found = rpmdb.parse_rpmdb_sqlite(
                    data, layer=layer, path=path, max_packages=limits.max_packages
                )
            except rpmdb.RpmDbError as e:
                raise ScanError(f"{label}: {path!r}: {e}") from e
        elif kind == "python":
            found = catalog.parse_python_metadata(data, layer=layer, path=path)
        elif kind == "npm":
            found = catalog.parse_npm_package_json(
                data, layer=layer, path=path, max_bytes=limits.max_record_bytes
            )
        else:
            found = catalog.parse_npm_lock(
                data,
                layer=layer,
                path=path,
                max_bytes=limits.max_record_bytes,
                max_packages=limits.max_packages,
            )
        self.tree.set_found(node, found)

    def result(self) -> ImageIndex:
        os: OsRelease | None = None
        for candidate in catalog.OS_RELEASE_PATHS:
            node = self.tree.resolve(_split_lexical(candidate))
            if node is not None and node.os_text is not None:
                os = catalog.parse_os_release(node.os_text)
                if os is not None:
                    break
        packages = catalog.with_purls(catalog.dedupe_npm(self.tree.found()), os)
        files, truncated = self.tree.entries()
        return ImageIndex(
            os=os, packages=tuple(packages), files=tuple(files), files_truncated=truncated
        )


def index_image(layers: Sequence[Layer], limits: IndexLimits = IndexLimits()) -> ImageIndex:
    """Read `layers` (lowest first) once each and return the image's final tree and packages.

    Synchronous and CPU-bound: run it on a worker thread. Raises `ScanError` when a layer is
    not a tar, is corrupt, or breaks one of `limits`.
    """
    indexer = _Indexer(limits)
    for number, layer in enumerate(layers, 1):
        indexer.layer(number, layer)
    return indexer.result()
