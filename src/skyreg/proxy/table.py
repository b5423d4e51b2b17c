"""The proxy's routing table: which machines serve each app, and how busy each one is.

Pure Python and no I/O: the proxy (`proxy/server.py`) reads it on every request and another piece
(`proxy/routes.py`, following the server's routes) rewrites it with `replace`. Everything runs on
one event loop, so a `pick` followed by `acquire` with no `await` between them is atomic.

Passive ejection: the proxy calls `eject` when it could not connect to a machine, and `pick` skips
that machine for `ejection` seconds, so a killed machine costs one failed connect rather than one
per request until the next health report. Ejections are kept by machine id, apart from the
backends, so that a `replace` with the same machines (every poll) does not forgive them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    """One machine of an app, as the proxy sees it."""

    machine_id: str
    host: str
    port: int
    region: str = ""
    healthy: bool = True
    # A draining machine gets no new requests and finishes the ones it has.
    draining: bool = False


class RoutingTable:
    """App name -> its backends, plus the number of requests in flight on each machine and the
    machines ejected for a while (`eject`)."""

    def __init__(
        self, *, ejection: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ejection = ejection
        self._clock = clock
        self._apps: dict[str, tuple[Backend, ...]] = {}
        self._in_flight: dict[str, int] = {}
        # Per-app rotation, so that ties in least-connections go round robin.
        self._turn: dict[str, int] = {}
        # Machine id -> until when (clock) pick skips it.
        self._ejected: dict[str, float] = {}

    def replace(self, app: str, backends: Iterable[Backend]) -> None:
        """Set `app`'s backends all at once (an empty list keeps the app known, with no machine)."""
        self._apps[app] = tuple(backends)

    def remove(self, app: str) -> None:
        """Forget `app`: the proxy answers 404 for it from now on."""
        self._apps.pop(app, None)
        self._turn.pop(app, None)

    def set_draining(self, app: str, machine_id: str, draining: bool = True) -> None:
        """Mark one machine of `app` draining (or not), leaving the others as they are."""
        self.replace(
            app,
            (
                dataclasses.replace(b, draining=draining) if b.machine_id == machine_id else b
                for b in self._apps.get(app, ())
            ),
        )

    def apps(self) -> set[str]:
        """Every app in the table."""
        return set(self._apps)

    def knows(self, app: str) -> bool:
        """Whether `app` is in the table (even with no healthy machine)."""
        return app in self._apps

    def backends(self, app: str) -> tuple[Backend, ...]:
        """`app`'s backends, in the order they were given (empty for an unknown app)."""
        return self._apps.get(app, ())

    def eject(self, machine_id: str) -> None:
        """Skip `machine_id` in `pick` for the next `ejection` seconds (a connect to it failed)."""
        if self.ejection > 0:
            self._ejected[machine_id] = self._clock() + self.ejection

    def ejected(self) -> set[str]:
        """The machines `pick` skips now."""
        now = self._clock()
        for machine_id in [m for m, until in self._ejected.items() if until <= now]:
            del self._ejected[machine_id]
        return set(self._ejected)

    def pick(self, app: str, exclude: Set[str] = frozenset()) -> Backend | None:
        """The healthy, not draining backend of `app` (machine id not in `exclude`) with the fewest
        requests in flight; ties go round robin. Ejected machines are skipped while another one
        is left (when every one is ejected, one of them may be back: better a try than a 502).
        None when there is no such backend."""
        candidates = [
            b
            for b in self._apps.get(app, ())
            if b.healthy and not b.draining and b.machine_id not in exclude
        ]
        if not candidates:
            return None
        if self._ejected:
            ejected = self.ejected()
            candidates = [b for b in candidates if b.machine_id not in ejected] or candidates
        fewest = min(self._in_flight.get(b.machine_id, 0) for b in candidates)
        least = [b for b in candidates if self._in_flight.get(b.machine_id, 0) == fewest]
        turn = self._turn.get(app, 0)
        if not exclude:
            # A retry (some machines excluded) leaves the rotation where it was: otherwise a
            # refusing machine would come first again on every request.
            self._turn[app] = turn + 1
        return least[turn % len(least)]

    def acquire(self, machine_id: str) -> None:
        """Count one more request in flight on `machine_id`."""
        self._in_flight[machine_id] = self._in_flight.get(machine_id, 0) + 1

    def release(self, machine_id: str) -> None:
        """Count one request on `machine_id` as finished."""
        left = self._in_flight.get(machine_id, 0) - 1
        if left > 0:
            self._in_flight[machine_id] = left
        else:
            self._in_flight.pop(machine_id, None)

    def in_flight(self, machine_id: str) -> int:
        """Requests in flight on `machine_id` now."""
        return self._in_flight.get(machine_id, 0)

    def in_flight_by_machine(self) -> dict[str, int]:
        """Every machine with at least one request in flight, and how many."""
        return dict(self._in_flight)
