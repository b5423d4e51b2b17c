"""Local images for `skyreg push`: docker-archive tarballs and OCI image layout directories.

Nothing here talks to a registry. A docker-archive (`docker save`, nix's `dockerTools`) is read
as a stream, so a gzip-compressed tarball is never unpacked to disk and never held in memory: one
pass finds `manifest.json` and the config, a second hashes the layers that need it, a third (in
`push.py`) uploads the layers the registry lacks. Uncompressed layers are pushed gzip-compressed,
deterministically (`gzip_stream`: no name, mtime 0), so a layer always gets the same digest; a small
cache (diff_id -> compressed digest and size) spares compressing unchanged layers just to learn it.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import posixpath
import struct
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

from skyreg.oci.digest import Digest
from skyreg.oci.errors import RegistryError

CHUNK = 1 << 20
GZIP_LEVEL = 6
MAX_JSON_MEMBER = 16 * 1024 * 1024  # manifest.json, configs: kept in memory while scanning
REF_NAME = "org.opencontainers.image.ref.name"

SourceKind = Literal["docker-archive", "oci"]
Compression = Literal["none", "gzip", "zstd"]
OnRead = Callable[[int], None]

# What reading a (possibly compressed, possibly truncated) tarball can raise.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
)


class SourceError(Exception):
    """A local image cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Source:
    """Where a local image is: a docker-archive file or an OCI layout directory (plus a ref)."""

    kind: SourceKind
    path: Path
    ref: str | None = None


def detect_source(spec: str | os.PathLike[str], ref: str | None = None) -> Source:
    """What `spec` names: `docker-archive:PATH[:REF]`, `oci:DIR[:REF]`, or a plain path (a
    directory with `oci-layout` is an OCI layout, a file a docker-archive). Symlinks such as
    nix's `./result` are followed."""
    text = os.fspath(spec)
    kind: SourceKind | None = None
    for prefix, prefix_kind in (("docker-archive:", "docker-archive"), ("oci:", "oci")):
        if text.startswith(prefix):
            kind = cast(SourceKind, prefix_kind)
            text = text[len(prefix) :]
            if not os.path.lexists(text) and ":" in text:
                text, _, inline = text.rpartition(":")
                ref = ref or inline or None
            break
    if not text:
        raise SourceError(f"no path in {os.fspath(spec)!r}")
    path = Path(text).expanduser()
    if not path.exists():
        if path.is_symlink():
            raise SourceError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
        raise SourceError(f"{path}: no such file or directory")
    if path.is_dir():
        if kind == "docker-archive":
            raise SourceError(f"{path} is a directory, not a docker-archive tarball")
        if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
            raise SourceError(
                f"{path} is a directory but not an OCI image layout (no oci-layout or index.json)"
            )
        return Source("oci", path, ref)
    if kind == "oci":
        raise SourceError(f"{path} is not a directory; an OCI image layout is one")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path}: permission denied")
    return Source("docker-archive", path, ref)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compression_of(head: bytes) -> Compression | None:
    """A layer's compression from its first bytes (None: a compression registries do not know)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith((b"BZh", b"\xfd7zXZ\x00")):
        return None
    return "none"


def gzip_stream(chunks: Iterable[bytes], level: int = GZIP_LEVEL) -> Iterator[bytes]:
    """gzip-compress a stream like `gzip.compress(data, level, mtime=0)`, but with the OS byte
    255 (unknown) everywhere: no file name, mtime 0, so the same input gives the same bytes."""
    xfl = 2 if level == 9 else 4 if level == 1 else 0
    yield b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + bytes([xfl, 255])
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, 0)
    crc = 0
    size = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush() + struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF)


def read_chunks(f: IO[bytes], what: Path | str) -> Iterator[bytes]:
    """A file's bytes in CHUNK pieces; read failures become SourceError."""
    while True:
        try:
            data = f.read(CHUNK)
        except _READ_ERRORS as e:
            raise SourceError(f"cannot read {what}: {_reason(e)}") from None
        if not data:
            return
        yield data


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


