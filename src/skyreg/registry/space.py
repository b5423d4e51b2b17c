"""Keeping room on the data dir's disk: a low-space watermark below which no new upload starts,
and reclaiming abandoned and failed uploads first when space runs low.

A full disk is survived (see `StorageFull`), but a registry that runs into it keeps failing:
clients retry into new uploads while the failed ones keep their partial bytes until the upload
TTL. So before an upload starts, the free space is checked; below the watermark, uploads nobody
is using are removed (those that failed for lack of space first, then the longest idle), and
only if that does not bring the free space back above the watermark is the upload refused
(507, the same answer as a full disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from skyreg.meta.registry import RegistryMeta
from skyreg.oci.errors import ErrorCode, RegistryError

log = logging.getLogger("skyreg.space")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The most uploads one check removes: each is a file delete, and a check runs before a request.
MAX_RECLAIMED_PER_CHECK = 256


@dataclass(frozen=True)
class Watermark:
    """Free space to keep: `absolute` bytes, or `percent` of the filesystem's size."""

    absolute: int = 0
    percent: float = 0.0

    def bytes_of(self, total: int) -> int:
        """The watermark in bytes on a filesystem of `total` bytes."""
        return self.absolute if not self.percent else int(total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.absolute} bytes"


def parse_watermark(text: str) -> Watermark:
    """`"2%"`, `"0"`, `"512MiB"`, `"1G"`, `"1048576"` (binary units; a bare number is bytes)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (e.g. 512MiB, 2GiB, 2%)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "%":
        if number > 50:
            raise ValueError(f"{text!r}: keeping more than half the disk free leaves no room")
        return Watermark(percent=number)
    return Watermark(absolute=int(number * _UNITS[unit[:1]]))


class Reclaimable(Protocol):
    """The blob store side: a filesystem store that can remove an upload nobody is using."""

    root: Path

    async def reclaim(self, upload_id: str) -> int | None:
        """Remove the upload unless a request is using it; the bytes freed, or None if busy."""

    async def idle_uploads(self, idle_since: datetime) -> list[str]:
        """Upload ids whose bytes have not changed since `idle_since`."""


@dataclass
class SpaceGuard:
    """The low-space watermark of one filesystem store, for one server process."""

    store: Reclaimable
    sessions: RegistryMeta
    watermark: Watermark
    reclaim_idle: float = 600.0  # seconds without activity before an upload counts as abandoned
    _failed: dict[str, None] = field(default_factory=dict)  # insertion-ordered: oldest first
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _low: bool = False

    def failed(self, upload_id: str) -> None:
        """An upload's write failed for lack of space: it is the first to go when space is low."""
        self._failed.pop(upload_id, None)
        self._failed[upload_id] = None
        while len(self._failed) > 4 * MAX_RECLAIMED_PER_CHECK:  # bounded: drop the oldest
            self._failed.pop(next(iter(self._failed)))

    def resumed(self, upload_id: str) -> None:
        """An upload's write succeeded again: it is no longer a failed one."""
        self._failed.pop(upload_id, None)

    async def _space(self) -> tuple[int, int]:
        """(free bytes an unprivileged writer may use, the filesystem's size)."""
        st = await asyncio.to_thread(os.statvfs, self.store.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    async def ensure_room(self) -> None:
        """Return if the free space is above the watermark, reclaiming unused uploads first if
        not; raise the 507 STORAGE_FULL error if it stays below."""
        free, total = await self._space()
        needed = self.watermark.bytes_of(total)
        if free >= needed:
            self._recovered()
            return
        async with self._lock:  # one reclaim at a time; the others see its result
            free, total = await self._space()
            if free < needed:
                freed, count = await self._reclaim(needed)
                if count:
                    log.info("low on space: reclaimed %d unused upload(s), %d bytes", count, freed)
                free, total = await self._space()
        if free >= needed:
            self._recovered()
            return
        if not self._low:
            self._low = True
            log.warning(
                "low on space: %d bytes free, below the watermark of %d (--min-free-space %s); "
                "new uploads answer 507 until space is freed",
                free,
                needed,
                self.watermark,
            )
        raise RegistryError(
            ErrorCode.STORAGE_FULL,
            "registry storage is low on space: new uploads are refused until space is freed "
            f"({free} bytes free, the registry keeps {needed})",
        )

    def _recovered(self) -> None:
        if self._low:
            self._low = False
            log.info("space is above the watermark again: new uploads are accepted")

    async def _reclaim(self, needed: int) -> tuple[int, int]:
        """Remove unused uploads until `needed` bytes are free: failed ones, then sessions idle
        longer than `reclaim_idle` (longest idle first), then bytes with no session left."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.reclaim_idle)
        stale = await self.sessions.run(self.sessions.stale_uploads, cutoff)
        candidates = list(dict.fromkeys([*self._failed, *stale]))
        freed = count = 0
        for upload_id in candidates[:MAX_RECLAIMED_PER_CHECK]:
            got = await self.store.reclaim(upload_id)
            self._failed.pop(upload_id, None)
            if got is None:
                continue  # a request is writing to it right now
            await self.sessions.run(self.sessions.delete_upload, upload_id)
            freed, count = freed + got, count + 1
            if (await self._space())[0] >= needed:
                return freed, count
        idle = await self.store.idle_uploads(cutoff)
        sessions = self.sessions

        def without_session() -> list[str]:
            return [u for u in idle if sessions.upload_repository(u) is None]

        sessionless = await sessions.run(without_session)
        for upload_id in sessionless[: MAX_RECLAIMED_PER_CHECK - count]:
            got = await self.store.reclaim(upload_id)
            if got is not None:
                freed, count = freed + got, count + 1
        return freed, count
