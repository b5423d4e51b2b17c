"""`Worker`, `PeriodicWorker` and the `Workers` supervisor (see the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("skyreg.workers")

Step = Callable[[], Awaitable[None]]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")  # also a Prometheus label value needing no escape
DEFAULT_STOP_TIMEOUT = 10.0


@dataclass
class WorkerStats:
    """What a worker did in this process: steps finished (failed ones included), failed steps,
    failures since the last success, and how long the last finished step took."""

    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_duration: float | None = None  # seconds


@dataclass(frozen=True)
class WorkerInfo:
    """One line of `Workers.describe()`: a worker, what it does, its state and counters."""

    name: str
    schedule: str
    state: str  # "not started", "running", "stopped" or "crashed"
    runs: int
    failures: int
    consecutive_failures: int
    last_duration: float | None


class Worker(ABC):
    """Background work with a name (lowercase letters, digits, `_`) and counters."""

    def __init__(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"worker name {name!r}: lowercase letters, digits and _ only")
        self.name = name
        self.stats = WorkerStats()
        # Whether a step's exception is an outage of something the process depends on (a
        # database out of reach): logged as one line per streak, without a traceback, since
        # what is out of reach logs its own outage. Set by `Workers` for all its workers.
        self.outage: Callable[[BaseException], bool] | None = None

    @property
    def schedule(self) -> str:
        """When the worker works, for people reading `describe()`."""
        return "continuously"

    @abstractmethod
    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then return promptly."""


class PeriodicWorker(Worker):
    """Runs `step` at once, then again `interval` seconds after each step ends, until stopped.

    A step that raises is counted and logged once, with its exception, on `logger` (the module
    the work belongs to), and the next step runs as planned: the worker never dies of it. The
    first success after failures is logged too. A step under way when `stop` is set finishes
    (the supervisor cancels it past its bound); the wait between steps ends at once.
    """

    def __init__(
        self,
        name: str,
        interval: float,
        step: Step,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(name)
        if not math.isfinite(interval) or interval < 0:
            raise ValueError(f"worker {name}: interval must be finite and >= 0, not {interval}")
        self.interval = interval
        self.step = step
        self.log = logger or log

    @property
    def schedule(self) -> str:
        """`every Ns`."""
        return f"every {self.interval:g}s"

    async def run(self, stop: asyncio.Event) -> None:
        """Run steps until `stop` is set."""
        while not stop.is_set():
            await self.run_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def run_once(self) -> bool:
        """Run one step now and count it; whether it succeeded."""
        stats = self.stats
        started = time.monotonic()
        try:
            await self.step()
        except Exception as e:
            stats.last_duration = time.monotonic() - started
            stats.runs += 1
            stats.failures += 1
            stats.consecutive_failures += 1
            if self.outage is not None and self.outage(e):
                if stats.consecutive_failures == 1:
                    self.log.warning(
                        "worker %s paused by an outage (%s); retrying every %gs",
                        self.name,
                        type(e).__name__,
                        self.interval,
                    )
                return False
            self.log.exception(
                "worker %s failed (%d in a row); retrying in %gs",
                self.name,
                stats.consecutive_failures,
                self.interval,
            )
            return False
        stats.last_duration = time.monotonic() - started
        stats.runs += 1
        if stats.consecutive_failures:
            self.log.info(
                "worker %s succeeded again after %d failure(s)",
                self.name,
                stats.consecutive_failures,
            )
            stats.consecutive_failures = 0
        return True


class Workers:
    """The background workers of one process: `start()` them with the application, `stop()`
    them before what they use is closed."""

    def __init__(
        self,
        workers: Iterable[Worker] = (),
        *,
        outage: Callable[[BaseException], bool] | None = None,
    ) -> None:
        """`outage`: which step exceptions are outages (see `Worker.outage`), for every worker
        added."""
        self.outage = outage
        self._workers: list[Worker] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._crashed: set[str] = set()
        self._stop = asyncio.Event()
        for worker in workers:
            self.add(worker)

    def add(self, worker: Worker) -> None:
        """Register `worker` (before `start`); names are unique."""
        if self._tasks:
            raise RuntimeError("workers already started")
        if any(w.name == worker.name for w in self._workers):
            raise ValueError(f"two workers named {worker.name}")
        worker.outage = self.outage
        self._workers.append(worker)

    def start(self) -> None:
        """Start every worker as a task of the running loop."""
        if self._tasks:
            raise RuntimeError("workers already started")
        for worker in self._workers:
            self._tasks[worker.name] = asyncio.create_task(
                self._guard(worker), name=f"worker {worker.name}"
            )
        log.info("started %d worker(s): %s", len(self._workers), self._names())

    async def _guard(self, worker: Worker) -> None:
        try:
            await worker.run(self._stop)
        except Exception:
            self._crashed.add(worker.name)
            log.exception("worker %s crashed; it will not run again in this process", worker.name)

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> bool:
        """Tell every worker to stop and wait for them at most `timeout` seconds; cancel those
        still running then (each logged). Whether all stopped by themselves."""
        self._stop.set()
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("%s did not stop within %gs; cancelling it", task.get_name(), timeout)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return not pending

    def _state(self, worker: Worker) -> str:
        task = self._tasks.get(worker.name)
        if task is None:
            return "not started"
        if worker.name in self._crashed:
            return "crashed"
        return "stopped" if task.done() else "running"

    def describe(self) -> list[WorkerInfo]:
        """Every worker of this process, with its state and counters."""
        return [
            WorkerInfo(
                name=w.name,
                schedule=w.schedule,
                state=self._state(w),
                runs=w.stats.runs,
                failures=w.stats.failures,
                consecutive_failures=w.stats.consecutive_failures,
                last_duration=w.stats.last_duration,
            )
            for w in self._workers
        ]

    def metrics(self) -> str:
        """The `skyreg_worker_*` Prometheus section: this process's workers."""
        infos = self.describe()
        lines: list[str] = []

        def family(name: str, kind: str, help_: str, value: Callable[[WorkerInfo], float]) -> None:
            lines.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}"))
            lines.extend(f'{name}{{worker="{i.name}"}} {value(i):g}' for i in infos)

        family(
            "skyreg_worker_up",
            "gauge",
            "Whether a background worker of this process is running (1) or not (0).",
            lambda i: 1 if i.state == "running" else 0,
        )
        family(
            "skyreg_worker_runs_total",
            "counter",
            "Steps a worker of this process finished, failed ones included.",
            lambda i: i.runs,
        )
        family(
            "skyreg_worker_failures_total",
            "counter",
            "Steps of a worker of this process that failed.",
            lambda i: i.failures,
        )
        family(
            "skyreg_worker_consecutive_failures",
            "gauge",
            "Failed steps of a worker of this process since its last success.",
            lambda i: i.consecutive_failures,
        )
        lines.extend(
            (
                "# HELP skyreg_worker_last_duration_seconds How long the last step took.",
                "# TYPE skyreg_worker_last_duration_seconds gauge",
            )
        )
        lines.extend(
            f'skyreg_worker_last_duration_seconds{{worker="{i.name}"}} {i.last_duration:.6f}'
            for i in infos
            if i.last_duration is not None
        )
        return "\n".join(lines) + "\n"

    def _names(self) -> str:
        return ", ".join(f"{w.name} ({w.schedule})" for w in self._workers) or "none"
