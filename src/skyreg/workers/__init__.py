"""Background work of one server process on one small abstraction.

- `Worker`: a name, counters (`WorkerStats`) and `async run(stop)`, which works until `stop`
  is set and then returns promptly.
- `PeriodicWorker`: runs a step every `interval` seconds; a failing step is logged once with
  its exception and counted, and the worker goes on.
- `Workers`: the supervisor of one process: starts them all, stops them all within a bound,
  and `describe()`s / `metrics()` what runs (the `skyreg_worker_*` Prometheus section).

Nothing here knows the rest of skyreg: any layer may build a worker.
"""

from __future__ import annotations

from skyreg.workers.base import (
    PeriodicWorker,
    Step,
    Worker,
    WorkerInfo,
    Workers,
    WorkerStats,
)

__all__ = ["PeriodicWorker", "Step", "Worker", "WorkerInfo", "WorkerStats", "Workers"]
