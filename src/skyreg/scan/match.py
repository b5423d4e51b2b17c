"""Installed packages against OSV advisories.

`lookup_keys` names the (OSV ecosystem, package name) pairs under which advisories for a package
are filed; `is_affected` is OSV's evaluation of one affected entry against a version; `match`
puts them together over a lookup function (the advisory store's) and returns `Finding`s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from packageurl import PackageURL

from . import versions
from .model import APK, DEB, GOLANG, NPM, PYPI, RPM, SEVERITIES, Finding, OsRelease, Package
from .osv import Advisory, Affected, Range

__all__ = ["is_affected", "lookup_keys", "match", "normalize_name"]

log = logging.getLogger("skyreg.scan")

_DEBIAN_CODENAMES = {
    "buster": "10",
    "bullseye": "11",
    "bookworm": "12",
    "trixie": "13",
    "forky": "14",
}


def normalize_name(ecosystem: str, name: str) -> str:
    """A package name as lookups compare it: PEP 503 for PyPI, as written elsewhere.

    The advisory store must file `Affected.name` through this too."""
    if ecosystem.split(":", 1)[0] == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


def _major(version_id: str) -> str:
    return version_id.split(".", 1)[0]


def _purl_path(pkg: Package) -> str:
    """`namespace/name` from the purl when the package's name lacks the namespace."""
    try:
        purl = PackageURL.from_string(pkg.purl)
    except ValueError:
        return pkg.name
    if purl.namespace and purl.name == pkg.name:
        return f"{purl.namespace}/{purl.name}"
    return pkg.name


def _os_ecosystems(pkg: Package, os: OsRelease) -> list[str]:
    vid = os.version_id
    if pkg.type == DEB and os.id == "debian":
        major = _major(vid) if vid else _DEBIAN_CODENAMES.get(os.codename, "")
        return [f"Debian:{major}"] if major.isdigit() else []
    if pkg.type == DEB and os.id == "ubuntu":
        if not re.fullmatch(r"[0-9]{2}\.[0-9]{2}", vid):
            return []
        lts = vid.endswith(".04") and int(vid[:2]) % 2 == 0
        return [f"Ubuntu:{vid}:LTS", f"Ubuntu:{vid}"] if lts else [f"Ubuntu:{vid}"]
    if pkg.type == APK and os.id == "alpine":
        m = re.match(r"([0-9]+)\.([0-9]+)", vid)
        return [f"Alpine:v{m[1]}.{m[2]}"] if m else []
    if pkg.type == APK and os.id == "wolfi":
        return ["Wolfi"]
    if pkg.type == APK and os.id == "chainguard":
        return ["Chainguard"]
    if pkg.type == RPM and _major(vid).isdigit():
        major = _major(vid)
        if os.id == "rocky":
            return [f"Rocky Linux:{major}"]
        if os.id == "almalinux":
            return [f"AlmaLinux:{major}"]
        if os.id == "rhel":
            return [f"Red Hat:enterprise_linux:{major}::{repo}" for repo in ("baseos", "appstream")]
    return []


def lookup_keys(pkg: Package, os: OsRelease | None) -> list[tuple[str, str]]:
    """The (OSV ecosystem, name) pairs advisories for `pkg` are filed under, best first.

    Debian, Ubuntu and Alpine file advisories by source package; RPM distributions by binary
    package; language ecosystems need no OS."""
    if pkg.type == PYPI:
        return [("PyPI", normalize_name("PyPI", pkg.name))]
    if pkg.type == NPM:
        name = pkg.name if pkg.name.startswith("@") else _purl_path(pkg)
        return [("npm", name)]
    if pkg.type == GOLANG:
        name = pkg.name if pkg.name == "stdlib" or "/" in pkg.name else _purl_path(pkg)
        return [("Go", name)]
    if os is None:
        return []
    name = (pkg.source or pkg.name) if pkg.type in (DEB, APK) else pkg.name
    return [(eco, name) for eco in _os_ecosystems(pkg, os)]


def _range_ecosystem(r: Range, ecosystem: str) -> str | None:
    if r.type == "ECOSYSTEM":
        return ecosystem
    if r.type == "SEMVER":
        # Go's entries are SEMVER ranges; its scheme also reads the toolchain's "go1.21.5".
        return ecosystem if versions.scheme(ecosystem) == "go" else "SEMVER"
    return None  # GIT and unknown range types say nothing about package versions


