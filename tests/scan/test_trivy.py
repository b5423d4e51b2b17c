"""Findings as Trivy's JSON report: the shape, the grouping into Results and the field names."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec

from skyreg.scan.model import Finding, ImageIndex, OsRelease, Package
from skyreg.scan.trivy import trivy_report

ARTIFACT = "registry.example:5000/team/app:1.2"
DIGEST = "sha256:" + "d" * 64
LAYER = "sha256:" + "a" * 64
CREATED = datetime(2026, 3, 4, 5, 6, 7, 120000, tzinfo=UTC)

# Field names of trivy's pkg/types: Report, Metadata, Result, DetectedVulnerability (+ embedded
# trivy-db Vulnerability), PkgIdentifier, Layer, CVSS.
REPORT_FIELDS = {
    "SchemaVersion",
    "CreatedAt",
    "ArtifactName",
    "ArtifactType",
    "Metadata",
    "Results",
}
METADATA_FIELDS = {"Size", "OS", "ImageID", "DiffIDs", "RepoTags", "RepoDigests", "ImageConfig"}
RESULT_FIELDS = {"Target", "Class", "Type", "Packages", "Vulnerabilities"}
VULN_FIELDS = {
    "VulnerabilityID",
    "VendorIDs",
    "PkgID",
    "PkgName",
    "PkgPath",
    "PkgIdentifier",
    "InstalledVersion",
    "FixedVersion",
    "Status",
    "Layer",
    "SeveritySource",
    "PrimaryURL",
    "DataSource",
    "Title",
    "Description",
    "Severity",
    "CweIDs",
    "VendorSeverity",
    "CVSS",
    "References",
    "PublishedDate",
    "LastModifiedDate",
}
CVSS_FIELDS = {"V2Vector", "V3Vector", "V40Vector", "V2Score", "V3Score", "V40Score"}


def finding(
    advisory: str,
    package: str,
    version: str,
    type_: str = "deb",
    *,
    aliases: tuple[str, ...] = (),
    path: str = "var/lib/dpkg/status",
    fixed: str = "",
    severity: str = "HIGH",
    score: float | None = None,
    ecosystem: str = "Debian:12",
) -> Finding:
    return Finding(
        advisory=advisory,
        aliases=aliases,
        package=package,
        version=version,
        type=type_,
        purl=f"pkg:{type_}/{package}@{version}",
        path=path,
        layer=LAYER,
        ecosystem=ecosystem,
        fixed=fixed,
        severity=severity,
        score=score,
        summary=f"{advisory} in {package}",
    )


def package(name: str, version: str, type_: str, path: str) -> Package:
    return Package(
        name=name,
        version=version,
        type=type_,
        purl=f"pkg:{type_}/{name}@{version}",
        layer=LAYER,
        path=path,
    )


METADATA = "usr/lib/python3/dist-packages/{}-{}.dist-info/METADATA"
INDEX = ImageIndex(
    os=OsRelease(id="debian", version_id="12", pretty_name="Debian GNU/Linux 12 (bookworm)"),
    packages=(
        package("openssl", "3.0.11-1~deb12u2", "deb", "var/lib/dpkg/status"),
        package("zlib1g", "1:1.2.13.dfsg-1", "deb", "var/lib/dpkg/status"),
        package("requests", "2.31.0", "pypi", METADATA.format("requests", "2.31.0")),
        package("urllib3", "1.26.0", "pypi", METADATA.format("urllib3", "1.26.0")),
        package("flask", "2.0.0", "pypi", "app/requirements.txt"),
        package("lodash", "4.17.20", "npm", "app/node_modules/lodash/package.json"),
        package("golang.org/x/net", "v0.17.0", "golang", "usr/local/bin/app"),
        package("golang.org/x/text", "v0.3.0", "golang", "usr/local/bin/tool"),
    ),
    files=(),
)
FINDINGS = (
    finding(
        "DSA-5585-1",
        "openssl",
        "3.0.11-1~deb12u2",
        aliases=("CVE-2023-5678", "CVE-2023-6129"),
        fixed="3.0.13-1~deb12u1",
        severity="MEDIUM",
        score=5.3,
    ),
    finding(
        "DLA-9999-1", "openssl", "3.0.11-1~deb12u2", aliases=("CVE-2023-5678",), fixed="3.0.12-1"
    ),
    finding(
        "DEBIAN-CVE-2023-45853",
        "zlib1g",
        "1:1.2.13.dfsg-1",
        aliases=("CVE-2023-45853",),
        severity="CRITICAL",
    ),
    finding(
        "GHSA-j8r2-6x86-q33q",
        "requests",
        "2.31.0",
        "pypi",
        aliases=("CVE-2024-35195", "PYSEC-2024-1"),
        path=METADATA.format("requests", "2.31.0"),
        fixed="2.32.0",
        severity="MEDIUM",
        ecosystem="PyPI",
    ),
    finding(
        "PYSEC-2023-999",
        "urllib3",
        "1.26.0",
        "pypi",
        path=METADATA.format("urllib3", "1.26.0"),
        severity="LOW",
        ecosystem="PyPI",
    ),
    finding(
        "GHSA-xxxx-yyyy-zzzz",
        "flask",
        "2.0.0",
        "pypi",
        path="app/requirements.txt",
        ecosystem="PyPI",
    ),
    finding(
        "GHSA-p6mc-m468-83gw",
        "lodash",
        "4.17.20",
        "npm",
        aliases=("CVE-2020-8203",),
        path="app/node_modules/lodash/package.json",
        fixed="4.17.21",
        ecosystem="npm",
    ),
    finding(
        "GO-2023-2102",
        "golang.org/x/net",
        "v0.17.0",
        "golang",
        aliases=("CVE-2023-44487", "GHSA-qppj-fm5r-hxr3"),
        path="usr/local/bin/app",
        fixed="0.17.1",
        severity="UNKNOWN",
        ecosystem="Go",
    ),
)


def report(
    findings: Any = FINDINGS, index: ImageIndex | None = INDEX, created: datetime = CREATED
) -> Any:
    out = trivy_report(findings, index, ARTIFACT, DIGEST, created)
    # What the API sends (msgspec) is what a Trivy consumer parses.
    assert json.loads(msgspec.json.encode(out)) == out
    return out


def results(rep: Any) -> dict[str, Any]:
    return {r["Target"]: r for r in rep["Results"]}


def test_report_shape() -> None:
    rep = report()
    assert set(rep) == REPORT_FIELDS
    assert rep["SchemaVersion"] == 2
    assert rep["ArtifactName"] == ARTIFACT
    assert rep["ArtifactType"] == "container_image"
    assert rep["CreatedAt"] == "2026-03-04T05:06:07.12Z"
    assert rep["Metadata"] == {
        "OS": {"Family": "debian", "Name": "12"},
        "RepoDigests": [f"registry.example:5000/team/app@{DIGEST}"],
    }
    assert set(rep["Metadata"]) <= METADATA_FIELDS
    for r in rep["Results"]:
        assert set(r) <= RESULT_FIELDS
        for v in r.get("Vulnerabilities", []):
            assert set(v) <= VULN_FIELDS, set(v) - VULN_FIELDS
            assert {
                "VulnerabilityID",
                "PkgID",
                "PkgName",
                "InstalledVersion",
                "Status",
                "Severity",
            } <= set(v)
            assert set(v["PkgIdentifier"]) == {"PURL"}
            assert v["Layer"] == {"Digest": LAYER}
            for cvss in v.get("CVSS", {}).values():
                assert set(cvss) <= CVSS_FIELDS


def test_created_at_is_go_rfc3339() -> None:
    assert report(created=CREATED.replace(microsecond=0))["CreatedAt"] == "2026-03-04T05:06:07Z"
    zoned = CREATED.astimezone(timezone(timedelta(hours=-7)))
    assert report(created=zoned)["CreatedAt"] == "2026-03-03T22:06:07.12-07:00"


def test_grouping_as_trivy_does() -> None:
    rep = report()
    got = [(r["Target"], r["Class"], r["Type"]) for r in rep["Results"]]
    assert got == [
        (f"{ARTIFACT} (debian 12)", "os-pkgs", "debian"),
        ("Node.js", "lang-pkgs", "node-pkg"),
        ("Python", "lang-pkgs", "python-pkg"),
        ("app/requirements.txt", "lang-pkgs", "pip"),
        ("usr/local/bin/app", "lang-pkgs", "gobinary"),
        ("usr/local/bin/tool", "lang-pkgs", "gobinary"),
    ]
    by_target = results(rep)
    # A target without findings is listed, without Vulnerabilities (omitempty).
    assert "Vulnerabilities" not in by_target["usr/local/bin/tool"]
    python = by_target["Python"]["Vulnerabilities"]
    assert {v["PkgPath"] for v in python} == {
        METADATA.format("requests", "2.31.0"),
        METADATA.format("urllib3", "1.26.0"),
    }
    # Per-file results name the file in Target, not in PkgPath.
    assert all("PkgPath" not in v for v in by_target["app/requirements.txt"]["Vulnerabilities"])
    assert all("PkgPath" not in v for v in by_target[f"{ARTIFACT} (debian 12)"]["Vulnerabilities"])


def test_vulnerability_ids_as_trivy_keys_them() -> None:
    by_target = results(report())
    os_vulns = by_target[f"{ARTIFACT} (debian 12)"]["Vulnerabilities"]
    # One entry per CVE; DSA and DLA naming the same CVE for the same package are one entry.
    ids = [(v["PkgName"], v["VulnerabilityID"], v.get("VendorIDs")) for v in os_vulns]
    assert ids == [
        ("openssl", "CVE-2023-5678", ["DLA-9999-1", "DSA-5585-1"]),
        ("openssl", "CVE-2023-6129", ["DSA-5585-1"]),
        ("zlib1g", "CVE-2023-45853", ["DEBIAN-CVE-2023-45853"]),
    ]
    merged = os_vulns[0]
    assert merged["FixedVersion"] == "3.0.12-1, 3.0.13-1~deb12u1"
    assert merged["Severity"] == "HIGH"  # the worse of MEDIUM (DSA) and HIGH (DLA)
    assert merged["CVSS"] == {"osv": {"V3Score": 5.3}}
    assert merged["PkgID"] == "openssl@3.0.11-1~deb12u2"
    assert merged["PkgIdentifier"] == {"PURL": "pkg:deb/openssl@3.0.11-1~deb12u2"}
    assert merged["PrimaryURL"] == "https://nvd.nist.gov/vuln/detail/CVE-2023-5678"
    zlib = os_vulns[2]
    assert zlib["Status"] == "affected" and "FixedVersion" not in zlib and "CVSS" not in zlib
    python = {v["PkgName"]: v for v in by_target["Python"]["Vulnerabilities"]}
    assert python["requests"]["VulnerabilityID"] == "CVE-2024-35195"
    assert python["requests"]["VendorIDs"] == ["GHSA-j8r2-6x86-q33q"]
    assert (
        python["requests"]["Status"] == "fixed" and python["requests"]["FixedVersion"] == "2.32.0"
    )
    # No CVE alias: the advisory's own id, and no VendorIDs.
    assert python["urllib3"]["VulnerabilityID"] == "PYSEC-2023-999"
    assert "VendorIDs" not in python["urllib3"]
    assert python["urllib3"]["PrimaryURL"] == "https://osv.dev/vulnerability/PYSEC-2023-999"
    [flask] = by_target["app/requirements.txt"]["Vulnerabilities"]
    assert flask["VulnerabilityID"] == "GHSA-xxxx-yyyy-zzzz"
    assert flask["PrimaryURL"] == "https://github.com/advisories/GHSA-xxxx-yyyy-zzzz"
    [go] = by_target["usr/local/bin/app"]["Vulnerabilities"]
    assert (go["VulnerabilityID"], go["VendorIDs"], go["Severity"]) == (
        "CVE-2023-44487",
        ["GO-2023-2102"],
        "UNKNOWN",
    )
    assert (
        go["PkgID"] == "golang.org/x/net@v0.17.0"
        and go["Title"] == "GO-2023-2102 in golang.org/x/net"
    )


def test_vulnerabilities_sorted_like_trivy() -> None:
    findings = (
        finding("CVE-2024-0003", "b", "1", severity="LOW"),
        finding("CVE-2024-0002", "a", "1", severity="LOW"),
        finding("CVE-2024-0001", "a", "1", severity="CRITICAL"),
        finding("CVE-2024-0000", "a", "1", severity="LOW"),
    )
    [os_result] = report(findings, None)["Results"]
    got = [
        (v["PkgName"], v["Severity"], v["VulnerabilityID"]) for v in os_result["Vulnerabilities"]
    ]
    assert got == [
        ("a", "CRITICAL", "CVE-2024-0001"),
        ("a", "LOW", "CVE-2024-0000"),
        ("a", "LOW", "CVE-2024-0002"),
        ("b", "LOW", "CVE-2024-0003"),
    ]


def test_without_index() -> None:
    alpine = finding(
        "CVE-2024-1",
        "musl",
        "1.2.4-r2",
        "apk",
        ecosystem="Alpine:v3.19",
        path="lib/apk/db/installed",
    )
    rep = report((alpine, *FINDINGS[3:5]), None)
    assert rep["Metadata"]["OS"] == {"Family": "alpine", "Name": "3.19"}
    # Only the targets with findings.
    assert [(r["Target"], r["Type"]) for r in rep["Results"]] == [
        (f"{ARTIFACT} (alpine 3.19)", "alpine"),
        ("Python", "python-pkg"),
    ]


def test_os_families_and_clean_images() -> None:
    for os_id, family in (
        ("rhel", "redhat"),
        ("almalinux", "alma"),
        ("ubuntu", "ubuntu"),
        ("amzn", "amazon"),
    ):
        index = ImageIndex(os=OsRelease(id=os_id, version_id="9.3"), packages=(), files=())
        rep = report((), index)
        assert rep["Metadata"]["OS"] == {"Family": family, "Name": "9.3"}
        # Trivy lists the OS target of a clean image too.
        assert rep["Results"] == [
            {"Target": f"{ARTIFACT} ({family} 9.3)", "Class": "os-pkgs", "Type": family}
        ]
    rep = report((), ImageIndex(os=None, packages=(), files=()))
    assert "Results" not in rep and "OS" not in rep["Metadata"]


def test_repo_digests_strip_tag_not_port() -> None:
    out = trivy_report((), None, "localhost:5000/app", DIGEST, CREATED)
    assert out["Metadata"] == {"RepoDigests": [f"localhost:5000/app@{DIGEST}"]}
    out = trivy_report((), None, f"app@{DIGEST}", DIGEST, CREATED)
    assert out["Metadata"] == {"RepoDigests": [f"app@{DIGEST}"]}
