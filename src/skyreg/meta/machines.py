"""Machine records: which machines run which release where, what agents report about them.

The server decides `desired` (started/stopped, or waiting: a rolling deploy's machine not yet
started) and `generation` (a restart bumps it); the region's agent reports `state`, `exit_code`
and `address`, the health of machines whose release has checks, events and log lines.
`reconcile_release` turns the states and health of a release's machines into the release's
status, and moves a rolling deploy on one machine at a time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, case, delete, func, insert, or_, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore
from skyreg.meta.gc import GcSettings, enqueue_manifests, release_images
from skyreg.meta.platform import stored_service
from skyreg.meta.webhooks import (
    MACHINE_FAILED,
    MACHINE_STARTED,
    RELEASE_COMPLETE,
    RELEASE_FAILED,
    emit_for_app,
)

DESIRED = ("started", "stopped", "waiting")
# Live machines count against an app's limit: started, or waiting their turn in a rolling deploy.
LIVE = ("started", "waiting")
STATES = ("created", "starting", "started", "stopped", "failed")
# Desired stopped and in one of these, no agent runs the machine: it may be deleted. (`created`:
# no agent reported on it; one that fetched it just before the stop gets 404s on its reports and
# stops it at its next poll, as it stops any machine no longer wanted.)
IDLE_STATES = ("created", "stopped", "failed")
MAX_LINE = 4096
IDLE_KEPT_PER_LIVE = 10  # idle machines an app keeps (for their events and logs), per live one
RECORDS_PER_LIVE = 20  # machine rows an app may hold, per live one
HEALTH = ("starting", "passing", "critical")
MAX_ROUTES = 10_000  # machines one answer of `routes` lists


class TooManyMachines(Exception):
    """A release would leave its app with more live machines than allowed."""

    def __init__(self, live: int, wanted: int, limit: int) -> None:
        super().__init__(
            f"the app has {live} live machines; {wanted} more would exceed its limit of {limit}"
        )
        self.live, self.wanted, self.limit = live, wanted, limit


class TooManyMachineRecords(TooManyMachines):
    """A release would leave its app with more machine records than allowed, even after its
    idle machines beyond the kept number were deleted (the rest are running or stopping)."""

    def __init__(self, records: int, wanted: int, limit: int) -> None:
        Exception.__init__(
            self,
            f"the app has {records} machine records; {wanted} more would exceed its limit of "
            f"{limit} machine records (stop its machines and let their agents report them "
            "stopped, then deploy again)",
        )
        self.live, self.wanted, self.limit = records, wanted, limit


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
    address: str | None = None
    health: str | None = None  # None: its release has no checks
    org_name: str = ""
    service: dict[str, Any] | None = None  # its release's


def has_checks(service: dict[str, Any] | None) -> bool:
    """Whether a release with `service` has health checks."""
    return bool(service and service.get("checks"))


def ready(state: str, health: str | None, checks: bool) -> bool:
    """A machine its release counts as up: started, and passing its checks when it has some."""
    return state == "started" and (not checks or health == "passing")


def failed(state: str, health: str | None, checks: bool) -> bool:
    """A machine that fails its release: failed, or critical in its checks."""
    return state == "failed" or (checks and health == "critical")


@dataclass(frozen=True, slots=True)
class Route:
    """One machine the proxy may send an app's requests to."""

    id: str
    region: str
    address: str
    port: int
    healthy: bool
    draining: bool


@dataclass(frozen=True, slots=True)
class AppRoutes:
    app: str
    machines: list[Route]


class HealthRefused(Exception):
    """A health report on a machine without checks, or not starting or started."""


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


_m, _r, _a, _o = s.machines, s.releases, s.apps, s.orgs
_DELETE_BATCH = 500
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
    _m.c.address,
    _m.c.health,
    _o.c.name,
    _r.c.service,
)
_FROM = (
    _m.join(_r, _r.c.id == _m.c.release_id)
    .join(_a, _a.c.id == _m.c.app_id)
    .join(_o, _o.c.id == _a.c.org_id)
)


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
        address=None if row[15] is None else str(row[15]),
        health=None if row[16] is None else str(row[16]),
        org_name=str(row[17]),
        service=stored_service(row[18]),
    )


