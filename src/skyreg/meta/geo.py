"""Where blob copies live (`blob_regions`) and the durable replication queue (`replication_jobs`).

A job asks for one blob in one region; (digest, region) is unique, so enqueueing twice is a
no-op. Jobs are claimed with a lease (owner + expiry) by a conditional UPDATE, which is atomic
on every database: two nodes racing for a job see one of them update the row and the other
update nothing. A node that dies mid-transfer stops renewing its lease; once it expires the job
is claimable again. Failures are retried with exponential backoff, up to `MAX_ATTEMPTS`. A
job's completion and the region's copy record are one transaction.

Garbage collection (DESIGN rule 5): a region's copy is recorded only while the blob's `blobs`
row exists, held against GC's delete until the record commits (PostgreSQL: FOR KEY SHARE;
SQLite: the write lock); once GC has deleted the blob, a copy that lands anyway is garbage and
a `gc_blob_deletions` row for that region is written instead, so the collector removes its
bytes. Bytes are installed only after `prepare_install` committed: it cancels a pending
deletion of them in that region and refuses (False) once the blob is gone, so a copy never
brings a deleted blob back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.gc import cancel_deletion, queue_deletion

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED)
MAX_ATTEMPTS = 8
MAX_BACKOFF = 300.0

_j, _br, _b = s.replication_jobs, s.blob_regions, s.blobs


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class LastCopy(Exception):
    """Removing this region's copy would leave the blob in no region."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    digest: str
    region: str
    repository: str
    size: int
    state: str
    attempts: int
    lease_owner: str | None
    lease_until: datetime | None
    next_attempt_at: datetime
    bytes_moved: int
    source_region: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime


_JOB_COLUMNS = (
    _j.c.id,
    _j.c.digest,
    _j.c.region,
    _j.c.repository,
    _j.c.size,
    _j.c.state,
    _j.c.attempts,
    _j.c.lease_owner,
    _j.c.lease_until,
    _j.c.next_attempt_at,
    _j.c.bytes_moved,
    _j.c.source_region,
    _j.c.error,
    _j.c.created_at,
    _j.c.updated_at,
)


def _job(r: Any) -> Job:
    return Job(
        id=int(r[0]),
        digest=str(r[1]),
        region=str(r[2]),
        repository=str(r[3]),
        size=int(r[4]),
        state=str(r[5]),
        attempts=int(r[6]),
        lease_owner=r[7],
        lease_until=_aware(r[8]),
        next_attempt_at=_aware(r[9]) or _now(),
        bytes_moved=int(r[10]),
        source_region=r[11],
        error=r[12],
        created_at=_aware(r[13]) or _now(),
        updated_at=_aware(r[14]) or _now(),
    )


def backoff(attempts: int) -> float:
    """Seconds before retry number `attempts` (1, 2, 4, … capped at MAX_BACKOFF)."""
    return float(min(MAX_BACKOFF, 2 ** max(0, attempts - 1)))


