"""Pushed images are indexed, carry their SBOMs as OCI referrers and are matched against the
OSV advisories the operator loads: a real server with its scan worker, images built from real
package databases (this machine's dpkg status, real Python dist-infos, a real Go binary, an
Alpine apk database), pushed by skopeo, and the `skyreg` CLI as users run it.

Each image has a vulnerable and a fixed variant: the advisory naming the installed version is
reported with its fixed version, and the image holding the fixed version is clean."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from skyreg.oci.digest import digest_of
from skyreg.scan.index import index_image
from skyreg.services.scans import _opener
from skyreg.store.filesystem import FilesystemBlobStore
from tests.support.clients import _write_containers_files, remove_tree, short_tmpdir
from tests.support.inprocess import InProcessRegistry
from tests.support.layers import Entry, file
from tests.support.platform import Tenancy, answer, api, cli_env, refused, run_skyreg
from tests.support.scanimages import (
    ALPINE_INSTALLED,
    alpine_entries,
    debian_entries,
    go_entries,
    python_entries,
    write_blob,
    write_oci_layout,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

SPDX = "application/spdx+json"
CYCLONEDX = "application/vnd.cyclonedx+json"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("scans") / "data", options={"scan_worker": True}
    )
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Tenant:
    org: str
    app: str
    token: str
    stranger: str  # an org token of another org
    admin: str


@pytest.fixture(scope="module")
def tenant(server: InProcessRegistry) -> Tenant:
    t = Tenancy(server.data_dir)
    org, app, other = (f"{p}{uuid.uuid4().hex[:8]}" for p in ("org", "app", "org"))
    t.org(org)
    t.app(app, org)
    t.org(other)
    return Tenant(
        org, app, t.token("org", org=org)[0], t.token("org", org=other)[0], t.admin_secret()
    )


def skopeo_push(root: Path, host: str, token: str, layout: Path, target: str) -> str:
    """`skopeo copy oci:LAYOUT docker://HOST/TARGET` as `token` (containers files under
    `root`); the digest pushed."""
    done = subprocess.run(
        [
            *("skopeo", "--policy", str(root / "policy.json")),
            *("--registries-conf", str(root / "registries.conf"), "copy"),
            *("--dest-tls-verify=false", "--dest-creds", f"x:{token}"),
            *("--digestfile", str(root / "digest")),
            f"oci:{layout}",
            f"docker://{host}/{target}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TMPDIR": str(root / "tmp"), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return (root / "digest").read_text().strip()


@pytest.fixture(scope="module")
def push(server: InProcessRegistry, tenant: Tenant) -> Iterator[Any]:
    """Push an OCI layout as `<the tenant's app>:TAG`."""
    root = short_tmpdir("scanpush")
    _write_containers_files(root, [server.host])
    try:
        yield lambda layout, tag: skopeo_push(
            root, server.host, tenant.token, layout, f"{tenant.app}:{tag}"
        )
    finally:
        remove_tree(root)


# -- the images and their advisories ------------------------------------------------------------


def _stanzas(status: str) -> list[dict[str, str]]:
    found = []
    for para in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", para, re.M))
        if fields.get("Status") == "install ok installed":
            found.append(fields)
    return found


def _debian_package() -> tuple[str, str]:
    """A package of this machine's dpkg status that is its own source (name, version)."""
    for fields in _stanzas(Path("/var/lib/dpkg/status").read_text()):
        if "Source" not in fields and fields["Package"] in ("dpkg", "bash", "grep", "sed", "tar"):
            return fields["Package"], fields["Version"]
    raise AssertionError("no suitable package in /var/lib/dpkg/status")


def _fixed_source(status: bytes, source: str, fixed: str) -> bytes:
    """`status` with every binary package built from `source` at version `fixed` (what an
    upgrade to the fixed source release installs)."""
    paragraphs = []
    for para in status.decode().split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", para, re.M))
        if fields.get("Package") == source or fields.get("Source", "").split(" ")[0] == source:
            para = re.sub(r"^Version: .*$", f"Version: {fixed}", para, flags=re.M)
            para = re.sub(r"^(Source: \S+) \(.*\)$", r"\1", para, flags=re.M)
        paragraphs.append(para)
    return "\n\n".join(paragraphs).encode()


def _replace_version(entries: list[Entry], path: str, old: bytes, new: bytes) -> list[Entry]:
    """`entries` with every `old` replaced by `new` in the file at `path` (the fixed variant:
    every package of a source or origin moves to the fixed release together)."""
    out = []
    for e in entries:
        if e.info.name == path and e.data is not None:
            assert old in e.data, path
            out.append(file(path, e.data.replace(old, new), e.info.mode))
        else:
            out.append(e)
    return out


