"""Org quotas at the registry's doors (`QuotaGate`): what `meta/quotas.py` counts, checked
where a push adds bytes, and refused with `DENIED` and a message naming the quota and usage.

- An upload starting (POST) with a known size (a monolithic upload's Content-Length) or a
  mount: refused when the org's usage plus the blob (0 if the org already holds it) would pass
  the hard limit; an upload session whose size is not known yet: refused when the org is
  already at or over its hard limit.
- An upload finishing (the store's `before_install`, the exact size): the same check, before
  the blob is linked, so a chunked upload cannot pass the limit either; the bytes stay in the
  upload (it expires) and nothing is linked.
- A manifest PUT: refused while the org is over its hard limit, unless that manifest is
  already in the repository (a retag adds no bytes). Over the soft limit, the push succeeds
  with a `Warning: 299` header (OCI distribution spec: clients show it) naming the usage.

Checks read the usage from the database each time (a database thread); concurrent uploads of
one org may each pass a check the other's bytes would fail, so the limit can be passed by what
one org commits at the same moment — bounded by its connections — never by more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from skyreg.meta.quotas import QuotaCheck, QuotaMeta
from skyreg.oci.errors import ErrorCode, RegistryError


def human(size: int) -> str:
    """Bytes as a person reads them: 1.2 GiB, 340 MiB, 12 B."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _denied(check: QuotaCheck, what: str) -> RegistryError:
    hard = check.quota.hard
    assert hard is not None
    adding = f" + {human(check.adding)} for {what}" if check.adding else ""
    return RegistryError(
        ErrorCode.DENIED,
        f"organization {check.org} is over its storage quota: {human(check.used)} used"
        f"{adding}, hard limit {human(hard)}; delete images (`skyreg images delete`) or ask "
        "for a larger quota",
        {"org": check.org, "used": check.used, "adding": check.adding, "hard_limit": hard},
    )


def soft_warning(check: QuotaCheck) -> str | None:
    """The `Warning` header of a push past the soft limit, or None."""
    if not check.over_soft or check.quota.soft is None:
        return None
    text = (
        f"organization {check.org} uses {human(check.after)} of storage, over its soft "
        f"quota of {human(check.quota.soft)}"
    )
    if check.quota.hard is not None:
        text += f" (hard limit {human(check.quota.hard)})"
    return '299 - "' + text.replace('"', "'") + '"'


class QuotaGate:
    """The registry's quota checks over `QuotaMeta` (every call on a database thread)."""

    def __init__(self, meta: QuotaMeta) -> None:
        self.meta = meta

    async def admit_blob(self, repository: str, digest: str | None, size: int | None) -> None:
        """Refuse (DENIED) a blob of `size` bytes (None: not known yet) into `repository`
        when its org would pass its hard limit."""
        check = await self.meta.read(self.meta.check, repository, digest, size or 0)
        if check is None or check.quota.hard is None:
            return
        if size is None:
            if check.used >= check.quota.hard:
                raise _denied(check, "this upload")
        elif check.over_hard:
            raise _denied(check, "this blob")

    async def admit_manifest(
        self, repository: str, exists: Callable[[], Awaitable[bool]]
    ) -> str | None:
        """Refuse (DENIED) a new manifest in `repository` while its org is over its hard
        limit (`exists`: whether the repository holds it already: a retag is let through);
        the `Warning` header value when the org is over its soft limit, else None."""
        check = await self.meta.read(self.meta.check, repository, None, 0)
        if check is None:
            return None
        if check.over_hard and not await exists():
            raise _denied(check, "this manifest")
        return soft_warning(check)
