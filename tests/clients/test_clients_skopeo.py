"""skopeo against a real `skyreg serve`: copy in (OCI layout, docker-archive, multi-arch
index), inspect, inspect --raw, list-tags, copy out to dir:, delete."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from tests.support.clients import (
    Skopeo,
    assert_image_in_registry,
    get_manifest_http,
    registry_log,
)
from tests.support.images import (
    BUSYBOX,
    OCI_INDEX,
    OCI_MANIFEST,
    build_image,
    build_index,
    build_platform_pair,
    read_layer_files,
    sha256,
    write_oci_layout,
)
from tests.support.servers import RunningRegistry, ServedRegistry

pytestmark = pytest.mark.slow

# Exact-bytes assertions need skopeo not to swap in other compressed copies of a layer
# that its blob-info cache knows (it would then rewrite the manifest).
PRESERVE = "--preserve-digests"


def test_copy_oci_layout_then_inspect(
    skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("skopeo-oci")
    layout = img.write_oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{reg.host}/skopeo/oci:v1"

    skopeo.copy(f"oci:{layout}:v1", ref, PRESERVE)

    info = skopeo.inspect(ref).json()
    assert info["Digest"] == img.manifest_digest, registry_log(reg)
    assert info["Layers"] == img.layer_digests
    assert info["Architecture"] == img.architecture
    assert info["Os"] == "linux"
    assert info["Labels"] == {"org.skyreg.test.marker": "skopeo-oci"}

    # The manifest went in unchanged: --raw gives back the very bytes we built.
    raw = skopeo.inspect(ref, "--raw").out
    assert raw == img.manifest
    assert sha256(raw) == img.manifest_digest
    assert skopeo.inspect(ref, "--config", "--raw").out == img.config

    # And plain HTTP agrees, by tag and by digest.
    for reference in ("v1", img.manifest_digest):
        status, headers, body = get_manifest_http(reg.url, "skopeo/oci", reference)
        assert status == 200, registry_log(reg)
        assert body == img.manifest
        assert headers["Docker-Content-Digest"] == img.manifest_digest
        assert headers["Content-Type"] == OCI_MANIFEST


def test_copy_docker_archive_in(
    skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("skopeo-archive")
    archive = img.write_docker_archive(tmp_path / "image.tar", ["skyreg-test/archive:v1"])
    ref = f"docker://{reg.host}/skopeo/archive:v1"

    skopeo.copy(f"docker-archive:{archive}", ref)

    # skopeo compresses the archive's plain layer tars itself, so the layer digests are
    # its own; the config (so the image ID) arrives byte for byte, and each layer blob
    # unpacks to the diff_id the config names.
    digest, manifest = assert_image_in_registry(reg.url, "skopeo/archive", "v1", img)
    raw = skopeo.inspect(ref, "--raw").out
    assert sha256(raw) == digest
    info = skopeo.inspect(ref).json()
    assert info["Digest"] == digest
    assert info["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert info["Labels"] == {"org.skyreg.test.marker": "skopeo-archive"}


def test_list_tags(skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path) -> None:
    reg = shared_registry
    img = build_image("skopeo-tags")
    layout = img.write_oci_layout(tmp_path / "layout", "src")
    repo = f"{reg.host}/skopeo/tags"
    tags = ["v1", "v1.1", "latest", "release-2024_01"]
    skopeo.copy(f"oci:{layout}:src", f"docker://{repo}:v1", PRESERVE)
    for tag in tags[1:]:
        # Registry-to-registry copies: the blobs are there already, only the manifest
        # is put again under another tag.
        skopeo.copy(f"docker://{repo}:v1", f"docker://{repo}:{tag}", PRESERVE)

    listed = skopeo.skopeo("list-tags", "--tls-verify=false", f"docker://{repo}").json()
    assert listed["Repository"] == repo
    assert sorted(listed["Tags"]) == sorted(tags), registry_log(reg)
    for tag in tags:
        assert skopeo.inspect(f"docker://{repo}:{tag}").json()["Digest"] == img.manifest_digest


def test_copy_out_to_dir_matches_source(
    skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("skopeo-dir")
    layout = img.write_oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{reg.host}/skopeo/dir:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, PRESERVE)

    out = tmp_path / "out"
    skopeo.copy(ref, f"dir:{out}", PRESERVE)

    assert (out / "manifest.json").read_bytes() == img.manifest
    want = {d.removeprefix("sha256:"): data for d, data in img.blobs().items()}
    del want[img.manifest_digest.removeprefix("sha256:")]
    got = {
        p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("manifest.json", "version")
    }
    assert set(got) == set(want)
    for name, data in got.items():
        assert hashlib.sha256(data).hexdigest() == name
        assert data == want[name]
    # And the layers hold what the image is made of.
    files = {}
    for layer in json.loads((out / "manifest.json").read_bytes())["layers"]:
        blob = (out / layer["digest"].removeprefix("sha256:")).read_bytes()
        files.update(read_layer_files(gzip.decompress(blob)))
    assert files["etc/skyreg-test.txt"] == img.marker_text
    assert files["bin/sh"] == "-> busybox"
    assert files["bin/busybox"] == BUSYBOX.read_bytes()


def test_copy_multi_arch_index(
    skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    host, other = build_platform_pair("skopeo-multi")
    layout = write_oci_layout(tmp_path / "layout", [], indexes=[("multi", [host, other])])
    ref = f"docker://{reg.host}/skopeo/multi:v1"

    skopeo.copy(f"oci:{layout}:multi", ref, "--all", PRESERVE)

    raw = skopeo.inspect(ref, "--raw").out
    assert raw == build_index([host, other])
    status, headers, body = get_manifest_http(reg.url, "skopeo/multi", "v1")
    assert status == 200, registry_log(reg)
    assert headers["Content-Type"] == OCI_INDEX
    assert headers["Docker-Content-Digest"] == sha256(raw)
    assert body == raw
    # Each platform resolves to its own manifest.
    for img in (host, other):
        info = skopeo.skopeo(
            "--override-arch", img.architecture, "inspect", "--tls-verify=false", ref
        ).json()
        assert info["Architecture"] == img.architecture
        assert info["Layers"] == img.layer_digests
        status, _, body = get_manifest_http(reg.url, "skopeo/multi", img.manifest_digest)
        assert status == 200, registry_log(reg)
        assert body == img.manifest


def test_delete_then_inspect_fails(
    skopeo: Skopeo, shared_registry: ServedRegistry, tmp_path: Path
) -> None:
    reg = shared_registry
    img = build_image("skopeo-delete")
    keep = build_image("skopeo-delete-keep")
    layout = write_oci_layout(tmp_path / "layout", [("gone", img), ("kept", keep)])
    repo = f"{reg.host}/skopeo/delete"
    for tag in ("gone", "kept"):
        skopeo.copy(f"oci:{layout}:{tag}", f"docker://{repo}:{tag}", PRESERVE)

    skopeo.skopeo("delete", "--tls-verify=false", f"docker://{repo}:gone")

    res = skopeo.inspect(f"docker://{repo}:gone", check=False)
    assert res.returncode != 0, res.describe()
    assert "manifest unknown" in res.stderr.lower(), res.describe()
    status, _, body = get_manifest_http(reg.url, "skopeo/delete", img.manifest_digest)
    assert status == 404, registry_log(reg)
    assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # The other tag in the same repository is untouched.
    assert skopeo.inspect(f"docker://{repo}:kept").json()["Digest"] == keep.manifest_digest
    listed = skopeo.skopeo("list-tags", "--tls-verify=false", f"docker://{repo}").json()
    assert listed["Tags"] == ["kept"]


def test_survives_registry_restart(
    skopeo: Skopeo, registry: RunningRegistry, tmp_path: Path
) -> None:
    """What skopeo pushed is still served, byte for byte, after skyreg restarts."""
    img = build_image("skopeo-restart")
    layout = img.write_oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{registry.host}/skopeo/restart:v1"
    skopeo.copy(f"oci:{layout}:v1", ref, PRESERVE)

    registry.restart()

    assert skopeo.inspect(ref, "--raw").out == img.manifest, registry_log(registry)
    out = tmp_path / "out"
    skopeo.copy(ref, f"dir:{out}", PRESERVE)
    for layer in img.layers:
        assert (out / layer.digest.removeprefix("sha256:")).read_bytes() == layer.gz
    listed = skopeo.skopeo(
        "list-tags", "--tls-verify=false", f"docker://{registry.host}/skopeo/restart"
    )
    assert listed.json()["Tags"] == ["v1"]
