"""Findings in the shape of Trivy's JSON report (`trivy image -f json`, `SchemaVersion: 2`).

Field names and grouping follow aquasecurity/trivy `pkg/types/report.go` (`Report`, `Metadata`,
`Result`) and `pkg/types/vulnerability.go` (`DetectedVulnerability` with the embedded trivy-db
`Vulnerability`), so tools that read Trivy's output read this one:

- one `os-pkgs` Result for the OS packages, Target "ARTIFACT (FAMILY VERSION)", Type = the family;
- `lang-pkgs` Results: installed Python and Node.js packages are aggregated into one Result each
  (Target "Python"/"Node.js", Type "python-pkg"/"node-pkg", the file in each `PkgPath`), as
  Trivy's applier does; Go binaries, go.mod and lock files are one Result per file (Target = path);
- VulnerabilityID is the CVE id when the advisory has CVE aliases, one entry per CVE, and the
  advisory's own id otherwise; the advisory id (DSA-..., GHSA-..., PYSEC-...) then goes into
  `VendorIDs`. Trivy's database keys advisories the same way (Debian and Alpine by CVE, GHSA and
  OSV sources by their CVE aliases), so the ids match a Trivy report of the same image.

Empty fields are left out, as Go's `omitempty` does. Only what skyreg knows is filled in: no
ImageID/DiffIDs, and CVSS carries the score without its vector (the Finding has no vector).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from skyreg.scan.model import (
    APK,
    DEB,
    GOLANG,
    NPM,
    PYPI,
    RPM,
    SEVERITIES,
    Finding,
    ImageIndex,
    OsRelease,
)

SCHEMA_VERSION = 2
ARTIFACT_TYPE = "container_image"
CLASS_OS = "os-pkgs"
CLASS_LANG = "lang-pkgs"
MAX_TEXT = 4096

_OS_TYPES = frozenset((DEB, APK, RPM))
# os-release ID -> Trivy's OS family (fanal/types/const.go) where the two differ.
_FAMILIES = {
    "rhel": "redhat",
    "almalinux": "alma",
    "amzn": "amazon",
    "ol": "oracle",
    "sles": "suse linux enterprise server",
    "opensuse-leap": "opensuse.leap",
    "opensuse-tumbleweed": "opensuse.tumbleweed",
    "mariner": "cbl-mariner",
}
# (package type, file name) -> Trivy's per-file application type.
_FILE_TYPES = {
    (PYPI, "requirements.txt"): "pip",
    (PYPI, "Pipfile.lock"): "pipenv",
    (PYPI, "poetry.lock"): "poetry",
    (PYPI, "uv.lock"): "uv",
    (NPM, "package-lock.json"): "npm",
    (NPM, "yarn.lock"): "yarn",
    (NPM, "pnpm-lock.yaml"): "pnpm",
    (GOLANG, "go.mod"): "gomod",
}
# Installed packages Trivy aggregates into one Result per language.
_AGGREGATED = {PYPI: ("Python", "python-pkg"), NPM: ("Node.js", "node-pkg")}
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass
class _Result:
    target: str
    cls: str
    type: str
    order: tuple[int, str, str]
    aggregated: bool = False
    vulns: dict[tuple[str, str, str], dict[str, object]] = field(default_factory=dict)


def _family(os_id: str) -> str:
    return _FAMILIES.get(os_id, os_id)


def _os_from_findings(findings: Iterable[Finding]) -> OsRelease | None:
    """The OS as the matcher named it ("Debian:12", "Alpine:v3.19"), when no index says."""
    for f in findings:
        if f.type in _OS_TYPES and f.ecosystem:
            name, _, version = f.ecosystem.partition(":")
            return OsRelease(id=name.lower(), version_id=version.removeprefix("v"))
    return None


def _lang_result(type_: str, path: str) -> _Result:
    base = path.rsplit("/", 1)[-1]
    per_file = _FILE_TYPES.get((type_, base))
    if per_file is not None:
        return _Result(path, CLASS_LANG, per_file, (1, path, per_file))
    if type_ in _AGGREGATED:
        target, trivy_type = _AGGREGATED[type_]
        return _Result(target, CLASS_LANG, trivy_type, (1, "", trivy_type), aggregated=True)
    trivy_type = "gobinary" if type_ == GOLANG else type_
    return _Result(path, CLASS_LANG, trivy_type, (1, path, trivy_type))


def _vulnerability_ids(f: Finding) -> list[str]:
    if f.advisory.startswith("CVE-"):
        return [f.advisory]
    cves = sorted({a for a in f.aliases if a.startswith("CVE-")})
    return cves or [f.advisory]


def _primary_url(vuln_id: str) -> str:
    if vuln_id.startswith("CVE-"):
        return f"https://nvd.nist.gov/vuln/detail/{vuln_id}"
    if vuln_id.startswith("GHSA-"):
        return f"https://github.com/advisories/{vuln_id}"
    return f"https://osv.dev/vulnerability/{vuln_id}"


def _created_at(created: datetime) -> str:
    """Go's RFC 3339 with nanoseconds, as Trivy writes `CreatedAt`: "Z" for UTC, no trailing 0s."""
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    text = created.strftime("%Y-%m-%dT%H:%M:%S")
    if created.microsecond:
        text += f".{created.microsecond:06d}".rstrip("0")
    offset = created.utcoffset()
    if not offset:
        return text + "Z"
    zone = created.strftime("%z")
    return f"{text}{zone[:3]}:{zone[3:]}"


