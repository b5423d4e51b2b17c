"""Installed packages against the OSV fixture: lookup keys, OSV's evaluation, findings."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pytest

from skyreg.scan.match import is_affected, lookup_keys, match, normalize_name
from skyreg.scan.model import OsRelease, Package
from skyreg.scan.osv import Advisory, Affected, Event, Range, parse_advisory, read_source
from tests.support.osvdata import RECORDS, write_fixture

DEBIAN12 = OsRelease(id="debian", version_id="12", codename="bookworm")
ALPINE = OsRelease(id="alpine", version_id="3.19.1")


def pkg(
    name: str,
    version: str,
    type: str,
    purl: str = "",
    source: str = "",
    source_version: str = "",
) -> Package:
    return Package(
        name=name,
        version=version,
        type=type,
        purl=purl or f"pkg:{type}/{name}@{version}",
        layer="sha256:" + "a" * 64,
        path="var/lib/dpkg/status",
        source=source,
        source_version=source_version,
    )


class Index:
    """The advisory store's lookup over parsed records (names filed the way match looks them up)."""

    def __init__(self, advisories: Iterable[Advisory]) -> None:
        self.by_key: dict[tuple[str, str], list[Advisory]] = defaultdict(list)
        for adv in advisories:
            for key in {(a.ecosystem, normalize_name(a.ecosystem, a.name)) for a in adv.affected}:
                self.by_key[key].append(adv)

    def __call__(self, ecosystem: str, name: str) -> list[Advisory]:
        return self.by_key.get((ecosystem, name), [])


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    root = tmp_path_factory.mktemp("osv")
    write_fixture(root)
    advisories = [r for r in read_source(root) if isinstance(r, Advisory)]
    assert len(advisories) == len(RECORDS)
    return Index(advisories)


@pytest.mark.parametrize(
    ("package", "os", "keys"),
    [
        (
            pkg("libc6", "2.36-9+deb12u1", "deb", source="glibc"),
            DEBIAN12,
            [("Debian:12", "glibc")],
        ),
        (pkg("tar", "1.34+dfsg-1.2", "deb"), DEBIAN12, [("Debian:12", "tar")]),
        (
            pkg("tar", "1.34", "deb"),
            OsRelease(id="debian", version_id="", codename="trixie"),
            [("Debian:13", "tar")],
        ),
        (
            pkg("libssl3", "3.0.2-0ubuntu1.10", "deb", source="openssl"),
            OsRelease(id="ubuntu", version_id="22.04"),
            [("Ubuntu:22.04:LTS", "openssl"), ("Ubuntu:22.04", "openssl")],
        ),
        (
            pkg("libssl3", "3.0.10-1ubuntu2", "deb", source="openssl"),
            OsRelease(id="ubuntu", version_id="23.10"),
            [("Ubuntu:23.10", "openssl")],
        ),
        (
            pkg("libcrypto3", "3.1.4-r0", "apk", source="openssl"),
            ALPINE,
            [("Alpine:v3.19", "openssl")],
        ),
        (
            pkg("openssl-libs", "1:3.0.7-24.el9", "rpm", source="openssl"),
            OsRelease(id="rocky", version_id="9.3"),
            [("Rocky Linux:9", "openssl-libs")],
        ),
        (
            pkg("openssl-libs", "1:3.0.7-24.el9", "rpm"),
            OsRelease(id="almalinux", version_id="9.3"),
            [("AlmaLinux:9", "openssl-libs")],
        ),
        (
            pkg("openssl-libs", "1:3.0.7-24.el9", "rpm"),
            OsRelease(id="rhel", version_id="9.3"),
            [
                ("Red Hat:enterprise_linux:9::baseos", "openssl-libs"),
                ("Red Hat:enterprise_linux:9::appstream", "openssl-libs"),
            ],
        ),
        (pkg("Django_Rest.framework", "3.0", "pypi"), None, [("PyPI", "django-rest-framework")]),
        (
            pkg("traverse", "7.23.0", "npm", purl="pkg:npm/%40babel/traverse@7.23.0"),
            None,
            [("npm", "@babel/traverse")],
        ),
        (pkg("semver", "7.5.1", "npm"), DEBIAN12, [("npm", "semver")]),
        (
            pkg("golang.org/x/net", "v0.16.0", "golang"),
            None,
            [("Go", "golang.org/x/net")],
        ),
        (
            pkg("net", "v0.16.0", "golang", purl="pkg:golang/golang.org/x/net@v0.16.0"),
            None,
            [("Go", "golang.org/x/net")],
        ),
        (pkg("stdlib", "go1.21.4", "golang"), None, [("Go", "stdlib")]),
        (pkg("libc6", "2.36", "deb"), None, []),
        (pkg("musl", "1.2.4-r2", "apk"), OsRelease(id="debian", version_id="12"), []),
    ],
)
def test_lookup_keys(package: Package, os: OsRelease | None, keys: list[tuple[str, str]]) -> None:
    assert lookup_keys(package, os) == keys


