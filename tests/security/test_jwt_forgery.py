"""Registry tokens that skyreg did not sign, or signed for something else, are refused.

SECURITY.md: "Tampered, alg: none, HS256-with-the-public-key, unknown kid, expired, revoked and
cross-repository JWTs are refused".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyreg.auth.keys import KeyRing
from skyreg.meta.registry import open_database
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry


@dataclass
class Target:
    reg: ServedRegistry
    valid: str  # a genuine pull JWT for a1
    sub: str

    def get(self, token: str) -> requests.Response:
        return requests.get(
            f"{self.reg.url}/v2/a1/manifests/v1", headers={"Authorization": f"Bearer {token}"}
        )


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("jwt") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("orga")
        t.app("a1", "orga")
        secret, _ = t.token("org", org="orga")
        session = requests.Session()
        session.auth = ("x", secret)
        push_image(reg.url, "a1", "v1", session=session)
        r = requests.get(
            f"{reg.url}/auth/token",
            params={"service": "skyreg", "scope": "repository:a1:pull"},
            auth=("x", secret),
        )
        valid = str(r.json()["token"])
        sub = str(jwt.decode(valid, options={"verify_signature": False})["sub"])
        yield Target(reg, valid, sub)
    finally:
        reg.stop()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sub: str) -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": "skyreg",
        "sub": sub,
        "aud": "skyreg",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "access": [{"type": "repository", "name": "a1", "actions": ["pull", "push", "delete"]}],
    }


def _public_keys(target: Target) -> list[tuple[str, bytes]]:
    ring = KeyRing(open_database(None, target.reg.data_dir).engine)
    try:
        ring.ensure()
        pem, spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        return [(key.kid, key.public.public_bytes(pem, spki)) for key in ring._fresh().values()]
    finally:
        ring.close()


def test_the_genuine_token_works(target: Target) -> None:
    assert target.get(target.valid).status_code == 200  # so the refusals below mean something


def test_alg_none_is_refused(target: Target) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(_claims(target.sub)).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        r = target.get(token)
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_hs256_signed_with_the_public_key_is_refused(target: Target) -> None:
    for kid, pem in _public_keys(target):
        for key in (pem, pem.strip()):
            header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
            payload = _b64(json.dumps(_claims(target.sub)).encode())
            mac = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
            assert target.get(f"{header}.{payload}.{_b64(mac)}").status_code == 401


def test_a_token_signed_by_an_unknown_key_is_refused(target: Target) -> None:
    stranger = Ed25519PrivateKey.generate()
    known_kid = _public_keys(target)[0][0]
    for kid in (known_kid, "0000000000000000", None):
        headers = {"kid": kid} if kid else {}
        token = jwt.encode(_claims(target.sub), stranger, algorithm="EdDSA", headers=headers)
        assert target.get(token).status_code == 401


def test_a_token_for_another_audience_is_refused(target: Target) -> None:
    ring = KeyRing(open_database(None, target.reg.data_dir).engine)
    try:
        claims = _claims(target.sub)
        claims["aud"] = "some-other-registry"
        assert target.get(ring.sign(claims)).status_code == 401
    finally:
        ring.close()