def _release_event(conn: Connection, event_type: str, release_id: int) -> None:
    """A release's webhook event (created, complete, failed), in the caller's transaction."""
    row = conn.execute(
        select(_r.c.app_id, _r.c.version, _r.c.status, _r.c.image_ref, _r.c.image_digest).where(
            _r.c.id == release_id
        )
    ).first()
    if row is not None:
        emit_for_app(
            conn,
            event_type,
            int(row[0]),
            f"releases/{release_id}",
            {
                "release_id": release_id,
                "version": int(row[1]),
                "status": row[2],
                "image": row[3],
                "digest": row[4],
            },
        )


class MachineMeta(SqlStore):
    gc: GcSettings = GcSettings()  # the GC review delay (meta/gc.py)

    """Queries and updates of machines, their events and logs, and release status from them."""

    # -- machines -------------------------------------------------------------------------------

    def create_for_release(
        self,
        release_id: int,
        app_id: int,
        regions: list[str],
        count: int,
        strategy: str,
        *,
        max_live: int | None = None,
        keep_idle: int | None = None,
        max_records: int | None = None,
    ) -> list[str]:
        """`count` machines per region (desired started) for a release, which becomes `running`.

        With `immediate`, every other machine of the app is set desired=stopped at once; with
        `rolling` they keep running until the new release completes (`reconcile_release`) and,
        when the app has live machines, only the first new one is desired started: the others
        wait (desired `waiting`), each started by `_reconcile` once those before it are ready,
        one old machine stopped for each. Waiting machines are live: they count against
        `max_live` (`live_count`).
        `max_live` caps the app's live machines (`live_count`) once these are created: over it,
        the release is marked `failed`, nothing is created and TooManyMachines is raised.
        `keep_idle`: the app's idle machines (desired stopped, state in IDLE_STATES) beyond the
        newest `keep_idle` are deleted first, with their events and logs. `max_records` then caps
        the app's machine rows once these are created (TooManyMachineRecords, release `failed`).
        Both default to multiples of `max_live` (IDLE_KEPT_PER_LIVE, RECORDS_PER_LIVE).
        """
        if max_live is not None:
            keep_idle = IDLE_KEPT_PER_LIVE * max_live if keep_idle is None else keep_idle
            max_records = RECORDS_PER_LIVE * max_live if max_records is None else max_records
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

        def work(conn: Connection) -> TooManyMachines | None:
            if self._locks:  # deploys of one app count its machines one at a time
                conn.execute(select(_a.c.id).where(_a.c.id == app_id).with_for_update())
            self._lock_release(conn, release_id)
            refusal: TooManyMachines | None = None
            if max_live is not None:
                live = 0 if strategy == "immediate" else self._live(conn, app_id)
                if live + len(rows) > max_live:
                    refusal = TooManyMachines(live, len(rows), max_live)
            if refusal is None and keep_idle is not None:
                self._delete_idle(conn, app_id, keep_idle)
            if refusal is None and max_records is not None:
                records = self._records(conn, app_id)
                if records + len(rows) > max_records:
                    refusal = TooManyMachineRecords(records, len(rows), max_records)
            if refusal is not None:
                conn.execute(
                    update(_r).where(_r.c.id == release_id).values(status="failed", updated_at=now)
                )
                _release_event(conn, RELEASE_FAILED, release_id)
                return refusal
            placed = rows
            if strategy == "rolling" and len(rows) > 1 and self._live(conn, app_id) > 0:
                # The first in creation order (created_at, id: they share created_at) starts.
                first, *rest = sorted(rows, key=lambda row: str(row["id"]))
                placed = [first, *({**row, "desired": "waiting"} for row in rest)]
            conn.execute(insert(_m), placed)
            if strategy == "immediate":
                self._stop_others(conn, app_id, release_id, now)
            conn.execute(
                update(_r).where(_r.c.id == release_id).values(status="running", updated_at=now)
            )
            return None

        refused = self._transaction(work)
        if refused is not None:
            raise refused
        return ids

    @staticmethod
    def _live(conn: Connection, app_id: int) -> int:
        return int(
            conn.execute(
                select(func.count())
                .select_from(_m)
                .where(_m.c.app_id == app_id, _m.c.desired.in_(LIVE))
            ).scalar_one()
        )

    @staticmethod
    def _records(conn: Connection, app_id: int) -> int:
        return int(
            conn.execute(
                select(func.count()).select_from(_m).where(_m.c.app_id == app_id)
            ).scalar_one()
        )

    def _delete_idle(self, conn: Connection, app_id: int, keep: int) -> int:
        """Delete the app's idle machines beyond the newest `keep`, with their events and logs.

        The caller holds the app's row. The chosen rows are locked (PostgreSQL) so no agent
        report moves them out of idle before they go; an agent's event or log line racing the
        delete finds no machine (`add_event`, `add_logs`).
        """
        query = (
            select(_m.c.id, _m.c.release_id)
            .where(
                _m.c.app_id == app_id,
                _m.c.desired == "stopped",
                _m.c.state.in_(IDLE_STATES),
            )
            .order_by(_m.c.created_at.desc(), _m.c.id.desc())
            .offset(keep)
        )
        if self._locks:
            query = query.with_for_update(of=_m)
        found = conn.execute(query).all()
        ids = [str(r[0]) for r in found]
        # Their releases' images may be garbage once no machine uses them: GC reviews them.
        images = release_images(conn, [int(r[1]) for r in found])
        enqueue_manifests(conn, images, "machines_deleted", self.gc.review_delay)
        for start in range(0, len(ids), _DELETE_BATCH):
            batch = ids[start : start + _DELETE_BATCH]
            conn.execute(delete(s.machine_logs).where(s.machine_logs.c.machine_id.in_(batch)))
            conn.execute(delete(s.machine_events).where(s.machine_events.c.machine_id.in_(batch)))
            conn.execute(delete(_m).where(_m.c.id.in_(batch)))
        return len(ids)

    def start(self, machine_id: str, *, bump: bool, max_live: int | None = None) -> bool:
        """Set a machine desired `started` (`bump`: a new generation, so its agent restarts
        it); False when it does not exist.

        A machine not yet desired started becomes a live one: over `max_live` for its app, it
        raises TooManyMachines and changes nothing. Checked under the app's row, as deploys do.
        """

        def work(conn: Connection) -> bool:
            app_id = conn.execute(
                select(_m.c.app_id).where(_m.c.id == machine_id)
            ).scalar_one_or_none()
            if app_id is None:
                return False
            if self._locks:
                conn.execute(select(_a.c.id).where(_a.c.id == app_id).with_for_update())
            desired = conn.execute(
                select(_m.c.desired).where(_m.c.id == machine_id)
            ).scalar_one_or_none()
            if desired is None:
                return False
            if desired not in LIVE and max_live is not None:
                live = self._live(conn, int(app_id))
                if live + 1 > max_live:
                    raise TooManyMachines(live, 1, max_live)
            values: dict[str, Any] = {"desired": "started", "updated_at": _now()}
            if bump:
                values["generation"] = _m.c.generation + 1
            conn.execute(update(_m).where(_m.c.id == machine_id).values(**values))
            return True

        return self._transaction(work)

    def live_count(self, app_id: int) -> int:
        """The app's live machines: those desired `started` or `waiting` (a machine stopped by a
        user, by a newer release or by its release failing is desired `stopped` and no longer
        counts)."""
        with self._read() as conn:
            return self._live(conn, app_id)

    @staticmethod
    def _stop_others(
        conn: Connection, app_id: int, release_id: int, now: datetime, *, older: int | None = None
    ) -> None:
        """Every live machine of the app's other releases (`older`: of releases older than that
        version only, so a rolling deploy completing late never stops a newer one's) stops."""
        query = update(_m).where(
            _m.c.app_id == app_id, _m.c.release_id != release_id, _m.c.desired.in_(LIVE)
        )
        if older is not None:
            query = query.where(
                _m.c.release_id.in_(
                    select(_r.c.id).where(_r.c.app_id == app_id, _r.c.version < older)
                )
            )
        conn.execute(query.values(desired="stopped", updated_at=now))

    def get(self, machine_id: str) -> Machine | None:
        with self._read() as conn:
            row = conn.execute(select(*_COLUMNS).select_from(_FROM).where(_m.c.id == machine_id))
            found = row.first()
        return None if found is None else _machine(found)

    def in_region(
        self,
        region: str,
        org_id: int | None = None,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Machine]:
        """The region's machines desired `started`: what its agent must run (any other it runs,
        it stops). Oldest first; `limit`/`after` page as in `of_app`."""
        query = (
            select(*_COLUMNS)
            .select_from(_FROM)
            .where(_m.c.region == region, _m.c.desired == "started")
        )
        if org_id is not None:
            query = query.where(_a.c.org_id == org_id)
        return self._page(query, limit, after)

    def of_app(
        self, app_id: int, *, limit: int | None = None, after: str | None = None
    ) -> list[Machine]:
        """The app's machines, oldest first: at most `limit`, those after machine id `after`
        (the last one of the previous page) when given."""
        query = select(*_COLUMNS).select_from(_FROM).where(_m.c.app_id == app_id)
        return self._page(query, limit, after)

    def _page(self, query: Any, limit: int | None, after: str | None) -> list[Machine]:
        if after is not None:
            # Keyset paging on (created_at, id), compared with the cursor machine's own row.
            inner = _m.alias("after_machine")
            at = select(inner.c.created_at).where(inner.c.id == after).scalar_subquery()
            query = query.where(
                or_(_m.c.created_at > at, and_(_m.c.created_at == at, _m.c.id > after))
            )
        query = query.order_by(_m.c.created_at, _m.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            return [_machine(r) for r in conn.execute(query)]

    def set_desired(self, machine_id: str, desired: str, *, bump: bool = False) -> None:
        values: dict[str, Any] = {"desired": desired, "updated_at": _now()}
        if bump:
            values["generation"] = _m.c.generation + 1
        with self._write() as conn:
            conn.execute(update(_m).where(_m.c.id == machine_id).values(**values))

    def report_state(
        self, machine_id: str, state: str, exit_code: int | None, address: str | None = None
    ) -> None:
        """An agent's report (`address`: stored when given); the machine's release status
        follows (`reconcile_release`). A machine starting again starts its health over."""

        def work(conn: Connection) -> None:
            now = _now()
            found = conn.execute(
                select(_m.c.release_id, _r.c.service, _m.c.state, _m.c.app_id, _m.c.region)
                .select_from(_m.join(_r, _r.c.id == _m.c.release_id))
                .where(_m.c.id == machine_id)
            ).first()
            if found is None:
                return
            release_id = int(found[0])
            # Reports on one release queue on its row (before touching their machine, so they
            # never wait for each other crosswise): each reconciles with the others' states.
            self._lock_release(conn, release_id)
            values: dict[str, Any] = {"state": state, "exit_code": exit_code, "updated_at": now}
            if address is not None:
                values["address"] = address
            if state == "starting":
                values["health"] = "starting" if has_checks(stored_service(found[1])) else None
            conn.execute(update(_m).where(_m.c.id == machine_id).values(**values))
            if state in ("started", "failed") and state != found[2]:
                emit_for_app(
                    conn,
                    MACHINE_STARTED if state == "started" else MACHINE_FAILED,
                    int(found[3]),
                    f"machines/{machine_id}",
                    {
                        "machine": machine_id,
                        "region": found[4],
                        "state": state,
                        "exit_code": exit_code,
                        "release_id": release_id,
                    },
                )
            self._reconcile(conn, release_id, now)

        self._transaction(work)

    def report_health(self, machine_id: str, status: str, message: str | None) -> bool | None:
        """An agent's report of the machine's checks (`passing` or `critical`): stored, with an
        event when it changes, and the release follows. True: changed; None: no such machine.
        HealthRefused when its release has no checks or it is not starting or started."""

        def work(conn: Connection) -> bool | None:
            release_id = conn.execute(
                select(_m.c.release_id).where(_m.c.id == machine_id)
            ).scalar_one_or_none()
            if release_id is None:
                return None
            self._lock_release(conn, int(release_id))  # as state reports do
            found = conn.execute(
                select(_m.c.state, _m.c.health, _r.c.service)
                .select_from(_m.join(_r, _r.c.id == _m.c.release_id))
                .where(_m.c.id == machine_id)
            ).first()
            if found is None:
                return None
            state, health = str(found[0]), found[1]
            if not has_checks(stored_service(found[2])):
                raise HealthRefused(f"machine {machine_id}'s release has no health checks")
            if state not in ("starting", "started"):
                raise HealthRefused(
                    f"machine {machine_id} is {state}: health is reported while it is starting "
                    "or started"
                )
            if health == status:
                return False
            now = _now()
            conn.execute(
                update(_m).where(_m.c.id == machine_id).values(health=status, updated_at=now)
            )
            text = "Health checks passing"
            if status == "critical":
                text = "Health checks critical" + (f": {message}" if message else "")
            conn.execute(
                insert(s.machine_events).values(
                    machine_id=machine_id, at=now, message=text, duration_ms=None
                )
            )
            self._reconcile(conn, int(release_id), now)
            return True

        return self._transaction(work)

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
        """running → failed (a machine failed, or went critical in its checks: its machines,
        waiting ones too, are stopped; the app's other machines keep running) or complete
        (all ready, see `ready`: stable; the app's other machines are stopped). In a rolling
        deploy whose machines wait, all desired started ready instead start the next waiting
        one and stop one old machine (`_roll`). The caller holds the release's row
        (`_lock_release`)."""
        release = conn.execute(
            select(_r.c.status, _r.c.app_id, _r.c.version, _r.c.service).where(
                _r.c.id == release_id
            )
        ).first()
        if release is None or release[0] not in ("pending", "running"):
            return
        checks = has_checks(stored_service(release[3]))
        rows = conn.execute(
            select(_m.c.id, _m.c.region, _m.c.desired, _m.c.state, _m.c.health)
            .where(_m.c.release_id == release_id)
            .order_by(_m.c.created_at, _m.c.id)
        ).all()
        if not rows:
            return
        if any(failed(str(r[3]), r[4], checks) for r in rows):
            conn.execute(
                update(_r).where(_r.c.id == release_id).values(status="failed", updated_at=now)
            )
            _release_event(conn, RELEASE_FAILED, release_id)
            conn.execute(
                update(_m)
                .where(_m.c.release_id == release_id)
                .values(desired="stopped", updated_at=now)
            )
            return
        waiting = [r for r in rows if r[2] == "waiting"]
        started = [r for r in rows if r[2] == "started"]
        # One step per ready set; a waiting machine already ready (reported started before it
        # was wanted) lets the next step follow at once.
        while waiting and all(ready(str(r[3]), r[4], checks) for r in started):
            step = waiting.pop(0)
            self._roll(conn, int(release[1]), int(release[2]), step, now)
            started.append(step)
        if not waiting and all(ready(str(r[3]), r[4], checks) for r in rows):
            conn.execute(
                update(_r)
                .where(_r.c.id == release_id)
                .values(status="complete", stable=True, updated_at=now)
            )
            _release_event(conn, RELEASE_COMPLETE, release_id)
            self._stop_others(conn, int(release[1]), release_id, now, older=int(release[2]))

    @staticmethod
    def _roll(conn: Connection, app_id: int, version: int, waiting: Any, now: datetime) -> None:
        """One step of a rolling deploy: the next waiting machine (`waiting`, the oldest)
        becomes desired started, and one machine of an older release desired stopped (of the
        same region first, the oldest first), now that the machines before it are ready."""
        older = select(_r.c.id).where(_r.c.app_id == app_id, _r.c.version < version)
        old = conn.execute(
            select(_m.c.id)
            .where(
                _m.c.app_id == app_id,
                _m.c.desired == "started",
                _m.c.release_id.in_(older),
            )
            .order_by(case((_m.c.region == waiting[1], 0), else_=1), _m.c.created_at, _m.c.id)
            .limit(1)
        ).scalar_one_or_none()
        if old is not None:
            conn.execute(update(_m).where(_m.c.id == old).values(desired="stopped", updated_at=now))
        conn.execute(
            update(_m).where(_m.c.id == waiting[0]).values(desired="started", updated_at=now)
        )

    # -- routes for the proxy --------------------------------------------------------------------

    def routes(
        self, org_id: int | None = None, limit: int = MAX_ROUTES
    ) -> tuple[list[AppRoutes], bool]:
        """What the proxy routes to (`org_id`: that org's apps only), by app name: the machines
        with an address, starting or started, whose release has a service; and the apps whose
        newest release has a service with none such (no machine: the proxy answers 503, not
        404). At most `limit` machines and `limit` apps; True: more were left out."""
        machines = (
            select(
                _a.c.name,
                _m.c.id,
                _m.c.region,
                _m.c.address,
                _m.c.state,
                _m.c.health,
                _m.c.desired,
                _r.c.service,
            )
            .select_from(_m.join(_r, _r.c.id == _m.c.release_id).join(_a, _a.c.id == _m.c.app_id))
            .where(
                _m.c.address.is_not(None),
                _m.c.state.in_(("starting", "started")),
                _r.c.service.is_not(None),
            )
            .order_by(_a.c.name, _m.c.created_at, _m.c.id)
            .limit(limit + 1)
        )
        newest = (
            select(_r.c.app_id, func.max(_r.c.version).label("version"))
            .group_by(_r.c.app_id)
            .subquery()
        )
        apps = (
            select(_a.c.name)
            .select_from(
                _r.join(
                    newest, and_(newest.c.app_id == _r.c.app_id, newest.c.version == _r.c.version)
                ).join(_a, _a.c.id == _r.c.app_id)
            )
            .where(_r.c.service.is_not(None))
            .order_by(_a.c.name)
            .limit(limit + 1)
        )
        if org_id is not None:
            machines = machines.where(_a.c.org_id == org_id)
            apps = apps.where(_a.c.org_id == org_id)
        with self._read() as conn:
            found = conn.execute(machines).all()
            named = [str(r[0]) for r in conn.execute(apps)]
        truncated = len(found) > limit or len(named) > limit
        routes: dict[str, list[Route]] = {name: [] for name in named[:limit]}
        services: dict[str, dict[str, Any] | None] = {}
        for row in found[:limit]:
            text = str(row[7])
            if text not in services:
                services[text] = stored_service(text)
            service = services[text]
            if service is None:
                continue
            health = None if row[5] is None else str(row[5])
            routes.setdefault(str(row[0]), []).append(
                Route(
                    id=str(row[1]),
                    region=str(row[2]),
                    address=str(row[3]),
                    port=int(service["internal_port"]),
                    healthy=ready(str(row[4]), health, has_checks(service)),
                    draining=str(row[6]) != "started",
                )
            )
        return [AppRoutes(app, routes[app]) for app in sorted(routes)], truncated

    # -- events and logs -------------------------------------------------------------------------

    def add_event(self, machine_id: str, message: str, duration_ms: int | None = None) -> None:
        """Record an event; nothing when the machine is gone (`_delete_idle`)."""
        row = {"machine_id": machine_id, "at": _now(), "message": message}
        self._add(machine_id, s.machine_events, [{**row, "duration_ms": duration_ms}])

    def _add(self, machine_id: str, table: Any, rows: list[dict[str, Any]]) -> None:
        def work(conn: Connection) -> None:
            # Holds the machine against `_delete_idle` until commit (PostgreSQL), or finds it
            # already gone (an agent's late report), instead of a foreign-key error.
            query = select(_m.c.id).where(_m.c.id == machine_id)
            if self._locks:
                query = query.with_for_update(key_share=True)
            if conn.execute(query).first() is not None:
                conn.execute(insert(table), rows)

        self._transaction(work)

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
        self._add(
            machine_id,
            s.machine_logs,
            [{"machine_id": machine_id, "at": now, "line": ln[:MAX_LINE]} for ln in lines],
        )

    def machine_logs(
        self, machine_id: str, after: int = 0, limit: int = 1000, *, tail: bool = False
    ) -> list[LogLine]:
        """One machine's log lines with ids above `after`, oldest first: the first `limit` of
        them, or with `tail` the last `limit`."""
        lg = s.machine_logs
        order = lg.c.id.desc() if tail else lg.c.id
        with self._read() as conn:
            rows = conn.execute(
                select(lg.c.id, lg.c.machine_id, _m.c.region, lg.c.at, lg.c.line)
                .select_from(lg.join(_m, _m.c.id == lg.c.machine_id))
                .where(lg.c.machine_id == machine_id, lg.c.id > after)
                .order_by(order)
                .limit(limit)
            ).all()
        if tail:
            rows = list(reversed(rows))
        return [LogLine(int(r[0]), str(r[1]), str(r[2]), _aware(r[3]), str(r[4])) for r in rows]

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
