"""A proxy token's promises: only an admin makes one; it reads the routes to machines (its org's
apps, or every org's) and nothing else of the API, no machine's secrets and no private image.
`skyreg proxy` faces the internet, so what it holds must open nothing else. Each test is named
after the promise it checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed, refused
from tests.support.secrets import (
    deploy,
    machine_secrets,
    make_tenant,
    registry_token,
    report_state,
    running_registry,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with running_registry(tmp_path_factory.mktemp("proxytoken") / "data") as reg:
        yield reg


def _proxy_token(server: InProcessRegistry, admin: str, org: str | None = None) -> str:
    body = {"kind": "proxy"} if org is None else {"kind": "proxy", "org": org}
    made = answer(api(server, "POST", "/tokens", admin, json=body), 201)
    assert made["kind"] == "proxy" and made["org"] == org
    return str(made["secret"])


def test_only_an_admin_creates_proxy_tokens(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    for spelling in ("proxy", "Proxy", "PROXY", " proxy"):
        resp = api(server, "POST", "/tokens", a.tokens["org"], json={"kind": spelling})
        assert resp.status_code in (400, 403), (spelling, resp.text)
    refused(
        api(server, "POST", "/tokens", a.tokens["org"], json={"kind": "proxy", "org": a.org}),
        403,
        "forbidden",
    )
    refused(
        api(server, "POST", "/tokens", a.admin, json={"kind": "proxy", "app": a.app}),
        400,
        "bad_request",
    )


def test_a_proxy_token_reads_the_routes_of_its_scope_only(server: InProcessRegistry) -> None:
    a, b = make_tenant(server), make_tenant(server)
    for t in (a, b):
        service = {"service": {"internal_port": 8080}}
        answer(api(server, "PATCH", f"/apps/{t.app}", t.tokens["org"], json=service), 200)
        deploy(server, t)
    every = _proxy_token(server, a.admin)
    bound = _proxy_token(server, a.admin, a.org)
    seen = {r["app"] for r in answer(api(server, "GET", "/agent/routes", every), 200)["apps"]}
    assert {a.app, b.app} <= seen
    seen = {r["app"] for r in answer(api(server, "GET", "/agent/routes", bound), 200)["apps"]}
    assert seen == {a.app}


def test_a_proxy_token_is_refused_everywhere_but_the_routes(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    secret = {"secrets": {"S": "v"}, "stage": True}
    answer(api(server, "POST", f"/apps/{a.app}/secrets", a.tokens["org"], json=secret), 200)
    version = deploy(server, a)["version"]
    listed = answer(api(server, "GET", f"/apps/{a.app}/machines", a.tokens["org"]), 200)
    [machine] = [m for m in listed["machines"] if m["release_version"] == version]
    report_state(server, a.tokens["agent"], machine["id"], "starting")
    proxy = _proxy_token(server, a.admin)
    for method, path in (
        ("GET", "/agent/machines"),
        ("POST", f"/agent/machines/{machine['id']}/state"),
        ("POST", f"/agent/machines/{machine['id']}/health"),
        ("GET", "/apps"),
        ("GET", f"/apps/{a.app}"),
        ("GET", f"/apps/{a.app}/secrets"),
        ("GET", "/tokens"),
        ("POST", "/tokens"),
        ("GET", "/whoami"),
        ("GET", "/agent/routes/"),
        ("GET", "/agent/routes/../machines"),
        ("POST", "/agent/routes"),
    ):
        resp = api(server, method, path, proxy, json={} if method == "POST" else None)
        assert resp.status_code in (403, 404, 405), (method, path, resp.status_code, resp.text)
        assert "machines" not in resp.json() and "env" not in resp.json(), resp.text
    secrets = machine_secrets(server, proxy, machine["id"], machine["generation"])
    assert refused(secrets, 403, "forbidden")
    assert answer(api(server, "GET", "/agent/routes", proxy), 200)["truncated"] is False


def test_a_proxy_token_pulls_no_private_image(server: InProcessRegistry) -> None:
    a = make_tenant(server)
    push_image(server.url, a.app, "v1", session=authed(a.tokens["org"]))
    proxy = _proxy_token(server, a.admin)
    bearer = registry_token(server, proxy, f"repository:{a.app}:pull")
    resp = requests.get(
        f"{server.url}/v2/{a.app}/manifests/v1",
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=30,
    )
    assert resp.status_code in (401, 403, 404), resp.text
    assert b'"layers"' not in resp.content
    basic = requests.get(f"{server.url}/v2/{a.app}/manifests/v1", auth=("x", proxy), timeout=30)
    assert basic.status_code in (401, 403, 404), basic.text
    assert b'"layers"' not in basic.content


def test_only_an_agent_or_admin_names_the_address_the_proxy_sends_requests_to(
    server: InProcessRegistry,
) -> None:
    a = make_tenant(server)
    service = {"service": {"internal_port": 5432}}
    answer(api(server, "PATCH", f"/apps/{a.app}", a.tokens["org"], json=service), 200)
    version = deploy(server, a)["version"]
    listed = answer(api(server, "GET", f"/apps/{a.app}/machines", a.tokens["org"]), 200)
    [machine] = [m for m in listed["machines"] if m["release_version"] == version]
    path = f"/agent/machines/{machine['id']}/state"
    # A tenant acting as its own agent would aim the proxy at the proxy's host, or elsewhere.
    for address in ("127.0.0.1", "169.254.169.254", "10.0.0.9"):
        body = {"state": "starting", "address": address}
        refused(api(server, "POST", path, a.tokens["org"], json=body), 403, "forbidden")
    answer(api(server, "POST", path, a.tokens["org"], json={"state": "starting"}), 200)
    routes = answer(api(server, "GET", "/agent/routes", a.admin), 200)["apps"]
    assert all(m["id"] != machine["id"] for r in routes for m in r["machines"]), routes
    given = {"state": "starting", "address": "10.0.0.9"}
    answer(api(server, "POST", path, a.tokens["agent"], json=given), 200)
    routes = answer(api(server, "GET", "/agent/routes", a.admin), 200)["apps"]
    assert any(m["address"] == "10.0.0.9" for r in routes for m in r["machines"]), routes
