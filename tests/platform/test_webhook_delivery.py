"""Webhook delivery (`platform/webhooks.py`) against a real HTTP receiver on 127.0.0.1 and a
real SQLite outbox: signatures, CloudEvents, order, retries, refused targets, redirects."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from skyreg.auth.envelope import MasterKey, MasterKeys, SecretKeyError
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.meta.webhooks import (
    DELIVERED,
    FAILED,
    IMAGE_PUSHED,
    PENDING,
    TAG_DELETED,
    DeliveryRecord,
    WebhookMeta,
    emit,
)
from skyreg.platform.webhooks import (
    CONTENT_TYPE,
    SafeResolver,
    UnsafeTarget,
    WebhookSender,
    check_target,
    cloudevent,
    open_secret,
    seal_secret,
    signature,
)

SECRET = "s3cret-for-tests"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 recording every request: `/ok` answers 204, `/fail` 500,
    `/redirect` 302 to `/ok`, `/big` 200 with 1 MiB."""

    port: int = 0
    got: list[Received] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.append(Received(request.path, dict(request.headers), await request.read()))
        if request.path == "/ok":
            return web.Response(status=204)
        if request.path == "/redirect":
            raise web.HTTPFound(f"/ok?from={request.path}")
        if request.path == "/slow":
            await asyncio.sleep(1)
            return web.Response(status=204)
        if request.path == "/big":
            return web.Response(body=b"x" * (1 << 20))
        return web.Response(status=500, text="receiver says no")


@dataclass
class World:
    meta: RegistryMeta
    hooks: WebhookMeta
    keys: MasterKeys
    org_id: int

    async def hook(self, url: str) -> str:
        hook_id = WebhookMeta.new_id()
        key_id, sealed = seal_secret(self.keys, hook_id, SECRET)
        await self.hooks.run(
            self.hooks.create, hook_id, self.org_id, None, url, [], key_id, sealed, None
        )
        return hook_id

    async def emit(self, event_type: str, subject: str | None, **data: Any) -> None:
        await self.hooks.run(
            self.hooks._transaction,
            lambda conn: emit(
                conn,
                event_type,
                org_id=self.org_id,
                app_id=None,
                source="/apps/web",
                subject=subject,
                data=data,
            ),
        )

    def deliveries(self, hook_id: str) -> list[DeliveryRecord]:
        return list(reversed(self.hooks.deliveries(hook_id)))  # oldest first

    def sender(self, **kwargs: Any) -> WebhookSender:
        return WebhookSender(self.hooks, lambda: self.keys, **kwargs)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    meta = open_database(None, tmp_path)
    try:
        org = PlatformMeta(meta.db).create_org("acme")
        yield World(meta, WebhookMeta(meta.db), MasterKeys([MasterKey.generate()]), org.id)
    finally:
        meta.close()


def serve(test: Callable[[Receiver], Awaitable[None]]) -> None:
    """Run `test` with a receiver listening on a free port of 127.0.0.1."""

    async def main() -> None:
        receiver = Receiver()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            receiver.port = runner.addresses[0][1]
            await test(receiver)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def drain(sender: WebhookSender, done: Callable[[], bool], seconds: float = 20) -> None:
    """Step `sender` until `done()`."""
    async with asyncio.timeout(seconds):
        while not done():
            await sender.step()
            await asyncio.sleep(0.005)


def check_cloudevent(r: Received, d: DeliveryRecord) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(r.body)
    assert r.headers["Content-Type"] == CONTENT_TYPE
    assert r.headers["User-Agent"] == "skyreg-webhooks"
    assert r.headers["X-Skyreg-Delivery"] == str(d.id)
    assert r.headers["X-Skyreg-Event"] == d.event_type == event["type"]
    expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(r.headers["X-Skyreg-Signature"], expected)
    assert event["specversion"] == "1.0"
    assert event["id"] == d.event_id
    assert event["source"] == "/apps/web"
    assert event["datacontenttype"] == "application/json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event["time"])
    assert datetime.fromisoformat(event["time"]) == d.time
    if d.subject is None:
        assert "subject" not in event
    else:
        assert event["subject"] == d.subject
    return event


