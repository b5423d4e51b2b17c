"""bench/wanlab.py: a 2-region emulated WAN in real network namespaces (needs root).

One module-scoped lab (100 ms RTT, 50 Mbit/s between ``iad`` and ``sin``) is built,
measured from inside the namespaces and closed by the fixture; the tests check the
measurements and that nothing was left behind. The figures are lower bounds that show
the path is shaped, not performance claims.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import wanlab  # noqa: E402

pytestmark = pytest.mark.slow

RTT_MS = 100
MBIT = 50
SHAPED_BYTES = 5_000_000
INTEGRITY_BYTES = 3_000_000


@dataclass
class LabRun:
    emulation: str = ""
    prefix: str = ""
    far: dict[str, Any] = field(default_factory=dict)  # sin -> iad through the endpoint
    near: dict[str, Any] = field(default_factory=dict)  # iad -> iad, unshaped
    namespaces_during: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces_after: list[str] = field(default_factory=list)


def _probe(lab: wanlab.WanLab, region: wanlab.Region, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(lab.python(region, ["probe", *args], timeout=120).stdout)
    return result


@pytest.fixture(scope="module")
def lab_run() -> Iterator[LabRun]:
    reason = wanlab.can_build()
    if reason:
        pytest.skip(reason)
    run = LabRun()
    lab = wanlab.WanLab()
    try:
        run.emulation, run.prefix = lab.emulation, lab.prefix
        iad, sin = lab.add_region("iad"), lab.add_region("sin")
        lab.shape(iad, sin, rtt_ms=RTT_MS, mbit=MBIT)
        run.namespaces_during = lab.namespaces
        lab.start_helper(
            iad, ["serve", "--echo", f"{iad.address}:7001", "--sink", f"{iad.address}:7002"]
        )
        eh, ep = lab.endpoint(sin, iad, 7001)
        sh, sp = lab.endpoint(sin, iad, 7002)
        run.far = _probe(lab, sin, "--echo", f"{eh}:{ep}", "--pings", "5")
        echo_args = ["--pings", "0", "--echo-bytes", str(INTEGRITY_BYTES)]
        run.far["echo"] = _probe(lab, sin, "--echo", f"{eh}:{ep}", *echo_args)["echo"]
        run.far["integrity"] = _probe(
            lab, sin, "--sink", f"{sh}:{sp}", "--send-bytes", str(INTEGRITY_BYTES)
        )["send"]
        run.far["shaped"] = _probe(
            lab, sin, "--sink", f"{sh}:{sp}", "--send-bytes", str(SHAPED_BYTES)
        )["send"]
        assert lab.endpoint(iad, iad, 7001) == (iad.address, 7001)
        run.near = _probe(lab, iad, "--echo", f"{iad.address}:7001", "--pings", "5")
        run.processes = list(lab.processes)
    finally:
        lab.close()
    run.namespaces_after = [
        ns
        for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.split()
        if ns.startswith(run.prefix + "-")
    ]
    yield run


def test_bytes_arrive_intact(lab_run: LabRun) -> None:
    sent = lab_run.far["integrity"]
    assert sent["received"] == INTEGRITY_BYTES
    assert sent["sha256_remote"] == sent["sha256_local"]
    echo = lab_run.far["echo"]  # both directions through the endpoint
    assert echo["received"] == INTEGRITY_BYTES and echo["intact"]


def test_round_trip_is_at_least_the_configured_rtt(lab_run: LabRun) -> None:
    ping = lab_run.far["ping"]
    assert ping["rtt_min_ms"] >= RTT_MS, ping
    # A new connection costs its handshake too, under either emulation.
    assert ping["first_exchange_ms"] >= 2 * RTT_MS, ping


def test_path_is_bandwidth_shaped(lab_run: LabRun) -> None:
    shaped = lab_run.far["shaped"]
    assert shaped["intact"]
    assert shaped["seconds"] >= SHAPED_BYTES * 8 / (MBIT * 1e6) * 0.8, shaped


def test_same_region_is_not_shaped(lab_run: LabRun) -> None:
    near = lab_run.near["ping"]
    assert near["rtt_median_ms"] < RTT_MS / 10, near
    assert near["first_exchange_ms"] < RTT_MS / 4, near


def test_lab_reports_its_emulation(lab_run: LabRun) -> None:
    assert lab_run.emulation in ("netem", "tbf+relay")
    assert lab_run.namespaces_during == [f"{lab_run.prefix}-iad", f"{lab_run.prefix}-sin"]


def test_close_leaves_nothing_behind(lab_run: LabRun) -> None:
    assert lab_run.namespaces_after == []
    assert lab_run.processes, "the lab started a server, relays and probes"
    for proc in lab_run.processes:
        assert proc.returncode is not None, proc.args
        assert not Path(f"/proc/{proc.pid}").exists() or _is_zombie_or_reused(proc.pid)


def _is_zombie_or_reused(pid: int) -> bool:
    """/proc/PID exists: fine only if it is not one of our helpers still running."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"wanlab.py" not in cmdline


def test_relay_on_loopback_delays_and_keeps_bytes() -> None:
    """The relay alone, on 127.0.0.1 in the current namespace (no root needed)."""
    argv = [sys.executable, str(BENCH / "wanlab.py")]
    server = subprocess.Popen(
        [*argv, "serve", "--echo", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    )
    relay: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        echo = server.stdout.readline().split()[1]
        relay = subprocess.Popen(
            [*argv, "relay", "--listen", "127.0.0.1:0", "--target", echo, "--delay-ms", "40"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert relay.stdout is not None
        listen = relay.stdout.readline().split()[1]
        host, port = listen.rsplit(":", 1)
        t = time.monotonic()
        ping = wanlab.probe_ping((host, int(port)), pings=3)
        assert ping["rtt_min_ms"] >= 80
        assert ping["first_exchange_ms"] >= 160  # handshake charged: 2 RTT
        echoed = wanlab.probe_echo((host, int(port)), 1_000_000)
        assert echoed["intact"]
        assert time.monotonic() - t < 30
    finally:
        for proc in (relay, server):
            if proc is not None:
                proc.kill()
                proc.wait()
