"""Builders and builds: the queue `skyreg deploy` puts Dockerfile builds on, and their logs.

A builder (`skyreg builder`) registers with its region, the org it serves (None: every org) and
a public key; every poll refreshes its `last_seen`. A build is queued for one builder when it is
created (its secrets are sealed to that builder's key by the client, so only that builder can
open them), claimed by it (`running`; the sealed secrets are dropped from the row in the same
transaction), and ends `succeeded`, `failed` or `cancelled`. Logs are numbered lines, bounded
per build. What ends a build without its builder (`expire`): its deadline, its builder silent
for `BUILDER_GONE` seconds, or (queued) its client gone for `CLIENT_GONE` seconds. A running
build whose client is gone, or that someone cancelled, is told to stop at its builder's next
log report (`append_logs` answers `stop`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update
from sqlalchemy.engine import Row

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

_b, _bd, _l = s.builders, s.builds, s.build_logs

BUILDER_GONE = 60.0  # seconds without a poll before a builder's builds fail
CLIENT_GONE = 30.0  # seconds without the client following a build before it is cancelled
CLIENT_SEEN_EVERY = 5.0  # seconds: how often following a build writes that the client is there
MAX_LOG_LINES = 20_000  # per build; later lines are dropped (one line says so)
MAX_LOG_BYTES = 4 << 20  # per build (a row's log_bytes past it: its log was cut)
TRUNCATED = "[skyreg] the build log is longer than the server keeps; later lines are dropped"
ACTIVE = ("queued", "running")
TIMED_OUT = "the build took longer than its timeout"
CLIENT_LEFT = "the client stopped following the build"
ENDED = ("succeeded", "failed", "cancelled")


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Builder:
    id: str
    name: str
    region: str
    org_id: int | None
    public_key: str
    token_id: str
    registered_at: datetime
    last_seen: datetime

    def live(self, now: datetime) -> bool:
        return (now - self.last_seen).total_seconds() < BUILDER_GONE


@dataclass(frozen=True)
class Build:
    """One build's row (`sealed_secrets` only as claimed, else None)."""

    id: str
    org_id: int
    app_id: int
    status: str
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    builder_id: str
    region: str
    context_digest: str
    context_size: int
    dockerfile: str
    target: str | None
    platform: str | None
    build_args: dict[str, str]
    secret_ids: list[str]
    no_cache: bool
    image_label: str
    image_digest: str | None
    steps: list[dict[str, Any]]
    error: str | None
    cancel_requested: bool
    deadline: datetime
    credential_id: str | None
    log_lines: int
    sealed_secrets: dict[str, str] | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class NewBuild:
    """What a build is created with."""

    id: str
    org_id: int
    app_id: int
    created_by: str
    builder_id: str
    region: str
    context_digest: str
    context_size: int
    dockerfile: str
    target: str | None
    platform: str | None
    build_args: dict[str, str]
    secret_ids: list[str]
    sealed_secrets: dict[str, str] | None
    no_cache: bool
    image_label: str
    timeout: float


@dataclass(frozen=True)
class LogPage:
    lines: list[tuple[int, str]]
    status: str


def _builder(row: Row[Any]) -> Builder:
    return Builder(
        id=row.id,
        name=row.name,
        region=row.region,
        org_id=row.org_id,
        public_key=row.public_key,
        token_id=row.token_id,
        registered_at=_aware(row.registered_at) or _now(),
        last_seen=_aware(row.last_seen) or _now(),
    )


_BUILD_COLUMNS = [c for c in _bd.c if c.name not in ("sealed_secrets", "client_seen_at")]


def _build(row: Row[Any], sealed: str | None = None) -> Build:
    return Build(
        id=row.id,
        org_id=row.org_id,
        app_id=row.app_id,
        status=row.status,
        created_by=row.created_by,
        created_at=_aware(row.created_at) or _now(),
        started_at=_aware(row.started_at),
        finished_at=_aware(row.finished_at),
        builder_id=row.builder_id,
        region=row.region,
        context_digest=row.context_digest,
        context_size=row.context_size,
        dockerfile=row.dockerfile,
        target=row.target,
        platform=row.platform,
        build_args=json.loads(row.build_args),
        secret_ids=json.loads(row.secret_ids),
        no_cache=bool(row.no_cache),
        image_label=row.image_label,
        image_digest=row.image_digest,
        steps=json.loads(row.steps) if row.steps else [],
        error=row.error,
        cancel_requested=bool(row.cancel_requested),
        deadline=_aware(row.deadline) or _now(),
        credential_id=row.credential_id,
        log_lines=row.log_lines,
        sealed_secrets=None if sealed is None else json.loads(sealed),
    )


