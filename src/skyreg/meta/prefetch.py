"""Learned prefetch lists for lazy pull: per manifest of a repository, the ranges of its layers
its machines read first, as an agent last reported them (`lazy/prefetch.py`). A list goes with
its manifest (the foreign key cascades)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, and_, delete, select

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

_p, _m, _r = s.image_prefetch, s.manifests, s.repositories


@dataclass(frozen=True)
class PrefetchRecord:
    """A manifest's prefetch list: `ranges` is its JSON text, as the service encoded it."""

    repository: str
    digest: str
    ranges: str
    range_count: int
    bytes: int
    reported_at: datetime


class PrefetchMeta(SqlStore):
    """Reading and replacing prefetch lists."""

    def get(self, repository: str, digest: str) -> PrefetchRecord | None:
        """The list of manifest `digest` of `repository`, if one was reported."""
        with self._read() as conn:
            row = conn.execute(
                select(_p.c.ranges, _p.c.range_count, _p.c.bytes, _p.c.reported_at)
                .select_from(_p.join(_r, _r.c.id == _p.c.repository_id))
                .where(_r.c.name == repository, _p.c.digest == digest)
            ).first()
        if row is None:
            return None
        return PrefetchRecord(repository, digest, str(row[0]), int(row[1]), int(row[2]), row[3])

    def replace(
        self, repository: str, digest: str, ranges: str, range_count: int, size: int
    ) -> PrefetchRecord | None:
        """Keep `ranges` as the list of manifest `digest` of `repository` (the latest report
        wins); None when the repository holds no such manifest."""

        def work(conn: Connection) -> PrefetchRecord | None:
            query = (
                select(_m.c.repository_id)
                .select_from(_m.join(_r, _r.c.id == _m.c.repository_id))
                .where(_r.c.name == repository, _m.c.digest == digest)
            )
            if self._locks:  # a concurrent delete of the manifest waits for this commit
                query = query.with_for_update(key_share=True, of=_m)
            repository_id = conn.execute(query).scalar_one_or_none()
            if repository_id is None:
                return None
            key = and_(_p.c.repository_id == repository_id, _p.c.digest == digest)
            conn.execute(delete(_p).where(key))
            now = datetime.now(UTC)
            conn.execute(
                _p.insert().values(
                    repository_id=repository_id,
                    digest=digest,
                    ranges=ranges,
                    range_count=range_count,
                    bytes=size,
                    reported_at=now,
                )
            )
            return PrefetchRecord(repository, digest, ranges, range_count, size, now)

        return self._transaction(work, conflicts=True)
