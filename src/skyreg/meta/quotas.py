"""Quotas per org: a soft (warning) and a hard limit on the bytes an org's repositories hold.

Usage is counted once per unique blob an org holds: the sizes of the distinct blobs linked
from any repository of any of its apps (`repository_blobs`), whoever else holds them too; plus
the bytes of its manifests (stored in the database, once per repository holding one: up to
4 MiB each, so they count). Usage is computed from the links whenever it is asked for, so it
drops as soon as a link goes (a blob DELETE, or GC unlinking what nothing references) and a
check never reads a stale figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, delete, exists, func, select
from sqlalchemy.dialects import postgresql, sqlite

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.retention import app_of

_q, _links = s.org_quotas, s.repository_blobs
MAX_BYTES = 2**63 - 1

QuotaState = Literal["ok", "soft", "hard"]


class QuotaInvalid(ValueError):
    """Limits that cannot be kept (the message says why)."""


@dataclass(frozen=True)
class Quota:
    """Limits in bytes; None: no such limit."""

    soft: int | None = None
    hard: int | None = None

    def __post_init__(self) -> None:
        for name in ("soft", "hard"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_BYTES:
                raise QuotaInvalid(f"the {name} limit is 0 to {MAX_BYTES} bytes")
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise QuotaInvalid("the soft limit cannot be above the hard limit")

    def state(self, used: int) -> QuotaState:
        if self.hard is not None and used > self.hard:
            return "hard"
        if self.soft is not None and used > self.soft:
            return "soft"
        return "ok"


@dataclass(frozen=True)
class OrgUsage:
    """What an org holds (`bytes`: its unique blobs and its manifests; `blobs`: how many
    unique blobs), and its limits (None: no quota)."""

    org: str
    bytes: int
    blobs: int
    quota: Quota | None

    @property
    def state(self) -> QuotaState:
        return "ok" if self.quota is None else self.quota.state(self.bytes)


@dataclass(frozen=True)
class QuotaCheck:
    """An org's usage before a write, and what the write adds (0: the org already holds it)."""

    org: str
    used: int
    adding: int
    quota: Quota

    @property
    def after(self) -> int:
        return self.used + self.adding

    @property
    def over_hard(self) -> bool:
        return self.quota.hard is not None and self.after > self.quota.hard

    @property
    def over_soft(self) -> bool:
        return self.quota.soft is not None and self.after > self.quota.soft


def _org_repositories(conn: Connection, org_id: int) -> Any:
    """SQL: ids of the repositories of every app of the org (`app` and `app/...`)."""
    r, a = s.repositories, s.apps
    slash, zero = a.c.name + "/", a.c.name + "0"
    if conn.dialect.name == "postgresql":  # compare in the name index's collation (C)
        slash, zero = slash.collate("C"), zero.collate("C")
    return (
        select(r.c.id)
        .select_from(a.join(r, (r.c.name == a.c.name) | ((r.c.name > slash) & (r.c.name < zero))))
        .where(a.c.org_id == org_id)
    )


class QuotaMeta(SqlStore):
    """Org quotas and usage over the shared Database."""

    def set_quota(self, org_id: int, quota: Quota | None) -> None:
        """Store (or, with None, remove) an org's limits."""
        with self._write() as conn:
            if quota is None or (quota.soft is None and quota.hard is None):
                conn.execute(delete(_q).where(_q.c.org_id == org_id))
                return
            values = {
                "soft_bytes": quota.soft,
                "hard_bytes": quota.hard,
                "updated_at": datetime.now(UTC),
            }
            stmt: Any = (
                postgresql.insert(_q) if self._dialect == "postgresql" else sqlite.insert(_q)
            ).values(org_id=org_id, **values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["org_id"], set_=values))

    def get_quota(self, org_id: int) -> Quota | None:
        """The org's limits (None: no quota), without its usage."""
        with self._read() as conn:
            return self._quota(conn, org_id)

    @staticmethod
    def _quota(conn: Connection, org_id: int) -> Quota | None:
        row = conn.execute(
            select(_q.c.soft_bytes, _q.c.hard_bytes).where(_q.c.org_id == org_id)
        ).first()
        return None if row is None else Quota(row[0], row[1])

    @staticmethod
    def _usage(conn: Connection, org_id: int) -> tuple[int, int]:
        held = (
            select(_links.c.digest)
            .where(_links.c.repository_id.in_(_org_repositories(conn, org_id)))
            .distinct()
            .subquery()
        )
        total, count = conn.execute(
            select(func.coalesce(func.sum(s.blobs.c.size), 0), func.count()).select_from(
                held.join(s.blobs, s.blobs.c.digest == held.c.digest)
            )
        ).one()
        manifests = conn.execute(
            select(func.coalesce(func.sum(s.manifests.c.size), 0)).where(
                s.manifests.c.repository_id.in_(_org_repositories(conn, org_id))
            )
        ).scalar_one()
        return int(total) + int(manifests), int(count)

    def usage(self, org_id: int) -> OrgUsage:
        """The org's usage (bytes and blobs) and limits."""
        with self._read() as conn:
            name = conn.execute(select(s.orgs.c.name).where(s.orgs.c.id == org_id)).scalar_one()
            used, blobs = self._usage(conn, org_id)
            return OrgUsage(str(name), used, blobs, self._quota(conn, org_id))

    def quota_for(self, repository: str) -> tuple[int, str, Quota] | None:
        """(org id, org name, limits) of the org owning `repository` (its app's org), or None
        when it has no quota (or no app owns the repository). One indexed query."""
        a, o = s.apps, s.orgs
        with self._read() as conn:
            row = conn.execute(
                select(o.c.id, o.c.name, _q.c.soft_bytes, _q.c.hard_bytes)
                .select_from(a.join(o, o.c.id == a.c.org_id).join(_q, _q.c.org_id == o.c.id))
                .where(a.c.name == app_of(repository))
            ).first()
        return None if row is None else (int(row[0]), str(row[1]), Quota(row[2], row[3]))

    def org_usage(self, org_id: int) -> tuple[int, int]:
        """(bytes, blobs) the org holds: a walk over its links (costly for a large org;
        `registry/quotas.py` shares and caches it)."""
        with self._read() as conn:
            return self._usage(conn, org_id)

    def holds(self, org_id: int, digest: str) -> bool:
        """Whether a repository of the org links `digest` (by the digest index)."""
        with self._read() as conn:
            return bool(
                conn.execute(
                    select(
                        exists().where(
                            _links.c.digest == digest,
                            _links.c.repository_id.in_(_org_repositories(conn, org_id)),
                        )
                    )
                ).scalar_one()
            )
