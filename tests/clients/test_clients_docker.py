"""The Docker engine (dockerd + docker CLI) against a real `skyreg serve`: load, tag,
push (incl. a cross-repository mount), rmi, pull (docker and OCI manifests, a
multi-platform index) and `docker manifest inspect --insecure`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.clients import (
    DockerEngine,
    assert_image_in_registry,
    http_request,
    push_image_http,
    push_manifest_http,
    registry_log,
)
from tests.support.images import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    build_image,
    build_index,
    build_platform_pair,
    sha256,
)
from tests.support.servers import ServedRegistry

pytestmark = pytest.mark.slow

PUSH_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64}) size: (\d+)")


def _image(dockerd: DockerEngine, ref: str) -> dict[str, object]:
    data = dockerd.docker("image", "inspect", ref).json()
    assert len(data) == 1
    return data[0]


def _push(dockerd: DockerEngine, ref: str) -> tuple[str, str]:
    res = dockerd.docker("push", ref)
    m = PUSH_DIGEST.search(res.stdout)
    assert m, res.describe()
    return m.group(1), res.stdout


def test_load_push_rmi_pull(
    dockerd: DockerEngine, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("docker-load")
    archive = img.write_docker_archive(tmp_path / "image.tar", ["skyreg-test/docker-load:v1"])

    loaded = dockerd.docker("load", "-i", archive)
    assert "skyreg-test/docker-load:v1" in loaded.stdout, loaded.describe()
    assert _image(dockerd, "skyreg-test/docker-load:v1")["Id"] == img.image_id

    ref = f"{reg.host}/docker/app:v1"
    dockerd.docker("tag", "skyreg-test/docker-load:v1", ref)
    pushed, _ = _push(dockerd, ref)

    digest, manifest = assert_image_in_registry(reg.url, "docker/app", "v1", img)
    assert digest == pushed, registry_log(reg)
    assert manifest["mediaType"] == DOCKER_MANIFEST

    # Same image to another repository: docker mounts the blobs across repositories.
    ref2 = f"{reg.host}/docker/copy:v2"
    dockerd.docker("tag", ref, ref2)
    pushed2, out = _push(dockerd, ref2)
    assert pushed2 == pushed
    assert "Mounted from docker/app" in out or "Layer already exists" in out, out
    assert assert_image_in_registry(reg.url, "docker/copy", "v2", img)[0] == pushed

    dockerd.docker("rmi", ref, ref2, "skyreg-test/docker-load:v1")
    gone = dockerd.docker("image", "inspect", ref, check=False)
    assert gone.returncode != 0

    pulled = dockerd.docker("pull", ref)
    assert f"Digest: {pushed}" in pulled.stdout, pulled.describe()
    info = _image(dockerd, ref)
    assert info["Id"] == img.image_id
    assert f"{reg.host}/docker/app@{pushed}" in info["RepoDigests"]
    assert info["RootFS"]["Layers"] == img.diff_ids
    assert info["Architecture"] == img.architecture
    dockerd.docker("rmi", ref)


def test_manifest_inspect_insecure(dockerd: DockerEngine, shared_registry: ServedRegistry) -> None:
    reg = shared_registry
    # Docker media types: the Debian 20.10 CLI's `manifest inspect` does not send OCI
    # types in Accept (the registry then answers 404 MANIFEST_UNKNOWN, as distribution
    # does); newer CLIs accept both.
    img = build_image("docker-manifest-inspect", docker_format=True)
    push_image_http(reg.url, "docker/inspect", "v1", img)

    ok = dockerd.docker("manifest", "inspect", "--insecure", f"{reg.host}/docker/inspect:v1")
    shown = ok.json()
    assert shown["mediaType"] == DOCKER_MANIFEST
    assert shown["config"]["digest"] == img.config_digest
    assert [layer["digest"] for layer in shown["layers"]] == img.layer_digests

    missing = dockerd.docker(
        "manifest", "inspect", "--insecure", f"{reg.host}/docker/inspect:nope", check=False
    )
    assert missing.returncode == 1, missing.describe()
    assert "no such manifest" in missing.stderr.lower(), missing.describe()

    missing_repo = dockerd.docker(
        "manifest", "inspect", "--insecure", f"{reg.host}/docker/no-such-repo:v1", check=False
    )
    assert missing_repo.returncode == 1, missing_repo.describe()


def test_pull_oci_manifest(dockerd: DockerEngine, shared_registry: ServedRegistry) -> None:
    """An OCI image manifest (pushed over plain HTTP) pulls with its exact digest."""
    reg = shared_registry
    img = build_image("docker-oci")
    assert push_image_http(reg.url, "docker/oci", "v1", img) == img.manifest_digest

    ref = f"{reg.host}/docker/oci:v1"
    pulled = dockerd.docker("pull", ref)
    assert f"Digest: {img.manifest_digest}" in pulled.stdout, pulled.describe()
    info = _image(dockerd, ref)
    assert info["Id"] == img.image_id
    assert f"{reg.host}/docker/oci@{img.manifest_digest}" in info["RepoDigests"]
    dockerd.docker("rmi", ref)

    # By digest too.
    by_digest = f"{reg.host}/docker/oci@{img.manifest_digest}"
    dockerd.docker("pull", by_digest)
    assert _image(dockerd, by_digest)["Id"] == img.image_id
    dockerd.docker("rmi", by_digest)


@pytest.mark.parametrize("docker_format", [True, False], ids=["docker-list", "oci-index"])
def test_pull_multi_platform_index(
    dockerd: DockerEngine, shared_registry: ServedRegistry, docker_format: bool
) -> None:
    reg = shared_registry
    kind = "list" if docker_format else "index"
    host, other = build_platform_pair(f"docker-multi-{kind}", docker_format=docker_format)
    repo = f"docker/multi-{kind}"
    for img in (host, other):
        push_image_http(reg.url, repo, img.manifest_digest, img)
    index = build_index([host, other], docker_format=docker_format)
    index_type = DOCKER_LIST if docker_format else OCI_INDEX
    assert push_manifest_http(reg.url, repo, "v1", index, index_type) == sha256(index)
    ref = f"{reg.host}/{repo}:v1"

    if docker_format:  # (see test_manifest_inspect_insecure about OCI and old CLIs)
        shown = dockerd.docker("manifest", "inspect", "--insecure", ref).json()
        assert shown["mediaType"] == DOCKER_LIST
        assert [m["digest"] for m in shown["manifests"]] == [
            host.manifest_digest,
            other.manifest_digest,
        ]

    pulled = dockerd.docker("pull", ref)
    assert f"Digest: {sha256(index)}" in pulled.stdout, pulled.describe()
    info = _image(dockerd, ref)
    assert info["Id"] == host.image_id
    assert info["Architecture"] == host.architecture
    assert f"{reg.host}/{repo}@{sha256(index)}" in info["RepoDigests"]
    dockerd.docker("rmi", ref)

    dockerd.docker("pull", "--platform", f"linux/{other.architecture}", ref)
    info = _image(dockerd, ref)
    assert info["Id"] == other.image_id
    assert info["Architecture"] == other.architecture
    dockerd.docker("rmi", ref)


def test_pushed_tags_are_listed(
    dockerd: DockerEngine, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    """Several tags pushed by docker show up in the tags list, in lexical order."""
    reg = shared_registry
    img = build_image("docker-tags")
    archive = img.write_docker_archive(tmp_path / "image.tar", ["skyreg-test/docker-tags:v1"])
    dockerd.docker("load", "-i", archive)
    tags = ["b", "a", "v1.0", "latest"]
    digests = set()
    for tag in tags:
        ref = f"{reg.host}/docker/tags:{tag}"
        dockerd.docker("tag", "skyreg-test/docker-tags:v1", ref)
        digests.add(_push(dockerd, ref)[0])
        dockerd.docker("rmi", ref)
    assert len(digests) == 1
    status, _, body = http_request(f"{reg.url}/v2/docker/tags/tags/list")
    assert status == 200, registry_log(reg)
    listed = json.loads(body)
    assert listed["name"] == "docker/tags"
    assert sorted(listed["tags"]) == sorted(tags)
    # The distribution spec's pagination (?n=&last=) relies on lexical order.
    assert listed["tags"] == sorted(tags), listed
    dockerd.docker("rmi", "skyreg-test/docker-tags:v1")