# -- docker-archive ------------------------------------------------------------------------------


class _CountingReader:
    """A file wrapper that reports how many bytes were read (progress of a pass)."""

    def __init__(self, f: IO[bytes], on_read: OnRead | None) -> None:
        self._f = f
        self._on_read = on_read
        self.name = getattr(f, "name", "")

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return self._f.seekable()


def _outer_compressed(path: Path) -> bool:
    """Whether the tarball itself is compressed (then it is read as a stream, front to back)."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def iter_members(
    path: Path, wanted: set[str] | None = None, on_read: OnRead | None = None
) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """(member, its file object for regular files) for every member whose normalised name is in
    `wanted` (None: all), in archive order. A file object is only good until the next member."""
    try:
        compressed = _outer_compressed(path)
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise SourceError(f"cannot open {path}: {_reason(e)}") from None
    with raw:
        reader = cast(IO[bytes], _CountingReader(raw, on_read))
        try:
            tar = tarfile.open(fileobj=reader, mode="r|*" if compressed else "r:")  # noqa: SIM115
        except _READ_ERRORS as e:
            raise SourceError(f"{path} is not a readable tar archive: {_reason(e)}") from None
        with tar:
            members: Iterator[tarfile.TarInfo] = iter(tar)
            while True:
                try:
                    member = next(members, None)
                except _READ_ERRORS as e:
                    raise SourceError(f"cannot read {path}: {_reason(e)}") from None
                if member is None:
                    return
                if wanted is not None and _norm(member.name) not in wanted:
                    continue
                try:
                    f = tar.extractfile(member) if member.isfile() else None
                except _READ_ERRORS as e:
                    raise SourceError(f"cannot read {path}: {_reason(e)}") from None
                yield member, f


@dataclass
class ArchiveLayer:
    """One layer of a docker-archive image, as found in the tarball."""

    member: str  # the regular-file member holding its bytes
    size: int  # of the member
    compression: Compression
    diff_id: str  # from the config


@dataclass
class DockerArchive:
    """The image chosen from a docker-archive: its config bytes and its layers."""

    path: Path
    config: bytes
    layers: list[ArchiveLayer]
    repo_tags: list[str] = field(default_factory=list)


def read_docker_archive(
    path: Path, ref: str | None, on_read: OnRead | None = None
) -> DockerArchive:
    """Find `manifest.json`, pick the image (`ref` matching a RepoTag, or the only one), read its
    config and locate its layers. One pass over the archive; layer bytes are not hashed."""
    json_members: dict[str, bytes] = {}
    files: dict[str, tuple[int, bytes]] = {}  # name -> (size, first bytes)
    links: dict[str, str] = {}
    for info, f in iter_members(path, None, on_read):
        name = _norm(info.name)
        if info.issym():
            links[name] = _norm(posixpath.join(posixpath.dirname(name), info.linkname))
        elif info.islnk():
            links[name] = _norm(info.linkname)
        elif f is not None:
            try:
                head = f.read(8)
                # JSON (manifest.json, configs) is kept; layers are only peeked at.
                if info.size <= MAX_JSON_MEMBER and head.lstrip()[:1] in (b"{", b"["):
                    json_members[name] = head + f.read()
            except _READ_ERRORS as e:
                raise SourceError(f"cannot read {path}: {_reason(e)}") from None
            files[name] = (info.size, head)

    def resolve(name: str) -> str:
        name = _norm(name)
        for _ in range(32):
            if name not in links:
                return name
            name = links[name]
        raise SourceError(f"{path}: too many links at {name}")

    if "manifest.json" not in json_members:
        hint = ""
        if "index.json" in json_members and "oci-layout" in json_members:
            hint = " (an OCI archive: unpack it and push the directory)"
        raise SourceError(f"{path} is not a docker-archive: it has no manifest.json{hint}")
    try:
        entries = json.loads(json_members["manifest.json"])
    except ValueError as e:
        raise SourceError(f"{path}: manifest.json is not JSON: {e}") from None
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{path}: manifest.json lists no images")
    entry = _pick_entry(path, entries, ref)
    config_name = resolve(str(entry.get("Config", "")))
    if config_name not in json_members:
        raise SourceError(f"{path}: the config {entry.get('Config')!r} is missing")
    config = json_members[config_name]
    try:
        config_doc = json.loads(config)
        diff_ids = config_doc["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"{path}: the config {config_name} has no rootfs.diff_ids") from None
    layer_names = entry.get("Layers")
    if not isinstance(layer_names, list) or not isinstance(diff_ids, list):
        raise SourceError(f"{path}: manifest.json has no Layers list")
    if len(layer_names) != len(diff_ids):
        raise SourceError(
            f"{path}: {len(layer_names)} layers but the config lists {len(diff_ids)} diff_ids"
        )
    layers: list[ArchiveLayer] = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        member = resolve(str(name))
        if member not in files:
            raise SourceError(f"{path}: the layer {name!r} is missing")
        size, head = files[member]
        compression = compression_of(head)
        if compression is None:
            raise SourceError(f"{path}: the layer {name!r} is bzip2/xz-compressed")
        layers.append(ArchiveLayer(member, size, compression, str(diff_id)))
    tags = entry.get("RepoTags") or []
    return DockerArchive(path, config, layers, [str(t) for t in tags])


def _pick_entry(path: Path, entries: list[Any], ref: str | None) -> dict[str, Any]:
    images = [e for e in entries if isinstance(e, dict)]
    if ref is not None:
        for image in images:
            for tag in image.get("RepoTags") or []:
                if tag == ref or str(tag).endswith(("/" + ref, ":" + ref)):
                    return image
        known = sorted(str(t) for image in images for t in image.get("RepoTags") or [])
        raise SourceError(
            f"{path} holds no image tagged {ref!r} (RepoTags: {', '.join(known) or 'none'})"
        )
    if len(images) != 1:
        known = sorted(str(t) for image in images for t in image.get("RepoTags") or [])
        raise SourceError(
            f"{path} holds {len(images)} images: pick one with --ref "
            f"(RepoTags: {', '.join(known) or 'none'})"
        )
    return images[0]


@dataclass(frozen=True)
class LayerHashes:
    """What hashing a layer member found: its own digest, and the digest and size of its
    deterministic gzip compression (uncompressed layers only)."""

    sha256: str
    gzip_digest: str | None = None
    gzip_size: int | None = None


def hash_layers(
    path: Path, members: dict[str, Compression], on_read: OnRead | None = None
) -> dict[str, LayerHashes]:
    """Hash the named members in one pass; uncompressed ones are gzip-compressed on the fly."""
    found: dict[str, LayerHashes] = {}
    for member, f in iter_members(path, set(members), on_read):
        name = _norm(member.name)
        if f is None or name in found:
            continue
        raw = hashlib.sha256()
        chunks = _tee(read_chunks(f, path), raw)
        if members[name] == "none":
            gz = hashlib.sha256()
            gz_size = 0
            for out in gzip_stream(chunks):
                gz.update(out)
                gz_size += len(out)
            found[name] = LayerHashes(
                "sha256:" + raw.hexdigest(), "sha256:" + gz.hexdigest(), gz_size
            )
        else:
            for _ in chunks:
                pass
            found[name] = LayerHashes("sha256:" + raw.hexdigest())
    return found


def _tee(chunks: Iterable[bytes], hasher: Any) -> Iterator[bytes]:
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def member_streams(
    path: Path, members: set[str], on_read: OnRead | None = None
) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(name, its bytes) for each named member, in archive order; consume each stream before
    asking for the next."""
    seen: set[str] = set()
    for member, f in iter_members(path, members, on_read):
        name = _norm(member.name)
        if f is not None and name not in seen:
            seen.add(name)
            yield name, read_chunks(f, path)


