"""Machine records: which machines run which release where, what agents report about them.

The server decides `desired` (started/stopped) and `generation` (a restart bumps it); the region's
agent reports `state` and `exit_code`, events and log lines. `reconcile_release` turns the states
of a release's machines into the release's status.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

DESIRED = ("started", "stopped")
STATES = ("created", "starting", "started", "stopped", "failed")
MAX_LINE = 4096


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def new_machine_id() -> str:
    """14 hex digits, like Fly.io machine ids."""
    return secrets.token_hex(7)


@dataclass(frozen=True, slots=True)
class Machine:
    id: str
    app_id: int
    app_name: str
    org_id: int
    release_id: int
    release_version: int
    region: str
    desired: str
    state: str
    generation: int
    exit_code: int | None
    image_repository: str
    image_digest: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class MachineEvent:
    machine_id: str
    at: datetime
    message: str
    duration_ms: int | None


@dataclass(frozen=True, slots=True)
class LogLine:
    id: int
    machine_id: str
    region: str
    at: datetime
    line: str


_m, _r, _a = s.machines, s.releases, s.apps
_COLUMNS = (
    _m.c.id,
    _m.c.app_id,
    _a.c.name,
    _a.c.org_id,
    _m.c.release_id,
    _r.c.version,
    _m.c.region,
    _m.c.desired,
    _m.c.state,
    _m.c.generation,
    _m.c.exit_code,
    _r.c.image_repository,
    _r.c.image_digest,
    _m.c.created_at,
    _m.c.updated_at,
)
_FROM = _m.join(_r, _r.c.id == _m.c.release_id).join(_a, _a.c.id == _m.c.app_id)


def _machine(row: Any) -> Machine:
    return Machine(
        id=str(row[0]),
        app_id=int(row[1]),
        app_name=str(row[2]),
        org_id=int(row[3]),
        release_id=int(row[4]),
        release_version=int(row[5]),
        region=str(row[6]),
        desired=str(row[7]),
        state=str(row[8]),
        generation=int(row[9]),
        exit_code=None if row[10] is None else int(row[10]),
        image_repository=str(row[11]),
        image_digest=str(row[12]),
        created_at=_aware(row[13]),
        updated_at=_aware(row[14]),
    )


class MachineMeta(SqlStore):
    """Queries and updates of machines, their events and logs, and release status from them."""

    # -- machines -------------------------------------------------------------------------------

    def create_for_release(
        self, release_id: int, app_id: int, regions: list[str], count: int, strategy: str
    ) -> list[str]:
        """`count` machines per region (desired started) for a release, which becomes `running`.

        With `immediate`, every other machine of the app is set desired=stopped at once; with
        `rolling` they keep running until the new release completes (`reconcile_release`).
        """
        now = _now()
        ids = [new_machine_id() for _ in regions for _ in range(count)]
        rows = [
            {
                "id": ids[i * count + j],
                "app_id": app_id,
                "release_id": release_id,
                "region": region,
                "desired": "started",
                "state": "created",
                "generation": 1,
                "exit_code": None,
                "created_at": now,
                "updated_at": now,
            }
            for i, region in enumerate(regions)
            for j in range(count)
        ]

        def work(conn: Connection) -> None:
            self._lock_release(conn, release_id)
            conn.execute(insert(_m), rows)
            if strategy == "immediate":
                self._stop_others(conn, app_id, release_id, now)
            conn.execute(
                update(_r).where(_r.c.id == release_id).values(status="running", updated_at=now)
            )

        self._transaction(work)
        return ids

    @staticmethod
    def _stop_others(conn: Connection, app_id: int, release_id: int, now: datetime) -> None:
        conn.execute(
            update(_m)
            .where(_m.c.app_id == app_id, _m.c.release_id != release_id, _m.c.desired == "started")
            .values(desired="stopped", updated_at=now)
        )

    def get(self, machine_id: str) -> Machine | None:
        with self._read() as conn:
            row = conn.execute(select(*_COLUMNS).select_from(_FROM).where(_m.c.id == machine_id))
            found = row.first()
        return None if found is None else _machine(found)

    def in_region(self, region: str, org_id: int | None = None) -> list[Machine]:
        """The region's machines desired `started`: what its agent must run (any other it runs,
        it stops)."""
        query = (
            select(*_COLUMNS)
            .select_from(_FROM)
            .where(_m.c.region == region, _m.c.desired == "started")
        )
        if org_id is not None:
            query = query.where(_a.c.org_id == org_id)
        with self._read() as conn:
            return [_machine(r) for r in conn.execute(query.order_by(_m.c.created_at, _m.c.id))]

    def of_app(self, app_id: int) -> list[Machine]:
        query = select(*_COLUMNS).select_from(_FROM).where(_m.c.app_id == app_id)
        with self._read() as conn:
            return [_machine(r) for r in conn.execute(query.order_by(_m.c.created_at, _m.c.id))]

    def set_desired(self, machine_id: str, desired: str, *, bump: bool = False) -> None:
        values: dict[str, Any] = {"desired": desired, "updated_at": _now()}
        if bump:
            values["generation"] = _m.c.generation + 1
        with self._write() as conn:
            conn.execute(update(_m).where(_m.c.id == machine_id).values(**values))

    def report_state(self, machine_id: str, state: str, exit_code: int | None) -> None:
        """An agent's report; the machine's release status follows (`reconcile_release`)."""

        def work(conn: Connection) -> None:
            now = _now()
            release_id = conn.execute(
                select(_m.c.release_id).where(_m.c.id == machine_id)
            ).scalar_one_or_none()
            if release_id is None:
                return
            # Reports on one release queue on its row (before touching their machine, so they
            # never wait for each other crosswise): each reconciles with the others' states.
            self._lock_release(conn, int(release_id))
            conn.execute(
                update(_m)
                .where(_m.c.id == machine_id)
                .values(state=state, exit_code=exit_code, updated_at=now)
            )
            self._reconcile(conn, int(release_id), now)

        self._transaction(work)

    def reconcile_release(self, release_id: int) -> None:
        def work(conn: Connection) -> None:
            self._lock_release(conn, release_id)
            self._reconcile(conn, release_id, _now())

        self._transaction(work)

    def _lock_release(self, conn: Connection, release_id: int) -> None:
        if self._locks:
            conn.execute(
                select(_r.c.id).where(_r.c.id == release_id).with_for_update(key_share=True)
            )

    def _reconcile(self, conn: Connection, release_id: int, now: datetime) -> None:
        """running → failed (a machine failed: its machines are stopped, a rolling deploy's
        previous machines were never stopped) or complete (all started: stable; the app's
        other machines are stopped). The caller holds the release's row (`_lock_release`)."""
        release = conn.execute(
            select(_r.c.status, _r.c.app_id).where(_r.c.id == release_id)
        ).first()
        if release is None or release[0] not in ("pending", "running"):
            return
        states = [
            r[0] for r in conn.execute(select(_m.c.state).where(_m.c.release_id == release_id))
        ]
        if not states:
            return
        if "failed" in states:
            conn.execute(
                update(_r).where(_r.c.id == release_id).values(status="failed", updated_at=now)
            )
            conn.execute(
                update(_m)
                .where(_m.c.release_id == release_id)
                .values(desired="stopped", updated_at=now)
            )
        elif all(state == "started" for state in states):
            conn.execute(
                update(_r)
                .where(_r.c.id == release_id)
                .values(status="complete", stable=True, updated_at=now)
            )
            self._stop_others(conn, int(release[1]), release_id, now)

    # -- events and logs -------------------------------------------------------------------------

    def add_event(self, machine_id: str, message: str, duration_ms: int | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                insert(s.machine_events).values(
                    machine_id=machine_id, at=_now(), message=message, duration_ms=duration_ms
                )
            )

    def events(self, machine_id: str, limit: int = 20) -> list[MachineEvent]:
        """The machine's newest `limit` events, oldest first."""
        e = s.machine_events
        with self._read() as conn:
            rows = conn.execute(
                select(e.c.machine_id, e.c.at, e.c.message, e.c.duration_ms)
                .where(e.c.machine_id == machine_id)
                .order_by(e.c.id.desc())
                .limit(limit)
            ).all()
        return [MachineEvent(str(r[0]), _aware(r[1]), str(r[2]), r[3]) for r in reversed(rows)]

    def add_logs(self, machine_id: str, lines: list[str]) -> None:
        if not lines:
            return
        now = _now()
        with self._write() as conn:
            conn.execute(
                insert(s.machine_logs),
                [{"machine_id": machine_id, "at": now, "line": ln[:MAX_LINE]} for ln in lines],
            )

    def logs(self, app_id: int, after: int = 0, limit: int = 1000) -> list[LogLine]:
        """Log lines of the app's machines with ids above `after`, oldest first."""
        lg = s.machine_logs
        with self._read() as conn:
            rows = conn.execute(
                select(lg.c.id, lg.c.machine_id, _m.c.region, lg.c.at, lg.c.line)
                .select_from(lg.join(_m, _m.c.id == lg.c.machine_id))
                .where(_m.c.app_id == app_id, lg.c.id > after)
                .order_by(lg.c.id)
                .limit(limit)
            ).all()
        return [LogLine(int(r[0]), str(r[1]), str(r[2]), _aware(r[3]), str(r[4])) for r in rows]
