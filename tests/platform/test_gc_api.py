"""The garbage collection routes of the management API (`GET /gc`, `POST /gc/runs`) and
`DELETE /apps/{app}/images/{reference}`, against a registry served in-process.

The server runs no gc worker and reviews what is queued at once (`--no-gc
--gc-review-delay 0`): only the passes these tests ask for collect anything, so every outcome is
the one a test caused.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    descriptor,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.platform import Tenancy, authed

API = "/api/v1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("gcapi") / "data") as reg:
        yield reg


@dataclass
class Tenant:
    """An org with an app, a second app, and a token of each kind (secrets)."""

    org: str
    app: str
    other_app: str
    tokens: dict[str, str]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def tenant(server: InProcessRegistry) -> Tenant:
    t = Tenancy(server.data_dir)
    org, app, other_app = unique("org"), unique("app"), unique("app")
    t.org(org)
    t.app(app, org)
    t.app(other_app, org)
    tokens = {
        "admin": t.admin_secret(),
        "org": t.token("org", org=org)[0],
        "deploy": t.token("deploy", org=org, app=app)[0],
        "other_deploy": t.token("deploy", org=org, app=other_app)[0],
        "readonly": t.token("readonly", org=org)[0],
    }
    stranger = unique("org")
    t.org(stranger)
    tokens["stranger"] = t.token("org", org=stranger)[0]
    return Tenant(org, app, other_app, tokens)


def api(
    server: InProcessRegistry, method: str, path: str, secret: str | None, **kw: Any
) -> requests.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    return requests.request(method, server.url + API + path, headers=headers, timeout=60, **kw)


def answer(resp: requests.Response, status: int) -> Any:
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()


def refused(resp: requests.Response, status: int, code: str) -> str:
    body = answer(resp, status)
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


def run_gc(server: InProcessRegistry, dry_run: bool = False) -> dict[str, Any]:
    admin = Tenancy(server.data_dir).admin_secret()
    return dict(answer(api(server, "POST", "/gc/runs", admin, json={"dry_run": dry_run}), 200))


def manifest_status(server: InProcessRegistry, secret: str, repo: str, ref: str) -> int:
    r = authed(secret).get(
        f"{server.url}/v2/{repo}/manifests/{ref}",
        headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"},
        timeout=30,
    )
    return r.status_code


def blob_rows(server: InProcessRegistry, digest: str) -> int:
    """Rows of `digest` in the blobs table (the server's SQLite file, read-only)."""
    uri = f"file:{server.data_dir / 'skyreg.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        row = db.execute("SELECT count(*) FROM blobs WHERE digest = ?", (digest,)).fetchone()
    return int(row[0])


def stored(server: InProcessRegistry, digest: str) -> bool:
    """Whether the filesystem store holds the blob's bytes."""
    hex_part = digest.removeprefix("sha256:")
    return (server.data_dir / "blobs" / "sha256" / hex_part[:2] / hex_part).exists()


def test_gc_routes_need_an_admin_token(server: InProcessRegistry, tenant: Tenant) -> None:
    for kind in ("org", "deploy", "readonly", "stranger"):
        secret = tenant.tokens[kind]
        message = refused(api(server, "GET", "/gc", secret), 403, "forbidden")
        assert "admin" in message
        refused(api(server, "POST", "/gc/runs", secret, json={"dry_run": True}), 403, "forbidden")
    refused(api(server, "GET", "/gc", None), 401, "unauthorized")
    refused(api(server, "POST", "/gc/runs", None, json={}), 401, "unauthorized")
    admin = tenant.tokens["admin"]
    refused(api(server, "POST", "/gc/runs", admin, json={"dry": True}), 400, "bad_request")
    refused(api(server, "POST", "/gc/runs", admin, json={"dry_run": 1}), 400, "bad_request")

    status = answer(api(server, "GET", "/gc", admin), 200)
    assert status["region"] == "" and status["worker"] is False
    assert status["settings"] == {"review_delay": 0.0, "keep_releases": 10, "regions": [""]}
    for queue in ("manifest_reviews", "blob_reviews"):
        assert set(status[queue]) == {"queued", "due", "failing"}
    assert [d["region"] for d in status["deletions"]] == [""]
    assert set(status["totals"]) == {
        "bytes_deleted",
        "blobs_deleted",
        "manifests_deleted",
        "links_deleted",
        "failures",
    }


def test_a_dry_run_lists_what_a_run_then_deletes(server: InProcessRegistry, tenant: Tenant) -> None:
    deploy = authed(tenant.tokens["deploy"])
    kept = push_image(server.url, tenant.app, "v1", session=deploy)
    # An image pushed by digest alone, sharing a layer with the tagged one.
    config = json.dumps({"os": "linux", "n": uuid.uuid4().hex}).encode()
    own_layer = uuid.uuid4().bytes * 64
    for blob in (config, own_layer):
        push_blob(server.url, tenant.app, blob, deploy)
    manifest = image_manifest(config, [kept.layers[0], own_layer])
    untagged = sha256(manifest)
    r = put_manifest(server.url, tenant.app, untagged, manifest, session=deploy)
    assert r.status_code == 201, r.text
    before = answer(api(server, "GET", "/gc", tenant.tokens["admin"]), 200)
    assert before["manifest_reviews"]["due"] >= 1

    dry = run_gc(server, dry_run=True)
    assert dry["dry_run"] is True and dry["kind"] == "manual"
    assert f"{tenant.app}@{untagged}" in dry["deleted_manifests"]
    assert f"{tenant.app}@{kept.digest}" not in dry["deleted_manifests"]
    assert manifest_status(server, tenant.tokens["deploy"], tenant.app, untagged) == 200
    assert stored(server, sha256(own_layer)) and blob_rows(server, sha256(own_layer)) == 1

    done = run_gc(server)
    assert done["dry_run"] is False
    assert f"{tenant.app}@{untagged}" in done["deleted_manifests"]
    assert {sha256(config), sha256(own_layer)} <= set(done["deleted_blobs"])
    assert sha256(kept.layers[0]) not in done["deleted_blobs"]
    assert done["bytes_deleted"] >= len(config) + len(own_layer)
    assert manifest_status(server, tenant.tokens["deploy"], tenant.app, untagged) == 404
    for gone in (config, own_layer):
        assert blob_rows(server, sha256(gone)) == 0 and not stored(server, sha256(gone))
    for blob in (kept.config, *kept.layers):
        r = deploy.get(f"{server.url}/v2/{tenant.app}/blobs/{sha256(blob)}", timeout=30)
        assert r.status_code == 200 and r.content == blob

    after = answer(api(server, "GET", "/gc", tenant.tokens["admin"]), 200)
    assert after["totals"]["manifests_deleted"] >= before["totals"]["manifests_deleted"] + 1
    assert after["totals"]["bytes_deleted"] >= before["totals"]["bytes_deleted"] + len(own_layer)
    assert after["deletions"][0]["queued"] == 0
    assert after["runs"][0]["kind"] == "manual" and after["runs"][0]["dry_run"] is False
    assert after["runs"][1]["dry_run"] is True


def push_index(server: InProcessRegistry, secret: str, repo: str, tag: str) -> tuple[str, str]:
    """An index tagged `tag` over one image pushed by digest: (index digest, child digest)."""
    child = push_image(server.url, repo, session=authed(secret))
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(
                    OCI_MANIFEST,
                    child.manifest,
                    platform={"os": "linux", "architecture": "amd64"},
                )
            ],
        }
    ).encode()
    r = put_manifest(server.url, repo, tag, index, OCI_INDEX, session=authed(secret))
    assert r.status_code == 201, r.text
    return sha256(index), child.digest


