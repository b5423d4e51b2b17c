"""The OCI distribution-spec conformance workflows (pull, push, discovery, management).

Each test replays, against a running `skyreg serve`, the requests that the upstream Go
conformance suite (opencontainers/distribution-spec, conformance/) sends and checks what it
accepts. Bodies are built the way the suite builds them: tab-indented JSON, descriptors that
carry an unknown `newUnspecifiedField`, a config descriptor with embedded `data`, artifacts with
a `subject`, an empty `{}` config and an `artifactType`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support.oci import OCI_CONFIG, OCI_EMPTY, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, sha256
from tests.support.servers import ServedRegistry

OCTET = "application/octet-stream"
EMPTY_JSON = b"{}"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
EMPTY_DIGEST = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ANNOTATION = "org.opencontainers.conformance.test"
TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
TYPE_INDEX = "application/vnd.food.stand"
REF_BLOB_A = b"NHL Peanut Butter on my NHL bagel"
REF_BLOB_B = b"NBA Strawberry Jam on my NBA croissant"
# the suite's gzipped tarball holding one text file
LAYER = base64.b64decode(
    "H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
    "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
    "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA"
)
ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "MANIFEST_UNVERIFIED",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "TAG_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
}


# -- building the suite's content ---------------------------------------------------------------


def tabbed(doc: dict[str, Any]) -> bytes:
    """JSON the way Go's MarshalIndent(v, "", "\\t") lays it out."""
    return json.dumps(doc, indent="\t").encode()


def desc(media_type: str, content: bytes, /, **extra: Any) -> dict[str, Any]:
    """A descriptor with the suite's always-present unknown field (null when unset)."""
    return {
        "mediaType": media_type,
        "digest": sha256(content),
        "size": len(content),
        **extra,
        "newUnspecifiedField": extra.get("newUnspecifiedField"),
    }


def image_config() -> bytes:
    """A config with a random author, so every workflow gets its own digest."""
    return tabbed(
        {
            "author": uuid.uuid4().hex[:16],
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    )


def config_desc(config: bytes) -> dict[str, Any]:
    """The suite's config descriptor: embedded `data` and an unknown field with content."""
    return desc(
        OCI_CONFIG,
        config,
        data=base64.b64encode(config).decode(),
        newUnspecifiedField=base64.b64encode(b"hello world").decode(),
    )


def image_manifest(config: bytes, *, with_media_type: bool = True, layers: bool = True) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2}
    if with_media_type:
        doc["mediaType"] = OCI_MANIFEST
    doc["config"] = config_desc(config)
    doc["layers"] = [desc(OCI_LAYER, LAYER)] if layers else []
    return tabbed(doc)


def error_codes(resp: requests.Response) -> list[str]:
    return [e["code"] for e in resp.json()["errors"]]


# -- talking to the registry --------------------------------------------------------------------


class Client:
    """Requests against one repository, in the shapes the conformance suite sends."""

    def __init__(self, base: str, repo: str) -> None:
        self.base = base
        self.repo = repo

    def url(self, path: str) -> str:
        return f"{self.base}/v2/{self.repo}/{path}"

    def abs(self, location: str) -> str:
        assert location, "no Location header"
        return location if location.startswith("http") else self.base + location

    def start_upload(self, **headers: str) -> str:
        r = requests.post(self.url("blobs/uploads/"), headers=headers)
        assert r.status_code == 202, r.text
        assert r.headers["Location"].startswith(f"/v2/{self.repo}/blobs/uploads/")
        return self.abs(r.headers["Location"])

    def push_blob(self, data: bytes) -> requests.Response:
        """The suite's setup: bare POST, then PUT ?digest= with Content-Type/Length and body."""
        loc = self.start_upload()
        r = requests.put(
            loc,
            params={"digest": sha256(data)},
            data=data,
            headers={"Content-Type": OCTET, "Content-Length": str(len(data))},
        )
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == sha256(data)
        return r

    def put_manifest(
        self, ref: str, body: bytes, media_type: str = OCI_MANIFEST
    ) -> requests.Response:
        return requests.put(
            self.url(f"manifests/{ref}"), data=body, headers={"Content-Type": media_type}
        )

    def get_manifest(self, ref: str, method: str = "GET") -> requests.Response:
        return requests.request(
            method, self.url(f"manifests/{ref}"), headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
        )

    def tags(self, **params: Any) -> requests.Response:
        return requests.get(self.url("tags/list"), params=params)

    def referrers(self, digest: str, **params: str) -> requests.Response:
        return requests.get(self.url(f"referrers/{digest}"), params=params)


@pytest.fixture
def base(shared_registry: ServedRegistry) -> str:
    return shared_registry.url


@pytest.fixture
def client(base: str) -> Client:
    return Client(base, f"conformance/{uuid.uuid4().hex[:12]}")


