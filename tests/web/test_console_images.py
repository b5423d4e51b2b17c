"""An app's images in the console: its facts, its images (tags, digests, sizes, kinds, last
pulls, scans) a page at a time and searched, one image's tags, platforms and layers, referrers
(the SBOMs the scan worker attaches, a signature), last pull, scan, findings and the commands
that pull and deploy it; in Debian's Chromium against a real server whose scan worker indexed
the images pushed here (the Debian image by skopeo), matched against an advisory loaded
through /vulndb."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.units import human_size
from tests.support.browser import Browser
from tests.support.console import ConsoleSite
from tests.support.oci import (
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    descriptor,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.platform import answer, api, authed
from tests.support.scanimages import debian_entries, write_blob, write_oci_layout
from tests.support.waiting import wait_for

MANY = 60  # tagged images besides latest, multi and shop/worker:stable: more than a page (50 tags)
ADVISORY = "DEBIAN-CVE-2026-4242"


@dataclass
class Pushed:
    """What the module pushed into acme's app `shop`."""

    latest: str  # a Debian image with a vulnerable package (tag latest)
    latest_size: int
    manifest: dict[str, Any]  # latest's manifest (its config and layers)
    manifest_size: int
    amd64: str  # the index's images (the amd64 one is latest's manifest)
    arm64: str
    arm_manifest: dict[str, Any]
    arm_size: int
    multi: str  # an index of both (tag multi)
    worker: str  # shop/worker:stable
    package: str
    version: str
    fixed: str
    findings: dict[str, dict[str, Any]]  # latest's, by package


def _debian_package() -> tuple[str, str]:
    """A package of this machine's dpkg status that is its own source (name, version)."""
    status = Path("/var/lib/dpkg/status").read_text()
    for para in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", para, re.M))
        if fields.get("Status") != "install ok installed" or "Source" in fields:
            continue
        if fields["Package"] in ("dpkg", "bash", "grep", "sed", "tar"):
            return fields["Package"], fields["Version"]
    raise AssertionError("no suitable package in /var/lib/dpkg/status")


def _osv_zip(package: str, fixed: str) -> bytes:
    record = {
        "schema_version": "1.6.0",
        "id": ADVISORY,
        "modified": "2026-11-30T00:00:00Z",
        "aliases": ["CVE-2026-4242"],
        "summary": f"test advisory for {package}",
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}],
        "affected": [
            {
                "package": {"ecosystem": "Debian:12", "name": package},
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                ],
            }
        ],
    }
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(f"{ADVISORY}.json", json.dumps(record))
    return out.getvalue()


def _push_layout(site: ConsoleSite, layout: Path, tag: str) -> tuple[str, bytes, bytes]:
    """Push a one-image OCI layout to `shop:TAG` with skopeo, as acme; (manifest digest,
    manifest, config) — the layout's own bytes: skopeo keeps them (`--preserve-digests`)."""
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false",
         "--dest-creds", f"x:{site.acme}", f"oci:{layout}",
         f"docker://{site.server.host}/shop:{tag}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    store = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = (store / index["manifests"][0]["digest"].removeprefix("sha256:")).read_bytes()
    doc = json.loads(manifest)
    config = (store / doc["config"]["digest"].removeprefix("sha256:")).read_bytes()
    return sha256(manifest), manifest, config


