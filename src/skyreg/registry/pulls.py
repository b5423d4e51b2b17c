"""When manifests were last pulled, recorded cheaply (`PullTimes`): a manifest GET notes
(repository, digest) → now in memory; the `pull_times` worker writes what accumulated in one
transaction every `--pull-flush-interval` seconds (`RetentionMeta.record_pulls`). Retention
policies read these times ("keep what was pulled lately"); nothing on the request path waits
for the database.

At most `MAX_PENDING` distinct manifests wait between two writes: past that, pulls of manifests
not yet noted are counted as dropped (`skyreg_pull_times_dropped_total`) until the next write,
so a client pulling many distinct manifests cannot grow this process's memory. A write that
fails keeps its batch for the next one (a later pull time of a manifest wins).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from skyreg.meta.retention import RetentionMeta
from skyreg.workers import PeriodicWorker

log = logging.getLogger("skyreg.registry.pulls")

MAX_PENDING = 50_000
DEFAULT_FLUSH_INTERVAL = 30.0


class PullTimes:
    """Pull times waiting to be written, and the worker writing them."""

    def __init__(self, meta: RetentionMeta, max_pending: int = MAX_PENDING) -> None:
        self.meta = meta
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str], datetime] = {}
        self.written = 0  # rows written by this process
        self.dropped = 0  # pulls not noted: too many distinct manifests between two writes

    def record(self, repository: str, digest: str) -> None:
        """Note a pull of `digest` from `repository` (on the event loop: no I/O)."""
        key = (repository, digest)
        if key not in self._pending and len(self._pending) >= self.max_pending:
            self.dropped += 1
            return
        self._pending[key] = datetime.now(UTC)

    async def flush(self) -> int:
        """Write what accumulated; the rows written."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            written = await self.meta.run(self.meta.record_pulls, batch)
        except BaseException:
            for key, at in batch.items():  # kept for the next write; newer pulls win
                if key not in self._pending and len(self._pending) < self.max_pending:
                    self._pending[key] = at
            raise
        self.written += written
        return written

    def worker(self, interval: float) -> PeriodicWorker:
        """The `pull_times` worker: a write every `interval` seconds."""
        return PeriodicWorker("pull_times", interval, self._step, logger=log)

    async def _step(self) -> None:
        await self.flush()

    def metrics(self) -> str:
        return (
            "# HELP skyreg_pull_times_written_total Manifest pull times this process wrote.\n"
            "# TYPE skyreg_pull_times_written_total counter\n"
            f"skyreg_pull_times_written_total {self.written}\n"
            "# HELP skyreg_pull_times_dropped_total Pulls not recorded: too many distinct "
            "manifests pulled between two writes.\n"
            "# TYPE skyreg_pull_times_dropped_total counter\n"
            f"skyreg_pull_times_dropped_total {self.dropped}\n"
        )
