"""Hostile review of lazy pull (issue 18): another org's agent and tenants' own tokens against the
prefetch lists, Range header forms and cross-repository Range reads, layer-index referrers read
or forged across orgs, hostile layers against the indexer, and the agent's lazy mounts shared by
images of two orgs."""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import requests

from skyreg.lazy.index import ARTIFACT_TYPE, INDEX_MEDIA_TYPE
from skyreg.lazy.prefetch import MAX_BYTES, MAX_RANGE_BYTES
from skyreg.services.prefetch import MAX_OFFSET
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, OCI_INDEX, descriptor, push_blob, put_manifest, sha256
from tests.support.platform import Tenancy, answer, api, authed
from tests.support.waiting import wait_for

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MAIN = b"#!/bin/sh\necho the real entrypoint\n"


def _tar(files: dict[str, bytes], pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            if pax:
                info.pax_headers = dict(pax)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Site:
    server: InProcessRegistry
    admin: str
    acme_agent: str
    bravo_agent: str
    every_agent: str
    acme_org: str
    bravo_org: str
    bravo_deploy: str
    layer: bytes  # shop's gzip layer (app/main and 3 MiB of filler)
    image: str  # shop's image (acme's only)

    def reg(self, secret: str | None, method: str, path: str, **kw: Any) -> requests.Response:
        session = authed(secret) if secret else requests.Session()
        return session.request(method, self.server.url + path, timeout=60, **kw)

    def push(self, repo: str, tag: str, layers: list[tuple[str, bytes]]) -> str:
        session = authed(self.admin)
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        for blob in [config, *(data for _, data in layers)]:
            push_blob(self.server.url, repo, blob, session)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(media_type, data) for media_type, data in layers],
            }
        ).encode()
        response = put_manifest(self.server.url, repo, tag, manifest, session=session)
        assert response.status_code == 201, response.text
        return sha256(manifest)

    def referrer(self, repo: str, digest: str) -> dict[str, Any]:
        """The image's layer-index referrer, once the scan worker made it."""

        def found() -> dict[str, Any] | None:
            listed = self.reg(
                self.admin, "GET", f"/v2/{repo}/referrers/{digest}",
                params={"artifactType": ARTIFACT_TYPE},
            )  # fmt: skip
            assert listed.status_code == 200, listed.text
            manifests = listed.json()["manifests"]
            if not manifests:
                return None
            [only] = manifests
            got = self.reg(
                self.admin, "GET", f"/v2/{repo}/manifests/{only['digest']}",
                headers={"Accept": OCI_MANIFEST},
            )  # fmt: skip
            assert got.status_code == 200, got.text
            return {"digest": only["digest"], **got.json()}

        return wait_for(found, f"the layer-index referrer of {repo}@{digest}", timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    server = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("lazy-attacks") / "data",
        options={"scan_worker": True, "lazy_index": True},
    )
    server.start()
    try:
        t = Tenancy(server.data_dir)
        t.org("acme")
        t.org("bravo")
        t.app("shop", "acme")
        t.app("bank", "bravo")
        site = Site(
            server=server,
            admin=t.admin_secret(),
            acme_agent=t.token("agent", org="acme")[0],
            bravo_agent=t.token("agent", org="bravo")[0],
            every_agent=t.token("agent")[0],
            acme_org=t.token("org", org="acme")[0],
            bravo_org=t.token("org", org="bravo")[0],
            bravo_deploy=t.token("deploy", org="bravo", app="bank")[0],
            layer=gzip.compress(
                _tar({"filler": os.urandom(3 << 20), "app/main": MAIN}), 6, mtime=0
            ),
            image="",
        )
        site.image = site.push("shop", "v1", [(LAYER_GZIP, site.layer)])
        site.referrer("shop", site.image)
        yield site
    finally:
        server.stop()


def _prefetch(app: str, reference: str) -> str:
    return f"/agent/apps/{app}/images/{quote(reference, safe=':@')}/prefetch"


