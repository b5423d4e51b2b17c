"""Build small test images offline, in pure Python (tarfile, gzip, hashlib, json).

The images hold Debian's static busybox (``/bin/busybox`` from ``busybox-static``) plus a
few symlinks in a first gzip layer, and a tiny second layer with a text file carrying a
marker string so that every test can build an image with its own digests.

Output is deterministic: fixed mtimes, uid/gid 0, ``gzip`` with mtime 0, JSON with sorted
keys. Building the same ``(marker, architecture)`` twice gives byte-identical blobs.

Three on-disk forms:

* an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/...``),
  readable by ``skopeo copy oci:DIR:TAG`` and ``podman pull oci:DIR:TAG``;
* a docker-archive tarball as ``docker save`` writes it (``manifest.json``,
  ``repositories``, ``<config>.json``, ``<id>/layer.tar``), loadable by ``docker load``,
  ``ctr images import`` and ``skopeo copy docker-archive:``;
* an OCI image index over several platform variants (:func:`build_index`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import struct
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.oci import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    sha256,
)

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "true")

FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
FIXED_CREATED = "2023-11-14T22:13:20Z"


REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def host_architecture() -> str:
    """The OCI/GOARCH name of this machine's architecture."""
    machine = platform.machine().lower()
    table = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }
    if machine not in table:
        raise RuntimeError(f"unknown machine architecture {machine!r}")
    return table[machine]


def other_architecture(arch: str | None = None) -> str:
    """A second architecture for two-platform tests: arm64 on amd64 hosts, else amd64."""
    return "arm64" if (arch or host_architecture()) == "amd64" else "amd64"


