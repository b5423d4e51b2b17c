"""`skyreg agent --network`: a real agent runs busybox machines, each in its own network namespace
on a private subnet, health-checks them at their address and drains them before stopping.

Needs root and ip, iptables, nsenter, setpriv. Every name the agent makes starts with a unique
prefix and lives in a unique 10.x subnet; all of it is removed in the end, failure or not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from skyreg.machines.network import HostNetwork
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import Entry, build_app_image
from tests.support.inprocess import InProcessRegistry
from tests.support.netns import free_subnet, fresh_prefix, leftovers, network_problem
from tests.support.platform import Tenancy
from tests.support.waiting import wait_for

_WHY = network_problem()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

APP = "web"
PORT = 8080
DRAIN = 1.5
# Serves /www on PORT in its own network; first says whether a listener of the host's (on every
# address, at $HOST_PORT) can be reached through the gateway ($GATEWAY).
SCRIPT = (
    "if /bin/busybox wget -T 3 -q -O /dev/null http://$GATEWAY:$HOST_PORT/ 2>/dev/null; "
    "then echo host reachable; else echo host unreachable; fi; "
    f"exec /bin/busybox httpd -f -p {PORT} -h /www"
)


class HostListener:
    """A TCP service of the host on every address: it answers anyone who connects."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    agent: RunningAgent
    prefix: str
    subnet: IPv4Network

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), timeout=60, **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def release(self, version: int) -> dict[str, Any]:
        found = self.api("GET", f"/apps/{APP}/releases", params={"limit": 100})["releases"]
        return dict(next(r for r in found if r["version"] == version))

    def machines(self, version: int | None = None) -> list[dict[str, Any]]:
        found = self.api("GET", f"/apps/{APP}/machines")["machines"]
        return [m for m in found if version is None or m["release_version"] == version]

    def machine(self, machine_id: str) -> dict[str, Any]:
        return next(m for m in self.machines() if m["id"] == machine_id)

    def log_of(self, machine_id: str) -> list[str]:
        lines = self.api("GET", f"/apps/{APP}/logs")["lines"]
        return [str(line["line"]) for line in lines if line["machine_id"] == machine_id]

    def wait(self, check: Any, what: str, timeout: float = 90) -> Any:
        try:
            return wait_for(check, what, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{what}: agent log:\n{self.agent.log()}") from None


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    prefix = fresh_prefix("n")
    subnet = free_subnet(20)
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("netagent") / "data")
    listener = HostListener()
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: HostNetwork(prefix, subnet).teardown())
        stack.callback(listener.close)
        top = machine_top(stack, "skyreg-netagent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(APP, "acme")
        admin = t.admin_secret()
        agent_token, _ = t.token("agent", org="acme")
        args = ["--network", str(subnet), "--network-prefix", prefix, "--drain", str(DRAIN)]
        agent = RunningAgent(
            reg.url, agent_token, top / "agent", top / "agent.log", extra_args=args
        )
        stack.callback(agent.stop)
        agent.start()
        image = build_app_image(
            "net",
            [
                Entry("www", "dir", mode=0o755),
                Entry("www/index.html", "file", data=b"hello from my namespace\n"),
                Entry("www/healthz", "file", data=b"ok\n"),
            ],
            cmd=["/bin/sh", "-c", SCRIPT],
        )
        layout = image.write_oci_layout(tmp_path_factory.mktemp("image") / "layout")
        push_image(layout, f"{reg.host}/{APP}:v1", admin)
        gateway = subnet.network_address + 1  # the first org's block is the subnet's first
        env = {"GATEWAY": str(gateway), "HOST_PORT": str(listener.port)}
        p = Platform(reg, admin, agent, prefix, subnet)
        p.api("PATCH", f"/apps/{APP}", json={"service": _service("/healthz")})
        p.api("POST", f"/apps/{APP}/releases", json={"image": f"{APP}:v1", "env": env})
        yield p
    assert leftovers(prefix) == []


def _service(path: str) -> dict[str, Any]:
    check = {"type": "http", "path": path, "interval": 1.0, "timeout": 1.0, "grace_period": 3.0}
    return {
        "internal_port": PORT,
        "checks": [check, {"type": "tcp", "interval": 1.0, "timeout": 1.0}],
    }


def _get(address: str, path: str = "/") -> bytes | None:
    try:
        r = requests.get(f"http://{address}:{PORT}{path}", timeout=3)
    except requests.RequestException:
        return None
    return r.content if r.status_code == 200 else None


def _machine_pid(machine_id: str) -> int | None:
    marker = f"SKYREG_MACHINE_ID={machine_id}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    return int(entry)
    return None


def test_a_machine_runs_in_its_namespace_passes_its_checks_and_reaches_no_host_service(
    platform: Platform,
) -> None:
    p = platform
    p.wait(lambda: p.release(1)["status"] == "complete", "release v1 complete (health passing)")
    [m] = p.machines(1)
    assert m["state"] == "started" and m["health"] == "passing"
    address = IPv4Address(m["address"])
    assert address in p.subnet
    assert _get(str(address)) == b"hello from my namespace\n"  # the host reaches the machine
    events = [e["message"] for e in m["events"]]
    assert "Health checks passing" in events, events
    # The agent's mounts (the named namespace too) are private to it: seen through its root.
    netns = Path(f"/proc/{p.agent.pid}/root/run/netns/{p.prefix}-{m['id']}")
    pid = _machine_pid(m["id"])
    assert pid is not None
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
    assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    p.wait(lambda: "host unreachable" in p.log_of(m["id"]), "the machine's reachability probe")
    assert "host reachable" not in p.log_of(m["id"])


def test_a_release_failing_its_checks_fails_and_the_old_machine_keeps_serving(
    platform: Platform,
) -> None:
    p = platform
    [old] = [m for m in p.machines(1) if m["desired"] == "started"]
    body = {"image": f"{APP}:v1", "service": _service("/missing")}
    new = p.api("POST", f"/apps/{APP}/releases", json=body)
    version = new["version"]
    p.wait(lambda: p.release(version)["status"] == "failed", "the release failed its checks")
    critical = p.wait(
        lambda: [m for m in p.machines(version) if m["health"] == "critical"], "a critical one"
    )
    events = [e["message"] for e in critical[0]["events"]]
    assert any(
        e.startswith("Health checks critical:") and "/missing" in e and "404" in e for e in events
    ), events
    assert "Health checks passing" not in events
    # The failed release's machines stop (and leave the network); the old one keeps serving.
    p.wait(
        lambda: all(m["state"] in ("stopped", "failed") for m in p.machines(version)),
        "the failed release's machines stopped",
    )
    for m in p.machines(version):
        p.wait(lambda m=m: not Path(f"/run/netns/{p.prefix}-{m['id']}").exists(), "detached")
    assert p.machine(old["id"])["state"] == "started"
    assert _get(old["address"]) == b"hello from my namespace\n"


def test_a_stopped_machine_drains_then_stops_and_leaves_the_network(platform: Platform) -> None:
    p = platform
    [m] = [m for m in p.machines(1) if m["desired"] == "started"]
    p.api("POST", f"/machines/{m['id']}/stop")
    done = p.wait(lambda: (x := p.machine(m["id"]))["state"] == "stopped" and x, "stopped")
    events = {e["message"]: e["at"] for e in done["events"]}
    drain = next(k for k in events if k.startswith("Draining for"))
    assert drain == f"Draining for {DRAIN:g}s"
    stopped = next(k for k in events if k.startswith("Machine stopped"))
    waited = datetime.fromisoformat(events[stopped]) - datetime.fromisoformat(events[drain])
    assert waited.total_seconds() >= DRAIN - 0.2
    p.wait(lambda: not Path(f"/run/netns/{p.prefix}-{m['id']}").exists(), "its netns removed")
    assert _get(m["address"]) is None
