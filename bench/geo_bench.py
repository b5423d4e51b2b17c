#!/usr/bin/env python3
"""Machine starts across regions: skyreg's multi-region registry over an emulated WAN.

Two regions, A = ``iad`` (where images are pushed) and B = ``syd`` (far away: by default
150 ms RTT and 100 Mbit/s between them, sub-millisecond inside a region), each a network
namespace of ``bench/wanlab.py``. Every component is a real process: one ``skyreg serve`` per
region (one shared SQLite metadata file, a regions file whose ``peer_urls`` send node-to-node
traffic through the shaped, delayed path), one ``skyreg agent`` per region and figure run
(fresh cache), machines run by bubblewrap inside the region's namespace.

A ~200 MB image (``--size-mb``) of ``--layers`` gzip layers (a busybox layer with ``/www``,
the rest random bytes, so the bytes moved are ~ the image size) is built and pushed in iad.
Figures (each the median of ``--runs``; time from the release POST, on the bench's clock, until
the machine answers ``GET /`` from inside its region's namespace):

1. machine start in iad (deploy to iad): the local baseline;
2. machine start in syd without replication: a single-region ``skyreg serve`` in iad (its own
   database: nothing is queued or copied) and a syd agent whose ``--server`` is iad across the
   WAN, so every start pulls the image over the WAN (what a naive single-region setup does);
3. machine start in syd when the app's region policy (``regions: [syd]``,
   ``replicate_ahead``) already copied the image to syd after the push (the bench waits for
   ``GET /apps/{app}/images/{tag}`` to show syd complete, then deploys); goal <= 1.2 x (1);
4. first deploy to syd of a fresh image (no copy there yet; every layer new): the agent pulls
   through syd's node while the deploy's replication jobs run; goal <= 1.3 x (image bytes /
   link bandwidth + (1));
5. 8 machines in syd (``count: 8``) at once, fresh image, before any copy finished: bytes
   that crossed the WAN (syd node's ``skyreg_transfer_bytes_in_total`` delta, and the bytes
   ``tc`` counted on iad's link towards syd), goal ~ 1 x the image (<= 1.1 x); time until all
   8 report ``started`` (which the agent reports 2 s after the process started). Its image
   runs a loop that does not listen: 8 machines share one namespace and could not bind one
   port.

Figures 3-5 use a fresh image per run (every layer new random bytes: "no copy yet" holds for
every blob). Each figure run starts a fresh agent (new data dir, empty layer cache), stops its
machines afterwards and removes the agent's data. Besides the time, the agent's own
"Successfully prepared image (…s)" event is reported, and a breakdown from the machine events:
agent poll (POST -> "Pulling container image"), prepare, rootfs + start (-> "Starting
machine"), up (-> answering).

Fairness: one untimed warm-up start comes first; before each deploy the bench runs sync(2) (the
agent's syncfs after unpacking would otherwise also flush the bench's own freshly written image
layouts, which are deleted right after their push anyway); deploys land at spread phases of
the agent's 0.5 s poll (run i of n at (i + 0.5) / n of a cycle), not always just after a poll.
For figures 3-5 the bench also counts the image's replication jobs into syd that needed a
second claim: that only happens after a lease expired (30 s), i.e. a stalled transfer.

Needs root (network namespaces, bubblewrap machines as root), ``/bin/busybox`` (Debian's
``busybox-static``) and ``bwrap``. Without what a lab needs (``wanlab.can_build()`` gives the
reason) the regions run as plain processes on 127.0.0.1 without any shaping, and the report
says so. The Markdown report goes to stdout, progress to stderr. Every process, namespace and
temporary directory is removed on exit, also on failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import ctypes
import datetime
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import wanlab  # bench/ is on sys.path when run as a script
from prepare_bench import machine_line

from skyreg.machines.agent import POLL_INTERVAL as AGENT_POLL
from skyreg.machines.layercache import remove_tree
from skyreg.oci.platforms import host_architecture

T = TypeVar("T")
MB = 1_000_000
A, B = "iad", "syd"
LAB_PORTS = {"iad": 5001, "syd": 5002, "naive": 5003}  # inside the namespaces: no clashes
LAZY_APPS = ("geo-lazy", "geo-learn", "geo-lfleet")  # figures 6, 7, 8
HTTP_PORT_BASE = 18080  # image n's httpd listens on HTTP_PORT_BASE + n
FLEET = 8
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "httpd", "cat", "echo", "true", "ls")
MTIME = 1_700_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CLONE_NEWNET = 0x40000000
PREPARED = ("Successfully prepared image", "Prepared a lazy mount of the image")
PREPARED_RE = re.compile(rf"(?:{'|'.join(PREPARED)}) \(([\d.]+)s\)")
LAZY_INDEX = "application/vnd.skyreg.lazy-index.v1"  # the layer indexes' artifactType
Executor = concurrent.futures.ThreadPoolExecutor
_STOP = threading.Event()  # set on exit: probes and waits in helper threads give up


class BenchError(Exception):
    """A step of the benchmark failed (the message says which and why)."""


def log(message: str) -> None:
    print(f"[geo-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------- images


@dataclass
class Image:
    serial: int
    layout: Path
    port: int | None  # where its httpd listens; None: it does not listen
    raw_bytes: int  # uncompressed layer bytes
    blob_bytes: int  # config + layers: what is stored and moved between regions
    layers: int


def _tar(entries: list[tuple[str, str, bytes | str, int]]) -> bytes:
    """(name, kind dir|file|symlink, data or link target, mode) -> tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = MTIME, mode, 0, 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    """gzip -1 (zlib releases the GIL, so layers compress in parallel threads)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    return z.compress(data) + z.flush()


def _base_layer(serial: int) -> tuple[bytes, bytes]:
    text = f"geo-bench image {serial}\n".encode()
    entries: list[tuple[str, str, bytes | str, int]] = [
        ("bin", "dir", b"", 0o755),
        ("bin/busybox", "file", BUSYBOX.read_bytes(), 0o755),
        *((f"bin/{a}", "symlink", "busybox", 0o777) for a in APPLETS),
        ("tmp", "dir", b"", 0o1777),
        ("etc", "dir", b"", 0o755),
        ("etc/geo-bench", "file", text, 0o644),
        ("www", "dir", b"", 0o755),
        ("www/index.html", "file", text, 0o644),
    ]
    tar = _tar(entries)
    return tar, _gzip(tar)


def _random_layer(
    serial: int, index: int, size: int, read: int, files: int = 4
) -> tuple[bytes, bytes]:
    """`files` files of random bytes, and in their middle `app.bin` (`read` bytes): what the
    entrypoint reads before it serves (a program and its libraries, spread over the layers)."""
    top = f"opt/l{index:02d}"
    entries: list[tuple[str, str, bytes | str, int]] = [
        ("opt", "dir", b"", 0o755),
        (top, "dir", b"", 0o755),
        (f"{top}/image", "file", f"{serial}\n".encode(), 0o644),
    ]
    # Files of differing sizes (seeded by the layer's place: every image alike), so that `app.bin`
    # lies at a different offset in each layer, as files of real layers do.
    weights = [random.Random(index * 10 + i).uniform(0.5, 1.5) for i in range(files)]
    rest = size - read
    blobs = [
        (f"{top}/blob{i}.bin", "file", os.urandom(int(rest * w / sum(weights))), 0o644)
        for i, w in enumerate(weights)
    ]
    app: tuple[str, str, bytes | str, int] = (f"{top}/app.bin", "file", os.urandom(read), 0o644)
    entries += [*blobs[: files // 2], app, *blobs[files // 2 :]]
    tar = _tar(entries)
    return tar, _gzip(tar)


def build_image(
    layout: Path, serial: int, size: int, layers: int, reads: int, *, listen: bool, pool: Executor
) -> Image:
    """An OCI layout: a busybox layer (with /www) + `layers - 1` layers of random bytes; the
    entrypoint reads `reads` bytes (each random layer's `app.bin`) before it serves."""
    big = max(layers - 1, 1)
    jobs = [pool.submit(_base_layer, serial)]
    jobs += [
        pool.submit(_random_layer, serial, i, size // big, reads // big) for i in range(1, big + 1)
    ]
    built = [j.result() for j in jobs]
    port = HTTP_PORT_BASE + serial if listen else None
    read = " ".join(f"/opt/l{i:02d}/app.bin" for i in range(1, big + 1))
    if port is not None:
        serve = f"exec /bin/busybox httpd -f -p {port} -h /www"
    else:  # 8 of these share a namespace: nothing listens
        serve = "trap 'exit 0' TERM; while :; do sleep 1; done"
    cmd = ["/bin/sh", "-c", f"cat {read} > /dev/null && {serve}"]
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def write(data: bytes) -> dict[str, Any]:
        digest = sha256(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    descs = [{"mediaType": OCI_LAYER, **write(gz)} for _, gz in built]
    config = {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar, _ in built]},
    }
    config_desc = write(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config_desc},
        "layers": descs,
    }
    mdesc = write(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                **mdesc,
                "annotations": {"org.opencontainers.image.ref.name": "bench"},
            }
        ],
    }
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps(index))
    return Image(
        serial=serial,
        layout=layout,
        port=port,
        raw_bytes=sum(len(tar) for tar, _ in built),
        blob_bytes=config_desc["size"] + sum(int(d["size"]) for d in descs),
        layers=len(descs),
    )


