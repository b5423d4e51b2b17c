#!/usr/bin/env python3
"""An emulated WAN made of Linux network namespaces, for the multi-region benchmark.

Each region (``iad``, ``sin``, ``syd``, …) gets its own network namespace, named
``skw<pid>-<n>-<region>`` so that parallel runs (and several labs in one process) never
collide. Processes started with :meth:`WanLab.popen` run inside a region's namespace and
see only that region's interfaces: ``lo`` (with ``127.0.0.1`` and the region's address)
and one veth link per other region. Nothing is connected to the host's interfaces, no
forwarding is enabled and only ``10.250.0.0/16`` is used, so no packet can leave the lab.

Topology: full mesh
-------------------
Every pair of regions is joined by its own veth pair (``to-<peer>`` on each side, no
link addresses; a ``/32`` route to the peer's region address points at the link). A hub
namespace with a bridge was the alternative, but then per-pair shaping needs an
``htb`` tree with one class and one packet classifier (``u32``/``flower``) per
destination on every region's single uplink — more moving parts and more kernel modules
that a minimal CI kernel may lack. With a mesh every pair has its own link, so shaping a
pair is one root qdisc per direction (``tbf`` or ``netem``), pairs never share a
bottleneck queue (each pair is like a separate long-haul path) and an unshaped pair is
just a fast link. The cost is ``N·(N-1)/2`` veth pairs, trivial for the handful of
regions a benchmark uses. A region's aggregate uplink is *not* modelled: a region
talking to two others at once gets each pair's bandwidth in full.

Addresses
---------
* region *i* (1-based, in order of :meth:`WanLab.add_region`): ``10.250.0.i/32`` on ``lo``
  (``Region.address``); ``127.0.0.1`` works in every namespace as usual.
* in ``tbf+relay`` mode, "region *t* as seen from region *f*": ``10.250.f.t/32`` on ``lo``
  of *f*'s namespace, where the delaying relay listens (see :meth:`WanLab.endpoint`).

Emulation
---------
``netem`` (kernel has ``sch_netem``): each direction of a shaped pair gets
``netem delay RTT/2 rate MBIT`` on its veth; :meth:`WanLab.endpoint` returns the peer's
real address and every packet (TCP handshake, ACKs, slow start) sees the full RTT.

``tbf+relay`` (no ``sch_netem``, e.g. this kernel and the CI kernel): bandwidth is
limited by ``tbf`` on both ends of the pair's veth; latency is added by a small asyncio
TCP relay (``python bench/wanlab.py relay``) that runs in the *connecting* region's
namespace, listens on ``10.250.f.t:port`` and forwards to ``10.250.0.t:port``. Every
chunk read from either side is stamped ``now + RTT/2`` and written once that time has
come, in order; the writer sleeps only until the head of the queue is due and then
writes everything that is due, so throughput is not capped per chunk, and the queue
holds several bandwidth-delay products per direction. The relay also charges the TCP
handshake: client data is released no earlier than 1.5 RTT after the connection was
accepted and server data no earlier than 2 RTT, which is when they would arrive over a
real path (so a new connection plus one request costs 2 RTT, as with netem).
Known differences from netem: the relay's TCP legs see a near-zero RTT, so TCP slow
start and window limits over the long path are not reproduced (bulk transfers reach
the shaped rate immediately; netem would ramp up over a few RTTs), only TCP is delayed
(UDP/ICMP see no added latency), and clients must use :meth:`WanLab.endpoint` — the
peer's real address is reachable too but only bandwidth-shaped. The relay's timers
overshoot by up to ~1 ms per direction (measured: 151.5 ms for 150 ms), and one relay
connection tops out around 750 Mbit/s on the development machine, so keep shaped rates
well below that. ``tbf`` queues up to 50 ms of data at the shaped rate (its
``latency``), so a saturated link adds queueing delay as real ones do; netem's queue is
``limit 100000`` packets.

:attr:`WanLab.emulation` says which of the two is in effect; quote it with every figure.

Usage
-----
Run as root (``ip netns`` needs ``CAP_SYS_ADMIN``)::

    with WanLab() as lab:
        iad, sin = lab.add_region("iad"), lab.add_region("sin")
        lab.shape(iad, sin, rtt_ms=150, mbit=100)
        server = lab.popen(iad, ["python", "-m", "http.server", "--bind", iad.address, "8000"])
        host, port = lab.endpoint(sin, iad, 8000)   # what a process in sin connects to
        lab.run(sin, ["curl", f"http://{host}:{port}/"])

Servers should bind their region's address (not ``0.0.0.0``): a relay for a service on
port *p* listens on port *p* of another address in the *connecting* region, which a
wildcard listener on *p* there would block. Call :meth:`WanLab.shape` before
:meth:`WanLab.endpoint` for that pair.

Every namespace, veth, relay and process a lab starts is removed by :meth:`WanLab.close`
(context manager exit, including on exceptions and ``KeyboardInterrupt``), by an
``atexit`` hook and on ``SIGTERM``/``SIGHUP`` (when those still have their default
handler). Processes also get ``PR_SET_PDEATHSIG`` so they die if the process that
started them is killed outright; the namespaces of such a run are left behind and
``python bench/wanlab.py cleanup-stale`` removes them (only ``skw<pid>-…`` namespaces
whose pid is gone).

Command line: ``selftest`` (2-region lab, prints RTT, throughput and the emulation),
``relay``, ``serve`` and ``probe`` (building blocks run inside namespaces),
``cleanup-stale``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal

__all__ = [
    "Emulation",
    "Region",
    "Shape",
    "WanLab",
    "WanLabError",
    "can_build",
    "cleanup_stale",
    "detect_emulation",
]

Emulation = Literal["netem", "tbf+relay"]
WANLAB_PY = os.path.abspath(__file__)
NET_PREFIX = "10.250"
REGION_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")  # "to-<code>" must fit IFNAMSIZ (15)
STALE_RE = re.compile(r"^skw(\d+)-")
MAX_REGIONS = 250
PR_SET_PDEATHSIG = 1
CHUNK = 256 * 1024
TBF_LATENCY_MS = 50  # tbf queue length, in time at the shaped rate

_lab_counter = itertools.count()
_live_labs: list[WanLab] = []
_hooks_installed = False
_libc: ctypes.CDLL | None = None


class WanLabError(RuntimeError):
    """Building or driving the lab failed (the message quotes the failing command)."""


def log(message: str) -> None:
    print(f"wanlab: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    """Run a short command (ip/tc) and return its stdout; raise WanLabError on failure."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WanLabError(f"{' '.join(argv)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise WanLabError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs inside one of *our* namespaces (started by the lab)."""
    for _ in range(50):
        pids = [p for p in _netns_pids(netns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    log(f"processes still running in {netns}: {_netns_pids(netns)}")


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    if netns in _netns_list():
        _run(["ip", "netns", "del", netns], check=False)


def _pdeathsig() -> None:
    """preexec_fn: die with SIGKILL when the thread that started us exits."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _load_libc() -> None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _read_ready_line(
    proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: str
) -> str:
    """Read the single 'READY …' line a helper prints once it listens."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise WanLabError(f"{what} did not become ready within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        piece = os.read(fd, 1)
        if not piece:
            with contextlib.suppress(OSError), open(log_path, "rb") as f:
                err = f.read()[-4000:].decode(errors="replace").strip()
            raise WanLabError(f"{what} exited before it was ready; {log_path}: {err}")
        buf += piece
    line = buf.decode().strip()
    if not line.startswith("READY"):
        raise WanLabError(f"{what} printed {line!r} instead of READY")
    return line


# ------------------------------------------------------------- capability probing

_can_build_cache: str | Literal[False] | None = False
_emulation_cache: Emulation | None = None


def _scratch_name() -> str:
    return f"skw{os.getpid()}-{next(_lab_counter)}-probe"


def can_build() -> str | None:
    """Why a lab cannot be built here, or None if it can (result is cached)."""
    global _can_build_cache
    if _can_build_cache is not False:
        return _can_build_cache
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = f"network namespaces need Linux, not {sys.platform}"
    elif os.geteuid() != 0:
        reason = "not root: `ip netns add` needs CAP_SYS_ADMIN"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "`ip`/`tc` not found (Debian package iproute2)"
    else:
        ns = _scratch_name()
        try:
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "add", "name", "p0", "type", "veth", "peer", "p1"])
            _run(["ip", "-n", ns, "link", "set", "p0", "up"])
            tbf = ["rate", "10mbit", "burst", "64kb", "latency", "50ms"]
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "tbf", *tbf])
        except WanLabError as exc:
            reason = f"cannot build network namespaces with shaped veths: {exc}"
        finally:
            with contextlib.suppress(WanLabError):
                _delete_netns(ns)
    _can_build_cache = reason
    return reason


def detect_emulation() -> Emulation:
    """``netem`` if the kernel can load ``sch_netem``, else ``tbf+relay`` (cached)."""
    global _emulation_cache
    if _emulation_cache is not None:
        return _emulation_cache
    reason = can_build()
    if reason:
        raise WanLabError(reason)
    ns = _scratch_name()
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "-n", ns, "link", "add", "name", "p0", "type", "veth", "peer", "p1"])
        _run(["ip", "-n", ns, "link", "set", "p0", "up"])
        try:
            netem = ["delay", "1ms", "rate", "10mbit"]
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", *netem])
            found: Emulation = "netem"
        except WanLabError:
            found = "tbf+relay"
    finally:
        _delete_netns(ns)
    _emulation_cache = found
    return found


def cleanup_stale() -> list[str]:
    """Delete ``skw<pid>-…`` namespaces whose creating process no longer exists."""
    removed = []
    for ns in _netns_list():
        m = STALE_RE.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        _delete_netns(ns)
        removed.append(ns)
    return removed


# ------------------------------------------------------------------------ the lab


@dataclass(frozen=True)
class Region:
    code: str
    index: int  # 1-based
    netns: str

    @property
    def address(self) -> str:
        """The region's own address (on ``lo`` of its namespace)."""
        return f"{NET_PREFIX}.0.{self.index}"

    def alias_for(self, peer: Region) -> str:
        """Address in *this* namespace standing for ``peer`` (where relays listen)."""
        return f"{NET_PREFIX}.{self.index}.{peer.index}"