def _in_range(r: Range, ecosystem: str, version: str) -> tuple[bool, str]:
    """OSV's `includedInRange`, and the fixed event closing the interval `version` is in."""
    v = versions.key(ecosystem, version)
    for e in r.events:
        if e.limit and e.limit != "*" and v >= versions.key(ecosystem, e.limit):
            return False, ""
    ordered: list[tuple[int, versions.VersionKey | None, str, str]] = []
    for e in r.events:
        if e.introduced:
            kind, text = "introduced", e.introduced
        elif e.fixed:
            kind, text = "fixed", e.fixed
        elif e.last_affected:
            kind, text = "last_affected", e.last_affected
        else:
            continue
        if kind == "introduced" and text == "0":
            ordered.append((0, None, kind, text))
        else:
            ordered.append((1, versions.key(ecosystem, text), kind, text))
    ordered.sort(key=lambda t: (t[0], _Sortable(t[1])))
    vulnerable = False
    for _, k, kind, text in ordered:
        if kind == "introduced":
            if k is None or v >= k:
                vulnerable = True
            elif not vulnerable:
                return False, ""
        elif kind == "fixed":
            assert k is not None
            if v >= k:
                vulnerable = False
            else:
                return vulnerable, text if vulnerable else ""
        elif kind == "last_affected":
            assert k is not None
            if v > k:
                vulnerable = False
            else:
                return vulnerable, ""
    return vulnerable, ""


class _Sortable:
    """Orders optional keys (None first) for `list.sort`."""

    __slots__ = ("k",)

    def __init__(self, k: versions.VersionKey | None) -> None:
        self.k = k

    def __lt__(self, other: _Sortable) -> bool:
        if self.k is None or other.k is None:
            return self.k is None and other.k is not None
        return self.k < other.k


def is_affected(aff: Affected, ecosystem: str, version: str) -> tuple[bool, str]:
    """Whether `version` is affected per OSV's evaluation of `aff` (its explicit `versions`, its
    ECOSYSTEM and SEMVER ranges), and the fixed version to report ("" if none is known).

    Raises `versions.InvalidVersion` / `versions.UnknownEcosystem` (both `ValueError`) when the
    ranges cannot be evaluated and the explicit list does not name the version."""
    listed = version in aff.versions
    hit = listed
    fixes: list[str] = []
    try:
        for r in aff.ranges:
            eco = _range_ecosystem(r, ecosystem)
            if eco is None:
                continue
            inside, fixed = _in_range(r, eco, version)
            if inside:
                hit = True
                if fixed:
                    fixes.append(fixed)
    except ValueError:
        if listed:
            return True, ""
        raise
    return hit, _earliest(ecosystem, fixes) if hit else ""


def _earliest(ecosystem: str, fixes: list[str]) -> str:
    """The lowest of the fixed versions found (the first that unaffects the installed one)."""
    first = fixes[0] if fixes else ""
    for f in fixes[1:]:
        try:
            if versions.compare(ecosystem, f, first) < 0:
                first = f
        except ValueError:  # a SEMVER range's fix under another scheme: keep the first found
            continue
    return first


def _sort_key(f: Finding) -> tuple[int, float, str, str, str, str]:
    return (
        SEVERITIES.index(f.severity),
        -(f.score or 0.0),
        f.advisory,
        f.package,
        f.version,
        f.path,
    )


def match(
    packages: Iterable[Package],
    os: OsRelease | None,
    lookup: Callable[[str, str], Iterable[Advisory]],
) -> list[Finding]:
    """One `Finding` per (advisory, package) whose installed version an advisory names affected;
    withdrawn advisories skipped; worst severity first. Debian-family packages are matched by
    source package and source version (what their advisories version)."""
    findings: list[Finding] = []
    for pkg in packages:
        version = (pkg.source_version or pkg.version) if pkg.type == DEB else pkg.version
        seen: set[str] = set()
        for ecosystem, name in lookup_keys(pkg, os):
            for adv in lookup(ecosystem, name):
                if adv.withdrawn or adv.id in seen:
                    continue
                hit, fixed = _evaluate(adv, ecosystem, name, version)
                if not hit:
                    continue
                seen.add(adv.id)
                findings.append(
                    Finding(
                        advisory=adv.id,
                        aliases=adv.aliases,
                        package=pkg.name,
                        version=pkg.version,
                        type=pkg.type,
                        purl=pkg.purl,
                        path=pkg.path,
                        layer=pkg.layer,
                        ecosystem=ecosystem,
                        fixed=fixed,
                        severity=adv.severity if adv.severity in SEVERITIES else "UNKNOWN",
                        score=adv.score,
                        summary=adv.summary,
                    )
                )
    findings.sort(key=_sort_key)
    return findings


def _evaluate(adv: Advisory, ecosystem: str, name: str, version: str) -> tuple[bool, str]:
    hit = False
    fixes: list[str] = []
    for aff in adv.affected:
        if aff.ecosystem != ecosystem or normalize_name(ecosystem, aff.name) != name:
            continue
        try:
            affected, fixed = is_affected(aff, ecosystem, version)
        except ValueError as e:
            log.debug("%s: %s %s not evaluated: %s", adv.id, name, version, e)
            continue
        if affected:
            hit = True
            if fixed:
                fixes.append(fixed)
    return hit, _earliest(ecosystem, fixes) if hit else ""