def _repo_digest(artifact: str, digest: str) -> str:
    repo = artifact.split("@", 1)[0]
    slash = repo.rfind("/")
    colon = repo.rfind(":")
    if colon > slash:  # a tag, not a registry port
        repo = repo[:colon]
    return f"{repo}@{digest}"


def _add(result: _Result, f: Finding) -> None:
    pkg_path = f.path if result.aggregated else ""
    for vuln_id in _vulnerability_ids(f):
        key = (f"{f.package}@{f.version}", pkg_path, vuln_id)
        existing = result.vulns.get(key)
        if existing is not None:
            _merge(existing, f, vuln_id)
            continue
        v: dict[str, object] = {"VulnerabilityID": vuln_id}
        if f.advisory != vuln_id:
            v["VendorIDs"] = [f.advisory]
        v["PkgID"] = key[0]
        v["PkgName"] = f.package
        if pkg_path:
            v["PkgPath"] = pkg_path
        if f.purl:
            v["PkgIdentifier"] = {"PURL": f.purl}
        v["InstalledVersion"] = f.version
        if f.fixed:
            v["FixedVersion"] = f.fixed
        v["Status"] = "fixed" if f.fixed else "affected"
        if f.layer:
            v["Layer"] = {"Digest": f.layer}
        v["PrimaryURL"] = _primary_url(vuln_id)
        if f.summary:
            v["Title"] = f.summary[:MAX_TEXT]
        v["Severity"] = f.severity if f.severity in _RANK else "UNKNOWN"
        if f.score is not None:
            v["CVSS"] = {"osv": {"V3Score": f.score}}
        result.vulns[key] = v


def _merge(v: dict[str, object], f: Finding, vuln_id: str) -> None:
    """A second advisory for the same CVE and package (a DSA and a DLA, say): one entry, as in
    Trivy, with every vendor id, every fixed version and the worse severity."""
    vendor = v.get("VendorIDs")
    ids = set(vendor) if isinstance(vendor, list) else set()
    if f.advisory != vuln_id:
        ids.add(f.advisory)
    if ids:
        v["VendorIDs"] = sorted(ids)
    if f.fixed:
        fixed = str(v.get("FixedVersion", ""))
        versions = [x for x in fixed.split(", ") if x]
        if f.fixed not in versions:
            v["FixedVersion"] = ", ".join(sorted([*versions, f.fixed]))
        v["Status"] = "fixed"
    severity = f.severity if f.severity in _RANK else "UNKNOWN"
    if _RANK[severity] < _RANK[str(v["Severity"])]:
        v["Severity"] = severity
    if f.score is not None and "CVSS" not in v:
        v["CVSS"] = {"osv": {"V3Score": f.score}}


def _sort_key(v: dict[str, object]) -> tuple[str, str, int, str, str]:
    """Trivy's `BySeverity`: package, installed version, worst first, id, path."""
    return (
        str(v["PkgName"]),
        str(v["InstalledVersion"]),
        _RANK[str(v["Severity"])],
        str(v["VulnerabilityID"]),
        str(v.get("PkgPath", "")),
    )


def trivy_report(
    findings: Sequence[Finding],
    index: ImageIndex | None,
    artifact: str,
    digest: str,
    created: datetime,
) -> dict[str, object]:
    """`findings` of the image `artifact` (`digest`) as Trivy's JSON report.

    With the `index`, every target that has packages gets its Result, vulnerable or not (as Trivy
    lists every detected target); without it, only targets with findings do.
    """
    os = index.os if index is not None and index.os is not None else _os_from_findings(findings)
    results: dict[tuple[str, str], _Result] = {}
    os_result: _Result | None = None
    if os is not None:
        family = _family(os.id)
        os_result = _Result(f"{artifact} ({family} {os.version_id})", CLASS_OS, family, (0, "", ""))

    def result_for(type_: str, path: str) -> _Result | None:
        if type_ in _OS_TYPES:
            return os_result
        r = _lang_result(type_, path)
        return results.setdefault((r.target, r.type), r)

    if index is not None:
        for pkg in index.packages:
            result_for(pkg.type, pkg.path)
    for f in findings:
        r = result_for(f.type, f.path)
        if r is None:  # an OS package in an image whose OS is unknown: Trivy drops these too
            continue
        _add(r, f)

    ordered = sorted(results.values(), key=lambda r: r.order)
    if os_result is not None:
        ordered.insert(0, os_result)
    out: list[dict[str, object]] = []
    for r in ordered:
        entry: dict[str, object] = {"Target": r.target, "Class": r.cls, "Type": r.type}
        if r.vulns:
            entry["Vulnerabilities"] = sorted(r.vulns.values(), key=_sort_key)
        out.append(entry)

    metadata: dict[str, object] = {}
    if os is not None:
        metadata["OS"] = {"Family": _family(os.id), "Name": os.version_id}
    metadata["RepoDigests"] = [_repo_digest(artifact, digest)]
    report: dict[str, object] = {
        "SchemaVersion": SCHEMA_VERSION,
        "CreatedAt": _created_at(created),
        "ArtifactName": artifact,
        "ArtifactType": ARTIFACT_TYPE,
        "Metadata": metadata,
    }
    if out:
        report["Results"] = out
    return report