@dataclass(frozen=True)
class Shape:
    rtt_ms: float
    mbit: float | None


@dataclass
class _Relay:
    key: tuple[str, str, int]
    listen: tuple[str, int]
    delay_ms: float
    proc: subprocess.Popen[bytes]


@dataclass(eq=False)
class WanLab:
    """A set of region namespaces joined by shaped links; see the module docstring.

    ``emulation``: ``"auto"`` (netem when available), ``"netem"`` (fail if missing) or
    ``"tbf+relay"`` (force the relay even where netem exists, e.g. to compare).
    """

    emulation_request: Literal["auto", "netem", "tbf+relay"] = "auto"
    prefix: str = ""
    regions: dict[str, Region] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _shapes: dict[frozenset[str], Shape] = field(default_factory=dict)
    _relays: dict[tuple[str, str, int], _Relay] = field(default_factory=dict)
    _aliases: set[tuple[str, str]] = field(default_factory=set)
    _emulation: Emulation | None = None
    _closed: bool = False
    log_dir: str = ""  # helpers' stderr; removed on close unless WANLAB_KEEP_LOGS is set

    def __post_init__(self) -> None:
        reason = can_build()
        if reason:
            raise WanLabError(reason)
        if not self.prefix:
            self.prefix = f"skw{os.getpid()}-{next(_lab_counter)}"
        available = detect_emulation()
        if self.emulation_request == "auto":
            self._emulation = available
        elif self.emulation_request == "netem" and available != "netem":
            raise WanLabError("emulation 'netem' requested but the kernel has no sch_netem")
        else:
            self._emulation = self.emulation_request
        _load_libc()
        _install_hooks()
        _live_labs.append(self)
        self.log_dir = tempfile.mkdtemp(prefix=f"{self.prefix}-logs-")

    # ---- context manager

    def __enter__(self) -> WanLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- properties

    @property
    def emulation(self) -> Emulation:
        """``netem`` or ``tbf+relay``: what produces the latency and bandwidth limits."""
        assert self._emulation is not None
        return self._emulation

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def describe(self) -> str:
        """One line for a benchmark report: emulation, kernel, shaped pairs."""
        pairs = ", ".join(
            f"{'-'.join(sorted(k))}: {s.rtt_ms:g} ms RTT"
            + (f", {s.mbit:g} Mbit/s" if s.mbit else "")
            for k, s in sorted(self._shapes.items(), key=lambda kv: sorted(kv[0]))
        )
        how = (
            "netem delay+rate on per-pair veths"
            if self.emulation == "netem"
            else "tbf on per-pair veths, latency by delaying TCP relay"
        )
        return f"wanlab {self.emulation} ({how}; kernel {os.uname().release}); {pairs}"

    # ---- building

    def _region(self, region: Region | str) -> Region:
        code = region.code if isinstance(region, Region) else region
        try:
            return self.regions[code]
        except KeyError:
            raise WanLabError(f"unknown region {code!r}") from None

    def add_region(self, code: str) -> Region:
        """Create the region's namespace and link it to every existing region."""
        self._check_open()
        if not REGION_RE.match(code):
            raise ValueError(f"region code must match {REGION_RE.pattern}: {code!r}")
        if code in self.regions:
            raise ValueError(f"region {code!r} exists already")
        if len(self.regions) >= MAX_REGIONS:
            raise WanLabError(f"at most {MAX_REGIONS} regions")
        region = Region(code=code, index=len(self.regions) + 1, netns=f"{self.prefix}-{code}")
        ns = region.netns
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{region.address}/32", "dev", "lo"])
        # Room for the bandwidth-delay product of long, fast paths (netem mode).
        self._exec_sh(
            ns,
            "echo 4096 131072 67108864 > /proc/sys/net/ipv4/tcp_rmem && "
            "echo 4096 65536 67108864 > /proc/sys/net/ipv4/tcp_wmem",
        )
        for peer in self.regions.values():
            self._link(region, peer)
        self.regions[code] = region
        return region

    def _exec_sh(self, netns: str, script: str) -> None:
        _run(["ip", "netns", "exec", netns, "sh", "-c", script])

    def _link(self, a: Region, b: Region) -> None:
        a_if, b_if = f"to-{b.code}", f"to-{a.code}"
        peer_args = ["peer", "name", b_if, "netns", b.netns]
        _run(["ip", "-n", a.netns, "link", "add", "name", a_if, "type", "veth", *peer_args])
        for r, ifname, peer in ((a, a_if, b), (b, b_if, a)):
            _run(["ip", "-n", r.netns, "link", "set", ifname, "up"])
            route = [f"{peer.address}/32", "dev", ifname, "src", r.address]
            _run(["ip", "-n", r.netns, "route", "add", *route])

    def shape(
        self,
        a: Region | str,
        b: Region | str,
        rtt_ms: float = 150,
        mbit: float | None = 100,
    ) -> None:
        """Shape the a<->b path: round-trip time ``rtt_ms``, ``mbit`` per direction
        (``None``: no bandwidth limit). Regions without a shape are joined by a fast link.
        """
        self._check_open()
        ra, rb = self._region(a), self._region(b)
        if ra == rb:
            raise ValueError("inside one region traffic uses lo and is not shaped")
        if rtt_ms < 0 or (mbit is not None and mbit <= 0):
            raise ValueError("rtt_ms must be >= 0 and mbit > 0")
        key = frozenset((ra.code, rb.code))
        old = self._shapes.get(key)
        if (
            old is not None
            and old.rtt_ms != rtt_ms
            and any({r.key[0], r.key[1]} == key for r in self._relays.values())
        ):
            raise WanLabError("cannot change the RTT of a pair that has relays; shape first")
        for src, dst in ((ra, rb), (rb, ra)):
            dev = ["tc", "-n", src.netns, "qdisc"]
            ifname = f"to-{dst.code}"
            if self.emulation == "netem":
                args = ["delay", f"{round(rtt_ms * 500)}us"]
                if mbit is not None:
                    args += ["rate", f"{round(mbit * 1000)}kbit"]
                _run([*dev, "replace", "dev", ifname, "root", "netem", *args, "limit", "100000"])
            elif mbit is not None:
                rate_bytes = mbit * 1e6 / 8
                burst = max(64 * 1024, int(rate_bytes / 250))
                tbf = ["rate", f"{round(mbit * 1000)}kbit", "burst", str(burst)]
                tbf += ["latency", f"{TBF_LATENCY_MS}ms"]
                _run([*dev, "replace", "dev", ifname, "root", "tbf", *tbf])
            else:
                _run([*dev, "del", "dev", ifname, "root"], check=False)
        self._shapes[key] = Shape(rtt_ms=rtt_ms, mbit=mbit)

    def shape_of(self, a: Region | str, b: Region | str) -> Shape | None:
        ra, rb = self._region(a), self._region(b)
        return self._shapes.get(frozenset((ra.code, rb.code)))

    def endpoint(
        self,
        from_region: Region | str,
        to_region: Region | str,
        port: int,
        *,
        listen_port: int | None = None,
        timeout: float = 10,
    ) -> tuple[str, int]:
        """Where a process in ``from_region`` connects to reach ``to_region``'s
        ``address:port`` over the shaped path.

        Same region, an unshaped pair, a pair with ``rtt_ms=0`` or netem mode: the target's
        real address. ``tbf+relay`` mode: starts (once per from/to/port) a delaying relay
        in ``from_region`` listening on ``10.250.<from>.<to>:<listen_port or port>``.
        """
        self._check_open()
        src, dst = self._region(from_region), self._region(to_region)
        if src == dst:
            return dst.address, port
        shape = self.shape_of(src, dst)
        if self.emulation == "netem" or shape is None or shape.rtt_ms == 0:
            return dst.address, port
        key = (src.code, dst.code, port)
        relay = self._relays.get(key)
        if relay is not None:
            return relay.listen
        if (src.code, dst.code) not in self._aliases:
            alias = f"{src.alias_for(dst)}/32"
            _run(["ip", "-n", src.netns, "addr", "add", alias, "dev", "lo"])
            self._aliases.add((src.code, dst.code))
        delay_ms = shape.rtt_ms / 2
        queue = 32 * 1024 * 1024
        if shape.mbit is not None:  # several bandwidth-delay products per direction
            queue = max(4 * 1024 * 1024, int(4 * shape.mbit * 1e6 / 8 * shape.rtt_ms / 1000))
        lport = port if listen_port is None else listen_port
        argv = [sys.executable, WANLAB_PY, "relay", "--listen", f"{src.alias_for(dst)}:{lport}"]
        argv += ["--target", f"{dst.address}:{port}", "--delay-ms", f"{delay_ms:g}"]
        argv += ["--queue-bytes", str(queue)]
        proc, line = self._start_ready(src, argv, f"relay-{src.code}-{dst.code}-{port}", timeout)
        host, bound_port = _parse_hostport(line.split()[1])
        self._relays[key] = _Relay(key, (host, bound_port), delay_ms, proc)
        return host, bound_port

    # ---- processes

    def popen(
        self,
        region: Region | str,
        argv: Sequence[str],
        *,
        die_with_parent: bool = True,
        **kw: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the region's namespace (``ip netns exec``), in a new
        session, tracked for cleanup. ``die_with_parent`` sets ``PR_SET_PDEATHSIG`` so it
        is killed if the *thread* calling popen exits: call from the main thread, or pass
        False. Other keywords go to :class:`subprocess.Popen`.
        """
        self._check_open()
        r = self._region(region)
        if die_with_parent:
            user_preexec: Callable[[], object] | None = kw.pop("preexec_fn", None)

            def preexec() -> None:
                _pdeathsig()
                if user_preexec is not None:
                    user_preexec()

            kw["preexec_fn"] = preexec
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", r.netns, *argv], **kw
        )
        self.processes.append(proc)
        return proc

    def run(
        self,
        region: Region | str,
        argv: Sequence[str],
        *,
        timeout: float = 120,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` in the region to completion; capture stdout and stderr."""
        proc = self.popen(
            region,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _terminate_group(proc, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise WanLabError(
                f"{' '.join(argv)} in {self._region(region).code} exited {proc.returncode}: "
                f"{err.decode(errors='replace').strip()}"
            )
        return result

    def python(
        self, region: Region | str, args: Sequence[str], **kw: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``python bench/wanlab.py ARGS`` in the region (helper subcommands)."""
        return self.run(region, [sys.executable, WANLAB_PY, *args], **kw)

    def start_helper(
        self, region: Region | str, args: Sequence[str], timeout: float = 10
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start a ``wanlab.py`` helper that prints ``READY …`` and wait for that line."""
        name = f"{args[0]}-{self._region(region).code}-{len(self.processes)}"
        return self._start_ready(region, [sys.executable, WANLAB_PY, *args], name, timeout)

    def _start_ready(
        self, region: Region | str, argv: Sequence[str], name: str, timeout: float
    ) -> tuple[subprocess.Popen[bytes], str]:
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
            proc = self.popen(region, argv, stdout=subprocess.PIPE, stderr=log_file)
        try:
            line = _read_ready_line(proc, timeout, name, log_path)
        finally:
            assert proc.stdout is not None
            proc.stdout.close()
        return proc, line

    # ---- teardown

    def _check_open(self) -> None:
        if self._closed:
            raise WanLabError("lab is closed")

    def close(self) -> None:
        """Stop every process and relay, delete every namespace (and so every veth).

        Idempotent and safe to re-enter from a signal handler: work items are popped
        one by one, so a nested call finishes what the interrupted one had left.
        """
        self._closed = True
        procs = list(self.processes)
        for proc in procs:
            _terminate_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
        for proc in procs:
            if not _exited(proc):
                _terminate_group(proc, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._relays.clear()
        while self._namespaces:
            ns = self._namespaces.pop()
            try:
                _delete_netns(ns)
            except WanLabError as exc:  # keep deleting the others
                log(f"cannot delete {ns}: {exc}")
        with contextlib.suppress(WanLabError):
            for ns in _netns_list():
                if ns.startswith(self.prefix + "-"):
                    _delete_netns(ns)
        if self.log_dir and not os.environ.get("WANLAB_KEEP_LOGS"):
            shutil.rmtree(self.log_dir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _live_labs.remove(self)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Has the process exited? Does not reap it, so its pid (= pgid) stays reserved."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _terminate_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group of an unreaped child (its pgid cannot have been reused)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _cleanup_all() -> None:
    for lab in list(_live_labs):
        try:
            lab.close()
        except Exception as exc:  # keep cleaning the other labs
            log(f"cleanup of {lab.prefix} failed: {exc}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_cleanup_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)


# ------------------------------------------------------------------- the relay


class _DelayPipe:
    """One direction of a relayed connection: read, stamp ``due``, write when due."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        not_before: float,
        limit: int,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.delay, self.not_before, self.limit = delay, not_before, limit
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.has_data = asyncio.Event()
        self.has_room = asyncio.Event()
        self.has_room.set()

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self.reader.read(CHUNK)
            due = max(loop.time() + self.delay, self.not_before)
            self.queue.append((due, data))  # b"" marks EOF
            self.queued += len(data)
            self.has_data.set()
            if not data:
                return
            while self.queued > self.limit:
                self.has_room.clear()
                await self.has_room.wait()

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.has_data.clear()
                await self.has_data.wait()
            wait = self.queue[0][0] - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            now = loop.time()
            batch: list[bytes] = []
            eof = False
            while self.queue and self.queue[0][0] <= now:
                _, data = self.queue.popleft()
                if not data:
                    eof = True
                    break
                batch.append(data)
            if batch:
                self.writer.writelines(batch)
                self.queued -= sum(map(len, batch))
                self.has_room.set()
                await self.writer.drain()
            if eof:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return


async def _relay_connection(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    queue_bytes: int,
    handshake: bool,
) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    rtt = 2 * delay
    try:
        up_r, up_w = await asyncio.open_connection(*target, limit=4 * CHUNK)
    except OSError:
        # A refused connection is seen by the client one RTT later.
        await asyncio.sleep(rtt)
        client_w.transport.abort()
        return
    for w in (client_w, up_w):
        w.transport.set_write_buffer_limits(high=4 * CHUNK)
        sock = w.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Real TCP: SYN reaches the server at d, SYN-ACK the client at 2d = RTT; the
    # client's first data arrives at 3d, the server's first data at the client at 4d.
    up = _DelayPipe(client_r, up_w, delay, t0 + 1.5 * rtt if handshake else 0, queue_bytes)
    down = _DelayPipe(up_r, client_w, delay, t0 + 2 * rtt if handshake else 0, queue_bytes)
    pumps = (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())
    tasks = [asyncio.ensure_future(p) for p in pumps]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.IncompleteReadError):
        for w in (client_w, up_w):  # a reset on one side resets the other
            w.transport.abort()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (client_w, up_w):
            w.close()


async def _relay_main(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay_ms: float,
    queue_bytes: int,
    handshake: bool,
) -> None:
    delay = delay_ms / 1000

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _relay_connection(r, w, target, delay, queue_bytes, handshake)

    server = await asyncio.start_server(
        handle, listen[0], listen[1], reuse_address=True, backlog=1024, limit=4 * CHUNK
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


# ------------------------------------------------------ test servers and probes


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(CHUNK):
            w.write(data)
            await w.drain()
        w.write_eof()
        await w.drain()
    except OSError:
        pass
    finally:
        w.close()


async def _sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Protocol: server says b"+"; client sends u64 length + bytes; server replies
    sha256 digest + u64 count."""
    try:
        w.write(b"+")
        await w.drain()
        (n,) = struct.unpack("!Q", await r.readexactly(8))
        h = hashlib.sha256()
        got = 0
        while got < n:
            data = await r.read(min(CHUNK, n - got))
            if not data:
                break
            h.update(data)
            got += len(data)
        w.write(h.digest() + struct.pack("!Q", got))
        await w.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def _serve_main(echo: tuple[str, int] | None, sink: tuple[str, int] | None) -> None:
    servers = []
    names = []
    for addr, handler in ((echo, _echo), (sink, _sink)):
        if addr is None:
            continue
        s = await asyncio.start_server(
            handler, addr[0], addr[1], reuse_address=True, limit=4 * CHUNK
        )
        servers.append(s)
        host, port = s.sockets[0].getsockname()[:2]
        names.append(f"{host}:{port}")
    print("READY " + " ".join(names), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += piece
    return bytes(buf)


def _connect(addr: tuple[str, int], timeout: float) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def probe_ping(addr: tuple[str, int], pings: int, timeout: float = 60) -> dict[str, Any]:
    """Connect to an echo server, time connect + first exchange, then ``pings`` more."""
    msg = b"p" * 64
    t0 = time.monotonic()
    with _connect(addr, timeout) as s:
        connected = time.monotonic()
        s.sendall(msg)
        _recv_exact(s, len(msg))
        first = time.monotonic()
        rtts = []
        for _ in range(pings):
            t = time.monotonic()
            s.sendall(msg)
            _recv_exact(s, len(msg))
            rtts.append((time.monotonic() - t) * 1000)
    rtts.sort()
    return {
        "connect_ms": (connected - t0) * 1000,
        "first_exchange_ms": (first - t0) * 1000,
        "rtt_ms": rtts,
        "rtt_min_ms": rtts[0] if rtts else None,
        "rtt_median_ms": rtts[len(rtts) // 2] if rtts else None,
    }


def _payload(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def probe_send(addr: tuple[str, int], nbytes: int, timeout: float = 300) -> dict[str, Any]:
    """Send ``nbytes`` to a sink server; time from the first byte to its digest reply."""
    data = _payload(nbytes, seed=nbytes)
    digest = hashlib.sha256(data).hexdigest()
    with _connect(addr, timeout) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
        if _recv_exact(s, 1) != b"+":
            raise ConnectionError("sink did not greet")
        t = time.monotonic()
        s.sendall(struct.pack("!Q", nbytes))
        view = memoryview(data)
        for off in range(0, nbytes, CHUNK):
            s.sendall(view[off : off + CHUNK])
        reply = _recv_exact(s, 40)
        elapsed = time.monotonic() - t
    remote, got = reply[:32].hex(), struct.unpack("!Q", reply[32:])[0]
    return {
        "bytes": nbytes,
        "received": got,
        "seconds": elapsed,
        "mbit": nbytes * 8 / elapsed / 1e6,
        "sha256_local": digest,
        "sha256_remote": remote,
        "intact": remote == digest and got == nbytes,
    }


def probe_echo(addr: tuple[str, int], nbytes: int, timeout: float = 300) -> dict[str, Any]:
    """Send ``nbytes`` to an echo server while reading them back; compare SHA-256."""
    data = _payload(nbytes, seed=nbytes + 1)
    with _connect(addr, timeout) as s:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        t = time.monotonic()
        th = threading.Thread(target=sender, daemon=True)
        th.start()
        h = hashlib.sha256()
        got = 0
        while piece := s.recv(CHUNK):
            h.update(piece)
            got += len(piece)
        elapsed = time.monotonic() - t
        th.join(timeout)
    if errors:
        raise errors[0]
    return {
        "bytes": nbytes,
        "received": got,
        "seconds": elapsed,
        "intact": got == nbytes and h.hexdigest() == hashlib.sha256(data).hexdigest(),
    }


# --------------------------------------------------------------------- selftest


def selftest(
    rtt_ms: float,
    mbit: float,
    nbytes: int,
    emulation: Literal["auto", "netem", "tbf+relay"] = "auto",
) -> int:
    """Build a 2-region lab, measure RTT and throughput from inside it, print them."""
    reason = can_build()
    if reason:
        print(f"selftest: cannot build the lab: {reason}", file=sys.stderr)
        return 2
    prefix = ""
    with WanLab(emulation_request=emulation) as lab:
        prefix = lab.prefix
        a, b = lab.add_region("iad"), lab.add_region("sin")
        lab.shape(a, b, rtt_ms=rtt_ms, mbit=mbit)
        print(f"emulation: {lab.emulation}")
        print(f"lab: {lab.describe()}")
        print(f"namespaces: {' '.join(lab.namespaces)}")
        lab.start_helper(a, ["serve", "--echo", f"{a.address}:7001", "--sink", f"{a.address}:7002"])
        echo = lab.endpoint(b, a, 7001)
        sink = lab.endpoint(b, a, 7002)
        print(
            f"server in {a.code} at {a.address}:7001/7002; {b.code} connects to "
            f"{echo[0]}:{echo[1]} and {sink[0]}:{sink[1]}"
        )
        out = lab.python(
            b,
            [
                "probe",
                "--echo",
                f"{echo[0]}:{echo[1]}",
                "--pings",
                "10",
                "--sink",
                f"{sink[0]}:{sink[1]}",
                "--send-bytes",
                str(nbytes),
            ],
        )
        far = json.loads(out.stdout)
        near = json.loads(
            lab.python(a, ["probe", "--echo", f"{a.address}:7001", "--pings", "10"]).stdout
        )
        p, s = far["ping"], far["send"]
        print(
            f"{b.code} -> {a.code} round trip (established connection, 10 pings): "
            f"median {p['rtt_median_ms']:.1f} ms, min {p['rtt_min_ms']:.1f} ms "
            f"(configured {rtt_ms:g} ms)"
        )
        print(
            f"{b.code} -> {a.code} new connection + first round trip: "
            f"{p['first_exchange_ms']:.1f} ms (≈ 2 RTT)"
        )
        ideal = nbytes * 8 / (mbit * 1e6)
        # The timing includes one round trip (first byte out, digest back).
        net = nbytes * 8 / max(s["seconds"] - p["rtt_median_ms"] / 1000, 1e-9) / 1e6
        print(
            f"{b.code} -> {a.code} {nbytes / 1e6:g} MB transfer: {s['seconds']:.2f} s = "
            f"{s['mbit']:.1f} Mbit/s (configured {mbit:g} Mbit/s, ideal {ideal:.2f} s); "
            f"sha256 {'ok' if s['intact'] else 'MISMATCH'}"
        )
        print(f"  without the one round trip the timing includes: {net:.1f} Mbit/s")
        print(
            f"{a.code} -> {a.code} round trip (same region, unshaped): "
            f"median {near['ping']['rtt_median_ms']:.3f} ms"
        )
    left = [ns for ns in _netns_list() if ns.startswith(prefix + "-")]
    listing = _run(["ip", "netns", "list"], check=False).strip()
    print(f"after close: `ip netns list` -> {listing or '(empty)'}")
    print(f"namespaces left with prefix {prefix}: {left or 'none'}")
    ok = s["intact"] and not left and p["rtt_min_ms"] >= rtt_ms * 0.95
    return 0 if ok else 1


# ------------------------------------------------------------------------- CLI


def _set_pdeathsig_self() -> None:
    _load_libc()
    with contextlib.suppress(Exception):
        _pdeathsig()


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wanlab.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("selftest", help="2-region lab: RTT, throughput, cleanup")
    p.add_argument("--rtt-ms", type=float, default=150)
    p.add_argument("--mbit", type=float, default=100)
    p.add_argument("--bytes", type=int, default=50_000_000)
    p.add_argument("--emulation", choices=["auto", "netem", "tbf+relay"], default="auto")
    p = sub.add_parser("relay", help="delaying TCP relay (run inside a namespace)")
    p.add_argument("--listen", type=_parse_hostport, required=True)
    p.add_argument("--target", type=_parse_hostport, required=True)
    p.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT/2)")
    p.add_argument("--queue-bytes", type=int, default=32 * 1024 * 1024)
    p.add_argument("--no-handshake", action="store_true", help="do not charge TCP setup")
    p = sub.add_parser("serve", help="echo and/or sink server (for probes)")
    p.add_argument("--echo", type=_parse_hostport)
    p.add_argument("--sink", type=_parse_hostport)
    p = sub.add_parser("probe", help="measure against serve; prints JSON")
    p.add_argument("--echo", type=_parse_hostport)
    p.add_argument("--pings", type=int, default=10)
    p.add_argument("--echo-bytes", type=int, default=0)
    p.add_argument("--sink", type=_parse_hostport)
    p.add_argument("--send-bytes", type=int, default=0)
    sub.add_parser("cleanup-stale", help="delete namespaces of dead skw<pid> runs")
    args = parser.parse_args(None if argv is None else list(argv))

    if args.cmd == "selftest":
        return selftest(args.rtt_ms, args.mbit, args.bytes, args.emulation)
    if args.cmd == "relay":
        _set_pdeathsig_self()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                _relay_main(
                    args.listen,
                    args.target,
                    args.delay_ms,
                    args.queue_bytes,
                    not args.no_handshake,
                )
            )
        return 0
    if args.cmd == "serve":
        _set_pdeathsig_self()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_main(args.echo, args.sink))
        return 0
    if args.cmd == "probe":
        result: dict[str, Any] = {}
        if args.echo:
            result["ping"] = probe_ping(args.echo, args.pings)
            if args.echo_bytes:
                result["echo"] = probe_echo(args.echo, args.echo_bytes)
        if args.sink and args.send_bytes:
            result["send"] = probe_send(args.sink, args.send_bytes)
        print(json.dumps(result))
        return 0
    if args.cmd == "cleanup-stale":
        for ns in cleanup_stale():
            print(f"deleted {ns}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
