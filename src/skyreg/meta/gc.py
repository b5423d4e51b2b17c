"""Online garbage collection's metadata: review queues, reviews, pending byte deletions, status.

Nothing is collected by a scan. Every event that can leave something unreferenced queues a
review of it, in the transaction of the event (`enqueue_blobs`, `enqueue_manifests`): an
upsert that pushes `review_after` forward to now + the review delay, never "already queued".
The delay covers pushes in flight (a layer uploaded now is referenced by a manifest pushed
seconds later). A review runs once it is due, in one transaction per item:

- A manifest (`review_manifest`) is DELETEd first, inside a SAVEPOINT, then checked; when
  something still needs it the savepoint is rolled back. Needed: a tag, a parent index in the
  repository, its subject (for a referrer) being in the repository, or being the image of one of
  its app's newest `keep_releases` releases or of a release a machine uses. A deleted manifest's
  blobs, child manifests and referrers are queued in turn.
- A blob (`review_blob`): each repository link is DELETEd in a savepoint and put back when a
  manifest of that repository references the blob. When no link is left and no manifest
  anywhere references it, the `blobs` row, its region copies and replication jobs go, and a
  deletion of its bytes is queued for every region (`gc_blob_deletions`).
- Bytes go last (`delete_bytes`), region by region, by that region's nodes: inside the
  transaction holding the deletion row, unless the blob was pushed again meanwhile.

Why a push and GC never both win (PostgreSQL; on SQLite every write transaction holds the
database's write lock, so they simply run one after the other): a writer that makes something
referenced holds it until it commits — `put_manifest` holds the blob links and child manifests
it checked `FOR KEY SHARE`, tagging holds the manifest, a release holds its image — and a
review's DELETE of that row waits for the writer, after which the review's check sees what
the writer committed. `link_blob` (an upload finishing) upserts the blob's review row first, so
it waits for a review under way, and cancels the pending deletion of the blob's bytes in its
region before the upload's bytes are installed (`store.commit(before_install=...)`): bytes a
client was told are stored are never deleted by a deletion queued earlier. Due rows are taken
with `FOR UPDATE SKIP LOCKED`, so several nodes review in parallel without waiting for each
other.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import Connection, Integer, and_, delete, exists, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

_br, _mr, _bd = s.gc_blob_reviews, s.gc_manifest_reviews, s.gc_blob_deletions
_refs, _links, _m = s.manifest_references, s.repository_blobs, s.manifests

DEFAULT_REVIEW_DELAY = 24 * 3600.0
DEFAULT_KEEP_RELEASES = 10
MAX_BACKOFF = 3600.0  # seconds: a failing review or deletion is tried again at most this late
RUNS_KEPT = 200
UPSERT_ROWS = 1000  # rows per enqueue statement
LINKS_PER_TRANSACTION = 100  # links a blob review visits in one transaction
_ERROR_CHARS = 500

_R = TypeVar("_R")
BlobOutcome = Literal["kept", "unlinked", "deleted", "skipped"]
ManifestOutcome = Literal["kept", "deleted", "gone", "skipped"]
TOTALS = ("bytes_deleted", "blobs_deleted", "manifests_deleted", "links_deleted", "failures")


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they were stored in UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def backoff(attempts: int) -> float:
    """Seconds before try number `attempts` + 1 of a failing review or deletion."""
    return float(min(MAX_BACKOFF, 2 ** max(0, attempts)))


@dataclass(frozen=True)
class GcSettings:
    """How the collector decides (every node of a registry should agree)."""

    review_delay: float = DEFAULT_REVIEW_DELAY  # seconds between an event and its review
    keep_releases: int = DEFAULT_KEEP_RELEASES  # an app's newest releases whose images stay
    regions: tuple[str, ...] = ("",)  # every region whose store may hold bytes ("": no regions)

    def __post_init__(self) -> None:
        if self.review_delay < 0:
            raise ValueError("the review delay cannot be negative")
        if self.keep_releases < 0:
            raise ValueError("the number of releases kept cannot be negative")
        if not self.regions:
            raise ValueError("at least one region")


# -- used inside the transactions of other stores (meta/registry.py, platform.py, machines.py) ---


def _later(conn: Connection) -> Any:
    """SQL's "the later of two times" on this database."""
    return func.greatest if conn.dialect.name == "postgresql" else func.max