def _bump(version: str) -> str:
    """A Go module version one patch release later (v1.2.3 -> v1.2.4)."""
    match = re.fullmatch(r"(v\d+\.\d+\.)(\d+)", version)
    assert match, version
    return f"{match[1]}{int(match[2]) + 1}"


def _advisory(ident: str, ecosystem: str, name: str, fixed: str, cve: str) -> dict[str, Any]:
    return {
        "schema_version": "1.6.0",
        "id": ident,
        "modified": "2026-11-30T00:00:00Z",
        "aliases": [cve],
        "summary": f"test advisory for {name}",
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}],
        "affected": [
            {
                "package": {"ecosystem": ecosystem, "name": name},
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                ],
            }
        ],
    }


@dataclass
class Case:
    advisory: str
    package: str
    fixed: str


def _build(tmp: Path, name: str, layers: list[list[Entry]]) -> Path:
    blobs = [
        write_blob(tmp / f"{name}-blobs", entries, ("gzip", "zstd", "tar")[i % 3])
        for i, entries in enumerate(layers)
    ]
    return write_oci_layout(tmp / name, blobs)


def test_pushed_images_are_scanned_matched_and_carry_sboms(
    server: InProcessRegistry, tenant: Tenant, push: Any, tmp_path: Path
) -> None:
    env = cli_env(tmp_path, server.url, tenant.token)
    deb_name, deb_version = _debian_package()
    deb_fixed = deb_version + "+fix1"
    python = python_entries()
    py_path = next(
        e.info.name for e in python if e.info.name.endswith("idna-3.20.dist-info/METADATA")
    )
    go = go_entries()
    go_index = index_image([write_blob(tmp_path / "go", go).layer()])
    go_module = next(
        p
        for p in go_index.packages
        if p.type == "golang" and re.fullmatch(r"v\d+\.\d+\.\d+", p.version)
    )
    apk_old, apk_new = b"V:1.36.1-r15", b"V:1.36.1-r16"  # busybox
    assert apk_old in ALPINE_INSTALLED

    advisories = [
        _advisory("DEBIAN-CVE-2026-0001", "Debian:12", deb_name, deb_fixed, "CVE-2026-0001"),
        _advisory("PYSEC-2026-0002", "PyPI", "idna", "3.21", "CVE-2026-0002"),
        _advisory("GO-2026-0003", "Go", go_module.name, _bump(go_module.version), "CVE-2026-0003"),
        _advisory("ALPINE-CVE-2026-0004", "Alpine:v3.19", "busybox", "1.36.1-r16", "CVE-2026-0004"),
    ]
    osv = tmp_path / "osv"
    for adv in advisories:
        (osv / adv["id"].split("-")[0]).mkdir(parents=True, exist_ok=True)
        (osv / adv["id"].split("-")[0] / f"{adv['id']}.json").write_text(json.dumps(adv))
    admin_env = cli_env(tmp_path / "admin", server.url, tenant.admin)
    imported = json.loads(run_skyreg(admin_env, "vulndb", "import", str(osv), "--json"))
    assert (imported["read"], imported["changed"], imported["failed"]) == (4, 4, 0), imported
    again = json.loads(run_skyreg(admin_env, "vulndb", "import", str(osv), "--json"))
    assert (again["changed"], again["unchanged"]) == (0, 4), again  # incremental

    debian = debian_entries()
    status_path = "var/lib/dpkg/status"
    deb_status = next(e.data for e in debian if e.info.name == status_path)
    assert deb_status is not None
    deb_fixed_entries = _replace_version(
        debian, status_path, deb_status, _fixed_source(deb_status, deb_name, deb_fixed)
    )
    py_fixed = _replace_version(python, py_path, b"Version: 3.20", b"Version: 3.21")

    vulnerable = _build(tmp_path, "vulnerable", [debian, python, go])
    fixed = _build(tmp_path, "fixed", [deb_fixed_entries, py_fixed])
    alpine = _build(tmp_path, "alpine", [alpine_entries()])
    alpine_fixed = _build(
        tmp_path,
        "alpinefixed",
        [_replace_version(alpine_entries(), "lib/apk/db/installed", apk_old, apk_new)],
    )
    digests = {
        "vulnerable": push(vulnerable, "vulnerable"),
        "fixed": push(fixed, "fixed"),
        "alpine": push(alpine, "alpine"),
        "alpinefixed": push(alpine_fixed, "alpinefixed"),
    }

    def matched(tag: str) -> dict[str, Any] | None:
        doc = answer(
            api(server, "GET", f"/apps/{tenant.app}/vulns", tenant.token, params={"image": tag}),
            200,
        )
        assert doc["scan"]["state"] != "failed", doc["scan"]
        return doc if doc["vulnerabilities"] is not None else None

    found = {tag: wait_for(lambda t=tag: matched(t), f"{tag} matched", 120) for tag in digests}
    for tag, doc in found.items():
        assert doc["digest"] == digests[tag]

    ids = {f["advisory"]: f for f in found["vulnerable"]["vulnerabilities"]}
    assert ids["DEBIAN-CVE-2026-0001"]["fixed"] == deb_fixed
    assert ids["DEBIAN-CVE-2026-0001"]["version"] == deb_version
    assert ids["DEBIAN-CVE-2026-0001"]["path"] == status_path
    assert ids["PYSEC-2026-0002"]["fixed"] == "3.21"
    assert ids["PYSEC-2026-0002"]["package"].lower() == "idna"
    assert ids["GO-2026-0003"]["fixed"] == _bump(go_module.version)
    assert ids["GO-2026-0003"]["path"] == "usr/local/bin/syft"
    assert all(f["severity"] == "CRITICAL" for f in ids.values())
    assert found["fixed"]["vulnerabilities"] == [], found["fixed"]
    alpine_ids = {f["advisory"]: f for f in found["alpine"]["vulnerabilities"]}
    assert alpine_ids["ALPINE-CVE-2026-0004"]["fixed"] == "1.36.1-r16"
    assert found["alpinefixed"]["vulnerabilities"] == []

    # The CLI's table and its filters, and Trivy's report shape.
    table = run_skyreg(env, "registry", "vulns", "--app", tenant.app, "--image", "vulnerable")
    assert "DEBIAN-CVE-2026-0001" in table and deb_fixed in table
    none_low = run_skyreg(
        env, "registry", "vulns", "-a", tenant.app, "-i", "fixed", "--severity", "LOW"
    )
    assert "0 found" in none_low
    trivy = json.loads(
        run_skyreg(env, "registry", "vulns", "-a", tenant.app, "-i", "vulnerable", "--trivy")
    )
    assert trivy["SchemaVersion"] == 2
    reported = {
        v["VulnerabilityID"]: v for r in trivy["Results"] for v in r.get("Vulnerabilities") or ()
    }
    assert reported["CVE-2026-0001"]["FixedVersion"] == deb_fixed
    assert reported["CVE-2026-0001"]["InstalledVersion"] == deb_version

    # SBOMs: attached as referrers (what `oras discover` asks), both valid, every package in.
    index = index_image([write_blob(tmp_path / "v", e).layer() for e in (debian, python, go)])

    def referrers() -> dict[str, str] | None:
        r = requests.get(
            f"{server.url}/v2/{tenant.app}/referrers/{digests['vulnerable']}",
            auth=("x", tenant.token),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        kinds = {m["artifactType"]: m["digest"] for m in r.json()["manifests"]}
        return kinds if {SPDX, CYCLONEDX} <= set(kinds) else None

    wait_for(referrers, "both SBOMs attached", 60)
    spdx = json.loads(run_skyreg(env, "registry", "sbom", "-a", tenant.app, "-i", "vulnerable"))
    assert spdx["spdxVersion"] == "SPDX-2.3"
    purls = {
        ref["referenceLocator"]
        for p in spdx["packages"]
        for ref in p.get("externalRefs", ())
        if ref["referenceType"] == "purl"
    }
    assert {p.purl for p in index.packages} <= purls
    cdx = json.loads(
        run_skyreg(
            env, "registry", "sbom", "-a", tenant.app, "-i", "vulnerable", "--format", "cyclonedx"
        )
    )
    assert {p.purl for p in index.packages} <= {c.get("purl") for c in cdx["components"]}
    _validate_cyclonedx(cdx)

    # Without --image: the image of the app's current release; the org's summary names it.
    answer(
        api(
            server,
            "POST",
            f"/apps/{tenant.app}/releases",
            tenant.token,
            json={"image": f"{tenant.app}@{digests['vulnerable']}"},
        ),
        201,
    )
    current = json.loads(run_skyreg(env, "registry", "vulns", "-a", tenant.app, "--json"))
    assert current["digest"] == digests["vulnerable"]
    summary = json.loads(run_skyreg(env, "registry", "vulnsummary", "--org", tenant.org, "--json"))
    assert summary["apps"] == [tenant.app]
    rows = {r["advisory"]: r for r in summary["advisories"]}
    built_from = {
        f["package"]
        for f in found["vulnerable"]["vulnerabilities"]
        if f["advisory"].startswith("DEBIAN")
    }
    assert deb_name in built_from
    assert set(rows["DEBIAN-CVE-2026-0001"]["apps"][tenant.app]) == built_from

    # New advisories: images already scanned are matched again, their layers not read again.
    before = found["fixed"]["scan"]
    later = tmp_path / "osv2"
    later.mkdir()
    (later / "PYSEC-2026-0005.json").write_text(
        json.dumps(_advisory("PYSEC-2026-0005", "PyPI", "idna", "3.22", "CVE-2026-0005"))
    )
    run_skyreg(admin_env, "vulndb", "import", str(later))

    def rematched() -> dict[str, Any] | None:
        doc = matched("fixed")
        return (
            doc
            if doc and doc["scan"]["matched_generation"] > before["matched_generation"]
            else None
        )

    after = wait_for(rematched, "the fixed image matched again", 60)
    assert [f["advisory"] for f in after["vulnerabilities"]] == ["PYSEC-2026-0005"]
    assert after["scan"]["indexed_at"] == before["indexed_at"]

    # The file list: the image's final tree.
    listing = run_skyreg(env, "registry", "files", "-a", tenant.app, "-i", "vulnerable")
    assert "/usr/local/bin/syft" in listing.splitlines()
    assert "/var/lib/dpkg/status" in listing.splitlines()


def _validate_cyclonedx(doc: dict[str, Any]) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    version = {"1.5": SchemaVersion.V1_5, "1.6": SchemaVersion.V1_6}[doc["specVersion"]]
    error = JsonStrictValidator(version).validate_str(json.dumps(doc))
    assert error is None, error
    assert jsonschema  # the validator above uses it


def test_scans_are_the_org_s_own(server: InProcessRegistry, tenant: Tenant) -> None:
    """Another org's token sees nothing of the app's images; only admins load advisories, and
    their upload is refused before its body is read."""
    for path in ("vulns", "sbom", "files"):
        refused(api(server, "GET", f"/apps/{tenant.app}/{path}", tenant.stranger), 404, "not_found")
        refused(api(server, "GET", f"/apps/{tenant.app}/{path}", None), 401, "unauthorized")
    refused(
        api(server, "GET", f"/orgs/{tenant.org}/vulnsummary", tenant.stranger), 404, "not_found"
    )
    refused(api(server, "POST", "/vulndb", tenant.token, data=b"PK"), 403, "forbidden")
    refused(api(server, "POST", "/vulndb", None, data=b"x" * 1024), 401, "unauthorized")
    refused(api(server, "POST", "/vulndb", tenant.admin, data=b"not a zip"), 400, "bad_request")


def test_an_image_scanned_for_another_org_shows_nothing_of_it(
    server: InProcessRegistry, tenant: Tenant, push: Any, tmp_path: Path
) -> None:
    """The same digest pushed by two orgs is scanned once; the second org's SBOM is made for
    its own repository and names nothing of the first's."""
    layout = _build(tmp_path, "shared", [python_entries()])
    digest = push(layout, "shared")
    wait_for(
        lambda: (
            answer(
                api(
                    server,
                    "GET",
                    f"/apps/{tenant.app}/vulns",
                    tenant.token,
                    params={"image": "shared"},
                ),
                200,
            )["vulnerabilities"]
            is not None
        ),
        "the shared image scanned",
        120,
    )
    t = Tenancy(server.data_dir)
    other_org, other_app = f"org{uuid.uuid4().hex[:8]}", f"app{uuid.uuid4().hex[:8]}"
    t.org(other_org)
    t.app(other_app, other_org)
    other = t.token("org", org=other_org)[0]
    root = short_tmpdir("scanpush2")
    _write_containers_files(root, [server.host])
    try:
        skopeo_push(root, server.host, other, layout, f"{other_app}:mine")
    finally:
        remove_tree(root)
    mine = answer(
        api(server, "GET", f"/apps/{other_app}/vulns", other, params={"image": "mine"}), 200
    )
    assert mine["digest"] == digest and mine["scan"]["state"] == "done"
    assert tenant.app not in json.dumps(mine)
    for fmt in ("spdx", "cyclonedx"):
        r = api(
            server, "GET", f"/apps/{other_app}/sbom", other, params={"image": "mine", "format": fmt}
        )
        document = answer(r, 200)
        assert other_app in r.text and tenant.app not in r.text, fmt
        assert document


def test_an_indexing_thread_gives_up_at_its_next_read_once_its_worker_stops(tmp_path: Path) -> None:
    """A server stopping mid-scan does not wait for the rest of a large image: the blob files
    the indexing thread reads end once the worker's stop is set."""
    store = FilesystemBlobStore(tmp_path / "store")
    data = b"x" * (3 << 20)
    digest = digest_of(data)

    async def put() -> None:
        async def body() -> Any:
            yield data

        await store.put(digest, body())

    asyncio.run(put())
    stop = threading.Event()
    blob = _opener(store, digest, asyncio.new_event_loop(), stop)()
    assert blob.read(1 << 20) == data[: 1 << 20]
    stop.set()
    with pytest.raises(Exception, match="the scan worker stopped"):
        blob.read(2 << 20)
    blob.close()