def test_deleting_tags_and_manifests(server: InProcessRegistry, tenant: Tenant) -> None:
    deploy = tenant.tokens["deploy"]
    image: Image = push_image(server.url, tenant.app, "v1", session=authed(deploy))
    put = put_manifest(server.url, tenant.app, "v2", image.manifest, session=authed(deploy))
    assert put.status_code == 201, put.text
    path = f"/apps/{tenant.app}/images"

    # A tag: only the tag goes; the manifest stays (still tagged v2).
    assert answer(api(server, "DELETE", f"{path}/v1", deploy), 200) == {
        "repository": tenant.app,
        "tag": "v1",
    }
    assert manifest_status(server, deploy, tenant.app, "v1") == 404
    assert manifest_status(server, deploy, tenant.app, image.digest) == 200
    refused(api(server, "DELETE", f"{path}/v1", deploy), 404, "not_found")

    # A digest: the manifest and every tag of it.
    deleted = answer(api(server, "DELETE", f"{path}/{tenant.app}@{image.digest}", deploy), 200)
    assert deleted == {"repository": tenant.app, "digest": image.digest}
    assert manifest_status(server, deploy, tenant.app, image.digest) == 404
    assert manifest_status(server, deploy, tenant.app, "v2") == 404

    # The app's other repositories, and an index's child: 409 naming the index.
    repo = f"{tenant.app}/multi"
    index, child = push_index(server, deploy, repo, "latest")
    in_repo = f"{path}/{quote(repo, safe='')}"  # the CLI quotes the slash too
    message = refused(api(server, "DELETE", f"{in_repo}@{child}", deploy), 409, "conflict")
    assert index in message and child in message
    assert manifest_status(server, deploy, repo, child) == 200
    assert answer(api(server, "DELETE", f"{in_repo}@{index}", deploy), 200)["digest"] == index
    answer(api(server, "DELETE", f"{in_repo}@{child}", deploy), 200)
    assert manifest_status(server, deploy, repo, child) == 404

    # Another app's repository through this app's path: not found.
    refused(api(server, "DELETE", f"{path}/{tenant.other_app}:v1", deploy), 404, "not_found")


