"""`showImage` (GET /api/v1/apps/{app}/images/{reference}): an image's manifests with their
config and layers (an index: each platform), its size, the manifests that refer to it, when it
was last pulled; of the app's repository and of its sub-repositories; and `listImages` rows
carrying the last pull. Against a real server, images pushed over /v2 with the app's token."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import (
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Image,
    descriptor,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.platform import Tenancy, answer, api, authed, refused
from tests.support.waiting import wait_for

PULL_FLUSH = 0.5  # seconds between writes of pull times: a pull shows in the API soon


@dataclass
class Site:
    server: InProcessRegistry
    acme: str  # an org token of acme, which owns app `shop`
    bravo: str  # an org token of bravo, which owns app `bank`

    @property
    def url(self) -> str:
        return self.server.url

    def show(self, reference: str, secret: str | None = None) -> requests.Response:
        """showImage of `reference` (its `/` percent-encoded: the path segment is one)."""
        path = "/apps/shop/images/" + quote(reference, safe=":@")
        return api(self.server, "GET", path, secret or self.acme)

    def listed(self) -> dict[tuple[str, str], dict[str, Any]]:
        rows = answer(api(self.server, "GET", "/apps/shop/images", self.acme), 200)["images"]
        return {(r["repository"], r["tag"]): r for r in rows}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("image-detail") / "data",
        options={"pull_flush_interval": PULL_FLUSH},
    )
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        tenancy.org("bravo")
        tenancy.app("shop", "acme")
        tenancy.app("bank", "bravo")
        acme, _ = tenancy.token("org", org="acme")
        bravo, _ = tenancy.token("org", org="bravo")
        yield Site(server, acme, bravo)
    finally:
        server.stop()


def _part(media_type: str, data: bytes) -> dict[str, Any]:
    return {"digest": sha256(data), "media_type": media_type, "size": len(data)}


def _manifest(image: Image, platform: str | None) -> dict[str, Any]:
    """What showImage says of an image manifest `push_image` pushed."""
    return {
        "digest": image.digest,
        "media_type": OCI_MANIFEST,
        "size": len(image.manifest),
        "platform": platform,
        "config": _part(OCI_CONFIG, image.config),
        "layers": [_part(OCI_LAYER, layer) for layer in image.layers],
    }


def _size(image: Image) -> int:
    return len(image.manifest) + len(image.config) + sum(len(layer) for layer in image.layers)


def _push_index(site: Site, tag: str) -> tuple[bytes, Image, Image]:
    """An index of an amd64 and an arm64/v8 image (distinct layers), tagged `tag`."""
    session = authed(site.acme)
    amd64 = push_image(site.url, "shop", layers=2, layer_size=3000, session=session)
    arm64 = push_image(site.url, "shop", layers=1, layer_size=5000, arch="arm64", session=session)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                descriptor(OCI_MANIFEST, amd64.manifest,
                           platform={"os": "linux", "architecture": "amd64"}),
                descriptor(OCI_MANIFEST, arm64.manifest,
                           platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            ],
        }
    ).encode()  # fmt: skip
    r = put_manifest(site.url, "shop", tag, index, OCI_INDEX, session)
    assert r.status_code == 201, r.text
    return index, amd64, arm64


def _pull(site: Site, repository: str, tag: str) -> None:
    r = authed(site.acme).get(
        f"{site.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_an_image_shows_its_manifest_config_layers_and_size(site: Site) -> None:
    image = push_image(site.url, "shop", "single", layers=3, layer_size=1500,
                       session=authed(site.acme))  # fmt: skip
    expected = {
        "repository": "shop",
        "reference": "single",
        "digest": image.digest,
        "media_type": OCI_MANIFEST,
        "size": _size(image),
        "manifests": [_manifest(image, None)],
        "platforms_left_out": 0,
        "referrers_left_out": 0,
        "referrers": [],
        "pulled_at": None,
    }
    assert answer(site.show("single"), 200) == expected
    by_digest = answer(site.show(image.digest), 200)
    assert by_digest == {**expected, "reference": image.digest}
    assert answer(site.show(f"shop@{image.digest}"), 200) == by_digest
    assert answer(site.show("shop:single"), 200) == expected
    assert site.listed()[("shop", "single")]["size"] == _size(image)


def test_an_index_lists_each_platform_with_its_config_and_layers(site: Site) -> None:
    index, amd64, arm64 = _push_index(site, "multi")
    shown = answer(site.show("multi"), 200)
    assert shown == {
        "repository": "shop",
        "reference": "multi",
        "digest": sha256(index),
        "media_type": OCI_INDEX,
        "size": shown["size"],  # see test_an_index_is_as_big_in_its_detail_as_in_the_listing
        "manifests": [_manifest(amd64, "linux/amd64"), _manifest(arm64, "linux/arm64/v8")],
        "platforms_left_out": 0,
        "referrers_left_out": 0,
        "referrers": [],
        "pulled_at": None,
    }
    # One platform of it, by digest: a single image.
    child = answer(site.show(arm64.digest), 200)
    assert child["manifests"] == [_manifest(arm64, None)]
    assert child["size"] == _size(arm64)


def test_an_index_is_as_big_in_its_detail_as_in_the_listing(site: Site) -> None:
    index, amd64, arm64 = _push_index(site, "sized")
    listed = site.listed()[("shop", "sized")]["size"]
    assert listed == len(index) + _size(amd64) + _size(arm64)
    assert answer(site.show("sized"), 200)["size"] == listed


def test_a_manifest_whose_subject_is_the_image_is_listed_as_its_referrer(site: Site) -> None:
    session = authed(site.acme)
    image = push_image(site.url, "shop", "signed", layers=1, session=session)
    empty = b"{}"
    push_blob(site.url, "shop", empty, session)
    found = {}
    for artifact_type in ("application/vnd.dev.cosign.artifact.sig.v1+json",
                          "application/vnd.example.attestation"):  # fmt: skip
        payload = os.urandom(64)
        push_blob(site.url, "shop", payload, session)
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": descriptor(OCI_EMPTY, empty),
                "layers": [descriptor("application/octet-stream", payload)],
                "subject": descriptor(OCI_MANIFEST, image.manifest),
            }
        ).encode()
        r = put_manifest(site.url, "shop", sha256(body), body, session=session)
        assert r.status_code == 201, r.text
        found[sha256(body)] = {
            "digest": sha256(body),
            "media_type": OCI_MANIFEST,
            "size": len(body),
            "artifact_type": artifact_type,
        }
    referrers = answer(site.show("signed"), 200)["referrers"]
    assert sorted(referrers, key=lambda r: r["digest"]) == [found[d] for d in sorted(found)]
    # The image's size is its own: what refers to it is not part of it.
    assert answer(site.show("signed"), 200)["size"] == _size(image)


def test_pulled_at_is_null_until_a_pull_and_then_its_time(site: Site) -> None:
    image = push_image(site.url, "shop", "pulled", layers=1, session=authed(site.acme))
    push_image(site.url, "shop", "unpulled", layers=1, session=authed(site.acme))
    assert answer(site.show("pulled"), 200)["pulled_at"] is None
    assert site.listed()[("shop", "pulled")]["pulled_at"] is None

    before = datetime.now(UTC) - timedelta(seconds=1)
    _pull(site, "shop", "pulled")

    def pulled() -> str | None:
        value = answer(site.show("pulled"), 200)["pulled_at"]
        return value if isinstance(value, str) else None

    at = wait_for(pulled, "the pull time written", 30)
    assert before <= datetime.fromisoformat(at) <= datetime.now(UTC)
    assert at.endswith("Z") or at.endswith("+00:00")
    assert answer(site.show(image.digest), 200)["pulled_at"] == at
    rows = site.listed()
    assert rows[("shop", "pulled")]["pulled_at"] == at
    assert rows[("shop", "unpulled")]["pulled_at"] is None
    assert answer(site.show("unpulled"), 200)["pulled_at"] is None


def test_an_image_of_a_sub_repository_is_shown(site: Site) -> None:
    image = push_image(site.url, "shop/worker", "stable", layers=2, session=authed(site.acme))
    expected = {
        "repository": "shop/worker",
        "reference": "stable",
        "digest": image.digest,
        "media_type": OCI_MANIFEST,
        "size": _size(image),
        "manifests": [_manifest(image, None)],
        "platforms_left_out": 0,
        "referrers_left_out": 0,
        "referrers": [],
        "pulled_at": None,
    }
    assert answer(site.show("shop/worker:stable"), 200) == expected
    by_digest = answer(site.show(f"shop/worker@{image.digest}"), 200)
    assert by_digest == {**expected, "reference": image.digest}
    # Its pulls are its own repository's.
    _pull(site, "shop/worker", "stable")
    at = wait_for(
        lambda: answer(site.show("shop/worker:stable"), 200)["pulled_at"],
        "the sub-repository's pull time written",
        30,
    )
    assert site.listed()[("shop/worker", "stable")]["pulled_at"] == at
    # The app's repository does not hold it.
    refused(site.show(image.digest), 404, "not_found")
    refused(site.show("stable"), 404, "not_found")


def test_another_orgs_token_gets_not_found_for_each_image(site: Site) -> None:
    session = authed(site.acme)
    image = push_image(site.url, "shop", "private", layers=1, session=session)
    index, _, _ = _push_index(site, "private-multi")
    sub = push_image(site.url, "shop/worker", "private", layers=1, session=session)
    references = [
        "private",
        image.digest,
        f"shop@{image.digest}",
        "private-multi",
        sha256(index),
        "shop/worker:private",
        f"shop/worker@{sub.digest}",
    ]
    for reference in references:
        assert answer(site.show(reference), 200)["repository"] in ("shop", "shop/worker")
        message = refused(site.show(reference, site.bravo), 404, "not_found")
        assert image.digest not in message and sub.digest not in message
    refused(api(site.server, "GET", "/apps/shop/images", site.bravo), 404, "not_found")
    # Nor through bravo's own app.
    for reference in ("private", f"shop/worker@{sub.digest}", f"shop@{image.digest}"):
        refused(
            api(site.server, "GET", "/apps/bank/images/" + quote(reference, safe=":@"), site.bravo),
            404,
            "not_found",
        )


def test_a_layer_two_platforms_share_counts_once(site: Site) -> None:
    session = authed(site.acme)
    amd64 = push_image(site.url, "shop", layers=2, layer_size=3000, session=session)
    config = json.dumps({"architecture": "arm64", "os": "linux", "nonce": os.urandom(8).hex()})
    push_blob(site.url, "shop", config.encode(), session)
    arm64 = image_manifest(config.encode(), amd64.layers)  # the same layers
    assert put_manifest(site.url, "shop", sha256(arm64), arm64, session=session).status_code == 201
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**descriptor(OCI_MANIFEST, amd64.manifest),
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {**descriptor(OCI_MANIFEST, arm64),
                 "platform": {"os": "linux", "architecture": "arm64"}},
            ],
        }
    ).encode()  # fmt: skip
    assert put_manifest(site.url, "shop", "twice", index, OCI_INDEX, session).status_code == 201
    stored_once = (
        len(index) + len(amd64.manifest) + len(arm64) + len(amd64.config) + len(config)
        + sum(len(layer) for layer in amd64.layers)
    )  # fmt: skip
    assert site.listed()[("shop", "twice")]["size"] == stored_once
    assert answer(site.show("twice"), 200)["size"] == stored_once