def assert_blob(client: Client, data: bytes, url: str | None = None) -> None:
    """GET returns the exact bytes and length; HEAD returns the length and an empty body."""
    digest = sha256(data)
    url = url or client.url(f"blobs/{digest}")
    g = requests.get(url)
    assert g.status_code == 200, g.text
    assert g.content == data
    assert g.headers["Content-Length"] == str(len(data))
    assert g.headers.get("Docker-Content-Digest", digest) == digest
    h = requests.head(url)
    assert h.status_code == 200
    assert h.content == b""
    assert h.headers["Content-Length"] == str(len(data))
    assert h.headers.get("Docker-Content-Digest", digest) == digest


def assert_manifest(client: Client, ref: str, body: bytes, media_type: str) -> None:
    """GET/HEAD by `ref` as the suite checks them: status, type, length, bytes, digest."""
    g = client.get_manifest(ref)
    assert g.status_code == 200, g.text
    assert g.content == body
    assert g.headers["Content-Type"] == media_type
    assert g.headers["Content-Length"] == str(len(body))
    assert g.headers.get("Docker-Content-Digest", sha256(body)) == sha256(body)
    h = client.get_manifest(ref, "HEAD")
    assert h.status_code == 200
    assert h.content == b""
    assert h.headers["Content-Type"] == media_type
    assert h.headers["Content-Length"] == str(len(body))
    assert h.headers.get("Docker-Content-Digest", sha256(body)) == sha256(body)


def assert_put_created(client: Client, r: requests.Response, body: bytes, media_type: str) -> None:
    """201 with a Location that serves the manifest back (v2 suite's ManifestPut check)."""
    assert r.status_code == 201, r.text
    assert r.headers.get("Docker-Content-Digest", sha256(body)) == sha256(body)
    g = requests.get(client.abs(r.headers["Location"]), headers={"Accept": media_type})
    assert g.status_code == 200
    assert g.content == body
    assert g.headers["Content-Type"] == media_type
    assert g.headers["Content-Length"] == str(len(body))


# -- ping and empty repository ------------------------------------------------------------------


def test_ping_v2_base_is_200(base: str) -> None:
    r = requests.get(f"{base}/v2/")
    assert r.status_code == 200
    assert r.json() == {}


def test_empty_repository_tag_list_is_200_or_404(client: Client) -> None:
    r = client.tags()
    assert r.status_code in (200, 404)
    if r.status_code == 200:
        assert r.json()["tags"] == []
    else:
        assert set(error_codes(r)) <= ERROR_CODES


def test_empty_repository_referrers_is_empty_oci_index(client: Client) -> None:
    r = client.referrers(sha256(os.urandom(16)))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    doc = r.json()
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == OCI_INDEX
    assert doc["manifests"] == []


# -- pull workflow ------------------------------------------------------------------------------


