"""Webhooks of an org: who may make, see and delete them, and their deliveries.

The secret that signs deliveries is made here and shown once; it is stored sealed under the
server's current master key (`seal_secret`, `open_secret`), sealed again under the newest one
at a key rotation (`reseal`). Delivery itself is the
`webhooks` worker's (`platform/webhooks.py` `WebhookSender`)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from skyreg.auth.envelope import MasterKeys, SecretKeyError, open_value, seal_value
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


SECRET_CONTEXT = "webhook/{id}"


def seal_secret(keys: MasterKeys, hook_id: str, secret: str) -> tuple[str, bytes]:
    """`secret` sealed under the current master key for the webhook `hook_id`: (key id, sealed),
    as `WebhookMeta.create` stores them."""
    master = keys.current
    sealed = seal_value(master.key, SECRET_CONTEXT.format(id=hook_id), secret.encode("utf-8"))
    return master.key_id, sealed


def open_secret(keys: MasterKeys, hook_id: str, key_id: str, sealed: bytes) -> str:
    """The secret `seal_secret` sealed for `hook_id`. SecretKeyError when this server does not
    hold master key `key_id`, or the blob fails authentication (altered, another webhook's)."""
    master = keys.by_id(key_id)
    if master is None:
        raise SecretKeyError(
            f"no master key opens the secret of webhook {hook_id} (key id {key_id}): add that "
            "key to the key file or SKYREG_SECRETS_KEY"
        )
    return open_value(master.key, SECRET_CONTEXT.format(id=hook_id), sealed).decode("utf-8")


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

    async def reseal(self, keys: MasterKeys) -> int:
        """Seal every webhook secret sealed under an older master key under the current one
        (a key rotation); how many were. SecretKeyError for one no key opens."""
        current = keys.current.key_id
        done, after = 0, ""
        while True:
            page = await self.meta.read(self.meta.sealed_with_others, current, after)
            if not page:
                return done
            for hook_id, key_id, sealed in page:
                secret = open_secret(keys, hook_id, key_id, sealed)
                new_key, new_sealed = seal_secret(keys, hook_id, secret)
                if await self.meta.run(self.meta.reseal, hook_id, sealed, new_key, new_sealed):
                    done += 1
            after = page[-1][0]