# -- prefetch lists ---------------------------------------------------------------------------


def test_another_orgs_agent_reaches_no_list_by_any_reference_form(site: Site) -> None:
    layer = sha256(site.layer)
    mine = [{"layer": layer, "offset": 0, "length": 4096}]
    answer(api(site.server, "PUT", _prefetch("shop", site.image), site.acme_agent,
               json={"ranges": mine}), 200)  # fmt: skip
    poison = {"ranges": [{"layer": layer, "offset": 1 << 20, "length": MAX_RANGE_BYTES}]}
    forms = [
        ("shop", site.image),
        ("shop", f"shop@{site.image}"),
        ("bank", f"shop@{site.image}"),
        ("bank", f"bank/../shop@{site.image}"),
        ("bank", f"bank/shop@{site.image}"),
        ("bank", f"bank/%2e%2e/shop@{site.image}"),
        ("bank", f"bankshop@{site.image}"),
        ("bank", f"/shop@{site.image}"),
        ("bank", f"bank@shop@{site.image}"),
        ("SHOP", site.image),
        ("shop%2fx", site.image),
    ]
    for app, reference in forms:
        for method in ("GET", "PUT"):
            kw: dict[str, Any] = {"json": poison} if method == "PUT" else {}
            resp = api(site.server, method, _prefetch(app, reference), site.bravo_agent, **kw)
            assert resp.status_code in (400, 404), (app, reference, method, resp.text)
            assert layer not in resp.text and "4096" not in resp.text, resp.text
    # Tenants' own tokens (org, deploy) and anonymous callers are no agents.
    path = _prefetch("bank", site.image)
    for secret, status in ((site.bravo_org, 403), (site.bravo_deploy, 403), (None, 401)):
        for method in ("GET", "PUT"):
            kw = {"json": poison} if method == "PUT" else {}
            resp = api(site.server, method, _prefetch("shop", site.image), secret, **kw)
            assert resp.status_code == status, (secret, method, resp.text)
            assert api(site.server, method, path, secret, **kw).status_code in (status, 404)
    got = answer(api(site.server, "GET", _prefetch("shop", site.image), site.acme_agent), 200)
    assert got["ranges"] == mine


