"""Who may push and pull what: the permission matrix, the token flow and what must not leak."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyreg.auth.keys import KeyRing
from skyreg.auth.keys import _kid as key_id
from skyreg.meta.registry import open_database
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import Image, push_blob, push_image, put_manifest, sha256
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry

OWN, SAME_ORG, OTHER_ORG, MISSING = "app2", "app1", "foreign", "ghost"
TARGETS = (OWN, SAME_ORG, OTHER_ORG, MISSING)


@dataclass
class World:
    reg: ServedRegistry
    tenancy: Tenancy
    secrets: dict[str, str]  # token kind -> secret
    images: dict[str, Image]  # app -> image tagged "latest"

    @property
    def url(self) -> str:
        return self.reg.url

    def session(self, kind: str) -> requests.Session:
        s = requests.Session()
        if kind != "anonymous":
            s.auth = ("x", self.secrets[kind])
        return s


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Many tests here fail authentication on purpose; the limiter has its own test below.
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("auth") / "data",
        options={"auth_failure_limit": 1000, "access_log": True},
    )
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.org("other")
        for app, org in ((SAME_ORG, "acme"), (OWN, "acme"), (OTHER_ORG, "other")):
            t.app(app, org)
        t.app("pub", "other", public=True)
        secrets = {"admin": t.admin_secret()}
        secrets["org"], _ = t.token("org", org="acme")
        secrets["deploy"], _ = t.token("deploy", org="acme", app=OWN)
        secrets["readonly"], _ = t.token("readonly", org="acme")
        secrets["foreign"], _ = t.token("org", org="other")
        admin = requests.Session()
        admin.auth = ("x", secrets["admin"])
        images = {
            app: push_image(reg.url, app, "latest", session=admin)
            for app in (OWN, SAME_ORG, OTHER_ORG, "pub")
        }
        yield World(reg, t, secrets, images)
    finally:
        reg.stop()


# token kind -> target -> operation -> status (Basic auth; anonymous gets challenges)
ALLOWED_ALL = {"pull": 200, "push": 202, "delete": 202, "tags": 200, "mount": 201}
PULL_ONLY = {"pull": 200, "push": 403, "delete": 403, "tags": 200, "mount": 201}
NOTHING = {"pull": 403, "push": 403, "delete": 403, "tags": 403, "mount": 202}
CHALLENGED = {"pull": 401, "push": 401, "delete": 401, "tags": 401, "mount": 401}
MATRIX: dict[str, dict[str, dict[str, int]]] = {
    "admin": {OWN: ALLOWED_ALL, SAME_ORG: ALLOWED_ALL, OTHER_ORG: ALLOWED_ALL, MISSING: NOTHING},
    "org": {OWN: ALLOWED_ALL, SAME_ORG: ALLOWED_ALL, OTHER_ORG: NOTHING, MISSING: NOTHING},
    "deploy": {OWN: ALLOWED_ALL, SAME_ORG: PULL_ONLY, OTHER_ORG: NOTHING, MISSING: NOTHING},
    "readonly": {OWN: PULL_ONLY, SAME_ORG: PULL_ONLY, OTHER_ORG: NOTHING, MISSING: NOTHING},
    "anonymous": {t: CHALLENGED for t in TARGETS},
}
# A readonly token may push nowhere, so it cannot mount anywhere either.
MOUNT_INTO = {"admin": OWN, "org": OWN, "deploy": OWN, "readonly": OWN, "anonymous": OWN}


def _attempt(world: World, kind: str, target: str, operation: str) -> requests.Response:
    s = world.session(kind)
    url = world.url
    digest = world.images[target].digest if target in world.images else sha256(b"none")
    if operation == "pull":
        return s.get(f"{url}/v2/{target}/manifests/latest")
    if operation == "tags":
        return s.get(f"{url}/v2/{target}/tags/list")
    if operation == "push":
        return s.post(f"{url}/v2/{target}/blobs/uploads/")
    if operation == "delete":
        if target in world.images:  # a fresh tag per attempt, so allowed deletes find one
            tag = f"del-{kind}"
            admin = world.session("admin")
            r = put_manifest(url, target, tag, world.images[target].manifest, session=admin)
            assert r.status_code == 201
            return s.delete(f"{url}/v2/{target}/manifests/{tag}")
        return s.delete(f"{url}/v2/{target}/manifests/{digest}")
    assert operation == "mount"
    layer = sha256(world.images[target].layers[0]) if target in world.images else digest
    return s.post(
        f"{url}/v2/{MOUNT_INTO[kind]}/blobs/uploads/", params={"mount": layer, "from": target}
    )


@pytest.mark.parametrize("operation", ["pull", "tags", "push", "delete", "mount"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", sorted(MATRIX))
def test_permission_matrix(world: World, kind: str, target: str, operation: str) -> None:
    expected = MATRIX[kind][target][operation]
    if operation == "mount" and kind == "readonly":
        expected = 403  # the destination needs push
    if operation == "mount" and kind == "admin" and target == MISSING:
        expected = 202
    r = _attempt(world, kind, target, operation)
    assert r.status_code == expected, (kind, target, operation, r.text)
    if expected == 200 and operation == "pull":
        assert r.content == world.images[target].manifest
    if expected in (401, 403):
        code = "UNAUTHORIZED" if expected == 401 else "DENIED"
        assert [e["code"] for e in r.json()["errors"]] == [code]
    if expected == 401:
        challenge = r.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{world.url}/auth/token",service="skyreg"')
        assert f"repository:{target if operation != 'mount' else OWN}:" in challenge
    if operation == "mount" and expected == 201:
        assert r.headers["Location"] == f"/v2/{MOUNT_INTO[kind]}/blobs/" + sha256(
            world.images[target].layers[0]
        )


@pytest.mark.parametrize("kind", sorted(MATRIX))
def test_catalog_lists_only_pullable_repositories(world: World, kind: str) -> None:
    r = world.session(kind).get(f"{world.url}/v2/_catalog")
    if kind == "anonymous":
        assert r.status_code == 200
        assert r.json()["repositories"] == ["pub"]
        return
    assert r.status_code == 200
    listed = set(r.json()["repositories"])
    pullable = {app for app in world.images if MATRIX[kind].get(app, NOTHING)["pull"] == 200}
    if kind == "admin":
        pullable = set(world.images)
    else:
        pullable |= {"pub"}
    assert listed == pullable


def test_public_app_allows_anonymous_pull_never_push(world: World) -> None:
    anon = world.session("anonymous")
    r = anon.get(f"{world.url}/v2/pub/manifests/latest")
    assert r.status_code == 200
    assert r.content == world.images["pub"].manifest
    assert anon.post(f"{world.url}/v2/pub/blobs/uploads/").status_code == 401
    readonly = world.session("readonly")  # another org's token: pull yes, push no
    assert readonly.get(f"{world.url}/v2/pub/manifests/latest").status_code == 200
    assert readonly.post(f"{world.url}/v2/pub/blobs/uploads/").status_code == 403


def test_denied_answers_do_not_tell_existing_from_missing(world: World) -> None:
    s = world.session("org")
    exists = s.get(f"{world.url}/v2/{OTHER_ORG}/manifests/latest")
    missing = s.get(f"{world.url}/v2/{OTHER_ORG}/manifests/nope")
    by_digest = s.get(f"{world.url}/v2/{OTHER_ORG}/manifests/{world.images[OTHER_ORG].digest}")
    assert exists.status_code == missing.status_code == by_digest.status_code == 403
    assert exists.content == missing.content == by_digest.content
    blob = sha256(world.images[OTHER_ORG].layers[0])
    a = s.head(f"{world.url}/v2/{OTHER_ORG}/blobs/{blob}")
    b = s.head(f"{world.url}/v2/{OTHER_ORG}/blobs/{sha256(b'missing')}")
    assert a.status_code == b.status_code == 403
    real_app = s.get(f"{world.url}/v2/{OTHER_ORG}/tags/list")
    no_app = s.get(f"{world.url}/v2/{MISSING}/tags/list")
    assert real_app.status_code == no_app.status_code == 403
    assert real_app.text.replace(OTHER_ORG, "X") == no_app.text.replace(MISSING, "X")


def _token(world: World, kind: str | None, *scopes: str) -> dict[str, object]:
    auth = ("x", world.secrets[kind]) if kind else None
    r = requests.get(
        f"{world.url}/auth/token", params={"service": "skyreg", "scope": list(scopes)}, auth=auth
    )
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    assert body["token"] == body["access_token"]
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
    assert isinstance(body["issued_at"], str)
    return body


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def _bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_endpoint_grants_only_allowed_actions(world: World) -> None:
    body = _token(
        world,
        "deploy",
        f"repository:{OWN}:pull,push",
        f"repository:{SAME_ORG}:pull,push",
        f"repository:{OTHER_ORG}:pull",
    )
    access = {a["name"]: a["actions"] for a in _claims(str(body["token"]))["access"]}  # type: ignore[attr-defined]
    assert access == {OWN: ["pull", "push"], SAME_ORG: ["pull"], OTHER_ORG: []}
    headers = _bearer(body["token"])
    assert requests.post(f"{world.url}/v2/{OWN}/blobs/uploads/", headers=headers).status_code == 202
    r = requests.post(f"{world.url}/v2/{SAME_ORG}/blobs/uploads/", headers=headers)
    assert r.status_code == 401
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    pulled = requests.get(f"{world.url}/v2/{SAME_ORG}/manifests/latest", headers=headers)
    assert pulled.content == world.images[SAME_ORG].manifest


def test_registry_token_for_one_repository_is_refused_for_another(world: World) -> None:
    body = _token(world, "org", f"repository:{OWN}:pull")
    ok = requests.get(f"{world.url}/v2/{OWN}/manifests/latest", headers=_bearer(body["token"]))
    assert ok.status_code == 200
    r = requests.get(f"{world.url}/v2/{SAME_ORG}/manifests/latest", headers=_bearer(body["token"]))
    assert r.status_code == 401
    assert f'scope="repository:{SAME_ORG}:pull"' in r.headers["WWW-Authenticate"]


def test_anonymous_token_pulls_public_app_only(world: World) -> None:
    body = _token(world, None, "repository:pub:pull,push", f"repository:{OWN}:pull")
    access = {a["name"]: a["actions"] for a in _claims(str(body["token"]))["access"]}  # type: ignore[attr-defined]
    assert access == {"pub": ["pull"], OWN: []}
    r = requests.get(f"{world.url}/v2/pub/manifests/latest", headers=_bearer(body["token"]))
    assert r.content == world.images["pub"].manifest


def test_tampered_or_expired_registry_token_is_refused(world: World) -> None:
    token = str(_token(world, "admin", f"repository:{OWN}:pull")["token"])
    header, payload, signature = token.split(".")
    claims = _claims(token)
    claims["access"] = [{"type": "repository", "name": OTHER_ORG, "actions": ["pull", "push"]}]
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for bad in (f"{header}.{forged_payload}.{signature}", f"{header}.{payload}.{flipped}", "junk"):
        r = requests.get(f"{world.url}/v2/{OWN}/manifests/latest", headers=_bearer(bad))
        assert r.status_code == 401, bad
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    now = int(time.time())
    ring = KeyRing(open_database(None, world.reg.data_dir).engine)
    expired = ring.sign(
        {
            "iss": "skyreg",
            "sub": _claims(token)["sub"],
            "aud": "skyreg",
            "iat": now - 600,
            "exp": now - 300,
            "access": [{"type": "repository", "name": OWN, "actions": ["pull"]}],
        }
    )
    ring.close()
    r = requests.get(f"{world.url}/v2/{OWN}/manifests/latest", headers=_bearer(expired))
    assert r.status_code == 401


def test_revocation_stops_basic_and_issued_registry_tokens_at_once(world: World) -> None:
    secret, token_id = world.tenancy.token("org", org="acme")
    jwt_token = _token_with(world, secret, f"repository:{OWN}:pull")
    url = f"{world.url}/v2/{OWN}/manifests/latest"
    assert requests.get(url, auth=("x", secret)).status_code == 200
    assert requests.get(url, headers=_bearer(jwt_token)).status_code == 200
    world.tenancy.revoke(token_id)
    assert requests.get(url, auth=("x", secret)).status_code == 401
    assert requests.get(url, headers=_bearer(jwt_token)).status_code == 401
    r = requests.get(
        f"{world.url}/auth/token", params={"scope": f"repository:{OWN}:pull"}, auth=("x", secret)
    )
    assert r.status_code == 401


def _token_with(world: World, secret: str, scope: str) -> str:
    r = requests.get(f"{world.url}/auth/token", params={"scope": scope}, auth=("x", secret))
    assert r.status_code == 200
    return str(r.json()["token"])


def test_expired_access_token_stops_working(world: World) -> None:
    secret, _ = world.tenancy.token("org", org="acme", expires_in=timedelta(seconds=2))
    url = f"{world.url}/v2/{OWN}/manifests/latest"
    assert requests.get(url, auth=("x", secret)).status_code == 200
    deadline = time.monotonic() + 20
    while requests.get(url, auth=("x", secret)).status_code == 200:
        assert time.monotonic() < deadline, "token never expired"
        time.sleep(0.2)
    assert requests.get(url, auth=("x", secret)).status_code == 401


def test_oauth_password_grant_for_containerd(world: World) -> None:
    r = requests.post(
        f"{world.url}/auth/token",
        data={
            "grant_type": "password",
            "username": "x",
            "password": world.secrets["deploy"],
            "service": "skyreg",
            "scope": f"repository:{OWN}:pull",
            "client_id": "containerd",
        },
    )
    assert r.status_code == 200
    token = r.json()["access_token"]
    ok = requests.get(f"{world.url}/v2/{OWN}/manifests/latest", headers=_bearer(token))
    assert ok.content == world.images[OWN].manifest
    bad = requests.post(f"{world.url}/auth/token", data={"grant_type": "refresh_token"})
    assert bad.status_code == 400


def _get_from(source: str, port: int, path: str, auth: tuple[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    creds = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn.request("GET", path, headers={"Authorization": f"Basic {creds}"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_repeated_failed_logins_are_slowed_down_for_that_client_only(tmp_path: Path) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data")  # the default limit: 10 a minute
    reg.start()
    try:
        _check_failed_login_limit(reg, Tenancy(reg.data_dir).admin_secret())
    finally:
        reg.stop()


def _check_failed_login_limit(reg: ServedRegistry, secret: str) -> None:
    port = reg.port
    statuses = [_get_from("127.0.0.9", port, "/v2/", ("x", "wrong")).status for _ in range(12)]
    assert statuses[:10] == [401] * 10
    assert statuses[10:] == [429, 429]
    limited = _get_from("127.0.0.9", port, "/v2/", ("x", "wrong"))
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    # Valid credentials are never refused for failures at their address (tests/security/).
    assert _get_from("127.0.0.9", port, "/v2/", ("x", secret)).status == 200
    other = _get_from("127.0.0.1", port, "/v2/", ("x", "wrong"))
    assert other.status == 401


def test_secrets_never_appear_in_logs_or_responses(world: World) -> None:
    admin = world.session("admin")
    push_blob(world.url, OWN, b"log check", admin)
    requests.get(f"{world.url}/v2/", auth=("x", "skyreg_wrong-secret"))
    log = world.reg.log()
    assert f'"POST /v2/{OWN}/blobs/uploads/' in log  # the log holds those requests
    for secret in world.secrets.values():
        assert secret not in log
    assert "skyreg_wrong-secret" not in log
    assert "PRIVATE KEY" not in log
    r = requests.get(f"{world.url}/v2/{OWN}/tags/list", auth=("x", "skyreg_wrong-secret"))
    assert "skyreg_wrong" not in r.text
    assert not (world.reg.data_dir / "keys").exists()  # signing keys live in the database
    assert (world.reg.data_dir / "skyreg.db").stat().st_mode & 0o077 == 0
    assert (world.reg.data_dir / "admin-token").stat().st_mode & 0o077 == 0


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


def test_key_rotation_keeps_issued_tokens_until_their_key_is_retired(world: World) -> None:
    import subprocess
    import sys

    def rotate(keep: int) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "skyreg",
                "keys",
                "rotate",
                "--data-dir",
                str(world.reg.data_dir),
                "--keep",
                str(keep),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    url = f"{world.url}/v2/{OWN}/manifests/latest"
    old = str(_token(world, "org", f"repository:{OWN}:pull")["token"])
    rotate(keep=2)
    deadline = time.monotonic() + 20
    while _kid(new := str(_token(world, "org", f"repository:{OWN}:pull")["token"])) == _kid(old):
        assert time.monotonic() < deadline, "the server never picked up the new key"
        time.sleep(0.2)
    assert requests.get(url, headers=_bearer(new)).status_code == 200
    assert requests.get(url, headers=_bearer(old)).status_code == 200
    rotate(keep=1)  # the key that signed `old` is deleted
    deadline = time.monotonic() + 20
    while requests.get(url, headers=_bearer(old)).status_code == 200:
        assert time.monotonic() < deadline, "a retired key still verifies"
        time.sleep(0.2)
    assert requests.get(url, headers=_bearer(old)).status_code == 401


def _get_forwarded(port: int, forwarded_for: str, auth: tuple[str, str], **extra: str) -> Any:
    headers = {"X-Forwarded-For": forwarded_for, **extra}
    return requests.get(f"http://127.0.0.1:{port}/v2/", auth=auth, headers=headers, timeout=10)


def test_behind_a_trusted_proxy_each_forwarded_client_is_limited_on_its_own(
    tmp_path: Path,
) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data", options={"trusted_proxies": ("127.0.0.1",)})
    reg.start()
    try:
        secret = Tenancy(reg.data_dir).admin_secret()
        # "spoofed, 10.9.8.7": a client's own header, then what the proxy appended.
        bad = [_get_forwarded(reg.port, "1.2.3.4, 10.9.8.7", ("x", "wrong")) for _ in range(11)]
        assert [r.status_code for r in bad] == [401] * 10 + [429]
        assert _get_forwarded(reg.port, "10.9.8.7", ("x", "wrong")).status_code == 429
        assert _get_forwarded(reg.port, "10.9.8.8", ("x", "wrong")).status_code == 401
        assert _get_forwarded(reg.port, "10.9.8.7", ("x", secret)).status_code == 200
    finally:
        reg.stop()


def test_forwarded_headers_from_untrusted_peers_are_ignored(tmp_path: Path) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data")
    reg.start()
    try:
        # A client rotating its claimed address is still one client.
        bad = [_get_forwarded(reg.port, f"10.0.0.{i}", ("x", "wrong")) for i in range(11)]
        assert [r.status_code for r in bad] == [401] * 10 + [429]
        assert _get_forwarded(reg.port, "10.0.0.99", ("x", "wrong")).status_code == 429
    finally:
        reg.stop()


def test_signing_keys_from_old_key_files_are_imported_and_keep_verifying(tmp_path: Path) -> None:
    legacy = tmp_path / "keys"
    legacy.mkdir()
    old = Ed25519PrivateKey.generate()
    pem = old.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (legacy / "1700000000000-old.pem").write_bytes(pem)
    now = int(time.time())
    claims = {"iss": "skyreg", "sub": "t", "aud": "skyreg", "iat": now, "exp": now + 60}
    signed_before = jwt.encode(claims, old, algorithm="EdDSA", headers={"kid": _kid_of(old)})
    ring = KeyRing(open_database(None, tmp_path).engine, legacy_dir=legacy)
    try:
        ring.ensure()
        assert ring.verify(signed_before, "skyreg")["sub"] == "t"
        ring.rotate()
        assert _kid(ring.sign(claims)) != _kid_of(old)  # the new key signs
        assert ring.verify(signed_before, "skyreg")["sub"] == "t"  # the old one still verifies
    finally:
        ring.close()


def _kid_of(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key())
