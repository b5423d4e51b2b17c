"""The catalogers, one file at a time: real records, purls as syft writes them, hostile bytes."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import pytest

from skyreg.scan import catalog, golang, rpmdb
from skyreg.scan.model import OsRelease, Package
from tests.support import scanimages

L, P = "sha256:" + "a" * 64, "some/file"
DEBIAN = OsRelease(id="debian", version_id="12")


def test_os_release_quotes_and_missing_id() -> None:
    text = b'NAME="Rocky Linux"\nID="rocky"\nVERSION_ID="9.3"\nPRETTY_NAME=\'Rocky 9.3\'\n# x\n'
    assert catalog.parse_os_release(text) == OsRelease("rocky", "9.3", "Rocky 9.3", "")
    assert catalog.parse_os_release(b"NAME=x\n\xff\xfe") is None


def test_dpkg_status_installed_only_and_source() -> None:
    status = (
        b"Package: libc6\nStatus: install ok installed\nArchitecture: amd64\n"
        b"Source: glibc\nVersion: 2.36-9+deb12u4\nDescription: x\n more\n .\n\n"
        b"Package: bc\nStatus: install ok installed\nArchitecture: amd64\n"
        b"Source: bc (1.07.1-3)\nVersion: 1.07.1-3+b1\n\n"
        b"Package: removed\nStatus: deinstall ok config-files\nVersion: 1\n\n"
        b"Package: noversion\nStatus: install ok installed\n"
    )
    found = catalog.with_purls(catalog.parse_dpkg_status(status, layer=L, path=P), DEBIAN)
    assert [(p.name, p.source, p.source_version) for p in found] == [
        ("libc6", "glibc", ""),
        ("bc", "bc", "1.07.1-3"),
    ]
    assert [p.purl for p in found] == [
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12&upstream=glibc",
        "pkg:deb/debian/bc@1.07.1-3%2Bb1?arch=amd64&distro=debian-12&upstream=bc%401.07.1-3",
    ]


def test_distroless_status_d_has_no_status_field() -> None:
    found = catalog.parse_dpkg_status(
        b"Package: tzdata\nVersion: 2024a-0+deb12u1\n", layer=L, path=P
    )
    assert [(p.name, p.version) for p in found] == [("tzdata", "2024a-0+deb12u1")]


def test_apk_installed_real_alpine_stanzas() -> None:
    alpine = OsRelease(id="alpine", version_id="3.19.1")
    found = catalog.with_purls(
        catalog.parse_apk_installed(scanimages.ALPINE_INSTALLED, layer=L, path=P), alpine
    )
    assert len(found) == 14
    binsh = next(p for p in found if p.name == "busybox-binsh")
    assert (binsh.version, binsh.source, binsh.arch, binsh.licenses) == (
        "1.36.1-r15",
        "busybox",
        "x86_64",
        ("GPL-2.0-only",),
    )
    assert binsh.purl == (
        "pkg:apk/alpine/busybox-binsh@1.36.1-r15?arch=x86_64&distro=alpine-3.19.1&upstream=busybox"
    )


def test_python_metadata_from_the_venv_and_egg_info() -> None:
    meta = (scanimages.VENV_SITE / "attrs-26.1.0.dist-info/METADATA").read_bytes()
    [attrs] = catalog.parse_python_metadata(meta, layer=L, path=P)
    assert (attrs.name, attrs.version) == ("attrs", "26.1.0")
    pkg = b"Metadata-Version: 1.0\nName: Old_Pkg\nVersion: 0.1\nLicense: UNKNOWN\n\nName: body\n"
    [old] = catalog.with_purls(catalog.parse_python_metadata(pkg, layer=L, path=P), None)
    assert (old.name, old.licenses, old.purl) == ("Old_Pkg", (), "pkg:pypi/old-pkg@0.1")
    assert catalog.is_python_metadata("a/x-1.dist-info/METADATA")
    assert catalog.is_python_metadata("a/x-1.egg-info/PKG-INFO")
    assert catalog.is_python_metadata("a/x-1.egg-info")
    assert not catalog.is_python_metadata("a/METADATA")


def test_npm_package_json_and_locks() -> None:
    doc = b'{"name": "@scope/pkg", "version": "1.2.3", "license": {"type": "MIT"}}'
    [p] = catalog.with_purls(
        catalog.parse_npm_package_json(doc, layer=L, path=P, max_bytes=1 << 20), None
    )
    assert (p.name, p.licenses, p.purl) == ("@scope/pkg", ("MIT",), "pkg:npm/%40scope/pkg@1.2.3")
    assert catalog.is_npm_package_json("app/node_modules/@scope/pkg/package.json")
    assert catalog.is_npm_package_json("app/node_modules/a/package.json")
    assert not catalog.is_npm_package_json("app/node_modules/a/dist/package.json")
    assert not catalog.is_npm_package_json("app/package.json")
    v1 = {
        "lockfileVersion": 1,
        "dependencies": {"a": {"version": "1.0.0", "dependencies": {"b": {"version": "2.0.0"}}}},
    }
    found = catalog.parse_npm_lock(
        json.dumps(v1).encode(), layer=L, path=P, max_bytes=1 << 20, max_packages=10
    )
    assert sorted((p.name, p.version) for p in found) == [("a", "1.0.0"), ("b", "2.0.0")]
    v3 = {"packages": {"": {"name": "root"}, "node_modules/x/node_modules/@s/y": {"version": "3"}}}
    found = catalog.parse_npm_lock(
        json.dumps(v3).encode(), layer=L, path=P, max_bytes=1 << 20, max_packages=10
    )
    assert [(p.name, p.version) for p in found] == [("@s/y", "3")]


def test_npm_dedupe_lock_against_installed() -> None:
    def npm(name: str, version: str, path: str) -> Package:
        return Package(name=name, version=version, type="npm", purl="", layer=L, path=path)

    packages = [
        npm("a", "1", "app/node_modules/a/package.json"),
        npm("a", "1", "app/package-lock.json"),
        npm("a", "2", "app/package-lock.json"),
        npm("a", "2", "other/package-lock.json"),
    ]
    assert [(p.version, p.path) for p in catalog.dedupe_npm(packages)] == [
        ("1", "app/node_modules/a/package.json"),
        ("2", "app/package-lock.json"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe\x00garbage",
        b"{" * 100_000,  # deeper than any parser's recursion
        b'{"name": "' + b"x" * 100_000 + b'", "version": "1"}',
        b'{"name": ["not", "a", "string"], "version": 1}',
        b"[]",
    ],
)
def test_hostile_json_is_skipped(data: bytes) -> None:
    assert catalog.parse_npm_package_json(data, layer=L, path=P, max_bytes=1 << 20) == []
    assert catalog.parse_npm_lock(data, layer=L, path=P, max_bytes=1 << 20, max_packages=5) == []


def test_hostile_stanzas_are_bounded() -> None:
    huge = b"Package: x\nVersion: 1\nDescription: " + b"y" * 1_000_000 + b"\n" + b" z\n" * 100_000
    [p] = catalog.parse_dpkg_status(huge + b"\xff\xfe\n", layer=L, path=P)
    assert p.name == "x"
    assert catalog.parse_apk_installed(b"\x00\xff:::\n\n\n", layer=L, path=P) == []
    assert catalog.parse_python_metadata(b"\xff" * 1000, layer=L, path=P) == []


# -- RPM -----------------------------------------------------------------------------------------


def _header(tags: list[tuple[int, int, bytes]]) -> bytes:
    index, store = b"", b""
    for tag, kind, value in tags:
        if kind == 4:
            store += b"\x00" * (-len(store) % 4)
        index += struct.pack(">IIiI", tag, kind, len(store), 1)
        store += value
    return struct.pack(">II", len(tags), len(store)) + index + store


def test_rpm_header_parsing_and_bounds() -> None:
    blob = _header(
        [
            (rpmdb.NAME, 6, b"bash\x00"),
            (rpmdb.VERSION, 6, b"5.1.8\x00"),
            (rpmdb.RELEASE, 6, b"6.el9\x00"),
            (rpmdb.EPOCH, 4, struct.pack(">i", 1)),
            (rpmdb.ARCH, 6, b"x86_64\x00"),
        ]
    )
    assert rpmdb.parse_header(blob) == {
        rpmdb.NAME: "bash",
        rpmdb.VERSION: "5.1.8",
        rpmdb.RELEASE: "6.el9",
        rpmdb.EPOCH: 1,
        rpmdb.ARCH: "x86_64",
    }
    for bad in (
        b"",
        blob[:20],  # cut
        struct.pack(">II", 0xFFFFFFFF, 0xFFFFFFFF) + blob[8:],  # huge counts
        struct.pack(">II", 1, 4) + struct.pack(">IIiI", rpmdb.NAME, 6, 1 << 30, 1) + b"abcd",
        struct.pack(">II", 1, 4) + struct.pack(">IIiI", rpmdb.NAME, 6, -5, 1) + b"abcd",
        struct.pack(">II", 1, 4) + struct.pack(">IIiI", rpmdb.NAME, 6, 0, 1) + b"abcd",  # no NUL
    ):
        assert rpmdb.parse_header(bad) == {}


def test_rpmdb_sqlite_made_by_rpm(tmp_path: Path) -> None:
    entries = scanimages.rpm_entries(tmp_path)
    if entries is None:
        pytest.skip("rpmbuild is not installed (Debian package `rpm`)")
    data = next(e.data for e in entries if e.info.name.endswith("rpmdb.sqlite"))
    found = catalog.with_purls(
        rpmdb.parse_rpmdb_sqlite(data, layer=L, path=P, max_packages=10),
        OsRelease(id="rocky", version_id="9.3"),
    )
    ssl = next(p for p in found if p.name == "openssl-libs")
    assert (ssl.version, ssl.source, ssl.source_version, ssl.licenses) == (
        "1:3.0.7-27.el9",
        "openssl-libs",
        "3.0.7-27.el9",
        ("ASL 2.0",),
    )
    assert ssl.purl == (
        "pkg:rpm/rocky/openssl-libs@3.0.7-27.el9?arch=noarch&distro=rocky-9.3&epoch=1"
        "&upstream=openssl-libs-3.0.7-27.el9.src.rpm"
    )
    with pytest.raises(rpmdb.RpmDbError):
        rpmdb.parse_rpmdb_sqlite(data, layer=L, path=P, max_packages=1)
    with pytest.raises(rpmdb.RpmDbError):
        rpmdb.parse_rpmdb_sqlite(data[:4096] + b"\xff" * 8192, layer=L, path=P, max_packages=9)


def test_rpmdb_that_is_not_sqlite_or_has_no_packages_table() -> None:
    with pytest.raises(rpmdb.RpmDbError):
        rpmdb.parse_rpmdb_sqlite(b"\x00" * 4096, layer=L, path=P, max_packages=10)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE other (x)")
    data = conn.serialize()
    with pytest.raises(rpmdb.RpmDbError):
        rpmdb.parse_rpmdb_sqlite(data, layer=L, path=P, max_packages=10)


# -- Go ------------------------------------------------------------------------------------------


def _syft_window() -> tuple[bytes, int]:
    """A 16-aligned window of syft's binary around its build info, and the magic's offset."""
    data = scanimages.SYFT_BIN.read_bytes()
    at = data.find(golang.MAGIC)
    start = (at - 100_000) // 16 * 16
    return data[start : at + 200_000], at - start


@pytest.mark.parametrize("chunk", [7, 4093, 1 << 16])
def test_build_info_found_whatever_the_chunk_boundaries(chunk: int) -> None:
    window, _ = _syft_window()
    scanner = golang.BuildInfoScanner(max_info=1 << 20)
    for i in range(0, len(window), chunk):
        scanner.feed(window[i : i + chunk])
    result = scanner.result()
    assert result is not None
    version, info = result
    assert version.startswith("go1.23")
    assert info.startswith("path\tgithub.com/anchore/syft/cmd/syft\nmod\tgithub.com/anchore/syft")


def test_build_info_bounds() -> None:
    window, at = _syft_window()
    small = golang.BuildInfoScanner(max_info=100)  # the module info is longer
    small.feed(window)
    assert small.result() is None
    misaligned = golang.BuildInfoScanner(max_info=1 << 20)
    misaligned.feed(b"\x00" * 3 + window[at : at + 30_000])
    assert misaligned.result() is None
    pointer = bytearray(window[at : at + 30_000])
    pointer[len(golang.MAGIC) + 1] = 0  # pre-1.18 pointer format: not read
    old = golang.BuildInfoScanner(max_info=1 << 20)
    old.feed(bytes(pointer))
    assert old.result() is None
    cut = golang.BuildInfoScanner(max_info=1 << 20)
    cut.feed(window[at : at + 40])
    assert cut.result() is None


def test_go_modules_replacements_and_purls() -> None:
    modinfo = (
        "path\texample.com/cmd\nmod\texample.com/app\t(devel)\t\n"
        "dep\tgithub.com/a/b/v3\tv3.1.0\th1:x=\n"
        "dep\tgolang.org/x/net\tv0.1.0\th1:y=\n=>\tgithub.com/fork/net\tv0.1.1\th1:z=\n"
        "build\tvcs.revision=0123456789abcdef\nbuild\tvcs.time=2024-01-02T03:04:05Z\n"
    )
    found = golang.go_packages("go1.22.5", modinfo, layer=L, path=P)
    assert [(p.name, p.version, p.purl) for p in found] == [
        (
            "example.com/app",
            "v0.0.0-20240102030405-0123456789ab",
            "pkg:golang/example.com/app@v0.0.0-20240102030405-0123456789ab",
        ),
        ("github.com/a/b/v3", "v3.1.0", "pkg:golang/github.com/a/b@v3.1.0#v3"),
        ("github.com/fork/net", "v0.1.1", "pkg:golang/github.com/fork/net@v0.1.1"),
        ("stdlib", "go1.22.5", "pkg:golang/stdlib@1.22.5"),
    ]


def test_a_go_binary_built_without_modules_lists_its_main_package() -> None:
    """Debian builds Go programs outside module mode: their build info has a `path` line but no
    `mod` line. Debian's own docker client is one; syft lists its main package, so do we (its
    version unknown to the build info: "(devel)", as syft writes it when nothing says more)."""
    binary = Path("/usr/bin/docker")
    if not binary.exists():
        pytest.skip("Debian's docker.io is not installed")
    scanner = golang.BuildInfoScanner(max_info=1 << 20)
    with binary.open("rb") as f:
        while not scanner.done and (chunk := f.read(1 << 20)):
            scanner.feed(chunk)
    found = scanner.result()
    assert found is not None
    go_version, modinfo = found
    assert "\nmod\t" not in "\n" + modinfo  # no module line: the case at hand
    packages = golang.go_packages(go_version, modinfo, layer=L, path="usr/bin/docker")
    names = {p.name: p for p in packages}
    assert names["github.com/docker/cli/cmd/docker"].version == "(devel)"
    assert names["github.com/docker/cli/cmd/docker"].purl.startswith(
        "pkg:golang/github.com/docker/cli@"
    )
    assert "stdlib" in names