# ---------------------------------------------------------------------- network / processes


_libc: ctypes.CDLL | None = None


def _enter_netns(netns: str) -> None:
    """Thread initializer: this thread's sockets live in `netns` (setns is per thread)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        return ""


def stop_proc(p: Proc, grace: float = 30.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if p.proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.proc.pid, signal.SIGKILL)  # anything left in its group


class Net:
    """The regions: namespaces of a WanLab, or (no lab possible) plain processes on 127.0.0.1."""

    def __init__(self, lab: wanlab.WanLab | None, logs: Path) -> None:
        self.lab = lab
        self.logs = logs
        self.procs: list[Proc] = []
        self.pools: dict[str, Executor] = {}

    def address(self, region: str) -> str:
        return self.lab.regions[region].address if self.lab else "127.0.0.1"

    def url(self, frm: str, to: str, port: int) -> str:
        """How a process in `frm` reaches port `port` of region `to` (over the shaped path)."""
        if self.lab is None:
            return f"http://127.0.0.1:{port}"
        host, p = self.lab.endpoint(frm, to, port)
        return f"http://{host}:{p}"

    def popen(self, region: str, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start a long-running process in the region; output to a log file. Main thread only
        (the lab's processes die with the thread that started them)."""
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as out:
            kw: dict[str, Any] = {
                "stdin": subprocess.DEVNULL,
                "stdout": out,
                "stderr": subprocess.STDOUT,
                "env": env,
                "start_new_session": True,
            }
            if self.lab is not None:
                proc = self.lab.popen(region, argv, **kw)
            else:
                proc = subprocess.Popen(argv, **kw)
        p = Proc(name, proc, log_path)
        self.procs.append(p)
        return p

    def run(self, region: str, argv: list[str], env: dict[str, str], timeout: float) -> str:
        """Run a command in the region to completion; its stdout (raises on failure)."""
        if self.lab is not None:
            proc = self.lab.popen(
                region,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        else:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise BenchError(
                f"{shlex.join(argv)} in {region}: no exit within {timeout:.0f} s"
            ) from None
        if proc.returncode != 0:
            raise BenchError(
                f"{shlex.join(argv)} in {region} exited {proc.returncode}: "
                f"{err.decode(errors='replace').strip()[-2000:]}"
            )
        return out.decode()

    def call(self, region: str, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run `fn` in a thread whose sockets are in the region's namespace."""
        pool = self.pools.get(region)
        if pool is None:
            if self.lab is not None:
                netns = self.lab.regions[region].netns
                pool = Executor(8, f"ns-{region}", initializer=_enter_netns, initargs=(netns,))
            else:
                pool = Executor(8, f"ns-{region}")
            self.pools[region] = pool
        return pool.submit(fn, *args)

    def link_bytes(self, frm: str, to: str) -> int | None:
        """Bytes `tc` has sent on `frm`'s link towards `to` (None without a lab)."""
        if self.lab is None:
            return None
        netns = self.lab.regions[frm].netns
        out = subprocess.run(
            ["tc", "-n", netns, "-s", "qdisc", "show", "dev", f"to-{to}"],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"Sent (\d+) bytes", out.stdout)
        return int(m.group(1)) if m else None

    def describe(self) -> str:
        return self.lab.describe() if self.lab else ""

    def close(self) -> None:
        _STOP.set()
        for p in reversed(self.procs):  # agents (started last) first: they stop machines
            stop_proc(p)
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        if self.lab is not None:
            self.lab.close()


# ------------------------------------------------------------------------------------- HTTP


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    method: str,
    url: str,
    token: str | None = None,
    body: object = None,
    timeout: float = 60,
) -> tuple[int, bytes]:
    headers = {}
    data = None
    if token:
        headers["Authorization"] = "Basic " + base64.b64encode(f"x:{token}".encode()).decode()
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url: str, deadline: float) -> float | None:
    """Poll `url` until it answers 200; the bench clock's time.monotonic() then (None: gave up)."""
    while time.monotonic() < deadline and not _STOP.is_set():
        with contextlib.suppress(OSError, ValueError), _OPENER.open(url, timeout=1) as resp:
            if resp.status == 200:
                at = time.monotonic()
                resp.read()
                return at
        time.sleep(0.02)
    return None


