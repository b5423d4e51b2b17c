"""What the server attaches to an image itself — the scan's SBOM and the layer indexes of lazy
pull — can be read from every region, like a pushed blob: the region that made them records its
copy, so another region's node knows where to fetch them from (before, it answered 503: "no
other region holds it", and a far agent fell back to a whole pull)."""

from __future__ import annotations

import gzip
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import requests

from tests.support.images import Entry, make_tar
from tests.support.regions import Regions, running_regions
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

LAZY_INDEX = "application/vnd.skyreg.lazy-index.v1"


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[Regions]:
    rtt = {("iad", "syd"): 50}
    with running_regions(
        tmp_path, ("iad", "syd"), rtt_ms=rtt, extra_args=["--scan", "--lazy-index"]
    ) as r:
        yield r


def _layer() -> bytes:
    return _tar_of(
        {"etc/os-release": b"ID=debian\nVERSION_ID=12\n", "app/data.bin": os.urandom(300_000)}
    )


def _referrers(r: Regions, code: str, digest: str) -> list[dict[str, object]]:
    got = requests.get(f"{r.url(code)}/v2/web/referrers/{digest}", auth=("x", r.admin), timeout=60)
    assert got.status_code == 200, got.text
    return list(got.json()["manifests"])


def test_the_sbom_and_layer_indexes_made_in_one_region_are_read_in_another(
    regions: Regions,
) -> None:
    r = regions
    manifest, _ = r.push_image("iad", "web", "v1", [_layer()])

    def attached() -> list[dict[str, object]] | None:
        found = _referrers(r, "iad", manifest)
        kinds = {str(x.get("artifactType")) for x in found}
        return found if LAZY_INDEX in kinds and len(found) >= 2 else None

    referrers = wait_for(attached, "the scan's SBOM and the layer indexes", timeout=120)
    assert {str(x["digest"]) for x in _referrers(r, "syd", manifest)} == {
        str(x["digest"]) for x in referrers
    }
    blobs: list[str] = []
    index_blobs: list[str] = []
    for ref in referrers:
        got = requests.get(
            f"{r.url('syd')}/v2/web/manifests/{ref['digest']}",
            auth=("x", r.admin),
            headers={"Accept": str(ref["mediaType"])},
            timeout=60,
        )
        assert got.status_code == 200, got.text
        doc = got.json()
        digests = [str(d["digest"]) for d in [doc["config"], *doc["layers"]]]
        blobs += digests
        if ref.get("artifactType") == LAZY_INDEX:
            index_blobs += [str(d["digest"]) for d in doc["layers"]]
    assert blobs and index_blobs
    for digest in set(blobs):
        assert "iad" in r.copies(digest), digest  # recorded where it was made
    # The layer indexes are copied to every region as soon as they are made (a far lazy start
    # reads them nearby); the SBOM only when something asks for it there.
    _wait_copied(r, index_blobs)
    for digest in set(blobs):
        got = r.get_blob("syd", "web", digest)
        assert got.status_code == 200, (digest, got.status_code, got.text[:300])
        assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest


def _zeros_layer() -> bytes:
    """A layer that compresses ~1000:1: its seek points (a 32 KiB window per MiB) outweigh it."""
    return gzip.compress(_tar_of({"zeros": bytes(64 << 20)}), compresslevel=9)


def _tar_of(files: dict[str, bytes]) -> bytes:
    return make_tar(Entry(name, "file", data=data) for name, data in files.items())


def _index_blobs(r: Regions, manifest: str) -> list[str]:
    def found() -> list[dict[str, object]] | None:
        return [x for x in _referrers(r, "iad", manifest) if x.get("artifactType") == LAZY_INDEX]

    [ref] = wait_for(found, f"the layer indexes of {manifest}", timeout=120)
    got = requests.get(
        f"{r.url('iad')}/v2/web/manifests/{ref['digest']}",
        auth=("x", r.admin),
        headers={"Accept": str(ref["mediaType"])},
        timeout=60,
    )
    assert got.status_code == 200, got.text
    return [str(d["digest"]) for d in got.json()["layers"]]


def test_indexes_larger_than_a_tenth_of_their_image_are_not_copied_ahead(regions: Regions) -> None:
    """A tenant's layer of zeros (65 KB pushed) has index blobs several times its size: they
    stay in the region that made them (readable from others when asked), where an image of
    ordinary layers gets its indexes copied to every region."""
    r = regions
    zeros, _ = r.push_image("iad", "web", "zeros", [_zeros_layer()])
    plain, _ = r.push_image("iad", "web", "plain", [_layer()])
    big = _index_blobs(r, zeros)
    small = _index_blobs(r, plain)
    # The scan worker takes images in push order: once the later image's indexes are in syd,
    # the earlier one's copy-ahead decision was made too.
    _wait_copied(r, small)
    with closing(sqlite3.connect(r.top / "meta.db", timeout=30)) as db:
        queued = db.execute(
            "SELECT count(*) FROM replication_jobs WHERE region = 'syd' AND digest IN (?, ?)",
            (big[0], big[-1]),
        ).fetchone()[0]
    assert queued == 0
    assert all(r.copies(d) == {"iad"} for d in big)
    for digest in big:  # still read from syd, through to iad
        got = r.get_blob("syd", "web", digest)
        assert got.status_code == 200 and sha256_of(got.content) == digest


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _wait_copied(r: Regions, digests: list[str]) -> None:
    for digest in set(digests):

        def both(d: str = digest) -> bool:
            return r.copies(d) == {"iad", "syd"}

        wait_for(both, f"{digest} copied to syd")
