"""The audit log: one appended row per mutating management API call and registry action.

Rows are written after the action answered (its HTTP status is the result), on a database
thread, never updated; `expire` deletes rows older than the retention. Each row belongs to the
org whose thing was acted on, found from what the request named (`AuditEntry.names`: an org, an
app, a machine, a build, a builder, a token or a repository), unless the caller's token is of
another org (then to the caller's org: an attempt on another org's things is the attempter's
record), else the caller's org; a row with neither (an admin creating an org, say) has no org
and is listed to admins only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, select

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

MAX_PAGE = 1000
MAX_TARGET = 1000
_a = s.audit_log


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AuditEntry:
    """What one call did. `names`: what it acted on, by kind ("org", "app", "repository",
    "machine", "build", "builder", "token"), from which its org is found."""

    action: str
    target: str
    client: str
    status: int
    actor_id: str | None = None
    actor_name: str | None = None
    actor_kind: str | None = None
    actor_org_id: int | None = None
    names: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    org: str | None
    actor_id: str | None
    actor_name: str | None
    actor_kind: str | None
    action: str
    target: str
    client: str
    status: int


def _org_of(conn: Connection, names: Mapping[str, str]) -> int | None:
    """The org of the first thing `names` names that exists."""
    lookups: list[tuple[str, Any]] = [
        ("org", select(s.orgs.c.id).where(s.orgs.c.name == names.get("org"))),
        ("app", select(s.apps.c.org_id).where(s.apps.c.name == names.get("app"))),
        (
            "repository",
            select(s.apps.c.org_id).where(
                s.apps.c.name == names.get("repository", "").split("/", 1)[0]
            ),
        ),
        (
            "machine",
            select(s.apps.c.org_id)
            .select_from(s.machines.join(s.apps, s.apps.c.id == s.machines.c.app_id))
            .where(s.machines.c.id == names.get("machine")),
        ),
        ("build", select(s.builds.c.org_id).where(s.builds.c.id == names.get("build"))),
        ("builder", select(s.builders.c.org_id).where(s.builders.c.id == names.get("builder"))),
        ("token", select(s.tokens.c.org_id).where(s.tokens.c.id == names.get("token"))),
    ]
    for kind, query in lookups:
        if names.get(kind):
            found = conn.execute(query).scalar()
            if found is not None:
                return int(found)
    return None


class AuditMeta(SqlStore):
    """Appending to and reading the audit log."""

    def record(self, entry: AuditEntry) -> None:
        def work(conn: Connection) -> None:
            org_id = _org_of(conn, entry.names)
            if org_id is None or (entry.actor_org_id is not None and entry.actor_org_id != org_id):
                # A token of another org (refused, as it may not act there) is its own org's
                # entry: neither org learns the other's token or things from its log.
                org_id = entry.actor_org_id
            conn.execute(
                _a.insert().values(
                    at=_now(),
                    org_id=org_id,
                    actor_id=entry.actor_id,
                    actor_name=(entry.actor_name or "")[:100] or None,
                    actor_kind=entry.actor_kind,
                    action=entry.action[:64],
                    target=entry.target[:MAX_TARGET],
                    client=entry.client[:64],
                    status=entry.status,
                )
            )

        self._transaction(work)

    def entries(
        self,
        org_id: int | None,
        *,
        all_orgs: bool = False,
        since: datetime | None = None,
        after: int = 0,
        limit: int = MAX_PAGE,
        before: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        """Entries of `org_id` (with `all_orgs`: of every org and of none), oldest first
        (`newest_first`: newest first), with ids above `after` and below `before`, at most
        `limit`."""
        query = (
            select(_a, s.orgs.c.name)
            .select_from(_a.outerjoin(s.orgs, s.orgs.c.id == _a.c.org_id))
            .where(_a.c.id > after)
            .order_by(_a.c.id.desc() if newest_first else _a.c.id)
            .limit(min(limit, MAX_PAGE))
        )
        if before is not None:
            query = query.where(_a.c.id < before)
        if not all_orgs:
            query = query.where(_a.c.org_id == org_id)
        if since is not None:
            query = query.where(_a.c.at >= since)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            AuditRecord(
                id=int(r.id),
                at=_aware(r.at),
                org=r.name,
                actor_id=r.actor_id,
                actor_name=r.actor_name,
                actor_kind=r.actor_kind,
                action=r.action,
                target=r.target,
                client=r.client,
                status=int(r.status),
            )
            for r in rows
        ]

    def expire(self, keep: timedelta, batch: int = 10_000) -> int:
        """Delete entries older than `keep`; the rows deleted (at most `batch`)."""

        def work(conn: Connection) -> int:
            old = select(_a.c.id).where(_a.c.at < _now() - keep).order_by(_a.c.id).limit(batch)
            ids = [row[0] for row in conn.execute(old)]
            if ids:
                conn.execute(delete(_a).where(_a.c.id.in_(ids)))
            return len(ids)

        return self._transaction(work)
