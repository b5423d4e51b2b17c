"""`skyreg deploy` waits for its release and tells how it went: a real server, a real
`skyreg agent` running real busybox machines (bubblewrap), the command in this process.

The agent acts with an org token of org `acme`, so it runs app `web`'s machines and never those
of app `idle` (org `quiet`): `idle` is an app whose region has no agent.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.cli import skyreg_as
from tests.support.images import Entry, build_app_image
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]

APP = "web"  # run by the agent
IDLE = "idle"  # another org's app: no agent runs its machines


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    agent: RunningAgent
    work: Path

    def push(self, app: str, marker: str, script: str) -> str:
        """Push a busybox image running `script` into `app`; returns APP:TAG to deploy."""
        image = build_app_image(
            marker,
            [Entry("srv", "dir", mode=0o755), Entry("srv/marker", "file", data=marker.encode())],
            cmd=["/bin/sh", "-c", script],
        )
        layout = image.write_oci_layout(self.work / marker)
        push_image(layout, f"{self.reg.host}/{app}:{marker}", self.admin)
        return f"{app}:{marker}"

    def deploy(
        self, home: Path, app: str, image: str, *args: str
    ) -> subprocess.CompletedProcess[str]:
        return skyreg_as(
            home, self.reg.url, self.admin, "deploy", "--app", app, "--image", image, *args
        )

    def machines(self, app: str, version: int) -> list[dict[str, Any]]:
        r = requests.get(
            f"{self.reg.url}/api/v1/apps/{app}/machines", auth=("x", self.admin), timeout=30
        )
        assert r.status_code == 200, r.text
        return [m for m in r.json()["machines"] if m["release_version"] == version]

    def explain(self, done: subprocess.CompletedProcess[str]) -> str:
        return f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}\nagent log:\n{self.agent.log()}"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("deploy-wait") / "data")
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-agent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(APP, "acme")
        t.org("quiet")
        t.app(IDLE, "quiet")
        org_token, _ = t.token("org", org="acme")
        agent = RunningAgent(reg.url, org_token, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        yield Platform(reg, t.admin_secret(), agent, tmp_path_factory.mktemp("images"))


def _version(stdout: str) -> int:
    found = re.search(r"Release v(\d+) of ", stdout)
    assert found, stdout
    return int(found.group(1))


def test_a_good_deploy_waits_prints_the_machine_progress_and_exits_0(
    platform: Platform, tmp_path: Path
) -> None:
    image = platform.push(APP, "good", "echo serving; exec sleep 3600")
    done = platform.deploy(tmp_path, APP, image, "--wait-timeout", "2m")
    assert done.returncode == 0, platform.explain(done)
    out = done.stdout
    [machine] = platform.machines(APP, _version(out))
    prefix = f"  machine {machine['id']} [local]: "
    assert f"{prefix}Pulling container image" in out
    assert re.search(re.escape(prefix) + r"Successfully prepared image \(\d+\.\d\ds\)", out), out
    assert f"{prefix}Starting machine" in out
    assert f"{prefix}state started" in out
    assert out.index(f"{prefix}Starting machine") < out.index(f"{prefix}state started"), out
    # Each event once, though every poll answers the machine's latest events again.
    assert out.count("Pulling container image") == 1, out
    assert out.rstrip().endswith(f"Release v{_version(out)} of {APP} is complete."), out
    assert machine["state"] == "started"

    # --json: the final release on stdout (progress on stderr), after waiting.
    again = platform.deploy(tmp_path, APP, image, "--json", "--wait-timeout", "2m")
    assert again.returncode == 0, platform.explain(again)
    release = json.loads(again.stdout)
    assert release["status"] == "complete" and release["stable"] is True
    assert "Starting machine" in again.stderr


def test_a_machine_that_exits_fails_the_deploy_with_its_log_lines(
    platform: Platform, tmp_path: Path
) -> None:
    lines = "; ".join(f"echo line-{i}" for i in range(30))
    image = platform.push(APP, "boom", f"{lines}; echo boom-marker; exit 3")
    done = platform.deploy(tmp_path, APP, image, "--wait-timeout", "2m")
    assert done.returncode == 1, platform.explain(done)
    [machine] = platform.machines(APP, _version(done.stdout))
    assert machine["state"] == "failed" and machine["exit_code"] == 3
    assert f"machine {machine['id']} [local]: Machine exited with code 3" in done.stdout
    err = done.stderr
    assert err.startswith(f"error: release v{_version(done.stdout)} failed"), err
    assert "exit code 3" in err and "boom-marker" in err
    # The last 20 of the machine's 31 lines, in order.
    tail = [line.strip() for line in err.splitlines() if line.startswith("    ")]
    assert tail == [f"line-{i}" for i in range(11, 30)] + ["boom-marker"], err


def test_detach_returns_at_once_without_waiting(platform: Platform, tmp_path: Path) -> None:
    image = platform.push(IDLE, "detached", "exec sleep 3600")
    began = time.monotonic()
    done = platform.deploy(tmp_path, IDLE, image, "--detach", "--wait-timeout", "60s")
    assert done.returncode == 0, platform.explain(done)
    assert time.monotonic() - began < 30  # waiting would take the 60 s and fail: no agent runs
    assert re.search(r"Release v\d+ of idle: .*, (pending|running)\.\n\Z", done.stdout), done.stdout
    assert "Waiting" not in done.stdout + done.stderr

    as_json = platform.deploy(tmp_path, IDLE, image, "--detach", "--json")
    assert as_json.returncode == 0, platform.explain(as_json)
    assert json.loads(as_json.stdout)["status"] in ("pending", "running")


def test_the_wait_timeout_names_the_machines_not_started(
    platform: Platform, tmp_path: Path
) -> None:
    image = platform.push(IDLE, "unwatched", "exec sleep 3600")
    began = time.monotonic()
    done = platform.deploy(tmp_path, IDLE, image, "--wait-timeout", "2s", "--count", "2")
    took = time.monotonic() - began
    assert done.returncode == 1, platform.explain(done)
    assert 2 <= took < 30, took
    machines = platform.machines(IDLE, _version(done.stdout))
    assert len(machines) == 2
    err = done.stderr
    assert "after 2s" in err and "not started" in err, err
    for m in machines:
        # A rolling deploy onto running machines starts one; the other waits for its turn.
        turn = ", waiting its turn" if m["desired"] == "waiting" else ""
        assert f"machine {m['id']} [local] (created{turn})" in err, err
    assert sorted(m["desired"] for m in machines) == ["started", "waiting"], machines


def test_a_malformed_wait_timeout_deploys_nothing(platform: Platform, tmp_path: Path) -> None:
    done = platform.deploy(tmp_path, IDLE, f"{IDLE}:whatever", "--wait-timeout", "soon")
    assert done.returncode != 0
    assert "--wait-timeout" in done.stderr and "Release" not in done.stdout