class BuildMeta(SqlStore):
    """Builders, builds and build logs over the shared Database."""

    # -- builders -------------------------------------------------------------------------------

    def register_builder(
        self,
        builder_id: str,
        *,
        name: str,
        region: str,
        org_id: int | None,
        public_key: str,
        token_id: str,
    ) -> Builder:
        now = _now()
        with self._write() as conn:
            conn.execute(
                _b.insert().values(
                    id=builder_id,
                    name=name,
                    region=region,
                    org_id=org_id,
                    public_key=public_key,
                    token_id=token_id,
                    registered_at=now,
                    last_seen=now,
                )
            )
            row = conn.execute(select(_b).where(_b.c.id == builder_id)).one()
        return _builder(row)

    def get_builder(self, builder_id: str) -> Builder | None:
        with self._read() as conn:
            row = conn.execute(select(_b).where(_b.c.id == builder_id)).first()
        return None if row is None else _builder(row)

    def builders_for(self, org_id: int) -> list[Builder]:
        """Live builders that take the org's builds: its own first, then shared ones."""
        since = _now() - timedelta(seconds=BUILDER_GONE)
        with self._read() as conn:
            rows = conn.execute(
                select(_b)
                .where(_b.c.last_seen > since, or_(_b.c.org_id == org_id, _b.c.org_id.is_(None)))
                .order_by(_b.c.org_id.is_(None), _b.c.last_seen.desc())
                .limit(1000)
            ).all()
        return [_builder(r) for r in rows]

    def queued_per_builder(self, builder_ids: list[str]) -> dict[str, int]:
        """How many builds each builder has queued or running."""
        if not builder_ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                select(_bd.c.builder_id, func.count())
                .where(_bd.c.builder_id.in_(builder_ids), _bd.c.status.in_(ACTIVE))
                .group_by(_bd.c.builder_id)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    def live_builders_of(self, org_id: int) -> int:
        """How many builders an org token registered that polled within BUILDER_GONE."""
        since = _now() - timedelta(seconds=BUILDER_GONE)
        with self._read() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(_b)
                    .where(_b.c.org_id == org_id, _b.c.last_seen > since)
                ).scalar_one()
            )

    def active_builds_of(self, org_id: int) -> int:
        """How many of an org's builds are queued or running."""
        with self._read() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(_bd)
                    .where(_bd.c.org_id == org_id, _bd.c.status.in_(ACTIVE))
                ).scalar_one()
            )

    def list_builders(self) -> list[Builder]:
        with self._read() as conn:
            rows = conn.execute(select(_b).order_by(_b.c.registered_at).limit(1000)).all()
        return [_builder(r) for r in rows]

    # -- builds ---------------------------------------------------------------------------------

    def create_build(self, new: NewBuild) -> Build:
        now = _now()
        with self._write() as conn:
            conn.execute(
                _bd.insert().values(
                    id=new.id,
                    org_id=new.org_id,
                    app_id=new.app_id,
                    status="queued",
                    created_by=new.created_by,
                    created_at=now,
                    builder_id=new.builder_id,
                    region=new.region,
                    context_digest=new.context_digest,
                    context_size=new.context_size,
                    dockerfile=new.dockerfile,
                    target=new.target,
                    platform=new.platform,
                    build_args=json.dumps(new.build_args, sort_keys=True),
                    secret_ids=json.dumps(new.secret_ids),
                    sealed_secrets=None
                    if new.sealed_secrets is None
                    else json.dumps(new.sealed_secrets),
                    no_cache=new.no_cache,
                    image_label=new.image_label,
                    cancel_requested=False,
                    client_seen_at=now,
                    deadline=now + timedelta(seconds=new.timeout),
                    log_lines=0,
                    log_bytes=0,
                )
            )
            return self._get(conn, new.id)

    @staticmethod
    def _get(conn: Connection, build_id: str) -> Build:
        return _build(conn.execute(select(*_BUILD_COLUMNS).where(_bd.c.id == build_id)).one())

    def get_build(self, build_id: str) -> Build | None:
        with self._read() as conn:
            row = conn.execute(select(*_BUILD_COLUMNS).where(_bd.c.id == build_id)).first()
        return None if row is None else _build(row)

    def list_builds(self, app_id: int, limit: int) -> list[Build]:
        with self._read() as conn:
            rows = conn.execute(
                select(*_BUILD_COLUMNS)
                .where(_bd.c.app_id == app_id)
                .order_by(_bd.c.created_at.desc(), _bd.c.id.desc())
                .limit(limit)
            ).all()
        return [_build(r) for r in rows]

    def claim(self, builder_id: str, token_id: str) -> tuple[Build | None, bool]:
        """The builder polls: refresh its `last_seen` and hand it its next queued build (now
        running, with its sealed secrets, which leave the row). Returns (build, known): known is
        False for a builder id this token did not register."""
        now = _now()

        def work(conn: Connection) -> tuple[Build | None, bool]:
            touched = conn.execute(
                update(_b)
                .where(_b.c.id == builder_id, _b.c.token_id == token_id)
                .values(last_seen=now)
            ).rowcount
            if not touched:
                return None, False
            query = (
                select(_bd.c.id, _bd.c.org_id)
                .where(_bd.c.builder_id == builder_id, _bd.c.status == "queued")
                .order_by(_bd.c.created_at, _bd.c.id)
                .limit(100)
            )
            if self._locks:
                query = query.with_for_update(skip_locked=True)
            queued = conn.execute(query).all()
            if not queued:
                return None, True
            # Per org fairness: an org with fewer builds running goes first, then the oldest.
            running: dict[int, int] = dict(
                conn.execute(
                    select(_bd.c.org_id, func.count())
                    .where(
                        _bd.c.status == "running",
                        _bd.c.org_id.in_({r.org_id for r in queued}),
                    )
                    .group_by(_bd.c.org_id)
                ).all()
            )
            chosen = min(enumerate(queued), key=lambda p: (running.get(p[1].org_id, 0), p[0]))[1]
            sealed = conn.execute(
                select(_bd.c.sealed_secrets).where(_bd.c.id == chosen.id)
            ).scalar_one()
            conn.execute(
                update(_bd)
                .where(_bd.c.id == chosen.id, _bd.c.status == "queued")
                .values(status="running", started_at=now, sealed_secrets=None)
            )
            row = conn.execute(select(*_BUILD_COLUMNS).where(_bd.c.id == chosen.id)).one()
            return _build(row, sealed), True

        return self._transaction(work)

    def has_queued(self, builder_id: str) -> bool:
        """Whether a build waits for this builder (a cheap read between claims)."""
        with self._read() as conn:
            return (
                conn.execute(
                    select(_bd.c.id)
                    .where(_bd.c.builder_id == builder_id, _bd.c.status == "queued")
                    .limit(1)
                ).first()
                is not None
            )

    def set_credential(self, build_id: str, token_id: str) -> None:
        with self._write() as conn:
            conn.execute(update(_bd).where(_bd.c.id == build_id).values(credential_id=token_id))

    def append_logs(self, build_id: str, lines: list[str]) -> bool:
        """Append a running build's log lines (bounded per build; past the bound one line says
        so and the rest is dropped). Returns whether the builder should stop the build
        (cancelled, its client gone, past its deadline, or no longer running)."""
        now = _now()

        def work(conn: Connection) -> bool:
            query = select(
                _bd.c.status,
                _bd.c.log_lines,
                _bd.c.log_bytes,
                _bd.c.cancel_requested,
                _bd.c.client_seen_at,
                _bd.c.deadline,
            ).where(_bd.c.id == build_id)
            if self._locks:
                query = query.with_for_update()
            row = conn.execute(query).first()
            if row is None or row.status != "running":
                return True
            count, size = int(row.log_lines), int(row.log_bytes)
            rows: list[dict[str, Any]] = []
            for line in lines:
                if count > MAX_LOG_LINES or size > MAX_LOG_BYTES:
                    break  # cut already: the truncation line is written
                n = len(line.encode("utf-8", errors="replace"))
                if count == MAX_LOG_LINES or size + n > MAX_LOG_BYTES:
                    # `log_lines` stays the last line's seq (readers compare it with what they
                    # read to know they have it all); a size past the bound marks the log cut.
                    count += 1
                    rows.append({"build_id": build_id, "seq": count, "line": TRUNCATED})
                    size = MAX_LOG_BYTES + 1
                    break
                count += 1
                size += n
                rows.append({"build_id": build_id, "seq": count, "line": line})
            if rows:
                conn.execute(_l.insert(), rows)
                conn.execute(
                    update(_bd).where(_bd.c.id == build_id).values(log_lines=count, log_bytes=size)
                )
            # Past the deadline, or nobody follows: the build ends here, with the reason (the
            # builder's own report then finds it ended); cancelled: the builder reports it.
            ended = None
            if now > (_aware(row.deadline) or now):
                ended = ("failed", TIMED_OUT)
            elif (now - (_aware(row.client_seen_at) or now)).total_seconds() > CLIENT_GONE:
                ended = ("cancelled", CLIENT_LEFT)
            if ended is not None:
                conn.execute(
                    update(_bd)
                    .where(_bd.c.id == build_id, _bd.c.status == "running")
                    .values(status=ended[0], error=ended[1], finished_at=now)
                )
                return True
            return bool(row.cancel_requested)

        return self._transaction(work)

    def finish(
        self,
        build_id: str,
        status: str,
        *,
        image_digest: str | None,
        steps: list[dict[str, Any]],
        error: str | None,
    ) -> Build | None:
        """End a running build (None when it is not running: already ended)."""
        assert status in ENDED
        with self._write() as conn:
            done = conn.execute(
                update(_bd)
                .where(_bd.c.id == build_id, _bd.c.status == "running")
                .values(
                    status=status,
                    finished_at=_now(),
                    image_digest=image_digest,
                    steps=json.dumps(steps),
                    error=error,
                )
            ).rowcount
            return self._get(conn, build_id) if done else None

    def request_cancel(self, build_id: str) -> Build:
        """Cancel: a queued build ends at once, a running one stops at its builder's next report."""
        with self._write() as conn:
            conn.execute(
                update(_bd)
                .where(_bd.c.id == build_id, _bd.c.status == "queued")
                .values(
                    status="cancelled", finished_at=_now(), error="cancelled", sealed_secrets=None
                )
            )
            conn.execute(
                update(_bd)
                .where(_bd.c.id == build_id, _bd.c.status == "running")
                .values(cancel_requested=True)
            )
            return self._get(conn, build_id)

    def client_seen(self, build_id: str) -> None:
        """The client follows the build (written at most every CLIENT_SEEN_EVERY seconds)."""
        now = _now()
        with self._write() as conn:
            conn.execute(
                update(_bd)
                .where(
                    _bd.c.id == build_id,
                    _bd.c.status.in_(ACTIVE),
                    _bd.c.client_seen_at < now - timedelta(seconds=CLIENT_SEEN_EVERY),
                )
                .values(client_seen_at=now)
            )

    def logs(self, build_id: str, after: int, limit: int) -> list[tuple[int, str]]:
        with self._read() as conn:
            rows = conn.execute(
                select(_l.c.seq, _l.c.line)
                .where(_l.c.build_id == build_id, _l.c.seq > after)
                .order_by(_l.c.seq)
                .limit(limit)
            ).all()
        return [(int(r[0]), r[1]) for r in rows]

    def expire(self) -> list[tuple[str, str | None]]:
        """End what cannot go on: builds past their deadline, builds of a silent builder, queued
        builds nobody follows. Returns (build id, credential token id) of each build ended."""
        now = _now()
        gone = now - timedelta(seconds=BUILDER_GONE)
        left = now - timedelta(seconds=CLIENT_GONE)

        def work(conn: Connection) -> list[tuple[str, str | None]]:
            silent = select(_b.c.id).where(_b.c.last_seen < gone)
            candidates = [
                (
                    and_(_bd.c.status.in_(ACTIVE), _bd.c.deadline < now),
                    "failed",
                    TIMED_OUT,
                ),
                (
                    and_(_bd.c.status.in_(ACTIVE), _bd.c.builder_id.in_(silent)),
                    "failed",
                    "the builder stopped answering; run the deploy again",
                ),
                (
                    and_(_bd.c.status == "queued", _bd.c.client_seen_at < left),
                    "cancelled",
                    CLIENT_LEFT,
                ),
            ]
            ended: list[tuple[str, str | None]] = []
            for where, status, error in candidates:
                rows = conn.execute(
                    select(_bd.c.id, _bd.c.credential_id).where(where).limit(1000)
                ).all()
                for r in rows:
                    done = conn.execute(
                        update(_bd)
                        .where(_bd.c.id == r.id, _bd.c.status.in_(ACTIVE))
                        .values(status=status, finished_at=now, error=error, sealed_secrets=None)
                    ).rowcount
                    if done:
                        ended.append((r.id, r.credential_id))
            return ended

        return self._transaction(work)
