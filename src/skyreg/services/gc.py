"""Garbage collection as the management API shows it: its status, and a pass on demand (admin
tokens only)."""

from __future__ import annotations

from dataclasses import dataclass

from skyreg.meta.gc import GcRun, GcSettings, GcStatus
from skyreg.meta.platform import TokenRecord
from skyreg.registry.gc import Collector
from skyreg.services.access import required
from skyreg.services.errors import Forbidden
from skyreg.services.inputs import Body, Input, given

RECENT_RUNS = 20


class StartGcRun(Input):
    """`POST /gc/runs`: `dry_run: true` decides and lists what would go, deleting nothing."""

    dry_run: bool = False


@dataclass(frozen=True)
class GcOverview:
    """The registry's GC queues, totals and recent passes, with the answering node's settings
    (`region`: "" without regions; `worker`: whether this process runs the gc worker)."""

    settings: GcSettings
    region: str
    worker: bool
    status: GcStatus


def _admin(caller: TokenRecord | None, what: str) -> None:
    if required(caller).kind != "admin":
        raise Forbidden(f"only an admin token may {what}")


@dataclass
class GcService:
    """Status and passes over this process's `Collector` (`worker`: it runs the gc worker)."""

    collector: Collector
    worker: bool = True

    async def status(self, caller: TokenRecord | None) -> GcOverview:
        """Queue depths, what is due, pending byte deletions per region, totals, recent passes
        and recent errors (admin only)."""
        _admin(caller, "see garbage collection")
        meta = self.collector.meta
        # Counting the queues scans their due indexes: a database thread, even on SQLite.
        status = await meta.run(meta.status, RECENT_RUNS)
        return GcOverview(meta.settings, self.collector.region, self.worker, status)

    async def run(self, caller: TokenRecord | None, body: Body[StartGcRun]) -> GcRun:
        """Run one pass now (admin only); a dry run deletes nothing and lists what would go."""
        _admin(caller, "run garbage collection")
        return await self.collector.run_once(given(body).dry_run)
