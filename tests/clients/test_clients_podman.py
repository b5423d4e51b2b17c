"""podman against a real `skyreg serve`: push/pull round trips and a two-platform
manifest list pushed with `podman manifest push --all`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.clients import (
    Podman,
    assert_image_in_registry,
    get_manifest_http,
    http_request,
    registry_log,
)
from tests.support.images import (
    DOCKER_LIST,
    OCI_INDEX,
    build_image,
    build_platform_pair,
    sha256,
    write_oci_layout,
)
from tests.support.servers import ServedRegistry

pytestmark = pytest.mark.slow


def _inspect(podman: Podman, ref: str) -> dict[str, object]:
    data = podman.podman("image", "inspect", ref).json()
    assert len(data) == 1
    return data[0]


def test_push_pull_docker_archive(
    podman: Podman, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("podman-archive")
    ref = f"{reg.host}/podman/archive:v1"
    archive = img.write_docker_archive(tmp_path / "image.tar", [ref])

    podman.podman("load", "-i", archive)
    assert _inspect(podman, ref)["Id"] == img.image_id.removeprefix("sha256:")

    digest_file = tmp_path / "digest"
    podman.podman("push", "--tls-verify=false", "--digestfile", digest_file, ref)
    pushed = digest_file.read_text().strip()
    assert pushed.startswith("sha256:")

    status, headers, body = get_manifest_http(reg.url, "podman/archive", "v1")
    assert status == 200, registry_log(reg)
    assert headers["Docker-Content-Digest"] == pushed
    assert sha256(body) == pushed
    manifest = json.loads(body)
    assert manifest["config"]["digest"] == img.config_digest

    podman.podman("rmi", ref)
    assert podman.podman("image", "exists", ref, check=False).returncode == 1

    podman.podman("pull", "--tls-verify=false", ref)
    info = _inspect(podman, ref)
    assert info["Id"] == img.image_id.removeprefix("sha256:")
    assert info["Digest"] == pushed
    assert f"{reg.host}/podman/archive@{pushed}" in info["RepoDigests"]
    assert info["RootFS"]["Layers"] == img.diff_ids
    podman.podman("rmi", ref)


def test_push_pull_from_oci_layout(
    podman: Podman, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("podman-oci")
    layout = img.write_oci_layout(tmp_path / "layout", "v1")
    ref = f"{reg.host}/podman/oci:v1"

    podman.podman("pull", f"oci:{layout}:v1")
    local = podman.podman("images", "--format", "{{.ID}} {{.Repository}}", "--no-trunc").stdout
    assert img.image_id in local, local
    podman.podman("tag", img.image_id.removeprefix("sha256:"), ref)
    digest_file = tmp_path / "digest"
    podman.podman("push", "--tls-verify=false", "--format", "oci", "--digestfile", digest_file, ref)
    pushed = digest_file.read_text().strip()

    status, headers, body = get_manifest_http(reg.url, "podman/oci", "v1")
    assert status == 200, registry_log(reg)
    assert headers["Docker-Content-Digest"] == pushed == sha256(body)
    assert json.loads(body)["config"]["digest"] == img.config_digest
    tags = json.loads(http_request(f"{reg.url}/v2/podman/oci/tags/list")[2])
    assert tags == {"name": "podman/oci", "tags": ["v1"]}

    podman.podman("rmi", "--force", img.image_id.removeprefix("sha256:"))
    podman.podman("pull", "--tls-verify=false", ref)
    info = _inspect(podman, ref)
    assert info["Id"] == img.image_id.removeprefix("sha256:")
    assert info["Digest"] == pushed
    podman.podman("rmi", ref)


def test_manifest_list_two_platforms(
    podman: Podman, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    host, other = build_platform_pair("podman-multi")
    layout = write_oci_layout(tmp_path / "layout", [("host", host), ("other", other)])
    list_name = f"{reg.host}/podman/multi:v1"

    podman.podman("manifest", "create", list_name)
    podman.podman("manifest", "add", list_name, f"oci:{layout}:host")
    podman.podman("manifest", "add", list_name, f"oci:{layout}:other")
    local = podman.podman("manifest", "inspect", list_name).json()
    assert {m["digest"] for m in local["manifests"]} == {
        host.manifest_digest,
        other.manifest_digest,
    }
    podman.podman(
        "manifest", "push", "--all", "--tls-verify=false", list_name, f"docker://{list_name}"
    )

    # The registry holds an index naming both platform manifests, which are there too.
    # (podman may recompress layers from its storage, or reuse another compressed copy
    # of the busybox layer that it pushed earlier, so child digests are its own; the
    # configs, and what the layers unpack to, are ours.)
    status, headers, body = get_manifest_http(reg.url, "podman/multi", "v1")
    assert status == 200, registry_log(reg)
    index = json.loads(body)
    assert headers["Content-Type"] in (OCI_INDEX, DOCKER_LIST)
    assert index["mediaType"] == headers["Content-Type"]
    index_digest = sha256(body)
    assert headers["Docker-Content-Digest"] == index_digest
    by_arch = {m["platform"]["architecture"]: m for m in index["manifests"]}
    assert len(index["manifests"]) == 2
    assert set(by_arch) == {host.architecture, other.architecture}
    child_digest = {}
    for img in (host, other):
        entry = by_arch[img.architecture]
        assert entry["platform"]["os"] == "linux"
        digest, _ = assert_image_in_registry(reg.url, "podman/multi", entry["digest"], img)
        assert digest == entry["digest"]
        status, _, child = get_manifest_http(reg.url, "podman/multi", entry["digest"])
        assert entry["size"] == len(child)
        child_digest[img.architecture] = digest
    podman.podman("manifest", "rm", list_name)

    # Pull the non-host platform explicitly and check it is that one.
    podman.podman("pull", "--tls-verify=false", "--arch", other.architecture, list_name)
    info = _inspect(podman, list_name)
    assert info["Id"] == other.image_id.removeprefix("sha256:")
    assert info["Architecture"] == other.architecture
    assert info["Digest"] == index_digest
    assert f"{reg.host}/podman/multi@{child_digest[other.architecture]}" in info["RepoDigests"]
    podman.podman("rmi", list_name)

    # And the host platform by default.
    podman.podman("pull", "--tls-verify=false", list_name)
    info = _inspect(podman, list_name)
    assert info["Id"] == host.image_id.removeprefix("sha256:")
    assert info["Architecture"] == host.architecture
    podman.podman("rmi", list_name)