@pytest.fixture(scope="module")
def pushed(site: ConsoleSite, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    package, version = _debian_package()
    fixed = version + "+fix1"
    loaded = answer(
        api(site.server, "POST", "/vulndb", site.admin, data=_osv_zip(package, fixed)), 200
    )
    assert loaded["changed"] == 1, loaded

    tmp = tmp_path_factory.mktemp("images")
    session = authed(site.acme)
    base = site.url
    layout = write_oci_layout(tmp / "debian", [write_blob(tmp / "blobs", debian_entries())])
    latest, manifest, config = _push_layout(site, layout, "latest")

    # The same layers for arm64: its own config, so its own manifest.
    arm_config = json.dumps({**json.loads(config), "architecture": "arm64"}).encode()
    push_blob(base, "shop", arm_config, session)
    arm_doc = json.loads(manifest)
    arm_doc["config"] = {**arm_doc["config"], "digest": sha256(arm_config), "size": len(arm_config)}
    arm_manifest = json.dumps(arm_doc).encode()
    arm64 = sha256(arm_manifest)
    assert put_manifest(base, "shop", arm64, arm_manifest, session=session).status_code == 201
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d, "size": len(m), "platform": p}
                for d, m, p in (
                    (latest, manifest, {"os": "linux", "architecture": "amd64"}),
                    (arm64, arm_manifest, {"os": "linux", "architecture": "arm64"}),
                )
            ],
        }
    ).encode()
    assert put_manifest(base, "shop", "multi", index, OCI_INDEX, session).status_code == 201

    # Images without layers (each its own config, so its own digest): nothing to scan.
    for i in range(MANY):
        push_image(base, "shop", f"t{i:03}", layers=0, session=session)
    worker = push_image(base, "shop/worker", "stable", layers=0, session=session).digest

    def matched(image: str) -> dict[str, Any] | None:
        doc = answer(
            api(site.server, "GET", "/apps/shop/vulns", site.acme, params={"image": image}), 200
        )
        assert doc["scan"]["state"] != "failed", doc["scan"]
        return doc if doc["vulnerabilities"] is not None else None

    found = wait_for(lambda: matched("latest"), "latest scanned and matched", 120)
    # Every binary package built from the package's source is affected.
    findings = {f["package"]: f for f in found["vulnerabilities"]}
    assert {f["advisory"] for f in findings.values()} == {ADVISORY}
    assert findings[package]["version"] == version
    latest_size = next(
        i["size"]
        for i in answer(api(site.server, "GET", "/apps/shop/images", site.acme), 200)["images"]
        if i["tag"] == "latest"
    )
    return Pushed(
        latest,
        latest_size,
        json.loads(manifest),
        len(manifest),
        latest,
        arm64,
        arm_doc,
        len(arm_manifest),
        sha256(index),
        worker,
        package,
        version,
        fixed,
        findings,
    )


def _short(digest: str) -> str:
    """A digest as the console's tables show it."""
    return digest[: len("sha256:") + 12]


def _when(at: str) -> str:
    """An API time as the console shows it."""
    return at.replace("T", " ")[:16] + " UTC"


def _layer_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The rows a layers table shows of a manifest document's layers."""
    return [
        [str(n), _short(layer["digest"]), human_size(layer["size"]), layer["mediaType"]]
        for n, layer in enumerate(doc["layers"], 1)
    ]


def _image_size(doc: dict[str, Any], manifest_size: int) -> int:
    return manifest_size + doc["config"]["size"] + sum(x["size"] for x in doc["layers"])


def _config_fact(doc: dict[str, Any]) -> str:
    config = doc["config"]
    return (
        f"Config\n{_short(config['digest'])} ({human_size(config['size'])}) {config['mediaType']}"
    )