def _upsert_reviews(
    conn: Connection, table: Any, keys: list[str], rows: list[dict[str, Any]]
) -> None:
    # In statements of at most UPSERT_ROWS rows: a manifest may reference thousands of blobs,
    # and PostgreSQL takes at most 65,535 parameters per statement.
    for start in range(0, len(rows), UPSERT_ROWS):
        stmt: Any = (
            postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)
        ).values(rows[start : start + UPSERT_ROWS])
        stmt = stmt.on_conflict_do_update(
            index_elements=keys,
            set_={
                "review_after": _later(conn)(table.c.review_after, stmt.excluded.review_after),
                "event": stmt.excluded.event,
                "updated_at": stmt.excluded.updated_at,
            },
        )
        conn.execute(stmt)


def enqueue_blobs(
    conn: Connection, digests: Iterable[str], event: str, delay: float, now: datetime | None = None
) -> None:
    """Queue a review of each blob `delay` seconds from now (or later, if one is queued later),
    in the caller's transaction. Digests are taken in sorted order (one lock order for all)."""
    now = now or _now()
    due = now + timedelta(seconds=delay)
    rows = [
        {
            "digest": d,
            "review_after": due,
            "event": event,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for d in sorted(set(digests))
    ]
    _upsert_reviews(conn, _br, ["digest"], rows)


def enqueue_manifests(
    conn: Connection,
    manifests: Iterable[tuple[int, str]],
    event: str,
    delay: float,
    now: datetime | None = None,
) -> None:
    """Queue a review of each (repository id, manifest digest), as `enqueue_blobs` does."""
    now = now or _now()
    due = now + timedelta(seconds=delay)
    rows = [
        {
            "repository_id": repo_id,
            "digest": d,
            "review_after": due,
            "event": event,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        for repo_id, d in sorted(set(manifests))
    ]
    _upsert_reviews(conn, _mr, ["repository_id", "digest"], rows)


def cancel_deletion(conn: Connection, digest: str, region: str) -> None:
    """Forget a pending deletion of `digest`'s bytes in `region`, before bytes of it are
    installed there: on PostgreSQL this waits for a deletion under way to finish first."""
    conn.execute(delete(_bd).where(_bd.c.digest == digest, _bd.c.region == region))


def queue_deletion(conn: Connection, digest: str, size: int, region: str) -> None:
    """Ask for the bytes of a blob that no longer exists to be removed from `region`'s store."""
    now = _now()
    stmt: Any = (
        postgresql.insert(_bd) if conn.dialect.name == "postgresql" else sqlite.insert(_bd)
    ).values(
        digest=digest,
        region=region,
        size=size,
        attempts=0,
        next_attempt_at=now,
        last_error=None,
        created_at=now,
    )
    conn.execute(stmt.on_conflict_do_nothing())


def release_images_retired(
    conn: Connection, app_id: int, newest_version: int, settings: GcSettings
) -> None:
    """Queue reviews of the images of `app_id`'s releases that just left its newest
    `settings.keep_releases` (`newest_version` was just created), in the caller's transaction."""
    r = s.releases
    rows = conn.execute(
        select(s.repositories.c.id, r.c.image_digest)
        .select_from(r.join(s.repositories, s.repositories.c.name == r.c.image_repository))
        .where(r.c.app_id == app_id, r.c.version == newest_version - settings.keep_releases)
    ).all()
    pairs = [(int(a), str(b)) for a, b in rows]
    enqueue_manifests(conn, pairs, "release_retired", settings.review_delay)


def release_images(conn: Connection, release_ids: Iterable[int]) -> list[tuple[int, str]]:
    """(repository id, digest) of the images of the given releases."""
    ids = sorted(set(release_ids))
    if not ids:
        return []
    r = s.releases
    rows = conn.execute(
        select(s.repositories.c.id, r.c.image_digest)
        .select_from(r.join(s.repositories, s.repositories.c.name == r.c.image_repository))
        .where(r.c.id.in_(ids))
    ).all()
    return [(int(a), str(b)) for a, b in rows]


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobReview:
    digest: str
    outcome: BlobOutcome
    links_deleted: int = 0
    size: int = 0  # of a deleted blob: bytes its deletions will free (per region)


@dataclass(frozen=True)
class ManifestReview:
    repository: str
    digest: str
    outcome: ManifestOutcome
    reason: str = ""  # why it was kept


@dataclass
class GcRun:
    """One collector pass, as recorded in `gc_runs`."""

    node: str
    kind: str  # worker | manual
    dry_run: bool
    started_at: datetime
    finished_at: datetime | None = None
    manifests_reviewed: int = 0
    manifests_deleted: int = 0
    blobs_reviewed: int = 0
    blobs_deleted: int = 0
    links_deleted: int = 0
    bytes_deleted: int = 0
    failures: int = 0
    error: str | None = None
    tags_deleted: int = 0  # by retention policies, in this pass
    # what went (or, in a dry run, would go): bounded lists for the operator
    deleted_manifests: list[str] = field(default_factory=list)
    deleted_blobs: list[str] = field(default_factory=list)
    deleted_tags: list[str] = field(default_factory=list)  # REPOSITORY:TAG

    @property
    def did_something(self) -> bool:
        return bool(
            self.manifests_reviewed
            or self.blobs_reviewed
            or self.bytes_deleted
            or self.tags_deleted
        )


@dataclass(frozen=True)
class QueueDepth:
    queued: int
    due: int
    failing: int  # items whose last try failed


@dataclass(frozen=True)
class GcStatus:
    manifests: QueueDepth
    blobs: QueueDepth
    deletions: dict[str, QueueDepth]  # region → pending byte deletions
    deletion_bytes: dict[str, int]  # region → bytes those deletions will free
    totals: dict[str, int]
    runs: list[GcRun]
    last_errors: list[str]


class _Rollback(Exception):
    """Ends a dry run's transaction without committing what it did."""

    def __init__(self, result: Any) -> None:
        super().__init__("dry run")
        self.result = result


def node_name() -> str:
    """What `gc_runs` calls this process: host and pid."""
    return f"{socket.gethostname()[:50]}:{os.getpid()}"


class GcMeta(SqlStore):
    """Reviews, pending deletions and the collector's history, over the shared Database."""

    settings: GcSettings = GcSettings()

    # -- what is due -----------------------------------------------------------------------

    def due_manifest_reviews(self, limit: int) -> list[tuple[int, str]]:
        with self._read() as conn:
            rows = conn.execute(
                select(_mr.c.repository_id, _mr.c.digest)
                .where(_mr.c.review_after <= _now())
                .order_by(_mr.c.review_after)
                .limit(limit)
            ).all()
        return [(int(a), str(b)) for a, b in rows]

    def due_blob_reviews(self, limit: int) -> list[str]:
        with self._read() as conn:
            return [
                str(d)
                for d in conn.execute(
                    select(_br.c.digest)
                    .where(_br.c.review_after <= _now())
                    .order_by(_br.c.review_after)
                    .limit(limit)
                ).scalars()
            ]

    def due_deletions(self, region: str, limit: int) -> list[str]:
        with self._read() as conn:
            return [
                str(d)
                for d in conn.execute(
                    select(_bd.c.digest)
                    .where(_bd.c.region == region, _bd.c.next_attempt_at <= _now())
                    .order_by(_bd.c.next_attempt_at)
                    .limit(limit)
                ).scalars()
            ]

    # -- reviews -----------------------------------------------------------------------------

    def _take(self, conn: Connection, table: Any, where: Any, due_column: Any) -> Any:
        """The queue row, locked, if it is due and no other reviewer holds it; else None."""
        query = select(table).where(where)
        if self._locks:
            query = query.with_for_update(skip_locked=True)
        row = conn.execute(query).first()
        if row is None or _aware(row._mapping[due_column.name]) > _now():
            return None
        return row

    def review_blob(self, digest: str, *, dry_run: bool = False) -> BlobReview:
        """Review one blob (see the module docstring); `dry_run` decides and undoes.

        The links are visited `LINKS_PER_TRANSACTION` at a time, each batch its own transaction
        holding the review row (on SQLite the database's write lock: a blob linked into
        thousands of repositories must not hold it for long); the last one decides the blob. A
        dry run undoes every batch, so with more links than one batch it answers "kept"."""
        after, unlinked = -1, 0
        while True:
            batch = self._review_links(digest, after, dry_run)
            if batch is None:
                return BlobReview(digest, "skipped", unlinked)
            if isinstance(batch, BlobReview):
                return BlobReview(digest, batch.outcome, batch.links_deleted + unlinked, batch.size)
            after, done = batch
            unlinked += done

    def _review_links(
        self, digest: str, after: int, dry_run: bool
    ) -> BlobReview | tuple[int, int] | None:
        """One transaction of a blob review: the links of repositories after `after`; with
        more left, (the last repository visited, links deleted), else the review's result;
        None when the review row is not due or another reviewer holds it."""

        def work(conn: Connection) -> BlobReview | tuple[int, int] | None:
            if self._take(conn, _br, _br.c.digest == digest, _br.c.review_after) is None:
                return None
            repos = [
                int(r)
                for r in conn.execute(
                    select(_links.c.repository_id)
                    .where(_links.c.digest == digest, _links.c.repository_id > after)
                    .order_by(_links.c.repository_id)
                    .limit(LINKS_PER_TRANSACTION + 1)
                ).scalars()
            ]
            unlinked = sum(
                self._unlink_unused(conn, digest, r) for r in repos[:LINKS_PER_TRANSACTION]
            )
            if len(repos) > LINKS_PER_TRANSACTION:  # more to visit: the row stays, due
                partial = (repos[LINKS_PER_TRANSACTION - 1], unlinked)
                if dry_run:
                    raise _Rollback(partial)
                if unlinked:
                    self._add_totals(conn, links_deleted=unlinked)
                return partial
            result = self._decide_blob(conn, digest, unlinked)
            conn.execute(delete(_br).where(_br.c.digest == digest))
            if dry_run:
                raise _Rollback(result)
            if result.outcome == "deleted":
                self._add_totals(conn, blobs_deleted=1)
            if result.links_deleted:
                self._add_totals(conn, links_deleted=result.links_deleted)
            return result

        return self._run_review(work, dry_run)

    @staticmethod
    def _unlink_unused(conn: Connection, digest: str, repo_id: int) -> bool:
        """Delete the link of `digest` in `repo_id` unless a manifest there references it
        (deleted first in a savepoint, then checked, so a push holding it is waited for)."""
        savepoint = conn.begin_nested()
        removed = conn.execute(
            delete(_links).where(_links.c.repository_id == repo_id, _links.c.digest == digest)
        ).rowcount
        used = conn.execute(
            select(
                exists().where(
                    _refs.c.repository_id == repo_id,
                    _refs.c.child_digest == digest,
                    _refs.c.kind == "blob",
                )
            )
        ).scalar_one()
        if used or not removed:
            savepoint.rollback()
            return False
        savepoint.commit()
        return True

    def _decide_blob(self, conn: Connection, digest: str, unlinked: int) -> BlobReview:
        """After its links were visited: delete the blob if nothing links or references it."""
        kept = BlobReview(digest, "unlinked" if unlinked else "kept", unlinked)
        if conn.execute(select(exists().where(_links.c.digest == digest))).scalar_one():
            return kept
        referenced = conn.execute(
            select(exists().where(_refs.c.child_digest == digest, _refs.c.kind == "blob"))
        ).scalar_one()
        if referenced:  # a manifest whose repository no longer links it (a blob DELETE)
            return kept
        query = select(s.blobs.c.size).where(s.blobs.c.digest == digest)
        if self._locks:
            query = query.with_for_update()
        size = conn.execute(query).scalar_one_or_none()
        if size is None:  # its bytes' deletions were queued when its row went
            return kept
        # Every region this node knows, and any other holding a copy (a region added to the
        # regions file after this node started).
        holders = conn.execute(
            select(s.blob_regions.c.region).where(s.blob_regions.c.digest == digest)
        ).scalars()
        regions = set(self.settings.regions) | {str(r) for r in holders}
        conn.execute(delete(s.blob_regions).where(s.blob_regions.c.digest == digest))
        conn.execute(delete(s.replication_jobs).where(s.replication_jobs.c.digest == digest))
        conn.execute(delete(s.blobs).where(s.blobs.c.digest == digest))
        for region in sorted(regions):
            queue_deletion(conn, digest, int(size), region)
        return BlobReview(digest, "deleted", unlinked, int(size))

    def review_manifest(
        self, repository_id: int, digest: str, *, dry_run: bool = False
    ) -> ManifestReview:
        """Review one manifest of one repository (see the module docstring)."""

        def work(conn: Connection) -> ManifestReview:
            key = and_(_mr.c.repository_id == repository_id, _mr.c.digest == digest)
            if self._take(conn, _mr, key, _mr.c.review_after) is None:
                return ManifestReview(str(repository_id), digest, "skipped")
            result = self._review_manifest(conn, repository_id, digest)
            conn.execute(delete(_mr).where(key))
            if dry_run:
                raise _Rollback(result)
            if result.outcome == "deleted":
                self._add_totals(conn, manifests_deleted=1)
            return result

        return self._run_review(work, dry_run)

    def _review_manifest(self, conn: Connection, repo_id: int, digest: str) -> ManifestReview:
        name = conn.execute(
            select(s.repositories.c.name).where(s.repositories.c.id == repo_id)
        ).scalar_one_or_none()
        repository = str(name) if name is not None else str(repo_id)
        subject = conn.execute(
            select(_m.c.subject_digest).where(_m.c.repository_id == repo_id, _m.c.digest == digest)
        ).first()
        if subject is None:
            return ManifestReview(repository, digest, "gone")
        savepoint = conn.begin_nested()
        removed = conn.execute(
            delete(_m).where(_m.c.repository_id == repo_id, _m.c.digest == digest)
        ).rowcount
        reason = self._needed(conn, repo_id, repository, digest, subject[0]) if removed else "gone"
        if reason:
            savepoint.rollback()
            if reason == "gone":
                return ManifestReview(repository, digest, "gone")
            return ManifestReview(repository, digest, "kept", reason)
        savepoint.commit()
        children = conn.execute(
            select(_refs.c.child_digest, _refs.c.kind).where(
                _refs.c.repository_id == repo_id, _refs.c.parent_digest == digest
            )
        ).all()
        conn.execute(
            delete(_refs).where(_refs.c.repository_id == repo_id, _refs.c.parent_digest == digest)
        )
        conn.execute(
            delete(s.manifest_pulls).where(
                s.manifest_pulls.c.repository_id == repo_id, s.manifest_pulls.c.digest == digest
            )
        )
        delay = self.settings.review_delay
        now = _now()
        enqueue_blobs(
            conn, [str(c) for c, k in children if k == "blob"], "manifest_deleted", delay, now
        )
        referrers = conn.execute(
            select(_m.c.digest).where(_m.c.repository_id == repo_id, _m.c.subject_digest == digest)
        ).scalars()
        enqueue_manifests(
            conn,
            [(repo_id, str(c)) for c, k in children if k == "manifest" and c != digest]
            + [(repo_id, str(r)) for r in referrers],
            "parent_deleted",
            delay,
            now,
        )
        return ManifestReview(repository, digest, "deleted")

    def _needed(
        self, conn: Connection, repo_id: int, repository: str, digest: str, subject: str | None
    ) -> str:
        """Why a manifest must stay ("" when nothing needs it); it was just deleted, so what
        the checks read includes every writer that held it."""
        t = s.tags
        if conn.execute(
            select(exists().where(t.c.repository_id == repo_id, t.c.manifest_digest == digest))
        ).scalar_one():
            return "tagged"
        if conn.execute(
            select(
                exists().where(
                    _refs.c.repository_id == repo_id,
                    _refs.c.child_digest == digest,
                    _refs.c.kind == "manifest",
                    _refs.c.parent_digest != digest,
                )
            )
        ).scalar_one():
            return "in an index"
        if (
            subject
            and conn.execute(
                select(exists().where(_m.c.repository_id == repo_id, _m.c.digest == subject))
            ).scalar_one()
        ):
            return "a referrer of a manifest that exists"
        r, newest = s.releases, s.releases.alias("newest")
        latest = (
            select(func.max(newest.c.version))
            .where(newest.c.app_id == r.c.app_id)
            .scalar_subquery()
        )
        in_use = exists().where(s.machines.c.release_id == r.c.id)
        release = conn.execute(
            select(r.c.version)
            .where(
                r.c.image_repository == repository,
                r.c.image_digest == digest,
                (r.c.version > latest - self.settings.keep_releases) | in_use,
            )
            .limit(1)
        ).first()
        if release is not None:
            return f"the image of release v{release[0]}"
        return ""

    def _run_review(self, work: Callable[[Connection], _R], dry_run: bool) -> _R:
        """`work` in one transaction (run again when it lost a race); a dry run's result
        comes back through `_Rollback`, which undid the transaction."""
        try:
            return self._transaction(work, conflicts=True)
        except _Rollback as done:
            assert dry_run
            return cast(_R, done.result)

    def review_failed(self, kind: Literal["blob", "manifest"], key: Any, error: str) -> None:
        """Record a review that raised: tried again after a growing backoff."""
        table = _br if kind == "blob" else _mr
        where = (
            _br.c.digest == key
            if kind == "blob"
            else and_(_mr.c.repository_id == key[0], _mr.c.digest == key[1])
        )
        with self._write() as conn:
            attempts = conn.execute(select(table.c.attempts).where(where)).scalar_one_or_none()
            if attempts is None:
                return
            now = _now()
            retry = now + timedelta(seconds=backoff(int(attempts) + 1))
            conn.execute(
                update(table)
                .where(where)
                .values(
                    attempts=int(attempts) + 1,
                    # never earlier than an event queued it meanwhile (its delay covers a push)
                    review_after=_later(conn)(table.c.review_after, retry),
                    last_error=error[:_ERROR_CHARS],
                    updated_at=now,
                )
            )
            self._add_totals(conn, failures=1)

    # -- bytes -------------------------------------------------------------------------------

    def delete_bytes(
        self, digest: str, region: str, remove: Callable[[str], int | None]
    ) -> int | None:
        """Remove `digest`'s bytes from `region`'s store with `remove` (bytes freed, None when
        there were none), inside the transaction that holds the pending deletion; then the
        deletion goes. None without removing anything when the deletion is gone or held by
        another node, or the blob exists again (pushed anew: its bytes are wanted)."""

        def work(conn: Connection) -> int | None:
            key = and_(_bd.c.digest == digest, _bd.c.region == region)
            if self._take(conn, _bd, key, _bd.c.next_attempt_at) is None:
                return None
            alive = conn.execute(select(exists().where(s.blobs.c.digest == digest))).scalar_one()
            if alive:
                conn.execute(delete(_bd).where(key))
                return None
            freed = remove(digest)
            conn.execute(delete(_bd).where(key))
            if freed:
                self._add_totals(conn, bytes_deleted=freed)
            return freed

        return self._transaction(work)

    def deletion_failed(self, digest: str, region: str, error: str) -> None:
        """Record a failed removal: tried again after a growing backoff."""
        key = and_(_bd.c.digest == digest, _bd.c.region == region)
        with self._write() as conn:
            attempts = conn.execute(select(_bd.c.attempts).where(key)).scalar_one_or_none()
            if attempts is None:
                return
            conn.execute(
                update(_bd)
                .where(key)
                .values(
                    attempts=int(attempts) + 1,
                    next_attempt_at=_now() + timedelta(seconds=backoff(int(attempts) + 1)),
                    last_error=error[:_ERROR_CHARS],
                )
            )
            self._add_totals(conn, failures=1)

    # -- history and status ------------------------------------------------------------------

    def _add_totals(self, conn: Connection, **amounts: int) -> None:
        for name, amount in amounts.items():
            if not amount:
                continue
            stmt: Any = (
                postgresql.insert(s.gc_totals)
                if self._dialect == "postgresql"
                else sqlite.insert(s.gc_totals)
            ).values(name=name, value=amount)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["name"], set_={"value": s.gc_totals.c.value + amount}
                )
            )

    def record_run(self, run: GcRun) -> None:
        """Keep a pass in the history (the newest `RUNS_KEPT`)."""
        g = s.gc_runs
        with self._write() as conn:
            conn.execute(
                insert(g).values(
                    node=run.node[:64],
                    kind=run.kind,
                    dry_run=run.dry_run,
                    started_at=run.started_at,
                    finished_at=run.finished_at or _now(),
                    manifests_reviewed=run.manifests_reviewed,
                    manifests_deleted=run.manifests_deleted,
                    blobs_reviewed=run.blobs_reviewed,
                    blobs_deleted=run.blobs_deleted,
                    links_deleted=run.links_deleted,
                    bytes_deleted=run.bytes_deleted,
                    failures=run.failures,
                    error=None if run.error is None else run.error[:_ERROR_CHARS],
                    tags_deleted=run.tags_deleted,
                )
            )
            oldest_kept = conn.execute(
                select(g.c.id).order_by(g.c.id.desc()).offset(RUNS_KEPT - 1).limit(1)
            ).scalar_one_or_none()
            if oldest_kept is not None:
                conn.execute(delete(g).where(g.c.id < oldest_kept))

    def status(self, runs: int = 10) -> GcStatus:
        """Queue depths, pending deletions per region, totals, the newest `runs` passes."""
        now = _now()

        def depth(conn: Connection, table: Any, due_column: Any) -> QueueDepth:
            queued, due, failing = conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum((due_column <= now).cast(Integer)), 0),
                    func.coalesce(func.sum((table.c.attempts > 0).cast(Integer)), 0),
                ).select_from(table)
            ).one()
            return QueueDepth(int(queued), int(due), int(failing))

        with self._read() as conn:
            manifests = depth(conn, _mr, _mr.c.review_after)
            blobs = depth(conn, _br, _br.c.review_after)
            deletions: dict[str, QueueDepth] = {}
            deletion_bytes: dict[str, int] = {}
            for region, queued, due, failing, size in conn.execute(
                select(
                    _bd.c.region,
                    func.count(),
                    func.coalesce(func.sum((_bd.c.next_attempt_at <= now).cast(Integer)), 0),
                    func.coalesce(func.sum((_bd.c.attempts > 0).cast(Integer)), 0),
                    func.coalesce(func.sum(_bd.c.size), 0),
                ).group_by(_bd.c.region)
            ):
                deletions[str(region)] = QueueDepth(int(queued), int(due), int(failing))
                deletion_bytes[str(region)] = int(size)
            totals = {name: 0 for name in TOTALS}
            for name, value in conn.execute(select(s.gc_totals.c.name, s.gc_totals.c.value)):
                totals[str(name)] = int(value)
            g = s.gc_runs
            recent = [
                GcRun(
                    node=row.node,
                    kind=row.kind,
                    dry_run=bool(row.dry_run),
                    started_at=_aware(row.started_at),
                    finished_at=_aware(row.finished_at),
                    manifests_reviewed=row.manifests_reviewed,
                    manifests_deleted=row.manifests_deleted,
                    blobs_reviewed=row.blobs_reviewed,
                    blobs_deleted=row.blobs_deleted,
                    links_deleted=row.links_deleted,
                    bytes_deleted=int(row.bytes_deleted),
                    failures=row.failures,
                    error=row.error,
                    tags_deleted=row.tags_deleted,
                )
                for row in conn.execute(select(g).order_by(g.c.id.desc()).limit(runs))
            ]
            errors = [
                str(e)
                for table in (_mr, _br, _bd)
                for e in conn.execute(
                    select(table.c.last_error)
                    .where(table.c.attempts > 0, table.c.last_error.is_not(None))
                    .limit(5)
                ).scalars()
            ]
        return GcStatus(manifests, blobs, deletions, deletion_bytes, totals, recent, errors)