@dataclass
class Api:
    """The management API of a node, called from inside its region's namespace."""

    net: Net
    region: str
    base: str
    token: str

    def __call__(self, method: str, path: str, body: object = None) -> Any:
        url = self.base + "/api/v1" + path
        status, raw = self.net.call(self.region, http, method, url, self.token, body).result()
        if status >= 400:
            raise BenchError(f"{method} {path}: HTTP {status} {raw[:500].decode(errors='replace')}")
        return json.loads(raw) if raw else None

    def metric(self, name: str) -> float:
        status, raw = self.net.call(
            self.region, http, "GET", self.base + "/metrics", self.token
        ).result()
        for line in raw.decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        raise BenchError(f"no {name} in {self.base}/metrics (HTTP {status})")


# ---------------------------------------------------------------------------------- the bench


@dataclass
class Node:
    proc: Proc
    region: str  # the namespace it runs in
    url: str  # as seen from its own region
    token: str


@dataclass
class Agent:
    proc: Proc
    data_dir: Path
    ready: float  # monotonic time its loop began (it polls right then, then every 0.5 s)


@dataclass
class Start:
    seconds: float  # release POST -> answering (or all `count` started)
    prepared: float | None  # the agent's "Successfully prepared image (…s)" (slowest machine)
    phases: dict[str, float]
    link_bytes: int | None = None  # tc: iad -> syd during the deploy
    node_bytes: float | None = None  # syd node's bytes from other regions (whole + Range)
    range_bytes: float | None = None  # of which Range reads passed through
    reclaimed: int = 0  # replication jobs of the image that needed more than one claim
    wan0: tuple[float, float] | None = None  # the syd node's counters before the deploy
    link0: int | None = None  # tc's before the deploy


@dataclass
class Results:
    starts: dict[int, list[Start]] = field(default_factory=lambda: {i: [] for i in range(9)})
    warm: list[Start] = field(default_factory=list)  # a second start on fig 6's agent
    indexed: list[float] = field(default_factory=list)  # push end -> layer indexes listed
    index_copied: list[float] = field(default_factory=list)  # push end -> indexes in syd
    index_bytes: list[float] = field(default_factory=list)  # an image's index blobs
    learned: list[float] = field(default_factory=list)  # bytes of fig 7's prefetch list
    replication: list[float] = field(default_factory=list)  # fig 3: push end -> syd complete
    replication_bytes: list[float] = field(default_factory=list)
    replication_reclaimed: list[int] = field(default_factory=list)
    image_bytes: list[int] = field(default_factory=list)
    raw_bytes: list[int] = field(default_factory=list)


