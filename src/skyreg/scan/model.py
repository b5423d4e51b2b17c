"""What an image holds, as the indexer finds it, and what is known to be wrong with it.

msgspec structs: the scan worker stores them as JSON (`msgspec.json.encode`) per manifest digest
and the API sends them as they are. Package types are purl types (`deb`, `apk`, `rpm`, `pypi`,
`npm`, `golang`); OSV's ecosystems ("Debian:12", "Alpine:v3.19", "PyPI", ...) are derived from them
and the image's OS release when matching (`scan/match.py`).
"""

from __future__ import annotations

import msgspec

DEB = "deb"
APK = "apk"
RPM = "rpm"
PYPI = "pypi"
NPM = "npm"
GOLANG = "golang"
TYPES = (DEB, APK, RPM, PYPI, NPM, GOLANG)

SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")  # worst first, Trivy's words


class OsRelease(msgspec.Struct, frozen=True):
    """`/etc/os-release` (or `/usr/lib/os-release`) of the image's final tree."""

    id: str  # ID: "debian", "ubuntu", "alpine", "rocky", "almalinux", "rhel", ...
    version_id: str  # VERSION_ID: "12", "3.19.1", "9.3"; "" when the file has none
    pretty_name: str = ""
    codename: str = ""  # VERSION_CODENAME


class Package(msgspec.Struct, frozen=True):
    """One installed package: where its record was found and the layer that wrote that file."""

    name: str
    version: str  # as the ecosystem writes it (deb: [epoch:]upstream[-revision])
    type: str  # one of TYPES
    purl: str  # packageurl-python's string form
    layer: str  # digest of the (compressed) layer blob whose file listed it
    path: str  # that file, relative to the root without a leading "/" ("var/lib/dpkg/status")
    source: str = ""  # source package (deb `Source:`, apk origin, rpm SOURCERPM's name); "" = name
    source_version: str = ""  # "" = version
    arch: str = ""
    licenses: tuple[str, ...] = ()


class FileEntry(msgspec.Struct, frozen=True):
    """One entry of the image's final tree (whiteouts applied)."""

    path: str  # relative to the root, no leading "/", directories without a trailing "/"
    type: str  # "file", "dir", "symlink", "hardlink", "other"
    size: int
    mode: int  # permission bits (0o7777)
    layer: str  # digest of the layer that last wrote it
    link: str = ""  # symlink or hard link target


class ImageIndex(msgspec.Struct, frozen=True):
    """What the indexer read from an image's layers."""

    os: OsRelease | None
    packages: tuple[Package, ...]
    files: tuple[FileEntry, ...]
    files_truncated: bool = False  # more entries than the indexer keeps


class Finding(msgspec.Struct, frozen=True):
    """An advisory that names an installed package's version as affected."""

    advisory: str  # OSV id ("DSA-5555-1", "GHSA-...", "PYSEC-...", "CVE-...")
    aliases: tuple[str, ...]  # CVE ids and other ids of the same problem
    package: str  # the installed package's name (deb: the binary package)
    version: str  # installed version
    type: str  # package type
    purl: str
    path: str
    layer: str
    ecosystem: str  # the OSV ecosystem it matched in ("Debian:12")
    fixed: str  # first fixed version after the installed one; "" = no fix known
    severity: str  # one of SEVERITIES
    score: float | None  # CVSS base score when the advisory gives a vector
    summary: str
