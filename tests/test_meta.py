"""One behavioural suite for the metadata layer, run against every supported database."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import digest_of
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.oci.manifest import Manifest, parse_manifest

DATABASES: dict[str, Callable[[Path], RegistryMeta]] = {
    "sqlite": lambda tmp: open_database(None, tmp),
}


@pytest.fixture(params=sorted(DATABASES))
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryMeta]:
    m = DATABASES[request.param](tmp_path)
    yield m
    m.close()


def _desc(data: bytes, media_type: str = "application/octet-stream") -> dict[str, object]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data)}


def _manifest(config: bytes, layers: list[bytes], **extra: object) -> Manifest:
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": _desc(config),
            "layers": [_desc(x) for x in layers],
            **extra,
        }
    ).encode()
    return parse_manifest(raw, mt.OCI_MANIFEST, digest_of(raw))


def _link(meta: RegistryMeta, repo: str, *blobs: bytes) -> None:
    for b in blobs:
        meta.link_blob(repo, str(digest_of(b)), len(b))


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    open_database(None, tmp_path).close()
    m = open_database(None, tmp_path)
    assert m.list_tags("none", None, None) == []
    m.close()


def test_manifest_needs_its_blobs_and_stores_nothing_otherwise(meta: RegistryMeta) -> None:
    m = _manifest(b"cfg", [b"layer"])
    _link(meta, "a", b"cfg")
    with pytest.raises(RegistryError) as info:
        meta.put_manifest("a", m, ["latest"])
    assert info.value.code is ErrorCode.MANIFEST_BLOB_UNKNOWN
    assert meta.get_manifest("a", "latest", by_digest=False) is None
    assert meta.get_manifest("a", str(m.digest), by_digest=True) is None
    _link(meta, "a", b"layer")
    meta.put_manifest("a", m, ["latest"])
    stored = meta.get_manifest("a", "latest", by_digest=False)
    assert stored is not None and stored.content == m.raw and stored.digest == str(m.digest)


def test_blob_in_another_repository_does_not_count(meta: RegistryMeta) -> None:
    _link(meta, "other", b"cfg", b"layer")
    with pytest.raises(RegistryError):
        meta.put_manifest("a", _manifest(b"cfg", [b"layer"]), [])


def test_descriptor_size_must_match_blob(meta: RegistryMeta) -> None:
    meta.link_blob("a", str(digest_of(b"cfg")), 999)
    _link(meta, "a", b"layer")
    with pytest.raises(RegistryError) as info:
        meta.put_manifest("a", _manifest(b"cfg", [b"layer"]), [])
    assert info.value.code is ErrorCode.MANIFEST_INVALID


def test_tag_moves_and_deletes(meta: RegistryMeta) -> None:
    _link(meta, "a", b"c1", b"c2", b"l")
    m1, m2 = _manifest(b"c1", [b"l"]), _manifest(b"c2", [b"l"])
    meta.put_manifest("a", m1, ["x", "y"])
    meta.put_manifest("a", m2, ["x"])
    got = meta.get_manifest("a", "x", by_digest=False)
    assert got is not None and got.digest == str(m2.digest)
    assert meta.list_tags("a", None, None) == ["x", "y"]
    assert meta.delete_manifest("a", str(m1.digest))
    assert meta.list_tags("a", None, None) == ["x"]
    assert meta.delete_tag("a", "x")
    assert not meta.delete_tag("a", "x")
    assert meta.get_manifest("a", str(m2.digest), by_digest=True) is not None


def test_unlink_reports_last_reference(meta: RegistryMeta) -> None:
    _link(meta, "a", b"blob")
    _link(meta, "b", b"blob")
    d = str(digest_of(b"blob"))
    assert meta.repositories_with_blob(d) == ["a", "b"]
    assert meta.unlink_blob("a", d) == (True, False)
    assert meta.unlink_blob("a", d) == (False, False)
    assert meta.repositories_with_blob(d) == ["b"]
    assert meta.unlink_blob("b", d) == (True, True)
    assert meta.repositories_with_blob(d) == []
    assert meta.blob_size("b", d) is None


def test_referrers_filter_by_artifact_type(meta: RegistryMeta) -> None:
    _link(meta, "a", b"c", b"l", b"{}")
    subject = _manifest(b"c", [b"l"])
    meta.put_manifest("a", subject, [])
    sig = _manifest(
        b"{}",
        [b"l"],
        artifactType="application/sig",
        subject={**_desc(subject.raw, mt.OCI_MANIFEST)},
    )
    meta.put_manifest("a", sig, [])
    assert [r.digest for r in meta.referrers("a", str(subject.digest), None)] == [str(sig.digest)]
    assert meta.referrers("a", str(subject.digest), "application/other") == []
    assert meta.referrers("a", str(subject.digest), "application/sig")[0].size == len(sig.raw)


def test_catalog_and_tag_pagination(meta: RegistryMeta) -> None:
    _link(meta, "z", b"c", b"l")
    m = _manifest(b"c", [b"l"])
    for repo in ("r1", "r2", "r3"):
        _link(meta, repo, b"c", b"l")
        meta.put_manifest(repo, m, ["t1", "t2", "t3"])
    assert meta.catalog(None, None) == ["r1", "r2", "r3"]
    assert meta.catalog(1, "r1") == ["r2"]
    assert meta.list_tags("r1", 2, "t1") == ["t2", "t3"]


def test_stale_uploads(meta: RegistryMeta) -> None:
    meta.create_upload("u1", "a")
    assert meta.upload_repository("u1") == "a"
    assert meta.stale_uploads(datetime.now(UTC) - timedelta(hours=1)) == []
    assert meta.stale_uploads(datetime.now(UTC) + timedelta(seconds=1)) == ["u1"]
    assert meta.delete_upload("u1")
    assert meta.upload_repository("u1") is None
