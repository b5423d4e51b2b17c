"""App secrets' promises to tenants: other orgs cannot see or touch an app's secrets, no token
reads a value back through the API, an agent token is good for the agent path and pulls only,
and the database alone (a dump) holds no value and no key. Each test is named after the promise
it checks."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.auth.envelope import MasterKey, MasterKeys, WrappedKey, unwrap_data_key
from skyreg.platform.api import ROUTES
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, authed, refused
from tests.support.secrets import (
    Hosted,
    Tenant,
    deploy,
    machine_secrets,
    make_tenant,
    registry_token,
    report_state,
    running_registry,
    set_secrets,
)
from tests.support.servers import RunningRegistry

APP_QUERY = """
query($name: String!) {
  app(name: $name) {
    id name organization { slug }
    releasesUnprocessed(first: 50) {
      totalCount
      nodes {
        id version description reason status imageRef stable user { id email name } createdAt
      }
    }
  }
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with running_registry(tmp_path_factory.mktemp("secretiso") / "data") as reg:
        yield reg


def starting_machine(reg: Hosted, t: Tenant, version: int) -> dict[str, Any]:
    """The release's machine, reported starting by the org's agent."""
    found = answer(api(reg, "GET", f"/apps/{t.app}/machines", t.tokens["org"]), 200)["machines"]
    [machine] = [m for m in found if m["release_version"] == version]
    report_state(reg, t.tokens["agent"], machine["id"], "starting")
    return dict(machine)


def agent_secrets(reg: Hosted, token: str, machine: dict[str, Any]) -> requests.Response:
    return machine_secrets(reg, token, machine["id"], machine["generation"])


def listing(reg: Hosted, app: str, token: str) -> requests.Response:
    return api(reg, "GET", f"/apps/{app}/secrets", token)


# -- who may list, set, unset --------------------------------------------------------------------


def test_other_orgs_tokens_cannot_tell_the_secrets_exist(server: InProcessRegistry) -> None:
    a, b = make_tenant(server), make_tenant(server)
    answer(set_secrets(server, a.app, a.tokens["org"], {"KEEP": "k"}), 200)
    before = answer(listing(server, a.app, a.tokens["org"]), 200)
    missing = f"app-{uuid.uuid4().hex[:10]}"
    for kind in ("org", "deploy", "readonly"):
        token = b.tokens[kind]
        for app in (a.app, missing):  # exactly as if it did not exist
            refused(listing(server, app, token), 404, "not_found")
            refused(set_secrets(server, app, token, {"KEEP": "x"}), 404, "not_found")
            body = {"names": ["KEEP"]}
            path = f"/apps/{app}/secrets/unset"
            refused(api(server, "POST", path, token, json=body), 404, "not_found")
    assert answer(listing(server, a.app, a.tokens["org"]), 200) == before


def test_readonly_and_other_apps_deploy_tokens_may_not_touch_secrets(
    server: InProcessRegistry,
) -> None:
    a = make_tenant(server)
    sibling = f"app-{uuid.uuid4().hex[:10]}"
    t = Tenancy(server.data_dir)
    t.app(sibling, a.org)
    sibling_deploy = t.token("deploy", org=a.org, app=sibling)[0]
    answer(set_secrets(server, a.app, a.tokens["org"], {"KEEP": "k"}), 200)
    before = answer(listing(server, a.app, a.tokens["org"]), 200)
    for token in (a.tokens["readonly"], sibling_deploy):
        refused(listing(server, a.app, token), 403, "forbidden")
        refused(set_secrets(server, a.app, token, {"KEEP": "x"}), 403, "forbidden")
        path = f"/apps/{a.app}/secrets/unset"
        refused(api(server, "POST", path, token, json={"names": ["KEEP"]}), 403, "forbidden")
    assert answer(listing(server, a.app, a.tokens["org"]), 200) == before
    # The sibling's own deploy token manages the sibling's secrets.
    answer(set_secrets(server, sibling, sibling_deploy, {"MINE": "m"}), 200)


def test_the_apps_deploy_token_may_set_list_and_unset(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    deploy_token = a.tokens["deploy"]
    answer(set_secrets(server, a.app, deploy_token, {"FROM_CI": "v"}), 200)
    assert [s["name"] for s in answer(listing(server, a.app, deploy_token), 200)["secrets"]] == [
        "FROM_CI"
    ]
    path = f"/apps/{a.app}/secrets/unset"
    answer(api(server, "POST", path, deploy_token, json={"names": ["FROM_CI"]}), 200)
    assert answer(listing(server, a.app, deploy_token), 200)["secrets"] == []


def test_no_token_reads_a_value_through_any_api_route(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    value = uuid.uuid4().hex + uuid.uuid4().hex[:16]
    staged = "staged-" + uuid.uuid4().hex
    answer(set_secrets(server, a.app, a.tokens["org"], {"DEPLOYED": value}, stage=True), 200)
    release = deploy(server, a)
    answer(set_secrets(server, a.app, a.tokens["org"], {"ROLLED": value + "2"}), 200)
    answer(set_secrets(server, a.app, a.tokens["org"], {"STAGED": staged}, stage=True), 200)
    machine = starting_machine(server, a, release["version"])
    fill = {
        "{app}": a.app,
        "{org}": a.org,
        "{reference}": "v1",
        "{machine_id}": machine["id"],
    }
    secrets = [value.encode(), staged.encode(), base64.b64encode(value.encode())]
    walked = 0
    ok: set[str] = set()
    for path, methods in ROUTES.items():
        if "GET" not in methods or not all(p in fill for p in _params(path)):
            continue
        concrete = path
        for param, got in fill.items():
            concrete = concrete.replace(param, got)
        for token in (a.admin, a.tokens["org"], a.tokens["deploy"], a.tokens["readonly"]):
            resp = api(server, "GET", concrete, token)
            assert resp.status_code < 500, (concrete, resp.status_code, resp.text)
            if resp.status_code == 200 and token == a.admin:
                ok.add(path)
            for secret in secrets:
                assert secret not in resp.content, (concrete, resp.text[:300])
            walked += "{app}" in path
    assert walked >= 4 * 10  # every GET route under /apps/{app}, as each token
    assert {"/apps/{app}/secrets", "/apps/{app}/releases", "/apps/{app}/machines"} <= ok, ok
    for token in (a.admin, a.tokens["org"], a.tokens["deploy"], a.tokens["readonly"]):
        resp = requests.post(
            f"{server.url}/graphql",
            json={"query": APP_QUERY, "variables": {"name": a.app}},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        body = answer(resp, 200)
        assert body["data"]["app"]["releasesUnprocessed"]["totalCount"] == 2, body
        for secret in secrets:
            assert secret not in resp.content


def _params(path: str) -> list[str]:
    return ["{" + part.split("}")[0] + "}" for part in path.split("{")[1:]]


# -- agent tokens --------------------------------------------------------------------------------


def test_only_an_admin_creates_agent_tokens(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    for kind in ("org", "deploy", "readonly"):
        body = {"kind": "agent", "org": a.org}
        refused(api(server, "POST", "/tokens", a.tokens[kind], json=body), 403, "forbidden")
    refused(
        api(server, "POST", "/tokens", a.tokens["org"], json={"kind": "agent"}), 403, "forbidden"
    )
    bound = answer(
        api(server, "POST", "/tokens", a.admin, json={"kind": "agent", "org": a.org}), 201
    )
    assert bound["kind"] == "agent" and bound["org"] == a.org
    every = answer(api(server, "POST", "/tokens", a.admin, json={"kind": "agent"}), 201)
    assert every["kind"] == "agent" and every["org"] is None
    refused(
        api(server, "POST", "/tokens", a.admin, json={"kind": "agent", "app": a.app}),
        400,
        "bad_request",
    )
    # Both serve this org's starting machine; the org-bound one no other org's.
    answer(set_secrets(server, a.app, a.tokens["org"], {"S": "v"}, stage=True), 200)
    machine = starting_machine(server, a, deploy(server, a)["version"])
    for token in (bound["secret"], every["secret"]):
        assert answer(agent_secrets(server, token, machine), 200) == {"env": {"S": "v"}}
    b = make_tenant(server)
    answer(set_secrets(server, b.app, b.tokens["org"], {"S": "w"}, stage=True), 200)
    theirs = starting_machine(server, b, deploy(server, b)["version"])
    refused(agent_secrets(server, bound["secret"], theirs), 404, "not_found")
    assert answer(agent_secrets(server, every["secret"], theirs), 200) == {"env": {"S": "w"}}


def test_an_agent_token_is_refused_outside_the_agent_api(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    agent = a.tokens["agent"]
    for method, path in (
        ("GET", "/apps"),
        ("GET", "/whoami"),
        ("GET", "/tokens"),
        ("POST", "/tokens"),
        ("GET", f"/apps/{a.app}"),
        ("GET", f"/apps/{a.app}/secrets"),
        ("POST", f"/apps/{a.app}/secrets"),
        ("POST", "/secrets/rotate-key"),
    ):
        body = {"kind": "org"} if path == "/tokens" else {"secrets": {"X": "y"}}
        resp = api(server, method, path, agent, json=body if method == "POST" else None)
        assert "/api/v1/agent/" in refused(resp, 403, "forbidden"), path
    gql = requests.post(
        f"{server.url}/graphql",
        json={"query": APP_QUERY, "variables": {"name": a.app}},
        headers={"Authorization": f"Bearer {agent}"},
        timeout=30,
    )
    assert gql.status_code == 403, gql.text
    answer(api(server, "GET", "/agent/machines", agent, params={"region": "local"}), 200)


def test_an_agent_token_pulls_only_its_orgs_apps_and_never_pushes(
    server: InProcessRegistry,
) -> None:
    a, b = make_tenant(server), make_tenant(server)
    mine = push_image(server.url, a.app, "v1", session=authed(a.tokens["org"]))
    push_image(server.url, b.app, "v1", session=authed(b.tokens["org"]))
    agent = a.tokens["agent"]

    own = registry_token(server, agent, f"repository:{a.app}:pull,push")
    headers = {"Authorization": f"Bearer {own}"}
    got = requests.get(f"{server.url}/v2/{a.app}/manifests/v1", headers=headers, timeout=30)
    assert got.status_code == 200 and got.headers["Docker-Content-Digest"] == mine.digest
    upload = requests.post(f"{server.url}/v2/{a.app}/blobs/uploads/", headers=headers, timeout=30)
    assert upload.status_code in (401, 403), upload.text
    delete = requests.delete(
        f"{server.url}/v2/{a.app}/manifests/{mine.digest}", headers=headers, timeout=30
    )
    assert delete.status_code in (401, 403, 405), delete.text

    theirs = registry_token(server, agent, f"repository:{b.app}:pull")
    resp = requests.get(
        f"{server.url}/v2/{b.app}/manifests/v1",
        headers={"Authorization": f"Bearer {theirs}"},
        timeout=30,
    )
    assert resp.status_code in (401, 403, 404), resp.text
    assert b'"layers"' not in resp.content
    # Basic auth straight on /v2/ gives the same answers.
    basic = requests.get(f"{server.url}/v2/{b.app}/manifests/v1", auth=("x", agent), timeout=30)
    assert basic.status_code in (401, 403, 404), basic.text
    basic_up = requests.post(
        f"{server.url}/v2/{a.app}/blobs/uploads/", auth=("x", agent), timeout=30
    )
    assert basic_up.status_code in (401, 403), basic_up.text


# -- at rest -------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningRegistry]:
    reg = RunningRegistry(data_dir=tmp_path / "data")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def _database_bytes(data_dir: Path) -> dict[str, bytes]:
    found = {p.name: p.read_bytes() for p in sorted(data_dir.glob("*.db*"))}
    assert any(name.endswith(".db") for name in found), sorted(os.listdir(data_dir))
    return found


def test_the_database_holds_no_value_and_no_key(served: RunningRegistry) -> None:
    reg = served
    a = make_tenant(reg)
    value = os.urandom(24).hex()  # 48 hex characters no one else writes
    answer(set_secrets(reg, a.app, a.tokens["org"], {"DISTINCTIVE": value}, stage=True), 200)
    release = deploy(reg, a)
    reg.stop()

    key_file = reg.data_dir / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = MasterKeys.from_file(key_file)
    with sqlite3.connect(reg.data_dir / "skyreg.db") as conn:
        [(org_id, key_id, wrapped)] = conn.execute(
            "SELECT k.org_id, k.key_id, k.wrapped FROM org_data_keys k JOIN orgs o "
            "ON o.id = k.org_id WHERE o.name = ?",
            (a.org,),
        ).fetchall()
        sealed = conn.execute(
            "SELECT s.sealed FROM app_secrets s JOIN apps a ON a.id = s.app_id WHERE a.name = ?",
            (a.app,),
        ).fetchall()
    conn.close()
    data_key = unwrap_data_key(keys, str(org_id), WrappedKey(key_id, wrapped))
    forbidden = {
        "value": value.encode(),
        "value as base64": base64.b64encode(value.encode()),
        "value as UTF-16": value.encode("utf-16-le"),
        "data key": data_key,
        "data key as base64": base64.b64encode(data_key),
        "data key as hex": data_key.hex().encode(),
        "master key": keys.current.key,
        "master key as base64": keys.current.to_base64().encode(),
    }
    for name, data in _database_bytes(reg.data_dir).items():
        for what, needle in forbidden.items():
            assert needle not in data, f"{name} holds the {what}"
    assert len(sealed) == 1 and len(sealed[0][0]) > len(value)  # stored, sealed
    # Delivered to the agent starting a machine, and still in no log line.
    reg.start()
    machine = starting_machine(reg, a, release["version"])
    got = answer(agent_secrets(reg, a.tokens["agent"], machine), 200)
    assert got == {"env": {"DISTINCTIVE": value}}
    reg.stop()
    assert value not in reg.log()
    assert keys.current.to_base64() not in reg.log()


def test_without_its_key_the_server_answers_unavailable_never_a_value(
    served: RunningRegistry,
) -> None:
    reg = served
    a = make_tenant(reg)
    value = os.urandom(24).hex()
    answer(set_secrets(reg, a.app, a.tokens["org"], {"DISTINCTIVE": value}, stage=True), 200)
    release = deploy(reg, a)
    reg.stop()
    key_file = reg.data_dir / "secrets.key"
    key_file.unlink()  # a dump restored without its key: a fresh one is made on first use
    reg.start()
    machine = starting_machine(reg, a, release["version"])
    resp = agent_secrets(reg, a.tokens["agent"], machine)
    message = refused(resp, 503, "unavailable")
    assert "unavailable" in message
    assert value not in resp.text
    # Setting more cannot open the org's data key either; listing names still works.
    resp = set_secrets(reg, a.app, a.tokens["org"], {"MORE": value + "x"}, stage=True)
    refused(resp, 503, "unavailable")
    assert [s["name"] for s in answer(listing(reg, a.app, a.tokens["org"]), 200)["secrets"]] == [
        "DISTINCTIVE"
    ]
    reg.stop()
    assert value not in reg.log()


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(MasterKey.generate().to_base64() + "\n")
    key_file.chmod(0o644)
    reg = RunningRegistry(
        data_dir=tmp_path / "data", env={"SKYREG_SECRETS_KEY_FILE": str(key_file)}
    )
    reg.start()
    try:
        a = make_tenant(reg)
        resp = set_secrets(reg, a.app, a.tokens["org"], {"S": "v"})
        message = refused(resp, 503, "unavailable")
        assert "readable or writable by other users" in message and "chmod 600" in message
        rotate = api(reg, "POST", "/secrets/rotate-key", a.admin)
        assert "readable or writable" in refused(rotate, 503, "unavailable")
        # Nothing was made beside the database instead, and the rest of the API works.
        assert not (reg.data_dir / "secrets.key").exists()
        assert answer(api(reg, "GET", "/whoami", a.tokens["org"]), 200)
        assert answer(api(reg, "GET", f"/apps/{a.app}", a.tokens["org"]), 200)["name"] == a.app
        assert deploy(reg, a)["status"] == "running"
        # Once it is 0600, the server uses it (read again on the next call).
        key_file.chmod(0o600)
        answer(set_secrets(reg, a.app, a.tokens["org"], {"S": "v"}, stage=True), 200)
    finally:
        reg.stop()
