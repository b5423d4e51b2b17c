"""Retention per app: which tags an app keeps, and when its untagged manifests go.

A policy deletes *tags*; what they leave untagged is collected by GC like any other untagged
manifest (`meta/gc.py`), after the app's `untagged_after` delay instead of the registry's
review delay, unless something else holds it (an index, a subject, a recent release, a
machine). A tag stays when any rule keeps it:

- its name matches one of `keep_tags` (shell-style globs, `fnmatchcase`: `v*`, `release-?`);
- it is one of the `keep_recent` most recent tags of its repository;
- it was pushed or pulled within `keep_within` seconds.

"Recent" is the later of the tag's push (`tags.updated_at`) and the last pull of its manifest
in that repository (`manifest_pulls`, written in batches by `record_pulls`). With neither
`keep_recent` nor `keep_within` set, a policy deletes no tag (it may still set
`untagged_after`). A run deletes at most `TAGS_PER_RUN` tags of an app, each only if it still
points where it pointed when planned (a push moving it meanwhile keeps it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import Connection, and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.gc import enqueue_manifests

TAGS_PER_RUN = 1000  # tags one run deletes in one app, at most
SCAN_PER_RUN = 20_000  # candidate tags one run looks at in one app, at most
REVIEWS_PER_RUN = 1000  # queued reviews one run moves earlier in one app, at most
LISTED = 1000  # tags a dry run lists, at most
MAX_PATTERNS = 32
MAX_PATTERN_CHARS = 128
MAX_KEEP_RECENT = 100_000
MAX_SECONDS = 10 * 366 * 24 * 3600  # ten years
# A manifest pushed by digest waits at least this long (or the review delay, if shorter) even
# with a shorter untagged delay: a multi-platform push sends its index after its children.
PUSH_GRACE = 600.0

_r, _t, _p, _mr = s.app_retention, s.tags, s.manifest_pulls, s.gc_manifest_reviews


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class PolicyInvalid(ValueError):
    """A policy a caller sent that cannot be kept (the message says why)."""


@dataclass(frozen=True)
class RetentionPolicy:
    """What an app keeps (see the module docstring); seconds for durations."""

    keep_tags: tuple[str, ...] = ()
    keep_recent: int | None = None
    keep_within: int | None = None
    untagged_after: int | None = None

    def __post_init__(self) -> None:
        if len(self.keep_tags) > MAX_PATTERNS:
            raise PolicyInvalid(f"at most {MAX_PATTERNS} tag patterns")
        for pattern in self.keep_tags:
            if not pattern or len(pattern) > MAX_PATTERN_CHARS or not pattern.isprintable():
                raise PolicyInvalid(
                    f"a tag pattern is 1 to {MAX_PATTERN_CHARS} printable characters"
                )
        if self.keep_recent is not None and not 0 <= self.keep_recent <= MAX_KEEP_RECENT:
            raise PolicyInvalid(f"keep_recent is 0 to {MAX_KEEP_RECENT}")
        for name in ("keep_within", "untagged_after"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_SECONDS:
                raise PolicyInvalid(f"{name} is 0 to {MAX_SECONDS} seconds (ten years)")

    @property
    def deletes_tags(self) -> bool:
        return self.keep_recent is not None or self.keep_within is not None

    def keeps_name(self, tag: str) -> bool:
        return any(fnmatchcase(tag, p) for p in self.keep_tags)


@dataclass(frozen=True)
class TagToDelete:
    """A tag a policy deletes (or, in a dry run, would delete)."""

    repository: str
    tag: str
    digest: str
    pushed_at: datetime
    pulled_at: datetime | None


@dataclass
class RetentionRun:
    """One app's run: the tags it deleted (or would), and reviews it moved earlier."""

    app: str
    dry_run: bool
    tags_deleted: int = 0
    reviews_advanced: int = 0
    tags: list[TagToDelete] = field(default_factory=list)  # the first LISTED


@dataclass(frozen=True)
class AppRetention:
    """An app's stored policy, with its history."""

    policy: RetentionPolicy
    updated_at: datetime
    last_run_at: datetime | None
    tags_deleted: int


def app_of(repository: str) -> str:
    """The app a repository belongs to: its first path component."""
    return repository.split("/", 1)[0]


def app_repositories(app: str) -> Any:
    """SQL: the ids of `app`'s repositories (`app` and `app/...`), by ranges of the name index
    (an app name is a DNS label: no `/` or `0` ends it early)."""
    r = s.repositories
    return select(r.c.id).where(
        or_(r.c.name == app, and_(r.c.name > app + "/", r.c.name < app + "0"))
    )


