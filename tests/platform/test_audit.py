"""The audit log: registry pushes and deletions, whose log an entry goes to, who may read it, the
`skyreg audit` command and the retention. (Every mutating management API operation leaving
exactly one entry is walked in tests/platform/test_management_api_off_event_loop.py.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.meta.audit import AuditMeta
from skyreg.meta.registry import open_database
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, cli_env, refused, run_skyreg


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("audit") / "data")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Org:
    name: str
    app: str
    org_token: str
    org_token_id: str
    deploy: str
    deploy_id: str
    readonly: str


def _org(server: InProcessRegistry) -> Org:
    t = Tenancy(server.data_dir)
    name, app = f"org{uuid.uuid4().hex[:8]}", f"app{uuid.uuid4().hex[:8]}"
    t.org(name)
    t.app(app, name)
    org_token, org_token_id = t.token("org", org=name)
    deploy, deploy_id = t.token("deploy", org=name, app=app)
    return Org(
        name, app, org_token, org_token_id, deploy, deploy_id, t.token("readonly", org=name)[0]
    )


def _log(server: InProcessRegistry, org: Org) -> list[dict[str, Any]]:
    return list(
        answer(api(server, "GET", f"/orgs/{org.name}/audit", org.org_token), 200)["entries"]
    )


def test_pushes_and_deletions_are_audited_in_the_app_s_org(server: InProcessRegistry) -> None:
    org = _org(server)
    session = requests.Session()
    session.auth = ("x", org.deploy)
    image = push_image(server.url, org.app, "v1", session=session)
    r = session.delete(f"{server.url}/v2/{org.app}/manifests/{image.digest}")
    assert r.status_code == 202, r.text
    entries = [e for e in _log(server, org) if e["action"] in ("pushManifest", "deleteManifest")]
    assert [(e["action"], e["target"], e["status"]) for e in entries] == [
        ("pushManifest", f"{org.app}:v1", 201),
        ("deleteManifest", f"{org.app}@{image.digest}", 202),
    ]
    assert {(e["actor_id"], e["actor_kind"], e["org"], e["client"]) for e in entries} == {
        (org.deploy_id, "deploy", org.name, "127.0.0.1")
    }


def test_an_attempt_on_another_org_is_the_attempter_s_entry(server: InProcessRegistry) -> None:
    """A refused push into another org's app lands in the pusher's own log: the victim's log
    shows no foreign token, the attempter's shows its own refused attempt."""
    victim, attacker = _org(server), _org(server)
    session = requests.Session()
    session.auth = ("x", attacker.org_token)
    r = session.put(
        f"{server.url}/v2/{victim.app}/manifests/x",
        data=b"{}",
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert r.status_code in (401, 403), r.text
    mine = [e for e in _log(server, attacker) if e["action"] == "pushManifest"]
    assert [(e["target"], e["status"], e["actor_id"]) for e in mine] == [
        (f"{victim.app}:x", r.status_code, attacker.org_token_id)
    ]
    assert all(e["actor_id"] != attacker.org_token_id for e in _log(server, victim))
    # An API call naming the other org's app: the same.
    api(server, "POST", f"/apps/{victim.app}/secrets", attacker.org_token, json={"secrets": {}})
    assert all(e["actor_id"] != attacker.org_token_id for e in _log(server, victim))


def test_only_the_org_and_admins_read_its_log(server: InProcessRegistry) -> None:
    org, other = _org(server), _org(server)
    refused(api(server, "GET", f"/orgs/{org.name}/audit", org.readonly), 403, "forbidden")
    refused(api(server, "GET", f"/orgs/{org.name}/audit", org.deploy), 403, "forbidden")
    refused(api(server, "GET", f"/orgs/{org.name}/audit", other.org_token), 404, "not_found")
    refused(api(server, "GET", f"/orgs/{org.name}/audit", None), 401, "unauthorized")
    refused(api(server, "GET", "/audit", org.org_token), 403, "forbidden")
    refused(
        api(server, "GET", f"/orgs/{org.name}/audit", org.org_token, params={"since": "yesterday"}),
        400,
        "bad_request",
    )
    admin = Tenancy(server.data_dir).admin_secret()
    answer(api(server, "GET", f"/orgs/{org.name}/audit", admin), 200)


def test_skyreg_audit_lists_and_exports_an_org_s_log(
    server: InProcessRegistry, tmp_path: Path
) -> None:
    org = _org(server)
    made = answer(
        api(server, "POST", "/tokens", org.org_token, json={"kind": "readonly", "org": org.name}),
        201,
    )
    answer(api(server, "DELETE", f"/tokens/{made['id']}", org.org_token), 200)
    env = cli_env(tmp_path, server.url, org.org_token)
    table = run_skyreg(env, "audit", "--org", org.name)
    assert "createToken" in table and "revokeToken" in table
    lines = run_skyreg(env, "audit", "--org", org.name, "--jsonl", "--since", "1h").splitlines()
    exported = [json.loads(line) for line in lines]
    assert [e["action"] for e in exported] == ["createToken", "revokeToken"]
    assert exported[1]["target"] == f"DELETE /api/v1/tokens/{made['id']}"
    assert json.loads(run_skyreg(env, "audit", "--org", org.name, "--json")) == exported
    assert (
        run_skyreg(env, "audit", "--org", org.name, "--jsonl", "--since", "2999-01-01T00:00:00Z")
        == ""
    )


def test_entries_past_the_retention_go(server: InProcessRegistry) -> None:
    org = _org(server)
    answer(
        api(server, "POST", "/tokens", org.org_token, json={"kind": "readonly", "org": org.name}),
        201,
    )
    meta = open_database(None, server.data_dir)
    audit = AuditMeta(meta.engine)
    try:
        assert audit.expire(timedelta(days=1)) == 0  # nothing that old
        assert audit.expire(timedelta(seconds=-60)) > 0  # everything is older than the future
    finally:
        audit.close()
        meta.close()
    assert _log(server, org) == []


def test_the_log_reads_newest_first_paged_backwards(server: InProcessRegistry) -> None:
    org = _org(server)
    for i in range(5):
        body = {"kind": "readonly", "org": org.name, "name": f"newest-{i}"}
        answer(api(server, "POST", "/tokens", org.org_token, json=body), 201)
    oldest_first = [e["id"] for e in _log(server, org)]
    assert len(oldest_first) == 5
    path = f"/orgs/{org.name}/audit?order=newest&limit=2"
    first = answer(api(server, "GET", path, org.org_token), 200)
    assert [e["id"] for e in first["entries"]] == oldest_first[:-3:-1]
    assert first["next_after"] is None and first["next_before"] == oldest_first[-2]
    second = answer(api(server, "GET", f"{path}&before={first['next_before']}", org.org_token), 200)
    assert [e["id"] for e in second["entries"]] == oldest_first[-3:-5:-1]
    third = answer(api(server, "GET", f"{path}&before={second['next_before']}", org.org_token), 200)
    assert [e["id"] for e in third["entries"]] == oldest_first[:1]
    assert third["next_before"] is None
    # Oldest first stays the default, paged forwards only.
    assert (
        answer(api(server, "GET", f"/orgs/{org.name}/audit?limit=2", org.org_token), 200)[
            "next_before"
        ]
        is None
    )
    refused(
        api(server, "GET", f"/orgs/{org.name}/audit?before=3", org.org_token), 400, "bad_request"
    )
    refused(
        api(server, "GET", f"/orgs/{org.name}/audit?order=sideways", org.org_token),
        400,
        "bad_request",
    )


def test_calls_without_a_token_fill_no_org_s_log_past_a_bound(server: InProcessRegistry) -> None:
    org = _org(server)
    admin = Tenancy(server.data_dir).admin_secret()

    def anonymous_entries() -> int:
        log = answer(api(server, "GET", f"/orgs/{org.name}/audit", admin), 200)["entries"]
        return sum(1 for e in log if e["actor_id"] is None)

    before = anonymous_entries()
    for i in range(40):  # naming the org's app, as anyone may
        body = {"secrets": {"K": str(i)}}
        refused(
            api(server, "POST", f"/apps/{org.app}/secrets", None, json=body), 401, "unauthorized"
        )
        pushed = requests.put(
            f"{server.url}/v2/{org.app}/manifests/t{i}",
            data=b"{}",
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            timeout=30,
        )
        assert pushed.status_code == 401
    # At most 30 a minute from one client, API and registry together; the rest were counted.
    assert before < anonymous_entries() <= before + 30
    metrics = requests.get(f"{server.url}/metrics", auth=("x", admin), timeout=30).text
    dropped = [ln for ln in metrics.splitlines() if ln.startswith("skyreg_audit_anonymous_dropped")]
    assert dropped and int(dropped[0].split()[1]) >= 80 - 30
    # A caller with a token is recorded whatever anonymous callers did.
    body = {"kind": "readonly", "org": org.name, "name": "after-the-flood"}
    answer(api(server, "POST", "/tokens", org.org_token, json=body), 201)
    assert _log(server, org)[-1]["action"] == "createToken"
