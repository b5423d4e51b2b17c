"""The agent loop end to end: `skyreg serve` + `skyreg agent` run real busybox machines."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.cli import run_skyreg_in_process
from tests.support.images import Entry, build_app_image
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy, cli_env, run_skyreg
from tests.support.servers import ServedRegistry
from tests.support.waiting import free_port, http_get, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]

APP = "web"


@dataclass
class Platform:
    reg: ServedRegistry
    admin: str
    agent: RunningAgent
    work: Path

    @property
    def agent_dir(self) -> Path:
        return self.agent.data_dir

    def machine_rootfs(self, machine_id: str) -> Path:
        """A machine's rootfs as the agent sees it (its overlay mounts are private to it)."""
        home = self.agent_dir / "machines" / machine_id / "rootfs"
        return Path(f"/proc/{self.agent.pid}/root") / home.relative_to("/")

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.reg.url}/api/v1{path}", auth=("x", token or self.admin), **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def push(self, marker: str, page: bytes, port: int, script: str) -> str:
        """Push an httpd image serving `page` on `port`; returns its tag."""
        image = build_app_image(
            marker,
            [
                Entry("www", "dir", mode=0o755),
                Entry("www/index.html", "file", data=page),
            ],
            cmd=["/bin/sh", "-c", script],
            env=[f"PORT={port}"],
        )
        layout = image.write_oci_layout(self.work / marker)
        push_image(layout, f"{self.reg.host}/{APP}:{marker}", self.admin)
        return marker

    def deploy(self, tag: str, strategy: str = "rolling") -> dict[str, Any]:
        body = {"image": f"{APP}:{tag}", "strategy": strategy}
        return dict(self.api("POST", f"/apps/{APP}/releases", json=body))

    def release(self, version: int) -> dict[str, Any]:
        found = self.api("GET", f"/apps/{APP}/releases", params={"limit": 100})["releases"]
        return dict(next(r for r in found if r["version"] == version))

    def machines(self, version: int | None = None) -> list[dict[str, Any]]:
        found = self.api("GET", f"/apps/{APP}/machines")["machines"]
        return [m for m in found if version is None or m["release_version"] == version]

    def machine(self, machine_id: str) -> dict[str, Any]:
        return next(m for m in self.machines() if m["id"] == machine_id)

    def diagnostics(self) -> str:
        return f"agent log:\n{self.agent.log()}"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    reg = InProcessRegistry(  # the access log counts blob downloads
        data_dir=tmp_path_factory.mktemp("machines") / "data", options={"access_log": True}
    )
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-agent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(APP, "acme")
        admin = t.admin_secret()
        agent = RunningAgent(reg.url, admin, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        yield Platform(reg, admin, agent, tmp_path_factory.mktemp("images"))


def test_deploy_runs_restarts_rolls_and_survives_a_failed_release(platform: Platform) -> None:
    p = platform
    port1, port2 = free_port(), free_port()
    serve = "exec /bin/busybox httpd -f -vv -p 127.0.0.1:$PORT -h /www"
    boot = "echo booting $SKYREG_MACHINE_ID in $SKYREG_REGION; echo x > /written; "
    boot += "echo start >> /www/starts; "
    v1 = p.deploy(p.push("v1", b"<h1>version one</h1>\n", port1, boot + serve))
    assert v1["status"] == "running" and v1["regions"] == ["local"]
    [m1] = p.machines(v1["version"])
    assert m1["region"] == "local" and m1["desired"] == "started"

    # -- started, complete, serving ----------------------------------------------------------
    try:
        wait_for(lambda: p.release(v1["version"])["status"] == "complete", "release v1 complete")
    except AssertionError:
        raise AssertionError(p.diagnostics()) from None
    assert p.release(v1["version"])["stable"] is True
    assert p.machine(m1["id"])["state"] == "started"
    assert http_get(port1) == b"<h1>version one</h1>\n"
    messages = [e["message"] for e in p.machine(m1["id"])["events"]]
    assert messages[:3] == ["Pulling container image", messages[1], "Starting machine"]
    assert messages[1].startswith("Successfully prepared image (")

    # -- logs: the echo first, then httpd's request log ---------------------------------------
    def log_lines(after: int = 0) -> list[dict[str, Any]]:
        return list(p.api("GET", f"/apps/{APP}/logs", params={"after": after})["lines"])

    lines = wait_for(
        lambda: [ln for ln in log_lines() if f"booting {m1['id']} in local" in ln["line"]],
        "the machine's first log line",
    )
    assert lines[0]["machine_id"] == m1["id"]
    later = log_lines(lines[0]["id"])
    assert all(ln["id"] > lines[0]["id"] for ln in later)

    # -- restart: a fresh rootfs, the first run's writes are gone ---------------------------------
    rootfs = p.machine_rootfs(m1["id"])
    assert (rootfs / "written").read_text() == "x\n"
    assert http_get(port1, "/starts") == b"start\n"
    (rootfs / "www" / "marker-of-first-run").write_text("old")  # as if the machine wrote it
    restarted = p.api("POST", f"/machines/{m1['id']}/restart")
    assert restarted["generation"] == m1["generation"] + 1
    wait_for(
        lambda: (
            not (rootfs / "www" / "marker-of-first-run").exists()
            and http_get(port1, "/starts") == b"start\n"
        ),
        "the restarted machine on a fresh rootfs",
    )
    wait_for(lambda: p.machine(m1["id"])["state"] == "started", "the restarted machine started")

    # -- rolling deploy of a second version ---------------------------------------------------
    v2 = p.deploy(p.push("v2", b"<h1>version two</h1>\n", port2, boot + serve))
    [m2] = p.machines(v2["version"])
    wait_for(lambda: http_get(port2) == b"<h1>version two</h1>\n", "v2 serving")
    wait_for(lambda: p.release(v2["version"])["status"] == "complete", "release v2 complete")
    wait_for(lambda: p.machine(m1["id"])["state"] == "stopped", "the v1 machine stopped")
    assert p.machine(m1["id"])["desired"] == "stopped"
    assert http_get(port1) is None
    assert p.machine(m2["id"])["state"] == "started"

    # -- a release whose command exits 1 fails; v2 keeps serving -----------------------------------
    bad = p.deploy(p.push("bad", b"never served\n", free_port(), "echo about to fail; exit 1"))
    wait_for(lambda: p.release(bad["version"])["status"] == "failed", "the bad release failed")
    [mb] = p.machines(bad["version"])
    failed = p.machine(mb["id"])
    assert failed["state"] == "failed" and failed["exit_code"] == 1
    assert p.machine(m2["id"])["desired"] == "started"
    assert p.machine(m2["id"])["state"] == "started"
    assert http_get(port2) == b"<h1>version two</h1>\n"

    # -- stop and start by the user API ---------------------------------------------------------
    p.api("POST", f"/machines/{m2['id']}/stop")
    wait_for(lambda: p.machine(m2["id"])["state"] == "stopped", "v2 stopped")
    assert http_get(port2) is None
    agent_view = p.api("GET", "/agent/machines", params={"region": "local"})["machines"]
    assert m2["id"] not in [m["id"] for m in agent_view]  # agents get only what must run
    assert m1["id"] not in [m["id"] for m in agent_view]
    p.api("POST", f"/machines/{m2['id']}/start")
    wait_for(lambda: http_get(port2) == b"<h1>version two</h1>\n", "v2 serving again")


def test_machine_api_refusals(platform: Platform) -> None:
    p = platform
    t = Tenancy(p.reg.data_dir)
    t.org("other")
    t.app("elsewhere", "other")
    readonly = t.token("readonly", org="acme")[0]
    foreign = t.token("org", org="other")[0]
    base = f"{p.reg.url}/api/v1"
    v = p.deploy(
        p.push("refusals", b"x\n", free_port(), "exec /bin/busybox sleep 1000"), "immediate"
    )
    [m] = p.machines(v["version"])
    # `immediate`: every other machine of the app is set desired=stopped at once.
    assert {o["desired"] for o in p.machines() if o["id"] != m["id"]} == {"stopped"}
    stop = f"{base}/machines/{m['id']}/stop"
    assert requests.post(stop, auth=("x", readonly)).status_code == 403
    assert requests.post(stop, auth=("x", foreign)).status_code == 404
    assert requests.post(stop).status_code == 401
    assert requests.get(f"{base}/agent/machines", auth=("x", readonly)).status_code == 403
    # An org token acting as an agent sees its own org's machines only.
    seen = requests.get(f"{base}/agent/machines", auth=("x", foreign)).json()["machines"]
    assert seen == []
    state = f"{base}/agent/machines/{m['id']}/state"
    assert requests.post(state, json={"state": "started"}, auth=("x", foreign)).status_code == 404
    bad = requests.post(state, json={"state": "sleeping"}, auth=("x", p.admin))
    assert bad.status_code == 400
    p.api("POST", f"/machines/{m['id']}/stop")


def test_cli_lists_machines_and_prints_logs(platform: Platform, tmp_path: Path) -> None:
    p = platform
    v = p.deploy(p.push("cli", b"x\n", free_port(), "echo hello from the cli image; exit 3"))
    [m] = p.machines(v["version"])
    env = cli_env(tmp_path, p.reg.url, p.admin)

    def skyreg(*args: str) -> str:  # in this process (tests/support/cli.py)
        return run_skyreg_in_process(env, *args)

    wait_for(lambda: p.machine(m["id"])["state"] == "failed", "the cli machine failed")
    listed = run_skyreg(env, "machines", "list", "--app", APP, timeout=60)  # a real process
    row = next(line for line in listed.splitlines() if line.startswith(m["id"]))
    assert "failed" in row and f"v{v['version']}" in row
    wait_for(
        lambda: "hello from the cli image" in skyreg("logs", "--app", APP), "the line in `logs`"
    )
    assert "desired stopped" in skyreg("machines", "stop", m["id"])


def _blob_gets(reg: ServedRegistry) -> int:
    return sum(1 for line in reg.log().splitlines() if f'"GET /v2/{APP}/blobs/' in line)


def test_redeploying_the_same_digest_downloads_and_unpacks_nothing(platform: Platform) -> None:
    p = platform
    # No port: the old and new machines overlap (rolling), and they share the host network.
    script = "trap 'exit 0' TERM; echo up $SKYREG_MACHINE_ID; while :; do sleep 1; done"
    tag = p.push("same", b"same image\n", free_port(), script)
    first = p.deploy(tag)
    wait_for(lambda: p.release(first["version"])["status"] == "complete", "first release complete")
    fetched = _blob_gets(p.reg)
    assert fetched >= 2  # the config and the layers came through the registry once
    [image_tree] = [
        d for d in (p.agent_dir / "cache" / "rootfs").iterdir() if d.name in first["image_digest"]
    ]
    unpacked = image_tree.stat().st_ino, image_tree.stat().st_mtime_ns

    again = p.deploy(tag)
    assert again["image_digest"] == first["image_digest"]
    assert again["version"] == first["version"] + 1
    wait_for(lambda: p.release(again["version"])["status"] == "complete", "redeploy complete")
    [m] = p.machines(again["version"])
    assert _blob_gets(p.reg) == fetched  # not one blob downloaded again
    assert (image_tree.stat().st_ino, image_tree.stat().st_mtime_ns) == unpacked  # not re-unpacked
    prepared = [e for e in p.machine(m["id"])["events"] if e["message"].startswith("Successfully")]
    assert prepared and prepared[0]["duration_ms"] < 5000
    [old] = p.machines(first["version"])
    wait_for(lambda: p.machine(old["id"])["state"] == "stopped", "the first machine replaced")


def test_logs_follow_prints_new_lines_until_interrupted(platform: Platform, tmp_path: Path) -> None:
    p = platform
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path),
        "SKYREG_SERVER": p.reg.url,
        "SKYREG_TOKEN": p.admin,
    }
    follower = subprocess.Popen(
        [sys.executable, "-m", "skyreg", "logs", "--app", APP, "-f"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Lines logged after `logs -f` started must reach it without a new command.
        marker = f"followed-{time.time_ns()}"
        v = p.deploy(p.push("follow", b"f\n", free_port(), f"echo {marker}; sleep 30"))
        assert follower.stdout is not None
        seen = b""
        deadline = time.monotonic() + 60
        while marker.encode() not in seen:
            assert follower.poll() is None, follower.stderr.read() if follower.stderr else ""
            assert time.monotonic() < deadline, f"`logs -f` never printed the marker: {seen!r}"
            ready, _, _ = select.select([follower.stdout], [], [], 1.0)
            if ready:
                seen += os.read(follower.stdout.fileno(), 65536)
        [m] = p.machines(v["version"])
        line = next(ln for ln in seen.decode().splitlines() if marker in ln)
        assert m["id"] in line and "[local]" in line
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=15) == 130
        assert follower.stderr is not None and b"Traceback" not in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