def untagged_delay(conn: Connection, repository: str, default: float) -> float:
    """Seconds before a manifest of `repository` that lost its tag (or never had one) is
    reviewed: its app's `untagged_after`, else `default` (the registry's review delay)."""
    value = conn.execute(
        select(_r.c.untagged_after)
        .select_from(_r.join(s.apps, s.apps.c.id == _r.c.app_id))
        .where(s.apps.c.name == app_of(repository))
    ).scalar_one_or_none()
    return default if value is None else float(value)


class RetentionMeta(SqlStore):
    """Policies, pull times and runs over the shared Database."""

    review_delay: float = 24 * 3600.0  # the registry's GC review delay (GcSettings)

    # -- policies ------------------------------------------------------------------------------

    def get_policy(self, app_id: int) -> AppRetention | None:
        with self._read() as conn:
            row = conn.execute(select(_r).where(_r.c.app_id == app_id)).first()
        if row is None:
            return None
        return AppRetention(
            RetentionPolicy(
                tuple(json.loads(row.keep_tags)),
                row.keep_recent,
                row.keep_within,
                row.untagged_after,
            ),
            _aware(row.updated_at),
            None if row.last_run_at is None else _aware(row.last_run_at),
            int(row.tags_deleted),
        )

    def set_policy(self, app_id: int, policy: RetentionPolicy | None) -> None:
        """Store (or, with None, remove) an app's policy."""
        with self._write() as conn:
            if policy is None:
                conn.execute(delete(_r).where(_r.c.app_id == app_id))
                return
            values = {
                "keep_tags": json.dumps(list(policy.keep_tags)),
                "keep_recent": policy.keep_recent,
                "keep_within": policy.keep_within,
                "untagged_after": policy.untagged_after,
                "updated_at": _now(),
            }
            stmt: Any = (
                postgresql.insert(_r) if self._dialect == "postgresql" else sqlite.insert(_r)
            ).values(app_id=app_id, tags_deleted=0, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["app_id"], set_=values))

    def apps_with_policies(self, after: int, limit: int) -> list[tuple[int, str]]:
        """(app id, name) of apps with a policy, by id after `after`."""
        a = s.apps
        with self._read() as conn:
            rows = conn.execute(
                select(a.c.id, a.c.name)
                .select_from(_r.join(a, a.c.id == _r.c.app_id))
                .where(a.c.id > after)
                .order_by(a.c.id)
                .limit(limit)
            ).all()
        return [(int(i), str(n)) for i, n in rows]

    # -- pulls ---------------------------------------------------------------------------------

    def record_pulls(self, pulls: Mapping[tuple[str, str], datetime]) -> int:
        """Remember when each (repository, manifest digest) was last pulled; one transaction
        for the whole batch. Returns the rows written."""
        if not pulls:
            return 0
        r = s.repositories
        names = sorted({repo for repo, _ in pulls})
        with self._write() as conn:
            ids: dict[str, int] = {}
            for start in range(0, len(names), 500):
                for repo_id, name in conn.execute(
                    select(r.c.id, r.c.name).where(r.c.name.in_(names[start : start + 500]))
                ):
                    ids[str(name)] = int(repo_id)
            rows = [
                {"repository_id": ids[repo], "digest": digest, "pulled_at": at}
                for (repo, digest), at in sorted(pulls.items())
                if repo in ids
            ]
            for start in range(0, len(rows), 1000):
                stmt: Any = (
                    postgresql.insert(_p) if self._dialect == "postgresql" else sqlite.insert(_p)
                ).values(rows[start : start + 1000])
                later = func.greatest if self._dialect == "postgresql" else func.max
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["repository_id", "digest"],
                        set_={"pulled_at": later(_p.c.pulled_at, stmt.excluded.pulled_at)},
                    )
                )
        return len(rows)

    # -- runs ----------------------------------------------------------------------------------

    def _candidates(
        self, conn: Connection, app: str, policy: RetentionPolicy, now: datetime
    ) -> list[TagToDelete]:
        """The tags `policy` deletes in `app` (at most TAGS_PER_RUN), oldest first."""
        if not policy.deletes_tags:
            return []
        r = s.repositories
        later = func.greatest if conn.dialect.name == "postgresql" else func.max
        recency = later(_t.c.updated_at, func.coalesce(_p.c.pulled_at, _t.c.updated_at))
        rank = (
            func.row_number()
            .over(partition_by=_t.c.repository_id, order_by=(recency.desc(), _t.c.name))
            .label("rank")
        )
        ranked = (
            select(
                r.c.name.label("repository"),
                _t.c.name.label("tag"),
                _t.c.manifest_digest.label("digest"),
                _t.c.updated_at.label("pushed_at"),
                _p.c.pulled_at.label("pulled_at"),
                recency.label("recency"),
                rank,
            )
            .select_from(
                _t.join(r, r.c.id == _t.c.repository_id).outerjoin(
                    _p,
                    and_(
                        _p.c.repository_id == _t.c.repository_id,
                        _p.c.digest == _t.c.manifest_digest,
                    ),
                )
            )
            .where(_t.c.repository_id.in_(app_repositories(app)))
            .subquery()
        )
        query = select(ranked).order_by(ranked.c.recency, ranked.c.repository, ranked.c.tag)
        if policy.keep_recent is not None:
            query = query.where(ranked.c.rank > policy.keep_recent)
        if policy.keep_within is not None:
            query = query.where(ranked.c.recency < now - timedelta(seconds=policy.keep_within))
        found: list[TagToDelete] = []
        for row in conn.execute(query.limit(SCAN_PER_RUN)):
            if policy.keeps_name(row.tag):
                continue
            found.append(
                TagToDelete(
                    row.repository,
                    row.tag,
                    row.digest,
                    _aware(row.pushed_at),
                    None if row.pulled_at is None else _aware(row.pulled_at),
                )
            )
            if len(found) >= TAGS_PER_RUN:
                break
        return found

    def plan(self, app: str, policy: RetentionPolicy) -> list[TagToDelete]:
        """What `policy` would delete in `app` now (a dry run, whatever the stored policy)."""
        with self._read() as conn:
            return self._candidates(conn, app, policy, _now())[:LISTED]

    def apply(self, app_id: int, app: str, *, dry_run: bool = False) -> RetentionRun:
        """Apply `app`'s stored policy once: delete the tags it does not keep (each only if it
        still points where it did), queue their manifests' reviews after the app's untagged
        delay, and move queued reviews of its manifests earlier when that delay is shorter
        than the one they were queued with."""
        result = RetentionRun(app, dry_run)
        stored = self.get_policy(app_id)
        if stored is None:
            return result
        policy = stored.policy
        if dry_run:
            result.tags = self.plan(app, policy)
            result.tags_deleted = len(result.tags)
            return result

        # Planned in a read transaction (a scan of the app's tags must not hold SQLite's write
        # lock); each delete below checks the tag still is what was planned.
        with self._read() as conn:
            planned = self._candidates(conn, app, policy, _now())

        def work(conn: Connection) -> RetentionRun:
            now = _now()
            done = RetentionRun(app, dry_run)
            r = s.repositories
            delay = self.review_delay if policy.untagged_after is None else policy.untagged_after
            untagged: list[tuple[int, str]] = []
            for tag in planned:
                repo_id = conn.execute(
                    select(r.c.id).where(r.c.name == tag.repository)
                ).scalar_one()
                gone = conn.execute(
                    delete(_t).where(
                        _t.c.repository_id == repo_id,
                        _t.c.name == tag.tag,
                        _t.c.manifest_digest == tag.digest,
                        _t.c.updated_at == tag.pushed_at,
                    )
                ).rowcount
                if gone:
                    done.tags_deleted += 1
                    untagged.append((int(repo_id), tag.digest))
                    if len(done.tags) < LISTED:
                        done.tags.append(tag)
            enqueue_manifests(conn, untagged, "retention", delay, now)
            if policy.untagged_after is not None:
                done.reviews_advanced = self._advance_reviews(conn, app, policy.untagged_after, now)
            conn.execute(
                update(_r)
                .where(_r.c.app_id == app_id)
                .values(last_run_at=now, tags_deleted=_r.c.tags_deleted + done.tags_deleted)
            )
            return done

        return self._transaction(work, conflicts=True)

    @staticmethod
    def _advance_reviews(conn: Connection, app: str, untagged_after: int, now: datetime) -> int:
        """Queued reviews of `app`'s manifests that were queued with a longer delay than
        `untagged_after`: due `untagged_after` after their last event instead."""
        rows = conn.execute(
            select(_mr.c.repository_id, _mr.c.digest, _mr.c.review_after, _mr.c.updated_at)
            .where(
                _mr.c.repository_id.in_(app_repositories(app)),
                _mr.c.review_after > now,
                _mr.c.attempts == 0,
            )
            .order_by(_mr.c.review_after)
            .limit(REVIEWS_PER_RUN)
        ).all()
        moved = 0
        for repo_id, digest, review_after, updated_at in rows:
            due = _aware(updated_at) + timedelta(seconds=untagged_after)
            if due < _aware(review_after):
                moved += conn.execute(
                    update(_mr)
                    .where(
                        _mr.c.repository_id == repo_id,
                        _mr.c.digest == digest,
                        _mr.c.review_after == review_after,
                    )
                    .values(review_after=due)
                ).rowcount
        return moved


def forget_pulls(conn: Connection, repository_id: int, digests: Iterable[str]) -> None:
    """Drop the pull times of manifests that were deleted."""
    ds = sorted(set(digests))
    if ds:
        conn.execute(delete(_p).where(_p.c.repository_id == repository_id, _p.c.digest.in_(ds)))
