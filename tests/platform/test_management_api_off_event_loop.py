"""Issue 11: the management API (/api/v1) and /graphql issue no SQL query on the event loop.

The server runs with SKYREG_STRICT_DB_THREADS=1, under which a query issued on a thread running
an event loop raises `LoopBlocked` (a 500 here). Every route of `ROUTES` is called, each on a
path that reaches its database work (and error answers whose checks query: 401, 403, 404, 409).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from skyreg.client.sealing import new_private_key, public_key_b64
from skyreg.platform.api import ROUTES
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import Image, push_image
from tests.support.platform import Tenancy

API = "/api/v1"
STRICT = {"SKYREG_STRICT_DB_THREADS": "1"}


@dataclass
class Strict:
    reg: InProcessRegistry
    admin: str
    image: Image
    seen: set[tuple[str, str]]
    audited: dict[tuple[str, str], int] = field(default_factory=dict)  # entries each call left

    def call(
        self, method: str, route: str, path: str | None = None, secret: str | None = "", **kw: Any
    ) -> requests.Response:
        """`method` on `route` (a `ROUTES` key; `path` fills its parameters), as `secret`
        (default: the admin token; None: anonymous). A mutating call must leave exactly one
        audit entry, naming the caller's token and what the call named (none for routes the
        document marks `x-skyreg-audited: false`)."""
        self.seen.add((route, method))
        token = self.admin if secret == "" else secret
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        before = self._last_audit_id() if method != "GET" else 0
        r = requests.request(
            method, self.reg.url + API + (path or route), headers=headers, timeout=60, **kw
        )
        if method != "GET":
            new = self._audit_after(before)
            expected_actor = self._token_id(token)
            if ROUTES[route][method].audited:
                assert len(new) == 1, (method, route, new)
                entry = new[0]
                assert entry["action"] == ROUTES[route][method].operation_id, entry
                assert entry["target"] == f"{method} {API}{path or route}", entry
                assert entry["actor_id"] == expected_actor, entry
                assert entry["status"] == r.status_code, entry
                assert entry["client"] == "127.0.0.1", entry
            else:
                assert new == [], (method, route, new)
            self.audited[(route, method)] = len(new)
        return r

    def _audit_after(self, after: int) -> list[dict[str, Any]]:
        r = requests.get(
            self.reg.url + API + "/audit",
            params={"after": str(after)},
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return list(r.json()["entries"])

    def _last_audit_id(self) -> int:
        entries = self._audit_after(0)
        while True:
            more = self._audit_after(entries[-1]["id"]) if entries else []
            if not more:
                return int(entries[-1]["id"]) if entries else 0
            entries = more

    def _token_id(self, secret: str | None) -> str | None:
        if secret is None:
            return None
        r = requests.get(
            self.reg.url + API + "/whoami",
            headers={"Authorization": f"Bearer {secret}"},
            timeout=60,
        )
        return str(r.json()["id"]) if r.status_code == 200 else None


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Strict]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("strict") / "data",
        options={"webhook_allow_private": True},  # its webhook points at a closed local port
    )
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("web", "acme")
        admin = t.admin_secret()
        session = requests.Session()
        session.auth = ("x", admin)
        image = push_image(reg.url, "web", "v1", session=session)
        # Only the management API is under test here: the image is pushed before strict mode.
        reg.env = dict(STRICT)
        reg.restart()
        yield Strict(reg, admin, image, set())
    finally:
        reg.stop()


def _ok(r: requests.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    return r.json() if r.content else {}


_OSV_RECORD = {
    "id": "PYSEC-1",
    "modified": "2026-01-01T00:00:00Z",
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "idna"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.7"}]}],
        }
    ],
}


def test_every_management_route_queries_off_the_event_loop(strict: Strict) -> None:
    s = strict
    _ok(s.call("GET", "/openapi.json", secret=None), 200)
    _ok(s.call("GET", "/whoami"), 200)
    _ok(s.call("GET", "/whoami", secret="skyreg_wrong"), 401)
    _ok(s.call("GET", "/orgs"), 200)
    _ok(s.call("POST", "/orgs", json={"name": "beta"}), 201)
    _ok(s.call("POST", "/orgs", json={"name": "beta"}), 409)
    _ok(s.call("GET", "/apps", params={"org": "acme"}), 200)
    _ok(s.call("POST", "/apps", json={"org": "acme", "generate_name": True}), 201)
    _ok(s.call("GET", "/apps/{app}", "/apps/web"), 200)
    _ok(s.call("GET", "/apps/{app}", "/apps/nope", secret=None), 401)
    _ok(s.call("PATCH", "/apps/{app}", "/apps/web", json={"public": False}), 200)
    _ok(s.call("GET", "/apps/{app}/images", "/apps/web/images"), 200)
    _ok(s.call("GET", "/apps/{app}/images/{reference}", "/apps/web/images/v1"), 200)
    _ok(s.call("GET", "/replication"), 200)
    release = _ok(
        s.call("POST", "/apps/{app}/releases", "/apps/web/releases", json={"image": "web:v1"}),
        201,
    )
    assert release["image_digest"] == s.image.digest
    _ok(s.call("GET", "/apps/{app}/releases", "/apps/web/releases"), 200)
    _ok(s.call("GET", "/gc"), 200)
    _ok(s.call("POST", "/gc/runs", json={"dry_run": True}), 200)
    retention, web_retention = "/apps/{app}/retention", "/apps/web/retention"
    policy = {"keep_recent": 5, "keep_tags": ["v*"]}
    _ok(s.call("PUT", retention, web_retention, json=policy, params={"dry_run": "true"}), 200)
    _ok(s.call("PUT", retention, web_retention, json=policy), 200)
    _ok(s.call("GET", retention, web_retention), 200)
    _ok(s.call("DELETE", retention, web_retention), 204)
    _ok(s.call("PUT", "/orgs/{org}/quota", "/orgs/acme/quota", json={"hard": "1GiB"}), 200)
    _ok(s.call("GET", "/orgs/{org}/usage", "/orgs/acme/usage"), 200)
    _ok(s.call("DELETE", "/orgs/{org}/quota", "/orgs/acme/quota"), 204)
    _ok(s.call("DELETE", "/apps/{app}/images/{reference}", "/apps/web/images/nope"), 404)
    machines = _ok(s.call("GET", "/apps/{app}/machines", "/apps/web/machines"), 200)["machines"]
    machine = machines[0]["id"]
    agent = _ok(s.call("GET", "/agent/machines", params={"region": "local"}), 200)
    assert machine in [m["id"] for m in agent["machines"]]
    base = f"/agent/machines/{machine}"
    route = "/agent/machines/{machine_id}"
    _ok(s.call("POST", route + "/state", base + "/state", json={"state": "starting"}), 200)
    _ok(s.call("POST", route + "/events", base + "/events", json={"message": "hi"}), 201)
    _ok(s.call("POST", route + "/logs", base + "/logs", json={"lines": ["a line"]}), 201)
    # Its release has no health checks: refused, after reading the machine.
    _ok(s.call("POST", route + "/health", base + "/health", json={"status": "passing"}), 409)
    _ok(s.call("GET", "/agent/routes"), 200)
    prefetch = "/agent/apps/{app}/images/{reference}/prefetch"
    web_prefetch = f"/agent/apps/web/images/{s.image.digest}/prefetch"
    layer = "sha256:" + hashlib.sha256(s.image.layers[0]).hexdigest()
    ranges = {"ranges": [{"layer": layer, "offset": 0, "length": 1}]}
    _ok(s.call("PUT", prefetch, web_prefetch, json=ranges), 200)
    assert _ok(s.call("GET", prefetch, web_prefetch), 200)["ranges"] == ranges["ranges"]
    logs = _ok(s.call("GET", "/apps/{app}/logs", "/apps/web/logs"), 200)
    assert [ln["line"] for ln in logs["lines"]] == ["a line"]
    one = _ok(s.call("GET", "/machines/{machine_id}", f"/machines/{machine}"), 200)
    assert [e["message"] for e in one["events"]][-1] == "hi"
    tail = _ok(
        s.call("GET", "/machines/{machine_id}/logs", f"/machines/{machine}/logs?tail=5"), 200
    )
    assert [ln["line"] for ln in tail["lines"]] == ["a line"]
    for action in ("stop", "start", "restart"):
        changed = s.call(
            "POST", f"/machines/{{machine_id}}/{action}", f"/machines/{machine}/{action}"
        )
        _ok(changed, 200)
    # Secrets: set (staged, so no release), listed, unset, the key rotated; a machine's values.
    web_secrets = "/apps/web/secrets"
    staged = {"secrets": {"DB_PASSWORD": "hunter2"}, "stage": True}
    _ok(s.call("POST", "/apps/{app}/secrets", web_secrets, json=staged), 200)
    _ok(s.call("GET", "/apps/{app}/secrets", web_secrets), 200)
    unset = {"names": ["DB_PASSWORD"], "stage": True}
    _ok(s.call("POST", "/apps/{app}/secrets/unset", web_secrets + "/unset", json=unset), 200)
    _ok(s.call("POST", "/secrets/rotate-key"), 200)
    given = s.call("POST", route + "/secrets", base + "/secrets", json={"generation": 0})
    assert _ok(given, 200) == {"env": {}}
    # Builds: a builder registers, a build of a blob of the app is queued, claimed, logged, ended.
    key = public_key_b64(new_private_key())
    builder = _ok(s.call("POST", "/builders", json={"region": "local", "public_key": key}), 201)
    _ok(s.call("GET", "/apps/{app}/builder", "/apps/web/builder"), 200)
    context = "sha256:" + hashlib.sha256(s.image.layers[0]).hexdigest()
    build = _ok(
        s.call("POST", "/apps/{app}/builds", "/apps/web/builds", json={"context_digest": context}),
        201,
    )
    _ok(s.call("GET", "/apps/{app}/builds", "/apps/web/builds"), 200)
    claim = f"/builders/{builder['id']}/claim"
    assert (
        _ok(s.call("POST", "/builders/{builder_id}/claim", claim), 200)["build"]["id"]
        == build["id"]
    )
    held = f"/builder/builds/{build['id']}"
    _ok(
        s.call("POST", "/builder/builds/{build_id}/logs", held + "/logs", json={"lines": ["x"]}),
        200,
    )
    _ok(s.call("GET", "/builds/{build_id}", f"/builds/{build['id']}"), 200)
    _ok(s.call("GET", "/builds/{build_id}/logs", f"/builds/{build['id']}/logs"), 200)
    _ok(s.call("POST", "/builds/{build_id}/cancel", f"/builds/{build['id']}/cancel"), 200)
    result = {"status": "cancelled"}
    _ok(s.call("POST", "/builder/builds/{build_id}/result", held + "/result", json=result), 200)
    # Scans: the image is queued (no scan worker here), its files and findings not there yet.
    _ok(s.call("GET", "/apps/{app}/vulns", "/apps/web/vulns", params={"image": "v1"}), 200)
    _ok(s.call("GET", "/apps/{app}/files", "/apps/web/files", params={"image": "v1"}), 200)
    _ok(s.call("GET", "/apps/{app}/sbom", "/apps/web/sbom", params={"image": "v1"}), 404)
    _ok(s.call("GET", "/orgs/{org}/vulnsummary", "/orgs/acme/vulnsummary"), 200)
    _ok(s.call("GET", "/vulndb"), 200)
    advisories = io.BytesIO()
    with zipfile.ZipFile(advisories, "w") as archive:
        archive.writestr("PYSEC-1.json", json.dumps(_OSV_RECORD))
    _ok(s.call("POST", "/vulndb", data=advisories.getvalue()), 200)
    _ok(s.call("GET", "/tokens"), 200)
    created = _ok(s.call("POST", "/tokens", json={"kind": "readonly", "org": "acme"}), 201)
    _ok(s.call("DELETE", "/tokens/{token_id}", f"/tokens/{created['id']}"), 200)
    # Webhooks: made, listed, its deliveries listed and one sent again, deleted.
    hook = _ok(
        s.call(
            "POST",
            "/orgs/{org}/webhooks",
            "/orgs/acme/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["dev.skyreg.release.created"]},
        ),
        201,
    )
    _ok(s.call("GET", "/orgs/{org}/webhooks", "/orgs/acme/webhooks"), 200)
    _ok(s.call("POST", "/apps/{app}/releases", "/apps/web/releases", json={"image": "web:v1"}), 201)
    hook_path = f"/webhooks/{hook['id']}"
    listed = _ok(s.call("GET", "/webhooks/{webhook_id}/deliveries", hook_path + "/deliveries"), 200)
    again = f"{hook_path}/deliveries/{listed['deliveries'][0]['id']}/redeliver"
    route = "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
    _ok(s.call("POST", route, again), 201)
    _ok(s.call("DELETE", "/webhooks/{webhook_id}", hook_path), 204)
    log = _ok(s.call("GET", "/orgs/{org}/audit", "/orgs/acme/audit"), 200)["entries"]
    assert {e["org"] for e in log} == {"acme"} and log
    _ok(s.call("GET", "/audit"), 200)
    assert s.seen == {(path, method) for path, methods in ROUTES.items() for method in methods}
    # Every mutating operation of the document was called and audited as it says.
    document = _ok(s.call("GET", "/openapi.json", secret=None), 200)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
                expected = 0 if operation.get("x-skyreg-audited") is False else 1
                assert s.audited[(path.removeprefix(API), method.upper())] == expected, path
    assert "LoopBlocked" not in s.reg.log()


def test_graphql_queries_off_the_event_loop(strict: Strict) -> None:
    query = '{ app(name: "web") { releasesUnprocessed(first: 5) { nodes { version } } } }'
    r = requests.post(
        f"{strict.reg.url}/graphql",
        json={"query": query},
        headers={"Authorization": f"Bearer {strict.admin}"},
        timeout=60,
    )
    _ok(r, 200)
    wrong = requests.post(
        f"{strict.reg.url}/graphql",
        json={"query": query},
        headers={"Authorization": "Bearer skyreg_wrong"},
        timeout=60,
    )
    assert wrong.status_code == 401, wrong.text
    assert "LoopBlocked" not in strict.reg.log()


def test_body_errors_still_answer_after_the_checks_made_before_reading_the_body(
    strict: Strict,
) -> None:
    """Bodies are read before the handler runs on a database thread; a body too large or
    unreadable is still refused only where the handler reads it, after its earlier checks."""
    s = strict
    big, gzip = b"x" * 70_000, {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    assert s.call("POST", "/orgs", secret=None, data=big).status_code == 401
    assert s.call("POST", "/orgs", secret=None, data=b"not gzip", headers=gzip).status_code == 401
    readonly = _ok(s.call("POST", "/tokens", json={"kind": "readonly", "org": "acme"}), 201)
    refused = s.call("POST", "/tokens", secret=readonly["secret"], data=big)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    route, missing = "/agent/machines/{machine_id}/state", "/agent/machines/0f/state"
    assert s.call("POST", route, missing, data=big).status_code == 404
    assert s.call("POST", "/orgs", data=big).status_code == 413
    bad = s.call("POST", "/orgs", data=b"not gzip", headers=gzip)
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_request")
    assert "LoopBlocked" not in s.reg.log()