def test_pull_setup_blobs_then_head_and_get_them(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        r = client.push_blob(data)
        assert r.headers["Location"] == f"/v2/{client.repo}/blobs/{sha256(data)}"
        assert_blob(client, data)


def test_missing_blob_head_and_get_are_404(client: Client) -> None:
    client.push_blob(LAYER)  # the repository exists, the blob does not
    dummy = sha256(b"hello world")
    h = requests.head(client.url(f"blobs/{dummy}"))
    assert h.status_code == 404
    assert h.content == b""
    g = requests.get(client.url(f"blobs/{dummy}"))
    assert g.status_code == 404
    assert error_codes(g) == ["BLOB_UNKNOWN"]


def test_pull_manifests_by_tag_and_digest(client: Client) -> None:
    configs = [image_config(), image_config()]
    for data in (*configs, LAYER):
        client.push_blob(data)
    first, second = (image_manifest(c) for c in configs)
    assert_put_created(client, client.put_manifest("tagtest0", first), first, OCI_MANIFEST)
    assert_put_created(client, client.put_manifest(sha256(second), second), second, OCI_MANIFEST)
    assert_manifest(client, "tagtest0", first, OCI_MANIFEST)
    assert_manifest(client, sha256(first), first, OCI_MANIFEST)
    assert_manifest(client, sha256(second), second, OCI_MANIFEST)
    # the unknown fields and embedded data survive byte for byte
    doc = client.get_manifest("tagtest0").json()
    assert doc["config"]["newUnspecifiedField"] == base64.b64encode(b"hello world").decode()
    assert base64.b64decode(doc["config"]["data"]) == configs[0]
    assert doc["layers"][0]["newUnspecifiedField"] is None


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_nonexistent_manifest_with_invalid_tag_name_is_404(client: Client, method: str) -> None:
    """Pull and push workflows ask for `.INVALID_MANIFEST_NAME` and accept only 404."""
    client.push_blob(LAYER)
    r = client.get_manifest(".INVALID_MANIFEST_NAME", method)
    assert r.status_code == 404, f"{r.status_code} {r.text}"
    if method == "GET":
        assert error_codes(r) == ["MANIFEST_UNKNOWN"]


def test_missing_manifest_by_tag_and_by_digest_is_404(client: Client) -> None:
    client.push_blob(LAYER)
    for ref in (f"missing-{uuid.uuid4().hex[:20]}", sha256(os.urandom(1024))):
        for method in ("HEAD", "GET"):
            r = client.get_manifest(ref, method)
            assert r.status_code == 404
        assert error_codes(client.get_manifest(ref)) == ["MANIFEST_UNKNOWN"]


def test_get_manifest_with_malformed_digest_is_400_with_spec_code_or_404(client: Client) -> None:
    """Pull "Error codes": GET sha256:totallywrong (with a junk body) is 400 or 404."""
    for ref in ("sha256:totallywrong", "sha256:baddigeststring"):
        r = requests.get(
            client.url(f"manifests/{ref}"),
            data=b"blablabla",
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert r.status_code in (400, 404)
        codes = error_codes(r)
        assert codes
        assert codes[0] in ERROR_CODES
        if r.status_code == 400:
            assert codes[0] == "DIGEST_INVALID"


def test_pull_teardown_deletes_are_accepted_and_take_effect(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    assert client.put_manifest("tagtest0", man).status_code == 201
    r = requests.delete(client.url(f"manifests/{sha256(man)}"))
    assert r.status_code == 202
    assert client.get_manifest(sha256(man)).status_code == 404
    assert client.get_manifest("tagtest0").status_code == 404
    for data in (config, LAYER):
        r = requests.delete(client.url(f"blobs/{sha256(data)}"))
        assert r.status_code == 202
        g = requests.get(client.url(f"blobs/{sha256(data)}"))
        assert g.status_code == 404
        assert error_codes(g) == ["BLOB_UNKNOWN"]


# -- push workflow: blob uploads ----------------------------------------------------------------


def test_streamed_patch_without_content_length_then_put_digest(client: Client) -> None:
    """PATCH with a chunked (length-less) body, then PUT ?digest= with Content-Length 0."""
    blob = os.urandom(42)
    loc = client.start_upload(**{"Content-Length": "0"})

    def body() -> Iterator[bytes]:
        yield blob[:10]
        yield blob[10:]

    r = requests.patch(loc, data=body(), headers={"Content-Type": OCTET})
    assert r.status_code == 202, r.text
    assert r.headers["Range"] == "0-41"
    put = requests.put(
        client.abs(r.headers["Location"]),
        params={"digest": sha256(blob)},
        headers={"Content-Type": OCTET, "Content-Length": "0"},
    )
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == sha256(blob)
    assert_blob(client, blob, client.abs(put.headers["Location"]))


def test_streamed_patch_with_body_then_put_without_body(client: Client) -> None:
    blob = os.urandom(42)
    loc = client.start_upload()
    r = requests.patch(loc, data=blob, headers={"Content-Type": OCTET})
    assert r.status_code == 202
    put = requests.put(
        client.abs(r.headers["Location"]),
        params={"digest": sha256(blob)},
        headers={"Content-Type": OCTET},
    )
    assert put.status_code == 201, put.text
    assert put.headers["Location"] == f"/v2/{client.repo}/blobs/{sha256(blob)}"
    assert_blob(client, blob)


def test_post_with_digest_and_body_is_201_or_202(client: Client) -> None:
    config = image_config()
    r = requests.post(
        client.url("blobs/uploads/"),
        params={"digest": sha256(config)},
        data=config,
        headers={"Content-Type": OCTET, "Content-Length": str(len(config))},
    )
    assert r.status_code in (201, 202)
    assert r.headers["Location"]
    if r.status_code == 202:
        assert requests.get(client.url(f"blobs/{sha256(config)}")).status_code == 404
    else:
        assert r.headers["Docker-Content-Digest"] == sha256(config)
        assert_blob(client, config, client.abs(r.headers["Location"]))


def test_post_with_content_length_zero_opens_an_empty_session(client: Client) -> None:
    loc = client.start_upload(**{"Content-Length": "0"})
    r = requests.get(loc)
    assert r.status_code == 204
    assert r.headers["Location"]
    assert r.headers["Range"] == "0-0"
    assert r.content == b""


@pytest.mark.parametrize("content_length", [True, False])
def test_empty_blob_post_then_put(client: Client, content_length: bool) -> None:
    loc = client.start_upload()
    headers = {"Content-Type": OCTET}
    if content_length:
        headers["Content-Length"] = "0"
    r = requests.put(loc, params={"digest": EMPTY_DIGEST}, data=b"", headers=headers)
    assert r.status_code == 201, r.text
    assert r.headers["Docker-Content-Digest"] == EMPTY_DIGEST
    assert_blob(client, b"", client.abs(r.headers["Location"]))


def test_empty_blob_post_only(client: Client) -> None:
    r = requests.post(
        client.url("blobs/uploads/"),
        params={"digest": EMPTY_DIGEST},
        data=b"",
        headers={"Content-Type": OCTET, "Content-Length": "0"},
    )
    assert r.status_code in (201, 202)
    assert r.headers["Location"]
    if r.status_code == 201:
        assert_blob(client, b"", client.abs(r.headers["Location"]))


def test_empty_json_blob_upload_has_the_well_known_digest(client: Client) -> None:
    assert sha256(EMPTY_JSON) == EMPTY_JSON_DIGEST
    client.push_blob(EMPTY_JSON)
    assert_blob(client, EMPTY_JSON)


def test_chunked_upload_sequence_of_the_push_workflow(client: Client) -> None:
    blob = os.urandom(42)
    chunk1, chunk2 = blob[:22], blob[22:]
    # out-of-order first chunk
    loc = client.start_upload(**{"Content-Length": "0"})
    r = requests.patch(
        loc,
        data=chunk2,
        headers={"Content-Type": OCTET, "Content-Range": "22-41"},
    )
    assert r.status_code == 416
    # in-order first chunk
    first = client.start_upload(**{"Content-Length": "0"})
    r = requests.patch(first, data=chunk1, headers={"Content-Type": OCTET, "Content-Range": "0-21"})
    assert r.status_code == 202
    assert r.headers["Range"] == "0-21"
    # retrying the same chunk on the original URL is out of range
    r = requests.patch(first, data=chunk1, headers={"Content-Type": OCTET, "Content-Range": "0-21"})
    assert r.status_code == 416
    # status of the (possibly stale) session URL
    r = requests.get(first)
    assert r.status_code == 204
    assert r.headers["Range"] == "0-21"
    r = requests.patch(
        client.abs(r.headers["Location"]),
        data=chunk2,
        headers={"Content-Type": OCTET, "Content-Range": "22-41", "Content-Length": "20"},
    )
    assert r.status_code == 202
    assert r.headers["Range"] == "0-41"
    put = requests.put(
        client.abs(r.headers["Location"]),
        params={"digest": sha256(blob)},
        headers={"Content-Type": OCTET, "Content-Length": "0"},
    )
    assert put.status_code == 201, put.text
    assert_blob(client, blob, client.abs(put.headers["Location"]))


def test_final_chunk_sent_with_put_and_content_range(client: Client) -> None:
    blob = os.urandom(42)
    loc = client.start_upload(**{"Content-Length": "0"})
    r = requests.patch(
        loc, data=blob[:22], headers={"Content-Type": OCTET, "Content-Range": "0-21"}
    )
    assert r.status_code == 202
    put = requests.put(
        client.abs(r.headers["Location"]),
        params={"digest": sha256(blob)},
        data=blob[22:],
        headers={"Content-Type": OCTET, "Content-Range": "22-41"},
    )
    assert put.status_code == 201, put.text
    assert_blob(client, blob, client.abs(put.headers["Location"]))


def test_out_of_order_put_chunk_is_416_and_status_recovers(client: Client) -> None:
    """v2 suite: an out-of-order chunk (PATCH or final PUT) is 416; GET then gives `0-N`."""
    blob = os.urandom(42)
    loc = client.start_upload(**{"Content-Length": "0"})
    r = requests.put(
        loc,
        params={"digest": sha256(blob)},
        data=blob[22:],
        headers={"Content-Type": OCTET, "Content-Range": "22-41"},
    )
    assert r.status_code == 416
    s = requests.get(loc)
    assert s.status_code == 204
    assert re.fullmatch(r"0-\d+", s.headers["Range"])
    loc = client.abs(s.headers["Location"])
    r = requests.patch(
        loc, data=blob[:22], headers={"Content-Type": OCTET, "Content-Range": "0-21"}
    )
    assert r.status_code == 202
    r = requests.patch(
        client.abs(r.headers["Location"]),
        data=blob[:22],
        headers={"Content-Type": OCTET, "Content-Range": "0-21"},
    )
    assert r.status_code == 416
    s = requests.get(loc)
    assert s.headers["Range"] == "0-21"
    put = requests.put(
        client.abs(s.headers["Location"]),
        params={"digest": sha256(blob)},
        data=blob[22:],
        headers={"Content-Type": OCTET, "Content-Range": "22-41"},
    )
    assert put.status_code == 201
    assert_blob(client, blob)


def test_cancel_upload_is_204_and_session_is_gone(client: Client) -> None:
    loc = client.start_upload()
    r = requests.delete(loc, headers={"Content-Length": "0"})
    assert r.status_code == 204
    g = requests.get(loc)
    assert g.status_code == 404
    assert error_codes(g) == ["BLOB_UPLOAD_UNKNOWN"]


def test_bad_digest_on_upload_is_400(client: Client) -> None:
    blob = os.urandom(512)
    wrong = sha256(blob + b"x")
    loc = client.start_upload()
    r = requests.put(loc, params={"digest": wrong}, data=blob, headers={"Content-Type": OCTET})
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]
    r = requests.post(
        client.url("blobs/uploads/"),
        params={"digest": wrong},
        data=blob,
        headers={"Content-Type": OCTET},
    )
    assert r.status_code in (400, 202)
    assert requests.head(client.url(f"blobs/{wrong}")).status_code == 404


# -- push workflow: cross-repository mount -----------------------------------------------------


def test_cross_mount_sequence_of_the_push_workflow(client: Client, base: str) -> None:
    blob = os.urandom(42)
    client.push_blob(blob)
    target = Client(base, f"conformance-{uuid.uuid4()}")
    # unknown digest and no `from`: a plain upload session
    r = requests.post(target.url("blobs/uploads/"), params={"mount": sha256(b"hello world")})
    assert r.status_code == 202
    assert r.headers["Location"].startswith(f"/v2/{target.repo}/blobs/uploads/")
    # mount from the repository that holds the blob
    r = requests.post(
        target.url("blobs/uploads/"), params={"mount": sha256(blob), "from": client.repo}
    )
    assert r.status_code in (201, 202)
    if r.status_code == 201:
        assert r.headers["Location"] == f"/v2/{target.repo}/blobs/{sha256(blob)}"
        assert r.headers.get("Docker-Content-Digest", sha256(blob)) == sha256(blob)
        assert_blob(target, blob, target.abs(r.headers["Location"]))
    else:
        assert r.headers["Location"].startswith(f"/v2/{target.repo}/blobs/uploads/")


def test_cross_mount_of_blob_missing_in_source_falls_back_to_upload(
    client: Client, base: str
) -> None:
    client.push_blob(LAYER)
    target = Client(base, f"conformance-{uuid.uuid4()}")
    missing = os.urandom(64)
    r = requests.post(
        target.url("blobs/uploads/"), params={"mount": sha256(missing), "from": client.repo}
    )
    assert r.status_code == 202
    put = requests.put(
        target.abs(r.headers["Location"]),
        params={"digest": sha256(missing)},
        data=missing,
        headers={"Content-Type": OCTET, "Content-Length": str(len(missing))},
    )
    assert put.status_code == 201
    assert_blob(target, missing)


# -- push workflow: manifest uploads ------------------------------------------------------------


def test_put_same_manifest_under_four_tags(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    for i in range(4):
        r = client.put_manifest(f"test{i}", man)
        assert_put_created(client, r, man, OCI_MANIFEST)
    assert client.tags().json()["tags"] == ["test0", "test1", "test2", "test3"]
    assert_manifest(client, sha256(man), man, OCI_MANIFEST)


def test_manifest_without_layers_or_media_type_field(client: Client) -> None:
    """The suite's `emptylayer` manifest: no `mediaType` member and `layers: []`."""
    config = image_config()
    client.push_blob(config)
    man = image_manifest(config, with_media_type=False, layers=False)
    r = client.put_manifest("emptylayer", man)
    assert_put_created(client, r, man, OCI_MANIFEST)
    assert_manifest(client, "emptylayer", man, OCI_MANIFEST)
    r = requests.delete(client.url(f"manifests/{sha256(man)}"))
    assert r.status_code == 202


def test_manifest_with_empty_json_layer(client: Client) -> None:
    config = image_config()
    for data in (config, EMPTY_JSON):
        client.push_blob(data)
    man = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc(config),
            "layers": [desc(OCI_EMPTY, EMPTY_JSON)],
        }
    )
    assert_put_created(client, client.put_manifest("emptylayer", man), man, OCI_MANIFEST)


def test_artifact_manifest_with_custom_config_media_type(client: Client) -> None:
    for data in (REF_BLOB_A, LAYER):
        client.push_blob(data)
    man = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(TYPE_A, REF_BLOB_A),
            "layers": [desc(OCI_LAYER, LAYER)],
        }
    )
    assert_put_created(client, client.put_manifest(sha256(man), man), man, OCI_MANIFEST)
    assert_manifest(client, sha256(man), man, OCI_MANIFEST)