def _aff(*events: Event, versions: tuple[str, ...] = (), kind: str = "ECOSYSTEM") -> Affected:
    return Affected("Debian:12", "x", ranges=(Range(kind, events),), versions=versions)


@pytest.mark.parametrize(
    ("aff", "version", "expected"),
    [
        # below fixed: affected, the fix reported; fixed and above: clean
        (_aff(Event(introduced="0"), Event(fixed="1:2.3-4")), "1:2.3-3", (True, "1:2.3-4")),
        (_aff(Event(introduced="0"), Event(fixed="1:2.3-4")), "2.9-9", (True, "1:2.3-4")),
        (_aff(Event(introduced="0"), Event(fixed="1:2.3-4")), "1:2.3-4", (False, "")),
        (_aff(Event(introduced="0"), Event(fixed="1:2.3-4")), "1:2.3-4+b1", (False, "")),
        # tildes: a pre-release of the fixed version is still affected
        (_aff(Event(introduced="0"), Event(fixed="1.0-1")), "1.0~rc1-1", (True, "1.0-1")),
        # introduced > 0
        (_aff(Event(introduced="2.0"), Event(fixed="2.5")), "1.9", (False, "")),
        (_aff(Event(introduced="2.0"), Event(fixed="2.5")), "2.0", (True, "2.5")),
        # last_affected: inclusive, no fix known
        (_aff(Event(introduced="0"), Event(last_affected="2.5")), "2.5", (True, "")),
        (_aff(Event(introduced="0"), Event(last_affected="2.5")), "2.5.1", (False, "")),
        # no fix at all
        (_aff(Event(introduced="0")), "99", (True, "")),
        # several intervals in one range, events in any order
        (
            _aff(
                Event(fixed="1.5"),
                Event(introduced="2.0"),
                Event(introduced="0"),
                Event(fixed="2.2"),
            ),
            "2.1",
            (True, "2.2"),
        ),
        (
            _aff(
                Event(introduced="0"),
                Event(fixed="1.5"),
                Event(introduced="2.0"),
                Event(fixed="2.2"),
            ),
            "1.7",
            (False, ""),
        ),
        # limit
        (_aff(Event(introduced="0"), Event(limit="3.0")), "2.0", (True, "")),
        (_aff(Event(introduced="0"), Event(limit="3.0")), "3.0", (False, "")),
        # explicit versions, also outside of (or without) ranges
        (_aff(Event(introduced="5"), versions=("1.0-1",)), "1.0-1", (True, "")),
        (Affected("Debian:12", "x", versions=("1.0-1",)), "1.0-2", (False, "")),
        # GIT ranges say nothing about package versions
        (_aff(Event(introduced="0"), kind="GIT"), "1.0", (False, "")),
    ],
)
def test_is_affected(aff: Affected, version: str, expected: tuple[bool, str]) -> None:
    assert is_affected(aff, "Debian:12", version) == expected


def test_is_affected_with_invalid_versions() -> None:
    aff = _aff(Event(introduced="0"), Event(fixed="1.0"), versions=("weird version",))
    assert is_affected(aff, "Debian:12", "weird version") == (True, "")
    with pytest.raises(ValueError, match="not a deb version"):
        is_affected(aff, "Debian:12", "also weird")
    bad_event = _aff(Event(introduced="0"), Event(fixed="not a version"))
    with pytest.raises(ValueError):
        is_affected(bad_event, "Debian:12", "1.0")


def test_debian_image(index: Index) -> None:
    packages = [
        # binNMU'd binary of an affected source: matched by source and source version
        pkg("libc6", "2.36-9+deb12u1+b1", "deb", source="glibc", source_version="2.36-9+deb12u1"),
        pkg("libc-bin", "2.36-9+deb12u3", "deb", source="glibc"),  # fixed
        pkg("openssh-client", "1:9.2p1-2+deb12u1", "deb", source="openssh"),
        pkg("tar", "1.34+dfsg-1.2+deb12u1", "deb"),
        pkg("bash", "5.2.15-2+b2", "deb"),
    ]
    findings = match(packages, DEBIAN12, index)
    got = [(f.advisory, f.package, f.fixed, f.severity) for f in findings]
    assert got == [
        ("DEBIAN-CVE-2023-4911", "libc6", "2.36-9+deb12u3", "HIGH"),
        ("DEBIAN-CVE-2005-2541", "tar", "", "UNKNOWN"),
        ("DEBIAN-CVE-2023-48795", "openssh-client", "1:9.2p1-2+deb12u2", "UNKNOWN"),
        ("DSA-5514-1", "libc6", "2.36-9+deb12u3", "UNKNOWN"),
    ]
    glibc = findings[0]
    assert glibc.ecosystem == "Debian:12"
    assert glibc.version == "2.36-9+deb12u1+b1"
    assert glibc.aliases == ("CVE-2023-4911",)
    assert glibc.score == 7.8
    assert glibc.path == "var/lib/dpkg/status"


