"""ORAS artifacts against a real `skyreg serve`, driven through oras-py (PyPI `oras`, the
ORAS Python SDK; PyPI has no ORAS CLI): push/pull of a file artifact with an
artifactType, and referrers (manifests with a `subject`) listed by the referrers API."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import (
    get_manifest_http,
    http_request,
    push_image_http,
    registry_log,
    require_busybox,
)
from tests.support.images import OCI_INDEX, OCI_MANIFEST, build_image, sha256
from tests.support.servers import ServedRegistry

oras_provider = pytest.importorskip(
    "oras.provider", reason="oras-py not installed (pip install oras)"
)
import oras.oci  # noqa: E402  (only after the importorskip above)

pytestmark = pytest.mark.slow

EMPTY_CONFIG_TYPE = "application/vnd.oci.empty.v1+json"
NOTE_TYPE = "application/vnd.skyreg.test.note.v1"
SBOM_TYPE = "application/vnd.skyreg.test.sbom.v1+json"
SIG_TYPE = "application/vnd.skyreg.test.signature.v1"


class ArtifactClient(oras_provider.Registry):  # type: ignore[misc]
    """oras-py's client, plus the OCI 1.1 ``artifactType`` field on pushed manifests
    (oras-py has no option for it) and a record of what it sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.artifact_type: str | None = None
        self.sent: dict[str, Any] = {}

    def upload_manifest(self, manifest: dict[str, Any], container: Any) -> Any:
        if self.artifact_type:
            manifest = {**manifest, "artifactType": self.artifact_type}
        self.sent = manifest
        return super().upload_manifest(manifest, container)


@pytest.fixture
def oras_client(shared_registry: ServedRegistry) -> ArtifactClient:
    require_busybox()
    return ArtifactClient(hostname=shared_registry.host, insecure=True)