def test_artifact_manifest_with_artifact_type_and_empty_config(client: Client) -> None:
    for data in (EMPTY_JSON, REF_BLOB_A):
        client.push_blob(data)
    man = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": TYPE_A,
            "config": desc(OCI_EMPTY, EMPTY_JSON),
            "layers": [desc(TYPE_A, REF_BLOB_A)],
        }
    )
    assert_put_created(client, client.put_manifest(sha256(man), man), man, OCI_MANIFEST)
    assert client.get_manifest(sha256(man)).json()["artifactType"] == TYPE_A


def test_image_index_with_artifact_type_and_nested_index(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    assert client.put_manifest("tagtest0", man).status_code == 201
    index = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": TYPE_INDEX,
            "manifests": [desc(OCI_MANIFEST, man)],
            "annotations": {ANNOTATION: "test index"},
        }
    )
    r = client.put_manifest(sha256(index), index, OCI_INDEX)
    assert_put_created(client, r, index, OCI_INDEX)
    nested = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": TYPE_INDEX,
            "manifests": [desc(OCI_INDEX, index)],
            "annotations": {ANNOTATION: "test index"},
        }
    )
    r = client.put_manifest(sha256(nested), nested, OCI_INDEX)
    assert_put_created(client, r, nested, OCI_INDEX)
    assert_manifest(client, sha256(nested), nested, OCI_INDEX)
    assert client.get_manifest(sha256(nested)).json()["manifests"][0]["digest"] == sha256(index)


