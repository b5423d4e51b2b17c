"""`GET`/`PUT /agent/apps/{app}/images/{reference}/prefetch` (issue 18, learned prefetch): an
agent reports what a lazily started machine read first; the next start of the image reads it
back. Agents of the image's org only; reports are bounded and name the image's own layers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest

from skyreg.lazy.prefetch import MAX_BYTES, MAX_RANGES
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import Image, push_image
from tests.support.platform import Tenancy, answer, api, authed, refused

MiB = 1 << 20


@dataclass
class Site:
    server: InProcessRegistry
    admin: str
    acme_agent: str
    bravo_agent: str
    every_org_agent: str
    acme_org: str
    shop: Image  # acme's
    bank: Image  # bravo's


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = InProcessRegistry(data_dir=tmp_path_factory.mktemp("prefetch") / "data")
    server.start()
    try:
        t = Tenancy(server.data_dir)
        t.org("acme")
        t.org("bravo")
        t.app("shop", "acme")
        t.app("bank", "bravo")
        admin = t.admin_secret()
        acme_agent, _ = t.token("agent", org="acme")
        bravo_agent, _ = t.token("agent", org="bravo")
        every, _ = t.token("agent")
        acme_org, _ = t.token("org", org="acme")
        shop = push_image(server.url, "shop", "v1", session=authed(admin))
        bank = push_image(server.url, "bank", "v1", session=authed(admin))
        yield Site(server, admin, acme_agent, bravo_agent, every, acme_org, shop, bank)
    finally:
        server.stop()


def _path(app: str, reference: str) -> str:
    return f"/agent/apps/{app}/images/{quote(reference, safe=':@')}/prefetch"


def _layer(image: Image, n: int) -> str:
    return "sha256:" + hashlib.sha256(image.layers[n]).hexdigest()


def test_an_agent_reports_what_a_machine_read_first_and_the_next_start_reads_it_back(
    site: Site,
) -> None:
    path = _path("shop", site.shop.digest)
    before = answer(api(site.server, "GET", path, site.acme_agent), 200)
    assert before["ranges"] == [] and before["reported_at"] is None
    ranges = [
        {"layer": _layer(site.shop, 1), "offset": 3 * MiB, "length": 2 * MiB},
        {"layer": _layer(site.shop, 0), "offset": 0, "length": MiB},
    ]
    kept = answer(api(site.server, "PUT", path, site.acme_agent, json={"ranges": ranges}), 200)
    assert kept["ranges"] == ranges and kept["bytes"] == 3 * MiB
    assert kept["repository"] == "shop" and kept["digest"] == site.shop.digest
    # Another host's agent (one for every org) reads it, in the order reported.
    got = answer(api(site.server, "GET", path, site.every_org_agent), 200)
    assert got["ranges"] == ranges and got["reported_at"] == kept["reported_at"]
    # REPO@DIGEST names the same list; the latest report replaces it.
    same = _path("shop", f"shop@{site.shop.digest}")
    latest = [{"layer": _layer(site.shop, 0), "offset": MiB, "length": 4096}]
    answer(api(site.server, "PUT", same, site.admin, json={"ranges": latest}), 200)
    assert answer(api(site.server, "GET", path, site.acme_agent), 200)["ranges"] == latest
    # Agent telemetry: not in the audit log.
    audit = answer(api(site.server, "GET", "/audit", site.admin), 200)["entries"]
    assert not [e for e in audit if "prefetch" in e["target"]]


def test_a_hostile_report_is_refused_and_the_list_is_unchanged(site: Site) -> None:
    path = _path("shop", site.shop.digest)
    good = [{"layer": _layer(site.shop, 0), "offset": 0, "length": 1024}]
    answer(api(site.server, "PUT", path, site.acme_agent, json={"ranges": good}), 200)
    layer = _layer(site.shop, 0)
    cases = {
        "too many ranges": [
            {"layer": layer, "offset": i, "length": 1} for i in range(MAX_RANGES + 1)
        ],
        "too many bytes": [
            {"layer": layer, "offset": 0, "length": MAX_BYTES},
            {"layer": layer, "offset": MAX_BYTES, "length": 1},
        ],
        "another image's layer": [{"layer": _layer(site.bank, 0), "offset": 0, "length": 1}],
        "not a digest": [{"layer": "sha256:nope", "offset": 0, "length": 1}],
        "negative offset": [{"layer": layer, "offset": -1, "length": 1}],
        "empty range": [{"layer": layer, "offset": 0, "length": 0}],
    }
    messages = {}
    for name, ranges in cases.items():
        body = {"ranges": ranges}
        messages[name] = refused(
            api(site.server, "PUT", path, site.acme_agent, json=body), 400, "bad_request"
        )
    assert f"at most {MAX_RANGES} ranges" in messages["too many ranges"]
    assert f"at most {MAX_BYTES} bytes" in messages["too many bytes"]
    assert "is not a layer of the image" in messages["another image's layer"]
    assert "is not a layer of the image" in messages["not a digest"]
    assert "offset" in messages["negative offset"] and "length" in messages["empty range"]
    # Unknown fields and a tag in place of a digest: refused too.
    extra = {"ranges": [{**good[0], "path": "/etc/passwd"}]}
    refused(api(site.server, "PUT", path, site.acme_agent, json=extra), 400, "bad_request")
    by_tag = _path("shop", "v1")
    refused(api(site.server, "PUT", by_tag, site.acme_agent, json={"ranges": good}), 400,
            "bad_request")  # fmt: skip
    # A manifest the repository does not hold (bank's, made up): as missing.
    for reference in (site.bank.digest, "sha256:" + "0" * 64):
        refused(
            api(site.server, "PUT", _path("shop", reference), site.acme_agent,
                json={"ranges": good}),
            404, "not_found",
        )  # fmt: skip
    assert answer(api(site.server, "GET", path, site.acme_agent), 200)["ranges"] == good


def test_another_orgs_agent_neither_reads_nor_writes_the_list(site: Site) -> None:
    path = _path("shop", site.shop.digest)
    good = [{"layer": _layer(site.shop, 1), "offset": 0, "length": 512}]
    answer(api(site.server, "PUT", path, site.acme_agent, json={"ranges": good}), 200)
    read = refused(api(site.server, "GET", path, site.bravo_agent), 404, "not_found")
    missing = refused(
        api(site.server, "GET", _path("nosuchapp", site.shop.digest), site.bravo_agent),
        404,
        "not_found",
    )
    assert read.replace("shop", "X") == missing.replace("nosuchapp", "X")
    poison = {"ranges": [{"layer": _layer(site.shop, 0), "offset": 0, "length": 1}]}
    refused(api(site.server, "PUT", path, site.bravo_agent, json=poison), 404, "not_found")
    # bravo's agent cannot reach acme's image through its own app either.
    refused(
        api(site.server, "PUT", _path("bank", f"shop@{site.shop.digest}"), site.bravo_agent,
            json=poison),
        404, "not_found",
    )  # fmt: skip
    # Tenants' own tokens are not agents: they may not read or write lists.
    refused(api(site.server, "GET", path, site.acme_org), 403, "forbidden")
    refused(api(site.server, "PUT", path, site.acme_org, json=poison), 403, "forbidden")
    refused(api(site.server, "GET", path, None), 401, "unauthorized")
    assert answer(api(site.server, "GET", path, site.acme_agent), 200)["ranges"] == good


def test_a_list_goes_with_its_manifest(site: Site) -> None:
    image = push_image(site.server.url, "shop", "gone", session=authed(site.admin))
    path = _path("shop", image.digest)
    ranges = [{"layer": _layer(image, 0), "offset": 0, "length": 100}]
    answer(api(site.server, "PUT", path, site.acme_agent, json={"ranges": ranges}), 200)
    deleted = api(site.server, "DELETE", f"/apps/shop/images/{image.digest}", site.admin)
    answer(deleted, 200)
    refused(api(site.server, "GET", path, site.acme_agent), 404, "not_found")
    # Pushed again: a fresh start, not the old list.
    push_image_again = authed(site.admin).put(
        f"{site.server.url}/v2/shop/manifests/gone",
        data=image.manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    assert push_image_again.status_code == 201, push_image_again.text
    assert answer(api(site.server, "GET", path, site.acme_agent), 200)["ranges"] == []