def test_who_may_delete_images(server: InProcessRegistry, tenant: Tenant) -> None:
    image = push_image(server.url, tenant.app, "v1", session=authed(tenant.tokens["deploy"]))
    path = f"/apps/{tenant.app}/images/v1"
    for kind in ("readonly", "other_deploy"):
        message = refused(api(server, "DELETE", path, tenant.tokens[kind]), 403, "forbidden")
        assert tenant.app in message
    refused(api(server, "DELETE", path, tenant.tokens["stranger"]), 404, "not_found")
    refused(api(server, "DELETE", path, None), 401, "unauthorized")
    assert manifest_status(server, tenant.tokens["deploy"], tenant.app, "v1") == 200
    for kind in ("deploy", "org", "admin"):
        r = put_manifest(
            server.url, tenant.app, kind, image.manifest, session=authed(tenant.tokens["deploy"])
        )
        assert r.status_code == 201, r.text
        answer(api(server, "DELETE", f"/apps/{tenant.app}/images/{kind}", tenant.tokens[kind]), 200)
        assert manifest_status(server, tenant.tokens["deploy"], tenant.app, kind) == 404


def test_the_document_describes_the_gc_routes(server: InProcessRegistry) -> None:
    doc = answer(requests.get(server.url + API + "/openapi.json", timeout=30), 200)
    assert doc["paths"]["/api/v1/gc"]["get"]["operationId"] == "gcStatus"
    run = doc["paths"]["/api/v1/gc/runs"]["post"]
    assert run["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/StartGcRun"
    )
    delete = doc["paths"]["/api/v1/apps/{app}/images/{reference}"]["delete"]
    assert {"403", "404", "409"} <= set(delete["responses"])
    for schema in ("GcStatus", "GcRunResult", "DeletedImage", "StartGcRun"):
        assert schema in doc["components"]["schemas"]


def test_metrics_count_this_process_reviews(server: InProcessRegistry, tenant: Tenant) -> None:
    run_gc(server)
    r = requests.get(
        server.url + "/metrics",
        headers={"Authorization": f"Bearer {tenant.tokens['admin']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    text = r.text
    assert 'skyreg_gc_reviews_total{kind="manifest",outcome="deleted"}' in text
    assert 'skyreg_gc_queue_depth{queue="deletions"} 0' in text
    assert "skyreg_gc_bytes_deleted_total" in text
    assert 'skyreg_worker_up{worker="gc"}' not in text  # --no-gc: no worker here