def _referrer(subject: dict[str, Any], artifact_type: str, body: bytes) -> bytes:
    """An artifact manifest of `body` whose subject is `subject` (showImage's manifest)."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": descriptor(OCI_EMPTY, b"{}"),
            "layers": [descriptor("application/octet-stream", body)],
            "subject": {
                "mediaType": subject["media_type"],
                "digest": subject["digest"],
                "size": subject["size"],
            },
        }
    ).encode()


def _image(site: ConsoleSite, reference: str) -> dict[str, Any]:
    """showImage's answer, as acme's token."""
    path = "/apps/shop/images/" + reference.replace("/", "%2F")
    return dict(answer(api(site.server, "GET", path, site.acme), 200))


def _rows_by_tag(browser: Browser) -> dict[str, list[str]]:
    return {row[0]: row for row in browser.rows("main table.images")}


def test_the_app_page_shows_the_apps_facts_and_each_image_with_its_tags_size_and_scan(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop")
    assert browser.path == "/apps/shop"
    assert browser.find("h1").text == "shop"
    assert [a.text for a in browser.find_all("nav.crumbs a")] == ["Organizations", "acme", "shop"]
    facts = browser.text("dl.facts")
    assert "Organization\nacme" in facts and "Visibility\nprivate" in facts
    assert browser.find(".tabs a[aria-current=page]").text == "Images"
    rows = _rows_by_tag(browser)
    latest = rows["latest"]
    assert latest[1] == "sha256:" + pushed.latest.removeprefix("sha256:")[:12]
    assert latest[2:4] == ["image", human_size(pushed.latest_size)]
    assert latest[5] == "never"  # pulled at the end of the module
    critical = f"{len(pushed.findings)} critical"
    assert latest[6] == critical
    digest_link = browser.find(f"main table.images a[title='{pushed.latest}']")
    href = str(digest_link.get_attribute("href"))
    assert href.endswith("/apps/shop/images/" + pushed.latest.replace(":", "%3A"))
    assert rows["multi"][2] == "index"
    assert rows["multi"][6] == critical  # its linux/amd64 image is latest's
    assert rows["t000"][6] == "not scanned"
    assert len(rows) == 50  # one tag per image here: a page of 50 tags
    browser.screenshot("app-images")


def test_the_images_page_follows_the_apis_cursor_to_the_next_page(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop")
    first = list(_rows_by_tag(browser))
    assert first == ["latest", "multi", *(f"t{i:03}" for i in range(48))]
    assert "50 tags on this page" in browser.text("nav.pager")
    browser.find("nav.pager a[rel=next]").click()
    wait_for(lambda: "cursor=" in browser.path or None, "the next page", 30)
    rows = browser.rows("main table.images")
    assert [r[0] for r in rows] == [
        *(f"t{i:03}" for i in range(48, MANY)),
        "shop/worker: stable",
    ]
    assert not browser.find_all("nav.pager a[rel=next]")
    assert browser.find("nav.pager a").text == "First page"
    browser.screenshot("app-images-page-2")


def test_searching_finds_images_by_tag_and_by_digest(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop")
    browser.fill("#q", "t05")
    browser.submit("form.search button[type=submit]")
    assert browser.path == "/apps/shop?q=t05"
    assert list(_rows_by_tag(browser)) == [f"t{i:03}" for i in range(50, MANY)]
    assert "searched 63 tags" in browser.text("nav.pager")
    browser.screenshot("app-images-search")

    browser.get("/apps/shop?q=" + pushed.latest.removeprefix("sha256:")[:16])
    assert list(_rows_by_tag(browser)) == ["latest"]
    browser.get("/apps/shop?q=" + pushed.arm64.removeprefix("sha256:")[:16])
    assert "No tag or digest matches" in browser.text("main table.images")  # untagged


def test_the_image_page_shows_its_tags_scan_findings_and_commands(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop")
    browser.find("main table.images a[href='/apps/shop/images/latest']").click()
    wait_for(lambda: browser.path == "/apps/shop/images/latest" or None, "the image page", 30)
    assert browser.find("h1").text == "shop:latest"
    facts = browser.text("main > dl.facts")
    assert f"Digest\n{pushed.latest}" in facts
    assert f"Size\n{human_size(pushed.latest_size)}" in facts
    assert f"Vulnerabilities\n{len(pushed.findings)} critical" in facts
    assert "Last pulled\nnever" in facts  # pulled at the end of the module
    assert [r[0] for r in browser.rows("main table.tags")] == ["latest"]
    # A single image: its config and layers, no platforms table.
    assert not browser.find_all("main table.platforms")
    assert _config_fact(pushed.manifest) in browser.text("main dl.config")
    assert browser.rows("main table.layers") == _layer_rows(pushed.manifest)
    layer = pushed.manifest["layers"][0]
    assert browser.find("main table.layers td[title]").get_attribute("title") == layer["digest"]
    assert "Held in this region only." in browser.text()
    scan = browser.text("dl.scan")
    assert "Scan\ndone" in scan and "Debian GNU/Linux 12" in scan
    findings = {row[2]: row for row in browser.rows("main table.findings")}
    assert set(findings) == set(pushed.findings)
    assert findings[pushed.package] == [
        "critical",
        f"{ADVISORY} (CVE-2026-4242)",
        pushed.package,
        pushed.version,
        pushed.fixed,
        f"test advisory for {pushed.package}",
    ]
    host = site.server.host
    commands = {
        i.get_attribute("id"): i.get_attribute("value")
        for i in browser.find_all("main .copy input")
    }
    assert commands == {
        "command-1": f"docker pull {host}/shop:latest",
        "command-2": f"docker pull {host}/shop@{pushed.latest}",
        "command-3": f"skyreg deploy --app shop --image {host}/shop@{pushed.latest}",
    }
    assert browser.find("button[data-copy=command-3]").text == "Copy"
    browser.screenshot("image")


def test_the_image_page_lists_the_sboms_the_scanner_attached(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    # The scan worker attaches them after the scan: wait for both through the API.
    def sboms() -> list[dict[str, Any]] | None:
        found = _image(site, "latest")["referrers"]
        return found if len(found) >= 2 else None

    referrers = wait_for(sboms, "the SPDX and CycloneDX SBOMs attached to latest", 120)
    kinds = {
        "application/spdx+json": "SBOM (SPDX)",
        "application/vnd.cyclonedx+json": "SBOM (CycloneDX)",
    }
    assert {r["artifact_type"] for r in referrers} == set(kinds)
    browser.sign_in(site.acme, "/apps/shop/images/latest")
    rows = browser.rows("main table.referrers")
    assert sorted(rows) == sorted(
        [kinds[r["artifact_type"]], r["artifact_type"], _short(r["digest"]), human_size(r["size"])]
        for r in referrers
    )
    titles = {c.get_attribute("title") for c in browser.find_all("main table.referrers td[title]")}
    assert titles == {r["digest"] for r in referrers}
    browser.screenshot("image-referrers")


def test_a_signature_referrer_is_labelled_signature(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    session = authed(site.acme)
    subject = _image(site, "t001")["manifests"][0]
    payload = b"a cosign signature payload"
    push_blob(site.url, "shop", b"{}", session)
    push_blob(site.url, "shop", payload, session)
    cosign = "application/vnd.dev.cosign.artifact.sig.v1+json"
    body = _referrer(subject, cosign, payload)
    assert put_manifest(site.url, "shop", sha256(body), body, session=session).status_code == 201
    browser.sign_in(site.acme, "/apps/shop/images/t001")
    assert browser.rows("main table.referrers") == [
        ["Signature", cosign, _short(sha256(body)), human_size(len(body))]
    ]
    # An image with no layers: its config, an empty layers table.
    assert browser.rows("main table.layers") == [["No layer."]]
    assert "0 layers of this image" in browser.text("main table.layers caption")
    browser.screenshot("image-signature")


def test_an_index_shows_as_multi_platform_with_the_scan_of_its_amd64_image(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop/images/multi")
    assert browser.path == "/apps/shop/images/multi"
    facts = browser.text("main > dl.facts")
    assert f"Digest\n{pushed.multi}" in facts
    assert "Kind\nindex (multi-platform)" in facts
    scanned = browser.find("dl.scan dd[title]")
    assert scanned.get_attribute("title") == pushed.amd64
    assert {r[2] for r in browser.rows("main table.findings")} == set(pushed.findings)
    amd64 = (pushed.manifest, pushed.manifest_size)
    arm64 = (pushed.arm_manifest, pushed.arm_size)
    assert browser.rows("main table.platforms") == [
        [
            "linux/amd64",
            _short(pushed.amd64),
            str(len(amd64[0]["layers"])),
            human_size(_image_size(*amd64)),
        ],
        [
            "linux/arm64",
            _short(pushed.arm64),
            str(len(arm64[0]["layers"])),
            human_size(_image_size(*arm64)),
        ],
    ]
    for n, (digest, (doc, _)) in enumerate(((pushed.amd64, amd64), (pushed.arm64, arm64)), 1):
        heading = browser.text(f"main h3#platform-{n}")
        assert heading == ("linux/amd64" if n == 1 else "linux/arm64") + " " + _short(digest)
        assert _config_fact(doc) in browser.text(f"main #platform-{n} ~ dl.config")
        assert browser.rows(f"main #platform-{n} ~ table.layers") == _layer_rows(doc)
    link = browser.find("main table.platforms a")
    assert str(link.get_attribute("href")).endswith("/apps/shop/images/multi#platform-1")
    # The SBOMs name the index's amd64 image (latest), not the index.
    assert "No SBOM, signature or other artifact refers to this image." in browser.text()
    browser.screenshot("image-index")


def test_an_image_of_a_sub_repository_is_named_repo_and_tag(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    browser.sign_in(site.acme, "/apps/shop?cursor=shop%3At058")
    link = browser.find("main table.images a[href='/apps/shop/images/shop/worker%3Astable']")
    link.click()
    wait_for(lambda: "worker" in browser.path or None, "the image page", 30)
    assert browser.find("h1").text == "shop/worker:stable"
    assert f"Digest\n{pushed.worker}" in browser.text("main > dl.facts")
    shown = _image(site, "shop/worker:stable")
    assert f"Size\n{human_size(shown['size'])}" in browser.text("main > dl.facts")
    config = shown["manifests"][0]["config"]
    assert browser.find("main dl.config span[title]").get_attribute("title") == pushed.worker
    assert (
        browser.find_all("main dl.config span[title]")[1].get_attribute("title") == config["digest"]
    )
    assert str(browser.find("#command-1").get_attribute("value")).endswith("/shop/worker:stable")
    browser.screenshot("image-subrepository")


@pytest.mark.parametrize("path", ["/apps/shop", "/apps/shop/images/latest"])
def test_another_orgs_token_gets_not_found_for_the_app_and_its_images(
    site: ConsoleSite, browser: Browser, pushed: Pushed, path: str
) -> None:
    browser.sign_in(site.bravo, path)
    assert browser.path == path
    assert browser.find("h1").text == "Not found"
    assert "latest" not in browser.text() and pushed.latest not in browser.driver.page_source
    browser.screenshot("images-not-found" + path.replace("/", "-"))


def test_the_image_page_is_complete_without_javascript(site: ConsoleSite, pushed: Pushed) -> None:
    form = requests.get(site.url + "/signin", timeout=30)
    found = re.search(r'name="form_secret" value="([^"]+)"', form.text)
    assert found is not None
    session = requests.Session()
    signed = session.post(
        site.url + "/signin",
        data={"form_secret": found.group(1), "token": site.acme, "next": "/"},
        cookies={"skyreg_signin": found.group(1)},
        allow_redirects=False,
        timeout=30,
    )
    assert signed.status_code == 303
    page = session.get(site.url + "/apps/shop/images/latest", timeout=30)
    assert page.status_code == 200
    body = page.text
    assert f'<dd class="mono">{pushed.latest}</dd>' in body
    assert ADVISORY in body and pushed.fixed in body
    host = site.server.host
    assert f'value="docker pull {host}/shop:latest"' in body
    assert f'value="skyreg deploy --app shop --image {host}/shop@{pushed.latest}"' in body
    listing = session.get(site.url + "/apps/shop", timeout=30)
    assert listing.status_code == 200
    assert f"{len(pushed.findings)} critical" in listing.text and 'rel="next"' in listing.text


def test_an_image_with_more_layers_than_a_page_shows_lists_the_first_500_and_says_so(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    session = authed(site.acme)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz"):
        pass  # an empty layer, the same one 501 times
    layer = out.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": "many layers"}).encode()
    push_blob(site.url, "shop", layer, session)
    push_blob(site.url, "shop", config, session)
    manifest = image_manifest(config, [layer] * 501)
    digest = sha256(manifest)
    assert put_manifest(site.url, "shop", digest, manifest, session=session).status_code == 201
    assert len(_image(site, digest)["manifests"][0]["layers"]) == 501
    browser.sign_in(site.acme, "/apps/shop/images/" + digest)
    assert browser.text("main table.layers caption") == "501 layers of this image"
    rows = browser.rows("main table.layers")
    assert len(rows) == 500
    assert rows[-1] == ["500", _short(sha256(layer)), human_size(len(layer)), OCI_LAYER]
    note = "1 more layer not shown: the page lists the first 500 of each platform."
    assert note in browser.text()
    browser.screenshot("image-many-layers")


def test_a_pull_shows_as_the_last_pull_on_the_list_and_the_image_page(
    site: ConsoleSite, browser: Browser, pushed: Pushed
) -> None:
    assert _image(site, "latest")["pulled_at"] is None
    pulled = authed(site.acme).get(
        f"{site.url}/v2/shop/manifests/latest", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    assert pulled.status_code == 200 and sha256(pulled.content) == pushed.latest
    # Pull times are written in batches (every 30 s unless the server says otherwise).
    at = wait_for(lambda: _image(site, "latest")["pulled_at"], "latest's pull time written", 90)
    browser.sign_in(site.acme, "/apps/shop")
    rows = _rows_by_tag(browser)
    assert rows["latest"][5] == _when(at)
    assert rows["multi"][5] == "never"  # the index itself was not pulled
    browser.screenshot("app-images-pulled")
    browser.get("/apps/shop/images/latest")
    assert f"Last pulled\n{_when(at)}" in browser.text("main > dl.facts")
    browser.screenshot("image-pulled")