def _empty_config(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_bytes(b"{}")
    return f"{path}:{EMPTY_CONFIG_TYPE}"


def _push_artifact(
    client: ArtifactClient,
    tmp_path: Path,
    target: str,
    artifact_type: str,
    files: dict[str, tuple[bytes, str]],
    *,
    subject: Any = None,
    annotations: dict[str, str] | None = None,
    chunk_size: int | None = None,
) -> tuple[str, Any]:
    """Push files as one artifact; returns (manifest digest, HTTP response)."""
    paths = []
    src = tmp_path / f"src-{sha256(target.encode())[7:19]}"
    src.mkdir()
    for name, (data, media_type) in files.items():
        (src / name).write_bytes(data)
        paths.append(f"{src / name}:{media_type}")
    client.artifact_type = artifact_type
    resp = client.push(
        target=target,
        files=paths,
        manifest_config=_empty_config(tmp_path),
        manifest_annotations=annotations,
        subject=subject,
        disable_path_validation=True,
        quiet=True,
        **({"do_chunked": True, "chunk_size": chunk_size} if chunk_size else {}),
    )
    assert resp.status_code == 201, resp.text
    digest = resp.headers["Docker-Content-Digest"]
    assert digest == sha256(json.dumps(client.sent).encode())
    return digest, resp


def test_push_pull_artifact(
    oras_client: ArtifactClient, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    note = b"skyreg oras note\n" + bytes(range(256)) * 64
    data = b'{"hello": "oras"}\n'
    target = f"{reg.host}/oras/artifact:v1"
    digest, _ = _push_artifact(
        oras_client,
        tmp_path,
        target,
        NOTE_TYPE,
        {"note.bin": (note, "application/octet-stream"), "data.json": (data, "application/json")},
        annotations={"org.skyreg.test": "push-pull"},
    )

    manifest = oras_client.get_manifest(target)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == NOTE_TYPE
    assert manifest["config"] == {
        "mediaType": EMPTY_CONFIG_TYPE,
        "digest": sha256(b"{}"),
        "size": 2,
    }
    assert manifest["annotations"] == {"org.skyreg.test": "push-pull"}
    layers = {
        layer["annotations"]["org.opencontainers.image.title"]: layer
        for layer in manifest["layers"]
    }
    assert layers["note.bin"]["digest"] == sha256(note)
    assert layers["note.bin"]["size"] == len(note)
    assert layers["note.bin"]["mediaType"] == "application/octet-stream"
    assert layers["data.json"]["digest"] == sha256(data)

    status, headers, body = get_manifest_http(reg.url, "oras/artifact", "v1")
    assert status == 200, registry_log(reg)
    assert headers["Docker-Content-Digest"] == digest == sha256(body)

    out = tmp_path / "out"
    files = oras_client.pull(target=target, outdir=str(out))
    assert sorted(Path(f).name for f in files) == ["data.json", "note.bin"]
    assert (out / "note.bin").read_bytes() == note
    assert (out / "data.json").read_bytes() == data

    assert oras_client.get_tags(f"{reg.host}/oras/artifact") == ["v1"]


def test_chunked_push(
    oras_client: ArtifactClient, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    """oras-py's chunked upload: POST, several PATCHes with Content-Range, then PUT."""
    reg = shared_registry
    big = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 7)  # ~3 MiB
    target = f"{reg.host}/oras/chunked:v1"
    digest, _ = _push_artifact(
        oras_client,
        tmp_path,
        target,
        NOTE_TYPE,
        {"big.bin": (big, "application/octet-stream")},
        chunk_size=1024 * 1024,
    )
    status, headers, blob = http_request(f"{reg.url}/v2/oras/chunked/blobs/{sha256(big)}")
    assert status == 200, registry_log(reg)
    assert blob == big
    assert headers["Docker-Content-Digest"] == sha256(big)
    out = tmp_path / "out"
    oras_client.pull(target=f"{reg.host}/oras/chunked@{digest}", outdir=str(out))
    assert (out / "big.bin").read_bytes() == big


def test_referrers(
    oras_client: ArtifactClient, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("oras-subject")
    assert push_image_http(reg.url, "oras/image", "v1", img) == img.manifest_digest
    subject = oras.oci.Subject(
        mediaType=OCI_MANIFEST, digest=img.manifest_digest, size=len(img.manifest)
    )

    sbom = json.dumps({"packages": ["busybox"], "marker": "oras-subject"}).encode()
    sbom_digest, resp = _push_artifact(
        oras_client,
        tmp_path,
        f"{reg.host}/oras/image:sbom",
        SBOM_TYPE,
        {"sbom.json": (sbom, "application/json")},
        subject=subject,
        annotations={"org.skyreg.test.kind": "sbom"},
    )
    # OCI distribution 1.1: a registry that handles `subject` says so in OCI-Subject.
    assert resp.headers.get("OCI-Subject") == img.manifest_digest, dict(resp.headers)
    sig_digest, _ = _push_artifact(
        oras_client,
        tmp_path,
        f"{reg.host}/oras/image:sig",
        SIG_TYPE,
        {"sig.bin": (b"not really a signature", "application/octet-stream")},
        subject=subject,
    )

    url = f"{reg.url}/v2/oras/image/referrers/{img.manifest_digest}"
    status, headers, body = http_request(url)
    assert status == 200, f"GET {url} -> {status} {body[:500]!r}\n{registry_log(reg)}"
    assert headers["Content-Type"] == OCI_INDEX
    index = json.loads(body)
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert set(by_digest) == {sbom_digest, sig_digest}
    sbom_entry = by_digest[sbom_digest]
    assert sbom_entry["artifactType"] == SBOM_TYPE
    assert sbom_entry["mediaType"] == OCI_MANIFEST
    assert sbom_entry["size"] == len(get_manifest_http(reg.url, "oras/image", sbom_digest)[2])
    assert sbom_entry["annotations"] == {"org.skyreg.test.kind": "sbom"}
    assert by_digest[sig_digest]["artifactType"] == SIG_TYPE

    # Filtering by artifactType (optional for registries; if applied, it must say so).
    # (URL-encoded as clients do: a bare "+" in a query string means a space.)
    query = urllib.parse.urlencode({"artifactType": SBOM_TYPE})
    status, headers, body = http_request(f"{url}?{query}")
    assert status == 200
    filtered = {m["digest"] for m in json.loads(body)["manifests"]}
    if "artifactType" in headers.get("OCI-Filters-Applied", ""):
        assert filtered == {sbom_digest}
    else:
        assert filtered == {sbom_digest, sig_digest}

    # The referrer itself pulls back with its bytes.
    out = tmp_path / "out"
    oras_client.pull(target=f"{reg.host}/oras/image@{sbom_digest}", outdir=str(out))
    assert (out / "sbom.json").read_bytes() == sbom

    # A digest nothing refers to: an empty index, not a 404.
    lonely = build_image("oras-no-referrers")
    push_image_http(reg.url, "oras/image", "lonely", lonely)
    status, _, body = http_request(f"{reg.url}/v2/oras/image/referrers/{lonely.manifest_digest}")
    assert status == 200, registry_log(reg)
    assert json.loads(body)["manifests"] == []
