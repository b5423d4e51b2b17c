"""Webhooks end to end: a receiver on 127.0.0.1 verifying every delivery's signature, a real
server (in process, or a `skyreg serve` process where it is killed), pushes by a real HTTP client
and the `skyreg webhooks` commands."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, cli_env, refused, run_skyreg
from tests.support.servers import RunningRegistry
from tests.support.waiting import wait_for


@dataclass
class Receiver:
    """An HTTP receiver in a thread: it keeps each delivery whose signature verifies."""

    secret: str = ""
    status: int = 200
    gate: threading.Event = field(default_factory=threading.Event)  # cleared: hold requests
    arrived: int = 0  # requests that reached the handler
    seen: list[dict[str, Any]] = field(default_factory=list)  # verified CloudEvents
    bad: list[str] = field(default_factory=list)  # requests whose signature did not verify
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        self.arrived += 1
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        body = await request.read()
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Skyreg-Signature", ""), expected):
            self.bad.append(request.headers.get("X-Skyreg-Signature", ""))
            return web.Response(status=400)
        assert request.headers["Content-Type"].startswith("application/cloudevents+json")
        self.seen.append(json.loads(body))
        return web.Response(status=self.status, text="ok")

    def start(self) -> None:
        self.gate.set()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_post("/hook", self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.gate.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["type"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def _tenant(data_dir: Path) -> tuple[str, str, str]:
    t = Tenancy(data_dir)
    org, app = f"org{uuid.uuid4().hex[:8]}", f"app{uuid.uuid4().hex[:8]}"
    t.org(org)
    t.app(app, org)
    return org, app, t.token("org", org=org)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("hooks") / "data",
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


def _create(env: dict[str, str], org: str, url: str, *extra: str) -> dict[str, Any]:
    made = json.loads(
        run_skyreg(env, "webhooks", "create", "--org", org, "--url", url, "--json", *extra)
    )
    assert made["secret"].startswith("whsec_")
    return made


def test_deliveries_are_signed_cloudevents_in_order(
    server: InProcessRegistry, receiver: Receiver, tmp_path: Path
) -> None:
    org, app, token = _tenant(server.data_dir)
    env = cli_env(tmp_path, server.url, token)
    made = _create(
        env,
        org,
        receiver.url,
        "--event",
        "dev.skyreg.image.pushed",
        "--event",
        "dev.skyreg.tag.deleted",
    )
    receiver.secret = made["secret"]
    session = requests.Session()
    session.auth = ("x", token)
    pushed = [push_image(server.url, app, f"v{i}", session=session).digest for i in range(5)]
    assert session.delete(f"{server.url}/v2/{app}/manifests/v0").status_code == 202
    wait_for(lambda: len(receiver.seen) >= 6, "six deliveries", 30)
    assert receiver.bad == []
    events = receiver.seen
    assert [e["data"]["digest"] for e in events[:5]] == pushed  # in the order of the pushes
    assert [e["type"] for e in events] == ["dev.skyreg.image.pushed"] * 5 + [
        "dev.skyreg.tag.deleted"
    ]
    first = events[0]
    assert first["specversion"] == "1.0" and first["source"] == f"/apps/{app}"
    assert first["data"]["tags"] == ["v0"] and first["subject"] == f"{app}@{pushed[0]}"
    assert len({e["id"] for e in events}) == 6
    # Deliveries are listed with their answers; a redelivery carries the same event id.
    listed = json.loads(run_skyreg(env, "webhooks", "deliveries", made["id"], "--json"))
    assert {d["state"] for d in listed["deliveries"]} == {"delivered"}
    assert all(d["last_status"] == 200 and d["last_response"] == "ok" for d in listed["deliveries"])
    oldest = listed["deliveries"][-1]
    run_skyreg(env, "webhooks", "redeliver", made["id"], str(oldest["id"]))
    wait_for(lambda: len(receiver.seen) >= 7, "the redelivery", 30)
    assert receiver.seen[-1]["id"] == oldest["event_id"]


def test_a_receiver_answering_500_gets_retries_up_to_the_cap(
    server: InProcessRegistry, receiver: Receiver, tmp_path: Path
) -> None:
    org, app, token = _tenant(server.data_dir)
    env = cli_env(tmp_path, server.url, token)
    made = _create(env, org, receiver.url)
    receiver.secret, receiver.status = made["secret"], 500
    session = requests.Session()
    session.auth = ("x", token)
    push_image(server.url, app, "v1", session=session)

    def failed() -> dict[str, Any] | None:
        listed = answer(api(server, "GET", f"/webhooks/{made['id']}/deliveries", token), 200)
        done = [d for d in listed["deliveries"] if d["state"] == "failed"]
        return done[0] if done else None

    delivery = wait_for(failed, "the delivery failed", 30)
    assert delivery["attempts"] == 3 and delivery["last_status"] == 500
    assert len(receiver.seen) == 3 and len({e["id"] for e in receiver.seen}) == 1


def test_private_targets_are_refused_unless_allowed(tmp_path: Path) -> None:
    reg = InProcessRegistry(data_dir=tmp_path / "data")
    reg.start()
    try:
        org, _, token = _tenant(reg.data_dir)
        for url in (
            "http://127.0.0.1:9/hook",
            "http://localhost/hook",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "file:///etc/passwd",
        ):
            message = refused(
                api(reg, "POST", f"/orgs/{org}/webhooks", token, json={"url": url}),
                400,
                "bad_request",
            )
            assert "refused" in message, (url, message)
        other_org, _, other = _tenant(reg.data_dir)
        refused(
            api(reg, "POST", f"/orgs/{org}/webhooks", other, json={"url": "x"}), 404, "not_found"
        )
        refused(api(reg, "GET", f"/orgs/{org}/webhooks", other), 404, "not_found")
        assert other_org
    finally:
        reg.stop()


def test_a_server_killed_before_delivering_delivers_after_restart_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The event is committed with the push; the server dies while its delivery is in flight
    (the receiver holds the request before reading it); after a restart it is delivered, and
    the receiver gets it exactly once."""
    reg = RunningRegistry(
        tmp_path / "data", extra_args=["--webhook-allow-private", "--webhook-retry-base", "0.2"]
    )
    reg.start()
    try:
        org, app, token = _tenant(reg.data_dir)
        made = answer(
            api(reg, "POST", f"/orgs/{org}/webhooks", token, json={"url": receiver.url}), 201
        )
        receiver.secret = made["secret"]
        receiver.gate.clear()  # hold what arrives, unread
        session = requests.Session()
        session.auth = ("x", token)
        image = push_image(reg.url, app, "v1", session=session)
        wait_for(lambda: receiver.arrived >= 1, "the delivery in flight", 30)
        reg.stop(signal.SIGKILL)
        receiver.gate.set()  # the held request's connection is gone: nothing was delivered
        reg.start()
        wait_for(lambda: receiver.events("dev.skyreg.image.pushed"), "the delivery", 30)

        def delivered() -> bool:
            listed = answer(api(reg, "GET", f"/webhooks/{made['id']}/deliveries", token), 200)
            return all(d["state"] == "delivered" for d in listed["deliveries"])

        wait_for(delivered, "the delivery recorded", 30)
        pushed = receiver.events("dev.skyreg.image.pushed")
        assert [e["data"]["digest"] for e in pushed] == [image.digest]
        assert receiver.bad == []
    finally:
        reg.stop()
