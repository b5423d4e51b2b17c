"""Webhooks of an org: who may make, see and delete them, and their deliveries.

The secret that signs deliveries is made here and shown once; it is stored sealed under the
server's master key (`platform/webhooks.py` seals and opens it). Delivery itself is the
`webhooks` worker's (`platform/webhooks.py` `WebhookSender`)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from skyreg.meta.platform import PlatformMeta, TokenRecord
from skyreg.meta.webhooks import (
    EVENT_TYPES as EVENT_TYPES,  # the event types forms offer
)
from skyreg.meta.webhooks import (
    MAX_WEBHOOKS_PER_ORG,
    DeliveryRecord,
    TooManyWebhooks,
    WebhookMeta,
    WebhookRecord,
)
from skyreg.services.access import may_manage, required, visible_org
from skyreg.services.errors import Forbidden, Invalid, LimitExceeded, NotFound
from skyreg.services.inputs import Body, CreateWebhook

Sealer = Callable[[str, str], tuple[str, bytes]]  # (webhook id, secret) -> (key id, sealed)


@dataclass
class WebhookService:
    meta: WebhookMeta
    platform: PlatformMeta

    def _managed_org(self, caller: TokenRecord | None, org_name: str) -> int:
        token = required(caller)
        org = visible_org(self.platform, token, org_name)
        if not may_manage(token, org.id):
            raise Forbidden("an org token of the organization (or admin) manages its webhooks")
        return org.id

    def _managed_hook(self, caller: TokenRecord | None, hook_id: str) -> WebhookRecord:
        token = required(caller)
        hook = self.meta.get(hook_id)
        if hook is None or not (token.kind == "admin" or token.org_id == hook.org_id):
            raise NotFound("webhook", hook_id)
        if not may_manage(token, hook.org_id):
            raise Forbidden("an org token of the organization (or admin) manages its webhooks")
        return hook

    async def check_manager(self, caller: TokenRecord | None, org: str) -> None:
        """Forbidden/NotFound unless the caller manages the org's webhooks."""
        await self.meta.read(self._managed_org, caller, org)

    async def create(
        self, caller: TokenRecord | None, org: str, body: Body[CreateWebhook], seal: Sealer
    ) -> tuple[WebhookRecord, str]:
        """A new webhook and its secret (shown once). The caller has checked the URL."""
        return await self.meta.run(self._create, caller, org, body, seal)

    def _create(
        self, caller: TokenRecord | None, org_name: str, body: Body[CreateWebhook], seal: Sealer
    ) -> tuple[WebhookRecord, str]:
        org_id = self._managed_org(caller, org_name)
        spec = body() if callable(body) else body
        unknown = sorted(set(spec.events) - set(EVENT_TYPES))
        if unknown:
            raise Invalid(f"unknown event types {unknown[:5]}; known: {', '.join(EVENT_TYPES)}")
        app_id = None
        if spec.app is not None:
            app = self.platform.get_app(spec.app)
            if app is None or app.org_id != org_id:
                raise NotFound("app", spec.app)
            app_id = app.id
        hook_id, secret = WebhookMeta.new_id(), "whsec_" + secrets.token_urlsafe(32)
        key_id, sealed = seal(hook_id, secret)
        token = required(caller)
        try:
            hook = self.meta.create(
                hook_id, org_id, app_id, spec.url, spec.events, key_id, sealed, token.id
            )
        except TooManyWebhooks as e:
            raise LimitExceeded(str(e), MAX_WEBHOOKS_PER_ORG) from None
        return hook, secret

    async def of_org(self, caller: TokenRecord | None, org: str) -> list[WebhookRecord]:
        def work() -> list[WebhookRecord]:
            return self.meta.of_org(self._managed_org(caller, org))

        return await self.meta.read(work)

    async def delete(self, caller: TokenRecord | None, hook_id: str) -> WebhookRecord:
        def work() -> WebhookRecord:
            hook = self._managed_hook(caller, hook_id)
            self.meta.delete(hook_id)
            return hook

        return await self.meta.run(work)

    async def deliveries(
        self, caller: TokenRecord | None, hook_id: str, limit: int
    ) -> tuple[WebhookRecord, list[DeliveryRecord]]:
        def work() -> tuple[WebhookRecord, list[DeliveryRecord]]:
            hook = self._managed_hook(caller, hook_id)
            return hook, self.meta.deliveries(hook_id, limit)

        return await self.meta.read(work)

    async def redeliver(
        self, caller: TokenRecord | None, hook_id: str, delivery_id: int
    ) -> DeliveryRecord:
        def work() -> DeliveryRecord:
            self._managed_hook(caller, hook_id)
            again = self.meta.redeliver(hook_id, delivery_id)
            if again is None:
                raise NotFound("delivery", str(delivery_id))
            return again

        return await self.meta.run(work)