def test_manifest_with_dangling_subject_is_accepted_with_oci_subject(client: Client) -> None:
    for data in (EMPTY_JSON, REF_BLOB_B):
        client.push_blob(data)
    never_pushed = image_manifest(image_config())
    man = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": TYPE_B,
            "config": desc(OCI_EMPTY, EMPTY_JSON),
            "layers": [desc(TYPE_B, REF_BLOB_B)],
            "subject": desc(OCI_MANIFEST, never_pushed),
        }
    )
    r = client.put_manifest(sha256(man), man)
    assert_put_created(client, r, man, OCI_MANIFEST)
    # one suite version matches `^[a-f0-9]+:[a-f0-9]+$`, which no `sha256:` digest can satisfy;
    # the digest of the subject is what the spec and the other versions require
    assert re.fullmatch(r"[a-z0-9]+:[a-f0-9]{64}", r.headers["OCI-Subject"])
    assert r.headers["OCI-Subject"] == sha256(never_pushed)


def test_large_manifest_near_4mb_is_accepted(client: Client) -> None:
    """v2 suite's `large-manifest`: 390 annotations of 10 000 bytes (about 3.9 MB)."""
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    annotations = {f"large-annotation-{i}": "A" * 10000 for i in range(390)}
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc(OCI_CONFIG, config),
            "layers": [desc(OCI_LAYER, LAYER)],
            "annotations": annotations,
        }
    ).encode()
    assert 3_900_000 < len(man) < 4 * 1024 * 1024
    r = client.put_manifest("large-manifest", man)
    assert_put_created(client, r, man, OCI_MANIFEST)
    assert_manifest(client, "large-manifest", man, OCI_MANIFEST)