def assert_static_elf(path: Path = BUSYBOX) -> bytes:
    """Read an ELF executable and check it has no PT_INTERP (is statically linked)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
    elf_class, endian = data[4], data[5]
    assert elf_class in (1, 2) and endian in (1, 2), f"{path}: odd ELF ident"
    end = "<" if endian == 1 else ">"
    if elf_class == 2:
        phoff, phentsize, phnum = (
            struct.unpack_from(end + "Q", data, 0x20)[0],
            *struct.unpack_from(end + "HH", data, 0x36),
        )
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(end + "I", data, 0x1C)[0],
            *struct.unpack_from(end + "HH", data, 0x2A),
        )
    pt_interp = 3
    for i in range(phnum):
        (p_type,) = struct.unpack_from(end + "I", data, phoff + i * phentsize)
        assert p_type != pt_interp, (
            f"{path} is dynamically linked (has PT_INTERP); install Debian's busybox-static"
        )
    return data


# --------------------------------------------------------------------------- tar helpers


@dataclass(frozen=True)
class Entry:
    """One tar member: a directory, a regular file or a symlink."""

    name: str
    kind: str  # "dir", "file" or "symlink"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644


def make_tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                info.mode = 0o777
                tar.addfile(info)
            elif e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                raise ValueError(e.kind)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@dataclass(frozen=True, repr=False)
class Layer:
    tar: bytes  # uncompressed
    gz: bytes  # gzip-compressed, what the OCI manifest refers to

    def __repr__(self) -> str:
        return f"Layer({self.digest}, {self.size} bytes, diff_id={self.diff_id})"

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)

    @property
    def digest(self) -> str:
        return sha256(self.gz)

    @property
    def size(self) -> int:
        return len(self.gz)

    def descriptor(self, media_type: str = OCI_LAYER) -> dict[str, object]:
        return {"mediaType": media_type, "digest": self.digest, "size": self.size}


def layer_from_entries(entries: Iterable[Entry]) -> Layer:
    tar = make_tar(entries)
    return Layer(tar=tar, gz=gzip_bytes(tar))


_BUSYBOX_LAYER_CACHE: dict[str, Layer] = {}


def busybox_layer() -> Layer:
    """bin/busybox plus applet symlinks; built once per process (it is ~1 MB compressed)."""
    if "layer" not in _BUSYBOX_LAYER_CACHE:
        data = assert_static_elf(BUSYBOX)
        entries = [
            Entry("bin", "dir", mode=0o755),
            Entry("bin/busybox", "file", data=data, mode=0o755),
            *(Entry(f"bin/{a}", "symlink", target="busybox") for a in BUSYBOX_APPLETS),
            Entry("tmp", "dir", mode=0o1777),
        ]
        _BUSYBOX_LAYER_CACHE["layer"] = layer_from_entries(entries)
    return _BUSYBOX_LAYER_CACHE["layer"]


def marker_text(marker: str, architecture: str) -> bytes:
    """Contents of /etc/skyreg-test.txt in the marker layer."""
    return f"skyreg test image\nmarker={marker}\narchitecture={architecture}\n".encode()


def marker_layer(marker: str, architecture: str) -> Layer:
    text = marker_text(marker, architecture)
    return layer_from_entries(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/skyreg-test.txt", "file", data=text),
            # A file that only exists in this platform's variant, so variants differ.
            Entry(f"etc/skyreg-arch-{architecture}", "file", data=architecture.encode()),
        ]
    )


# --------------------------------------------------------------------------- images


@dataclass(repr=False)
class TestImage:
    """A built single-platform image, with every blob in memory."""

    __test__ = False  # not a pytest test class

    marker: str
    architecture: str
    os: str
    layers: list[Layer]
    config: bytes
    manifest: bytes
    # OCI_MANIFEST, or DOCKER_MANIFEST for build_image(..., docker_format=True).
    manifest_media_type: str = OCI_MANIFEST

    def __repr__(self) -> str:  # blobs are megabytes: keep failure messages short
        return (
            f"TestImage(marker={self.marker!r}, {self.os}/{self.architecture}, "
            f"manifest={self.manifest_digest}, config={self.config_digest})"
        )

    # -- digests --------------------------------------------------------------------
    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def image_id(self) -> str:
        """What docker/podman/containerd call the image ID: the config digest."""
        return self.config_digest

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def marker_text(self) -> bytes:
        return marker_text(self.marker, self.architecture)

    def descriptor(self, *, with_platform: bool = False) -> dict[str, object]:
        d: dict[str, object] = {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
        }
        if with_platform:
            d["platform"] = {"architecture": self.architecture, "os": self.os}
        return d

    def blobs(self) -> dict[str, bytes]:
        """Every blob by digest: config, gzip layers, manifest."""
        out = {self.config_digest: self.config, self.manifest_digest: self.manifest}
        for layer in self.layers:
            out[layer.digest] = layer.gz
        return out

    # -- OCI layout ---------------------------------------------------------------
    def write_oci_layout(self, directory: Path, tag: str = "latest") -> Path:
        """Write (or add to) an OCI image layout; returns ``directory``."""
        return write_oci_layout(directory, [(tag, self)])

    # -- docker-archive -------------------------------------------------------------
    def write_docker_archive(self, path: Path, repo_tags: Sequence[str] = ()) -> Path:
        """Write a ``docker save``-style tarball; returns ``path``.

        ``repo_tags`` are full references such as ``"127.0.0.1:5000/foo:bar"``.
        """
        config_name = f"{self.config_digest.removeprefix('sha256:')}.json"
        members: list[tuple[str, bytes | None]] = []
        layer_paths: list[str] = []
        parent = ""
        v1_id = ""
        for i, layer in enumerate(self.layers):
            v1_id = hashlib.sha256(f"{parent}\n{layer.diff_id}".encode()).hexdigest()
            v1_json: dict[str, object] = {
                "id": v1_id,
                "created": FIXED_CREATED,
                "container_config": {"Cmd": None},
                "os": self.os,
            }
            if parent:
                v1_json["parent"] = parent
            if i == len(self.layers) - 1:
                v1_json["architecture"] = self.architecture
                v1_json["config"] = json.loads(self.config)["config"]
            members += [
                (f"{v1_id}/", None),
                (f"{v1_id}/VERSION", b"1.0"),
                (f"{v1_id}/json", canonical_json(v1_json)),
                (f"{v1_id}/layer.tar", layer.tar),
            ]
            layer_paths.append(f"{v1_id}/layer.tar")
            parent = v1_id
        manifest = [
            {
                "Config": config_name,
                "RepoTags": list(repo_tags) or None,
                "Layers": layer_paths,
            }
        ]
        repositories: dict[str, dict[str, str]] = {}
        for ref in repo_tags:
            repo, _, tag = ref.rpartition(":")
            repositories.setdefault(repo, {})[tag] = v1_id
        members.append((config_name, self.config))
        members.append(("manifest.json", json.dumps(manifest).encode()))
        if repositories:
            members.append(("repositories", json.dumps(repositories).encode()))

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name.rstrip("/"))
                info.mtime = FIXED_MTIME
                info.uid = info.gid = 0
                if data is None:
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    info.mode = 0o644
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        return path


def build_image(
    marker: str = "default",
    *,
    architecture: str | None = None,
    os_name: str = "linux",
    include_busybox: bool = True,
    docker_format: bool = False,
) -> TestImage:
    """Build a busybox + marker-file image for one platform.

    Different markers give different marker layers, configs and manifests; a different
    ``architecture`` changes the config and the marker layer (it holds a per-arch file).
    ``docker_format`` writes a Docker v2 schema 2 manifest (docker media types) instead
    of an OCI one: the config and the layer blobs are the same either way.
    """
    arch = architecture or host_architecture()
    layers = [busybox_layer()] if include_busybox else []
    layers.append(marker_layer(marker, arch))
    history = [
        {"created": FIXED_CREATED, "created_by": "skyreg tests/support/images.py: busybox"},
        {
            "created": FIXED_CREATED,
            "created_by": f"skyreg tests/support/images.py: marker {marker}",
        },
    ][-len(layers) :]
    config_obj = {
        "architecture": arch,
        "os": os_name,
        "created": FIXED_CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.skyreg.test.marker": marker},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": history,
    }
    config = canonical_json(config_obj)
    manifest_type, config_type, layer_type = (
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
        if docker_format
        else (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    )
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": config_type,
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": [layer.descriptor(layer_type) for layer in layers],
    }
    manifest = canonical_json(manifest_obj)
    return TestImage(
        marker=marker,
        architecture=arch,
        os=os_name,
        layers=layers,
        config=config,
        manifest=manifest,
        manifest_media_type=manifest_type,
    )


def build_platform_pair(marker: str, *, docker_format: bool = False) -> tuple[TestImage, TestImage]:
    """Two variants of one image: (host architecture, the other architecture)."""
    host = build_image(marker, architecture=host_architecture(), docker_format=docker_format)
    other = build_image(
        marker, architecture=other_architecture(host.architecture), docker_format=docker_format
    )
    assert host.manifest_digest != other.manifest_digest
    return host, other


def build_index(images: Sequence[TestImage], *, docker_format: bool = False) -> bytes:
    """An OCI image index (or, with ``docker_format``, a Docker manifest list) as
    canonical JSON bytes, listing ``images`` with their platforms."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST if docker_format else OCI_INDEX,
            "manifests": [img.descriptor(with_platform=True) for img in images],
        }
    )


