"""Blob copies per region and the replication queue (`skyreg.meta.geo`), on every database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, update

from skyreg.meta import schema as s
from skyreg.meta.db import create_db_engine, upgrade_schema
from skyreg.meta.geo import DONE, FAILED, MAX_ATTEMPTS, QUEUED, RUNNING, GeoMeta, LastCopy, backoff
from tests.support.meta import DATABASES

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


@pytest.fixture(params=sorted(DATABASES))
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return DATABASES[request.param](request, tmp_path)


@pytest.fixture
def geo(database_url: str) -> Iterator[GeoMeta]:
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    with engine.begin() as conn:  # copies are recorded only of blobs that exist (GC)
        now = datetime.now(UTC)
        conn.execute(
            insert(s.blobs), [{"digest": d, "size": 10, "created_at": now} for d in (D1, D2)]
        )
    g = GeoMeta(engine)
    yield g
    g.close()


def _expire_leases(geo: GeoMeta) -> None:
    with geo.engine.begin() as conn:
        conn.execute(
            update(s.replication_jobs).values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_copies_are_recorded_once_per_region(geo: GeoMeta) -> None:
    geo.add_copy(D1, "iad")
    geo.add_copy(D1, "iad")
    geo.add_copy(D1, "syd")
    assert geo.regions_of(D1) == ["iad", "syd"]
    assert geo.copies([D1, D2]) == {D1: {"iad", "syd"}, D2: set()}


def test_the_last_copy_of_a_blob_is_never_dropped(geo: GeoMeta) -> None:
    geo.add_copy(D1, "iad")
    geo.add_copy(D1, "syd")
    assert geo.drop_copy(D1, "syd") is True
    with pytest.raises(LastCopy):
        geo.drop_copy(D1, "iad")
    assert geo.regions_of(D1) == ["iad"]
    assert geo.drop_copy(D1, "sin") is False


def test_concurrent_drops_leave_at_least_one_copy(database_url: str, geo: GeoMeta) -> None:
    regions = ["iad", "sin", "syd", "ams", "lax", "fra"]
    for r in regions:
        geo.add_copy(D1, r)
    barrier = threading.Barrier(len(regions))
    outcomes: list[str] = []

    def drop(region: str) -> None:
        g = GeoMeta(create_db_engine(database_url))
        try:
            barrier.wait()
            try:
                g.drop_copy(D1, region)
                outcomes.append("dropped")
            except LastCopy:
                outcomes.append("refused")
        finally:
            g.close()

    threads = [threading.Thread(target=drop, args=(r,)) for r in regions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(geo.regions_of(D1)) == 1
    assert sorted(outcomes) == ["dropped"] * 5 + ["refused"]


def test_enqueue_is_idempotent_and_requeues_failed_jobs(geo: GeoMeta) -> None:
    assert geo.enqueue(D1, 10, "web", "syd") is True
    assert geo.enqueue(D1, 10, "web", "syd") is False
    job = geo.claim_next("syd", "a", 30)
    assert job is not None
    with geo.engine.begin() as conn:
        conn.execute(update(s.replication_jobs).values(state=FAILED))
    assert geo.enqueue(D1, 10, "web", "syd") is False
    again = geo.job(D1, "syd")
    assert again is not None and again.state == QUEUED and again.attempts == 0


def test_one_owner_wins_a_job_and_an_expired_lease_frees_it(geo: GeoMeta) -> None:
    geo.enqueue(D1, 10, "web", "syd")
    first = geo.claim_next("syd", "node-a", 30)
    assert first is not None and first.state == RUNNING and first.lease_owner == "node-a"
    assert geo.claim_next("syd", "node-b", 30) is None
    assert geo.claim_next("iad", "node-b", 30) is None  # other regions' jobs are not ours
    assert geo.claim(D1, 10, "web", "syd", "node-b", 30) is None
    assert geo.renew(first.id, "node-a", 30) is True
    assert geo.renew(first.id, "node-b", 30) is False
    _expire_leases(geo)  # node-a died mid-transfer
    taken = geo.claim_next("syd", "node-b", 30)
    assert taken is not None and taken.lease_owner == "node-b" and taken.attempts == 2
    assert geo.renew(first.id, "node-a", 30) is False


def test_finishing_records_the_copy_with_the_bytes(geo: GeoMeta) -> None:
    job = geo.claim(D1, 10, "web", "syd", "node-a", 30)
    assert job is not None
    geo.finish(job.id, "node-a", 10, "iad")
    done = geo.job(D1, "syd")
    assert done is not None and done.state == DONE and done.bytes_moved == 10
    assert done.source_region == "iad"
    assert geo.regions_of(D1) == ["syd"]
    assert geo.claim(D1, 10, "web", "syd", "node-b", 30) is None  # done: nothing to claim
    assert geo.counts()[("syd", DONE)] == (1, 10)


def test_failures_back_off_then_give_up(geo: GeoMeta) -> None:
    geo.enqueue(D1, 10, "web", "syd")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        job = geo.claim_next("syd", "node-a", 30)
        assert job is not None and job.attempts == attempt
        failed = geo.fail(job.id, "node-a", f"region iad down ({attempt})", 3)
        assert failed is not None
        if attempt < MAX_ATTEMPTS:
            assert failed.state == QUEUED
            wait = (failed.next_attempt_at - datetime.now(UTC)).total_seconds()
            assert backoff(attempt) - 5 < wait <= backoff(attempt)
            assert geo.claim_next("syd", "node-a", 30) is None  # not due yet
            with geo.engine.begin() as conn:
                conn.execute(update(s.replication_jobs).values(next_attempt_at=datetime.now(UTC)))
        else:
            assert failed.state == FAILED and failed.error == f"region iad down ({attempt})"
    assert geo.claim_next("syd", "node-a", 30) is None
    final = geo.job(D1, "syd")
    assert final is not None and final.bytes_moved == 3 * MAX_ATTEMPTS


def test_racing_workers_claim_each_job_exactly_once(database_url: str, geo: GeoMeta) -> None:
    digests = [f"sha256:{i:064x}" for i in range(40)]
    for d in digests:
        geo.enqueue(d, 1, "web", "syd")
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        g = GeoMeta(create_db_engine(database_url))
        try:
            while (job := g.claim_next("syd", name, 60)) is not None:
                with lock:
                    claimed.append(job.digest)
        finally:
            g.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(digests)


def test_app_placement_round_trips(geo: GeoMeta, tmp_path: Path) -> None:
    assert geo.app_placement("nope") is None
    now = datetime.now(UTC)
    with geo.engine.begin() as conn:
        conn.execute(s.orgs.insert().values(name="acme", created_at=now))
        conn.execute(s.apps.insert().values(name="web", org_id=1, public=False, created_at=now))
    assert geo.app_placement("web") == ([], False)
    assert geo.set_app_placement("web", ["syd", "iad", "syd"], True) is True
    assert geo.app_placement("web") == (["iad", "syd"], True)
