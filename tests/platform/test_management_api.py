"""The management API (/api/v1) against a real `skyreg serve` with authentication on."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.auth.secrets import secret_sha256
from skyreg.platform.api import ROUTES
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_MANIFEST, push_sized_image, sha256
from tests.support.platform import authed

API = "/api/v1"


def start_registry(data_dir: Path) -> InProcessRegistry:
    """Auth on (the default), the access log too: tests check what it never holds."""
    reg = InProcessRegistry(data_dir=data_dir, options={"access_log": True})
    reg.start()
    return reg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    """One registry for tests that never present bad credentials (the failure limiter is
    per client, and every test here runs from 127.0.0.1)."""
    reg = start_registry(tmp_path_factory.mktemp("mgmt") / "data")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[InProcessRegistry]:
    """A registry of its own, for tests that present revoked, expired or wrong tokens."""
    reg = start_registry(tmp_path / "data")
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Api:
    """Requests to the management API as one token (None: anonymous)."""

    base: str
    secret: str | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if self.secret is not None:
            headers.setdefault("Authorization", f"Bearer {self.secret}")
        return requests.request(
            method, self.base + API + path, headers=headers, timeout=30, **kwargs
        )

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: object, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, json=body, **kwargs)

    def patch(self, path: str, body: object) -> requests.Response:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> requests.Response:
        return self.request("DELETE", path)

    def as_(self, secret: str | None) -> Api:
        return Api(self.base, secret)


def admin(reg: InProcessRegistry) -> Api:
    return Api(reg.url, (reg.data_dir / "admin-token").read_text().strip())


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def error(resp: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def ok(resp: requests.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    return resp.json()


@dataclass
class Tenant:
    """An org with an app and one token of each kind, made through the API by the admin."""

    org: str
    app: str
    org_token: str
    deploy_token: str
    readonly_token: str
    ids: dict[str, str]


def make_tenant(root: Api) -> Tenant:
    org, app = unique("org"), unique("app")
    ok(root.post("/orgs", {"name": org}), 201)
    ok(root.post("/apps", {"name": app, "org": org}), 201)
    secrets: dict[str, str] = {}
    ids: dict[str, str] = {}
    for kind, body in [
        ("org", {"kind": "org", "org": org}),
        ("deploy", {"kind": "deploy", "app": app}),
        ("readonly", {"kind": "readonly", "org": org}),
    ]:
        created = ok(root.post("/tokens", body), 201)
        secrets[kind], ids[kind] = created["secret"], created["id"]
    return Tenant(org, app, secrets["org"], secrets["deploy"], secrets["readonly"], ids)


def v2_status(base: str, secret: str) -> int:
    return authed(secret).get(f"{base}/v2/", timeout=30).status_code


# -- the document --------------------------------------------------------------------------------


def test_openapi_document_lists_every_served_path(server: InProcessRegistry) -> None:
    resp = requests.get(server.url + API + "/openapi.json", timeout=30)
    doc = ok(resp)
    assert doc["openapi"].startswith("3.1")
    documented = {
        (path, method.upper())
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {(API + path, method) for path, methods in ROUTES.items() for method in methods}
    assert documented == served
    assert {
        "/api/v1/openapi.json",
        "/api/v1/whoami",
        "/api/v1/orgs",
        "/api/v1/apps",
        "/api/v1/apps/{app}",
        "/api/v1/apps/{app}/images",
        "/api/v1/apps/{app}/images/{reference}",
        "/api/v1/gc",
        "/api/v1/gc/runs",
        "/api/v1/apps/{app}/retention",
        "/api/v1/orgs/{org}/usage",
        "/api/v1/orgs/{org}/quota",
        "/api/v1/replication",
        "/api/v1/apps/{app}/releases",
        "/api/v1/tokens",
        "/api/v1/tokens/{token_id}",
        "/api/v1/apps/{app}/machines",
        "/api/v1/apps/{app}/logs",
        "/api/v1/machines/{machine_id}",
        "/api/v1/machines/{machine_id}/logs",
        "/api/v1/machines/{machine_id}/stop",
        "/api/v1/machines/{machine_id}/start",
        "/api/v1/machines/{machine_id}/restart",
        "/api/v1/agent/machines",
        "/api/v1/agent/machines/{machine_id}/state",
        "/api/v1/agent/machines/{machine_id}/events",
        "/api/v1/agent/machines/{machine_id}/logs",
        "/api/v1/apps/{app}/builder",
        "/api/v1/apps/{app}/builds",
        "/api/v1/builds/{build_id}",
        "/api/v1/builds/{build_id}/logs",
        "/api/v1/builds/{build_id}/cancel",
        "/api/v1/builders",
        "/api/v1/builders/{builder_id}/claim",
        "/api/v1/builder/builds/{build_id}/logs",
        "/api/v1/builder/builds/{build_id}/result",
        "/api/v1/apps/{app}/secrets",
        "/api/v1/apps/{app}/secrets/unset",
        "/api/v1/secrets/rotate-key",
        "/api/v1/agent/machines/{machine_id}/secrets",
        "/api/v1/agent/machines/{machine_id}/health",
        "/api/v1/agent/routes",
        "/api/v1/agent/apps/{app}/images/{reference}/prefetch",
        "/api/v1/apps/{app}/sbom",
        "/api/v1/apps/{app}/vulns",
        "/api/v1/apps/{app}/files",
        "/api/v1/orgs/{org}/vulnsummary",
        "/api/v1/vulndb",
        "/api/v1/orgs/{org}/audit",
        "/api/v1/audit",
        "/api/v1/orgs/{org}/webhooks",
        "/api/v1/webhooks/{webhook_id}",
        "/api/v1/webhooks/{webhook_id}/deliveries",
        "/api/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
    } == set(doc["paths"])
    # Every documented operation answers something other than "no such endpoint".
    root = admin(server)
    for path, method in documented:
        concrete = (
            path.replace("{app}", "nonexistent-app")
            .replace("{token_id}", "nonexistent")
            .replace("{machine_id}", "nonexistent")
            .replace("{reference}", "v1")
            .replace("{org}", "nonexistent-org")
            .replace("{build_id}", "nonexistent")
            .replace("{builder_id}", "nonexistent")
            .replace("{webhook_id}", "nonexistent")
            .replace("{delivery_id}", "1")
        )
        r = requests.request(
            method, server.url + concrete, headers={"Authorization": f"Bearer {root.secret}"}
        )
        assert r.status_code != 405, (method, path)
        if r.status_code == 404:
            assert "no endpoint" not in r.json()["error"]["message"], (method, path)


def test_openapi_document_is_valid_openapi(server: InProcessRegistry) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = requests.get(server.url + API + "/openapi.json", timeout=30).json()
    validator.validate(doc)


def test_unknown_endpoint_method_and_bodies(server: InProcessRegistry) -> None:
    root = admin(server)
    error(root.get("/nope"), 404, "not_found")
    resp = root.request("PUT", "/orgs")
    error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "GET, POST"
    error(root.request("POST", "/orgs", data=b"{not json"), 400, "bad_request")
    error(root.post("/orgs", ["a list"]), 400, "bad_request")
    error(root.request("POST", "/orgs", data=b"x" * 70_000), 413, "too_large")
    # Chunked bodies (no Content-Length) are read whole, and limited the same way.
    chunks = iter([b'{"na', b'me": "', unique("org").encode(), b'"}'])
    assert root.request("POST", "/orgs", data=chunks).status_code == 201
    error(root.request("POST", "/orgs", data=iter([b"x" * 40_000] * 2)), 413, "too_large")


# -- whoami and orgs -----------------------------------------------------------------------------


def test_whoami(server: InProcessRegistry) -> None:
    root = admin(server)
    me = ok(root.get("/whoami"))
    assert me["kind"] == "admin" and me["org"] is None and me["active"] is True
    assert "secret" not in me
    tenant = make_tenant(root)
    for kind, secret in [
        ("org", tenant.org_token),
        ("deploy", tenant.deploy_token),
        ("readonly", tenant.readonly_token),
    ]:
        me = ok(root.as_(secret).get("/whoami"))
        assert me["kind"] == kind
        assert me["org"] == tenant.org
        assert me["id"] == tenant.ids[kind]
        assert me["app"] == (tenant.app if kind == "deploy" else None)
    # Basic with the token as password works too.
    me = ok(requests.get(server.url + API + "/whoami", auth=("anyone", tenant.org_token)))
    assert me["kind"] == "org"
    resp = root.as_(None).get("/whoami")
    error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")


def test_orgs(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    name = unique("org")
    created = ok(root.post("/orgs", {"name": name}), 201)
    assert created["name"] == name
    datetime.fromisoformat(created["created_at"])
    error(root.post("/orgs", {"name": name}), 409, "conflict")
    for bad in ["Upper", "-lead", "trail-", "a" * 64, "", "dots.no", "under_score", 5, None]:
        error(root.post("/orgs", {"name": bad}), 400, "bad_request")
    ok(root.post("/orgs", {"name": "a" * 63}), 201)
    names = {o["name"] for o in ok(root.get("/orgs"))["orgs"]}
    assert {tenant.org, other.org, name} <= names
    for secret in (tenant.org_token, tenant.deploy_token, tenant.readonly_token):
        listed = ok(root.as_(secret).get("/orgs"))["orgs"]
        assert [o["name"] for o in listed] == [tenant.org]
        error(root.as_(secret).post("/orgs", {"name": unique("org")}), 403, "forbidden")
    error(root.as_(None).get("/orgs"), 401, "unauthorized")


# -- apps ----------------------------------------------------------------------------------------


def test_apps_create_list_and_permissions(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    org_api = root.as_(tenant.org_token)

    # An org token creates apps in its own org (org may be left out).
    named = unique("app")
    created = ok(org_api.post("/apps", {"name": named, "org": tenant.org}), 201)
    assert created == {
        "name": named,
        "org": tenant.org,
        "public": False,
        "created_at": created["created_at"],
        "service": None,
    }
    implicit = ok(org_api.post("/apps", {"name": unique("app"), "public": True}), 201)
    assert implicit["org"] == tenant.org and implicit["public"] is True

    # Names are global: taken in another org is still taken.
    error(org_api.post("/apps", {"name": other.app}), 409, "conflict")
    error(root.post("/apps", {"name": named, "org": other.org}), 409, "conflict")
    for bad in ["Bad", "x_y", "a" * 64, "", "-a", "a/b"]:
        error(org_api.post("/apps", {"name": bad}), 400, "bad_request")
    error(org_api.post("/apps", {"name": unique(), "generate_name": True}), 400, "bad_request")
    error(org_api.post("/apps", {}), 400, "bad_request")
    error(org_api.post("/apps", {"name": unique(), "public": "yes"}), 400, "bad_request")
    error(root.post("/apps", {"name": unique()}), 400, "bad_request")  # admin: org required

    # Another org is invisible: 404 exactly as for an org that does not exist.
    foreign = org_api.post("/apps", {"name": unique(), "org": other.org})
    missing = org_api.post("/apps", {"name": unique(), "org": "no-such-org"})
    error(foreign, 404, "not_found")
    assert foreign.json()["error"]["message"].replace(other.org, "X") == missing.json()["error"][
        "message"
    ].replace("no-such-org", "X")

    # Deploy and read-only tokens may not create apps.
    for secret in (tenant.deploy_token, tenant.readonly_token):
        error(root.as_(secret).post("/apps", {"name": unique()}), 403, "forbidden")

    listed = {a["name"] for a in ok(org_api.get("/apps"))["apps"]}
    assert listed == {tenant.app, named, implicit["name"]}
    assert listed == {a["name"] for a in ok(root.get("/apps", params={"org": tenant.org}))["apps"]}
    assert {a["name"] for a in ok(root.as_(tenant.readonly_token).get("/apps"))["apps"]} == listed
    everything = {a["name"] for a in ok(root.get("/apps"))["apps"]}
    assert listed | {other.app} <= everything
    error(org_api.get("/apps", params={"org": other.org}), 404, "not_found")
    error(root.get("/apps", params={"org": "no-such-org"}), 404, "not_found")


def test_generated_app_names_are_readable_and_unique(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant = make_tenant(root)
    names = [
        ok(root.as_(tenant.org_token).post("/apps", {"generate_name": True}), 201)["name"]
        for _ in range(25)
    ]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z]+-[a-z]+-[0-9]{4}", name), name
    listed = {a["name"] for a in ok(root.get("/apps", params={"org": tenant.org}))["apps"]}
    assert set(names) <= listed


def test_app_details_visibility_and_public_flag(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    path = f"/apps/{tenant.app}"
    for secret in (root.secret, tenant.org_token, tenant.deploy_token, tenant.readonly_token):
        assert ok(root.as_(secret).get(path))["name"] == tenant.app
    foreign = root.as_(other.org_token).get(path)
    missing = root.as_(other.org_token).get("/apps/no-such-app")
    error(foreign, 404, "not_found")
    assert foreign.json() == json.loads(missing.text.replace("no-such-app", tenant.app))
    error(root.as_(None).get(path), 401, "unauthorized")

    error(root.as_(tenant.deploy_token).patch(path, {"public": True}), 403, "forbidden")
    error(root.as_(tenant.readonly_token).patch(path, {"public": True}), 403, "forbidden")
    error(root.as_(other.org_token).patch(path, {"public": True}), 404, "not_found")
    error(root.as_(tenant.org_token).patch(path, {"public": "yes"}), 400, "bad_request")
    error(root.as_(tenant.org_token).patch(path, {"name": "x"}), 400, "bad_request")
    assert ok(root.as_(tenant.org_token).patch(path, {"public": True}))["public"] is True

    # Public: anyone sees it, but only its org changes it.
    assert ok(root.as_(None).get(path))["public"] is True
    assert ok(root.as_(other.org_token).get(path))["public"] is True
    error(root.as_(other.org_token).patch(path, {"public": False}), 403, "forbidden")
    error(root.as_(None).patch(path, {"public": False}), 401, "unauthorized")
    assert ok(root.patch(path, {"public": False}))["public"] is False
    error(root.as_(None).get(path), 401, "unauthorized")


# -- images --------------------------------------------------------------------------------------


def test_images_listing(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    empty = ok(root.as_(tenant.readonly_token).get(f"/apps/{tenant.app}/images"))
    assert empty == {"app": tenant.app, "images": []}

    before = datetime.now(UTC) - timedelta(seconds=5)
    deploy = authed(tenant.deploy_token)
    digest, size = push_sized_image(deploy, server.url, tenant.app, "v1")
    push_sized_image(deploy, server.url, tenant.app, "v2")
    sub_digest, _ = push_sized_image(deploy, server.url, f"{tenant.app}/worker", "latest")
    push_sized_image(authed(other.deploy_token), server.url, other.app, "v1")

    path = f"/apps/{tenant.app}/images"
    for secret in (root.secret, tenant.org_token, tenant.deploy_token, tenant.readonly_token):
        listed = ok(root.as_(secret).get(path))
        assert listed["app"] == tenant.app
        rows = {(i["repository"], i["tag"]): i for i in listed["images"]}
        assert set(rows) == {
            (tenant.app, "v1"),
            (tenant.app, "v2"),
            (f"{tenant.app}/worker", "latest"),
        }
    v1 = rows[(tenant.app, "v1")]
    assert v1["digest"] == digest
    assert v1["media_type"] == OCI_MANIFEST
    assert v1["size"] == size
    assert before <= datetime.fromisoformat(v1["pushed_at"]) <= datetime.now(UTC)
    assert rows[(f"{tenant.app}/worker", "latest")]["digest"] == sub_digest

    # Another org: 404 like a missing app; anonymous: 401 until the app is public.
    error(root.as_(other.readonly_token).get(path), 404, "not_found")
    error(root.as_(None).get(path), 401, "unauthorized")
    ok(root.as_(tenant.org_token).patch(f"/apps/{tenant.app}", {"public": True}))
    assert len(ok(root.as_(None).get(path))["images"]) == 3
    assert len(ok(root.as_(other.readonly_token).get(path))["images"]) == 3

    # A public app: anonymous pull, never anonymous push.
    anonymous = requests.Session()
    r = anonymous.get(
        f"{server.url}/v2/{tenant.app}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert r.status_code == 200, r.text
    r = anonymous.post(
        f"{server.url}/v2/{tenant.app}/blobs/uploads/",
        params={"digest": sha256(b"anon")},
        data=b"anon",
    )
    assert r.status_code == 401


# -- tokens --------------------------------------------------------------------------------------


def test_token_creation_permissions(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    org_api = root.as_(tenant.org_token)

    # An org token creates every non-admin kind in its own org.
    for body in [
        {"kind": "org"},
        {"kind": "readonly", "org": tenant.org},
        {"kind": "deploy", "app": tenant.app, "name": "ci", "expiry": "720h"},
    ]:
        resp = org_api.post("/tokens", body)
        created = ok(resp, 201)
        assert created["kind"] == body["kind"] and created["org"] == tenant.org
        assert created["secret"].startswith("skyreg_")
        assert resp.headers["Cache-Control"] == "no-store"
    deploy = created
    assert deploy["app"] == tenant.app and deploy["name"] == "ci"
    expires = datetime.fromisoformat(deploy["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(hours=720))) < timedelta(minutes=1)
    seconds = ok(root.post("/tokens", {"kind": "readonly", "org": tenant.org, "expiry": 90}), 201)
    delta = datetime.fromisoformat(seconds["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=30) < delta <= timedelta(seconds=90)

    # Never another org's, never an admin token, never by deploy or read-only tokens.
    error(org_api.post("/tokens", {"kind": "org", "org": other.org}), 404, "not_found")
    error(org_api.post("/tokens", {"kind": "deploy", "app": other.app}), 404, "not_found")
    error(org_api.post("/tokens", {"kind": "admin"}), 400, "bad_request")
    error(root.post("/tokens", {"kind": "admin"}), 400, "bad_request")
    for secret in (tenant.deploy_token, tenant.readonly_token):
        error(root.as_(secret).post("/tokens", {"kind": "readonly"}), 403, "forbidden")
        error(root.as_(secret).get("/tokens"), 403, "forbidden")

    # Malformed requests.
    for body in [
        {"kind": "nope"},
        {},
        {"kind": "deploy"},
        {"kind": "readonly", "app": tenant.app},
        {"kind": "deploy", "app": tenant.app, "org": other.org},
        {"kind": "org", "expiry": "10x"},
        {"kind": "org", "expiry": "0"},
        {"kind": "org", "expiry": -5},
        {"kind": "org", "expiry": True},
        {"kind": "org", "expiry": "1000000h"},
        {"kind": "org", "name": "n" * 101},
        {"kind": "org", "name": 7},
    ]:
        error(org_api.post("/tokens", body), 400, "bad_request")
    error(root.post("/tokens", {"kind": "org"}), 400, "bad_request")  # admin: org required


def test_token_kinds_grant_what_they_say(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant = make_tenant(root)
    sibling = unique("app")
    ok(root.post("/apps", {"name": sibling, "org": tenant.org}), 201)
    push_sized_image(authed(tenant.org_token), server.url, sibling, "v1")

    # deploy: push and pull its app, pull (not push) the org's other apps.
    deploy = authed(tenant.deploy_token)
    push_sized_image(deploy, server.url, tenant.app, "v1")
    assert deploy.get(f"{server.url}/v2/{sibling}/tags/list").status_code == 200
    r = deploy.post(f"{server.url}/v2/{sibling}/blobs/uploads/")
    assert r.status_code == 403
    # readonly: pull only.
    readonly = authed(tenant.readonly_token)
    assert readonly.get(f"{server.url}/v2/{tenant.app}/tags/list").status_code == 200
    assert readonly.post(f"{server.url}/v2/{tenant.app}/blobs/uploads/").status_code == 403


def test_token_list_never_shows_secrets(server: InProcessRegistry) -> None:
    root = admin(server)
    tenant, other = make_tenant(root), make_tenant(root)
    created = ok(
        root.as_(tenant.org_token).post(
            "/tokens", {"kind": "deploy", "app": tenant.app, "name": "ci"}
        ),
        201,
    )
    secrets = [
        root.secret,
        tenant.org_token,
        tenant.deploy_token,
        tenant.readonly_token,
        other.org_token,
        created["secret"],
    ]
    assert all(secrets)

    listings = [
        root.get("/tokens"),
        root.get("/tokens", params={"org": tenant.org}),
        root.as_(tenant.org_token).get("/tokens"),
        root.as_(tenant.org_token).get("/whoami"),
    ]
    for resp in listings:
        ok(resp)
        for secret in secrets:
            assert secret is not None
            assert secret not in resp.text
            assert secret_sha256(secret) not in resp.text
        assert "secret" not in resp.text
    tokens = listings[2].json()["tokens"]
    assert {t["org"] for t in tokens} == {tenant.org}
    assert {t["id"] for t in tokens} == {*tenant.ids.values(), created["id"]}
    entry = next(t for t in tokens if t["id"] == created["id"])
    assert entry == {
        "id": created["id"],
        "name": "ci",
        "kind": "deploy",
        "org": tenant.org,
        "app": tenant.app,
        "created_at": created["created_at"],
        "expires_at": None,
        "revoked_at": None,
        "active": True,
    }
    all_ids = {t["id"] for t in listings[0].json()["tokens"]}
    assert {*tenant.ids.values(), *other.ids.values()} <= all_ids
    error(root.as_(tenant.org_token).get("/tokens", params={"org": other.org}), 404, "not_found")
    log = server.log()
    assert '"POST /api/v1/tokens HTTP/1.1" 201' in log  # the log holds the requests
    for secret in secrets:
        assert secret is not None and secret not in log


def test_revocation_takes_effect_at_once(fresh: InProcessRegistry) -> None:
    root = admin(fresh)
    tenant, other = make_tenant(root), make_tenant(root)
    deploy_api = root.as_(tenant.deploy_token)
    assert ok(deploy_api.get("/whoami"))["id"] == tenant.ids["deploy"]
    assert v2_status(fresh.url, tenant.deploy_token) == 200

    # Who may revoke what: another org sees nothing, a deploy token only itself.
    target = tenant.ids["deploy"]
    error(root.as_(other.org_token).delete(f"/tokens/{target}"), 404, "not_found")
    error(root.as_(other.org_token).delete("/tokens/doesnotexist"), 404, "not_found")
    error(root.as_(tenant.readonly_token).delete(f"/tokens/{target}"), 403, "forbidden")

    revoked = ok(root.as_(tenant.org_token).delete(f"/tokens/{target}"))
    assert revoked["id"] == target and revoked["active"] is False and revoked["revoked_at"]
    error(deploy_api.get("/whoami"), 401, "unauthorized")
    assert v2_status(fresh.url, tenant.deploy_token) == 401
    listed = {t["id"]: t for t in ok(root.get("/tokens", params={"org": tenant.org}))["tokens"]}
    assert listed[target]["active"] is False
    assert ok(root.delete(f"/tokens/{target}"))["revoked_at"] == revoked["revoked_at"]

    # A token may revoke itself.
    readonly_api = root.as_(tenant.readonly_token)
    ok(readonly_api.delete(f"/tokens/{tenant.ids['readonly']}"))
    error(readonly_api.get(f"/apps/{tenant.app}"), 401, "unauthorized")

    # The last admin token stays.
    admin_id = ok(root.get("/whoami"))["id"]
    error(root.delete(f"/tokens/{admin_id}"), 409, "conflict")
    assert ok(root.get("/whoami"))["active"] is True


def test_expired_tokens_stop_working(fresh: InProcessRegistry) -> None:
    root = admin(fresh)
    tenant = make_tenant(root)
    created = ok(
        root.as_(tenant.org_token).post("/tokens", {"kind": "readonly", "expiry": "1s"}), 201
    )
    short = root.as_(created["secret"])
    deadline = time.monotonic() + 15
    while True:
        resp = short.get("/whoami")
        if resp.status_code == 401:
            break
        assert resp.status_code == 200, resp.text
        assert time.monotonic() < deadline, "the token did not expire"
        time.sleep(0.1)
    error(resp, 401, "unauthorized")
    assert v2_status(fresh.url, created["secret"]) == 401
    listed = {t["id"]: t for t in ok(root.get("/tokens", params={"org": tenant.org}))["tokens"]}
    assert listed[created["id"]]["active"] is False
    assert listed[created["id"]]["revoked_at"] is None


def test_failed_authentication_is_throttled(fresh: InProcessRegistry) -> None:
    root = admin(fresh)
    for _ in range(10):
        error(root.as_("skyreg_wrong").get("/whoami"), 401, "unauthorized")
    resp = root.as_("skyreg_wrong").get("/whoami")
    error(resp, 429, "too_many_requests")
    assert int(resp.headers["Retry-After"]) >= 1
    # The same limiter as the registry's, and valid credentials are never refused for the
    # failures (tests/security/test_tokens_and_limits.py): here and on /v2/.
    assert root.get("/whoami").status_code == 200
    assert v2_status(fresh.url, str(root.secret)) == 200
    assert v2_status(fresh.url, "skyreg_wrong") == 429


def test_unknown_fields_are_refused_and_change_nothing(server: InProcessRegistry) -> None:
    """Every request body is decoded into its declared model: a field it does not declare is
    a 400 naming the field, on every route with a body, and nothing is created."""
    root = admin(server)
    tenant = make_tenant(root)
    org, app = unique("org"), unique("app")
    for method, path, body in [
        ("POST", "/orgs", {"name": org}),
        ("POST", "/apps", {"name": app, "org": tenant.org}),
        ("PATCH", f"/apps/{tenant.app}", {"public": True}),
        ("POST", "/tokens", {"kind": "readonly", "org": tenant.org}),
        ("POST", f"/apps/{tenant.app}/releases", {"image": f"{tenant.app}:v1"}),
    ]:
        resp = root.request(method, path, json={**body, "colour": "blue"})
        assert "colour" in error(resp, 400, "bad_request")["error"]["message"], (method, path)
    assert org not in {o["name"] for o in ok(root.get("/orgs"))["orgs"]}
    error(root.get(f"/apps/{app}"), 404, "not_found")
    assert ok(root.get(f"/apps/{tenant.app}"))["public"] is False
    listed = ok(root.get("/tokens", params={"org": tenant.org}))["tokens"]
    assert sorted(t["kind"] for t in listed) == ["deploy", "org", "readonly"]


def test_answers_match_the_generated_document(server: InProcessRegistry) -> None:
    """The document's schemas come from the same models the answers are encoded from: every
    field an answer has is declared, and every declared required field is there."""
    root = admin(server)
    tenant = make_tenant(root)
    doc = ok(root.get("/openapi.json"))
    schemas = doc["components"]["schemas"]

    def schema_of(path: str, method: str, status: str) -> dict[str, Any]:
        answer = doc["paths"][API + path][method]["responses"][status]
        ref = answer["content"]["application/json"]["schema"]["$ref"]
        found: dict[str, Any] = schemas[ref.rsplit("/", 1)[1]]
        return found

    for path, method, status, body in [
        ("/whoami", "get", "200", ok(root.get("/whoami"))),
        ("/apps/{app}", "get", "200", ok(root.get(f"/apps/{tenant.app}"))),
        ("/orgs", "post", "201", ok(root.post("/orgs", {"name": unique("org")}), 201)),
        (
            "/tokens",
            "post",
            "201",
            ok(root.post("/tokens", {"kind": "org", "org": tenant.org}), 201),
        ),
    ]:
        schema = schema_of(path, method, status)
        assert set(schema["required"]) <= set(body) <= set(schema["properties"]), path
        assert schema.get("additionalProperties") is not True
    create_org = doc["paths"][API + "/orgs"]["post"]["requestBody"]["content"]
    request = schemas[create_org["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert request["additionalProperties"] is False and request["required"] == ["name"]