def test_manifest_put_with_bad_digest_reference_is_400(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    for ref, body in (("sha256:baddigeststring", man), ("sha256:totallywrong", b"blablabla")):
        r = client.put_manifest(ref, body)
        assert r.status_code == 400
        assert error_codes(r)[0] in ERROR_CODES
    # content that does not hash to the digest in the URL (trailing whitespace)
    r = client.put_manifest(sha256(man), man + b"  ")
    assert r.status_code == 400
    assert error_codes(r) == ["DIGEST_INVALID"]
    assert client.get_manifest(sha256(man)).status_code == 404
    assert client.get_manifest(sha256(man + b"  ")).status_code == 404


# -- content discovery: tags --------------------------------------------------------------------


@pytest.fixture
def tagged(client: Client) -> Client:
    """Four tags `test0..test3` on one manifest, as the discovery setup pushes them."""
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    for i in range(4):
        assert client.put_manifest(f"test{i}", man).status_code == 201
    return client


def test_tag_list_returns_all_tags_sorted(tagged: Client) -> None:
    r = tagged.tags()
    assert r.status_code == 200
    assert r.json() == {"name": tagged.repo, "tags": ["test0", "test1", "test2", "test3"]}


def test_tag_list_is_limited_by_n(tagged: Client) -> None:
    r = tagged.tags(n=2)
    assert r.status_code == 200
    assert r.json()["tags"] == ["test0", "test1"]


def test_tag_list_continues_after_last(tagged: Client) -> None:
    first = tagged.tags(n=2).json()["tags"]
    r = tagged.tags(n=2, last=first[-1])
    assert r.status_code == 200
    assert r.json()["tags"] == ["test2", "test3"]


def test_tag_list_with_last_only_returns_later_tags(tagged: Client) -> None:
    """v2 suite: with `last` set to the middle tag, no earlier tag and every later one."""
    r = tagged.tags(last="test1")
    assert r.status_code == 200
    assert r.json()["tags"] == ["test2", "test3"]


def test_first_listed_tag_resolves(tagged: Client) -> None:
    tag = tagged.tags().json()["tags"][0]
    r = tagged.get_manifest(tag)
    assert r.status_code == 200
    assert r.json()["layers"][0]["digest"] == sha256(LAYER)


# -- content discovery: referrers ---------------------------------------------------------------


def test_referrers_of_the_discovery_workflow(client: Client) -> None:
    subject_config, other_config = image_config(), image_config()
    subject = image_manifest(subject_config)
    unpushed = image_manifest(other_config)
    subj, unpushed_subj = desc(OCI_MANIFEST, subject), desc(OCI_MANIFEST, unpushed)
    empty = desc(OCI_EMPTY, EMPTY_JSON)

    def artifact(**doc: Any) -> bytes:
        return tabbed({"schemaVersion": 2, "mediaType": OCI_MANIFEST, **doc})

    config_a = artifact(
        config=desc(TYPE_A, REF_BLOB_A),
        layers=[empty],
        subject=subj,
        annotations={ANNOTATION: "test config a"},
    )
    config_b = artifact(
        config=desc(TYPE_B, REF_BLOB_B),
        layers=[empty],
        subject=subj,
        annotations={ANNOTATION: "test config b"},
    )
    layer_a = artifact(
        artifactType=TYPE_A,
        config=empty,
        layers=[desc(TYPE_A, REF_BLOB_A)],
        subject=subj,
        annotations={ANNOTATION: "test layer a"},
    )
    layer_b = artifact(
        artifactType=TYPE_B,
        config=empty,
        layers=[desc(TYPE_B, REF_BLOB_B)],
        subject=subj,
        annotations={ANNOTATION: "test layer b"},
    )
    dangling = artifact(
        artifactType=TYPE_B, config=empty, layers=[desc(TYPE_B, REF_BLOB_B)], subject=unpushed_subj
    )
    index = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": TYPE_INDEX,
            "manifests": [desc(OCI_MANIFEST, config_a), desc(OCI_MANIFEST, layer_a)],
            "subject": subj,
            "annotations": {ANNOTATION: "test index"},
        }
    )

    def put(body: bytes, media_type: str, subject_digest: str) -> None:
        r = client.put_manifest(sha256(body), body, media_type)
        assert r.status_code == 201, r.text
        assert r.headers["OCI-Subject"] == subject_digest

    # referrers pushed before their subject exists, then the subject, then more referrers
    client.push_blob(EMPTY_JSON)
    client.push_blob(REF_BLOB_A)
    put(config_a, OCI_MANIFEST, sha256(subject))
    put(layer_a, OCI_MANIFEST, sha256(subject))
    put(index, OCI_INDEX, sha256(subject))
    for data in (subject_config, LAYER):
        client.push_blob(data)
    assert client.put_manifest("tagtest0", subject).status_code == 201
    client.push_blob(REF_BLOB_B)
    put(config_b, OCI_MANIFEST, sha256(subject))
    put(layer_b, OCI_MANIFEST, sha256(subject))
    put(dangling, OCI_MANIFEST, sha256(unpushed))

    expected = {
        sha256(config_a): (OCI_MANIFEST, TYPE_A, len(config_a), "test config a"),
        sha256(config_b): (OCI_MANIFEST, TYPE_B, len(config_b), "test config b"),
        sha256(layer_a): (OCI_MANIFEST, TYPE_A, len(layer_a), "test layer a"),
        sha256(layer_b): (OCI_MANIFEST, TYPE_B, len(layer_b), "test layer b"),
        sha256(index): (OCI_INDEX, TYPE_INDEX, len(index), "test index"),
    }

    def check(entries: list[dict[str, Any]]) -> None:
        for e in entries:
            media_type, artifact_type, size, note = expected[e["digest"]]
            assert e["mediaType"] == media_type
            assert e["artifactType"] == artifact_type
            assert e["size"] == size
            assert e["annotations"] == {ANNOTATION: note}

    r = client.referrers(sha256(subject))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    doc = r.json()
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == OCI_INDEX
    assert sorted(e["digest"] for e in doc["manifests"]) == sorted(expected)
    check(doc["manifests"])

    r = client.referrers(sha256(subject), artifactType=TYPE_A)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    entries = r.json()["manifests"]
    if r.headers.get("OCI-Filters-Applied"):
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert sorted(e["digest"] for e in entries) == sorted([sha256(config_a), sha256(layer_a)])
    else:
        assert len(entries) == 5
    check(entries)

    r = client.referrers(sha256(unpushed))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    assert [e["digest"] for e in r.json()["manifests"]] == [sha256(dangling)]

    r = client.referrers(sha256(b"hello world"))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    assert r.json()["manifests"] == []

    # discovery teardown: manifests (by digest, and the tag through the same route) ...
    for ref in (sha256(index), sha256(config_a), sha256(layer_a), sha256(subject), "tagtest0"):
        assert requests.delete(client.url(f"manifests/{ref}")).status_code in (202, 404, 405)
    for body in (config_b, layer_b, dangling):
        assert requests.delete(client.url(f"manifests/{sha256(body)}")).status_code == 202
    assert client.referrers(sha256(subject)).json()["manifests"] == []
    # ... then blobs, which must still be deletable (2xx or 405, not 404) after the manifests
    for data in (subject_config, LAYER, REF_BLOB_A, REF_BLOB_B, EMPTY_JSON):
        r = requests.delete(client.url(f"blobs/{sha256(data)}"))
        assert r.status_code in (202, 405)
        assert requests.head(client.url(f"blobs/{sha256(data)}")).status_code == 404


