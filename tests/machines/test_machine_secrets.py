"""App secrets reach machines: `skyreg secrets set|unset` (the real CLI) against `skyreg serve`
and a real `skyreg agent` running busybox machines in bubblewrap. A machine prints a hash of its
secret variables; the values themselves must appear nowhere else."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.auth.envelope import prepend_new_key
from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import build_app_image
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy, cli_env, run_skyreg
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]

APP = "vault"
# Prints GREETING (a plain variable of the release) and a hash of DB_PASSWORD and API_KEY (or
# "unset"), then stays up.
SCRIPT = (
    'echo "machine $SKYREG_MACHINE_ID greeting=${GREETING-none} hash=$(printf "%s|%s" '
    '"${DB_PASSWORD-unset}" "${API_KEY-unset}" | /bin/busybox sha256sum '
    '| /bin/busybox cut -c1-64)"; '
    "exec /bin/busybox sleep 3600"
)


def expected(db_password: str | None, api_key: str | None) -> str:
    text = f"{db_password if db_password is not None else 'unset'}|"
    text += api_key if api_key is not None else "unset"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    org_token: str
    agent: RunningAgent
    env: dict[str, str]

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), timeout=60, **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def releases(self) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/apps/{APP}/releases", params={"limit": 100})["releases"])

    def running(self) -> list[dict[str, Any]]:
        return [
            m
            for m in self.api("GET", f"/apps/{APP}/machines")["machines"]
            if m["desired"] == "started"
        ]

    def hash_of(self, machine_id: str) -> str | None:
        lines = self.api("GET", f"/apps/{APP}/logs")["lines"]
        for line in lines:
            text = line["line"]
            if line["machine_id"] == machine_id and "hash=" in text:
                return str(text.split("hash=", 1)[1].strip())
        return None

    def greeting_of(self, machine_id: str) -> str | None:
        for line in self.api("GET", f"/apps/{APP}/logs")["lines"]:
            if line["machine_id"] == machine_id and "greeting=" in line["line"]:
                return str(line["line"].split("greeting=", 1)[1].split()[0])
        return None

    def sees(self, want: str) -> dict[str, Any]:
        """Wait for the app's newest release to complete with one machine printing `want`."""

        def done() -> dict[str, Any] | None:
            newest = self.releases()[0]
            if newest["status"] != "complete":
                return None
            machines = [m for m in self.running() if m["release_version"] == newest["version"]]
            if len(machines) == 1 and self.hash_of(machines[0]["id"]) == want:
                return machines[0]
            return None

        try:
            return wait_for(done, f"a machine printing hash {want[:12]}...", timeout=90)
        except AssertionError:
            raise AssertionError(f"agent log:\n{self.agent.log()}") from None


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("secrets") / "data")
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-secrets-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(APP, "acme")
        admin = t.admin_secret()
        org_token, _ = t.token("org", org="acme")
        agent_token, _ = t.token("agent", org="acme")
        agent = RunningAgent(reg.url, agent_token, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        image = build_app_image("secrets", [], cmd=["/bin/sh", "-c", SCRIPT])
        layout = image.write_oci_layout(tmp_path_factory.mktemp("image") / "layout")
        push_image(layout, f"{reg.host}/{APP}:v1", admin)
        work = tmp_path_factory.mktemp("cli")
        yield Platform(reg, admin, org_token, agent, cli_env(work, reg.url, org_token))


def _machine_pid(machine_id: str) -> int:
    """The host pid of a machine's PID 1 (its environment names it)."""
    marker = f"SKYREG_MACHINE_ID={machine_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                return int(entry)
    raise AssertionError(f"no process of machine {machine_id}")


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_machines_see_their_secrets_change_roll_and_unset_and_nothing_else_keeps_them(
    platform: Platform,
) -> None:
    p = platform
    plain = {"image": f"{APP}:v1", "env": {"GREETING": "hello", "DB_PASSWORD": "plain"}}
    p.api("POST", f"/apps/{APP}/releases", json=plain)
    m1 = p.sees(expected("plain", None))  # a release's plain variables reach its machines
    assert p.greeting_of(m1["id"]) == "hello"

    first, key = "pw-" + secrets.token_hex(24), "key-" + secrets.token_hex(24)
    out = run_skyreg(p.env, "secrets", "set", APP, f"DB_PASSWORD={first}", f"API_KEY={key}")
    assert "rolls the machines" in out, out
    m2 = p.sees(expected(first, key))  # a secret wins over a plain variable of the same name
    assert p.greeting_of(m2["id"]) == "hello"  # the release a change makes keeps the env
    newest = p.releases()[0]
    assert (
        newest["reason"] == "secrets" and newest["image_digest"] == p.releases()[-1]["image_digest"]
    )

    # A changed value rolls the machines again; the new value is seen.
    second = "pw-" + secrets.token_hex(24)
    run_skyreg(p.env, "secrets", "set", APP, f"DB_PASSWORD={second}")
    m3 = p.sees(expected(second, key))
    assert m3["id"] != m2["id"]
    wait_for(
        lambda: (
            next(
                m for m in p.api("GET", f"/apps/{APP}/machines")["machines"] if m["id"] == m2["id"]
            )["state"]
            == "stopped"
        ),
        "the machine with the old value stopped",
    )

    # A host user other than root cannot read a machine's environment.
    pid = _machine_pid(m3["id"])
    assert second.encode() in Path(f"/proc/{pid}/environ").read_bytes()  # root can: it is there
    probe = subprocess.run(
        ["cat", f"/proc/{pid}/environ"],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        check=False,
    )
    assert probe.returncode != 0 and second.encode() not in probe.stdout, probe
    # bwrap, which runs as the machine's user, holds neither the agent's token nor a value.
    bwrap = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    bwrap_env = Path(f"/proc/{bwrap}/environ").read_bytes()
    assert p.agent.token.encode() not in bwrap_env and second.encode() not in bwrap_env

    # Unset removes it: the next machine runs without it.
    run_skyreg(p.env, "secrets", "unset", APP, "API_KEY")
    p.sees(expected(second, None))

    # Staged: no release now; the next deploy brings it.
    staged = "pw-" + secrets.token_hex(24)
    before = len(p.releases())
    out = run_skyreg(p.env, "secrets", "set", "--stage", APP, f"DB_PASSWORD={staged}")
    assert "staged" in out
    assert len(p.releases()) == before
    listed = run_skyreg(p.env, "secrets", "list", APP)
    assert "DB_PASSWORD" in listed and "staged" in listed and staged not in listed
    p.api("POST", f"/apps/{APP}/releases", json={"image": f"{APP}:v1"})
    p.sees(expected(staged, None))

    # None of the values is kept anywhere but the database (sealed): not in the server's or
    # the agent's log, the agent's data dir, the database file in the clear, or the API.
    values = [first, key, second, staged]
    logs = p.reg.log() + p.agent.log()
    for value in values:
        assert value not in logs
    for path in [*_files_under(p.agent.data_dir), *_files_under(p.reg.data_dir)]:
        data = path.read_bytes()
        for value in values:
            assert value.encode() not in data, path
    answers = str(p.releases()) + str(p.api("GET", f"/apps/{APP}/machines"))
    answers += str(p.api("GET", f"/apps/{APP}/secrets"))
    for value in values:
        assert value not in answers


def test_key_rotation_during_a_deploy_keeps_machines_seeing_their_values(
    platform: Platform,
) -> None:
    p = platform
    value = "rot-" + secrets.token_hex(24)
    run_skyreg(p.env, "secrets", "set", "--stage", APP, f"DB_PASSWORD={value}")
    p.api("POST", f"/apps/{APP}/releases", json={"image": f"{APP}:v1"})
    # While that deploy rolls: a new master key first in the file, and every data key
    # rewrapped by it.
    key_file = p.reg.data_dir / "secrets.key"
    new = prepend_new_key(key_file)
    admin_env = {**p.env, "SKYREG_TOKEN": p.admin}
    out = run_skyreg(admin_env, "secrets", "rotate-key")
    assert new.key_id in out and "1 of 1 were wrapped anew" in out
    p.sees(expected(value, None))

    # The old master key gone from the file: machines started afterwards still get the value.
    lines = key_file.read_text().splitlines()
    keys = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    assert len(keys) == 2
    key_file.write_text("\n".join([ln for ln in lines if ln != keys[1]]) + "\n")
    out = run_skyreg(admin_env, "secrets", "rotate-key")
    assert "0 of 1 were wrapped anew" in out
    [machine] = [m for m in p.running() if m["release_version"] == p.releases()[0]["version"]]
    p.api("POST", f"/machines/{machine['id']}/restart")
    wait_for(
        lambda: (
            len(
                [
                    ln
                    for ln in p.api("GET", f"/apps/{APP}/logs")["lines"]
                    if ln["machine_id"] == machine["id"] and expected(value, None) in ln["line"]
                ]
            )
            >= 2
        ),
        "the restarted machine printing its value's hash again",
        timeout=90,
    )


def test_a_machine_with_secrets_fails_clearly_on_an_agent_without_an_agent_token(
    platform: Platform, tmp_path: Path
) -> None:
    """An admin token runs machines, but receives no secrets: the machine fails, and says why."""
    p = platform
    p.agent.stop()
    admin_agent = RunningAgent(p.reg.url, p.admin, tmp_path / "agent", tmp_path / "agent.log")
    try:
        admin_agent.start()
        run_skyreg(p.env, "secrets", "set", "--stage", APP, "DB_PASSWORD=whatever")
        newest = p.api("POST", f"/apps/{APP}/releases", json={"image": f"{APP}:v1"})
        wait_for(
            lambda: (
                p.api("GET", f"/apps/{APP}/releases", params={"limit": 1})["releases"][0]["status"]
                == "failed"
            ),
            "the release failed",
            timeout=90,
        )
        machines = [
            m
            for m in p.api("GET", f"/apps/{APP}/machines")["machines"]
            if m["release_version"] == newest["version"]
        ]
        events = [e["message"] for e in machines[0]["events"]]
        assert any("only an agent token receives them" in e for e in events), events
    finally:
        admin_agent.stop()
        p.agent.start()
