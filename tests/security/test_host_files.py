"""Nothing the agent or the registry keeps on its host is reachable by other host users.

A real `skyreg serve` and `skyreg agent` run under umask 000 (so every mode is the code's own, not
the umask's); a tenant deploys an image holding a setuid-root binary that runs as a non-root
user. An unprivileged host user (`nobody`, with no group or capability) then tries to reach the
agent's data dir, the unpacked tree of the image, the layer blobs and the machine's log, and the
registry's blobs and uploads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import (
    FIXED_CREATED,
    Entry,
    TestImage,
    busybox_layer,
    canonical_json,
    host_architecture,
    layer_from_entries,
)
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256
from tests.support.platform import Tenancy
from tests.support.servers import RunningRegistry
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a root agent and a second host user are needed"),
]

T = TypeVar("T")
APP = "tenant"
NOBODY = 65534
MACHINE_UID = 1000
PROBE = "bin/euid"


def euid_probe_elf() -> bytes:
    """A static ELF that exits with its effective uid (mod 256): geteuid(); exit(euid).

    Hand-assembled because busybox drops a setuid bit itself for applets such as `id`, so it
    cannot show what the kernel granted. x86-64: mov eax,107; syscall; mov edi,eax; mov eax,60;
    syscall. arm64: mov x8,#175; svc #0; mov x8,#93; svc #0 (the result is already in x0).
    """
    arch = host_architecture()
    if arch == "amd64":
        machine, code = 62, bytes.fromhex("b86b0000000f0589c7b83c0000000f05")
    elif arch == "arm64":
        machine = 183
        code = struct.pack("<4I", 0xD28015E8, 0xD4000001, 0xD2800BA8, 0xD4000001)
    else:
        pytest.skip(f"no euid probe for {arch}")
    base, entry = 0x400000, 64 + 56
    size = entry + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, base + entry, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + program + code


def setuid_image() -> TestImage:
    """busybox plus a setuid-root euid probe; runs the probe as uid 1000, then sleeps."""
    script = (
        f"/{PROBE}; echo euid-probe=$?; "
        "/bin/busybox grep NoNewPrivs /proc/self/status; exec /bin/busybox sleep 3600"
    )
    layers = [
        busybox_layer(),
        layer_from_entries([Entry(PROBE, "file", data=euid_probe_elf(), mode=0o4755)]),
    ]
    arch = host_architecture()
    config = canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "created": FIXED_CREATED,
            "config": {
                "Cmd": ["/bin/sh", "-c", script],
                "User": f"{MACHINE_UID}:{MACHINE_UID}",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        }
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [layer.descriptor(OCI_LAYER) for layer in layers],
        }
    )
    return TestImage("setuid", arch, "linux", layers, config, manifest)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run `argv` as the unprivileged host user nobody, without any group or capability.

    `env` runs first: its own exec of `argv` is then an unprivileged one. (setpriv would not
    do: it still holds root's capabilities when it execs, so its path lookup ignores modes.)
    """
    return subprocess.run(
        ["env", "--", *argv],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Deployed:
    reg: RunningRegistry
    admin: str
    agent_dir: Path
    agent_pid: int
    image: TestImage
    machine_id: str
    log_lines: list[str]


def _with_umask(mask: int, start: Callable[[], T]) -> T:
    old = os.umask(mask)
    try:
        return start()
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-hostfiles-")
        # A process: what it creates under umask 0 (uploads, blobs) is what the tests look at.
        reg = RunningRegistry(data_dir=top / "registry")
        stack.callback(reg.stop)
        _with_umask(0, reg.start)
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app(APP, "acme")
        admin = t.admin_secret()
        image = setuid_image()
        layout = image.write_oci_layout(tmp_path_factory.mktemp("image") / "layout")
        push_image(layout, f"{reg.host}/{APP}:v1", admin)
        agent_log = tmp_path_factory.mktemp("agentlog") / "agent.log"
        agent = RunningAgent(reg.url, admin, top / "agent", agent_log)
        stack.callback(agent.stop)
        _with_umask(0, agent.start)

        def api(method: str, path: str, **kw: Any) -> Any:
            r = requests.request(method, f"{reg.url}/api/v1{path}", auth=("x", admin), **kw)
            assert r.status_code < 400, (method, path, r.status_code, r.text)
            return r.json()

        release = api("POST", f"/apps/{APP}/releases", json={"image": f"{APP}:v1"})

        def probe_lines() -> list[str] | None:
            lines = [ln["line"] for ln in api("GET", f"/apps/{APP}/logs")["lines"]]
            return lines if any("NoNewPrivs" in ln for ln in lines) else None

        try:
            lines = wait_for(probe_lines, "the machine's euid probe output", timeout=90)
        except AssertionError:
            machines = api("GET", f"/apps/{APP}/machines")
            log = agent.log()
            raise AssertionError(f"{json.dumps(machines)[:3000]}\nagent log:\n{log}") from None
        [machine] = [
            m
            for m in api("GET", f"/apps/{APP}/machines")["machines"]
            if m["release_version"] == release["version"]
        ]
        yield Deployed(reg, admin, top / "agent", agent.pid, image, machine["id"], lines)


def _denied(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode != 0 and "Permission denied" in result.stderr


def test_another_host_user_cannot_reach_anything_the_agent_keeps(deployed: Deployed) -> None:
    d = deployed
    cache = d.agent_dir / "cache"
    tree = cache / "rootfs" / d.image.manifest_digest.split(":", 1)[1]
    probe = tree / PROBE
    home = d.agent_dir / "machines" / d.machine_id
    layer_blob = cache / "blobs" / "sha256" / d.image.layers[1].digest.split(":", 1)[1]
    # Root sees them all: the paths are right, only the other user is kept out.
    assert probe.stat().st_mode & stat.S_ISUID
    assert layer_blob.is_file() and (home / "log").is_file()

    # The reported attack: a tenant's setuid-root binary run from the cache by a host user.
    attack = as_nobody(str(probe))
    assert _denied(attack), (attack.returncode, attack.stderr)

    for path in (d.agent_dir / "cache", d.agent_dir / "machines", tree, probe, home / "log"):
        result = as_nobody("stat", str(path))
        assert _denied(result), (path, result.returncode, result.stdout)
    for path in (layer_blob, home / "log"):
        result = as_nobody("cat", str(path))
        assert _denied(result), (path, result.returncode)
    listing = as_nobody("ls", str(d.agent_dir))
    assert _denied(listing), listing.stdout
    # The agent's private mount namespace (overlay rootfs mounts) is out of reach too.
    through_proc = as_nobody("stat", f"/proc/{d.agent_pid}/root{home}/rootfs/{PROBE}")
    assert _denied(through_proc), through_proc.stdout


def test_the_agent_sets_its_own_modes_whatever_the_umask(deployed: Deployed) -> None:
    d = deployed
    assert stat.S_IMODE(d.agent_dir.stat().st_mode) == 0o700
    cache = d.agent_dir / "cache"
    for sub in ("", "blobs", "blobs/sha256", "rootfs", "locks"):
        assert stat.S_IMODE((cache / sub).stat().st_mode) == 0o700, sub
    for blob in (cache / "blobs" / "sha256").iterdir():
        assert stat.S_IMODE(blob.stat().st_mode) & 0o077 == 0, blob
    for lock in (cache / "locks").iterdir():
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600, lock
    log = d.agent_dir / "machines" / d.machine_id / "log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_a_setuid_binary_runs_in_its_machine_but_bwrap_keeps_no_new_privs(
    deployed: Deployed,
) -> None:
    """The image's setuid-root binary runs as the image's user 1000, not as root.

    bwrap sets PR_SET_NO_NEW_PRIVS on every sandbox (it is not optional), so execve ignores
    setuid bits inside any machine; and the user namespace of a non-root machine maps no uid 0
    to switch to. This is how machines behaved before the host-file fix too.
    """
    lines = deployed.log_lines
    assert f"euid-probe={MACHINE_UID % 256}" in lines, lines
    assert any(ln.split() == ["NoNewPrivs:", "1"] for ln in lines), lines


def test_the_registry_keeps_its_files_private_whatever_the_umask(deployed: Deployed) -> None:
    reg = deployed.reg
    r = requests.post(f"{reg.url}/v2/{APP}/blobs/uploads/", auth=("x", deployed.admin), timeout=30)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    url = location if location.startswith("http") else reg.url + location
    r = requests.patch(
        url,
        data=b"half an upload",
        headers={"Content-Type": "application/octet-stream"},
        auth=("x", deployed.admin),
        timeout=30,
    )
    assert r.status_code == 202, r.text
    try:
        data = reg.data_dir
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        seen_blob = seen_upload = False
        for dirpath, dirnames, filenames in os.walk(data):
            for name in dirnames:
                path = Path(dirpath, name)
                assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
            for name in filenames:
                path = Path(dirpath, name)
                assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path
                seen_blob |= path.parent.parent.name == "sha256"
                seen_upload |= path.parent.name == "uploads"
        assert seen_blob and seen_upload
        for path in (data / "blobs", data / "uploads", data / "skyreg.db"):
            assert _denied(as_nobody("stat", str(path))), path
    finally:
        requests.delete(url, auth=("x", deployed.admin), timeout=30)


def test_an_older_loose_data_dir_is_tightened_on_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for sub in ("", "blobs", "uploads"):
        (data / sub).mkdir(exist_ok=True)
        (data / sub).chmod(0o755)
    reg = InProcessRegistry(data_dir=data, options={"auth": False})
    reg.start()
    try:
        for sub in ("", "blobs", "uploads"):
            assert stat.S_IMODE((data / sub).stat().st_mode) == 0o700, sub
    finally:
        reg.stop()