def test_report_bodies_out_of_bounds_are_refused_and_the_list_kept(site: Site) -> None:
    path = _prefetch("shop", site.image)
    layer = sha256(site.layer)
    good = [{"layer": layer, "offset": 8192, "length": 512}]
    answer(api(site.server, "PUT", path, site.acme_agent, json={"ranges": good}), 200)
    hostile: dict[str, Any] = {
        "offset past the bound": [{"layer": layer, "offset": MAX_OFFSET + 1, "length": 1}],
        "offset over int64": [{"layer": layer, "offset": 1 << 63, "length": 1}],
        "offset over uint64": [{"layer": layer, "offset": 1 << 70, "length": 1}],
        "negative offset": [{"layer": layer, "offset": -(1 << 62), "length": 1}],
        "length over a range": [{"layer": layer, "offset": 0, "length": MAX_RANGE_BYTES + 1}],
        "negative length": [{"layer": layer, "offset": 10, "length": -5}],
        "float offset": [{"layer": layer, "offset": 1.5, "length": 1}],
        "bool offset": [{"layer": layer, "offset": True, "length": 1}],
        "string offset": [{"layer": layer, "offset": "1", "length": 1}],
        "duplicates over the total": [{"layer": layer, "offset": 0, "length": MAX_RANGE_BYTES}]
        * (MAX_BYTES // MAX_RANGE_BYTES + 1),
        "config as a layer": [{"layer": "sha256:" + "0" * 64, "offset": 0, "length": 1}],
        "null layer": [{"layer": None, "offset": 0, "length": 1}],
        "not a list": {"layer": layer, "offset": 0, "length": 1},
    }
    for name, ranges in hostile.items():
        resp = api(site.server, "PUT", path, site.acme_agent, json={"ranges": ranges})
        assert resp.status_code == 400, (name, resp.status_code, resp.text)
    for raw in (b"{", b'{"ranges": []}' + b" " * (2 << 20), b"\xff\xfe", b'{"ranges": [[[[[]]]]]}'):
        resp = requests.put(
            f"{site.server.url}/api/v1{path}", data=raw, timeout=60,
            headers={"Authorization": f"Bearer {site.acme_agent}",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        assert resp.status_code in (400, 413), (raw[:20], resp.status_code, resp.text)
    assert answer(api(site.server, "GET", path, site.acme_agent), 200)["ranges"] == good


# -- Range on blobs -----------------------------------------------------------------------------


def test_range_header_forms_on_a_blob_the_region_holds(site: Site) -> None:
    url = f"/v2/shop/blobs/{sha256(site.layer)}"
    size = len(site.layer)

    def get(value: str) -> requests.Response:
        sent = value.encode() if not value.isascii() else value
        return site.reg(site.acme_org, "GET", url, headers={"Range": sent})

    for value in ("bytes=-0", "bytes=5-3", "bytes=0-1,5-6", f"bytes={size}-",
                  "bytes=99999999999999999999999999-", "bytes= 0-1", "bytes=0 -1", "bytes=-",
                  "bytes=0x10-20", "items=0-1", "bytes=+1-2", "bytes=\u0661-\u0662"):  # fmt: skip
        resp = get(value)
        assert resp.status_code == 416, (value, resp.status_code)
        assert resp.headers["Content-Range"] == f"bytes */{size}", value
        assert site.layer[:64] not in resp.content
    for value, first, last in (
        ("bytes=0-99999999999999999999999999", 0, size - 1),
        ("bytes=-99999999999999999999999999", 0, size - 1),
        (f"bytes={size - 10}-", size - 10, size - 1),
        ("bytes=-10", size - 10, size - 1),
        ("bytes=7-7", 7, 7),
    ):
        resp = get(value)
        assert resp.status_code == 206, (value, resp.status_code, resp.text[:200])
        assert resp.content == site.layer[first : last + 1], value
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{size}", value


def test_a_range_read_of_another_repositorys_blob_is_missing_like_a_whole_get(
    site: Site,
) -> None:
    layer = sha256(site.layer)
    referrer = site.referrer("shop", site.image)
    [index] = [d["digest"] for d in referrer["layers"] if d["mediaType"] == INDEX_MEDIA_TYPE]
    for digest in (layer, index):
        url = f"/v2/bank/blobs/{digest}"
        whole = site.reg(site.bravo_org, "GET", url)
        assert whole.status_code == 404 and "BLOB_UNKNOWN" in whole.text
        for value in ("bytes=0-1", "bytes=-1", "bytes=0-", "bytes=5-3", "bytes=0-1,2-3"):
            ranged = site.reg(site.bravo_org, "GET", url, headers={"Range": value})
            assert (ranged.status_code, ranged.json()) == (404, whole.json()), value
        assert site.reg(site.bravo_org, "HEAD", url).status_code == 404
        # Through acme's repository: bravo may not read it at all.
        theirs = site.reg(site.bravo_org, "GET", f"/v2/shop/blobs/{digest}",
                          headers={"Range": "bytes=0-9"})  # fmt: skip
        assert theirs.status_code in (401, 403, 404), theirs.status_code
        assert site.layer[:10] not in theirs.content


# -- layer-index referrers ----------------------------------------------------------------------


def test_an_images_index_referrer_is_not_readable_by_another_org(site: Site) -> None:
    referrer = site.referrer("shop", site.image)
    for secret in (site.bravo_org, site.bravo_deploy, site.bravo_agent, None):
        listed = site.reg(secret, "GET", f"/v2/shop/referrers/{site.image}")
        assert listed.status_code in (401, 403, 404), listed.status_code
        assert referrer["digest"] not in listed.text
        got = site.reg(secret, "GET", f"/v2/shop/manifests/{referrer['digest']}",
                       headers={"Accept": OCI_MANIFEST})  # fmt: skip
        assert got.status_code in (401, 403, 404) and ARTIFACT_TYPE not in got.text
    # Through bravo's own repository, the subject is unknown: nothing listed.
    own = site.reg(site.bravo_org, "GET", f"/v2/bank/referrers/{site.image}")
    assert own.status_code in (200, 404)
    assert referrer["digest"] not in own.text


@pytest.mark.parametrize("form", ["index artifactType", "spaced artifactType", "upper case"])
def test_a_tenant_cannot_forge_an_index_referrer_an_agent_would_take(site: Site, form: str) -> None:
    """The agent takes a referrer whose artifactType is exactly ARTIFACT_TYPE (listing and
    manifest): an image index claiming it is refused; near-miss spellings may be pushed but are
    not listed under the lazy-index artifact type (so no agent picks them)."""
    image = site.push("bank", f"forge-{form.replace(' ', '-')}", [(LAYER_TAR, _tar({"a": b"a"}))])
    session = authed(site.bravo_org)
    fake = json.dumps({"entries": []}).encode()
    push_blob(site.server.url, "bank", fake, session)
    subject = {"mediaType": OCI_MANIFEST, "digest": image, "size": 1}
    artifact = {
        "index artifactType": ARTIFACT_TYPE,
        "spaced artifactType": ARTIFACT_TYPE + " ",
        "upper case": ARTIFACT_TYPE.upper(),
    }[form]
    if form == "index artifactType":
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                               "artifactType": artifact, "subject": subject}  # fmt: skip
    else:
        empty = b"{}"
        push_blob(site.server.url, "bank", empty, session)
        doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact,
               "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                          "digest": sha256(empty), "size": 2},
               "layers": [descriptor(INDEX_MEDIA_TYPE, fake)], "subject": subject}  # fmt: skip
    body = json.dumps(doc).encode()
    pushed = put_manifest(site.server.url, "bank", sha256(body), body, session=session,
                          media_type=doc["mediaType"])  # fmt: skip
    if form == "index artifactType":
        assert pushed.status_code == 403 and "reserved" in pushed.text, pushed.text
    listed = site.reg(site.bravo_org, "GET", f"/v2/bank/referrers/{image}",
                      params={"artifactType": ARTIFACT_TYPE})  # fmt: skip
    assert listed.status_code == 200
    assert [m for m in listed.json()["manifests"] if m["digest"] == sha256(body)] == []
    unfiltered = site.reg(site.bravo_org, "GET", f"/v2/bank/referrers/{image}").json()
    assert all(m.get("artifactType") != ARTIFACT_TYPE for m in unfiltered["manifests"]
               if m["digest"] == sha256(body))  # fmt: skip


# -- hostile layers -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["huge pax", "long name", "not a tar", "cut gzip"])
def test_a_hostile_layer_gets_no_index_and_the_indexer_goes_on(site: Site, kind: str) -> None:
    """A 2 MiB PAX header, a 100,000-byte name, a layer that is not a tar, a gzip stream cut
    short: the hostile layer gets no index (its image is pulled whole: the scan refuses it
    first, or the referrer leaves the layer out), and the scan worker indexes the next image."""
    sane = _tar({"etc/motd": b"fine\n"})
    hostile = {
        "huge pax": _tar({"x": b"x"}, pax={"comment": "c" * (2 << 20)}),
        "long name": _tar({"n" * 100_000: b"x"}),
        "not a tar": os.urandom(10_000),
        "cut gzip": gzip.compress(_tar({"y": os.urandom(200_000)}), 1, mtime=0)[:50_000],
    }[kind]
    media_type = LAYER_GZIP if kind == "cut gzip" else LAYER_TAR
    tag = "hostile-" + kind.replace(" ", "-")
    image = site.push("shop", tag, [(LAYER_TAR, sane), (media_type, hostile)])

    def scanned() -> dict[str, Any] | None:
        files = api(site.server, "GET", "/apps/shop/files", site.admin, params={"image": tag})
        state = dict(answer(files, 200)["scan"]) if files.status_code == 200 else None
        return state if state and state["state"] in ("done", "failed") else None

    scan = wait_for(scanned, f"the scan of {tag}", timeout=120)
    if scan["state"] == "failed":  # no referrer is ever made for an image the scan refused
        listed = site.reg(site.admin, "GET", f"/v2/shop/referrers/{image}",
                          params={"artifactType": ARTIFACT_TYPE})  # fmt: skip
        assert listed.json()["manifests"] == [], (scan, listed.text)
    else:
        described = {
            d["annotations"]["dev.skyreg.lazy.layer"]
            for d in site.referrer("shop", image)["layers"]
        }
        assert described == {sha256(sane)}, scan
    after = site.push("shop", f"after-{tag}", [(LAYER_TAR, _tar({tag: b"1"}))])
    assert site.referrer("shop", after)["subject"]["digest"] == after


# -- lazy mounts on an agent host ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0
    or not os.path.exists("/dev/fuse")
    or importlib.util.find_spec("pyfuse3") is None,
    reason="lazy mounts need root, /dev/fuse and pyfuse3",
)
def test_a_machine_of_one_org_does_not_ride_another_orgs_lazy_mount(
    site: Site, tmp_path: Path
) -> None:
    """acme and bravo both push one (public) image; a bravo machine starts first on a host, then
    an acme one: acme's never rides bravo's mount (which reads through bravo's repository and
    records for bravo's prefetch list). acme's repository holds no index of its own (a manifest
    is indexed once, in the repository that first held it), so acme's machine is pulled whole,
    and bravo deleting its copy changes nothing for it."""
    filler = os.urandom(2 << 20)
    layer = gzip.compress(_tar({"filler": filler, "app/main": MAIN}), 6, mtime=0)
    # bravo pushes first: its repository gets the layer-index referrer (a manifest is scanned
    # and indexed once, whichever repository holds it: acme's copy gets none of its own).
    digest = site.push("bank", "shared", [(LAYER_GZIP, layer)])
    site.referrer("bank", digest)
    assert site.push("shop", "shared", [(LAYER_GZIP, layer)]) == digest

    from skyreg.machines.layercache import LayerCache
    from skyreg.machines.lazystart import LazyMounts, LazyUnavailable
    from skyreg.machines.prepare import RegistrySource, resolve_image

    async def nothing() -> None:
        return None

    def bravo_deletes_its_copy() -> None:
        session = authed(site.bravo_org)
        gone = session.delete(f"{site.server.url}/v2/bank/manifests/{digest}", timeout=30)
        assert gone.status_code == 202, gone.text
        unlinked = session.delete(f"{site.server.url}/v2/bank/blobs/{sha256(layer)}", timeout=30)
        assert unlinked.status_code == 202, unlinked.text

    async def scenario() -> str:
        async with aiohttp.ClientSession() as session:
            source = RegistrySource(site.server.url, site.every_agent, session)
            mounts = LazyMounts(tmp_path / "lazy", LayerCache(tmp_path / "cache"))
            try:
                bank = await resolve_image(source, "bank", digest)
                shop = await resolve_image(source, "shop", digest)
                bank_mnt = await mounts.acquire(source, bank, nothing)
                assert (await asyncio.to_thread((bank_mnt / "app" / "main").read_bytes)) == MAIN
                with pytest.raises(LazyUnavailable) as refused:
                    await mounts.acquire(source, shop, nothing)
                await asyncio.to_thread(bravo_deletes_its_copy)
                assert bank_mnt.exists()
                return str(refused.value)
            finally:
                await mounts.close()

    assert "no lazy index" in asyncio.run(scenario())
