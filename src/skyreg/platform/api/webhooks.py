"""`/orgs/{org}/webhooks` and `/webhooks/{webhook_id}`: an org's webhooks and their deliveries."""

from __future__ import annotations

import asyncio

from skyreg.meta.webhooks import DeliveryRecord, WebhookRecord
from skyreg.platform.api import models
from skyreg.platform.api.base import Call, Param, Route, bad_request
from skyreg.platform.webhooks import UnsafeTarget, check_target, seal_secret
from skyreg.services.inputs import CreateWebhook

MAX_DELIVERIES = 200


def webhook_model(hook: WebhookRecord) -> models.Webhook:
    return models.Webhook(
        id=hook.id,
        org=hook.org,
        app=hook.app,
        url=hook.url,
        events=list(hook.events),
        created_at=models.time(hook.created_at),
    )


def delivery_model(d: DeliveryRecord) -> models.Delivery:
    return models.Delivery(
        id=d.id,
        event_id=d.event_id,
        event_type=d.event_type,
        subject=d.subject,
        time=models.time(d.time),
        state=d.state,
        attempts=d.attempts,
        next_attempt_at=models.time(d.next_attempt_at),
        last_status=d.last_status,
        last_latency_ms=d.last_latency_ms,
        last_response=d.last_response,
        last_error=d.last_error,
        delivered_at=models.maybe_time(d.delivered_at),
    )


async def create_webhook(call: Call) -> models.NewWebhook:
    """A webhook; its secret is in this answer only."""
    services = call.services
    caller = call.caller()
    await services.webhooks.check_manager(caller, call.path("org"))  # before the body is read
    spec = call.body(CreateWebhook)
    try:
        await check_target(spec.url, services.webhook_allow_private)
    except UnsafeTarget as e:
        raise bad_request(f"webhook url refused: {e}") from None
    keys = await asyncio.to_thread(services.secrets.keyring.keys)  # may read the key file

    def seal(hook_id: str, secret: str) -> tuple[str, bytes]:
        return seal_secret(keys, hook_id, secret)

    hook, secret = await services.webhooks.create(caller, call.path("org"), spec, seal)
    shown = webhook_model(hook)
    return models.NewWebhook(
        **{f: getattr(shown, f) for f in shown.__struct_fields__}, secret=secret
    )


async def list_webhooks(call: Call) -> models.WebhookList:
    hooks = await call.services.webhooks.of_org(call.caller(), call.path("org"))
    return models.WebhookList(webhooks=[webhook_model(h) for h in hooks])


async def delete_webhook(call: Call) -> bytes:
    await call.services.webhooks.delete(call.caller(), call.path("webhook_id"))
    return b""


async def list_deliveries(call: Call) -> models.DeliveryList:
    limit = call.query_int("limit", 50, minimum=1, maximum=MAX_DELIVERIES)
    hook, deliveries = await call.services.webhooks.deliveries(
        call.caller(), call.path("webhook_id"), limit
    )
    return models.DeliveryList(
        webhook=webhook_model(hook), deliveries=[delivery_model(d) for d in deliveries]
    )


async def redeliver(call: Call) -> models.Delivery:
    raw = call.path("delivery_id")
    if not raw.isdigit() or len(raw) > 18:
        raise bad_request("delivery_id must be a delivery's id")
    again = await call.services.webhooks.redeliver(call.caller(), call.path("webhook_id"), int(raw))
    return delivery_model(again)


ROUTES = [
    Route(
        "POST", "/orgs/{org}/webhooks", create_webhook, "createWebhook",
        "Create a webhook of the org, or of one of its apps (admin, org token); its secret is "
        "shown once", models.NewWebhook, status=201, request=CreateWebhook,
        errors=(400, 403, 404),
        description="Events are POSTed as CloudEvents 1.0 JSON (`application/cloudevents+json`) "
        "with `X-Skyreg-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>`, one at "
        "a time per webhook in order, at least once (the event id de-duplicates), retried with "
        "backoff up to a cap. Event types: dev.skyreg.image.pushed, tag.deleted, "
        "manifest.deleted, release.created, release.complete, release.failed, machine.started, "
        "machine.failed, scan.finished.",
        response_description="The webhook and its secret",
    ),
    Route(
        "GET", "/orgs/{org}/webhooks", list_webhooks, "listWebhooks",
        "The org's webhooks (admin, org token)", models.WebhookList, errors=(403, 404),
        response_description="Webhooks",
    ),
    Route(
        "DELETE", "/webhooks/{webhook_id}", delete_webhook, "deleteWebhook",
        "Delete a webhook; its pending deliveries fail", None, status=204, errors=(403, 404),
        response_description="Deleted",
    ),
    Route(
        "GET", "/webhooks/{webhook_id}/deliveries", list_deliveries, "listWebhookDeliveries",
        "A webhook's latest deliveries: state, attempts, the receiver's status, latency and "
        "answer", models.DeliveryList, errors=(400, 403, 404),
        query=(Param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_DELIVERIES}),),
        response_description="Deliveries, newest first",
    ),
    Route(
        "POST", "/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", redeliver,
        "redeliverWebhook", "Send a delivery's event again (same event id), after the pending "
        "ones", models.Delivery, status=201, errors=(400, 403, 404),
        response_description="The new delivery",
    ),
]  # fmt: skip