def _when(value: str) -> float:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Bench:
    def __init__(self, args: argparse.Namespace, net: Net, tmp: Path) -> None:
        self.args = args
        self.net = net
        self.tmp = tmp
        self.serial = 0
        self.agents = 0
        self.pool = Executor(max(2, os.cpu_count() or 2), "build")
        self.results = Results()
        self.link_seconds = args.size_mb * MB * 8 / (args.mbit * 1e6) if net.lab else 0.0
        self.ports = dict(LAB_PORTS) if net.lab else {k: _free_port() for k in LAB_PORTS}

    # -- platform

    def start_node(self, name: str, region: str, extra: list[str], token_file: Path) -> Node:
        data = self.tmp / name / "data"
        data.mkdir(parents=True)
        port_file = self.tmp / name / "port"
        argv = [
            sys.executable,
            "-m",
            "skyreg",
            "serve",
            "--host",
            self.net.address(region),
            "--port",
            str(self.ports[name]),
            "--data-dir",
            str(data),
            "--port-file",
            str(port_file),
            *extra,
        ]
        log(f"starting node {name} in {region}: {shlex.join(argv)}")
        proc = self.net.popen(region, f"node-{name}", argv, dict(os.environ))
        deadline = time.monotonic() + 60
        token = ""
        while not token:
            if proc.proc.poll() is not None:
                raise BenchError(f"node {name} exited {proc.proc.returncode}: {proc.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"node {name} did not start within 60 s: {proc.tail()}")
            with contextlib.suppress(OSError):
                if port_file.read_text().strip():
                    token = token_file.read_text().strip()
            time.sleep(0.05)
        return Node(proc, region, f"http://{self.net.address(region)}:{self.ports[name]}", token)

    def start_platform(self) -> None:
        a, b, lab = A, B, self.net.lab
        if lab is not None:
            lab.shape(a, b, rtt_ms=self.args.rtt_ms, mbit=self.args.mbit)
        regions: dict[str, Any] = {
            a: {
                "url": f"http://{self.net.address(a)}:{self.ports[a]}",
                "rtt_ms": {b: self.args.rtt_ms if lab else 0},
            },
            b: {"url": f"http://{self.net.address(b)}:{self.ports[b]}"},
        }
        if lab is not None:  # node-to-node traffic through the delaying relays
            regions[a]["peer_urls"] = {b: self.net.url(a, b, self.ports[b])}
            regions[b]["peer_urls"] = {a: self.net.url(b, a, self.ports[a])}
        regions_file = self.tmp / "regions.json"
        regions_file.write_text(json.dumps({"regions": regions}, indent=2))
        log(f"regions file: {json.dumps(regions)}")
        token_file = self.tmp / a / "data" / "admin-token"
        for code in (a, b):  # iad first: it creates the admin token every node uses
            extra = [
                "--database-url",
                f"sqlite:///{self.tmp / 'meta.db'}",
                "--region",
                code,
                "--regions-file",
                str(regions_file),
                "--peer-token-file",
                str(token_file),
            ]
            node = self.start_node(code, code, extra, token_file)
            setattr(self, f"node_{code}", node)
        self.naive = self.start_node("naive", a, [], self.tmp / "naive" / "data" / "admin-token")
        self.api = Api(self.net, a, self.node_iad.url, self.node_iad.token)
        self.syd_api = Api(self.net, b, self.node_syd.url, self.node_iad.token)
        self.naive_api = Api(self.net, a, self.naive.url, self.naive.token)
        for api in (self.api, self.naive_api):
            api("POST", "/orgs", {"name": "bench"})
        for app in ("geo-local", "geo-ahead", "geo-far", "geo-fleet", *LAZY_APPS):
            self.api("POST", "/apps", {"name": app, "org": "bench"})
        self.naive_api("POST", "/apps", {"name": "geo-naive", "org": "bench"})
        self.api("PATCH", "/apps/geo-ahead", {"regions": [b], "replicate_ahead": True})
        self.naive_server = self.net.url(b, a, self.ports["naive"])  # syd -> iad, over the WAN

    def image(self, listen: bool = True) -> Image:
        self.serial += 1
        t0 = time.perf_counter()
        img = build_image(
            self.tmp / "images" / f"img{self.serial}",
            self.serial,
            self.args.size_mb * MB,
            self.args.layers,
            self.args.reads_mb * MB,
            listen=listen,
            pool=self.pool,
        )
        log(
            f"built image {img.serial}: {img.layers} layers, {img.raw_bytes / MB:.0f} MB "
            f"uncompressed, {img.blob_bytes / MB:.1f} MB blobs in {fmt(time.perf_counter() - t0)}"
        )
        self.results.image_bytes.append(img.blob_bytes)
        self.results.raw_bytes.append(img.raw_bytes)
        return img

    def push(self, node: Node, img: Image, ref: str) -> float:
        host = node.url.removeprefix("http://")
        argv = [
            sys.executable,
            "-m",
            "skyreg",
            "push",
            "--insecure",
            "--quiet",
            str(img.layout),
            f"{host}/{ref}",
        ]
        t0 = time.perf_counter()
        out = self.net.run(node.region, argv, {**os.environ, "SKYREG_TOKEN": node.token}, 600)
        took = time.perf_counter() - t0
        log(f"pushed {out.strip()} in {fmt(took)}")
        return took

    def start_agent(
        self, region: str, server: str, token: str, code: str | None = None, lazy: bool = False
    ) -> Agent:
        """An agent in network namespace `region`, serving skyreg region `code` (default: the
        same name; a single-region registry knows only `local`); `lazy`: machines may start
        from a lazy mount of the image (figures 6-8), else the image is pulled whole first."""
        self.agents += 1
        data = self.tmp / "agents" / f"{region}-{self.agents}"
        argv = [
            sys.executable,
            "-m",
            "skyreg",
            "agent",
            "--region",
            code or region,
            "--server",
            server,
            "--data-dir",
            str(data),
            "--lazy" if lazy else "--no-lazy",
        ]
        proc = self.net.popen(
            region, f"agent-{region}-{self.agents}", argv, {**os.environ, "SKYREG_TOKEN": token}
        )
        deadline = time.monotonic() + 60
        while not (data / "cache").is_dir():  # made when its loop starts
            if proc.proc.poll() is not None:
                raise BenchError(f"agent exited {proc.proc.returncode}: {proc.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"agent did not start within 60 s: {proc.tail()}")
            time.sleep(0.05)
        return Agent(proc, data, time.monotonic())

    def stop_agent(self, agent: Agent, api: Api, app: str) -> None:
        for m in api("GET", f"/apps/{app}/machines")["machines"]:
            if m["desired"] == "started":
                api("POST", f"/machines/{m['id']}/stop")
        stop_proc(agent.proc)
        self.net.procs.remove(agent.proc)
        if agent.proc.proc.returncode not in (0, None):
            log(f"agent exited {agent.proc.proc.returncode}: {agent.proc.tail(1500)}")
        remove_tree(agent.data_dir)

    def deploy(
        self,
        api: Api,
        app: str,
        ref: str,
        region: str,
        count: int,
        port: int | None,
        post_at: float,
        code: str | None = None,
    ) -> Start:
        """POST a release to skyreg region `code` (default `region`) at `post_at`; seconds until
        `port` answers in namespace `region` (or all `count` started)."""
        deadline = time.monotonic() + 120 + 4 * self.link_seconds
        probe = None
        if port is not None:
            probe = self.net.call(region, wait_http, f"http://127.0.0.1:{port}/", deadline)
        link0 = self.net.link_bytes(A, B)
        node0 = self.wan_in() if api is not self.naive_api else None
        os.sync()  # nobody's earlier writes (the bench's own image layouts) flush in the window
        time.sleep(max(0.0, post_at - time.monotonic()))
        wall0, t0 = time.time(), time.monotonic()
        body = {"image": ref, "regions": [code or region], "count": count, "strategy": "immediate"}
        version = api("POST", f"/apps/{app}/releases", body)["version"]
        done: float | None = None
        while done is None:
            if probe is not None and probe.done():
                done = probe.result()
                if done is None:
                    raise BenchError(f"{app}: nothing answered on port {port} in {region}")
                break
            mine = [
                m
                for m in api("GET", f"/apps/{app}/machines")["machines"]
                if m["release_version"] == version
            ]
            for m in mine:
                if m["state"] == "failed":
                    events = "; ".join(e["message"] for e in m["events"])
                    raise BenchError(f"{app}: machine {m['id']} failed: {events}")
            if probe is None and len(mine) == count and all(m["state"] == "started" for m in mine):
                done = time.monotonic()
                break
            if time.monotonic() > deadline:
                states = ", ".join(f"{m['id']}={m['state']}" for m in mine)
                raise BenchError(f"{app}: not up in time ({states})")
            if probe is not None:
                concurrent.futures.wait([probe], timeout=0.25)
            else:
                time.sleep(0.1)
        seconds = done - t0
        answered_wall = wall0 + seconds
        link = self.net.link_bytes(A, B)
        node = self.wan_in() if node0 is not None else None
        mine = [
            m
            for m in api("GET", f"/apps/{app}/machines")["machines"]
            if m["release_version"] == version
        ]
        return Start(
            seconds=seconds,
            prepared=_prepared(mine),
            phases=_phases(mine, wall0, answered_wall),
            link_bytes=None if link is None or link0 is None else link - link0,
            node_bytes=None if node is None or node0 is None else sum(node) - sum(node0),
            range_bytes=None if node is None or node0 is None else node[1] - node0[1],
            wan0=node0,
            link0=link0,
        )

    def wan_in(self) -> tuple[float, float]:
        """The syd node's bytes from other regions: (whole-blob transfers, Range reads)."""
        return (
            self.syd_api.metric("skyreg_transfer_bytes_in_total"),
            self.syd_api.metric("skyreg_range_bytes_in_total"),
        )

    def measure(
        self,
        fig: int,
        agent_args: tuple[str, str, str, str],
        api: Api,
        app: str,
        ref: str,
        count: int,
        port: int | None,
        lazy: bool = False,
        after: Callable[[Agent, Start], None] | None = None,
    ) -> Start:
        """A fresh agent, one timed deploy; `after` runs before the agent stops."""
        region, server, token, code = agent_args
        agent = self.start_agent(region, server, token, code, lazy=lazy)
        # Deploys land at spread phases of the agent's poll cycle (as real ones would), not
        # always just after a poll: 1 s after its loop began, plus (run + 0.5) / runs of it.
        phase = (len(self.results.starts[fig]) + 0.5) / self.args.runs * AGENT_POLL
        try:
            start = self.deploy(
                api, app, ref, region, count, port, agent.ready + 1.0 + phase, code=code
            )
            if after is not None:
                after(agent, start)
        finally:
            self.stop_agent(agent, api, app)
        if fig in (4, 5, 6, 7, 8):
            start.reclaimed = self.reclaimed(app, ref.partition(":")[2])
        self.results.starts[fig].append(start)
        extra = f", {start.reclaimed} job(s) claimed twice" if start.reclaimed else ""
        if start.node_bytes is not None and fig >= 4:
            extra += f", syd node fetched {start.node_bytes / MB:.1f} MB"
            if start.range_bytes:
                extra += f" ({start.range_bytes / MB:.1f} MB by Range)"
        if start.link_bytes:
            extra += f", link iad->syd {start.link_bytes / MB:.1f} MB"
        phases = ", ".join(f"{k} {fmt(v)}" for k, v in start.phases.items())
        log(
            f"figure {fig}: {fmt(start.seconds)} (agent prepared image in "
            f"{fmt(start.prepared)}; {phases}{extra})"
        )
        return start

    def reclaimed(self, app: str, tag: str) -> int:
        """How many of the image's replication jobs into syd took more than one claim (a
        second claim only happens once a lease expired: a stall of up to the lease time)."""
        blobs = {b["digest"] for b in self.api("GET", f"/apps/{app}/images/{tag}")["blobs"]}
        jobs = self.api("GET", "/replication")["recent"]
        again = [j for j in jobs if j["digest"] in blobs and j["region"] == B and j["attempts"] > 1]
        for j in again:
            digest, attempts, state = j["digest"][:19], j["attempts"], j["state"]
            log(f"replication job {digest} into {B}: {attempts} attempts, {state}")
        return len(again)

    def wait_complete(self, app: str, tag: str, region: str) -> float:
        deadline = time.monotonic() + 120 + 4 * self.link_seconds
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            doc = self.api("GET", f"/apps/{app}/images/{tag}")
            if doc["regions"][region]["complete"]:
                return time.monotonic() - t0
            time.sleep(0.25)
        raise BenchError(f"{app}:{tag} not complete in {region}: {doc['regions']}")

    def wait_indexed(self, app: str, tag: str, pushed: float) -> None:
        """Until the image lists its layer indexes (the scan worker in iad makes them after the
        push): every figure deploys an image the registry is done with, so no scan competes
        with a measured start; the time since `pushed` (the push's end) is reported."""
        deadline = time.monotonic() + 300
        found: list[str] = []
        while not found:
            if time.monotonic() > deadline:
                raise BenchError(f"{app}:{tag}: no layer indexes within 300 s")
            doc = self.api("GET", f"/apps/{app}/images/{tag}")
            found = [
                str(r["digest"])
                for r in doc.get("referrers", [])
                if r.get("artifact_type") == LAZY_INDEX
            ]
            time.sleep(0.25)
        took = time.monotonic() - pushed
        self.results.indexed.append(took)
        # The server copies the indexes (not the image) to every region once made: until syd
        # has them, as it would by the time a deploy follows a push.
        blobs = self.index_blobs(app, found[0])
        while not self.in_region(blobs, B):
            if time.monotonic() > deadline:
                raise BenchError(f"{app}:{tag}: layer indexes not in {B} within 300 s")
            time.sleep(0.25)
        copied = time.monotonic() - pushed
        self.results.index_copied.append(copied)
        self.results.index_bytes.append(sum(blobs.values()))
        log(
            f"{app}:{tag} has its layer indexes {fmt(took)} after the push, in {B} "
            f"{fmt(copied)} after ({sum(blobs.values()) / MB:.1f} MB)"
        )

    def index_blobs(self, app: str, referrer: str) -> dict[str, int]:
        """The blobs of the layer-index referrer `referrer` of an image of `app`: digest -> size."""
        url = f"{self.node_iad.url}/v2/{app}/manifests/{referrer}"
        status, raw = self.net.call(A, http, "GET", url, self.node_iad.token).result()
        if status != 200:
            raise BenchError(f"GET {url}: HTTP {status}")
        doc = json.loads(raw)
        return {str(d["digest"]): int(d["size"]) for d in [doc["config"], *doc["layers"]]}

    def in_region(self, blobs: dict[str, int], region: str) -> bool:
        with contextlib.closing(sqlite3.connect(self.tmp / "meta.db", timeout=30)) as db:
            marks = ",".join("?" * len(blobs))
            (n,) = db.execute(
                f"SELECT count(*) FROM blob_regions WHERE region = ? AND digest IN ({marks})",
                (region, *blobs),
            ).fetchone()
        return int(n) == len(blobs)

    def publish(self, img: Image, app: str, tag: str) -> None:
        """Push `img` as `app:tag` in iad and wait for its layer indexes."""
        self.push(self.node_iad, img, f"{app}:{tag}")
        pushed = time.monotonic()
        self._drop(img)
        self.wait_indexed(app, tag, pushed)

    def digest(self, app: str, tag: str) -> str:
        return str(self.api("GET", f"/apps/{app}/images/{tag}")["digest"])

    def wait_tree(self, agent: Agent, app: str, tag: str) -> float:
        """Until the agent's background pull unpacked the image (its layer cache holds the
        tree later starts use); the seconds waited."""
        tree = agent.data_dir / "cache" / "rootfs" / self.digest(app, tag).removeprefix("sha256:")
        deadline = time.monotonic() + 120 + 4 * self.link_seconds
        t0 = time.monotonic()
        while not tree.is_dir():
            if time.monotonic() > deadline:
                raise BenchError(f"{app}:{tag}: the agent did not unpack the image in time")
            time.sleep(0.1)
        return time.monotonic() - t0

    def warm_start(self, agent: Agent, app: str, tag: str, port: int) -> None:
        """Figure 6's agent, once its background pull is done: stop the machine, deploy again
        (the image is cached now: today's unpacked-tree path) and time that start."""
        waited = self.wait_tree(agent, app, tag)
        log(f"{app}:{tag}: the agent had the whole image {fmt(waited)} after the machine answered")
        for m in self.api("GET", f"/apps/{app}/machines")["machines"]:
            if m["desired"] == "started":
                self.api("POST", f"/machines/{m['id']}/stop")
        deadline = time.monotonic() + 60
        while any(
            m["state"] != "stopped" for m in self.api("GET", f"/apps/{app}/machines")["machines"]
        ):
            if time.monotonic() > deadline:
                raise BenchError(f"{app}: machines did not stop within 60 s")
            time.sleep(0.1)
        ref = f"{app}:{tag}"
        warm = self.deploy(self.api, app, ref, B, 1, port, time.monotonic(), code=B)
        self.results.warm.append(warm)
        log(
            f"warm start in {B}: {fmt(warm.seconds)} (agent prepared image in {fmt(warm.prepared)})"
        )

    def whole_image(self, agent: Agent, app: str, tag: str, start: Start) -> None:
        """Figure 8: wait until the image is whole in syd (the node's copy) and on the agent,
        then count every byte the syd node took from iad since the deploy."""
        self.wait_complete(app, tag, B)
        self.wait_tree(agent, app, tag)
        if start.wan0 is not None:
            now = self.wan_in()
            start.node_bytes = sum(now) - sum(start.wan0)
            start.range_bytes = now[1] - start.wan0[1]
        link = self.net.link_bytes(A, B)
        if link is not None and start.link0 is not None:
            start.link_bytes = link - start.link0

    def learn(self, app: str, tag: str, port: int) -> None:
        """One lazy start in iad (local, untimed) that teaches the image's prefetch list:
        figure 7 then starts the same image far away with that list."""
        ref = f"{app}:{tag}"
        agent = self.start_agent(A, self.node_iad.url, self.node_iad.token, A, lazy=True)
        path = f"/agent/apps/{app}/images/{self.digest(app, tag)}/prefetch"
        try:
            self.deploy(self.api, app, ref, A, 1, port, time.monotonic(), code=A)
            deadline = time.monotonic() + 120
            while not (ranges := self.api("GET", path)["ranges"]):
                if time.monotonic() > deadline:
                    raise BenchError(f"{ref}: no prefetch list learned within 120 s")
                time.sleep(0.25)
        finally:
            self.stop_agent(agent, self.api, app)
        learned = sum(int(r["length"]) for r in ranges)
        self.results.learned.append(learned)
        log(f"{ref}: learned a prefetch list of {len(ranges)} ranges, {learned / MB:.1f} MB")

    # -- the figures

    def run(self) -> None:
        self.start_platform()
        base = self.image()
        self.push(self.naive, base, "geo-naive:base")
        self.publish(base, "geo-local", "base")
        iad = (A, self.node_iad.url, self.node_iad.token, A)
        syd = (B, self.node_syd.url, self.node_iad.token, B)
        # The naive registry has no regions: its agent, in syd's namespace, serves `local`.
        naive = (B, self.naive_server, self.naive.token, "local")
        log("--- warm-up (not reported): one machine start in iad")
        self.measure(0, iad, self.api, "geo-local", "geo-local:base", 1, base.port)
        for run in range(1, self.args.runs + 1):
            log(f"--- run {run} of {self.args.runs}")
            self.measure(1, iad, self.api, "geo-local", "geo-local:base", 1, base.port)
            if self.args.only == "lazy":
                self.run_lazy(run, syd)
                continue
            self.measure(2, naive, self.naive_api, "geo-naive", "geo-naive:base", 1, base.port)

            img = self.image()
            node0 = self.syd_api.metric("skyreg_transfer_bytes_in_total")
            self.push(self.node_iad, img, f"geo-ahead:r{run}")
            pushed = time.monotonic()
            self._drop(img)
            took = self.wait_complete("geo-ahead", f"r{run}", B)
            self.wait_indexed("geo-ahead", f"r{run}", pushed)
            moved = self.syd_api.metric("skyreg_transfer_bytes_in_total") - node0
            self.results.replication.append(took)
            self.results.replication_bytes.append(moved)
            self.results.replication_reclaimed.append(self.reclaimed("geo-ahead", f"r{run}"))
            log(f"replicated to {B} {fmt(took)} after the push ended ({moved / MB:.1f} MB)")
            self.measure(3, syd, self.api, "geo-ahead", f"geo-ahead:r{run}", 1, img.port)

            img = self.image()
            self.publish(img, "geo-far", f"r{run}")
            self.measure(4, syd, self.api, "geo-far", f"geo-far:r{run}", 1, img.port)

            img = self.image(listen=False)
            self.publish(img, "geo-fleet", f"r{run}")
            self.measure(5, syd, self.api, "geo-fleet", f"geo-fleet:r{run}", FLEET, None)

            self.run_lazy(run, syd)

    def run_lazy(self, run: int, syd: tuple[str, str, str, str]) -> None:
        """Figures 6-8: the same kinds of fresh image, started by agents with --lazy."""
        tag = f"r{run}"
        img = self.image()
        self.publish(img, "geo-lazy", tag)
        port = img.port
        assert port is not None
        self.measure(
            6, syd, self.api, "geo-lazy", f"geo-lazy:{tag}", 1, port, lazy=True,
            after=lambda agent, _start: self.warm_start(agent, "geo-lazy", tag, port),
        )  # fmt: skip

        img = self.image()
        self.publish(img, "geo-learn", tag)
        assert img.port is not None
        self.learn("geo-learn", tag, img.port)
        self.measure(7, syd, self.api, "geo-learn", f"geo-learn:{tag}", 1, img.port, lazy=True)

        img = self.image(listen=False)
        self.publish(img, "geo-lfleet", tag)
        self.measure(
            8, syd, self.api, "geo-lfleet", f"geo-lfleet:{tag}", FLEET, None, lazy=True,
            after=lambda agent, start: self.whole_image(agent, "geo-lfleet", tag, start),
        )  # fmt: skip

    def _drop(self, img: Image) -> None:
        shutil.rmtree(img.layout, ignore_errors=True)


def _events(m: dict[str, Any], prefix: str | tuple[str, ...]) -> float | None:
    for e in m["events"]:
        if e["message"].startswith(prefix):
            return _when(e["at"])
    return None


def _prepared(machines: list[dict[str, Any]]) -> float | None:
    found = [
        float(g.group(1))
        for m in machines
        for e in m["events"]
        if (g := PREPARED_RE.match(e["message"]))
    ]
    return max(found) if found else None


def _phases(machines: list[dict[str, Any]], wall0: float, done: float) -> dict[str, float]:
    """From the last machine to start: POST -> pulling -> prepared -> starting -> done."""
    marks = [
        (
            _events(m, "Pulling container image"),
            _events(m, PREPARED),
            _events(m, "Starting machine"),
        )
        for m in machines
    ]
    marks = [x for x in marks if all(v is not None for v in x)]
    if not marks:
        return {}
    pulling, prepared, starting = max(marks, key=lambda x: x[2] or 0.0)
    assert pulling is not None and prepared is not None and starting is not None
    return {
        "agent poll": pulling - wall0,
        "prepare": prepared - pulling,
        "rootfs+start": starting - prepared,
        "up": done - starting,
    }


# ---------------------------------------------------------------------------------- reporting


def report(
    args: argparse.Namespace,
    net: Net,
    res: Results,
    started: datetime.datetime,
    took: float,
    no_lab: str | None,
) -> None:
    s = res.starts

    def med(fig: int, attr: str = "seconds") -> float | None:
        return median([v for x in s[fig] if (v := getattr(x, attr)) is not None])

    image = median([float(b) for b in res.image_bytes]) or 0.0
    raw = median([float(b) for b in res.raw_bytes]) or 0.0
    link_s = image * 8 / (args.mbit * 1e6) if net.lab else 0.0
    f1, f3, f4 = med(1), med(3), med(4)
    command = f"python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}".rstrip()
    print(f"- date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine_line()}")
    print(f"- command: `{command}` ({took / 60:.1f} min)")
    if net.lab is not None:
        print(f"- emulation: {net.describe()}; inside a region: loopback (unshaped)")
    else:
        print(
            f"- emulation: **none** — no network namespaces ({no_lab}); every region is a "
            "plain process on 127.0.0.1, so cross-region figures carry no WAN cost"
        )
    print(
        f"- image: {args.layers} gzip layers (busybox + /www, then random bytes), "
        f"{raw / MB:.0f} MB uncompressed, {image / MB:.1f} MB of blobs; figures 3-5 use a "
        "fresh image per run (every layer new)"
    )
    print(
        f"- median of {args.runs} run(s); time = bench clock from the release POST until the "
        "machine answers `GET /` inside its region's namespace (5: until all 8 are `started`, "
        "which the agent reports 2 s after the process started); fresh agent cache per run; "
        "deploys land at spread phases of the agent's 0.5 s poll; one untimed warm-up start"
    )
    print()
    print("| # | figure | time | agent: prepared image | goal | ratio | met |")
    print("|---|---|---:|---:|---|---:|---|")

    def row(n: int, name: str, goal: str, bound: float | None, value: float | None) -> None:
        ratio = "—" if bound is None or value is None else f"{value / bound:.2f}"
        met = "—" if bound is None or value is None else ("yes" if value <= bound else "**no**")
        print(
            f"| {n} | {name} | {fmt(med(n))} | {fmt(med(n, 'prepared'))} | {goal} | {ratio} "
            f"| {met} |"
        )

    row(1, f"machine start in {A} (local baseline)", "—", None, None)
    r2 = "—" if f1 is None or med(2) is None else f"{med(2) / f1:.2f} x (1)"  # type: ignore[operator]
    print(
        f"| 2 | machine start in {B}, no replication (agent → {A} node across the WAN) "
        f"| {fmt(med(2))} | {fmt(med(2, 'prepared'))} | reference | {r2} | — |"
    )
    b3 = None if f1 is None else 1.2 * f1
    row(
        3,
        f"machine start in {B}, image copied ahead by the region policy",
        f"≤ 1.2 x (1) = {fmt(b3)}",
        b3,
        f3,
    )
    b4 = None if f1 is None else 1.3 * (link_s + f1)
    row(
        4,
        f"first deploy to {B}, no copy there yet",
        f"≤ 1.3 x ({fmt(link_s)} link + (1)) = {fmt(b4)}",
        b4,
        f4,
    )
    node5 = med(5, "node_bytes")
    link5 = med(5, "link_bytes")
    bytes_ratio = None if node5 is None or not image else node5 / image
    met5 = "—" if bytes_ratio is None else ("yes" if bytes_ratio <= 1.1 else "**no**")
    link_txt = (
        "" if link5 is None else f"; link {A}→{B} {link5 / MB:.1f} MB (IP, {link5 / image:.2f} x)"
    )
    node_txt = "—" if node5 is None else f"{node5 / MB:.1f} MB"
    print(
        f"| 5 | {FLEET} machines in {B} at once, fresh image: bytes into {B} (node counter"
        f"{link_txt}); time until all {FLEET} started | {node_txt}; {fmt(med(5))} "
        f"| {fmt(med(5, 'prepared'))} | ≈ 1 x image ({image / MB:.1f} MB; met if ≤ 1.1 x) "
        f"| {'—' if bytes_ratio is None else f'{bytes_ratio:.2f}'} | {met5} |"
    )
    lazy = "lazy pull (agent `--lazy`)"
    b6 = 0.3 * link_s if net.lab else None
    row(6, f"first deploy to {B}, no copy there yet, {lazy}", f"≤ 0.3 x link = {fmt(b6)}", b6,
        med(6))  # fmt: skip
    b7 = 0.15 * link_s if net.lab else None
    row(7, f"as 6, with the prefetch list one start in {A} learned", f"≤ 0.15 x link = {fmt(b7)}",
        b7, med(7))  # fmt: skip
    node8, link8, range8 = med(8, "node_bytes"), med(8, "link_bytes"), med(8, "range_bytes")
    ratio8 = None if node8 is None or not image else node8 / image
    met8 = "—" if ratio8 is None else ("yes" if ratio8 <= 1.1 else "**no**")
    link_txt = (
        "" if link8 is None else f"; link {A}→{B} {link8 / MB:.1f} MB (IP, {link8 / image:.2f} x)"
    )
    node_txt = "—" if node8 is None else f"{node8 / MB:.1f} MB"
    range_txt = "" if range8 is None else f", {range8 / MB:.1f} MB of it by Range"
    print(
        f"| 8 | {FLEET} machines in {B} at once, fresh image, {lazy}: bytes into {B} until the "
        f"image is whole there and on the agent (node counters: whole blobs + Range{range_txt}"
        f"{link_txt}); time until all {FLEET} started | {node_txt}; {fmt(med(8))} "
        f"| {fmt(med(8, 'prepared'))} | ≤ 1.1 x image "
        f"| {'—' if ratio8 is None else f'{ratio8:.2f}'} | {met8} |"
    )
    warm = median([x.seconds for x in res.warm])
    warm_prep = median([x.prepared for x in res.warm if x.prepared is not None])
    met_w = "—" if warm_prep is None else ("yes" if warm_prep < 0.1 else "**no**")
    print(
        f"| w | warm start: figure 6's agent again once its background pull unpacked the image "
        f"| {fmt(warm)} | {fmt(warm_prep)} | prepared < 100 ms | — | {met_w} |"
    )
    print()
    if res.indexed:
        index_mb = (median(res.index_bytes) or 0) / MB
        print(
            f"Layer indexes (scan worker in {A}): listed {fmt(median(res.indexed))} after the "
            f"end of a push, copied to {B} {fmt(median(res.index_copied))} after it (medians; "
            f"{index_mb:.1f} MB, {index_mb * MB / image:.1%} of the image: the server copies an "
            "image's indexes, not the image, to every region once made); every figure deploys "
            "once they are there. Figure 7's prefetch list: "
            f"{(median(res.learned) or 0) / MB:.1f} MB (median), learned by one lazy start in "
            f"{A}."
        )
    node4 = med(4, "node_bytes")
    if node4 is not None and image:
        link_txt = (
            f"the link alone needs {fmt(link_s)} for the image at {args.mbit:g} Mbit/s"
            if net.lab is not None
            else "no link limit"
        )
        print(
            f"Figure 4 moved {node4 / MB:.1f} MB into {B} ({node4 / image:.2f} x the image); "
            f"{link_txt}."
        )
    if res.replication:
        print(
            f"Figure 3's copy ahead: {fmt(median(res.replication))} from the end of the push "
            f"until `images/{{tag}}` showed {B} complete "
            f"({(median(res.replication_bytes) or 0) / MB:.1f} MB moved)."
        )
    again = [sum(x.reclaimed for x in s[n]) for n in (4, 5, 6, 7, 8)]
    print(
        f"Replication jobs that needed a second claim (possible only after a {B} node's lease "
        f"expired, 30 s): figure 3's copies {sum(res.replication_reclaimed)}, figures 4-8 "
        f"{', '.join(map(str, again))} (summed over the runs)."
    )
    print()
    print(
        "Per run (seconds): "
        + "; ".join(f"({n}) " + " ".join(f"{x.seconds:.2f}" for x in s[n]) for n in range(1, 9))
        + "."
    )
    print()
    print(
        "Where the time goes (medians; from the machine events of the last machine to start: "
        'agent poll = POST → "Pulling container image", prepare = → "Successfully prepared '
        'image", rootfs+start = → "Starting machine", up = → answering / `started`):'
    )
    print()
    print("| # | agent poll | prepare | rootfs+start | up | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in range(1, 9):
        keys = ("agent poll", "prepare", "rootfs+start", "up")
        cells = [fmt(median([x.phases[k] for x in s[n] if k in x.phases])) for k in keys]
        print(f"| {n} | {' | '.join(cells)} | {fmt(med(n))} |")


# --------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=150, help="iad <-> syd round trip")
    parser.add_argument("--mbit", type=float, default=100, help="iad <-> syd bandwidth")
    parser.add_argument("--size-mb", type=int, default=200, help="image size (uncompressed)")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument(
        "--reads-mb", type=int, default=10, help="what the entrypoint reads before it serves"
    )
    parser.add_argument(
        "--only", choices=("all", "lazy"), default="all", help="lazy: figures 1 and 6-8 only"
    )
    parser.add_argument("--tmp-dir", type=Path, default=None, help="parent of the temp dir")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy every log here")
    args = parser.parse_args()
    if args.runs < 1 or args.layers < 2 or args.size_mb < 1 or args.mbit <= 0:
        parser.error("--runs >= 1, --layers >= 2, --size-mb >= 1, --mbit > 0")
    for need, what in (
        (shutil.which("bwrap"), "bwrap (bubblewrap)"),
        (BUSYBOX.exists() or None, "/bin/busybox (busybox-static)"),
    ):
        if need is None:
            print(f"geo-bench: {what} is needed", file=sys.stderr)
            return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):  # before the lab: it then leaves them to us
        signal.signal(sig, on_signal)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="geo-bench-", dir=args.tmp_dir))
    tmp.chmod(0o711)  # agents' data dirs live below: every ancestor must be o+x
    logs = tmp / "logs"
    logs.mkdir()
    no_lab = wanlab.can_build()
    net: Net | None = None
    try:
        if no_lab:
            log(f"cannot build the WAN lab ({no_lab}): running WITHOUT shaping on 127.0.0.1")
            net = Net(None, logs)
        else:
            net = Net(wanlab.WanLab(), logs)
            for code in (A, B):
                net.lab.add_region(code)  # type: ignore[union-attr]
        log(f"temp dir {tmp}")
        bench = Bench(args, net, tmp)
        try:
            bench.run()
        except BenchError:
            for p in net.procs:
                if p.name.startswith("node"):
                    log(f"--- tail of {p.name}:\n{p.tail(3000)}")
            raise
        finally:
            bench.pool.shutdown(wait=True, cancel_futures=True)
        report(args, net, bench.results, started, time.monotonic() - t0, no_lab)
        return 0
    except BenchError as e:
        log(f"failed: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if net is not None:
            net.close()
        if args.keep_logs is not None:
            shutil.copytree(logs, args.keep_logs, dirs_exist_ok=True)
        remove_tree(tmp)
        log(f"removed {tmp}")


if __name__ == "__main__":
    sys.exit(main())