# --------------------------------------------------------------------------- OCI layout


def _write_blob(directory: Path, data: bytes) -> str:
    digest = sha256(data)
    path = directory / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return digest


def write_oci_layout(
    directory: Path,
    tagged: Sequence[tuple[str, TestImage]],
    *,
    indexes: Sequence[tuple[str, Sequence[TestImage]]] = (),
) -> Path:
    """Write images (and optionally image indexes over images) into an OCI layout.

    ``tagged`` is ``[(tag, image), ...]``; ``indexes`` is ``[(tag, [image, ...]), ...]``
    and writes a multi-platform index under that tag. An existing ``index.json`` is
    kept and extended (entries with the same tag are replaced).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index_path = directory / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}

    def add(tag: str, desc: dict[str, object]) -> None:
        index["manifests"] = [
            m
            for m in index["manifests"]
            if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != tag
        ]
        index["manifests"].append({**desc, "annotations": {REF_NAME_ANNOTATION: tag}})

    def put_image(img: TestImage) -> None:
        for data in img.blobs().values():
            _write_blob(directory, data)

    for tag, img in tagged:
        put_image(img)
        add(tag, img.descriptor())
    for tag, imgs in indexes:
        for img in imgs:
            put_image(img)
        data = build_index(imgs)
        digest = _write_blob(directory, data)
        add(tag, {"mediaType": OCI_INDEX, "digest": digest, "size": len(data)})
    index_path.write_bytes(canonical_json(index))
    return directory


def write_oci_archive(
    path: Path,
    tagged: Sequence[tuple[str, TestImage]],
    *,
    indexes: Sequence[tuple[str, Sequence[TestImage]]] = (),
) -> Path:
    """An OCI layout packed as a tar (``oci-archive:``, ``ctr images import``)."""
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        layout = write_oci_layout(Path(tmp) / "layout", tagged, indexes=indexes)
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for f in sorted(layout.rglob("*")):
                info = tar.gettarinfo(str(f), arcname=str(f.relative_to(layout)))
                info.mtime = FIXED_MTIME
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if f.is_file():
                    with open(f, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def read_layer_files(layer_tar: bytes) -> dict[str, bytes | str]:
    """Map member name -> file bytes (regular files) or ``"-> target"`` (symlinks)."""
    out: dict[str, bytes | str] = {}
    with tarfile.open(fileobj=io.BytesIO(layer_tar), mode="r:*") as tar:
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
            elif m.issym():
                out[m.name] = f"-> {m.linkname}"
    return out


def build_app_image(
    marker: str,
    entries: Sequence[Entry],
    *,
    cmd: Sequence[str],
    env: Sequence[str] = (),
) -> TestImage:
    """busybox plus a layer of `entries`, running `cmd` with `env` (after PATH): an app image."""
    arch = host_architecture()
    layers = [busybox_layer(), layer_from_entries(entries)]
    config = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "created": FIXED_CREATED,
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", *env],
                "Cmd": list(cmd),
                "Labels": {"org.skyreg.test.marker": marker},
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [
                {"created": FIXED_CREATED, "created_by": "skyreg tests/support/images.py: busybox"},
                {
                    "created": FIXED_CREATED,
                    "created_by": f"skyreg tests/support/images.py: app {marker}",
                },
            ],
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [layer.descriptor(OCI_LAYER) for layer in layers],
        }
    )
    return TestImage(
        marker=marker,
        architecture=arch,
        os="linux",
        layers=layers,
        config=config,
        manifest=manifest,
    )