def test_referrer_without_artifact_type_reports_config_media_type(client: Client) -> None:
    """v2 suite's `artifacts-with-subject`: a plain image with a subject lists its config type."""
    subject_config, config = image_config(), image_config()
    for data in (subject_config, config, LAYER):
        client.push_blob(data)
    subject = image_manifest(subject_config)
    assert client.put_manifest("image", subject).status_code == 201
    referrer = tabbed(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc(config),
            "layers": [desc(OCI_LAYER, LAYER)],
            "subject": desc(OCI_MANIFEST, subject),
        }
    )
    r = client.put_manifest(sha256(referrer), referrer)
    assert r.status_code == 201
    assert r.headers["OCI-Subject"] == sha256(subject)
    entries = client.referrers(sha256(subject)).json()["manifests"]
    assert entries == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(referrer),
            "size": len(referrer),
            "artifactType": OCI_CONFIG,
        }
    ]


# -- content management -------------------------------------------------------------------------


def test_content_management_workflow(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    assert client.put_manifest("tagtest0", man).status_code == 201
    assert client.put_manifest("keep", man).status_code == 201
    before = client.tags().json()["tags"]
    assert before == ["keep", "tagtest0"]

    r = requests.delete(client.url("manifests/tagtest0"))
    assert r.status_code in (202, 400, 405)
    if r.status_code == 400:
        assert error_codes(r) == ["UNSUPPORTED"]

    r = requests.delete(client.url(f"manifests/{sha256(man)}"))
    assert r.status_code in (202, 404)
    r = client.get_manifest(sha256(man))
    assert r.status_code in (200, 404)
    if r.status_code == 404:
        assert error_codes(r) == ["MANIFEST_UNKNOWN"]

    r = client.tags()
    assert r.status_code == 200
    assert len(r.json()["tags"]) < len(before)

    for data in (config, LAYER):
        r = requests.delete(client.url(f"blobs/{sha256(data)}"))
        assert r.status_code in (202, 404, 405)
    g = requests.get(client.url(f"blobs/{sha256(config)}"))
    assert g.status_code == 404
    assert error_codes(g) == ["BLOB_UNKNOWN"]


def test_tag_delete_is_202_and_leaves_manifest_by_digest(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    assert client.put_manifest("tagtest0", man).status_code == 201
    r = requests.delete(client.url("manifests/tagtest0"))
    assert r.status_code == 202
    assert client.get_manifest("tagtest0").status_code == 404
    assert client.tags().json()["tags"] == []
    assert_manifest(client, sha256(man), man, OCI_MANIFEST)


def test_manifest_delete_twice_is_202_then_404(client: Client) -> None:
    config = image_config()
    for data in (config, LAYER):
        client.push_blob(data)
    man = image_manifest(config)
    assert client.put_manifest(sha256(man), man).status_code == 201
    assert requests.delete(client.url(f"manifests/{sha256(man)}")).status_code == 202
    r = requests.delete(client.url(f"manifests/{sha256(man)}"))
    assert r.status_code == 404
    assert error_codes(r) == ["MANIFEST_UNKNOWN"]
    h = client.get_manifest(sha256(man), "HEAD")
    assert h.status_code == 404


def test_blob_delete_is_202_then_404(client: Client) -> None:
    blob = os.urandom(100)
    client.push_blob(blob)
    r = requests.delete(client.url(f"blobs/{sha256(blob)}"))
    assert r.status_code == 202
    assert r.content == b""
    assert requests.head(client.url(f"blobs/{sha256(blob)}")).status_code == 404
    r = requests.delete(client.url(f"blobs/{sha256(blob)}"))
    assert r.status_code == 404
    assert error_codes(r) == ["BLOB_UNKNOWN"]