def test_signed_cloudevents_in_order_and_the_same_id_on_redelivery(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        hook = await world.hook(receiver.url("/ok"))
        await world.emit(IMAGE_PUSHED, "web:v1", tag="v1", n=1)
        await world.emit(TAG_DELETED, None, tag="v0", n=2)
        await world.emit(IMAGE_PUSHED, "web:v2", tag="v2", n=3)
        sender = world.sender(allow_private=True)
        try:
            await drain(sender, lambda: len(receiver.got) == 3)
            await drain(sender, lambda: world.hooks.due() == [])
            sent = world.deliveries(hook)
            assert [d.state for d in sent] == [DELIVERED] * 3
            assert all(d.attempts == 1 and d.last_status == 204 for d in sent)
            assert all(d.last_latency_ms is not None and d.last_latency_ms >= 0 for d in sent)
            events = [check_cloudevent(r, d) for r, d in zip(receiver.got, sent, strict=True)]
            assert [e["data"]["n"] for e in events] == [1, 2, 3]
            assert events[0]["subject"] == "web:v1"
            assert sender.delivered == 3 and sender.failed == 0

            again = await world.hooks.run(world.hooks.redeliver, hook, sent[1].id)
            assert again is not None and again.event_id == sent[1].event_id
            await drain(sender, lambda: len(receiver.got) == 4)
            redelivered = check_cloudevent(receiver.got[3], world.deliveries(hook)[3])
            assert redelivered["id"] == events[1]["id"]
            assert receiver.got[3].headers["X-Skyreg-Delivery"] == str(again.id)
            assert "skyreg_webhook_deliveries_delivered_total 4\n" in sender.metrics()
        finally:
            await sender.aclose()

    serve(test)


def test_a_failing_receiver_gets_max_attempts_and_later_events_wait(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        hook = await world.hook(receiver.url("/fail"))
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        await world.emit(IMAGE_PUSHED, "web:v2", n=2)
        sender = world.sender(allow_private=True, max_attempts=3, retry_base=0.01)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state == FAILED)
            first, second = world.deliveries(hook)
            assert first.attempts == 3 and first.last_status == 500
            assert first.last_response == "receiver says no"
            assert first.last_error == "HTTP 500"
            ids = [json.loads(r.body)["id"] for r in receiver.got]
            assert ids[:3] == [first.event_id] * 3
            assert set(ids[3:]) <= {second.event_id}  # the second only once the first failed
            await drain(sender, lambda: world.deliveries(hook)[1].state == FAILED)
            ids = [json.loads(r.body)["id"] for r in receiver.got]
            assert ids == [first.event_id] * 3 + [second.event_id] * 3
            assert sender.failed == 2 and sender.retried == 4 and sender.delivered == 0
        finally:
            await sender.aclose()

    serve(test)


def test_backoff_doubles_up_to_an_hour(world: World) -> None:
    sender = world.sender()
    assert [sender.backoff(n) for n in range(4)] == [5.0, 10.0, 20.0, 40.0]
    assert sender.backoff(20) == 3600.0
    assert sender.worker().name == "webhooks"


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]", "localhost", "[::ffff:127.0.0.1]"],
)
def test_private_targets_are_refused_at_creation_and_delivery(world: World, host: str) -> None:
    async def test(receiver: Receiver) -> None:
        url = receiver.url("/ok", host)
        with pytest.raises(UnsafeTarget, match="public addresses"):
            await check_target(url, allow_private=False)
        # A target that passed (or bypassed) the check is refused again when delivering.
        hook = await world.hook(url)
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        sender = world.sender(max_attempts=1)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state != PENDING)
        finally:
            await sender.aclose()
        (d,) = world.deliveries(hook)
        assert d.state == FAILED and d.last_status is None
        assert d.last_error is not None and "public addresses" in d.last_error
        assert receiver.got == []

    serve(test)


def test_allow_private_admits_loopback(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        await check_target(receiver.url("/ok"), allow_private=True)
        await check_target(receiver.url("/ok", "localhost"), allow_private=True)
        hook = await world.hook(receiver.url("/ok", "localhost"))
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        sender = world.sender(allow_private=True)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state == DELIVERED)
        finally:
            await sender.aclose()
        assert len(receiver.got) == 1

    serve(test)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("http://user:pw@example.com/", "user name or password"),
        ("http:///path", "needs a host"),
        ("http://example.com:0/", "port"),
        ("http://example.com:99999/", "malformed|port"),
        ("https://example.com/" + "a" * 2048, "2048"),
        ("http://[2002:7f00:1::]/", "loopback.*embedded"),  # 6to4 around 127.0.0.1
        ("http://[64:ff9b::a00:1]/", "private.*embedded"),  # NAT64 around 10.0.0.1
        ("http://100.64.0.1/", "not a public address"),  # shared address space
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[fe80::1]/", "link-local"),
        ("http://no-such-host.invalid/", "does not resolve"),
    ],
)
def test_check_target_refusals(url: str, message: str) -> None:
    with pytest.raises(UnsafeTarget, match=message):
        asyncio.run(check_target(url, allow_private=False))


