"""A hostile tenant against webhooks and the audit log: org B reaching org A's webhooks, URLs
that try to make the server call its own network, receivers that hang or flood, and calls that
try to leave no audit entry, a forged one, or one that breaks the log's readers."""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from skyreg.auth.envelope import MasterKey, MasterKeys
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.meta.webhooks import DELIVERED, FAILED, IMAGE_PUSHED, PENDING, WebhookMeta, emit
from skyreg.platform.webhooks import WebhookSender, seal_secret
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, cli_env, refused, run_skyreg
from tests.support.waiting import wait_for

# -- a receiver in a thread, for the server-level tests --------------------------------------


@dataclass
class Inbox:
    """Every request a `ThreadingHTTPServer` on 127.0.0.1 got (it answers 204)."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    box = Inbox()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            box.bodies.append(json.loads(self.rfile.read(size)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    """A server delivering to 127.0.0.1 (the receivers of these tests)."""
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("hooked") / "data",
        options={
            "webhook_allow_private": True,
            "webhook_retry_base": 0.05,
            "webhook_max_attempts": 3,
        },
    )
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    """A server as shipped: no private webhook targets."""
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("strict") / "data")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@dataclass
class Org:
    name: str
    app: str
    token: str
    token_id: str
    readonly: str
    deploy: str


def _org(reg: InProcessRegistry) -> Org:
    t = Tenancy(reg.data_dir)
    name, app = f"org{uuid.uuid4().hex[:8]}", f"app{uuid.uuid4().hex[:8]}"
    t.org(name)
    t.app(app, name)
    token, token_id = t.token("org", org=name)
    readonly = t.token("readonly", org=name)[0]
    deploy = t.token("deploy", org=name, app=app)[0]
    return Org(name, app, token, token_id, readonly, deploy)


def _log(reg: InProcessRegistry, org: Org) -> list[dict[str, Any]]:
    return list(answer(api(reg, "GET", f"/orgs/{org.name}/audit", org.token), 200)["entries"])


# -- 1. another org's webhooks ---------------------------------------------------------------


def test_org_b_cannot_reach_org_a_s_webhooks(hooked: InProcessRegistry, inbox: Inbox) -> None:
    a, b = _org(hooked), _org(hooked)
    hook = answer(
        api(hooked, "POST", f"/orgs/{a.name}/webhooks", a.token, json={"url": inbox.url}), 201
    )
    session = requests.Session()
    session.auth = ("x", a.token)
    push_image(hooked.url, a.app, "v1", session=session)
    wait_for(lambda: inbox.bodies, "A's delivery", 30)
    listed = answer(api(hooked, "GET", f"/webhooks/{hook['id']}/deliveries", a.token), 200)
    delivery = listed["deliveries"][0]["id"]
    mine = answer(
        api(hooked, "POST", f"/orgs/{b.name}/webhooks", b.token, json={"url": inbox.url}), 201
    )
    for token in (b.token, b.readonly, b.deploy):
        refused(api(hooked, "GET", f"/orgs/{a.name}/webhooks", token), 404, "not_found")
        refused(api(hooked, "GET", f"/webhooks/{hook['id']}/deliveries", token), 404, "not_found")
        refused(api(hooked, "DELETE", f"/webhooks/{hook['id']}", token), 404, "not_found")
        refused(
            api(hooked, "POST", f"/webhooks/{hook['id']}/deliveries/{delivery}/redeliver", token),
            404,
            "not_found",
        )
        refused(
            api(hooked, "POST", f"/orgs/{a.name}/webhooks", token, json={"url": inbox.url}),
            404,
            "not_found",
        )
    # A's delivery id through B's own webhook; A's app in B's webhook.
    refused(
        api(hooked, "POST", f"/webhooks/{mine['id']}/deliveries/{delivery}/redeliver", b.token),
        404,
        "not_found",
    )
    refused(
        api(
            hooked,
            "POST",
            f"/orgs/{b.name}/webhooks",
            b.token,
            json={"url": inbox.url, "app": a.app},
        ),
        404,
        "not_found",
    )
    # A's own low-privilege tokens do not manage A's webhooks either.
    for token in (a.readonly, a.deploy):
        assert api(hooked, "GET", f"/orgs/{a.name}/webhooks", token).status_code in (403, 404)
        assert api(hooked, "DELETE", f"/webhooks/{hook['id']}", token).status_code in (403, 404)
        assert api(
            hooked, "POST", f"/orgs/{a.name}/webhooks", token, json={"url": inbox.url}
        ).status_code in (403, 404)
    # Still there, and B's all-events webhook never saw A's push.
    assert [
        h["id"]
        for h in answer(api(hooked, "GET", f"/orgs/{a.name}/webhooks", a.token), 200)["webhooks"]
    ] == [hook["id"]]
    push_image(hooked.url, a.app, "v2", session=session)
    wait_for(lambda: len(inbox.bodies) >= 2, "A's second delivery", 30)
    time.sleep(1.5)
    assert len(inbox.bodies) == 2 and {e["source"] for e in inbox.bodies} == {f"/apps/{a.app}"}
    listed = answer(api(hooked, "GET", f"/webhooks/{mine['id']}/deliveries", b.token), 200)
    assert listed["deliveries"] == []


# -- 2. URLs that lead inward ----------------------------------------------------------------

INWARD = [
    "http://a@127.0.0.1/",
    "http://a:b@8.8.8.8@127.0.0.1/",
    "http://8.8.8.8;@127.0.0.1/",
    "http://8.8.8.8\\@127.0.0.1/",
    "http://2130706433/",
    "http://017700000001/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://127.1/",
    "http://127.0.0.1./",
    "http://localhost./",
    "http://LOCALHOST/",
    "http://0/",
    "http://[::]/",
    "http://[::1%25lo]/",
    "http://[fe80::1%25eth0]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:a9fe:a9fe::]/",  # 6to4 around 169.254.169.254
    "http://\uff11\uff12\uff17.0.0.1/",  # fullwidth digits: IDNA makes them 127
    "http://127\u30020\u30020\u30021/",  # ideographic full stops
    " http://127.0.0.1/",
    "http://127.0.0.1\t/",
    "HTTP://127.0.0.1/",
    "http://" + "a" * 2100 + ".example/",
    "http://" + ".".join(["a" * 63] * 30) + "/",
    "gopher://127.0.0.1:70/",
    "file:///etc/passwd",
    "unix:///var/run/docker.sock",
    "ws://8.8.8.8/",
    "http:///hook",
    "http://:80/",
]


def test_inward_urls_are_refused(strict: InProcessRegistry) -> None:
    a = _org(strict)
    made = []
    for url in INWARD:
        r = api(strict, "POST", f"/orgs/{a.name}/webhooks", a.token, json={"url": url})
        if r.status_code != 400:
            made.append((url, r.status_code, r.text[:200]))
    assert made == []
    assert answer(api(strict, "GET", f"/orgs/{a.name}/webhooks", a.token), 200)["webhooks"] == []


# -- 3. exhaustion ---------------------------------------------------------------------------


def test_webhook_count_and_event_lists_are_bounded(hooked: InProcessRegistry, inbox: Inbox) -> None:
    a = _org(hooked)
    path = f"/orgs/{a.name}/webhooks"
    for _ in range(20):
        answer(api(hooked, "POST", path, a.token, json={"url": inbox.url}), 201)
    refused(api(hooked, "POST", path, a.token, json={"url": inbox.url}), 400, "bad_request")
    other = _org(hooked)
    path = f"/orgs/{other.name}/webhooks"
    # 21 entries (the schema says maxItems 20, not enforced): harmless, a set is stored.
    many = [IMAGE_PUSHED] * 1000
    made = answer(
        api(hooked, "POST", path, other.token, json={"url": inbox.url, "events": many}), 201
    )
    assert made["events"] == [IMAGE_PUSHED]
    huge = ["dev.skyreg." + "x" * 100] * 20_000  # 2.4 MB
    assert api(
        hooked, "POST", path, other.token, json={"url": inbox.url, "events": huge}
    ).status_code in (400, 413)
    assert (
        api(
            hooked, "POST", path, other.token, json={"url": inbox.url, "events": ["x" * 10_000]}
        ).status_code
        == 400
    )
    assert len(answer(api(hooked, "GET", path, other.token), 200)["webhooks"]) == 1


@dataclass
class World:
    meta: RegistryMeta
    hooks: WebhookMeta
    keys: MasterKeys
    org_id: int

    async def hook(self, url: str, org_id: int | None = None) -> str:
        hook_id = WebhookMeta.new_id()
        key_id, sealed = seal_secret(self.keys, hook_id, "s3cret")
        org = self.org_id if org_id is None else org_id
        await self.hooks.run(self.hooks.create, hook_id, org, None, url, [], key_id, sealed, None)
        return hook_id

    async def emit(self, n: int, org_id: int | None = None) -> None:
        def work(conn: Any) -> int:
            return emit(
                conn,
                IMAGE_PUSHED,
                org_id=self.org_id if org_id is None else org_id,
                app_id=None,
                source="/apps/web",
                subject=None,
                data={"n": n},
            )

        await self.hooks.run(self.hooks._transaction, work)

    def states(self, hook_id: str) -> list[str]:
        return [d.state for d in self.hooks.deliveries(hook_id)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    meta = open_database(None, tmp_path)
    try:
        org = PlatformMeta(meta.db).create_org("acme")
        yield World(meta, WebhookMeta(meta.db), MasterKeys([MasterKey.generate()]), org.id)
    finally:
        meta.close()


@dataclass
class Hostile:
    """A receiver on 127.0.0.1: /ok 204, /hang never answers, /endless streams 200 for ever
    (1 GiB at most), /bomb a gzip of 128 MiB of zeros, /redirect 302 to /ok."""

    port: int = 0
    got: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.append(request.path)
        await request.read()
        if request.path == "/hang":
            await self.release.wait()
            return web.Response(status=204)
        if request.path == "/endless":
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            chunk = b"y" * (1 << 16)
            for _ in range(1 << 14):
                await resp.write(chunk)
            return resp
        if request.path == "/bomb":
            return web.Response(body=bomb(), headers={"Content-Encoding": "gzip"})
        if request.path == "/redirect":
            raise web.HTTPFound(self.url("/ok"))
        return web.Response(status=204)


@functools.cache
def bomb() -> bytes:
    """128 MiB of zeros, gzipped (about 128 KiB)."""
    return gzip.compress(b"\0" * (128 << 20), compresslevel=9)


def hostile(test: Any) -> None:
    async def main() -> None:
        receiver = Hostile()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            receiver.port = runner.addresses[0][1]
            await test(receiver)
        finally:
            receiver.release.set()
            await runner.cleanup()

    asyncio.run(main())


async def _run_worker(sender: WebhookSender, stop: asyncio.Event) -> None:
    """What `PeriodicWorker` does: a step, a pause, a step..."""
    while not stop.is_set():
        await sender.step()
        await asyncio.sleep(0.02)


def test_a_hanging_receiver_does_not_hold_back_other_webhooks(world: World) -> None:
    """Webhook X's receiver never answers; webhook Y's three deliveries go out while X's first
    attempt is still in flight (with X's attempt holding up the step, Y would wait for its
    60 s timeout, past this test's bound)."""

    async def test(receiver: Hostile) -> None:
        hang = await world.hook(receiver.url("/hang"))
        ok = await world.hook(receiver.url("/ok"))
        for n in range(3):
            await world.emit(n)
        sender = WebhookSender(world.hooks, lambda: world.keys, allow_private=True, timeout=60)
        stop = asyncio.Event()
        worker = asyncio.create_task(_run_worker(sender, stop))
        try:
            async with asyncio.timeout(30):
                while world.states(ok) != [DELIVERED] * 3:
                    await asyncio.sleep(0.02)
            # X's first attempt is still the one in flight: nothing recorded for it yet.
            assert [d.attempts for d in world.hooks.deliveries(hang)] == [0, 0, 0]
        finally:
            stop.set()
            receiver.release.set()
            await worker
            await sender.aclose()

    hostile(test)


def test_one_orgs_hanging_receivers_hold_only_its_share_of_the_delivery_slots(
    world: World,
) -> None:
    """Org A makes as many webhooks as the sender has slots, all to a receiver that never
    answers; org B's delivery still goes out while every one of A's first attempts is in flight
    (each org holds at most `per_org` slots: without that bound, B waits for A's timeouts)."""

    async def test(receiver: Hostile) -> None:
        platform = PlatformMeta(world.meta.db)
        other = (await platform.run(platform.create_org, "bravo")).id
        hanging = [await world.hook(receiver.url("/hang")) for _ in range(8)]
        ok = await world.hook(receiver.url("/ok"), org_id=other)
        await world.emit(0)
        await world.emit(1, org_id=other)
        sender = WebhookSender(world.hooks, lambda: world.keys, allow_private=True, timeout=60)
        assert sender.concurrency == len(hanging)
        stop = asyncio.Event()
        worker = asyncio.create_task(_run_worker(sender, stop))
        try:
            async with asyncio.timeout(30):
                while world.states(ok) != [DELIVERED]:
                    await asyncio.sleep(0.02)
            # None of A's attempts has ended (none timed out first), and A holds its share only.
            assert all(d.attempts == 0 for h in hanging for d in world.hooks.deliveries(h))
            assert receiver.got.count("/hang") == sender.per_org
        finally:
            stop.set()
            receiver.release.set()
            await worker
            await sender.aclose()

    hostile(test)


def test_endless_and_compressed_answers_are_bounded(world: World) -> None:
    async def test(receiver: Hostile) -> None:
        endless = await world.hook(receiver.url("/endless"))
        zipped = await world.hook(receiver.url("/bomb"))
        await world.emit(1)
        sender = WebhookSender(world.hooks, lambda: world.keys, allow_private=True, timeout=5)
        bomb()  # made before memory is measured
        tracemalloc.start()
        try:
            async with asyncio.timeout(60):  # the answers end (bounded read) or time out (5 s)
                while PENDING in world.states(endless) + world.states(zipped):
                    await sender.step()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            await sender.aclose()
        assert peak < 48 << 20, f"peak {peak >> 20} MiB"
        for hook in (endless, zipped):
            (d,) = world.hooks.deliveries(hook)
            assert d.state == DELIVERED and len(d.last_response or "") <= 500

    hostile(test)


@pytest.mark.parametrize(
    "host",
    [
        "127.1",
        "2130706433",
        "0x7f.1",
        "017700000001",
        "127.0.0.1.",
        "localhost.",
        "[::ffff:7f00:1]",
    ],
)
def test_legacy_forms_are_refused_at_delivery(world: World, host: str) -> None:
    """A webhook that got past creation (made while private targets were allowed, say) is still
    never delivered to loopback by a server that does not allow them."""

    async def test(receiver: Hostile) -> None:
        hook = await world.hook(receiver.url("/ok", host))
        await world.emit(1)
        sender = WebhookSender(world.hooks, lambda: world.keys, max_attempts=1, timeout=3)
        try:
            async with asyncio.timeout(10):
                while world.states(hook) == [PENDING]:
                    await sender.step()
        finally:
            await sender.aclose()
        assert world.states(hook) == [FAILED] and receiver.got == []

    hostile(test)


def test_a_redirect_inward_is_not_followed(world: World) -> None:
    async def test(receiver: Hostile) -> None:
        hook = await world.hook(receiver.url("/redirect"))
        await world.emit(1)
        sender = WebhookSender(world.hooks, lambda: world.keys, allow_private=True, max_attempts=1)
        try:
            async with asyncio.timeout(10):
                while world.states(hook) == [PENDING]:
                    await sender.step()
        finally:
            await sender.aclose()
        (d,) = world.hooks.deliveries(hook)
        assert d.state == FAILED and d.last_status == 302 and receiver.got == ["/redirect"]

    hostile(test)


# -- 4. the audit log ------------------------------------------------------------------------


def test_b_learns_nothing_of_a_from_the_audit_log(hooked: InProcessRegistry, inbox: Inbox) -> None:
    a, b = _org(hooked), _org(hooked)
    hook = answer(
        api(hooked, "POST", f"/orgs/{a.name}/webhooks", a.token, json={"url": inbox.url}), 201
    )
    refused(api(hooked, "GET", f"/orgs/{a.name}/audit", b.token), 404, "not_found")
    refused(api(hooked, "GET", f"/orgs/{a.name}/audit", a.readonly), 403, "forbidden")
    refused(api(hooked, "GET", "/audit", b.token), 403, "forbidden")
    # B's attempts on A's things are B's record, and name only what B typed.
    api(hooked, "DELETE", f"/webhooks/{hook['id']}", b.token)
    api(hooked, "POST", f"/orgs/{b.name}/webhooks", b.token, json={"url": inbox.url, "app": a.app})
    api(hooked, "POST", f"/orgs/{a.name}/webhooks", b.token, json={"url": inbox.url})
    theirs, mine = _log(hooked, a), _log(hooked, b)
    assert b.token_id not in {e["actor_id"] for e in theirs}
    assert {e["actor_id"] for e in mine} == {b.token_id}
    assert a.token_id not in json.dumps(mine) and a.token not in json.dumps(mine)
    assert len(mine) == 3


def test_refused_and_malformed_calls_leave_entries(hooked: InProcessRegistry) -> None:
    a = _org(hooked)
    path = f"/orgs/{a.name}/webhooks"
    before = len(_log(hooked, a))
    assert api(hooked, "POST", path, None, json={"url": "http://x/"}).status_code == 401
    assert api(hooked, "POST", path, "skyreg_bogus", json={"url": "http://x/"}).status_code == 401
    headers = {"Authorization": f"Bearer {a.token}", "Content-Type": "application/json"}
    url = hooked.url + "/api/v1" + path
    assert requests.post(url, data=b"not json{", headers=headers, timeout=30).status_code == 400
    assert (
        requests.post(url, data=b"{" + b" " * (1 << 20), headers=headers, timeout=30).status_code
        == 413
    )
    forged = {**headers, "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    assert (
        requests.post(url, json={"url": "ftp://x/"}, headers=forged, timeout=30).status_code == 400
    )
    entries = _log(hooked, a)[before:]
    assert [e["status"] for e in entries] == [401, 401, 400, 413, 400]
    assert {e["client"] for e in entries} == {"127.0.0.1"}
    assert entries[0]["actor_id"] is None and entries[2]["actor_id"] == a.token_id


NASTY = "x%0a%0d%1b%5b31m%1b%5d0;pwned%07%e2%80%ae"


def test_control_characters_in_targets_do_not_break_the_log_s_readers(
    hooked: InProcessRegistry, tmp_path: Path
) -> None:
    """A low-privilege token of A (and an anonymous caller) puts newlines and escape sequences
    into A's log through a path; the JSON-lines export stays one line an entry."""
    a = _org(hooked)
    assert api(hooked, "DELETE", f"/apps/{a.app}/images/{NASTY}", a.readonly).status_code == 403
    assert api(hooked, "DELETE", f"/apps/{a.app}/images/{NASTY}", None).status_code == 401
    entries = _log(hooked, a)
    assert [e["actor_kind"] for e in entries] == ["readonly", None]
    assert all("\n" in e["target"] and "\x1b" in e["target"] for e in entries)
    env = cli_env(tmp_path, hooked.url, a.token)
    lines = run_skyreg(env, "audit", "--org", a.name, "--jsonl").splitlines()
    assert [json.loads(line)["target"] for line in lines] == [e["target"] for e in entries]
    assert "deleteImage" in run_skyreg(env, "audit", "--org", a.name)


def test_escapes_in_a_target_do_not_reach_the_terminal(
    hooked: InProcessRegistry, tmp_path: Path
) -> None:
    """ANSI/OSC sequences an anonymous caller wrote into the org's log (recolour, retitle,
    erase lines to hide entries) must not reach the reader's terminal from `skyreg audit`."""
    a = _org(hooked)
    assert api(hooked, "DELETE", f"/apps/{a.app}/images/{NASTY}", None).status_code == 401
    env = cli_env(tmp_path, hooked.url, a.token)
    assert "\x1b" not in run_skyreg(env, "audit", "--org", a.name)


def test_markup_in_a_target_does_not_break_the_table(
    hooked: InProcessRegistry, tmp_path: Path
) -> None:
    """An anonymous caller who knows an app's name writes `[/x]` into its org's log: the
    table view of that log must still print (today: MarkupError, exit 1)."""
    a = _org(hooked)
    assert api(hooked, "DELETE", f"/apps/{a.app}/images/%5B%2Fx%5D", None).status_code == 401
    env = cli_env(tmp_path, hooked.url, a.token)
    assert "[/x]" in run_skyreg(env, "audit", "--org", a.name)