def test_other_debian_release_does_not_match(index: Index) -> None:
    old = pkg("libc6", "2.31-13+deb11u7", "deb", source="glibc")
    assert match([old], OsRelease(id="debian", version_id="11"), index) == []
    assert [f.advisory for f in match([old], DEBIAN12, index)] == [
        "DEBIAN-CVE-2023-4911",
        "DSA-5514-1",
    ]


def test_alpine_image(index: Index) -> None:
    findings = match(
        [
            pkg("libcrypto3", "3.1.4-r0", "apk", source="openssl"),
            pkg("libssl3", "3.1.4-r1", "apk", source="openssl"),
            pkg("musl", "1.2.4_git20230717-r4", "apk"),
        ],
        ALPINE,
        index,
    )
    assert [(f.advisory, f.package, f.fixed) for f in findings] == [
        ("ALPINE-CVE-2023-5678", "libcrypto3", "3.1.4-r1")
    ]


def test_python_packages(index: Index) -> None:
    findings = match(
        [
            pkg("requests", "2.30.0", "pypi"),
            pkg("requests", "2.2.1", "pypi"),  # before introduced
            pkg("requests", "2.31.0", "pypi"),  # fixed
            pkg("requests", "2.31.0rc1", "pypi"),  # pre-release of the fix: listed, affected
            pkg("pycryptodome", "3.19.0", "pypi"),  # advisory names "PyCryptodome"
            pkg("pycryptodomex", "3.19.0", "pypi"),  # last_affected
            pkg("pycryptodomex", "3.19.1", "pypi"),
            pkg("pycryptodome", "3.19.1.post1", "pypi"),
        ],
        None,
        index,
    )
    got = [(f.advisory, f.package, f.version, f.fixed, f.severity) for f in findings]
    assert got == [
        ("PYSEC-2023-74", "requests", "2.30.0", "2.31.0", "MEDIUM"),
        ("PYSEC-2023-74", "requests", "2.31.0rc1", "2.31.0", "MEDIUM"),
        ("GHSA-xqr8-7jwr-rhp7", "pycryptodome", "3.19.0", "3.19.1", "MEDIUM"),
        ("GHSA-xqr8-7jwr-rhp7", "pycryptodomex", "3.19.0", "", "MEDIUM"),
    ]
    # scored findings sort before unscored ones of the same severity
    assert [f.score for f in findings] == [6.1, 6.1, None, None]


def test_go_and_npm(index: Index) -> None:
    findings = match(
        [
            pkg("stdlib", "go1.21.4", "golang"),
            pkg("stdlib", "go1.20.12", "golang"),
            pkg("stdlib", "go1.21.0", "golang"),
            pkg("golang.org/x/net", "v0.16.0", "golang"),
            pkg("golang.org/x/net", "v0.17.0", "golang"),
            pkg("golang.org/x/crypto", "v0.0.0-20220214200702-86341886e292", "golang"),
            pkg("golang.org/x/crypto", "v0.0.0-20220315160706-3147a52a75dd", "golang"),
            pkg("semver", "7.5.1", "npm"),
            pkg("semver", "6.3.0", "npm"),
            pkg("semver", "5.7.2", "npm"),
            pkg("traverse", "7.23.0", "npm", purl="pkg:npm/%40babel/traverse@7.23.0"),  # withdrawn
            pkg("tool", "(devel)", "golang", purl="pkg:golang/example.com/tool@(devel)"),
        ],
        None,
        index,
    )
    got = [(f.advisory, f.package, f.version, f.fixed) for f in findings]
    assert got == [
        ("GHSA-c2qf-rxjj-qqgw", "semver", "6.3.0", "6.3.1"),
        ("GHSA-c2qf-rxjj-qqgw", "semver", "7.5.1", "7.5.2"),
        ("GO-2021-0356", "golang.org/x/crypto", "v0.0.0-20220214200702-86341886e292",
         "0.0.0-20220314234659-1baeb1ce4c0b"),
        ("GO-2023-2102", "golang.org/x/net", "v0.16.0", "0.17.0"),
        ("GO-2023-2382", "stdlib", "go1.21.0", "1.21.5"),
        ("GO-2023-2382", "stdlib", "go1.21.4", "1.21.5"),
    ]  # fmt: skip


def test_lookup_failures_and_unparsable_records_do_not_crash(tmp_path: Path) -> None:
    rec = json.loads(json.dumps(RECORDS[2]))  # DEBIAN-CVE-2023-48795
    rec["affected"][0]["ranges"][0]["events"][1]["fixed"] = "not a version"
    adv = parse_advisory(json.dumps(rec).encode())
    index = Index([adv])
    assert (
        match([pkg("openssh-server", "1:9.2p1-2", "deb", source="openssh")], DEBIAN12, index) == []
    )
