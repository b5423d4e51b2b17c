"""Services, health checks and routes through the management API (issue 14), against a registry
served in-process over real HTTP on each backing (SQLite + files, PostgreSQL + S3). No agent
runs: the test plays it, reporting machines' state, address and health with agent tokens, and
reads what a proxy reads (`/agent/routes`)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from skyreg.services import machines as machine_service
from tests.support.backings import start_on_backing
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed, refused
from tests.support.servers import BACKINGS

HTTP_CHECK = {"type": "http", "path": "/healthz", "interval": 5, "timeout": 1}
SERVICE = {"internal_port": 8080, "checks": [HTTP_CHECK, {"type": "tcp"}]}


@dataclass
class Registry:
    reg: InProcessRegistry
    admin: str


@dataclass
class Tenant:
    """An org with one app and an org, agent, deploy and readonly token of it."""

    org: str
    app: str
    tokens: dict[str, str]


@pytest.fixture(scope="module", params=BACKINGS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    with contextlib.ExitStack() as stack:
        reg, admin = start_on_backing(request, stack, tmp_path_factory.mktemp("svc") / "data")
        yield Registry(reg, admin)


def make_tenant(server: Registry) -> Tenant:
    """A new org and app made through the API (either database), with tokens of each kind."""
    org, app = f"org-{uuid.uuid4().hex[:10]}", f"app-{uuid.uuid4().hex[:10]}"
    answer(api(server.reg, "POST", "/orgs", server.admin, json={"name": org}), 201)
    answer(api(server.reg, "POST", "/apps", server.admin, json={"name": app, "org": org}), 201)
    tokens = {}
    for kind in ("org", "agent", "deploy", "readonly"):
        body = {"kind": kind, "org": org, **({"app": app} if kind == "deploy" else {})}
        tokens[kind] = answer(api(server.reg, "POST", "/tokens", server.admin, json=body), 201)[
            "secret"
        ]
    return Tenant(org, app, tokens)


def patch_app(server: Registry, t: Tenant, **body: Any) -> requests.Response:
    return api(server.reg, "PATCH", f"/apps/{t.app}", t.tokens["org"], json=body)


def deploy(server: Registry, t: Tenant, tag: str, **body: Any) -> dict[str, Any]:
    push_image(server.reg.url, t.app, tag, session=authed(t.tokens["org"]), layers=1)
    image = {"image": f"{server.reg.host}/{t.app}:{tag}", **body}
    resp = api(server.reg, "POST", f"/apps/{t.app}/releases", t.tokens["org"], json=image)
    return dict(answer(resp, 201))


def release(server: Registry, t: Tenant, version: int) -> dict[str, Any]:
    found = answer(api(server.reg, "GET", f"/apps/{t.app}/releases", t.tokens["org"]), 200)
    [wanted] = [r for r in found["releases"] if r["version"] == version]
    return dict(wanted)


def machines(server: Registry, t: Tenant, version: int | None = None) -> list[dict[str, Any]]:
    path = f"/apps/{t.app}/machines?limit=1000"
    found = answer(api(server.reg, "GET", path, t.tokens["org"]), 200)["machines"]
    return [m for m in found if version is None or m["release_version"] == version]


def state(server: Registry, t: Tenant, machine: str, to: str, **body: Any) -> requests.Response:
    path = f"/agent/machines/{machine}/state"
    return api(server.reg, "POST", path, t.tokens["agent"], json={"state": to, **body})


def health(
    server: Registry, t: Tenant, machine: str, status: str, token: str | None = None, **body: Any
) -> requests.Response:
    path = f"/agent/machines/{machine}/health"
    secret = t.tokens["agent"] if token is None else token
    return api(server.reg, "POST", path, secret, json={"status": status, **body})


def run(server: Registry, t: Tenant, machine: str, address: str, passing: bool) -> None:
    """Play the agent starting `machine`: starting (with its address), started, passing."""
    answer(state(server, t, machine, "starting", address=address), 200)
    answer(state(server, t, machine, "started"), 200)
    if passing:
        answer(health(server, t, machine, "passing"), 200)


def routes(server: Registry, token: str) -> dict[str, Any]:
    return dict(answer(api(server.reg, "GET", "/agent/routes", token), 200))


# -- the service of an app and of its releases ----------------------------------------------------


def test_service_set_shown_with_defaults_and_cleared(server: Registry) -> None:
    t = make_tenant(server)
    shown = answer(patch_app(server, t, service=SERVICE), 200)
    assert shown["service"] == {
        "internal_port": 8080,
        "checks": [
            {"type": "http", "port": 8080, "path": "/healthz", "interval": 5.0, "timeout": 1.0,
             "grace_period": 5.0},
            {"type": "tcp", "port": 8080, "path": None, "interval": 10.0, "timeout": 2.0,
             "grace_period": 5.0},
        ],
    }  # fmt: skip
    got = answer(api(server.reg, "GET", f"/apps/{t.app}", t.tokens["org"]), 200)
    assert got["service"] == shown["service"]
    # Absent: unchanged; another field changes alone.
    assert answer(patch_app(server, t, public=True), 200)["service"] == shown["service"]
    assert answer(patch_app(server, t, service={"internal_port": 9}), 200)["service"] == {
        "internal_port": 9,
        "checks": [],
    }
    assert answer(patch_app(server, t, service=None), 200)["service"] is None
    got = answer(api(server.reg, "GET", f"/apps/{t.app}", t.tokens["org"]), 200)
    assert got["service"] is None
    # Only an org (or admin) token changes it.
    refused(
        api(server.reg, "PATCH", f"/apps/{t.app}", t.tokens["deploy"], json={}), 403, "forbidden"
    )


def test_a_release_copies_the_apps_service_or_sets_it(server: Registry) -> None:
    t = make_tenant(server)
    none = deploy(server, t, "v1")
    assert none["service"] is None
    answer(patch_app(server, t, service={"internal_port": 3000}), 200)
    copied = deploy(server, t, "v2")
    assert copied["service"] == {"internal_port": 3000, "checks": []}
    # A change of the app's service waits for the next release.
    answer(patch_app(server, t, service={"internal_port": 3001}), 200)
    assert release(server, t, 2)["service"]["internal_port"] == 3000
    given = deploy(server, t, "v3", service={"internal_port": 4000, "checks": [{"type": "tcp"}]})
    assert given["service"]["internal_port"] == 4000
    assert given["service"]["checks"][0]["port"] == 4000
    app = answer(api(server.reg, "GET", f"/apps/{t.app}", t.tokens["org"]), 200)
    assert app["service"] == given["service"]
    # Agents get the org and service of each machine's release.
    listed = answer(api(server.reg, "GET", "/agent/machines", t.tokens["agent"]), 200)
    mine = [m for m in listed["machines"] if m["app"] == t.app]
    assert mine and all(m["org"] == t.org for m in mine)
    by_version = {m["release_version"]: m["service"] for m in mine}
    assert by_version[3] == given["service"]


# -- releases follow health ----------------------------------------------------------------------


def test_a_release_with_checks_completes_when_started_and_passing(server: Registry) -> None:
    t = make_tenant(server)
    answer(patch_app(server, t, service=SERVICE), 200)
    rel = deploy(server, t, "v1", count=2)
    first, second = machines(server, t, 1)
    assert first["health"] is None and first["address"] is None

    shown = answer(state(server, t, first["id"], "starting", address="10.0.0.2"), 200)
    assert shown["health"] == "starting" and shown["address"] == "10.0.0.2"
    answer(state(server, t, first["id"], "started"), 200)
    answer(state(server, t, second["id"], "starting", address="fd00::3"), 200)
    answer(state(server, t, second["id"], "started"), 200)
    assert release(server, t, rel["version"])["status"] == "running"  # started, not passing

    passing = answer(health(server, t, first["id"], "passing"), 200)
    assert passing["health"] == "passing"
    answer(health(server, t, first["id"], "passing"), 200)  # no change: no second event
    assert release(server, t, 1)["status"] == "running"
    answer(health(server, t, second["id"], "passing"), 200)
    done = release(server, t, 1)
    assert done["status"] == "complete" and done["stable"] is True

    listed = {m["id"]: m for m in machines(server, t, 1)}
    assert listed[first["id"]]["address"] == "10.0.0.2"
    assert listed[second["id"]]["address"] == "fd00::3"
    assert {m["health"] for m in listed.values()} == {"passing"}
    events = [e["message"] for e in listed[first["id"]]["events"]]
    assert events.count("Health checks passing") == 1


def test_a_critical_machine_fails_the_release_and_the_old_ones_keep_running(
    server: Registry,
) -> None:
    t = make_tenant(server)
    deploy(server, t, "v1", count=2)
    old = machines(server, t, 1)
    for m in old:
        run(server, t, m["id"], "127.0.0.1", passing=False)
    assert release(server, t, 1)["status"] == "complete"

    deploy(server, t, "v2", count=2, service=SERVICE)  # rolling: one new machine at a time
    new = machines(server, t, 2)
    assert sorted(m["desired"] for m in new) == ["started", "waiting"]
    [starting] = [m for m in new if m["desired"] == "started"]
    answer(state(server, t, starting["id"], "starting", address="10.1.0.5"), 200)
    answer(health(server, t, starting["id"], "critical", message="GET /healthz: 500"), 200)

    assert release(server, t, 2)["status"] == "failed"
    after = {m["id"]: m for m in machines(server, t)}
    assert all(after[m["id"]]["desired"] == "stopped" for m in new)  # the waiting one too
    assert all(after[m["id"]]["desired"] == "started" for m in old)
    events = [e["message"] for e in after[starting["id"]]["events"]]
    assert "Health checks critical: GET /healthz: 500" in events


def test_rolling_replaces_machines_one_at_a_time(server: Registry) -> None:
    t = make_tenant(server)
    deploy(server, t, "v1", count=3)
    old_ids = [m["id"] for m in machines(server, t, 1)]
    for mid in old_ids:
        run(server, t, mid, "127.0.0.1", passing=False)
    assert release(server, t, 1)["status"] == "complete"

    deploy(server, t, "v2", count=3, service=SERVICE)
    new_ids = [m["id"] for m in machines(server, t, 2)]  # creation order
    for step, mid in enumerate(new_ids):
        now = {m["id"]: m for m in machines(server, t)}
        started_new = [n for n in new_ids if now[n]["desired"] == "started"]
        assert started_new == new_ids[: step + 1]  # exactly one more each step
        assert [now[n]["desired"] for n in new_ids[step + 1 :]] == ["waiting"] * (2 - step)
        # Each old machine is stopped only after a new one became ready.
        assert sum(now[o]["desired"] == "stopped" for o in old_ids) == step
        listed = answer(api(server.reg, "GET", "/agent/machines", t.tokens["agent"]), 200)
        assert not {m["id"] for m in listed["machines"]} & set(new_ids[step + 1 :])
        answer(state(server, t, mid, "starting", address=f"10.2.0.{step + 1}"), 200)
        answer(state(server, t, mid, "started"), 200)
        mid_step = {m["id"]: m for m in machines(server, t)}
        assert sum(mid_step[o]["desired"] == "stopped" for o in old_ids) == step  # not passing
        answer(health(server, t, mid, "passing"), 200)

    final = {m["id"]: m for m in machines(server, t)}
    assert all(final[o]["desired"] == "stopped" for o in old_ids)
    assert all(final[n]["desired"] == "started" for n in new_ids)
    assert release(server, t, 2)["status"] == "complete"


# -- routes for the proxy ------------------------------------------------------------------------


def test_routes_show_healthy_and_draining_machines_of_the_callers_org(server: Registry) -> None:
    t, other = make_tenant(server), make_tenant(server)
    answer(patch_app(server, t, service=SERVICE), 200)
    deploy(server, t, "v1", count=3)
    a, b, c = machines(server, t, 1)
    run(server, t, a["id"], "10.3.0.1", passing=True)
    run(server, t, b["id"], "10.3.0.2", passing=True)
    answer(state(server, t, c["id"], "starting", address="10.3.0.3"), 200)  # not yet healthy
    answer(api(server.reg, "POST", f"/machines/{b['id']}/stop", t.tokens["org"]), 200)
    # Another app of the org: a service on its latest release, no machine with an address.
    second = Tenant(t.org, f"app-{uuid.uuid4().hex[:10]}", t.tokens)
    body = {"name": second.app, "org": t.org}
    answer(api(server.reg, "POST", "/apps", t.tokens["org"], json=body), 201)
    deploy(server, second, "v1", service={"internal_port": 5000})
    # Another org's app with a routed machine.
    deploy(server, other, "v1", service={"internal_port": 7000})
    [theirs] = machines(server, other, 1)
    run(server, other, theirs["id"], "10.4.0.1", passing=False)

    for token in (t.tokens["org"], t.tokens["agent"]):
        found = routes(server, token)
        assert found["truncated"] is False
        assert [x["app"] for x in found["apps"]] == sorted([t.app, second.app])
        by_app = {x["app"]: x["machines"] for x in found["apps"]}
        assert by_app[second.app] == []
        assert by_app[t.app] == [
            {"id": a["id"], "region": "local", "address": "10.3.0.1", "port": 8080,
             "healthy": True, "draining": False},
            {"id": b["id"], "region": "local", "address": "10.3.0.2", "port": 8080,
             "healthy": True, "draining": True},
            {"id": c["id"], "region": "local", "address": "10.3.0.3", "port": 8080,
             "healthy": False, "draining": False},
        ]  # fmt: skip
    mine = routes(server, other.tokens["agent"])
    assert mine["apps"] == [
        {"app": other.app, "machines": [
            {"id": theirs["id"], "region": "local", "address": "10.4.0.1", "port": 7000,
             "healthy": True, "draining": False}]},
    ]  # fmt: skip
    every = {x["app"] for x in routes(server, server.admin)["apps"]}
    assert {t.app, second.app, other.app} <= every
    # A stopped machine is no longer routed to.
    answer(state(server, t, b["id"], "stopped"), 200)
    ids = [m["id"] for x in routes(server, t.tokens["org"])["apps"] for m in x["machines"]]
    assert ids == [a["id"], c["id"]]
    # Deploy and readonly tokens are no proxies.
    for kind in ("deploy", "readonly"):
        refused(api(server.reg, "GET", "/agent/routes", t.tokens[kind]), 403, "forbidden")


def test_routes_are_truncated_at_the_bound(
    server: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = make_tenant(server)
    deploy(server, t, "v1", count=3, service={"internal_port": 80})
    for i, m in enumerate(machines(server, t, 1)):
        run(server, t, m["id"], f"10.5.0.{i + 1}", passing=False)
    assert routes(server, t.tokens["org"])["truncated"] is False
    monkeypatch.setattr(machine_service, "MAX_ROUTES", 2)  # the server runs in this process
    cut = routes(server, t.tokens["org"])
    assert cut["truncated"] is True
    assert sum(len(x["machines"]) for x in cut["apps"]) == 2


# -- refusals ------------------------------------------------------------------------------------

BAD_SERVICES = [
    ({"internal_port": 0}, "service.internal_port"),
    ({"internal_port": 65536}, "service.internal_port"),
    ({"checks": []}, "internal_port"),
    ({"internal_port": "80"}, "internal_port"),
    ({"internal_port": 80, "checks": [{"type": "tcp"}] * 11}, "service.checks"),
    ({"internal_port": 80, "checks": [{"type": "udp"}]}, "service.checks[0].type"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "path": "/"}]}, "service.checks[0].path"),
    ({"internal_port": 80, "checks": [{"type": "http", "path": "x"}]}, "service.checks[0].path"),
    ({"internal_port": 80, "checks": [{"type": "http", "path": "/a b"}]}, "checks[0].path"),
    ({"internal_port": 80, "checks": [{"type": "http", "path": "/a\r\nX: y"}]}, "checks[0].path"),
    ({"internal_port": 80, "checks": [{"type": "http", "path": "/" * 1025}]}, "checks[0].path"),
    ({"internal_port": 80, "checks": [{"type": "http", "port": 0}]}, "checks[0].port"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "interval": 0.5}]}, "checks[0].interval"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "interval": 3601}]}, "checks[0].interval"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "timeout": 0.05}]}, "checks[0].timeout"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "interval": 1, "timeout": 2}]}, "timeout"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "grace_period": -1}]}, "grace_period"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "grace_period": 3601}]}, "grace_period"),
    ({"internal_port": 80, "checks": [{"type": "tcp", "interval": "1"}]}, "interval"),
    ({"internal_port": 80, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("service", "field"), BAD_SERVICES)
def test_bad_services_are_refused_naming_the_field(
    server: Registry, service: dict[str, Any], field: str
) -> None:
    t = make_tenant(server)
    message = refused(patch_app(server, t, service=service), 400, "bad_request")
    assert field in message
    assert answer(api(server.reg, "GET", f"/apps/{t.app}", t.tokens["org"]), 200)["service"] is None
    push_image(server.reg.url, t.app, "v1", session=authed(t.tokens["org"]), layers=1)
    body = {"image": f"{server.reg.host}/{t.app}:v1", "service": service}
    resp = api(server.reg, "POST", f"/apps/{t.app}/releases", t.tokens["org"], json=body)
    assert field in refused(resp, 400, "bad_request")
    assert machines(server, t) == []


def test_bad_reports_are_refused(server: Registry) -> None:
    t = make_tenant(server)
    deploy(server, t, "v1", service=SERVICE)
    [m] = machines(server, t)
    for address in ("not-an-ip", "10.0.0.300", "", "10.0.0.1/24", "a" * 100, 5):
        resp = state(server, t, m["id"], "starting", address=address)
        assert "address" in refused(resp, 400, "bad_request")
    answer(state(server, t, m["id"], "starting", address="::ffff:10.0.0.1"), 200)
    for status in ("starting", "ok", ""):
        assert "status" in refused(health(server, t, m["id"], status), 400, "bad_request")
    resp = health(server, t, m["id"], "critical", message="x" * 1001)
    assert "message" in refused(resp, 400, "bad_request")
    resp = health(server, t, m["id"], "passing", extra=1)
    assert "extra" in refused(resp, 400, "bad_request")
    # Unchanged by the refusals.
    [after] = machines(server, t)
    assert after["health"] == "starting" and after["address"] == "::ffff:10.0.0.1"


def test_health_without_checks_or_while_not_running_is_a_conflict(server: Registry) -> None:
    t = make_tenant(server)
    deploy(server, t, "v1", service={"internal_port": 80})  # a service without checks
    [plain] = machines(server, t)
    answer(state(server, t, plain["id"], "starting", address="10.6.0.1"), 200)
    assert "no health checks" in refused(health(server, t, plain["id"], "passing"), 409, "conflict")
    assert machines(server, t)[0]["health"] is None

    u = make_tenant(server)
    deploy(server, u, "v1", service=SERVICE)
    [checked] = machines(server, u)
    assert checked["state"] == "created"
    refused(health(server, u, checked["id"], "passing"), 409, "conflict")
    answer(state(server, u, checked["id"], "starting"), 200)
    answer(state(server, u, checked["id"], "failed"), 200)
    refused(health(server, u, checked["id"], "passing"), 409, "conflict")


def test_health_reports_are_for_the_machines_agents(server: Registry) -> None:
    t, other = make_tenant(server), make_tenant(server)
    deploy(server, t, "v1", service=SERVICE)
    [m] = machines(server, t)
    answer(state(server, t, m["id"], "starting"), 200)
    for token in (other.tokens["org"], other.tokens["agent"]):
        refused(health(server, t, m["id"], "passing", token=token), 404, "not_found")
    for kind in ("deploy", "readonly"):
        refused(health(server, t, m["id"], "passing", token=t.tokens[kind]), 403, "forbidden")
    refused(health(server, t, "0123456789abcd", "passing"), 404, "not_found")
    # The admin and the org's own org token may report, like the other agent routes.
    answer(health(server, t, m["id"], "critical", token=t.tokens["org"]), 200)
    answer(health(server, t, m["id"], "critical", token=server.admin), 200)
    # An agent token stays refused outside /agent/.
    resp = api(server.reg, "GET", f"/apps/{t.app}/machines", t.tokens["agent"])
    assert resp.status_code == 403
