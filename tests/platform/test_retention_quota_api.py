"""Retention policies (`/apps/{app}/retention`) and quotas (`/orgs/{org}/usage`,
`/orgs/{org}/quota`) through the management API, against a registry served in-process (no gc
worker: nothing but these requests changes what an app holds)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from skyreg.registry.quotas import USAGE_MAX_AGE
from skyreg.services.sizes import MAX_SIZE
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import push_blob, push_image, put_manifest
from tests.support.platform import API, Tenancy, answer, api, authed, refused
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("retquota") / "data") as reg:
        yield reg


@dataclass
class Tenant:
    org: str
    app: str
    tokens: dict[str, str]  # kind -> secret; "stranger": an org token of another org


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def tenant(server: InProcessRegistry) -> Tenant:
    t = Tenancy(server.data_dir)
    org, app = unique("org"), unique("app")
    t.org(org)
    t.app(app, org, public=True)  # public: its retention is still not anyone's to see
    stranger = unique("org")
    t.org(stranger)
    tokens = {
        "admin": t.admin_secret(),
        "org": t.token("org", org=org)[0],
        "deploy": t.token("deploy", org=org, app=app)[0],
        "readonly": t.token("readonly", org=org)[0],
        "stranger": t.token("org", org=stranger)[0],
    }
    return Tenant(org, app, tokens)


# -- retention -----------------------------------------------------------------------------------


def test_who_may_see_and_set_retention(server: InProcessRegistry, tenant: Tenant) -> None:
    path = f"/apps/{tenant.app}/retention"
    policy = {"keep_recent": 5}
    for kind in ("admin", "org", "deploy", "readonly"):
        shown = answer(api(server, "GET", path, tenant.tokens[kind]), 200)
        assert shown["policy"] is None and shown["would_delete"] == [], kind
    # A public app's images are public; its retention is not.
    refused(api(server, "GET", path, None), 401, "unauthorized")
    refused(api(server, "GET", path, tenant.tokens["stranger"]), 404, "not_found")
    for kind in ("deploy", "readonly"):
        message = refused(
            api(server, "PUT", path, tenant.tokens[kind], json=policy), 403, "forbidden"
        )
        assert "org token" in message
        # Refused before the body is looked at.
        refused(api(server, "PUT", path, tenant.tokens[kind], data=b"{"), 403, "forbidden")
        refused(api(server, "DELETE", path, tenant.tokens[kind]), 403, "forbidden")
    stranger = tenant.tokens["stranger"]
    refused(api(server, "PUT", path, stranger, json=policy), 403, "forbidden")  # public app
    refused(api(server, "PUT", path, None, json=policy), 401, "unauthorized")
    refused(
        api(server, "PUT", "/apps/nosuchapp0/retention", tenant.tokens["org"], json=policy),
        404,
        "not_found",
    )
    assert answer(api(server, "GET", path, tenant.tokens["admin"]), 200)["policy"] is None

    for kind in ("org", "admin"):
        set_ = answer(api(server, "PUT", path, tenant.tokens[kind], json=policy), 200)
        assert set_["saved"] is True and set_["dry_run"] is False
        assert set_["policy"]["keep_recent"] == 5
        assert answer(api(server, "DELETE", path, tenant.tokens[kind]), 204) is None
        assert answer(api(server, "GET", path, tenant.tokens["readonly"]), 200)["policy"] is None


def test_retention_of_a_private_app_is_not_found_for_strangers(
    server: InProcessRegistry, tenant: Tenant
) -> None:
    t = Tenancy(server.data_dir)
    private = unique("app")
    t.app(private, tenant.org)
    path = f"/apps/{private}/retention"
    stranger = tenant.tokens["stranger"]
    for method in ("GET", "PUT", "DELETE"):
        kw = {"json": {"keep_recent": 1}} if method == "PUT" else {}
        refused(api(server, method, path, stranger, **kw), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"keep_recnt": 1}, "keep_recnt"),
        ({"keep_recent": -1}, "keep_recent is 0 to"),
        ({"keep_recent": "3"}, "Expected `int | null`"),
        ({"keep_tags": [f"v{i}*" for i in range(33)]}, "at most 32 tag patterns"),
        ({"keep_tags": [""]}, "a tag pattern is 1 to 128"),
        ({"keep_within": "12 parsecs"}, "invalid keep_within '12 parsecs'"),
        ({"untagged_after": "-5"}, "invalid untagged_after"),
        ({"untagged_after": -5}, "untagged_after cannot be negative"),
        ({"keep_within": "4000d"}, "keep_within is 0 to"),
        ({"keep_within": True}, "Expected `int | float | str | null`, got `bool`"),
    ],
)
def test_bad_retention_bodies_are_refused_with_a_message(
    server: InProcessRegistry, tenant: Tenant, body: dict[str, Any], words: str
) -> None:
    path = f"/apps/{tenant.app}/retention"
    for dry_run in ("true", "false"):
        message = refused(
            api(server, "PUT", path, tenant.tokens["org"], json=body, params={"dry_run": dry_run}),
            400,
            "bad_request",
        )
        assert words in message, message
    assert answer(api(server, "GET", path, tenant.tokens["org"]), 200)["policy"] is None


def test_dry_run_saves_nothing_and_a_put_round_trips(
    server: InProcessRegistry, tenant: Tenant
) -> None:
    session = authed(tenant.tokens["deploy"])
    old = push_image(server.url, tenant.app, "v1", session=session)
    for tag in ("build-1", "build-2"):
        assert (
            put_manifest(server.url, tenant.app, tag, old.manifest, session=session).status_code
            == 201
        )
    push_image(server.url, f"{tenant.app}/side", "latest", session=session)
    path = f"/apps/{tenant.app}/retention"
    org = tenant.tokens["org"]
    policy = {"keep_tags": ["v*"], "keep_recent": 0, "keep_within": 0, "untagged_after": "12h"}

    refused(
        api(server, "PUT", path, org, json=policy, params={"dry_run": "yes"}), 400, "bad_request"
    )
    dry = answer(api(server, "PUT", path, org, json=policy, params={"dry_run": "true"}), 200)
    assert dry["dry_run"] is True and dry["saved"] is False
    gone = {(t["repository"], t["tag"]) for t in dry["would_delete"]}
    assert gone == {
        (tenant.app, "build-1"),
        (tenant.app, "build-2"),
        (f"{tenant.app}/side", "latest"),
    }
    tag = next(t for t in dry["would_delete"] if t["tag"] == "build-1")
    assert (
        tag["digest"] == old.digest and tag["pulled_at"] is None and tag["pushed_at"].endswith("Z")
    )
    shown = answer(api(server, "GET", path, org), 200)
    assert shown["policy"] is None and shown["updated_at"] is None and shown["would_delete"] == []

    saved = answer(api(server, "PUT", path, org, json=policy), 200)
    assert saved["saved"] is True
    assert saved["policy"] == {
        "keep_tags": ["v*"],
        "keep_recent": 0,
        "keep_within": 0,
        "untagged_after": 43200,
        "deletes_tags": True,
    }
    shown = answer(api(server, "GET", path, tenant.tokens["readonly"]), 200)
    assert shown["policy"] == saved["policy"]
    assert shown["updated_at"] is not None and shown["last_run_at"] is None
    assert shown["tags_deleted"] == 0
    assert {(t["repository"], t["tag"]) for t in shown["would_delete"]} == gone
    # Showing and trying delete nothing.
    r = session.get(f"{server.url}/v2/{tenant.app}/manifests/build-1", timeout=30)
    assert r.status_code == 200

    # A policy keeping by recency alone; durations as seconds and as text.
    kept = answer(
        api(server, "PUT", path, org, json={"keep_recent": 10, "keep_within": "1h30m"}), 200
    )
    assert kept["policy"]["keep_tags"] == [] and kept["policy"]["keep_within"] == 5400
    assert kept["would_delete"] == []
    # Without keep_recent / keep_within nothing is deleted.
    none = answer(api(server, "PUT", path, org, json={"untagged_after": 60}), 200)
    assert none["policy"]["deletes_tags"] is False and none["would_delete"] == []

    assert answer(api(server, "DELETE", path, org), 204) is None
    assert answer(api(server, "DELETE", path, org), 204) is None  # nothing left: still fine
    assert answer(api(server, "GET", path, org), 200)["policy"] is None


# -- quotas --------------------------------------------------------------------------------------


def test_usage_counts_the_unique_blobs_pushed(server: InProcessRegistry, tenant: Tenant) -> None:
    path = f"/orgs/{tenant.org}/usage"
    stranger_org = answer(api(server, "GET", "/orgs", tenant.tokens["stranger"]), 200)["orgs"][0]
    empty = answer(
        api(server, "GET", f"/orgs/{stranger_org['name']}/usage", tenant.tokens["stranger"]), 200
    )
    assert empty == {
        "org": stranger_org["name"],
        "bytes": 0,
        "blobs": 0,
        "quota": None,
        "state": "ok",
    }
    session = authed(tenant.tokens["deploy"])
    image = push_image(server.url, tenant.app, "v1", layers=2, layer_size=5000, session=session)
    # The same blobs again in another repository of the app count once.
    for blob in (image.config, *image.layers):
        push_blob(server.url, f"{tenant.app}/b", blob, session)
    r = put_manifest(server.url, f"{tenant.app}/b", "v1", image.manifest, session=session)
    assert r.status_code == 201, r.text
    copy = push_image(
        server.url, f"{tenant.app}/c", "v1", layers=1, layer_size=700, session=session
    )
    expected = sum(len(b) for b in (image.config, *image.layers, copy.config, *copy.layers))
    # manifests count too, once per repository holding one
    expected += 2 * len(image.manifest) + len(copy.manifest)
    for kind in ("admin", "org", "deploy", "readonly"):
        usage = answer(api(server, "GET", path, tenant.tokens[kind]), 200)
        assert usage["bytes"] == expected and usage["blobs"] == 5, (kind, usage)
    refused(api(server, "GET", path, tenant.tokens["stranger"]), 404, "not_found")
    refused(api(server, "GET", "/orgs/nosuchorg0/usage", tenant.tokens["admin"]), 404, "not_found")
    refused(api(server, "GET", path, None), 401, "unauthorized")

    # The figure is the registry's quota gate's, walked at most every few seconds per org.
    started = time.monotonic()
    push_image(server.url, f"{tenant.app}/d", "v1", layers=1, layer_size=300, session=session)
    again = answer(api(server, "GET", path, tenant.tokens["org"]), 200)
    if time.monotonic() - started < USAGE_MAX_AGE - 1:
        assert again["bytes"] == expected, again
    wait_for(
        lambda: answer(api(server, "GET", path, tenant.tokens["org"]), 200)["blobs"] == 7,
        "usage counting the new push",
    )
    expected = answer(api(server, "GET", path, tenant.tokens["org"]), 200)["bytes"]

    admin = tenant.tokens["admin"]
    quota = f"/orgs/{tenant.org}/quota"
    over_soft = answer(api(server, "PUT", quota, admin, json={"hard": "1MiB", "soft": 1000}), 200)
    assert over_soft["quota"] == {"soft": 1000, "hard": 1024**2}
    assert over_soft["state"] == "soft" and over_soft["bytes"] == expected
    over_hard = answer(api(server, "PUT", quota, admin, json={"hard": "1kB"}), 200)
    assert over_hard["quota"] == {"soft": None, "hard": 1000} and over_hard["state"] == "hard"
    ok = answer(api(server, "PUT", quota, admin, json={"hard": "1.5 GiB", "soft": "1gb"}), 200)
    assert ok["quota"] == {"soft": 10**9, "hard": 3 * 2**29} and ok["state"] == "ok"
    assert answer(api(server, "GET", path, tenant.tokens["readonly"]), 200) == ok


def test_only_an_admin_sets_a_quota(server: InProcessRegistry, tenant: Tenant) -> None:
    quota = f"/orgs/{tenant.org}/quota"
    for kind in ("org", "deploy", "readonly"):
        message = refused(
            api(server, "PUT", quota, tenant.tokens[kind], json={"hard": "10GB"}), 403, "forbidden"
        )
        assert "admin" in message
        refused(api(server, "PUT", quota, tenant.tokens[kind], data=b"{"), 403, "forbidden")
        refused(api(server, "DELETE", quota, tenant.tokens[kind]), 403, "forbidden")
    stranger = tenant.tokens["stranger"]
    refused(api(server, "PUT", quota, stranger, json={"hard": 1}), 404, "not_found")
    refused(api(server, "DELETE", quota, stranger), 404, "not_found")
    refused(api(server, "PUT", quota, None, json={"hard": 1}), 401, "unauthorized")
    admin = tenant.tokens["admin"]
    refused(api(server, "PUT", "/orgs/nosuchorg0/quota", admin, json={"hard": 1}), 404, "not_found")
    usage = f"/orgs/{tenant.org}/usage"
    assert answer(api(server, "GET", usage, admin), 200)["quota"] is None

    answer(api(server, "PUT", quota, admin, json={"hard": 10**12}), 200)
    assert answer(api(server, "GET", usage, admin), 200)["quota"] == {"soft": None, "hard": 10**12}
    assert answer(api(server, "DELETE", quota, admin), 204) is None
    assert answer(api(server, "GET", usage, tenant.tokens["org"]), 200)["quota"] is None
    assert answer(api(server, "DELETE", quota, admin), 204) is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"hard": "12 parsecs"}, "invalid hard '12 parsecs'"),
        ({"hard": "5 GiBs"}, "invalid hard"),
        ({"hard": -1}, "hard cannot be negative"),
        ({"hard": "-1GB"}, "hard cannot be negative"),
        ({"hard": MAX_SIZE + 1}, "at most 9223372036854775807 bytes"),
        ({"hard": "8EiB"}, "invalid hard"),
        ({"hard": "9999999TB"}, "at most 9223372036854775807 bytes"),
        ({"hard": "1GB", "soft": "2GB"}, "the soft limit cannot be above the hard limit"),
        ({"hard": 1.5}, "Expected `int | str | null`"),
        ({"hard": True}, "Expected `int | str | null`"),
        ({"hard": 1, "limit": 2}, "limit"),
    ],
)
def test_bad_quota_bodies_are_refused_with_a_message(
    server: InProcessRegistry, tenant: Tenant, body: dict[str, Any], words: str
) -> None:
    admin = tenant.tokens["admin"]
    message = refused(
        api(server, "PUT", f"/orgs/{tenant.org}/quota", admin, data=json.dumps(body)),
        400,
        "bad_request",
    )
    assert words in message, message
    assert answer(api(server, "GET", f"/orgs/{tenant.org}/usage", admin), 200)["quota"] is None


def test_the_document_describes_retention_and_quotas(server: InProcessRegistry) -> None:
    doc = answer(requests.get(server.url + API + "/openapi.json", timeout=30), 200)
    paths = doc["paths"]
    expected = {
        ("/api/v1/apps/{app}/retention", "get"): ("getRetention", "200", "Retention"),
        ("/api/v1/apps/{app}/retention", "put"): ("setRetention", "200", "RetentionSet"),
        ("/api/v1/apps/{app}/retention", "delete"): ("deleteRetention", "204", None),
        ("/api/v1/orgs/{org}/usage", "get"): ("getOrgUsage", "200", "OrgUsage"),
        ("/api/v1/orgs/{org}/quota", "put"): ("setOrgQuota", "200", "OrgUsage"),
        ("/api/v1/orgs/{org}/quota", "delete"): ("deleteOrgQuota", "204", None),
    }
    for (path, method), (operation_id, status, schema) in expected.items():
        op = paths[path][method]
        assert op["operationId"] == operation_id
        assert {"400", "401", "404", status} <= set(op["responses"]), (path, method)
        if method != "get":
            assert "403" in op["responses"], (path, method)
        if schema is not None:
            content = op["responses"][status]["content"]["application/json"]["schema"]
            assert content["$ref"].endswith("/" + schema)
    put = paths["/api/v1/apps/{app}/retention"]["put"]
    assert put["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SetRetention"
    )
    assert [p["name"] for p in put["parameters"]] == ["app", "dry_run"]
    quota = paths["/api/v1/orgs/{org}/quota"]["put"]
    assert quota["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SetQuota"
    )
    schemas = doc["components"]["schemas"]
    retention = schemas["SetRetention"]["properties"]
    assert "glob" in retention["keep_tags"]["description"]
    assert "30d" in retention["keep_within"]["description"]
    assert "deletes no tag" in schemas["SetRetention"]["description"]
    assert "GiB" in schemas["SetQuota"]["properties"]["hard"]["description"]
    assert schemas["OrgUsage"]["properties"]["state"]["enum"] == ["ok", "soft", "hard"]
