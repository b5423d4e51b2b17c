"""A deploy is refused when the app's repository lacks the bytes of a blob its machines need.

A manifest may name a layer it does not have when the layer's descriptor has `urls` (a
"foreign", non-distributable layer); the registry accepts it at push. Deploying it would let an
agent fetch another tenant's layer by its digest, so the deploy must refuse, naming the digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Image,
    descriptor,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry


@dataclass
class Tenants:
    reg: ServedRegistry
    a_image: Image  # org A's image in app `alpha`
    b_token: str  # org token of org B (apps `bravo`, `bravo-src`)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.auth = ("x", self.b_token)
        return s

    def deploy(self, app: str, image: str) -> requests.Response:
        return self.session().post(
            f"{self.reg.url}/api/v1/apps/{app}/releases", json={"image": image}
        )

    def releases(self, app: str) -> list[dict[str, object]]:
        r = self.session().get(f"{self.reg.url}/api/v1/apps/{app}/releases")
        assert r.status_code == 200, r.text
        releases: list[dict[str, object]] = r.json()["releases"]
        return releases


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("foreign") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("orga")
        t.org("orgb")
        t.app("alpha", "orga")
        t.app("bravo", "orgb")
        t.app("bravo-src", "orgb")
        a = requests.Session()
        a.auth = ("x", t.token("org", org="orga")[0])
        a_image = push_image(reg.url, "alpha", "v1", session=a)
        yield Tenants(reg, a_image, t.token("org", org="orgb")[0])
    finally:
        reg.stop()


def _foreign_manifest(t: Tenants, repo: str, tag: str) -> tuple[bytes, str]:
    """Push, as org B, a manifest whose layer is org A's layer, marked foreign with `urls`."""
    b = t.session()
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    push_blob(t.reg.url, repo, config, b)
    stolen = t.a_image.layers[0]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, stolen, urls=["https://example.invalid/layer"])],
    }
    raw = json.dumps(doc).encode()
    r = put_manifest(t.reg.url, repo, tag, raw, session=b)
    assert r.status_code == 201, r.text  # accepted at push: the layer is non-distributable
    return raw, sha256(stolen)


def _assert_refused(r: requests.Response, digest: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert digest in r.json()["error"]["message"]


def test_deploying_a_foreign_layer_of_another_tenant_is_refused(tenants: Tenants) -> None:
    _, digest = _foreign_manifest(tenants, "bravo", "foreign")
    _assert_refused(tenants.deploy("bravo", "bravo:foreign"), digest)
    assert tenants.releases("bravo") == []  # nothing recorded, no machine created


def test_copying_a_foreign_layer_into_the_app_is_refused(tenants: Tenants) -> None:
    _, digest = _foreign_manifest(tenants, "bravo-src", "foreign")
    _assert_refused(tenants.deploy("bravo", "bravo-src:foreign"), digest)
    tags = tenants.session().get(f"{tenants.reg.url}/v2/bravo/tags/list").json().get("tags")
    assert not [tag for tag in tags or [] if tag.startswith("deployment-")]


def test_an_index_with_a_foreign_child_is_refused(tenants: Tenants) -> None:
    b = tenants.session()
    good = push_image(tenants.reg.url, "bravo", "good-child", session=b)
    raw, digest = _foreign_manifest(tenants, "bravo", "bad-child")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(
                    OCI_MANIFEST, good.manifest, platform={"architecture": "amd64", "os": "linux"}
                ),
                descriptor(OCI_MANIFEST, raw, platform={"architecture": "arm64", "os": "linux"}),
            ],
        }
    ).encode()
    r = put_manifest(tenants.reg.url, "bravo", "multi", index, OCI_INDEX, session=b)
    assert r.status_code == 201, r.text
    _assert_refused(tenants.deploy("bravo", "bravo:multi"), digest)


def test_a_normal_deploy_still_works(tenants: Tenants) -> None:
    b = tenants.session()
    push_image(tenants.reg.url, "bravo-src", "ok", session=b)
    r = tenants.deploy("bravo", "bravo-src:ok")
    assert r.status_code == 201, r.text
    push_image(tenants.reg.url, "bravo", "own", session=b)
    assert tenants.deploy("bravo", "bravo:own").status_code == 201
