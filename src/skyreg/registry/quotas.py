"""Org quotas at the registry's doors (`QuotaGate`): what `meta/quotas.py` counts, checked
where a push adds bytes, and refused with `DENIED` and a message naming the quota and usage.

- An upload starting (POST) with a known size (a monolithic upload's Content-Length) or a
  mount: refused when the org's usage plus the blob (0 if the org already holds it) would pass
  the hard limit; an upload session whose size is not known yet: refused when the org is
  already at or over its hard limit.
- An upload finishing (the store's `before_install`, the exact size): the same check, before
  the blob is linked, so a chunked upload cannot pass the limit either; the bytes stay in the
  upload (it expires) and nothing is linked.
- A manifest PUT: refused when its bytes would take the org past its hard limit (manifests
  count: they are stored too), unless that manifest is already in the repository (a retag
  adds no bytes). Over the soft limit, the push succeeds
  with a `Warning: 299` header (OCI distribution spec: clients show it) naming the usage.

Usage is computed from the links (`QuotaMeta.org_usage`) at most every `USAGE_MAX_AGE`
seconds per org and process, plus what this process linked since (see `QuotaGate`): the limit
can be passed by what the org links through other nodes within that time, or by uploads of
one org finishing at the same moment (each checked before the other's link), never by more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from skyreg.meta.quotas import QuotaCheck, QuotaMeta
from skyreg.oci.errors import ErrorCode, RegistryError
from skyreg.units import human_size

USAGE_MAX_AGE = 5.0  # seconds an org's computed usage is used before it is computed again
MAX_ORGS_CACHED = 10_000


def _denied(check: QuotaCheck, what: str) -> RegistryError:
    hard = check.quota.hard
    assert hard is not None
    adding = f" + {human_size(check.adding)} for {what}" if check.adding else ""
    return RegistryError(
        ErrorCode.DENIED,
        f"organization {check.org} is over its storage quota: {human_size(check.used)} used"
        f"{adding}, hard limit {human_size(hard)}; delete images (`skyreg images delete`) or ask "
        "for a larger quota",
        {"org": check.org, "used": check.used, "adding": check.adding, "hard_limit": hard},
    )


def soft_warning(check: QuotaCheck) -> str | None:
    """The `Warning` header of a push past the soft limit, or None."""
    if not check.over_soft or check.quota.soft is None:
        return None
    text = (
        f"organization {check.org} uses {human_size(check.after)} of storage, over its soft "
        f"quota of {human_size(check.quota.soft)}"
    )
    if check.quota.hard is not None:
        text += f" (hard limit {human_size(check.quota.hard)})"
    return '299 - "' + text.replace('"', "'") + '"'


@dataclass
class _Usage:
    """An org's usage as last computed, plus what this process admitted since."""

    used: int
    blobs: int
    at: float  # monotonic time it was computed
    admitted: int = 0  # bytes of blobs this process linked since


class QuotaGate:
    """The registry's quota checks over `QuotaMeta` (every query on a database thread).

    An org's usage is a walk over all its links (0.5 s for 100,000 on SQLite:
    `bench/quota_usage_bench.py`), so it is computed at most once per `max_age` seconds per
    org in this process, by one caller at a time (others wait for that result); in between,
    the bytes of blobs this process admitted are added to it. Other nodes' uploads are seen
    at the next computation: a limit can be passed by what other nodes link within
    `max_age`. `usage` (the management API's figure) goes through the same cache, so no
    caller can make the walk run more often.
    """

    def __init__(self, meta: QuotaMeta, max_age: float = USAGE_MAX_AGE) -> None:
        self.meta = meta
        self.max_age = max_age
        self._usage: dict[int, _Usage] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    async def usage(self, org_id: int) -> tuple[int, int]:
        """(bytes, blobs) the org holds, at most `max_age` seconds old (plus this process's
        admissions since)."""
        entry = self._usage.get(org_id)
        if entry is None or time.monotonic() - entry.at >= self.max_age:
            lock = self._locks.setdefault(org_id, asyncio.Lock())
            try:
                async with lock:  # one walk per org at a time; the others take its result
                    entry = self._usage.get(org_id)
                    if entry is None or time.monotonic() - entry.at >= self.max_age:
                        used, blobs = await self.meta.read(self.meta.org_usage, org_id)
                        entry = _Usage(used, blobs, time.monotonic())
                        self._remember(org_id, entry)
            finally:
                if not lock.locked() and self._locks.get(org_id) is lock:
                    del self._locks[org_id]
        return entry.used + entry.admitted, entry.blobs

    def forget_all(self) -> None:
        """Compute every org's usage anew at its next check (GC unlinked something)."""
        self._usage.clear()

    async def forget(self, repository: str) -> None:
        """Compute the usage of `repository`'s org anew at its next check (a link went)."""
        found = await self.meta.read(self.meta.quota_for, repository)
        if found is not None:
            self._usage.pop(found[0], None)

    def _remember(self, org_id: int, entry: _Usage) -> None:
        if len(self._usage) >= MAX_ORGS_CACHED:  # drop the stale ones, then the oldest
            now = time.monotonic()
            for key in [k for k, v in self._usage.items() if now - v.at >= self.max_age]:
                del self._usage[key]
            while len(self._usage) >= MAX_ORGS_CACHED:
                del self._usage[next(iter(self._usage))]
        self._usage[org_id] = entry

    async def _check(self, repository: str, digest: str | None, size: int) -> _Check | None:
        found = await self.meta.read(self.meta.quota_for, repository)
        if found is None:
            return None
        org_id, org, quota = found
        used, _ = await self.usage(org_id)
        held = (
            digest is not None
            and size > 0
            and await self.meta.read(self.meta.holds, org_id, digest)
        )
        return _Check(org_id, QuotaCheck(org, used, 0 if held else size, quota))

    async def admit_blob(
        self, repository: str, digest: str | None, size: int | None, *, linking: bool = False
    ) -> None:
        """Refuse (DENIED) a blob of `size` bytes (None: not known yet) into `repository`
        when its org would pass its hard limit; `linking`: the blob is linked next, so its
        bytes count from now on in this process."""
        found = await self._check(repository, digest, size or 0)
        if found is None:
            return
        check = found.check
        if check.quota.hard is not None:
            if size is None:
                if check.used >= check.quota.hard:
                    raise _denied(check, "this upload")
            elif check.over_hard:
                raise _denied(check, "this blob")
        if linking and check.adding:
            entry = self._usage.get(found.org_id)
            if entry is not None:
                entry.admitted += check.adding

    async def admit_manifest(
        self, repository: str, size: int, exists: Callable[[], Awaitable[bool]]
    ) -> str | None:
        """Refuse (DENIED) a new manifest of `size` bytes in `repository` when its org would
        pass its hard limit (`exists`: whether the repository holds it already — a retag adds
        nothing and is let through); the `Warning` header value when the org is over its
        soft limit, else None."""
        found = await self._check(repository, None, size)
        if found is None:
            return None
        check = found.check
        if check.over_hard and not await exists():
            raise _denied(check, "this manifest")
        entry = self._usage.get(found.org_id)
        if entry is not None:  # counted until the next walk (a retag too: an over-estimate)
            entry.admitted += size
        return soft_warning(check)


@dataclass(frozen=True)
class _Check:
    org_id: int
    check: QuotaCheck
