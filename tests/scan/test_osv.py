"""OSV records: what is kept, the bounds, and reading exports (zip and directory)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import msgspec
import pytest

from skyreg.scan.osv import (
    MAX_DOCUMENT,
    Advisory,
    Event,
    OsvError,
    parse_advisory,
    read_source,
)
from tests.support.osvdata import RECORDS, synthetic_debian_export, write_fixture


def _record(rid: str) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads(json.dumps(next(r for r in RECORDS if r["id"] == rid)))
    return rec


def _parse(rec: dict[str, Any]) -> Advisory:
    return parse_advisory(json.dumps(rec).encode())


def test_debian_records() -> None:
    dsa = _parse(_record("DSA-5514-1"))
    assert dsa.aliases == ("CVE-2023-4527", "CVE-2023-4911")
    assert dsa.summary == "glibc - security update"
    assert [(a.ecosystem, a.name) for a in dsa.affected] == [
        ("Debian:12", "glibc"),
        ("Debian:11", "glibc"),
    ]
    assert dsa.affected[0].ranges[0].events == (
        Event(introduced="0"),
        Event(fixed="2.36-9+deb12u3"),
    )
    assert (dsa.severity, dsa.score) == ("UNKNOWN", None)

    cve = _parse(_record("DEBIAN-CVE-2023-4911"))
    assert cve.aliases == ("CVE-2023-4911",)  # from `upstream`
    assert cve.summary.startswith("A buffer overflow was discovered")  # no summary: details
    assert (cve.severity, cve.score) == ("HIGH", 7.8)


def test_severity_from_vectors_and_words() -> None:
    pysec = _parse(_record("PYSEC-2023-74"))
    assert (pysec.severity, pysec.score) == ("MEDIUM", 6.1)
    ghsa = _parse(_record("GHSA-xqr8-7jwr-rhp7"))
    assert (ghsa.severity, ghsa.score) == ("MEDIUM", None)  # GHSA's MODERATE
    semver = _parse(_record("GHSA-c2qf-rxjj-qqgw"))
    assert (semver.severity, semver.score) == ("HIGH", 7.5)

    rec = _record("GO-2023-2102")
    rec["severity"] = [
        {"type": "CVSS_V2", "score": "AV:N/AC:L/Au:N/C:P/I:P/A:P"},  # 7.5
        {
            "type": "CVSS_V4",
            "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
        },
        {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:bogus"},  # unscorable: ignored
    ]
    worst = _parse(rec)
    assert (worst.severity, worst.score) == ("CRITICAL", 9.3)

    rec = _record("DEBIAN-CVE-2005-2541")
    rec["severity"] = [{"type": "Ubuntu", "score": "negligible"}]
    assert _parse(rec).severity == "LOW"
    rec["severity"] = []
    rec["affected"][0]["ecosystem_specific"] = {"severity": "Important"}
    assert _parse(rec).severity == "HIGH"
    rec["affected"][0]["ecosystem_specific"] = {"severity": {"not": "a word"}}
    assert _parse(rec).severity == "UNKNOWN"


def test_git_ranges_and_withdrawn() -> None:
    pysec = _parse(_record("PYSEC-2023-74"))
    (aff,) = pysec.affected
    assert [r.type for r in aff.ranges] == ["ECOSYSTEM"]
    assert aff.versions == ("2.3.0", "2.30.0", "2.31.0rc1")
    withdrawn = _parse(_record("GHSA-67hx-6x53-jw92"))
    assert withdrawn.withdrawn == "2023-10-06T17:05:02Z"


def test_advisory_round_trips_as_json() -> None:
    adv = _parse(_record("GO-2023-2382"))
    assert msgspec.json.decode(msgspec.json.encode(adv), type=Advisory) == adv


def test_summary_is_cut() -> None:
    rec = _record("GO-2023-2102")
    rec["summary"] = "x" * 4000
    assert len(_parse(rec).summary) == 1024


def _deep(n: int) -> dict[str, Any]:
    rec = _record("GO-2023-2102")
    doc = json.dumps(rec)
    return {"raw": doc[:-1] + ', "database_specific": ' + "[" * n + "]" * n + "}"}


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda r: r.update(id="GHSA has spaces"), id="id-space"),
        pytest.param(lambda r: r.update(id="GHSA-é"), id="id-non-ascii"),
        pytest.param(lambda r: r.update(id="G" * 257), id="id-long"),
        pytest.param(lambda r: r.pop("id"), id="no-id"),
        pytest.param(lambda r: r.update(id=15), id="id-int"),
        pytest.param(lambda r: r.update(affected="stdlib"), id="affected-str"),
        pytest.param(lambda r: r["affected"][0].update(versions=[1, 2]), id="versions-int"),
        pytest.param(
            lambda r: r["affected"][0]["ranges"][0]["events"].append({"fixed": 3}),
            id="event-int",
        ),
        pytest.param(
            lambda r: r["affected"][0]["ranges"][0]["events"].append(
                {"introduced": "1", "fixed": "2"}
            ),
            id="event-two-fields",
        ),
        pytest.param(lambda r: r["affected"][0]["package"].update(name="x\x00y"), id="nul-name"),
        pytest.param(lambda r: r.update(summary="a\x00b"), id="nul-summary"),
        pytest.param(lambda r: r.update(summary="s" * 5000), id="string-too-long"),
        pytest.param(lambda r: r.update(affected=r["affected"] * 10_001), id="too-many-affected"),
        pytest.param(
            lambda r: r["affected"][0].update(versions=["1"] * 100_001), id="too-many-versions"
        ),
    ],
)
def test_hostile_records_are_refused(mutate: Any) -> None:
    rec = _record("GO-2023-2102")
    mutate(rec)
    with pytest.raises(OsvError):
        _parse(rec)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"id": "GO-1", "modified": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"id": "GO-1", "modified": "\xed\xa0\x80"}', id="surrogate-utf8"),
        pytest.param(b'{"id": "GO-1", "modified": "\xff"}', id="bad-utf8"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b"{", id="truncated"),
        pytest.param(
            b'{"id": "GO-1", "modified": "x", "database_specific": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            id="deep",
        ),
        pytest.param(
            b'{"id": "GO-1", "modified": "x", "details": "' + b"a" * MAX_DOCUMENT + b'"}',
            id="huge",
        ),
    ],
)
def test_hostile_documents_are_refused(raw: bytes) -> None:
    with pytest.raises(OsvError):
        parse_advisory(raw)


def test_reads_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "osv"
    write_fixture(root)
    (root / "PyPI" / "PYSEC-BAD.json").write_bytes(b'{"id": 1}')
    (root / "notes.txt").write_text("not a record")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(_record("GO-2023-2102")))
    os.symlink(outside, root / "PyPI" / "link.json")
    os.symlink(tmp_path, root / "loop")

    results = list(read_source(root))
    good = [r for r in results if isinstance(r, Advisory)]
    bad = [r for r in results if isinstance(r, OsvError)]
    assert sorted(a.id for a in good) == sorted(r["id"] for r in RECORDS)
    assert sorted(e.name for e in bad) == ["PyPI/PYSEC-BAD.json", "PyPI/link.json"]


def test_reads_a_zip_as_osv_publishes(tmp_path: Path) -> None:
    path = tmp_path / "all.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rec in RECORDS:
            zf.writestr(f"{rec['id']}.json", json.dumps(rec))
        zf.writestr("BAD-1.json", b'{"id": "BAD-1", "modified": "x", "affected": {}}')
    results = list(read_source(path))
    assert len(results) == len(RECORDS) + 1
    (bad,) = [r for r in results if isinstance(r, OsvError)]
    assert bad.name == "BAD-1.json"
    assert "BAD-1.json" in str(bad)


def test_zip_bombs_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "all.zip"
    head = b'{"id": "BOMB-1", "modified": "x", "details": "'
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("BOMB-1.json", head + b" " * (MAX_DOCUMENT + 1) + b'"}')
        zf.writestr("BOMB-2.json", head + b" " * (4 << 20) + b'"}')  # under the size bound
        zf.writestr("GO-2023-2102.json", json.dumps(_record("GO-2023-2102")))
    assert path.stat().st_size < 100_000
    results = list(read_source(path))
    assert [r.name for r in results if isinstance(r, OsvError)] == ["BOMB-1.json", "BOMB-2.json"]
    assert [r.id for r in results if isinstance(r, Advisory)] == ["GO-2023-2102"]


def test_unreadable_sources_raise(tmp_path: Path) -> None:
    junk = tmp_path / "all.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(OsvError, match="zip"):
        list(read_source(junk))
    with pytest.raises(OsvError):
        list(read_source(tmp_path / "missing"))


def test_synthetic_debian_export(tmp_path: Path) -> None:
    path = tmp_path / "all.zip"
    assert synthetic_debian_export(path, 200) == 200
    results = list(read_source(path))
    assert len(results) == 200
    assert all(isinstance(r, Advisory) for r in results)
    first = results[0]
    assert isinstance(first, Advisory)
    assert first.id.startswith("DEBIAN-CVE-")
    assert {a.ecosystem for a in first.affected} == {"Debian:11", "Debian:12", "Debian:13"}
