"""Layer indexes for lazy pull: which layer blobs have one (made once per digest), and why
others have none. The index documents themselves are blobs of the store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, delete, select

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

_l = s.layer_indexes
DONE = "done"
UNINDEXABLE = "unindexable"
FAILED = "failed"
MAX_REASON = 500


@dataclass(frozen=True)
class LayerIndexRecord:
    """A layer's index blobs (`state` done), or why it has none."""

    layer_digest: str
    state: str
    index_digest: str | None = None
    index_size: int | None = None
    points_digest: str | None = None
    points_size: int | None = None
    reason: str | None = None


class LayerIndexMeta(SqlStore):
    """Reading and recording layer indexes."""

    def find(self, digests: Iterable[str]) -> dict[str, LayerIndexRecord]:
        """The records of those of `digests` that have one."""
        wanted = sorted(set(digests))
        found: dict[str, LayerIndexRecord] = {}
        with self._read() as conn:
            for start in range(0, len(wanted), 500):
                rows = conn.execute(
                    select(
                        _l.c.layer_digest, _l.c.state, _l.c.index_digest, _l.c.index_size,
                        _l.c.points_digest, _l.c.points_size, _l.c.reason,
                    ).where(_l.c.layer_digest.in_(wanted[start : start + 500]))
                ).all()  # fmt: skip
                for r in rows:
                    found[r[0]] = LayerIndexRecord(
                        r[0], r[1], r[2], None if r[3] is None else int(r[3]), r[4],
                        None if r[5] is None else int(r[5]), r[6],
                    )  # fmt: skip
        return found

    def record(self, record: LayerIndexRecord) -> None:
        """Keep a layer's record, replacing an older one (whose blobs were collected)."""

        def work(conn: Connection) -> None:
            conn.execute(delete(_l).where(_l.c.layer_digest == record.layer_digest))
            conn.execute(
                _l.insert().values(
                    layer_digest=record.layer_digest,
                    state=record.state,
                    index_digest=record.index_digest,
                    index_size=record.index_size,
                    points_digest=record.points_digest,
                    points_size=record.points_size,
                    reason=None if record.reason is None else record.reason[:MAX_REASON],
                    created_at=datetime.now(UTC),
                )
            )

        self._transaction(work, conflicts=True)
