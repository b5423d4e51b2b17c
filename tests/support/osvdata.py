"""OSV records for the scan tests: a small fixture written as OSV publishes its records, and a
synthetic Debian export shaped like OSV's `Debian/all.zip` (OSV's bucket is not reachable here).
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
import re
import zipfile
from pathlib import Path
from typing import Any

_CVSS_REQUESTS = "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:C/C:H/I:N/A:N"  # 6.1
_CVSS_SEMVER = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"  # 7.5
_CVSS_GLIBC = "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H"  # 7.8


def _eco(
    ecosystem: str, name: str, *events: dict[str, str], kind: str = "ECOSYSTEM"
) -> dict[str, Any]:
    return {
        "package": {"ecosystem": ecosystem, "name": name},
        "ranges": [{"type": kind, "events": list(events)}],
    }


RECORDS: list[dict[str, Any]] = [
    {
        "schema_version": "1.6.0",
        "id": "DSA-5514-1",
        "modified": "2023-10-03T16:08:32Z",
        "published": "2023-10-03T00:00:00Z",
        "aliases": ["CVE-2023-4527", "CVE-2023-4911"],
        "summary": "glibc - security update",
        "details": "\nThe Qualys Research Labs discovered a buffer overflow in the dynamic loader's"
        " processing of the GLIBC_TUNABLES environment variable.",
        "affected": [
            _eco("Debian:12", "glibc", {"introduced": "0"}, {"fixed": "2.36-9+deb12u3"}),
            _eco("Debian:11", "glibc", {"introduced": "0"}, {"fixed": "2.31-13+deb11u7"}),
        ],
        "references": [
            {"type": "ADVISORY", "url": "https://www.debian.org/security/2023/dsa-5514"}
        ],
    },
    {
        "schema_version": "1.6.0",
        "id": "DEBIAN-CVE-2023-4911",
        "modified": "2024-09-03T05:08:32Z",
        "published": "2023-10-03T18:15:10Z",
        "upstream": ["CVE-2023-4911"],
        "details": "A buffer overflow was discovered in the GNU C Library's dynamic loader ld.so"
        " while processing the GLIBC_TUNABLES environment variable.",
        "severity": [{"type": "CVSS_V3", "score": _CVSS_GLIBC}],
        "affected": [
            _eco("Debian:12", "glibc", {"introduced": "0"}, {"fixed": "2.36-9+deb12u3"}),
            _eco("Debian:13", "glibc", {"introduced": "0"}, {"fixed": "2.37-12"}),
        ],
    },
    {
        "schema_version": "1.6.0",
        "id": "DEBIAN-CVE-2023-48795",
        "modified": "2024-09-03T05:08:32Z",
        "published": "2023-12-18T16:15:10Z",
        "details": "The SSH transport protocol with certain OpenSSH extensions allows remote"
        " attackers to bypass integrity checks (Terrapin).",
        "affected": [
            _eco("Debian:12", "openssh", {"introduced": "0"}, {"fixed": "1:9.2p1-2+deb12u2"}),
        ],
    },
    {
        "schema_version": "1.6.0",
        "id": "DEBIAN-CVE-2005-2541",
        "modified": "2024-09-03T05:08:32Z",
        "published": "2005-08-10T04:00:00Z",
        "details": "Tar 1.15.1 does not properly warn the user when extracting setuid or setgid"
        " files, which may allow local users or remote attackers to gain privileges.",
        "affected": [_eco("Debian:12", "tar", {"introduced": "0"})],
    },
    {
        "schema_version": "1.6.0",
        "id": "ALPINE-CVE-2023-5678",
        "modified": "2024-06-02T10:14:07Z",
        "published": "2023-11-06T16:15:42Z",
        "details": "Generating excessively long X9.42 DH keys or checking excessively long X9.42"
        " DH keys or parameters may be very slow.",
        "affected": [
            _eco("Alpine:v3.19", "openssl", {"introduced": "0"}, {"fixed": "3.1.4-r1"}),
            _eco("Alpine:v3.18", "openssl", {"introduced": "0"}, {"fixed": "3.1.4-r1"}),
        ],
    },
    {
        "schema_version": "1.6.0",
        "id": "PYSEC-2023-74",
        "modified": "2023-06-05T01:13:00Z",
        "published": "2023-05-26T18:15:00Z",
        "aliases": ["CVE-2023-32681", "GHSA-j8r2-6x86-q33q"],
        "details": "Requests is a HTTP library. Since Requests 2.3.0, Requests has been leaking"
        " Proxy-Authorization headers to destination servers when redirected to an HTTPS"
        " endpoint.",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "requests"},
                "ranges": [
                    {
                        "type": "ECOSYSTEM",
                        "events": [{"introduced": "2.3.0"}, {"fixed": "2.31.0"}],
                    },
                    {
                        "type": "GIT",
                        "repo": "https://github.com/psf/requests",
                        "events": [
                            {"introduced": "0"},
                            {"fixed": "74ea7cf7a6a27a4eeb2ae24e162bcc942a6706d5"},
                        ],
                    },
                ],
                "versions": ["2.3.0", "2.30.0", "2.31.0rc1"],
            }
        ],
        "severity": [{"type": "CVSS_V3", "score": _CVSS_REQUESTS}],
    },
    {
        "schema_version": "1.4.0",
        "id": "GHSA-xqr8-7jwr-rhp7",
        "modified": "2024-01-09T20:29:06Z",
        "published": "2023-12-30T00:30:20Z",
        "aliases": ["CVE-2023-52323"],
        "summary": "PyCryptodome side-channel leakage for OAEP decryption",
        "details": "PyCryptodome and pycryptodomex before 3.19.1 allow side-channel leakage"
        " for OAEP decryption.",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "PyCryptodome"},
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.19.1"}]}
                ],
            },
            {
                "package": {"ecosystem": "PyPI", "name": "pycryptodomex"},
                "ranges": [
                    {
                        "type": "ECOSYSTEM",
                        "events": [{"introduced": "3.0"}, {"last_affected": "3.19.0"}],
                    }
                ],
            },
        ],
        "database_specific": {"severity": "MODERATE", "github_reviewed": True},
    },
    {
        "schema_version": "1.4.0",
        "id": "GHSA-c2qf-rxjj-qqgw",
        "modified": "2024-06-21T21:33:53Z",
        "published": "2023-06-21T06:30:28Z",
        "aliases": ["CVE-2022-25883"],
        "summary": "semver vulnerable to Regular Expression Denial of Service",
        "affected": [
            _eco("npm", "semver", {"introduced": "7.0.0"}, {"fixed": "7.5.2"}, kind="SEMVER"),
            _eco("npm", "semver", {"introduced": "6.0.0"}, {"fixed": "6.3.1"}, kind="SEMVER"),
            _eco("npm", "semver", {"introduced": "0"}, {"fixed": "5.7.2"}, kind="SEMVER"),
        ],
        "severity": [{"type": "CVSS_V3", "score": _CVSS_SEMVER}],
        "database_specific": {"severity": "HIGH", "github_reviewed": True},
    },
    {
        "schema_version": "1.4.0",
        "id": "GHSA-67hx-6x53-jw92",
        "modified": "2023-11-29T22:19:58Z",
        "published": "2023-10-06T16:30:25Z",
        "withdrawn": "2023-10-06T17:05:02Z",
        "aliases": [],
        "summary": "Withdrawn: babel traverse",
        "affected": [_eco("npm", "@babel/traverse", {"introduced": "0"}, {"fixed": "7.23.2"})],
        "database_specific": {"severity": "CRITICAL"},
    },
    {
        "schema_version": "1.3.1",
        "id": "GO-2023-2382",
        "modified": "2024-05-20T16:03:47Z",
        "published": "2023-12-06T16:22:36Z",
        "aliases": ["CVE-2023-39326"],
        "summary": "Denial of service via chunk extensions in net/http",
        "affected": [
            {
                "package": {"name": "stdlib", "ecosystem": "Go"},
                "ranges": [
                    {
                        "type": "SEMVER",
                        "events": [
                            {"introduced": "0"},
                            {"fixed": "1.20.12"},
                            {"introduced": "1.21.0-0"},
                            {"fixed": "1.21.5"},
                        ],
                    }
                ],
                "ecosystem_specific": {"imports": [{"path": "net/http/internal"}]},
            }
        ],
        "database_specific": {"url": "https://pkg.go.dev/vuln/GO-2023-2382"},
    },
    {
        "schema_version": "1.3.1",
        "id": "GO-2023-2102",
        "modified": "2024-05-20T16:03:47Z",
        "published": "2023-10-11T22:14:46Z",
        "aliases": ["CVE-2023-39325", "GHSA-4374-p667-p6c8"],
        "summary": "HTTP/2 rapid reset can cause excessive work in net/http",
        "affected": [
            _eco("Go", "golang.org/x/net", {"introduced": "0"}, {"fixed": "0.17.0"}, kind="SEMVER"),
        ],
    },
    {
        "schema_version": "1.3.1",
        "id": "GO-2021-0356",
        "modified": "2024-05-20T16:03:47Z",
        "published": "2022-04-25T20:38:40Z",
        "aliases": ["CVE-2022-27191", "GHSA-8c26-wmh5-6g9v"],
        "summary": "Denial of service via crafted Signer in golang.org/x/crypto/ssh",
        "affected": [
            _eco(
                "Go",
                "golang.org/x/crypto",
                {"introduced": "0"},
                {"fixed": "0.0.0-20220314234659-1baeb1ce4c0b"},
                kind="SEMVER",
            ),
        ],
    },
]


def write_fixture(dir: Path) -> list[Path]:
    """Write the fixture records as `<dir>/<Ecosystem>/<id>.json` (OSV's layout once unzipped)."""
    paths = []
    for rec in RECORDS:
        ecosystem = rec["affected"][0]["package"]["ecosystem"].split(":", 1)[0]
        path = dir / ecosystem / f"{rec['id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
        paths.append(path)
    return paths


def _source_names() -> list[str]:
    """Real Debian source package names: apt's Sources lists if present, else dpkg's status."""
    names: set[str] = set()
    for path in sorted(Path("/var/lib/apt/lists").glob("*Sources*")):
        openers: dict[str, Any] = {"Sources": open, "rces.gz": gzip.open, "rces.xz": lzma.open}
        opener = openers.get(path.name[-7:])
        if opener is None:  # .lz4 and friends: no decompressor in the standard library
            continue
        with opener(path, "rt", errors="replace") as f:
            names.update(m[1] for line in f if (m := re.match(r"Package: (\S+)", line)))
    if not names:
        status = Path("/var/lib/dpkg/status").read_text(errors="replace")
        for para in status.split("\n\n"):
            found = re.search(r"^Source: (\S+)", para, re.M) or re.search(
                r"^Package: (\S+)", para, re.M
            )
            if found:
                names.add(found[1])
    return sorted(names)


def synthetic_debian_export(path: Path, count: int) -> int:
    """A zip shaped like OSV's `Debian/all.zip` with `count` DEBIAN-CVE records over real source
    package names (deterministic); returns the number of records written."""
    names = _source_names()
    rnd = random.Random(15)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(count):
            year = 2005 + i % 20
            cve = f"CVE-{year}-{10000 + i}"
            name = names[i % len(names)]
            events: list[dict[str, str]] = [{"introduced": "0"}]
            if rnd.random() < 0.8:
                events.append(
                    {"fixed": f"{rnd.randint(0, 40)}.{rnd.randint(0, 20)}-{rnd.randint(1, 9)}"}
                )
            affected = [
                {
                    "package": {"ecosystem": f"Debian:{release}", "name": name},
                    "ranges": [{"type": "ECOSYSTEM", "events": events}],
                }
                for release in (11, 12, 13)
            ]
            rec = {
                "schema_version": "1.6.0",
                "id": f"DEBIAN-{cve}",
                "modified": "2024-09-03T05:08:32Z",
                "published": f"{year}-01-01T00:00:00Z",
                "upstream": [cve],
                "details": f"Synthetic advisory {cve} for the {name} source package.",
                "affected": affected,
            }
            zf.writestr(f"DEBIAN-{cve}.json", json.dumps(rec))
    return count
