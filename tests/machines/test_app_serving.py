"""Machines that really serve an app: `skyreg serve`, a real `skyreg agent --network` running
busybox web apps in their own network namespaces, and a real `skyreg proxy` in front, with a
client sending 200 requests/s through it while machines are replaced, killed or fail checks."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from skyreg.machines.network import HostNetwork
from tests.support.agents import RunningAgent, machine_top
from tests.support.inprocess import InProcessRegistry
from tests.support.netns import free_subnet, fresh_prefix, leftovers, network_problem
from tests.support.platform import Tenancy, cli_env, run_skyreg
from tests.support.serving import APP_PORT, Load, RunningProxy, probe_image, web_app_image
from tests.support.waiting import wait_for

_WHY = network_problem()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

APP = "web"
DRAIN = 1.5


@dataclass
class World:
    reg: InProcessRegistry
    admin: str
    agent: RunningAgent
    proxy: RunningProxy
    network: HostNetwork
    env: dict[str, str]  # the CLI's, with acme's org token

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), timeout=60, **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def machines(self, app: str = APP) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/apps/{app}/machines")["machines"])

    def live(self, app: str = APP) -> list[dict[str, Any]]:
        """Machines desired started that run."""
        return [
            m for m in self.machines(app) if m["desired"] == "started" and m["state"] == "started"
        ]

    def newest_release(self, app: str = APP) -> dict[str, Any]:
        return dict(self.api("GET", f"/apps/{app}/releases", params={"limit": 1})["releases"][0])

    def deploy(self, image: str, count: int = 3, app: str = APP, **extra: Any) -> dict[str, Any]:
        body = {"image": image, "count": count, **extra}
        return dict(self.api("POST", f"/apps/{app}/releases", json=body))

    def settled(self, version: int, app: str = APP, timeout: float = 120) -> str:
        """Wait until release `version` is complete or failed; its status."""

        def done() -> str | None:
            for r in self.api("GET", f"/apps/{app}/releases", params={"limit": 20})["releases"]:
                if r["version"] == version and r["status"] in ("complete", "failed"):
                    return str(r["status"])
            return None

        try:
            return wait_for(done, f"release v{version} of {app} to settle", timeout=timeout)
        except AssertionError:
            raise AssertionError(f"agent log:\n{self.agent.log()}") from None

    def events(self, machine_id: str, app: str = APP) -> list[dict[str, Any]]:
        """The machine's latest events (as machine listings show them)."""
        return list(next(m for m in self.machines(app) if m["id"] == machine_id)["events"])

    def through_proxy(self, app: str = APP) -> requests.Response:
        return requests.get(f"{self.proxy.url}/", headers={"Host": f"{app}.localhost"}, timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    prefix = fresh_prefix("ts")
    subnet = free_subnet(16)
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("serving") / "data")
    network = HostNetwork(prefix, subnet)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: _assert_clean(prefix))
        stack.callback(network.teardown)  # after the agent: whatever it left behind
        top = machine_top(stack, "skyreg-serving-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.org("beta")
        for app, org in ((APP, "acme"), ("neighbour", "acme"), ("stranger", "beta")):
            t.app(app, org)
        admin = t.admin_secret()
        agent_token, _ = t.token("agent")  # every org's machines
        proxy_token, _ = t.token("proxy")  # every org's routes, nothing else
        org_token, _ = t.token("org", org="acme")
        agent = RunningAgent(
            reg.url,
            agent_token,
            top / "agent",
            top / "agent.log",
            extra_args=[
                "--network",
                str(subnet),
                "--network-prefix",
                prefix,
                "--drain",
                str(DRAIN),
            ],
        )
        stack.callback(agent.stop)
        agent.start()
        proxy = RunningProxy(reg.url, proxy_token, top / "proxy.log")
        stack.callback(proxy.stop)
        proxy.start()
        images = {
            f"{APP}:v1": web_app_image("serving-v1"),
            f"{APP}:v2": web_app_image("serving-v2"),
            f"{APP}:broken": web_app_image("serving-broken", healthy=False),
            "neighbour:v1": probe_image("probe-acme"),
            "stranger:v1": probe_image("probe-beta"),
        }
        for ref, image in images.items():
            layout = image.write_oci_layout(tmp_path_factory.mktemp("image") / "layout")
            push_image(layout, f"{reg.host}/{ref}", admin)
        env = cli_env(tmp_path_factory.mktemp("cli"), reg.url, org_token)
        # The app's service, as its users set it: port and an HTTP check.
        run_skyreg(
            env, "apps", "update", APP, "--port", str(APP_PORT), "--check-http", "/healthz",
            "--check-interval", "1s", "--check-timeout", "1s", "--check-grace", "4s",
        )  # fmt: skip
        yield World(reg, admin, agent, proxy, network, env)


def _assert_clean(prefix: str) -> None:
    assert leftovers(prefix) == [], "the agent left network state behind"


def _machine_pids(machine_id: str) -> list[int]:
    """Host pids of a machine's processes (their environment names it)."""
    marker = f"SKYREG_MACHINE_ID={machine_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
    return found


def _serving(world: World, want: set[str], timeout: float = 60) -> None:
    """Wait until requests through the proxy are answered by every machine of `want`."""
    seen: set[str] = set()

    def all_seen() -> bool:
        r = world.through_proxy()
        if r.status_code == 200:
            body = r.text
            assert body.startswith("machine="), body
            assert r.headers["skyreg-machine"] == body.split()[0].removeprefix("machine=")
            seen.add(r.headers["skyreg-machine"])
        return want <= seen

    wait_for(all_seen, f"answers from {sorted(want)} (seen {sorted(seen)})", timeout=timeout)


def test_count_three_gives_three_machines_three_addresses_all_serving_through_the_proxy(
    world: World,
) -> None:
    release = world.deploy(f"{APP}:v1", count=3)
    assert release["service"]["internal_port"] == APP_PORT, release
    assert world.settled(release["version"]) == "complete"
    machines = world.live()
    assert len(machines) == 3, machines
    addresses = {IPv4Address(m["address"]) for m in machines}
    assert len(addresses) == 3 and all(a in world.network.subnet for a in addresses), machines
    assert {m["health"] for m in machines} == {"passing"}, machines
    _serving(world, {m["id"] for m in machines})
    # Machines list shows them, as users read it.
    listing = run_skyreg(world.env, "machines", "list", "--app", APP)
    for m in machines:
        assert m["address"] in listing and m["id"] in listing, listing
    assert "passing" in listing, listing


def test_rolling_under_load_fails_no_request_and_keeps_the_websocket_until_its_machine_stops(
    world: World,
) -> None:
    old = {m["id"] for m in world.live()}
    assert len(old) == 3
    _serving(world, old)
    with Load(world.proxy.url, f"{APP}.localhost", websocket=True) as load:
        ws_machine = load.ws_machine
        assert ws_machine in old, (ws_machine, old)
        release = world.deploy(f"{APP}:v2", count=3)
        assert world.settled(release["version"]) == "complete"
        new = {m["id"] for m in world.live()}
        assert len(new) == 3 and not new & old
        done = time.time()
        _serving(world, new)
        time.sleep(1.0)
    failures = load.failures()
    print(f"rolling: {len(load.answers)} requests, {len(failures)} failed, {load.ws_ticks} ticks")
    assert failures == [], failures[:10]
    assert len(load.answers) > 200 * 5, len(load.answers)  # it did run for the whole rollout
    assert set(load.machines(since=done + 1.0)) <= new
    # The WebSocket stayed open (ticking) until its machine began to stop, and not after it.
    stops = [e for e in world.events(ws_machine) if e["message"].startswith("Draining")]
    assert stops, world.events(ws_machine)
    draining_at = _epoch(stops[0]["at"])
    assert load.ws_closed_at >= draining_at, (load.ws_closed_at, draining_at)
    assert load.ws_last_tick >= draining_at - 0.5, (load.ws_last_tick, draining_at)
    # Rolling: one at a time, each old machine stopped only after a new one was healthy.
    assert _one_at_a_time(world, old, new)


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _one_at_a_time(world: World, old: set[str], new: set[str]) -> bool:
    """Each old machine's drain began after some new machine passed its checks, and the new
    machines passed at three distinct times, each before the next old machine drained."""
    passed = sorted(
        min(
            _epoch(e["at"])
            for e in world.events(mid)
            if e["message"].startswith("Health checks passing")
        )
        for mid in new
    )
    drained = sorted(
        _epoch(e["at"])
        for mid in old
        for e in world.events(mid)
        if e["message"].startswith("Draining")
    )
    assert len(passed) >= 3 and len(drained) == 3, (passed, drained)
    return all(passed[i] <= drained[i] for i in range(3)) and passed[1] >= drained[0]


def test_a_killed_machine_costs_at_most_a_second_of_failed_requests(world: World) -> None:
    machines = {m["id"] for m in world.live()}
    _serving(world, machines)
    victim = sorted(machines)[0]
    with Load(world.proxy.url, f"{APP}.localhost") as load:
        time.sleep(1.0)
        killed_at = time.time()
        for pid in _machine_pids(victim):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(4.0)
    failures = load.failures(since=killed_at - 0.5)
    span = failures[-1].at - failures[0].at if failures else 0.0
    print(f"killed: {len(load.answers)} requests, {len(failures)} failed over {span:.3f}s")
    if failures:
        span = failures[-1].at - failures[0].at
        assert span <= 1.0, (span, failures[:5])
    after = load.machines(since=killed_at + 1.5)
    assert victim not in after and set(after) == machines - {victim}, after


def test_a_release_whose_checks_never_pass_fails_and_the_old_machines_keep_serving(
    world: World,
) -> None:
    before = {m["id"] for m in world.live()}
    assert before
    _serving(world, before)
    with Load(world.proxy.url, f"{APP}.localhost") as load:
        release = world.deploy(f"{APP}:broken", count=len(before))
        assert world.settled(release["version"]) == "failed"
        time.sleep(1.0)
    print(f"failing check: {len(load.answers)} requests, {len(load.failures())} failed")
    assert load.failures() == [], load.failures()[:10]
    assert set(load.machines()) <= before
    assert {m["id"] for m in world.live()} == before
    broken = [m for m in world.machines() if m["release_version"] == release["version"]]
    assert broken and any(m["health"] == "critical" for m in broken), broken


def test_a_machine_of_another_org_cannot_connect_to_a_machine_of_this_org(world: World) -> None:
    target = next(m for m in world.live() if m["health"] == "passing")
    env = {"TARGET": target["address"]}
    for app in ("neighbour", "stranger"):
        world.deploy(f"{app}:v1", count=1, app=app, env=env)

    def result(app: str) -> str | None:
        for line in world.api("GET", f"/apps/{app}/logs")["lines"]:
            if "probe result: " in line["line"]:
                return str(line["line"].split("probe result: ", 1)[1])
        return None

    same_org = wait_for(lambda: result("neighbour"), "acme's probe", timeout=90)
    assert f"machine={target['id']}" in same_org, same_org
    other_org = wait_for(lambda: result("stranger"), "beta's probe", timeout=90)
    # Refused by the host (icmp admin-prohibited): the connect fails at once, nothing answers.
    assert "machine=" not in other_org and "No route to host" in other_org, other_org
