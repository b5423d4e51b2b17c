"""Registry tokens cannot grow, and the failed-login limiter never hurts the innocent.

SECURITY.md: "A JWT never buys a bigger JWT"; "valid credentials are never refused for others'
failures"; "the client address is read right to left through trusted hops only".
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry


@dataclass
class Tenants:
    reg: ServedRegistry
    deploy_b1: str  # a deploy token of org B's app b1: may push, pull (and not delete)
    org_b: str  # an org token of org B: may do everything to b1

    @property
    def url(self) -> str:
        return self.reg.url


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("tokens") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("orgb")
        t.app("b1", "orgb")
        deploy, _ = t.token("deploy", org="orgb", app="b1")
        org, _ = t.token("org", org="orgb")
        yield Tenants(reg, deploy, org)
    finally:
        reg.stop()


def _jwt(url: str, secret: str, scope: str) -> str:
    r = requests.get(
        f"{url}/auth/token", params={"service": "skyreg", "scope": scope}, auth=("x", secret)
    )
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def _claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def test_a_registry_jwt_never_buys_a_jwt_with_more_actions(tenants: Tenants) -> None:
    pull_only = _jwt(tenants.url, tenants.org_b, "repository:b1:pull")
    assert _claims(pull_only)["access"] == [
        {"type": "repository", "name": "b1", "actions": ["pull"]}
    ]
    r = requests.get(
        f"{tenants.url}/auth/token",
        params={"service": "skyreg", "scope": "repository:b1:pull,push,delete"},
        headers={"Authorization": f"Bearer {pull_only}"},
    )
    assert r.status_code == 401, r.text
    assert "token" not in r.json()
    # ...and the pull-only JWT still cannot start an upload.
    push = requests.post(
        f"{tenants.url}/v2/b1/blobs/uploads/", headers={"Authorization": f"Bearer {pull_only}"}
    )
    assert push.status_code == 401
    assert 'error="insufficient_scope"' in push.headers["WWW-Authenticate"]


def test_a_registry_jwt_cannot_be_renewed_with_itself(tenants: Tenants) -> None:
    token = _jwt(tenants.url, tenants.deploy_b1, "repository:b1:pull")
    for method in ("GET", "POST"):
        r = requests.request(
            method,
            f"{tenants.url}/auth/token",
            params={"service": "skyreg", "scope": "repository:b1:pull"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code in (400, 401), (method, r.status_code, r.text)
        assert "token" not in r.text or "access_token" not in r.json()
    # Nor as the password of the OAuth2 password grant.
    r = requests.post(
        f"{tenants.url}/auth/token",
        data={"grant_type": "password", "username": "x", "password": token, "service": "skyreg"},
    )
    assert r.status_code == 401


def _get_from(
    source: str, port: int, secret: str, forwarded_for: str | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    import base64

    headers = {"Authorization": "Basic " + base64.b64encode(f"x:{secret}".encode()).decode()}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    conn.request("GET", "/v2/", headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_valid_credentials_are_never_refused_for_failures_at_their_address(
    tmp_path: Path,
) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data", options={"auth_failure_limit": 3})
    reg.start()
    try:
        secret = Tenancy(reg.data_dir).admin_secret()
        statuses = [_get_from("127.0.0.9", reg.port, "skyreg_wrong").status for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        # Someone else at that address, with a valid token, is let in...
        assert _get_from("127.0.0.9", reg.port, secret).status == 200
        # ...while failing attempts from it are still slowed down.
        refused = _get_from("127.0.0.9", reg.port, "skyreg_wrong")
        assert refused.status == 429
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        reg.stop()


def test_behind_a_proxy_the_limiter_cannot_be_aimed_at_a_victim_or_dodged(tmp_path: Path) -> None:
    reg = InProcessRegistry(
        data_dir=tmp_path / "data",
        options={"trusted_proxies": ("127.0.0.1",), "auth_failure_limit": 3},
    )
    reg.start()
    try:
        secret = Tenancy(reg.data_dir).admin_secret()
        victim = "10.20.30.40"
        # A local process speaking as the proxy claims to be the victim and fails on purpose.
        for _ in range(6):
            _get_from("127.0.0.1", reg.port, "skyreg_wrong", forwarded_for=victim)
        assert _get_from("127.0.0.1", reg.port, secret, forwarded_for=victim).status == 200
        # Claiming a new address on every failure does not escape the limit for ever: failures
        # through one proxy count towards that proxy's own (larger) allowance too.
        statuses = [
            _get_from(
                "127.0.0.1", reg.port, "skyreg_wrong", forwarded_for=f"10.0.{i // 250}.{i % 250}"
            ).status
            for i in range(200)
        ]
        assert 429 in statuses, statuses
        assert _get_from("127.0.0.1", reg.port, secret, forwarded_for="10.9.9.9").status == 200
    finally:
        reg.stop()


def test_a_forwarded_hop_that_is_not_an_address_is_never_taken_as_the_client(
    tmp_path: Path,
) -> None:
    reg = InProcessRegistry(
        data_dir=tmp_path / "data",
        options={"trusted_proxies": ("127.0.0.1",), "auth_failure_limit": 3},
    )
    reg.start()
    try:
        # Garbage in X-Forwarded-For is no client name of its own: the failures count against the
        # proxy hop that sent it, so they are not a fresh, unlimited identity.
        statuses = [
            _get_from("127.0.0.1", reg.port, "skyreg_wrong", forwarded_for="made-up-name").status
            for _ in range(3)
        ]
        assert statuses == [401, 401, 401]
        assert _get_from("127.0.0.1", reg.port, "skyreg_wrong").status == 429
    finally:
        reg.stop()


def test_a_malformed_token_request_body_is_a_400_not_a_500(tenants: Tenants) -> None:
    url = f"{tenants.url}/auth/token"
    cases: list[tuple[dict[str, str], bytes]] = [
        ({"Content-Type": "multipart/form-data"}, b"grant_type=password"),
        ({"Content-Type": "application/x-www-form-urlencoded; charset=utf-99"}, b"a=b"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"grant_type=\xff\xfe\xfd"),
        (
            {"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
            b"not gzip at all",
        ),
    ]
    for headers, body in cases:
        r = requests.post(url, headers=headers, data=body)
        assert 400 <= r.status_code < 500, (headers, r.status_code, r.text)
    assert "Traceback" not in tenants.reg.log()


def test_metrics_refuse_a_registry_jwt_even_one_made_from_an_admin_token(tmp_path: Path) -> None:
    import json

    from tests.support.waiting import free_ports

    (port,) = free_ports(1)
    regions = tmp_path / "regions.json"
    regions.write_text(
        json.dumps({"regions": {"iad": {"url": f"http://127.0.0.1:{port}", "rtt_ms": {}}}})
    )
    reg = InProcessRegistry(
        data_dir=tmp_path / "data", options={"region": "iad", "regions_file": regions}
    )
    reg.port = port
    reg.start()
    try:
        admin = Tenancy(reg.data_dir).admin_secret()
        token = _jwt(reg.url, admin, "repository:w:pull")
        r = requests.get(f"{reg.url}/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code in (401, 403), r.text
        assert "skyreg_replication" not in r.text
        # The admin access token itself works as Basic and as Bearer (a scraper's bearer_token).
        assert requests.get(f"{reg.url}/metrics", auth=("x", admin)).status_code == 200
        bearer = requests.get(f"{reg.url}/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert bearer.status_code == 200
    finally:
        reg.stop()
