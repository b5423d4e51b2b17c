"""Webhooks: an org's subscriptions, and the outbox their deliveries wait in.

Events are written in the transaction of the change that made them (`emit`, called by the
metadata writers: a push, a tag or manifest deletion, a release created, complete or failed, a
machine started or failed, a scan matched): one `webhook_deliveries` row per webhook that wants
the event, so a crash after the change never loses its deliveries. The `webhooks` worker
(`platform/webhooks.py` `WebhookSender`) takes, per webhook, its oldest pending delivery once
due (`due`: deliveries of one webhook go out in order, one at a time) and records each attempt
(`attempted`): delivered, or due again after a backoff, or failed once the attempts reach the
cap. The event's id (the CloudEvents `id`) is the same in every delivery and redelivery of it.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from skyreg.meta import schema as s
from skyreg.meta.db import SqlStore

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
PREFIX = "dev.skyreg."
IMAGE_PUSHED = PREFIX + "image.pushed"
TAG_DELETED = PREFIX + "tag.deleted"
MANIFEST_DELETED = PREFIX + "manifest.deleted"
RELEASE_CREATED = PREFIX + "release.created"
RELEASE_COMPLETE = PREFIX + "release.complete"
RELEASE_FAILED = PREFIX + "release.failed"
MACHINE_STARTED = PREFIX + "machine.started"
MACHINE_FAILED = PREFIX + "machine.failed"
SCAN_FINISHED = PREFIX + "scan.finished"
EVENT_TYPES = (
    IMAGE_PUSHED,
    TAG_DELETED,
    MANIFEST_DELETED,
    RELEASE_CREATED,
    RELEASE_COMPLETE,
    RELEASE_FAILED,
    MACHINE_STARTED,
    MACHINE_FAILED,
    SCAN_FINISHED,
)
MAX_WEBHOOKS_PER_ORG = 20
MAX_EXCERPT = 500
_w, _d = s.webhooks, s.webhook_deliveries


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def emit(
    conn: Connection,
    event_type: str,
    *,
    org_id: int,
    app_id: int | None,
    source: str,
    subject: str | None,
    data: Mapping[str, Any],
) -> int:
    """Queue `event_type` for every live webhook of the org that wants it (an app's webhooks
    only for that app's events), in the caller's transaction; the deliveries queued."""
    hooks = conn.execute(
        select(_w.c.id, _w.c.events).where(
            _w.c.org_id == org_id,
            _w.c.deleted_at.is_(None),
            or_(_w.c.app_id.is_(None), _w.c.app_id == app_id),
        )
    ).all()
    wanted = [h.id for h in hooks if event_type in json.loads(h.events) or h.events == "[]"]
    if not wanted:
        return 0
    now, event_id, body = _now(), uuid.uuid4().hex, json.dumps(dict(data), sort_keys=True)
    conn.execute(
        _d.insert(),
        [
            {
                "webhook_id": hook,
                "event_id": event_id,
                "event_type": event_type,
                "source": source,
                "subject": subject,
                "time": now,
                "data": body,
                "state": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
            }
            for hook in wanted
        ],
    )
    return len(wanted)


def emit_for_repository(
    conn: Connection, event_type: str, repository: str, subject: str, data: Mapping[str, Any]
) -> int:
    """`emit` for an event of a repository: to its app's org (nothing for a repository of no
    app: a registry without the platform)."""
    app = conn.execute(
        select(s.apps.c.id, s.apps.c.org_id, s.apps.c.name).where(
            s.apps.c.name == repository.split("/", 1)[0]
        )
    ).first()
    if app is None:
        return 0
    return emit(
        conn,
        event_type,
        org_id=int(app.org_id),
        app_id=int(app.id),
        source=f"/apps/{app.name}",
        subject=subject,
        data=data,
    )


def emit_for_app(
    conn: Connection, event_type: str, app_id: int, subject: str, data: Mapping[str, Any]
) -> int:
    """`emit` for an event of the app `app_id`."""
    app = conn.execute(select(s.apps.c.org_id, s.apps.c.name).where(s.apps.c.id == app_id)).first()
    if app is None:
        return 0
    return emit(
        conn,
        event_type,
        org_id=int(app.org_id),
        app_id=app_id,
        source=f"/apps/{app.name}",
        subject=subject,
        data=data,
    )


@dataclass(frozen=True)
class WebhookRecord:
    id: str
    org_id: int
    org: str
    app: str | None
    url: str
    events: tuple[str, ...]
    key_id: str
    sealed_secret: bytes
    created_at: datetime


@dataclass(frozen=True)
class DeliveryRecord:
    """A delivery: the event it carries and where its attempts stand."""

    id: int
    webhook_id: str
    event_id: str
    event_type: str
    source: str
    subject: str | None
    time: datetime
    data: str  # JSON
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_latency_ms: int | None
    last_response: str | None
    last_error: str | None
    delivered_at: datetime | None


@dataclass(frozen=True)
class DueDelivery:
    """A delivery to make now, with where it goes and the sealed secret that signs it."""

    delivery: DeliveryRecord
    url: str
    key_id: str
    sealed_secret: bytes
    org_id: int = 0  # the webhook's org (the sender bounds each org's deliveries in flight)


_HOOK_COLUMNS = (
    _w.c.id,
    _w.c.org_id,
    s.orgs.c.name,
    s.apps.c.name,
    _w.c.url,
    _w.c.events,
    _w.c.key_id,
    _w.c.sealed_secret,
    _w.c.created_at,
)
_HOOKS_FROM = _w.join(s.orgs, s.orgs.c.id == _w.c.org_id).outerjoin(
    s.apps, s.apps.c.id == _w.c.app_id
)


def _hook(row: Any) -> WebhookRecord:
    return WebhookRecord(
        id=row[0],
        org_id=int(row[1]),
        org=row[2],
        app=row[3],
        url=row[4],
        events=tuple(json.loads(row[5])),
        key_id=row[6],
        sealed_secret=bytes(row[7]),
        created_at=_aware(row[8]) or _now(),
    )


def _delivery(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        id=int(row.id),
        webhook_id=row.webhook_id,
        event_id=row.event_id,
        event_type=row.event_type,
        source=row.source,
        subject=row.subject,
        time=_aware(row.time) or _now(),
        data=row.data,
        state=row.state,
        attempts=int(row.attempts),
        next_attempt_at=_aware(row.next_attempt_at) or _now(),
        last_status=row.last_status,
        last_latency_ms=row.last_latency_ms,
        last_response=row.last_response,
        last_error=row.last_error,
        delivered_at=_aware(row.delivered_at),
    )


class TooManyWebhooks(Exception):
    """An org has MAX_WEBHOOKS_PER_ORG webhooks already."""


class WebhookMeta(SqlStore):
    """Webhooks and their deliveries."""

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(8)

    def sealed_with_others(
        self, key_id: str, after: str = "", limit: int = 500
    ) -> list[tuple[str, str, bytes]]:
        """(id, key id, sealed secret) of live webhooks whose secret is sealed under another
        master key than `key_id`, by id after `after`."""
        with self._read() as conn:
            rows = conn.execute(
                select(_w.c.id, _w.c.key_id, _w.c.sealed_secret)
                .where(_w.c.key_id != key_id, _w.c.id > after, _w.c.deleted_at.is_(None))
                .order_by(_w.c.id)
                .limit(limit)
            ).all()
        return [(str(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def reseal(self, hook_id: str, old: bytes, key_id: str, sealed: bytes) -> bool:
        """Replace a webhook's sealed secret, unless it changed meantime; whether it did."""

        def work(conn: Connection) -> bool:
            done = conn.execute(
                update(_w)
                .where(_w.c.id == hook_id, _w.c.sealed_secret == old)
                .values(key_id=key_id, sealed_secret=sealed)
            )
            return bool(done.rowcount)

        return self._transaction(work)

    def create(
        self,
        hook_id: str,
        org_id: int,
        app_id: int | None,
        url: str,
        events: list[str],
        key_id: str,
        sealed_secret: bytes,
        created_by: str | None,
    ) -> WebhookRecord:
        def work(conn: Connection) -> WebhookRecord:
            count = conn.execute(
                select(func.count())
                .select_from(_w)
                .where(_w.c.org_id == org_id, _w.c.deleted_at.is_(None))
            ).scalar()
            if int(count or 0) >= MAX_WEBHOOKS_PER_ORG:
                raise TooManyWebhooks(f"an org has at most {MAX_WEBHOOKS_PER_ORG} webhooks")
            conn.execute(
                _w.insert().values(
                    id=hook_id,
                    org_id=org_id,
                    app_id=app_id,
                    url=url,
                    events=json.dumps(sorted(set(events))),
                    key_id=key_id,
                    sealed_secret=sealed_secret,
                    created_at=_now(),
                    created_by=created_by,
                )
            )
            row = conn.execute(
                select(*_HOOK_COLUMNS).select_from(_HOOKS_FROM).where(_w.c.id == hook_id)
            ).one()
            return _hook(row)

        return self._transaction(work)

    def get(self, hook_id: str) -> WebhookRecord | None:
        with self._read() as conn:
            row = conn.execute(
                select(*_HOOK_COLUMNS)
                .select_from(_HOOKS_FROM)
                .where(_w.c.id == hook_id, _w.c.deleted_at.is_(None))
            ).first()
        return None if row is None else _hook(row)

    def of_org(self, org_id: int) -> list[WebhookRecord]:
        with self._read() as conn:
            rows = conn.execute(
                select(*_HOOK_COLUMNS)
                .select_from(_HOOKS_FROM)
                .where(_w.c.org_id == org_id, _w.c.deleted_at.is_(None))
                .order_by(_w.c.created_at, _w.c.id)
            ).all()
        return [_hook(r) for r in rows]

    def delete(self, hook_id: str) -> bool:
        """Delete a webhook: nothing more is queued for it, what is pending fails."""

        def work(conn: Connection) -> bool:
            now = _now()
            done = conn.execute(
                update(_w)
                .where(_w.c.id == hook_id, _w.c.deleted_at.is_(None))
                .values(deleted_at=now)
            )
            conn.execute(
                update(_d)
                .where(_d.c.webhook_id == hook_id, _d.c.state == PENDING)
                .values(state=FAILED, last_error="the webhook was deleted")
            )
            return bool(done.rowcount)

        return self._transaction(work)

    def deliveries(self, hook_id: str, limit: int = 100) -> list[DeliveryRecord]:
        """The webhook's latest deliveries, newest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(_d).where(_d.c.webhook_id == hook_id).order_by(_d.c.id.desc()).limit(limit)
            ).all()
        return [_delivery(r) for r in rows]

    def redeliver(self, hook_id: str, delivery_id: int) -> DeliveryRecord | None:
        """Queue a delivery's event again for its webhook (the same event id), at the end."""

        def work(conn: Connection) -> DeliveryRecord | None:
            row = conn.execute(
                select(_d).where(_d.c.id == delivery_id, _d.c.webhook_id == hook_id)
            ).first()
            if row is None:
                return None
            now = _now()
            result = conn.execute(
                _d.insert().values(
                    webhook_id=hook_id,
                    event_id=row.event_id,
                    event_type=row.event_type,
                    source=row.source,
                    subject=row.subject,
                    time=row.time,
                    data=row.data,
                    state=PENDING,
                    attempts=0,
                    next_attempt_at=now,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            new_id = key[0]
            return _delivery(conn.execute(select(_d).where(_d.c.id == new_id)).one())

        return self._transaction(work)

    # -- the worker's side -----------------------------------------------------------------

    def due(self, limit: int = 50, busy: frozenset[str] = frozenset()) -> list[DueDelivery]:
        """Per live webhook (but those in `busy`: a delivery of theirs is in flight), its oldest
        pending delivery, when that one is due (a delivery waits for the ones before it: order
        is kept)."""
        heads = (
            select(func.min(_d.c.id).label("id"))
            .where(_d.c.state == PENDING)
            .group_by(_d.c.webhook_id)
            .subquery()
        )
        query = (
            select(_d, _w.c.url, _w.c.key_id, _w.c.sealed_secret, _w.c.org_id)
            .select_from(_d.join(heads, heads.c.id == _d.c.id).join(_w, _w.c.id == _d.c.webhook_id))
            .where(_d.c.next_attempt_at <= _now(), _w.c.deleted_at.is_(None))
            .order_by(_d.c.id)
            .limit(limit)
        )
        if busy:
            query = query.where(_d.c.webhook_id.not_in(sorted(busy)))
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            DueDelivery(_delivery(r), r.url, r.key_id, bytes(r.sealed_secret), int(r.org_id))
            for r in rows
        ]

    def attempted(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: int | None,
        latency_ms: int | None,
        response: str | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """Record an attempt: delivered; else due again at `retry_at`, or failed (None)."""
        values: dict[str, Any] = {
            "attempts": _d.c.attempts + 1,
            "last_status": status,
            "last_latency_ms": latency_ms,
            "last_response": (response or "")[:MAX_EXCERPT] or None,
            "last_error": (error or "")[:MAX_EXCERPT] or None,
        }
        if delivered:
            values.update(state=DELIVERED, delivered_at=_now())
        elif retry_at is None:
            values["state"] = FAILED
        else:
            values["next_attempt_at"] = retry_at
        self._transaction(
            lambda conn: conn.execute(
                update(_d)
                .where(and_(_d.c.id == delivery_id, _d.c.state == PENDING))
                .values(**values)
            )
        )
