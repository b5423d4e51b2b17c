"""containerd's `ctr` against a real `skyreg serve`: import (OCI archive and
docker-archive), push --plain-http, remove, pull --plain-http, check digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.clients import (
    Containerd,
    assert_image_in_registry,
    get_manifest_http,
    registry_log,
)
from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    build_image,
    build_platform_pair,
    sha256,
    write_oci_archive,
)
from tests.support.servers import ServedRegistry

pytestmark = pytest.mark.slow

SNAPSHOTTER = ("--snapshotter", "native")  # no overlayfs needed


def _images(ctr: Containerd) -> dict[str, str]:
    """ref -> target digest, from `ctr images ls`."""
    out = ctr.ctr("images", "ls").stdout.splitlines()
    rows = [line.split() for line in out[1:] if line.strip()]
    return {row[0]: row[2] for row in rows}


def test_import_oci_push_remove_pull(
    containerd: Containerd, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("ctr-oci")
    archive = write_oci_archive(tmp_path / "oci.tar", [("v1", img)])
    name = f"{reg.host}/ctr/app"
    ref = f"{name}:v1"

    containerd.ctr("images", "import", "--base-name", name, *SNAPSHOTTER, archive)
    assert _images(containerd)[ref] == img.manifest_digest

    containerd.ctr("images", "push", "--plain-http", ref)
    # containerd pushes the stored OCI blobs untouched: the registry has our exact bytes.
    status, headers, body = get_manifest_http(reg.url, "ctr/app", "v1")
    assert status == 200, registry_log(reg)
    assert body == img.manifest
    assert headers["Docker-Content-Digest"] == img.manifest_digest
    assert headers["Content-Type"] == OCI_MANIFEST
    assert assert_image_in_registry(reg.url, "ctr/app", "v1", img)[0] == img.manifest_digest

    containerd.ctr("images", "rm", "--sync", ref)
    assert ref not in _images(containerd)
    content = containerd.ctr("content", "ls", "--quiet").stdout.split()
    assert img.config_digest not in content  # garbage-collected

    containerd.ctr("images", "pull", "--plain-http", *SNAPSHOTTER, ref)
    assert _images(containerd)[ref] == img.manifest_digest
    assert containerd.ctr("content", "get", img.config_digest).out == img.config
    assert containerd.ctr("content", "get", img.manifest_digest).out == img.manifest
    for layer in img.layers:
        assert containerd.ctr("content", "get", layer.digest).out == layer.gz
    containerd.ctr("images", "rm", "--sync", ref)


def test_import_docker_archive_push_pull(
    containerd: Containerd, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("ctr-docker")
    ref = f"{reg.host}/ctr/docker:v1"
    archive = img.write_docker_archive(tmp_path / "image.tar", [ref])

    containerd.ctr("images", "import", "--compress-blobs", *SNAPSHOTTER, archive)
    local_digest = _images(containerd)[ref]
    containerd.ctr("images", "push", "--plain-http", ref)

    digest, _ = assert_image_in_registry(reg.url, "ctr/docker", "v1", img)
    assert digest == local_digest, registry_log(reg)

    containerd.ctr("images", "rm", "--sync", ref)
    containerd.ctr("images", "pull", "--plain-http", *SNAPSHOTTER, ref)
    assert _images(containerd)[ref] == digest
    assert containerd.ctr("content", "get", img.config_digest).out == img.config
    containerd.ctr("images", "rm", "--sync", ref)


def test_push_pull_multi_platform_index(
    containerd: Containerd, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    host, other = build_platform_pair("ctr-multi")
    name = f"{reg.host}/ctr/multi"
    ref = f"{name}:v1"
    archive = write_oci_archive(tmp_path / "oci.tar", [], indexes=[("v1", [host, other])])

    containerd.ctr(
        "images", "import", "--all-platforms", "--base-name", name, *SNAPSHOTTER, archive
    )
    index_digest = _images(containerd)[ref]
    containerd.ctr("images", "push", "--plain-http", ref)

    status, headers, body = get_manifest_http(reg.url, "ctr/multi", "v1")
    assert status == 200, registry_log(reg)
    assert headers["Content-Type"] == OCI_INDEX
    assert sha256(body) == index_digest
    for img in (host, other):
        status, _, child = get_manifest_http(reg.url, "ctr/multi", img.manifest_digest)
        assert status == 200, registry_log(reg)
        assert child == img.manifest

    containerd.ctr("images", "rm", "--sync", ref)
    containerd.ctr(
        "images", "pull", "--plain-http", "--platform", f"linux/{other.architecture}",
        *SNAPSHOTTER, ref,
    )  # fmt: skip
    assert _images(containerd)[ref] == index_digest
    assert containerd.ctr("content", "get", other.config_digest).out == other.config
    containerd.ctr("images", "rm", "--sync", ref)
