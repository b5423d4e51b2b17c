"""GC's metadata (`meta/gc.py`) on SQLite and PostgreSQL: what each event queues, what a review
keeps and why, what it deletes, and how pending byte deletions meet new pushes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from skyreg.meta import schema as s
from skyreg.meta.gc import GcMeta, GcRun, GcSettings
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import PlatformMeta, ReleaseMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import digest_of
from skyreg.oci.manifest import Manifest, parse_manifest
from tests.support.meta import DATABASES, descriptor_of, link_blobs, manifest_of

NOW = GcSettings(review_delay=0.0, keep_releases=2, regions=("iad", "syd"))


@pytest.fixture(params=sorted(DATABASES))
def meta(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryMeta]:
    m = open_database(DATABASES[request.param](request, tmp_path), tmp_path)
    m.gc = NOW
    m.region = "iad"
    yield m
    m.close()


@pytest.fixture
def gc(meta: RegistryMeta) -> GcMeta:
    g = GcMeta(meta.db)
    g.settings = NOW
    return g


def _digests(meta: RegistryMeta, table: s.Table, column: str = "digest") -> set[str]:
    with meta.engine.connect() as conn:
        return {str(v) for v in conn.execute(select(table.c[column])).scalars()}


def _collect(gc: GcMeta) -> list[str]:
    """Review everything due until nothing is (as the collector's step does): what happened."""
    seen: list[str] = []
    for _ in range(10):
        did = False
        for repo_id, digest in gc.due_manifest_reviews(100):
            r = gc.review_manifest(repo_id, digest)
            seen.append(f"manifest {digest[:15]} {r.outcome} {r.reason}".strip())
            did = True
        for digest in gc.due_blob_reviews(100):
            b = gc.review_blob(digest)
            seen.append(f"blob {digest[:15]} {b.outcome}")
            did = True
        if not did:
            break
    return seen


def _image(meta: RegistryMeta, repo: str, seed: str, tags: list[str]) -> tuple[Manifest, bytes]:
    config, layer = f"config {seed}".encode(), f"layer {seed}".encode()
    link_blobs(meta, repo, config, layer)
    m = manifest_of(config, [layer])
    meta.put_manifest(repo, m, tags)
    return m, layer


def test_an_untagged_image_goes_manifest_first_then_blobs_then_bytes_in_every_region(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    m, layer = _image(meta, "app", "a", [])
    _collect(gc)
    assert str(m.digest) not in _digests(meta, s.manifests)
    assert str(digest_of(layer)) not in _digests(meta, s.blobs)
    assert not _digests(meta, s.repository_blobs)
    # Bytes go region by region, each through `remove`, which reports what it freed.
    assert gc.due_deletions("iad", 10) == gc.due_deletions("syd", 10) != []
    removed: list[str] = []
    for digest in gc.due_deletions("iad", 10):
        assert gc.delete_bytes(digest, "iad", lambda d: removed.append(d) or 7) == 7
    assert gc.due_deletions("iad", 10) == []
    assert len(gc.due_deletions("syd", 10)) == 2
    assert sorted(removed) == sorted(_digests_of(m))
    assert gc.status().totals["bytes_deleted"] == 14


def _digests_of(m: Manifest) -> list[str]:
    return [str(d.digest) for d in m.required_blobs()]


def test_tagged_images_and_blobs_shared_with_them_stay(meta: RegistryMeta, gc: GcMeta) -> None:
    kept, shared = _image(meta, "app", "kept", [])  # pushed by digest: queued ...
    meta.put_manifest("app", kept, ["v1"])  # ... then tagged: its review keeps it
    # Another repository uploads the same layer and never uses it: only its link goes.
    link_blobs(meta, "other", shared)
    outcomes = _collect(gc)
    assert any("kept tagged" in o for o in outcomes)
    assert str(kept.digest) in _digests(meta, s.manifests)
    assert str(digest_of(shared)) in _digests(meta, s.blobs)
    assert meta.blob_size("app", str(digest_of(shared))) == len(shared)
    assert meta.blob_size("other", str(digest_of(shared))) is None
    assert gc.due_deletions("iad", 10) == []


def test_moving_or_deleting_a_tag_queues_the_manifest_it_left(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    first, _ = _image(meta, "app", "1", ["latest"])
    second, _ = _image(meta, "app", "2", ["latest"])
    _collect(gc)
    assert str(first.digest) not in _digests(meta, s.manifests)
    assert meta.delete_tag("app", "latest")
    _collect(gc)
    assert str(second.digest) not in _digests(meta, s.manifests)
    assert _digests(meta, s.blobs) == set()


def test_index_children_and_referrers_live_as_long_as_what_holds_them(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    child, _ = _image(meta, "app", "child", [])
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {**descriptor_of(child.raw, mt.OCI_MANIFEST), "platform": {"os": "linux"}}
            ],
        }
    ).encode()
    index = parse_manifest(raw, mt.OCI_INDEX, digest_of(raw))
    meta.put_manifest("app", index, ["v1"])
    link_blobs(meta, "app", b"{}", b"signature")
    referrer = manifest_of(b"{}", [b"signature"], subject=descriptor_of(index.raw, mt.OCI_INDEX))
    meta.put_manifest("app", referrer, [])
    outcomes = _collect(gc)
    assert any("in an index" in o for o in outcomes)
    assert any("a referrer of a manifest that exists" in o for o in outcomes)
    assert {str(child.digest), str(referrer.digest)} <= _digests(meta, s.manifests)
    # The index goes: its child and its referrer follow, then their blobs.
    meta.delete_tag("app", "v1")
    _collect(gc)
    assert _digests(meta, s.manifests) == set()
    assert _digests(meta, s.blobs) == set()


def test_images_of_recent_releases_and_of_machines_stay(meta: RegistryMeta, gc: GcMeta) -> None:
    platform = PlatformMeta(meta.db)
    releases, machines = ReleaseMeta(meta.db), MachineMeta(meta.db)
    releases.gc = machines.gc = NOW
    org = platform.create_org("acme")
    platform.create_app("app", org.id)
    app = platform.get_app("app")
    assert app is not None
    images = [_image(meta, "app", f"r{i}", [])[0] for i in range(4)]

    def release(image: Manifest) -> int:
        return releases.create_release(
            app_id=app.id,
            status="pending",
            description="d",
            reason="deploy",
            image_ref=f"h/app@{image.digest}",
            image_repository="app",
            image_digest=str(image.digest),
            strategy="rolling",
            regions=["iad"],
            machine_count=1,
            user_id="u",
            user_name="u",
        ).id

    first = release(images[0])
    machines.create_for_release(first, app.id, ["iad"], 1, "rolling")
    for image in images[1:]:
        release(image)
    outcomes = _collect(gc)
    # keep_releases=2: v3 and v4 stay as the newest two, v1 because a machine runs it.
    assert any("the image of release v1" in o for o in outcomes)
    left = _digests(meta, s.manifests)
    assert left == {str(images[0].digest), str(images[2].digest), str(images[3].digest)}
    releases.close()
    machines.close()
    platform.close()


def test_an_enqueue_pushes_the_review_later_never_earlier(meta: RegistryMeta, gc: GcMeta) -> None:
    meta.gc = GcSettings(review_delay=3600.0)
    _image(meta, "app", "a", [])
    meta.gc = NOW  # an event now with no delay must not make the hour-later review due now
    link_blobs(meta, "app", b"config a")
    assert gc.due_blob_reviews(10) == []
    assert gc.due_manifest_reviews(10) == []
    status = gc.status()
    assert (status.blobs.queued, status.blobs.due) == (2, 0)
    assert (status.manifests.queued, status.manifests.due) == (1, 0)


def test_a_new_upload_cancels_the_deletion_of_its_bytes_in_its_region(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    _, layer = _image(meta, "app", "a", [])
    _collect(gc)
    digest = str(digest_of(layer))
    assert digest in gc.due_deletions("iad", 10)
    # Pushed again in iad: iad's deletion is cancelled before the bytes are installed.
    assert meta.link_blob("app", digest, len(layer))
    assert digest not in gc.due_deletions("iad", 10)
    # syd's deletion finds the blob alive again: it keeps the bytes and goes.
    calls: list[str] = []
    assert gc.delete_bytes(digest, "syd", lambda d: calls.append(d) or 1) is None
    assert calls == []
    assert digest not in gc.due_deletions("syd", 10)


def test_a_mount_of_a_collected_blob_is_refused(meta: RegistryMeta, gc: GcMeta) -> None:
    _, layer = _image(meta, "app", "a", [])
    _collect(gc)
    assert not meta.link_blob("other", str(digest_of(layer)), len(layer), require_existing=True)
    assert meta.blob_size("other", str(digest_of(layer))) is None


def test_a_dry_run_decides_and_changes_nothing(meta: RegistryMeta, gc: GcMeta) -> None:
    m, _ = _image(meta, "app", "a", [])
    (repo_id, digest), *_ = gc.due_manifest_reviews(10)
    assert gc.review_manifest(repo_id, digest, dry_run=True).outcome == "deleted"
    assert str(m.digest) in _digests(meta, s.manifests)
    assert gc.due_manifest_reviews(10) == [(repo_id, digest)]
    assert gc.status().totals["manifests_deleted"] == 0


def test_a_blob_deleted_through_the_api_keeps_its_bytes_while_a_manifest_references_it(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    _, layer = _image(meta, "app", "a", ["v1"])
    assert meta.unlink_blob("app", str(digest_of(layer)))
    _collect(gc)
    assert str(digest_of(layer)) in _digests(meta, s.blobs)
    assert gc.due_deletions("iad", 10) == []


def test_failed_reviews_and_deletions_back_off_and_are_counted(
    meta: RegistryMeta, gc: GcMeta
) -> None:
    _, layer = _image(meta, "app", "a", [])
    _collect(gc)
    digest = str(digest_of(layer))

    def broken(_digest: str) -> int:
        raise OSError("store unreachable")

    with pytest.raises(OSError):
        gc.delete_bytes(digest, "iad", broken)
    gc.deletion_failed(digest, "iad", "store unreachable")
    assert digest not in gc.due_deletions("iad", 10)  # not before its backoff
    status = gc.status()
    assert status.deletions["iad"].failing == 1
    assert status.totals["failures"] == 1
    assert "store unreachable" in status.last_errors


def test_runs_are_kept_newest_first(gc: GcMeta) -> None:
    for i in range(3):
        gc.record_run(GcRun("n", "worker", False, datetime.now(UTC), blobs_deleted=i))
    assert [r.blobs_deleted for r in gc.status(runs=2).runs] == [2, 1]