# -- the gzip digest cache -----------------------------------------------------------------------


class GzipDigestCache:
    """diff_id -> (digest, size) of our deterministic gzip of that layer, in the user's cache dir.

    Only a hint: it decides whether a layer must be compressed to learn its digest before asking
    the registry for it. An upload always sends the digest of the bytes actually sent.
    """

    MAX_ENTRIES = 20_000

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, list[Any]] = {}
        self._dirty = False
        self._prefix = f"gzip{GZIP_LEVEL}/zlib{zlib.ZLIB_RUNTIME_VERSION}/"
        if path is not None:
            try:
                doc = json.loads(path.read_text())
                if isinstance(doc, dict) and isinstance(doc.get("layers"), dict):
                    self._entries = doc["layers"]
            except (OSError, ValueError):
                pass

    @classmethod
    def default(cls) -> GzipDigestCache:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(Path(base) / "skyreg" / "gzip-layers.json")

    def get(self, diff_id: str) -> tuple[str, int] | None:
        value = self._entries.get(self._prefix + diff_id)
        if (
            isinstance(value, list)
            and len(value) == 2
            and isinstance(value[0], str)
            and isinstance(value[1], int)
        ):
            return value[0], value[1]
        return None

    def put(self, diff_id: str, digest: str, size: int) -> None:
        key = self._prefix + diff_id
        if self._entries.get(key) != [digest, size]:
            self._entries.pop(key, None)
            self._entries[key] = [digest, size]
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; failing to is not an error."""
        if self.path is None or not self._dirty:
            return
        entries = list(self._entries.items())[-self.MAX_ENTRIES :]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gzip-layers.")
            with os.fdopen(fd, "w") as f:
                json.dump({"layers": dict(entries)}, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError:
            pass


# -- OCI image layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OciLayout:
    """An OCI image layout directory."""

    path: Path

    def blob_path(self, digest: str) -> Path:
        try:
            parsed = Digest.parse(digest)
        except RegistryError as e:
            raise SourceError(f"{self.path}: {e}") from None
        return self.path / "blobs" / parsed.algorithm / parsed.hex

    def read_blob(self, digest: str, limit: int = MAX_JSON_MEMBER) -> bytes:
        """A small blob (a manifest or an index), checked against its digest."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise SourceError(f"{self.path}: blob {digest} is missing") from None
        except OSError as e:
            raise SourceError(f"cannot read {path}: {_reason(e)}") from None
        if len(data) > limit:
            raise SourceError(f"{self.path}: blob {digest} is larger than {limit} bytes")
        algorithm = digest.partition(":")[0]
        if f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}" != digest:
            raise SourceError(f"{self.path}: blob {digest} does not match its digest")
        return data


