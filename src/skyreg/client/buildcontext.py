"""Build contexts: the directory `skyreg deploy [PATH]` sends to a remote builder, both ends.

Client side, `pack_context` walks the directory honouring `.dockerignore` exactly as Docker
does (the `docker` package's own matcher, not a copy of it) and streams a deterministic gzip'd
tar: sorted entries, owner 0 with empty names, on-disk mode and mtime, a fixed gzip header. A
Dockerfile outside the directory (`--dockerfile F`) travels as `.skyreg/Dockerfile`. The size of
the file contents and the number of entries are bounded, so a forgotten `node_modules` fails
early with a message saying what to do instead of uploading for an hour.

Builder side, `unpack_context` extracts a tar that a hostile tenant wrote. It uses tarfile's
`"data"` filter (no absolute names or links, nothing resolving outside, no devices, no setuid)
and adds checks of its own, because the filter alone is not enough on this Python (3.11.7: the
realpath-based checks have known bypasses, and `/x` is silently made relative instead of being
refused): names are checked lexically (no `/`-leading names, no `..`), every existing parent of
an entry must be a real directory (never a symlink, so nothing is ever written through a link),
an existing last component that is not a directory is removed before the entry is made (a file
entry never writes through an earlier symlink of the same name), hard links must name a regular
file already extracted, and only regular files, directories, symlinks and hard links are
accepted. The stream is decompressed once, forward only: every decompressed byte is counted, a
single header read is bounded (so a huge PAX header cannot fill memory), and the content
actually written is counted against `max_bytes`, so a gzip bomb stops there.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import os
import stat
import sys
import tarfile
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, BinaryIO, Protocol, cast

from skyreg.units import human_size

if TYPE_CHECKING:
    from docker.utils.build import PatternMatcher

GiB = 1 << 30
MAX_ENTRIES = 200_000  # entries (files, directories, symlinks) in one build context
EMBEDDED_DOCKERFILE = ".skyreg/Dockerfile"  # where a Dockerfile from outside the root travels
DOCKERIGNORE = ".dockerignore"
MAX_DOCKERIGNORE_BYTES = 1 << 20  # a larger .dockerignore is surely not one
CHUNK = 256 * 1024  # bytes read from a context file at a time
HEADER_READ_MAX = 1 << 20  # largest single read tarfile may make while parsing headers
COPY_READ_MAX = 16 * 1024  # tarfile copies content in reads of this size (its default)


class ContextError(Exception):
    """A context that cannot be packed, or a received one that is refused (message says why)."""


@dataclass(frozen=True)
class PackedContext:
    """What `pack_context` wrote.

    `dockerfile` is the Dockerfile's path inside the context (what the builder builds with);
    `files` counts the entries that are not directories (regular files and symlinks); `size`
    is the uncompressed bytes of file content.
    """

    dockerfile: str
    files: int
    size: int


@dataclass(frozen=True)
class ContextLimits:
    """Bounds on a received build context: content bytes, entries, name length (bytes), depth."""

    max_bytes: int = 2 * GiB
    max_entries: int = MAX_ENTRIES
    max_name: int = 4096
    max_depth: int = 256


# --- pack (client side) -----------------------------------------------------------------------


@functools.cache
def _pattern_matcher_class() -> type[PatternMatcher]:
    """`docker.utils.build.PatternMatcher`, loaded without the docker SDK.

    Importing it the ordinary way runs `docker/__init__.py` and `docker/utils/__init__.py`,
    which import the whole SDK (requests, urllib3, ssl...): about 0.1-0.2 s of every
    `skyreg deploy`, for a matcher whose module needs only `docker.constants` (with
    `docker.version`) and `docker.utils.fnmatch`. So the two packages are stood in for, while
    `docker.utils.build` loads, by empty placeholder modules whose `__path__` is the real
    package directories (`find_spec` of a top-level name does not execute it).

    Afterwards every module this added under `docker` is taken out of `sys.modules` again,
    placeholders and submodules alike: a later `import docker` then runs the real packages'
    `__init__` and sets their submodules as attributes (`docker.api.plugin` reads
    `utils.build.walk`). Left behind, the submodules would be reused but never set on the real
    packages. The class keeps its own module alive. Not thread-safe while it loads: the CLI
    calls it before starting any thread that imports docker.
    """
    if "docker" in sys.modules:  # the SDK is loaded already (or loading): nothing to save
        module = importlib.import_module("docker.utils.build")
        return cast("type[PatternMatcher]", module.PatternMatcher)
    spec = importlib.util.find_spec("docker")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the docker package (its .dockerignore matcher) is not installed")
    docker_dirs = list(spec.submodule_search_locations)
    before = set(sys.modules)
    for name, dirs in (
        ("docker", docker_dirs),
        ("docker.utils", [os.path.join(d, "utils") for d in docker_dirs]),
    ):
        placeholder = types.ModuleType(name)
        placeholder.__path__ = dirs
        sys.modules[name] = placeholder
    try:
        module = importlib.import_module("docker.utils.build")
    finally:
        for name in set(sys.modules) - before:
            if name == "docker" or name.startswith("docker."):
                del sys.modules[name]
    return cast("type[PatternMatcher]", module.PatternMatcher)


def read_dockerignore(root: Path) -> list[str]:
    """The patterns of `root/.dockerignore` (none if absent), parsed as Docker does.

    Lines are stripped; blank lines and lines starting with `#` are dropped (the same parsing
    as `docker.api.build`'s, which has no public function for it).
    """
    path = root / DOCKERIGNORE
    if not path.is_file():
        return []
    with path.open("rb") as f:
        data = f.read(MAX_DOCKERIGNORE_BYTES + 1)
    if len(data) > MAX_DOCKERIGNORE_BYTES:
        raise ContextError(f"{path} is larger than {human_size(MAX_DOCKERIGNORE_BYTES)}")
    lines = (line.strip() for line in data.decode("utf-8", errors="replace").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _locate_dockerfile(root: Path, dockerfile: Path | None) -> tuple[str, Path | None]:
    """(path of the Dockerfile inside the context, file to embed or None if it is in the tree).

    A Dockerfile lies in the context when its path is below `root` and reaching it follows no
    symlink; otherwise (another directory, or a link whose target the builder could not read)
    its content is embedded under `EMBEDDED_DOCKERFILE`.
    """
    if dockerfile is None:
        candidate = root / "Dockerfile"
        if not candidate.is_file():
            raise ContextError(f"no Dockerfile in {root}")
        dockerfile = candidate
    elif not dockerfile.is_file():
        raise ContextError(f"Dockerfile {dockerfile} not found")
    absolute = os.path.abspath(dockerfile)
    relative = os.path.relpath(absolute, os.path.abspath(root))
    inside = not relative.startswith("..") and not os.path.isabs(relative)
    if inside and os.path.realpath(absolute) == os.path.join(os.path.realpath(root), relative):
        return PurePosixPath(*Path(relative).parts).as_posix(), None
    return EMBEDDED_DOCKERFILE, Path(absolute)


def _included_paths(
    root: Path, patterns: list[str], dockerfile: str, max_entries: int
) -> list[str]:
    """The paths below `root` that `.dockerignore` keeps, sorted (parents before children).

    This is `docker.utils.build.exclude_paths(root, patterns, dockerfile=...)` - the same
    `!<dockerfile>` exception and the same `PatternMatcher` (which always keeps
    `.dockerignore`) - but consumed as the generator it is, so a huge tree stops at
    `max_entries` instead of being listed whole first.
    """
    matcher = _pattern_matcher_class()([*patterns, f"!{dockerfile}"])
    found: list[str] = []
    try:
        for path in matcher.walk(str(root)):
            found.append(path)
            if len(found) > max_entries:
                raise ContextError(_too_many_entries(max_entries))
    except RecursionError:
        raise ContextError(f"the directory tree of {root} is too deep") from None
    except OSError as e:
        raise ContextError(f"cannot read the build context: {e}") from e
    return sorted(found)


def _too_many_entries(max_entries: int) -> str:
    return (
        f"build context has more than {max_entries:,} entries (the limit);"
        " add paths to .dockerignore"
    )


def _too_large(limit: int) -> str:
    return (
        f"build context is larger than {human_size(limit)} (the limit); add paths to .dockerignore"
    )


def _tarinfo(name: str, st: os.stat_result) -> tarfile.TarInfo:
    """A header owned by root with empty owner names, on-disk mode and mtime (whole seconds)."""
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ProgressReader:
    """Reads a context file for tarfile, counting bytes and reporting them to `progress`."""

    def __init__(self, file: IO[bytes], done: int, progress: Callable[[int], None] | None) -> None:
        self._file = file
        self.done = done
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size if 0 < size <= CHUNK else CHUNK)
        self.done += len(data)
        if self._progress is not None and data:
            self._progress(self.done)
        return data


def pack_context(
    root: Path,
    dockerfile: Path | None,
    out: BinaryIO,
    *,
    limit: int,
    progress: Callable[[int], None] | None = None,
    max_entries: int = MAX_ENTRIES,
) -> PackedContext:
    """Write the build context `root` to `out` as a deterministic gzip'd tar (streamed).

    `.dockerignore` is honoured with Docker's semantics; the Dockerfile and `.dockerignore`
    are always sent. `dockerfile` defaults to `root/Dockerfile`; one outside `root` is added
    as `.skyreg/Dockerfile`. Regular files, directories and symlinks (never followed) are
    stored; sockets, FIFOs and devices are skipped. More than `limit` bytes of content or
    `max_entries` entries raises `ContextError` (nothing more is read once a limit is passed).
    `progress(bytes_so_far)` is called as content is added. `out` only needs `write`.
    """
    if not root.is_dir():
        raise ContextError(f"{root} is not a directory")
    context_dockerfile, embedded = _locate_dockerfile(root, dockerfile)
    paths = _included_paths(root, read_dockerignore(root), context_dockerfile, max_entries)
    if embedded is not None:
        paths = [p for p in paths if p not in (".skyreg", EMBEDDED_DOCKERFILE)]
        if len(paths) + 2 > max_entries:
            raise ContextError(_too_many_entries(max_entries))
    size = 0
    files = 0
    # A fixed gzip header (no name, mtime 0) keeps the same tree the same bytes. Level 1: the
    # context is sent once and unpacked at once; higher levels cost the client more time than
    # they save on the wire (24 MiB of mixed files: 0.3 s at level 1, 0.5 s at 9, same size).
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in paths:
            added = _add_path(tar, root, name, size, limit, progress)
            if added is not None:
                size += added
                files += 1
        if embedded is not None:
            dir_info = _tarinfo(".skyreg", os.stat(root))
            dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(dir_info)
            size += _add_regular(tar, EMBEDDED_DOCKERFILE, embedded, size, limit, progress)
            files += 1
    return PackedContext(dockerfile=context_dockerfile, files=files, size=size)


def _add_path(
    tar: tarfile.TarFile,
    root: Path,
    name: str,
    done: int,
    limit: int,
    progress: Callable[[int], None] | None,
) -> int | None:
    """Add `root/name` to `tar`; returns its content bytes, None for a directory or a skip."""
    path = root / name
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return _add_regular(tar, name, path, done, limit, progress)
        if stat.S_ISLNK(st.st_mode):
            info = _tarinfo(name, st)
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            tar.addfile(info)
            return 0
        if stat.S_ISDIR(st.st_mode):
            info = _tarinfo(name, st)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    except FileNotFoundError:
        pass  # removed while packing: it is simply not part of the context
    return None


def _add_regular(
    tar: tarfile.TarFile,
    name: str,
    path: Path,
    done: int,
    limit: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Stream one regular file into `tar` (opened without following a symlink); returns its size.

    The size comes from the open file, so a file growing meanwhile is cut at that size and one
    shrinking fails with a clear error rather than a corrupt tar.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if done + st.st_size > limit:
            raise ContextError(_too_large(limit))
        info = _tarinfo(name, st)
        info.size = st.st_size
        try:
            tar.addfile(info, _ProgressReader(f, done, progress))
        except OSError as e:
            raise ContextError(f"{name} changed while the build context was packed") from e
    return st.st_size


# --- unpack (builder side) --------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _ForwardReader:
    """The decompressed tar stream, read forward only, every byte counted.

    tarfile reads headers in 512-byte blocks and an extended header (PAX, GNU long name) in
    one read of its announced size: such a read larger than `HEADER_READ_MAX` is refused before
    it happens, so memory stays bounded. Content is copied in reads of 16 KiB. A backward seek
    (tarfile re-reading an earlier member to copy it when a hard link fails) is refused, so the
    stream is decompressed once. `budget` bounds all decompressed bytes (content + headers).
    """

    def __init__(self, stream: _Readable, budget: int) -> None:
        self._stream = stream
        self._budget = budget
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > HEADER_READ_MAX:
            raise ContextError(f"tar header larger than {human_size(HEADER_READ_MAX)}")
        self._charge(size)
        data = self._read(size)
        self.position += len(data)
        return data

    def _read(self, size: int) -> bytes:
        try:
            return self._stream.read(size)
        except (OSError, EOFError, zlib.error) as e:
            raise ContextError(f"the build context is not a valid gzip'd tar: {e}") from e

    def _charge(self, size: int) -> None:
        if self.position + size > self._budget:
            raise ContextError("build context stream exceeds its size limit")

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = {os.SEEK_SET: offset, os.SEEK_CUR: self.position + offset}.get(whence)
        if target is None or target < self.position:
            raise ContextError("build context tar needs to be read backwards (refused)")
        while self.position < target:
            step = min(target - self.position, COPY_READ_MAX)
            self._charge(step)
            data = self._read(step)
            if not data:
                break  # past the end: tarfile notices on its next read
            self.position += len(data)
        return self.position

    def tell(self) -> int:
        return self.position


def _entry_parts(name: str, limits: ContextLimits, what: str) -> tuple[str, ...]:
    """The components of a tar name, refusing absolute, `..`, empty, too long or too deep ones."""
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_name:
        raise ContextError(f"{what} {name[:100]!r}... is longer than {limits.max_name} bytes")
    if "\x00" in name:
        raise ContextError(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise ContextError(f"{what} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ContextError(f"{what} {name!r} contains '..'")
    if not parts:
        raise ContextError(f"{what} {name!r} is empty")
    if len(parts) > limits.max_depth:
        raise ContextError(f"{what} {name[:100]!r} is deeper than {limits.max_depth} directories")
    return parts


def _check_parents(dest: Path, parts: tuple[str, ...], name: str) -> None:
    """Every existing parent of `parts` under dest must be a real directory, never a symlink."""
    path = dest
    for part in parts[:-1]:
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # the rest is missing: tarfile creates real directories
        if not stat.S_ISDIR(st.st_mode):
            raise ContextError(
                f"entry {name!r}: {path.relative_to(dest)} is not a directory (refused)"
            )


def _clear_last(dest: Path, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
    """Make room for `member`: remove a non-directory in its place; a directory is kept for a
    directory entry and refused for anything else."""
    path = dest.joinpath(*parts)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not member.isdir():
            raise ContextError(f"entry {member.name!r} would replace a directory (refused)")
        return
    os.unlink(path)


def _check_hardlink(dest: Path, member: tarfile.TarInfo, limits: ContextLimits) -> None:
    """A hard link must name a regular file already extracted, reached through real directories."""
    parts = _entry_parts(member.linkname, limits, "link target of")
    _check_parents(dest, parts, member.name)
    try:
        st = os.lstat(dest.joinpath(*parts))
    except FileNotFoundError:
        raise ContextError(
            f"hard link {member.name!r} names a missing entry {member.linkname!r}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ContextError(
            f"hard link {member.name!r} must name a regular file, not {member.linkname!r}"
        )


def _members(tar: tarfile.TarFile, limits: ContextLimits) -> Iterator[tarfile.TarInfo]:
    """The members one by one, counted (tarfile keeps them all: bounded by the entries limit)."""
    count = 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as e:
            raise ContextError(f"the build context is not a valid tar: {e}") from e
        if member is None:
            return
        count += 1
        if count > limits.max_entries:
            raise ContextError(f"build context has more than {limits.max_entries:,} entries")
        yield member


def unpack_context(tar_path: Path, dest: Path, *, limits: ContextLimits) -> None:
    """Extract the gzip'd tar `tar_path` (written by a hostile tenant) into `dest`.

    Synchronous (run it in a thread). Only regular files, directories, symlinks and hard links
    are accepted, through tarfile's `"data"` filter plus the checks in the module docstring;
    the content actually written is bounded by `limits.max_bytes`, the entries, name length
    and depth by the other limits. A refused archive raises `ContextError` naming the entry;
    `dest` may then be partly filled (the caller removes it). Nothing is ever written outside
    `dest`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest = Path(os.path.realpath(dest))
    header_budget = (
        limits.max_entries * (3 * tarfile.BLOCKSIZE + 2 * limits.max_name) + HEADER_READ_MAX
    )
    written = 0
    with tar_path.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
        reader = _ForwardReader(gz, limits.max_bytes + header_budget)
        try:
            with tarfile.open(fileobj=cast(IO[bytes], reader), mode="r:", errorlevel=2) as tar:
                for member in _members(tar, limits):
                    written += _extract_one(tar, member, dest, limits, written)
        except tarfile.TarError as e:
            raise ContextError(f"the build context is not a valid tar: {e}") from e


def _extract_one(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, limits: ContextLimits, written: int
) -> int:
    """Check and extract one member; returns the content bytes it wrote."""
    name = member.name
    parts = _entry_parts(name, limits, "entry")
    regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None
    if not (regular or member.isdir() or member.issym() or member.islnk()):
        raise ContextError(f"entry {name!r} is not a file, directory or link (refused)")
    linkname_bytes = len(member.linkname.encode("utf-8", "surrogateescape"))
    if (member.issym() or member.islnk()) and linkname_bytes > limits.max_name:
        raise ContextError(f"link target of {name!r} is longer than {limits.max_name} bytes")
    if regular and written + member.size > limits.max_bytes:
        raise ContextError(
            f"build context is larger than {human_size(limits.max_bytes)} (at entry {name!r})"
        )
    _check_parents(dest, parts, name)
    if member.islnk():
        _check_hardlink(dest, member, limits)
    _clear_last(dest, parts, member)
    try:
        tar.extract(member, dest, filter="data")
    except tarfile.FilterError as e:
        raise ContextError(f"entry {name!r} refused: {e}") from e
    except (tarfile.TarError, OSError) as e:
        raise ContextError(f"entry {name!r} could not be extracted: {e}") from e
    if not regular:
        return 0
    actual = os.lstat(dest.joinpath(*parts)).st_size
    if written + actual > limits.max_bytes:
        raise ContextError(
            f"build context is larger than {human_size(limits.max_bytes)} (at entry {name!r})"
        )
    return actual
