"""Retention per app, as the management API shows and sets it: the stored policy with what it
would delete now, a new policy (or a dry run of one), and removing it.

Anyone who sees the app (its org's tokens, admin tokens) sees its policy, public app or not;
only an admin or an org token of the app's org sets or removes one. The rules themselves, and
the runs that apply them, are `meta/retention.py`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from skyreg.meta.platform import App, PlatformMeta, TokenRecord
from skyreg.meta.retention import (
    AppRetention,
    PolicyInvalid,
    RetentionMeta,
    RetentionPolicy,
    TagToDelete,
)
from skyreg.services.access import may_manage, visible_app
from skyreg.services.errors import Forbidden, Invalid
from skyreg.services.inputs import DURATION_TEXT, Body, SetRetention, given
from skyreg.services.names import parse_duration

log = logging.getLogger("skyreg.services")

MANAGE_REFUSED = "only an admin or org token of the app's organization may change its retention"


def policy_of(body: SetRetention) -> RetentionPolicy:
    """The policy a body asks for; Invalid (with the reason) when it cannot be kept."""
    try:
        return RetentionPolicy(
            keep_tags=tuple(body.keep_tags),
            keep_recent=body.keep_recent,
            keep_within=parse_duration(body.keep_within, "keep_within", DURATION_TEXT),
            untagged_after=parse_duration(body.untagged_after, "untagged_after", DURATION_TEXT),
        )
    except ValueError as e:  # PolicyInvalid too
        raise Invalid(str(e)) from None


@dataclass(frozen=True)
class RetentionView:
    """An app's stored policy (None: none) and what it would delete now (`would_delete`, at most
    `meta.retention.LISTED` tags, oldest first)."""

    app: str
    stored: AppRetention | None
    would_delete: list[TagToDelete] = field(default_factory=list)


@dataclass(frozen=True)
class RetentionChange:
    """A policy set (`saved`), or only tried (a dry run): what it deletes now."""

    app: str
    policy: RetentionPolicy
    dry_run: bool
    would_delete: list[TagToDelete]
    stored: AppRetention | None  # after the change (a dry run: unchanged)


@dataclass
class RetentionService:
    """Retention policies over `RetentionMeta` (sharing `PlatformMeta`'s Database)."""

    platform: PlatformMeta
    retention: RetentionMeta

    async def show(self, caller: TokenRecord | None, app: str) -> RetentionView:
        """The app's policy and what it would delete now, for anyone who sees the app (a
        public app's retention is not public)."""
        return await self.retention.read(self._show, caller, app)

    def _show(self, caller: TokenRecord | None, name: str) -> RetentionView:
        app = visible_app(self.platform, caller, name)
        stored = self.retention.get_policy(app.id)
        plan = [] if stored is None else self.retention.plan(app.name, stored.policy)
        return RetentionView(app.name, stored, plan)

    async def set(
        self, caller: TokenRecord, app: str, body: Body[SetRetention], *, dry_run: bool = False
    ) -> RetentionChange:
        """Store the body's policy for the app (an admin, or an org token of its org; others
        get NotFound or Forbidden before the body is looked at); a dry run stores nothing and
        answers what that policy would delete now."""
        return await self.retention.run(self._set, caller, app, body, dry_run)

    def _managed(self, caller: TokenRecord, name: str) -> App:
        app = visible_app(self.platform, caller, name, public_ok=True)
        if not may_manage(caller, app.org_id):
            raise Forbidden(MANAGE_REFUSED)
        return app

    def _set(
        self, caller: TokenRecord, name: str, lazy: Body[SetRetention], dry_run: bool
    ) -> RetentionChange:
        app = self._managed(caller, name)
        policy = policy_of(given(lazy))
        if not dry_run:
            self.retention.set_policy(app.id, policy)
            log.info(
                "retention of app %s set by token %s: keep_tags=%s keep_recent=%s "
                "keep_within=%s untagged_after=%s",
                app.name,
                caller.id,
                list(policy.keep_tags),
                policy.keep_recent,
                policy.keep_within,
                policy.untagged_after,
            )
        plan = self.retention.plan(app.name, policy)
        return RetentionChange(app.name, policy, dry_run, plan, self.retention.get_policy(app.id))

    async def unset(self, caller: TokenRecord, app: str) -> None:
        """Remove the app's policy (the same callers as `set`); nothing to remove is fine."""
        await self.retention.run(self._unset, caller, app)

    def _unset(self, caller: TokenRecord, name: str) -> None:
        app = self._managed(caller, name)
        self.retention.set_policy(app.id, None)
        log.info("retention of app %s removed by token %s", app.name, caller.id)


__all__ = [
    "PolicyInvalid",
    "RetentionChange",
    "RetentionService",
    "RetentionView",
    "policy_of",
]