def open_oci_layout(path: Path, ref: str | None) -> tuple[OciLayout, dict[str, Any]]:
    """The layout and the descriptor in its index.json named by `ref` (or its only one)."""
    try:
        index = json.loads((path / "index.json").read_text())
    except OSError as e:
        raise SourceError(f"cannot read {path / 'index.json'}: {_reason(e)}") from None
    except ValueError as e:
        raise SourceError(f"{path / 'index.json'} is not JSON: {e}") from None
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise SourceError(f"{path / 'index.json'} has no manifests list")
    descriptors = [m for m in manifests if isinstance(m, dict) and isinstance(m.get("digest"), str)]

    def name_of(d: dict[str, Any]) -> str | None:
        annotations = d.get("annotations")
        value = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        return value if isinstance(value, str) else None

    names = sorted(n for n in map(name_of, descriptors) if n)
    if ref is not None:
        chosen = [d for d in descriptors if name_of(d) == ref or d["digest"] == ref]
        if not chosen:
            raise SourceError(
                f"{path} has no image named {ref!r} (names: {', '.join(names) or 'none'})"
            )
    elif len(descriptors) == 1:
        chosen = descriptors
    elif not descriptors:
        raise SourceError(f"{path} holds no images")
    else:
        raise SourceError(
            f"{path} holds {len(descriptors)} images: pick one with --ref "
            f"(names: {', '.join(names) or 'none'})"
        )
    return OciLayout(path), chosen[0]
