"""Building and pushing blobs and manifests over plain HTTP, for API tests."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_codes(resp: requests.Response) -> list[str]:
    """The `code` of every error in a spec error body."""
    return [e["code"] for e in resp.json()["errors"]]


def push_blob(base: str, repo: str, data: bytes, session: Any = requests) -> str:
    """Monolithic POST?digest= upload; returns the digest."""
    digest = sha256(data)
    r = session.post(
        f"{base}/v2/{repo}/blobs/uploads/",
        params={"digest": digest},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    return digest


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


@dataclass
class Image:
    """An image pushed by `push_image`."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    digest: str


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        **extra,
    }
    return json.dumps(doc, indent=1).encode()


def put_manifest(
    base: str,
    repo: str,
    ref: str,
    body: bytes,
    media_type: str = OCI_MANIFEST,
    session: Any = requests,
) -> requests.Response:
    return session.put(
        f"{base}/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type}
    )


def push_image(
    base: str,
    repo: str,
    tag: str | None = None,
    *,
    layers: int = 2,
    layer_size: int = 1024,
    arch: str = "amd64",
    session: Any = requests,
) -> Image:
    """Push random layers, a config and an OCI manifest; tag it when `tag` is given."""
    layer_data = [os.urandom(layer_size) for _ in range(layers)]
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "nonce": os.urandom(8).hex(),
        }
    ).encode()
    for blob in [config, *layer_data]:
        push_blob(base, repo, blob, session)
    manifest = image_manifest(config, layer_data)
    digest = sha256(manifest)
    r = put_manifest(base, repo, tag or digest, manifest, session=session)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    return Image(config, layer_data, manifest, digest)


def start_upload(base: str, repo: str) -> str:
    """Open an upload session in `repo` (202 asserted); its Location."""
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    return str(r.headers["Location"])


def patch_chunk(base: str, location: str, data: bytes, offset: int) -> requests.Response:
    """PATCH `data` into an upload at `offset` (Content-Range set); the answer, unchecked."""
    return requests.patch(
        base + location,
        data=data,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(data) - 1}",
        },
        timeout=30,
    )


def push_sized_image(session: requests.Session, base: str, repo: str, tag: str) -> tuple[str, int]:
    """Push a config, two layers and a manifest with `session`; (digest, total size)."""
    blobs = [json.dumps({"os": "linux", "n": uuid.uuid4().hex}).encode(), b"a" * 1000, b"b" * 3000]
    for blob in blobs:
        r = session.post(
            f"{base}/v2/{repo}/blobs/uploads/",
            params={"digest": sha256(blob)},
            data=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 201, r.text
    manifest = image_manifest(blobs[0], blobs[1:])
    r = session.put(
        f"{base}/v2/{repo}/manifests/{tag}", data=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status_code == 201, r.text
    return sha256(manifest), len(manifest) + sum(len(b) for b in blobs)
