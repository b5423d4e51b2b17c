"""Tar layers written entry by entry, for the unpacking and layer-cache tests."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass
class Entry:
    """One tar member to write: its header and, for regular files, its bytes."""

    info: tarfile.TarInfo
    data: bytes = b""


def _info(name: str, kind: bytes, mode: int, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, **attrs: object) -> Entry:
    return Entry(_info(name, tarfile.REGTYPE, mode, size=len(data), **attrs), data)


def dir_(name: str, mode: int = 0o755, **attrs: object) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode, **attrs))


def sym(name: str, target: str) -> Entry:
    return Entry(_info(name, tarfile.SYMTYPE, 0o777, linkname=target))


def hard(name: str, target: str) -> Entry:
    return Entry(_info(name, tarfile.LNKTYPE, 0o644, linkname=target))


def special(name: str, kind: bytes) -> Entry:
    return Entry(_info(name, kind, 0o600, devmajor=1, devminor=3))


def whiteout(name: str) -> Entry:
    head, _, base = name.rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(directory: str) -> Entry:
    return file(f"{directory}/.wh..wh..opq")


def tar_bytes(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            tar.addfile(e.info, io.BytesIO(e.data) if e.info.isreg() else None)
    return buf.getvalue()


def write_layer(path: Path, entries: list[Entry], compression: str = "gzip") -> Path:
    raw = tar_bytes(entries)
    if compression == "gzip":
        path.write_bytes(gzip.compress(raw))
    elif compression == "zstd":
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    return path


MEDIA = {"gzip": OCI_GZIP, "zstd": OCI_ZSTD, "tar": OCI_TAR}
