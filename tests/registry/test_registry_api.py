"""The distribution API over HTTP against a running `skyreg serve` (spec behaviour, errors)."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import requests

from tests.support.oci import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    error_codes,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.servers import RunningRegistry, ServedRegistry


@pytest.fixture
def base(shared_registry: ServedRegistry) -> str:
    return shared_registry.url


@pytest.fixture
def repo() -> str:
    return f"test/{uuid.uuid4().hex[:12]}"


def _start(base: str, repo: str) -> str:
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == "0-0"
    assert r.headers["Docker-Upload-UUID"]
    return base + r.headers["Location"]


# -- base and errors ---------------------------------------------------------------------------


def test_base_endpoint_announces_registry_v2(base: str) -> None:
    r = requests.get(f"{base}/v2/")
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert r.json() == {}


@pytest.mark.parametrize("name", ["UPPER/case", "a//b", "-lead", "trail-", "x" * 256, "a..b"])
def test_malformed_repository_name_is_name_invalid(base: str, name: str) -> None:
    r = requests.get(f"{base}/v2/{name}/tags/list")
    assert r.status_code == 400
    assert error_codes(r) == ["NAME_INVALID"]


def test_unsupported_method_is_405_with_spec_error(base: str, repo: str) -> None:
    r = requests.post(f"{base}/v2/{repo}/tags/list")
    assert r.status_code == 405
    assert error_codes(r) == ["UNSUPPORTED"]


def test_unknown_endpoint_is_404_json(base: str) -> None:
    r = requests.get(f"{base}/v2/a/b/nothing-here")
    assert r.status_code == 404
    assert r.json()["errors"]


# -- blob push ---------------------------------------------------------------------------------


def test_monolithic_post_with_digest_stores_blob(base: str, repo: str) -> None:
    data = os.urandom(70_000)
    digest = push_blob(base, repo, data)
    r = requests.get(f"{base}/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["Docker-Content-Digest"] == digest
    h = requests.head(f"{base}/v2/{repo}/blobs/{digest}")
    assert h.status_code == 200
    assert h.headers["Content-Length"] == str(len(data))
    assert h.content == b""


def test_post_then_put_monolithic_upload(base: str, repo: str) -> None:
    data = os.urandom(5000)
    loc = _start(base, repo)
    r = requests.put(
        loc,
        params={"digest": sha256(data)},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == f"/v2/{repo}/blobs/{sha256(data)}"
    assert requests.get(f"{base}/v2/{repo}/blobs/{sha256(data)}").content == data


def test_chunked_upload_with_status_and_trailing_put(base: str, repo: str) -> None:
    data = os.urandom(3 * 100_000 + 17)
    loc = _start(base, repo)
    offset = 0
    for size in (100_000, 100_000, 100_000):
        chunk = data[offset : offset + size]
        r = requests.patch(
            loc,
            data=chunk,
            headers={
                "Content-Range": f"{offset}-{offset + size - 1}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code == 202, r.text
        offset += size
        assert r.headers["Range"] == f"0-{offset - 1}"
        loc = base + r.headers["Location"]
    status = requests.get(loc)
    assert status.status_code == 204
    assert status.headers["Range"] == f"0-{offset - 1}"
    r = requests.put(
        loc,
        params={"digest": sha256(data)},
        data=data[offset:],
        headers={
            "Content-Range": f"{offset}-{len(data) - 1}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 201, r.text
    assert requests.get(f"{base}/v2/{repo}/blobs/{sha256(data)}").content == data


def test_streamed_patch_without_content_range_appends(base: str, repo: str) -> None:
    data = os.urandom(40_000)
    loc = _start(base, repo)
    r = requests.patch(loc, data=iter([data[:10_000], data[10_000:]]))  # chunked encoding
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == f"0-{len(data) - 1}"
    r = requests.put(base + r.headers["Location"], params={"digest": sha256(data)})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("start", [5, 0])
def test_out_of_order_or_overlapping_chunk_is_416(base: str, repo: str, start: int) -> None:
    loc = _start(base, repo)
    r = requests.patch(loc, data=b"a" * 10, headers={"Content-Range": "0-9"})
    assert r.status_code == 202
    bad = requests.patch(
        loc,
        data=b"b" * 10,
        headers={"Content-Range": f"{start + 20}-{start + 29}" if start else "0-9"},
    )
    assert bad.status_code == 416
    assert bad.headers["Range"] == "0-9"
    assert requests.get(loc).headers["Range"] == "0-9"


def test_wrong_digest_on_finish_is_digest_invalid_and_stores_nothing(base: str, repo: str) -> None:
    data = b"real bytes"
    wrong = sha256(b"other bytes")
    loc = _start(base, repo)
    r = requests.put(loc, params={"digest": wrong}, data=data)
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]
    assert requests.head(f"{base}/v2/{repo}/blobs/{wrong}").status_code == 404
    assert requests.head(f"{base}/v2/{repo}/blobs/{sha256(data)}").status_code == 404


@pytest.mark.parametrize(
    "digest", ["sha256:abc", "md5:" + "0" * 32, "nonsense", "sha256:" + "G" * 64]
)
def test_malformed_digest_is_digest_invalid(base: str, repo: str, digest: str) -> None:
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", params={"digest": digest}, data=b"x")
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]
    assert requests.get(f"{base}/v2/{repo}/blobs/{digest}").status_code in (400, 404)


def test_put_without_digest_is_rejected(base: str, repo: str) -> None:
    loc = _start(base, repo)
    r = requests.put(loc, data=b"abc")
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]


def test_cancelled_upload_is_gone(base: str, repo: str) -> None:
    loc = _start(base, repo)
    assert requests.delete(loc).status_code == 204
    r = requests.get(loc)
    assert r.status_code == 404
    assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"]


def test_upload_of_another_repository_is_unknown(base: str, repo: str) -> None:
    loc = _start(base, repo)
    other = loc.replace(f"/v2/{repo}/", "/v2/other/repo/")
    r = requests.patch(other, data=b"abc")
    assert r.status_code == 404
    assert error_codes(r) == ["BLOB_UPLOAD_UNKNOWN"]


# -- blob pull ---------------------------------------------------------------------------------


def test_range_request_returns_206_with_exact_bytes(base: str, repo: str) -> None:
    data = os.urandom(10_000)
    digest = push_blob(base, repo, data)
    r = requests.get(f"{base}/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206
    assert r.content == data[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    r = requests.get(f"{base}/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-10"})
    assert r.status_code == 206
    assert r.content == data[-10:]


@pytest.mark.parametrize("header", ["bytes=10000-", "bytes=20000-30000", "bytes=5-2", "pages=1-2"])
def test_unsatisfiable_range_is_416(base: str, repo: str, header: str) -> None:
    digest = push_blob(base, repo, os.urandom(10_000))
    r = requests.get(f"{base}/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == "bytes */10000"


def test_blob_of_another_repository_is_unknown(base: str, repo: str) -> None:
    digest = push_blob(base, repo, os.urandom(100))
    r = requests.get(f"{base}/v2/{repo}-other/blobs/{digest}")
    assert r.status_code == 404
    assert error_codes(r) == ["BLOB_UNKNOWN"]


def test_delete_blob(base: str, repo: str) -> None:
    digest = push_blob(base, repo, os.urandom(100))
    assert requests.delete(f"{base}/v2/{repo}/blobs/{digest}").status_code == 202
    r = requests.get(f"{base}/v2/{repo}/blobs/{digest}")
    assert r.status_code == 404
    assert error_codes(r) == ["BLOB_UNKNOWN"]
    assert requests.delete(f"{base}/v2/{repo}/blobs/{digest}").status_code == 404


# -- mount -------------------------------------------------------------------------------------


def test_cross_repository_mount_is_201_when_source_has_blob(base: str, repo: str) -> None:
    data = os.urandom(500)
    digest = push_blob(base, repo, data)
    target = repo + "-mounted"
    r = requests.post(f"{base}/v2/{target}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert r.status_code == 201
    assert r.headers["Location"] == f"/v2/{target}/blobs/{digest}"
    assert requests.get(f"{base}/v2/{target}/blobs/{digest}").content == data


def test_mount_from_repository_without_blob_starts_upload(base: str, repo: str) -> None:
    digest = sha256(os.urandom(50))
    r = requests.post(f"{base}/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": "nope"})
    assert r.status_code == 202
    assert "/blobs/uploads/" in r.headers["Location"]


def test_mount_without_from_uses_blob_already_present(base: str, repo: str) -> None:
    digest = push_blob(base, repo, os.urandom(500))
    r = requests.post(f"{base}/v2/{repo}-auto/blobs/uploads/", params={"mount": digest})
    assert r.status_code == 201


# -- manifests ---------------------------------------------------------------------------------


def test_manifest_round_trip_keeps_exact_bytes(base: str, repo: str) -> None:
    img = push_image(base, repo, "v1")
    for ref in ("v1", img.digest):
        r = requests.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200
        assert r.content == img.manifest
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == img.digest
        assert r.headers["ETag"] == f'"{img.digest}"'
    h = requests.head(f"{base}/v2/{repo}/manifests/v1")
    assert h.status_code == 200
    assert h.headers["Content-Length"] == str(len(img.manifest))
    assert h.headers["Docker-Content-Digest"] == img.digest


def test_manifest_accept_negotiation(base: str, repo: str) -> None:
    push_image(base, repo, "v1")
    r = requests.get(f"{base}/v2/{repo}/manifests/v1", headers={"Accept": DOCKER_MANIFEST})
    assert r.status_code == 404
    assert error_codes(r) == ["MANIFEST_UNKNOWN"]
    r = requests.get(
        f"{base}/v2/{repo}/manifests/v1",
        headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5"},
    )
    assert r.status_code == 200
    assert requests.get(f"{base}/v2/{repo}/manifests/v1", headers={"Accept": "*/*"}).ok


def test_docker_schema2_manifest_keeps_its_content_type(base: str, repo: str) -> None:
    config, layer = os.urandom(64), os.urandom(128)
    push_blob(base, repo, config)
    push_blob(base, repo, layer)
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": descriptor("application/vnd.docker.container.image.v1+json", config),
            "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", layer)],
        }
    ).encode()
    assert put_manifest(base, repo, "d", body, DOCKER_MANIFEST).status_code == 201
    r = requests.get(f"{base}/v2/{repo}/manifests/d", headers={"Accept": DOCKER_MANIFEST})
    assert r.headers["Content-Type"] == DOCKER_MANIFEST
    assert r.content == body


def test_manifest_with_missing_blob_is_manifest_blob_unknown(base: str, repo: str) -> None:
    config = os.urandom(64)
    push_blob(base, repo, config)
    body = image_manifest(config, [os.urandom(32)])
    r = put_manifest(base, repo, "broken", body)
    assert r.status_code == 400
    assert error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    assert requests.get(f"{base}/v2/{repo}/manifests/broken").status_code == 404
    assert requests.get(f"{base}/v2/{repo}/manifests/{sha256(body)}").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"schemaVersion": 1}',
        b'{"schemaVersion": 2, "layers": []}',
        b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "bad", "size": 1}}',
        b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:'
        + b"a" * 64
        + b'", "size": -1}}',
    ],
)
def test_malformed_manifest_is_manifest_invalid(base: str, repo: str, body: bytes) -> None:
    r = put_manifest(base, repo, "bad", body)
    assert r.status_code == 400
    assert error_codes(r) == ["MANIFEST_INVALID"]
    assert requests.get(f"{base}/v2/{repo}/manifests/bad").status_code == 404


def test_manifest_media_type_must_match_content_type(base: str, repo: str) -> None:
    img = push_image(base, repo)
    r = put_manifest(base, repo, "t", img.manifest, DOCKER_MANIFEST)
    assert r.status_code == 400
    assert error_codes(r) == ["MANIFEST_INVALID"]


def test_oversized_manifest_is_413(base: str, repo: str) -> None:
    body = b'{"schemaVersion": 2, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    r = put_manifest(base, repo, "huge", body)
    assert r.status_code == 413
    assert error_codes(r) == ["SIZE_INVALID"]


def test_push_by_mismatched_digest_is_digest_invalid(base: str, repo: str) -> None:
    img = push_image(base, repo)
    r = put_manifest(base, repo, sha256(b"something else"), img.manifest)
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]


def test_push_by_digest_with_tag_parameters(base: str, repo: str) -> None:
    img = push_image(base, repo)
    r = requests.put(
        f"{base}/v2/{repo}/manifests/{img.digest}",
        params=[("tag", "a"), ("tag", "b")],
        data=img.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201
    assert r.headers["OCI-Tag"] == "a, b"
    assert requests.get(f"{base}/v2/{repo}/tags/list").json()["tags"] == ["a", "b"]


def test_invalid_tag_is_rejected(base: str, repo: str) -> None:
    img = push_image(base, repo)
    r = put_manifest(base, repo, "-bad", img.manifest)
    assert r.status_code == 400
    assert error_codes(r) == ["TAG_INVALID"]


def test_index_requires_its_manifests(base: str, repo: str) -> None:
    a = push_image(base, repo, arch="amd64")
    b_manifest = image_manifest(a.config, a.layers, annotations={"x": "y"})
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(
                    OCI_MANIFEST, a.manifest, platform={"os": "linux", "architecture": "amd64"}
                ),
                descriptor(
                    OCI_MANIFEST, b_manifest, platform={"os": "linux", "architecture": "arm64"}
                ),
            ],
        }
    ).encode()
    r = put_manifest(base, repo, "multi", index, OCI_INDEX)
    assert r.status_code == 400
    assert error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"]
    assert put_manifest(base, repo, sha256(b_manifest), b_manifest).status_code == 201
    assert put_manifest(base, repo, "multi", index, OCI_INDEX).status_code == 201
    r = requests.get(f"{base}/v2/{repo}/manifests/multi", headers={"Accept": OCI_INDEX})
    assert r.headers["Content-Type"] == OCI_INDEX
    assert r.content == index


def test_unknown_manifest_is_404(base: str, repo: str) -> None:
    for ref in ("nope", sha256(b"nope")):
        r = requests.get(f"{base}/v2/{repo}/manifests/{ref}")
        assert r.status_code == 404
        assert error_codes(r) == ["MANIFEST_UNKNOWN"]


# -- discovery ---------------------------------------------------------------------------------


def test_tags_list_paginates_with_link_header(base: str, repo: str) -> None:
    img = push_image(base, repo)
    names = sorted(f"t{i:02d}" for i in range(7))
    for t in names:
        assert put_manifest(base, repo, t, img.manifest).status_code == 201
    assert requests.get(f"{base}/v2/{repo}/tags/list").json() == {"name": repo, "tags": names}
    seen: list[str] = []
    url = f"{base}/v2/{repo}/tags/list?n=3"
    while url:
        r = requests.get(url)
        assert r.status_code == 200
        page = r.json()["tags"]
        assert len(page) <= 3
        seen += page
        link = r.headers.get("Link")
        url = base + link.split(";")[0].strip("<>") if link else ""
    assert seen == names
    assert requests.get(f"{base}/v2/{repo}/tags/list?n=0").json()["tags"] == []
    last = requests.get(f"{base}/v2/{repo}/tags/list", params={"last": "t04"}).json()["tags"]
    assert last == ["t05", "t06"]


def test_tags_list_of_unknown_repository_is_name_unknown(base: str, repo: str) -> None:
    r = requests.get(f"{base}/v2/{repo}/tags/list")
    assert r.status_code == 404
    assert error_codes(r) == ["NAME_UNKNOWN"]


def test_invalid_page_size_is_rejected(base: str, repo: str) -> None:
    push_image(base, repo, "x")
    r = requests.get(f"{base}/v2/{repo}/tags/list?n=abc")
    assert r.status_code == 400
    assert error_codes(r) == ["PAGINATION_NUMBER_INVALID"]


def test_catalog_lists_repositories_with_pagination(base: str) -> None:
    prefix = f"cat{uuid.uuid4().hex[:8]}"
    repos = [f"{prefix}/r{i}" for i in range(3)]
    for r in repos:
        push_image(base, r, "latest")
    all_repos = requests.get(f"{base}/v2/_catalog").json()["repositories"]
    assert [r for r in all_repos if r.startswith(prefix)] == repos
    r = requests.get(f"{base}/v2/_catalog", params={"n": 1, "last": repos[0]})
    assert r.json()["repositories"] == [repos[1]]
    assert 'rel="next"' in r.headers["Link"]


# -- content management ------------------------------------------------------------------------


def test_delete_tag_removes_only_that_tag(base: str, repo: str) -> None:
    img = push_image(base, repo, "a")
    assert put_manifest(base, repo, "b", img.manifest).status_code == 201
    assert requests.delete(f"{base}/v2/{repo}/manifests/a").status_code == 202
    assert requests.get(f"{base}/v2/{repo}/manifests/a").status_code == 404
    assert requests.get(f"{base}/v2/{repo}/manifests/b").content == img.manifest
    assert requests.get(f"{base}/v2/{repo}/manifests/{img.digest}").status_code == 200


def test_delete_manifest_by_digest_leaves_no_dangling_tag(base: str, repo: str) -> None:
    img = push_image(base, repo, "a")
    other = push_image(base, repo, "keep")
    assert requests.delete(f"{base}/v2/{repo}/manifests/{img.digest}").status_code == 202
    assert requests.get(f"{base}/v2/{repo}/manifests/{img.digest}").status_code == 404
    assert requests.get(f"{base}/v2/{repo}/manifests/a").status_code == 404
    assert requests.get(f"{base}/v2/{repo}/tags/list").json()["tags"] == ["keep"]
    assert requests.get(f"{base}/v2/{repo}/manifests/keep").content == other.manifest
    assert requests.delete(f"{base}/v2/{repo}/manifests/{img.digest}").status_code == 404


# -- OCI 1.1 referrers ---------------------------------------------------------------------------


def test_referrers_list_manifests_with_subject(base: str, repo: str) -> None:
    img = push_image(base, repo, "v1")
    empty = b"{}"
    push_blob(base, repo, empty)
    subject = descriptor(OCI_MANIFEST, img.manifest)
    referrers = {}
    for kind in ("application/vnd.example.sbom", "application/vnd.example.signature"):
        payload = os.urandom(40)
        push_blob(base, repo, payload)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": kind,
                "config": descriptor("application/vnd.oci.empty.v1+json", empty),
                "layers": [descriptor("application/octet-stream", payload)],
                "subject": subject,
                "annotations": {"kind": kind},
            }
        ).encode()
        r = put_manifest(base, repo, sha256(body), body)
        assert r.status_code == 201, r.text
        assert r.headers["OCI-Subject"] == img.digest
        referrers[kind] = sha256(body)
    r = requests.get(f"{base}/v2/{repo}/referrers/{img.digest}")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    doc = r.json()
    assert doc["mediaType"] == OCI_INDEX
    assert {m["digest"]: m["artifactType"] for m in doc["manifests"]} == {
        d: k for k, d in referrers.items()
    }
    assert all(m["annotations"]["kind"] == m["artifactType"] for m in doc["manifests"])
    sig = "application/vnd.example.signature"
    r = requests.get(f"{base}/v2/{repo}/referrers/{img.digest}", params={"artifactType": sig})
    assert r.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in r.json()["manifests"]] == [referrers[sig]]


def test_referrers_of_unknown_digest_is_empty_index(base: str, repo: str) -> None:
    r = requests.get(f"{base}/v2/{repo}/referrers/{sha256(b'nothing')}")
    assert r.status_code == 200
    assert r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    bad = requests.get(f"{base}/v2/{repo}/referrers/sha256:nothex")
    assert bad.status_code == 400
    assert error_codes(bad) == ["DIGEST_INVALID"]


# -- durability --------------------------------------------------------------------------------


def test_upload_survives_restart_and_resumes(registry: RunningRegistry) -> None:
    base, repo = registry.url, "resume/me"
    data = os.urandom(300_000)
    loc = _start(base, repo)
    r = requests.patch(loc, data=data[:200_000], headers={"Content-Range": "0-199999"})
    assert r.status_code == 202
    registry.restart()
    loc = loc.replace(loc.split("/v2/")[0], registry.url)
    status = requests.get(loc)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-199999"
    r = requests.patch(
        loc, data=data[200_000:], headers={"Content-Range": f"200000-{len(data) - 1}"}
    )
    assert r.status_code == 202
    r = requests.put(loc, params={"digest": sha256(data)})
    assert r.status_code == 201, r.text
    assert requests.get(f"{registry.url}/v2/{repo}/blobs/{sha256(data)}").content == data


def test_abandoned_upload_expires(tmp_path: object) -> None:
    from pathlib import Path

    reg = RunningRegistry(
        data_dir=Path(str(tmp_path)) / "data",
        extra_args=["--no-auth", "--upload-ttl", "0.5", "--expiry-interval", "0.2"],
    )
    reg.start()
    try:
        loc = _start(reg.url, "exp/ire")
        upload_id = loc.rsplit("/", 1)[1]
        upload_file = reg.data_dir / "uploads" / upload_id
        assert upload_file.exists()
        assert wait_for(lambda: requests.get(loc).status_code == 404, timeout=20)
        assert not upload_file.exists()
        # The worker logs the expiry just after it deletes the session the 404 reports.
        assert wait_for(lambda: f"expired abandoned upload {upload_id}" in reg.log(), timeout=20)
        orphan = reg.data_dir / "uploads" / "put-leftover-from-a-crash"
        orphan.write_bytes(b"partial")
        assert wait_for(lambda: not orphan.exists(), timeout=20)
        assert "removed orphaned upload bytes put-leftover-from-a-crash" in reg.log()
    finally:
        reg.stop()


def wait_for(predicate: object, timeout: float) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False