class GeoMeta(SqlStore):
    """Blob copies per region and the replication queue."""

    # -- copies ------------------------------------------------------------------------------

    def add_copy(self, digest: str, region: str, size: int = 0) -> bool:
        """Record that `region`'s blob store holds `digest` (verified); True when recorded.

        False when the blob is gone (GC deleted it): the bytes there are garbage, and a
        deletion of them from `region`'s store (`size` bytes, when known) is queued instead.
        """
        return self._transaction(lambda conn: self._record_copy(conn, digest, region, size))

    def _record_copy(self, conn: Connection, digest: str, region: str, size: int) -> bool:
        if not self._hold_blob(conn, digest):
            queue_deletion(conn, digest, size, region)
            return False
        conn.execute(
            self._insert_ignore(_br).values(digest=digest, region=region, created_at=_now())
        )
        return True

    def _hold_blob(self, conn: Connection, digest: str) -> bool:
        """Whether the blob's `blobs` row exists, holding it until this transaction ends
        against GC deleting it (PostgreSQL: FOR KEY SHARE, which waits for a delete under way
        and then sees it committed; SQLite: the write lock). False once GC deleted it."""
        query = select(_b.c.digest).where(_b.c.digest == digest)
        if self._locks:
            query = query.with_for_update(read=True, key_share=True)
        return conn.execute(query).first() is not None

    def prepare_install(self, digest: str, region: str) -> bool:
        """Before bytes of `digest` are installed into `region`'s store (a transfer's commit):
        cancel a pending deletion of them there (waiting for one under way) and check the blob
        still exists. Commits before the install; False when GC has deleted the blob: then
        nothing may be installed (a deleted blob is never brought back)."""

        def work(conn: Connection) -> bool:
            if not self._hold_blob(conn, digest):
                return False
            cancel_deletion(conn, digest, region)
            return True

        return self._transaction(work)

    def blob_exists(self, digest: str) -> bool:
        """Whether the registry still knows the blob (GC has not deleted its `blobs` row)."""
        with self._read() as conn:
            return (
                conn.execute(select(_b.c.digest).where(_b.c.digest == digest)).first() is not None
            )

    def regions_of(self, digest: str) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(select(_br.c.region).where(_br.c.digest == digest))
            return sorted(str(r[0]) for r in rows)

    def copies(self, digests: list[str]) -> dict[str, set[str]]:
        """digest → the regions holding it, for every digest asked (empty set: none)."""
        found: dict[str, set[str]] = {d: set() for d in digests}
        if not digests:
            return found
        with self._read() as conn:
            for i in range(0, len(digests), 500):
                rows = conn.execute(
                    select(_br.c.digest, _br.c.region).where(_br.c.digest.in_(digests[i : i + 500]))
                )
                for digest, region in rows:
                    found[str(digest)].add(str(region))
        return found

    def drop_copy(self, digest: str, region: str) -> bool:
        """Forget `region`'s copy; raises LastCopy rather than leave the blob nowhere.

        The rows of the blob are locked (FOR UPDATE; SQLite's write lock) before counting, so
        two regions dropping their copies at once cannot both succeed on the last two.
        """
        with self._write() as conn:
            rows = conn.execute(
                select(_br.c.region).where(_br.c.digest == digest).with_for_update()
            ).all()
            regions = {str(r[0]) for r in rows}
            if region not in regions:
                return False
            if len(regions) == 1:
                raise LastCopy(f"{digest} is held only by {region}")
            conn.execute(delete(_br).where(_br.c.digest == digest, _br.c.region == region))
            return True

    # -- queue ---------------------------------------------------------------------------------

    def enqueue(self, digest: str, size: int, repository: str, region: str) -> bool:
        """Ask for `digest` in `region`; False when a job for it exists (a failed one is
        queued again)."""
        now = _now()
        with self._write() as conn:
            created = conn.execute(
                self._insert_ignore(_j)
                .values(
                    digest=digest,
                    region=region,
                    repository=repository,
                    size=size,
                    state=QUEUED,
                    attempts=0,
                    next_attempt_at=now,
                    bytes_moved=0,
                    created_at=now,
                    updated_at=now,
                )
                .returning(_j.c.id)
            ).first()
            if created is not None:
                return True
            conn.execute(
                update(_j)
                .where(_j.c.digest == digest, _j.c.region == region, _j.c.state == FAILED)
                .values(state=QUEUED, attempts=0, next_attempt_at=now, updated_at=now)
            )
            return False

    def _claimable(self, now: datetime) -> object:
        return or_(
            and_(_j.c.state == QUEUED, _j.c.next_attempt_at <= now),
            and_(_j.c.state == RUNNING, _j.c.lease_until < now),
        )

    def _take(self, job_id: int, owner: str, lease: float) -> Job | None:
        now = _now()
        with self._write() as conn:
            taken = conn.execute(
                update(_j)
                .where(_j.c.id == job_id, self._claimable(now))  # type: ignore[arg-type]
                .values(
                    state=RUNNING,
                    lease_owner=owner,
                    lease_until=now + timedelta(seconds=lease),
                    attempts=_j.c.attempts + 1,
                    updated_at=now,
                )
            ).rowcount
            if not taken:
                return None
            row = conn.execute(select(*_JOB_COLUMNS).where(_j.c.id == job_id)).one()
            return _job(row)

    def claim_next(self, region: str, owner: str, lease: float) -> Job | None:
        """Lease the oldest due job of `region` (queued, or running with an expired lease)."""
        now = _now()
        with self._read() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    select(_j.c.id)
                    .where(_j.c.region == region, self._claimable(now))  # type: ignore[arg-type]
                    .order_by(_j.c.id)
                    .limit(8)
                )
            ]
        for job_id in ids:
            job = self._take(job_id, owner, lease)
            if job is not None:
                return job
        return None

    def claim(
        self, digest: str, size: int, repository: str, region: str, owner: str, lease: float
    ) -> Job | None:
        """Lease the job for `digest` in `region` now (a pull-through), creating it if needed.

        None when another owner holds a live lease, or the job is done."""
        self.enqueue(digest, size, repository, region)
        now = _now()
        with self._write() as conn:
            conn.execute(  # a pull-through does not wait for a queued job's backoff
                update(_j)
                .where(_j.c.digest == digest, _j.c.region == region, _j.c.state == QUEUED)
                .values(next_attempt_at=now)
            )
            row = conn.execute(
                select(_j.c.id).where(_j.c.digest == digest, _j.c.region == region)
            ).one()
        return self._take(int(row[0]), owner, lease)

    def renew(self, job_id: int, owner: str, lease: float) -> bool:
        """Extend a lease this owner holds; False if it lost it."""
        now = _now()
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(_j)
                    .where(_j.c.id == job_id, _j.c.lease_owner == owner, _j.c.state == RUNNING)
                    .values(lease_until=now + timedelta(seconds=lease), updated_at=now)
                ).rowcount
            )

    def finish(self, job_id: int, owner: str, bytes_moved: int, source: str | None) -> bool:
        """Mark the job done and record the region's copy, in one transaction; True when done.

        False when the job is gone (GC deleted its blob, and its jobs with it) — the caller
        records the copy with `add_copy`, which decides — or when the blob is: then the job
        goes and a deletion of the region's bytes is queued instead of the copy."""
        now = _now()

        def work(conn: Connection) -> bool:
            row = conn.execute(
                select(_j.c.digest, _j.c.region, _j.c.size).where(_j.c.id == job_id)
            ).first()
            if row is None:
                return False
            digest, region, size = str(row[0]), str(row[1]), int(row[2])
            if not self._record_copy(conn, digest, region, size):
                conn.execute(delete(_j).where(_j.c.id == job_id))
                return False
            conn.execute(
                update(_j)
                .where(_j.c.id == job_id)
                .values(
                    state=DONE,
                    lease_owner=None,
                    lease_until=None,
                    bytes_moved=_j.c.bytes_moved + bytes_moved,
                    source_region=source,
                    error=None,
                    updated_at=now,
                )
            )
            return True

        return self._transaction(work)

    def drop_job_of_deleted_blob(self, job_id: int) -> bool:
        """Remove a job whose blob GC has deleted (nothing to copy; no retries); True if it
        went. A job whose blob exists (pushed again meanwhile) stays."""
        with self._write() as conn:
            gone = ~select(_b.c.digest).where(_b.c.digest == _j.c.digest).exists()
            return bool(conn.execute(delete(_j).where(_j.c.id == job_id, gone)).rowcount)

    def fail(self, job_id: int, owner: str, error: str, bytes_moved: int = 0) -> Job | None:
        """Record a failed attempt: queued again after a backoff, or failed for good."""
        now = _now()
        with self._write() as conn:
            row = conn.execute(select(_j.c.attempts).where(_j.c.id == job_id)).first()
            if row is None:
                return None
            attempts = int(row[0])
            final = attempts >= MAX_ATTEMPTS
            conn.execute(
                update(_j)
                .where(_j.c.id == job_id, _j.c.lease_owner == owner)
                .values(
                    state=FAILED if final else QUEUED,
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=now + timedelta(seconds=backoff(attempts)),
                    bytes_moved=_j.c.bytes_moved + bytes_moved,
                    error=error[:1000],
                    updated_at=now,
                )
            )
            got = conn.execute(select(*_JOB_COLUMNS).where(_j.c.id == job_id)).one()
            return _job(got)

    def release(self, job_id: int, owner: str, bytes_moved: int = 0) -> None:
        """Give a leased job back untried (the node is shutting down)."""
        now = _now()
        with self._write() as conn:
            conn.execute(
                update(_j)
                .where(_j.c.id == job_id, _j.c.lease_owner == owner, _j.c.state == RUNNING)
                .values(
                    state=QUEUED,
                    lease_owner=None,
                    lease_until=None,
                    bytes_moved=_j.c.bytes_moved + bytes_moved,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )

    def job(self, digest: str, region: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(
                select(*_JOB_COLUMNS).where(_j.c.digest == digest, _j.c.region == region)
            ).first()
        return None if row is None else _job(row)

    def jobs(
        self, region: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Job]:
        query = select(*_JOB_COLUMNS)
        if region is not None:
            query = query.where(_j.c.region == region)
        if state is not None:
            query = query.where(_j.c.state == state)
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query.order_by(_j.c.id.desc()).limit(limit))]

    def counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(region, state) → (jobs, bytes moved)."""
        query = select(_j.c.region, _j.c.state, func.count(), func.sum(_j.c.bytes_moved)).group_by(
            _j.c.region, _j.c.state
        )
        with self._read() as conn:
            return {
                (str(r[0]), str(r[1])): (int(r[2]), int(r[3] or 0)) for r in conn.execute(query)
            }

    # -- app placement ---------------------------------------------------------------------------

    def app_placement(self, app_name: str) -> tuple[list[str], bool] | None:
        """(regions, replicate_ahead) of an app, or None when there is no such app."""
        with self._read() as conn:
            row = conn.execute(
                select(s.apps.c.regions, s.apps.c.replicate_ahead).where(s.apps.c.name == app_name)
            ).first()
        if row is None:
            return None
        return (json.loads(row[0]) if row[0] else []), bool(row[1])

    def set_app_placement(self, app_name: str, regions: list[str], replicate_ahead: bool) -> bool:
        with self._write() as conn:
            return bool(
                conn.execute(
                    update(s.apps)
                    .where(s.apps.c.name == app_name)
                    .values(
                        regions=json.dumps(sorted(set(regions))), replicate_ahead=replicate_ahead
                    )
                ).rowcount
            )