def test_a_public_literal_passes() -> None:
    asyncio.run(check_target("https://93.184.215.14:8443/hook", allow_private=False))
    asyncio.run(check_target("https://[2606:4700::1111]/hook", allow_private=False))


def test_the_resolver_refuses_a_name_turned_private() -> None:
    async def test() -> None:
        resolver = SafeResolver()
        with pytest.raises(UnsafeTarget, match=r"localhost resolves to a loopback address"):
            await resolver.resolve("localhost", 80)
        assert (await SafeResolver(allow_private=True).resolve("localhost", 80))[0]["host"] == (
            "127.0.0.1"
        )

    asyncio.run(test())


def test_redirects_are_not_followed(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        hook = await world.hook(receiver.url("/redirect"))
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        sender = world.sender(allow_private=True, max_attempts=2, retry_base=0.01)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state == FAILED)
        finally:
            await sender.aclose()
        (d,) = world.deliveries(hook)
        assert d.attempts == 2 and d.last_status == 302
        assert d.last_error is not None and "redirects are not followed" in d.last_error
        assert [r.path for r in receiver.got] == ["/redirect", "/redirect"]

    serve(test)


def test_a_slow_receiver_times_out(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        hook = await world.hook(receiver.url("/slow"))
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        sender = world.sender(allow_private=True, timeout=0.2, max_attempts=1)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state == FAILED)
        finally:
            await sender.aclose()
        (d,) = world.deliveries(hook)
        assert d.last_error == "no answer within 0.2s" and d.last_status is None
        assert d.last_latency_ms is not None and d.last_latency_ms >= 200

    serve(test)


def test_a_large_answer_is_cut_to_an_excerpt(world: World) -> None:
    async def test(receiver: Receiver) -> None:
        hook = await world.hook(receiver.url("/big"))
        await world.emit(IMAGE_PUSHED, "web:v1", n=1)
        sender = world.sender(allow_private=True)
        try:
            await drain(sender, lambda: world.deliveries(hook)[0].state == DELIVERED)
        finally:
            await sender.aclose()
        (d,) = world.deliveries(hook)
        assert d.last_response == "x" * 500

    serve(test)


def test_secrets_are_bound_to_their_webhook() -> None:
    keys = MasterKeys([MasterKey.generate()])
    key_id, sealed = seal_secret(keys, "aaaa", SECRET)
    assert open_secret(keys, "aaaa", key_id, sealed) == SECRET
    assert SECRET.encode() not in sealed
    with pytest.raises(SecretKeyError):
        open_secret(keys, "bbbb", key_id, sealed)
    with pytest.raises(SecretKeyError, match="no master key"):
        open_secret(MasterKeys([MasterKey.generate()]), "aaaa", key_id, sealed)


def test_cloudevent_and_signature_are_stable() -> None:
    body = b'{"a":1}'
    assert signature("k", body) == ("sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest())
    d = DeliveryRecord(
        id=1,
        webhook_id="h",
        event_id="e1",
        event_type=IMAGE_PUSHED,
        source="/apps/web",
        subject=None,
        time=datetime.fromisoformat("2026-01-02T03:04:05+00:00"),
        data='{"tag": "v1"}',
        state=PENDING,
        attempts=0,
        next_attempt_at=datetime.fromisoformat("2026-01-02T03:04:05+00:00"),
        last_status=None,
        last_latency_ms=None,
        last_response=None,
        last_error=None,
        delivered_at=None,
    )
    assert json.loads(cloudevent(d)) == {
        "specversion": "1.0",
        "id": "e1",
        "source": "/apps/web",
        "type": IMAGE_PUSHED,
        "time": "2026-01-02T03:04:05.000000Z",
        "datacontenttype": "application/json",
        "data": {"tag": "v1"},
    }


def test_webhooks_with_a_delivery_in_flight_leave_their_places_to_others(world: World) -> None:
    """Due deliveries are listed a batch at a time: webhooks the sender is still delivering to
    are left out of the query, so hanging receivers never crowd out due deliveries of others."""

    async def test() -> None:
        hooks = {await world.hook(f"http://127.0.0.1:9/hook{n}") for n in range(4)}
        await world.emit("dev.skyreg.image.pushed", None, n=1)  # one delivery per webhook
        first = await world.hooks.read(world.hooks.due, 3)
        busy = frozenset(d.delivery.webhook_id for d in first)
        assert len(busy) == 3  # a batch of three: one webhook's delivery is left out
        rest = await world.hooks.read(world.hooks.due, 3, busy)
        assert [d.delivery.webhook_id for d in rest] == sorted(hooks - busy)

    asyncio.run(test())
