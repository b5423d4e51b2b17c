"""Retention policies applied by a served registry's `gc` worker, with pull times recorded in
batches by its `pull_times` worker: a tag pulled lately stays while older ones go, a tag
matching a kept pattern stays at any age, and what the deleted tags held leaves the database
and the store; the rest pulls byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import pytest
import requests
import sqlalchemy

from skyreg.meta.retention import RetentionMeta, RetentionPolicy
from skyreg.registry.pulls import PullTimes
from tests.support.backings import create_org_and_app
from tests.support.inprocess import InProcessRegistry, in_store, rows
from tests.support.oci import OCI_MANIFEST, Image, push_image, sha256
from tests.support.platform import authed
from tests.support.waiting import wait_for


def _pull(session: requests.Session, url: str, tag: str) -> bytes:
    got = session.get(f"{url}/v2/web/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200, got.text
    return got.content


def test_the_gc_worker_applies_retention_and_a_recent_pull_keeps_a_tag(tmp_path: Path) -> None:
    # First no gc worker: with a review delay of 0 it would collect layers between their upload
    # and their manifest's (only a real delay covers pushes in flight).
    options: dict[str, object] = {
        "gc_worker": False,
        "gc_review_delay": 0.0,
        "gc_interval": 0.2,
        "retention_interval": 0.2,
        "pull_flush_interval": 0.2,
    }
    reg = InProcessRegistry(data_dir=tmp_path / "data", options=options)
    reg.start()
    engine = sqlalchemy.create_engine(f"sqlite:///{reg.data_dir / 'skyreg.db'}")
    try:
        session = authed((reg.data_dir / "admin-token").read_text().strip())
        create_org_and_app(session, reg.url, "acme", "web")
        retention = RetentionMeta(engine)
        with engine.connect() as conn:
            app_id = conn.execute(sqlalchemy.text("SELECT id FROM apps")).scalar_one()
        images: dict[str, Image] = {}
        for tag in ("v1.0", "build-1", "build-2", "build-3"):
            images[tag] = push_image(reg.url, "web", tag, layers=1, session=session)
        assert _pull(session, reg.url, "build-1") == images["build-1"].manifest
        pulled = "SELECT digest FROM manifest_pulls WHERE digest = :digest"
        wait_for(
            lambda: rows(reg, pulled, images["build-1"].digest) != [],
            "the pull time to be written",
        )
        # HEAD is not a pull
        head = session.head(f"{reg.url}/v2/web/manifests/build-2", headers={"Accept": OCI_MANIFEST})
        assert head.status_code == 200

        # The newest per repository (build-1: pulled last), and v* at any age.
        retention.set_policy(app_id, RetentionPolicy(keep_tags=("v*",), keep_recent=1))
        dry = session.post(f"{reg.url}/api/v1/gc/runs", json={"dry_run": True})
        assert dry.status_code == 200, dry.text
        assert sorted(dry.json()["deleted_tags"]) == ["web:build-2", "web:build-3"]
        assert dry.json()["tags_deleted"] == 2
        listed = session.get(f"{reg.url}/v2/web/tags/list").json()["tags"]
        assert len(listed) == 4  # a dry run deletes nothing
        reg.options["gc_worker"] = True
        reg.restart()

        def tags() -> list[str]:
            listed = session.get(f"{reg.url}/v2/web/tags/list")
            assert listed.status_code == 200, listed.text
            return sorted(listed.json()["tags"])

        wait_for(lambda: tags() == ["build-1", "v1.0"], "retention to delete two tags")
        gone = [images["build-2"], images["build-3"]]
        manifests = "SELECT digest FROM manifests WHERE digest = :digest"
        wait_for(
            lambda: all(rows(reg, manifests, i.digest) == [] for i in gone),
            "GC to delete the untagged manifests",
        )
        for image in gone:
            for blob in image.layers:
                wait_for(lambda b=blob: not in_store(reg, sha256(b)), "the layers' bytes to go")
        for tag in ("build-1", "v1.0"):
            assert _pull(session, reg.url, tag) == images[tag].manifest
            for blob in images[tag].layers:
                got = session.get(f"{reg.url}/v2/web/blobs/{sha256(blob)}")
                assert got.status_code == 200 and got.content == blob
        metrics = session.get(f"{reg.url}/metrics").text
        assert "skyreg_retention_tags_deleted_total 2" in metrics
        assert 'skyreg_worker_up{worker="pull_times"} 1' in metrics
        stored = retention.get_policy(app_id)
        assert stored is not None and stored.tags_deleted == 2
    finally:
        reg.stop()
        engine.dispose()


class _Meta:
    """A RetentionMeta stand-in that counts writes and can fail them."""

    def __init__(self) -> None:
        self.batches: list[dict[tuple[str, str], datetime]] = []
        self.fail = False

    async def run(self, fn: object, batch: Mapping[tuple[str, str], datetime]) -> int:
        if self.fail:
            raise OSError("database down")
        self.batches.append(dict(batch))
        return len(batch)

    def record_pulls(self, batch: Mapping[tuple[str, str], datetime]) -> int:
        raise AssertionError("called through run")


def test_pull_times_are_bounded_between_writes_and_a_failed_write_keeps_its_batch() -> None:
    meta = _Meta()
    pulls = PullTimes(meta, max_pending=2)  # type: ignore[arg-type]
    pulls.record("web", "sha256:a")
    pulls.record("web", "sha256:b")
    pulls.record("web", "sha256:a")  # noted already: its time moves on
    pulls.record("web", "sha256:c")  # a third distinct one: dropped, counted
    assert pulls.dropped == 1
    meta.fail = True
    with pytest.raises(OSError):
        asyncio.run(pulls.flush())
    meta.fail = False
    assert asyncio.run(pulls.flush()) == 2
    assert sorted(meta.batches[0]) == [("web", "sha256:a"), ("web", "sha256:b")]
    assert asyncio.run(pulls.flush()) == 0  # nothing new
    assert "skyreg_pull_times_dropped_total 1" in pulls.metrics()
