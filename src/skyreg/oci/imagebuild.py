"""Building image manifests for a push (no I/O): the manifest of a docker-archive's image, and
the media type of a manifest an OCI layout holds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skyreg.oci.mediatypes import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


@dataclass(frozen=True)
class PushedLayer:
    """A layer as pushed: its compression ("none" is pushed gzipped), digest and size."""

    compression: str
    digest: str
    size: int


def archive_manifest(config: bytes, layers: Sequence[PushedLayer]) -> tuple[bytes, str]:
    """(bytes, media type) of the manifest of a docker-archive's image: Docker schema 2, or OCI
    when a layer is zstd (Docker's media types have none for it)."""
    oci = any(layer.compression == "zstd" for layer in layers)

    def layer_type(compression: str) -> str:
        if oci:
            return OCI_LAYER_ZSTD if compression == "zstd" else OCI_LAYER_GZIP
        return DOCKER_LAYER_GZIP

    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "size": len(config),
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        },
        "layers": [
            {"mediaType": layer_type(layer.compression), "size": layer.size, "digest": layer.digest}
            for layer in layers
        ],
    }
    return json.dumps(manifest, indent=3).encode(), OCI_MANIFEST if oci else DOCKER_MANIFEST


def manifest_media_type(descriptor: dict[str, Any], raw: bytes) -> str:
    """The media type of a manifest: its descriptor's, else its own `mediaType`, else an index
    if it lists `manifests`, else an OCI image manifest."""
    value = descriptor.get("mediaType")
    if isinstance(value, str) and value:
        return value
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = {}
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    if isinstance(value, str) and value:
        return value
    return OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST
