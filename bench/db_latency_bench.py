#!/usr/bin/env python3
"""What a database a few milliseconds away costs skyreg (issue 11's measuring stick).

One run starts, all on 127.0.0.1 with free ports: a throwaway PostgreSQL (as
tests/support/postgres.py starts it), one delaying TCP relay per added round trip (bench/wanlab.py
`relay`, run as a subprocess: this kernel has no sch_netem), three `skyreg serve --no-auth`
with filesystem storage, each on its own database of that PostgreSQL — reached directly,
through the relay adding 2 ms and through the one adding 10 ms — and Debian's
`docker-registry` (CNCF Distribution) as the anchor. Each registry gets its own image (a
random layer, so digests differ between registries) tagged 50 times in `bench/image`;
each one's answers are checked once (manifest digest, blob HEAD digest and length, the tag
list) so a misrouted answer cannot pass. Then 64 connections — `wrk --latency` for manifest
GET by tag and the tags list, `curl --parallel` for blob HEAD (wrk 4.1 cannot read HEAD
answers) — load each registry, 3 runs alternating between the registries; the report gives
the median req/s, the ratios to the direct database, and the median p50 and p99 latencies.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import registry_bench as rb  # bench/ is on sys.path when run as a script
import scaleout_bench as sb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.support import postgres as pg_fixtures

log = rb.log
BenchError = rb.BenchError

WANLAB_PY = str(Path(__file__).resolve().with_name("wanlab.py"))
REPO = "bench/image"
TAG_COUNT = 50  # "latest" plus 49 more, all on one manifest
PINGS = 50  # SELECT 1 round trips timed per database path
RELAY_TIMEOUT = 30.0
WRK_TIMEOUT_S = 60  # wrk's default (2 s) would drop the slowest requests from the percentiles
ANCHOR = "distribution"
DIRECT = "skyreg direct"
PERCENTILE_LINE = re.compile(r"^\s*(50|75|90|99)%\s+([0-9.]+)(us|ms|s|m)\s*$", re.MULTILINE)
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def setup_name(rtt_ms: float, threads: int | None = None) -> str:
    """The column name of the skyreg whose database is `rtt_ms` away (0: direct), run with
    `--db-threads threads` (None: skyreg's default, not named)."""
    name = DIRECT if rtt_ms == 0 else f"skyreg +{rtt_ms:g} ms"
    return name if threads is None else f"{name}, {threads} threads"


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Sizes:
    """How long and how hard each figure is measured."""

    wrk_seconds: int
    wrk_connections: int
    runs: int


FULL = Sizes(10, 64, 3)
QUICK = Sizes(3, 64, 3)


# ----------------------------------------------------------------------- processes


def start_postgres(
    stack: contextlib.ExitStack, databases: Sequence[str]
) -> pg_fixtures.PostgresServer:
    """A throwaway PostgreSQL (scaleout_bench's) with the given databases created."""
    server = sb.start_postgres_server(stack, "db-latency-bench-pg-")
    with server.admin() as conn:
        for name in databases:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return server


def pg_settings(pg: pg_fixtures.PostgresServer) -> str:
    """The durability settings the server runs with, as `name=value` pairs."""
    names = ("fsync", "synchronous_commit", "full_page_writes", "max_connections")
    with pg.admin() as conn:
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s) ORDER BY name",
            (list(names),),
        ).fetchall()
        version = conn.execute("SHOW server_version").fetchone()
    pairs = ", ".join(f"{name}={value}" for name, value in rows)
    return f"PostgreSQL {version[0] if version else '?'}: {pairs}"


def read_ready_line(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    """The 'READY host:port' line a wanlab helper prints once it listens."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"relay did not print READY within {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        piece = os.read(fd, 1)
        if not piece:
            raise BenchError(f"relay exited before it was ready:\n{rb.log_tail(log_path)}")
        buf += piece
    line = buf.decode(errors="replace").strip()
    if not line.startswith("READY "):
        raise BenchError(f"relay printed {line!r} instead of READY host:port")
    return line


def start_relay(stack: contextlib.ExitStack, workdir: Path, target_port: int, rtt_ms: float) -> int:
    """A wanlab delaying relay on a free 127.0.0.1 port adding `rtt_ms` per round trip (and
    2 RTT to a new connection, as a real path would) in front of 127.0.0.1:`target_port`;
    returns its port. It dies with us (PR_SET_PDEATHSIG) and is stopped on unwind."""
    log_path = workdir / f"relay-{rtt_ms:g}ms.log"
    argv = [sys.executable, WANLAB_PY, "relay", "--listen", "127.0.0.1:0"]
    argv += ["--target", f"127.0.0.1:{target_port}", "--delay-ms", f"{rtt_ms / 2:g}"]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            start_new_session=True,
        )
    stack.callback(lambda: proc.stdout.close() if proc.stdout else None)
    stack.callback(rb.stop_process, proc)  # unwinds first: stopped, then its pipe closed
    line = read_ready_line(proc, log_path, RELAY_TIMEOUT)
    host, _, port = line.split()[1].rpartition(":")
    if host != "127.0.0.1" or not port.isdigit():
        raise BenchError(f"relay listens on {line.split()[1]!r}, not on 127.0.0.1")
    log(f"relay +{rtt_ms:g} ms: 127.0.0.1:{port} -> 127.0.0.1:{target_port}")
    return int(port)


def database_rtt(port: int, dbname: str) -> tuple[float, float]:
    """Median and minimum of PINGS `SELECT 1` round trips (ms) on one connection to
    127.0.0.1:`port` — what each query of skyreg pays at least on that path."""
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=pg_fixtures.PG_SUPERUSER,
        dbname=dbname,
        autocommit=True,
        connect_timeout=30,
    ) as conn:
        conn.execute("SELECT 1").fetchone()
        times = []
        for _ in range(PINGS):
            start = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times)


def spawn_skyreg(
    stack: contextlib.ExitStack,
    name: str,
    workdir: Path,
    database_url: str,
    access_log: bool,
    db_threads: int | None = None,
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start one `skyreg serve` (no auth, filesystem storage in `workdir`, metadata in
    `database_url`, `--db-threads` unless None) without waiting for it; returns the
    process, port file and log."""
    workdir.mkdir(parents=True)
    port_file, log_path = workdir / "port", workdir / "skyreg.log"
    argv = [sys.executable, "-m", "skyreg", "serve", "--no-auth", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--port-file", str(port_file), "--data-dir", str(workdir / "data")]
    argv += ["--database-url", database_url]
    if db_threads is not None:
        argv += ["--db-threads", str(db_threads)]
    if not access_log:
        argv.append("--no-access-log")
    log(f"starting {name}: {shlex.join(argv)}")
    return rb.spawn(stack, argv, log_path), port_file, log_path


def start_servers(
    stack: contextlib.ExitStack,
    tmp: Path,
    pg: pg_fixtures.PostgresServer,
    db_ports: dict[float, int],
    access_log: bool,
    thread_counts: Sequence[int | None] = (None,),
) -> list[rb.Server]:
    """The skyregs (one per database path and thread count, started together: migrating
    over 10 ms takes a while) and Distribution, in the order of the report's columns
    (anchor last)."""
    pending = []
    for rtt, port in db_ports.items():
        for threads in thread_counts:
            name = setup_name(rtt, threads)
            db = database(rtt, threads)
            url = f"postgresql+psycopg://{pg_fixtures.PG_SUPERUSER}@127.0.0.1:{port}/{db}"
            spawned = spawn_skyreg(stack, name, tmp / slug(name), url, access_log, threads)
            pending.append((name, *spawned))
    servers = []
    for name, proc, port_file, log_path in pending:
        port = rb.read_port_file(port_file, proc, log_path)
        server = rb.Server(name, f"http://127.0.0.1:{port}", proc, log_path)
        rb.wait_ready(server)
        servers.append(server)
    servers.append(rb.start_distribution(stack, ANCHOR, tmp / ANCHOR, access_log))
    for server in servers:
        log(f"{server.name} ready at {server.base_url} (pid {server.proc.pid})")
    return servers


def database(rtt_ms: float, threads: int | None = None) -> str:
    """The database of the skyreg whose database is `rtt_ms` away (with `threads` database
    threads): one each, so no skyreg sees rows (blobs it does not store, tags) the others
    wrote."""
    name = f"skyreg_rtt_{rtt_ms:g}".replace(".", "_")
    return name if threads is None else f"{name}_threads_{threads}"


def slug(name: str) -> str:
    """A directory name for a setup."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Prepared:
    """What one registry holds, checked once before measuring."""

    manifest_digest: str
    layer_digest: str
    layer_size: int


def tag_names() -> list[str]:
    """The tags of `bench/image`, sorted as a registry lists them (byte order)."""
    return sorted(["latest", *(f"v{i:03d}" for i in range(1, TAG_COUNT))])


def prepare(target: rb.Target) -> Prepared:
    """Push a fresh image (random layer: its digests are this registry's alone), tag it
    TAG_COUNT times, and check the three answers the figures will ask for."""
    parts = rb.image_parts(target, REPO)
    body = parts.manifest()
    digest = rb.sha256_digest(body)
    # One PUT with every tag as `?tag=` (OCI 1.1) where the registry takes it; tags it ignored
    # (Distribution 2.8) are then PUT one by one.
    others = "&".join(f"tag={tag}" for tag in tag_names() if tag != "latest")
    session = rb.Session(target.server.base_url)
    try:
        content_type = {"Content-Type": rb.OCI_MANIFEST}
        session.request("PUT", f"/v2/{REPO}/manifests/latest?{others}", content_type, body, 201)
        listing = session.request("GET", f"/v2/{REPO}/tags/list", {}, b"", 200)
        have = set(json.loads(listing.body).get("tags") or [])
        for tag in tag_names():
            if tag not in have:
                session.request("PUT", f"/v2/{REPO}/manifests/{tag}", content_type, body, 201)
    finally:
        session.close()
    prepared = Prepared(digest, rb.sha256_digest(parts.layer), len(parts.layer))
    verify(target, prepared)
    return prepared


def verify(target: rb.Target, prepared: Prepared) -> None:
    """Manifest by tag hashes to the pushed digest; blob HEAD names the layer's digest and
    length; the tag list is exactly the pushed tags."""
    rb.check_manifest(target.url(f"/v2/{REPO}/manifests/latest"), prepared.manifest_digest)
    head_url = target.url(f"/v2/{REPO}/blobs/{prepared.layer_digest}")
    head = rb.http_request("HEAD", head_url, expect=(200,))
    got = (
        rb.header(head.headers, "Docker-Content-Digest"),
        rb.header(head.headers, "Content-Length"),
    )
    if got != (prepared.layer_digest, str(prepared.layer_size)):
        raise rb.RequestFailed(
            rb.describe_request("HEAD", head_url, [], "0 bytes"),
            rb.describe_response(head.status, head.headers, head.body)
            + f"\n  (expected digest {prepared.layer_digest}, length {prepared.layer_size})",
        )
    tags_url = target.url(f"/v2/{REPO}/tags/list")
    listing = rb.http_request("GET", tags_url, expect=(200,))
    try:
        doc = json.loads(listing.body)
    except ValueError:
        doc = None
    # Distribution lists tags in no particular order without `n`: compare them as a set.
    ok = isinstance(doc, dict) and doc.get("name") == REPO and isinstance(doc.get("tags"), list)
    if not ok or sorted(map(str, doc["tags"])) != tag_names():
        raise rb.RequestFailed(
            rb.describe_request("GET", tags_url, [], "0 bytes"),
            rb.describe_response(listing.status, listing.headers, listing.body)
            + f"\n  (expected the {TAG_COUNT} pushed tags)",
        )


# ------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: throughput, latency percentiles (ms) and how many requests it made."""

    rps: float
    p50: float
    p99: float
    requests: int


def parse_wrk(stdout: str) -> WrkRun:
    """Requests/sec, the 50 % and 99 % lines of `--latency`, and the request count."""
    rps = re.search(r"Requests/sec:\s*([0-9.]+)", stdout)
    count = re.search(r"(\d+) requests in ", stdout)
    pct = {int(p): float(v) * UNIT_MS[u] for p, v, u in PERCENTILE_LINE.findall(stdout)}
    if rps is None or count is None or 50 not in pct or 99 not in pct:
        raise BenchError(f"could not read wrk's output:\n{stdout}")
    if int(count.group(1)) == 0:
        raise BenchError(f"wrk completed no request:\n{stdout}")
    return WrkRun(float(rps.group(1)), pct[50], pct[99], int(count.group(1)))


def run_wrk(url: str, sizes: Sizes, headers: Sequence[str]) -> WrkRun:
    """wrk with 2 threads and `sizes.wrk_connections` connections; any non-2xx/3xx answer
    or timed-out request fails the figure (a misrouted or broken answer cannot count)."""
    argv = ["wrk", "-t2", f"-c{sizes.wrk_connections}", f"-d{sizes.wrk_seconds}s", "--latency"]
    argv += ["--timeout", f"{WRK_TIMEOUT_S}s"]
    for value in headers:
        argv += ["-H", value]
    proc = subprocess.run(
        [*argv, rb.check_loopback(url)],
        capture_output=True,
        text=True,
        timeout=sizes.wrk_seconds + WRK_TIMEOUT_S + 30,
    )
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", proc.stdout)
    if bad:
        raise BenchError(f"wrk saw {bad.group(1)} error responses:\n{proc.stdout}")
    errors = re.search(r"Socket errors:.*timeout (\d+)", proc.stdout)
    if errors and int(errors.group(1)) > 0:
        raise BenchError(f"wrk saw requests time out after {WRK_TIMEOUT_S} s:\n{proc.stdout}")
    if errors:
        log(f"wrk {errors.group(0)}")
    return parse_wrk(proc.stdout)


def run_curl_head(url: str, sizes: Sizes) -> WrkRun:
    """HEAD requests for `sizes.wrk_seconds` from `curl --parallel` with
    `sizes.wrk_connections` kept-alive connections (wrk 4.1 cannot: it waits for the body a
    HEAD answer's Content-Length announces). Every answer must be 200. A `?n=` query (which
    registries ignore) makes the URLs curl generates on demand distinct."""
    argv = ["curl", "-sS", "--no-progress-meter", "--parallel", "--parallel-immediate"]
    argv += ["--parallel-max", str(sizes.wrk_connections), "--head", "-o", "/dev/null"]
    # Per-transfer lines go to stderr, which curl does not buffer: the ones written before
    # the deadline are all there when it is interrupted.
    argv += ["-w", "%{stderr}%{http_code} %{time_total}\\n"]
    argv.append(rb.check_loopback(url) + "?n=[1-1000000000]")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    text, start = b"", time.monotonic()
    deadline = start + sizes.wrk_seconds
    try:
        fd = proc.stderr.fileno()
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                piece = os.read(fd, 1 << 16)
                if not piece:
                    break
                text += piece
        elapsed = time.monotonic() - start
    finally:
        rb.stop_process(proc)
        proc.stderr.close()
    lines = text.decode(errors="replace").splitlines()
    if text and not text.endswith(b"\n"):
        lines = lines[:-1]  # cut off mid-line by the deadline
    bad = [line for line in lines if not re.fullmatch(r"200 [0-9.]+", line)]
    if bad:
        raise BenchError(f"curl saw {len(bad)} bad answers or errors, e.g. {bad[:5]!r}")
    times = sorted(float(line.split()[1]) * 1000 for line in lines)
    if not times:
        raise BenchError(f"curl completed no HEAD request of {url} in {elapsed:.1f} s")
    return WrkRun(
        len(times) / elapsed,
        times[len(times) // 2],
        times[min(len(times) - 1, (len(times) * 99) // 100)],
        len(times),
    )


# ------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """A request pattern measured with wrk on every registry."""

    label: str
    path: Callable[[Prepared], str]
    headers: tuple[str, ...] = ()
    head: bool = False


FIGURES = (
    Figure(
        "manifest GET by tag",
        lambda _p: f"/v2/{REPO}/manifests/latest",
        (f"Accept: {rb.OCI_MANIFEST}",),
    ),
    Figure("blob HEAD (curl)", lambda p: f"/v2/{REPO}/blobs/{p.layer_digest}", head=True),
    Figure(f"tags list ({TAG_COUNT} tags)", lambda _p: f"/v2/{REPO}/tags/list"),
)


@dataclass
class Outcome:
    """The runs of one figure on one registry, or why it failed."""

    runs: list[WrkRun] = field(default_factory=list)
    error: str | None = None
    server_log: str = ""

    def median(self, pick: Callable[[WrkRun], float]) -> float | None:
        """The median of one value over the runs; None when the figure failed or is empty."""
        if self.error is not None or not self.runs:
            return None
        return statistics.median(pick(run) for run in self.runs)


Results = dict[str, dict[str, Outcome]]  # figure label -> registry name -> outcome


def run_figures(
    targets: Sequence[rb.Target], prepared: dict[str, Prepared], sizes: Sizes
) -> Results:
    """Every figure, `sizes.runs` times, alternating the registries run by run."""
    results: Results = {}
    for figure in FIGURES:
        outcomes = {t.name: Outcome() for t in targets}
        results[figure.label] = outcomes
        for run in range(sizes.runs):
            for target in targets:
                outcome = outcomes[target.name]
                if outcome.error is not None:
                    continue
                offset = target.server.log_path.stat().st_size
                url = target.url(figure.path(prepared[target.name]))
                try:
                    if figure.head:
                        result = run_curl_head(url, sizes)
                    else:
                        result = run_wrk(url, sizes, figure.headers)
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    outcome.error = str(exc)
                    outcome.server_log = rb.log_since(target.server.log_path, offset)
                    log(f"{target.name}: {figure.label}: FAILED\n{exc}\n{outcome.server_log}")
                    continue
                outcome.runs.append(result)
                log(
                    f"{target.name}: {figure.label} run {run + 1}/{sizes.runs}: "
                    f"{result.rps:.1f} req/s, p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms, "
                    f"{result.requests} requests"
                )
    return results


# ------------------------------------------------------------------------- reports


def fmt(value: float | None, digits: int = 1) -> str:
    """A table cell: the value, or FAILED."""
    return "FAILED" if value is None else f"{value:.{digits}f}"


def quotient(a: float | None, b: float | None) -> str:
    """a/b as a table cell, '-' when either is missing."""
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def short(name: str) -> str:
    """A column name without the leading 'skyreg '."""
    return name.removeprefix("skyreg ")


def render_throughput(
    results: Results, names: Sequence[str], sizes: Sizes, direct_of: dict[str, str]
) -> str:
    """Median req/s per registry, each delayed skyreg's ratio to the direct one with the same
    thread count, each direct one's ratio to the first direct one (several thread counts),
    and the direct ones' ratio to Distribution."""
    directs = [n for n in names if direct_of.get(n) == n]
    delayed = [n for n in names if n in direct_of and direct_of[n] != n]
    head = ["figure (req/s)", *names, *(f"{short(n)} / direct" for n in delayed)]
    head += [f"{short(n)} / {short(directs[0])}" for n in directs[1:]]
    head += [f"{short(n)} / distribution" for n in directs]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, outcomes in results.items():
        rps = {n: outcomes[n].median(lambda r: r.rps) for n in names}
        cells = [fmt(rps[n]) for n in names]
        cells += [quotient(rps[n], rps[direct_of[n]]) for n in delayed]
        cells += [quotient(rps[n], rps[directs[0]]) for n in directs[1:]]
        cells += [quotient(rps[n], rps[ANCHOR]) for n in directs]
        figure = f"{label}, {sizes.wrk_connections} conns, {sizes.wrk_seconds} s"
        lines.append("| " + " | ".join([figure, *cells]) + " |")
    return "\n".join(lines)


def render_latency(results: Results, names: Sequence[str]) -> str:
    """Median p50 and p99 (ms) per figure and registry, and p99/p50."""
    lines = ["| figure | registry | p50 (ms) | p99 (ms) | p99/p50 |", "|---|---|---:|---:|---:|"]
    for label, outcomes in results.items():
        for name in names:
            p50 = outcomes[name].median(lambda r: r.p50)
            p99 = outcomes[name].median(lambda r: r.p99)
            cells = [label, name, fmt(p50, 2), fmt(p99, 2), quotient(p99, p50)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_serial_cost(
    results: Results, names: Sequence[str], rtts: dict[str, float], direct_of: dict[str, str]
) -> str:
    """What each added round trip costs per request, assuming requests are served one at a
    time while the database answers (the event loop waits): (1/rps - 1/rps_direct) / RTT,
    against the direct skyreg with the same thread count."""
    delayed = [n for n in names if n in direct_of and direct_of[n] != n]
    lines = [
        "| figure | registry | ms added per request | ≈ DB round trips per request |",
        "|---|---|---:|---:|",
    ]
    for label, outcomes in results.items():
        for name in delayed:
            direct = outcomes[direct_of[name]].median(lambda r: r.rps)
            rps = outcomes[name].median(lambda r: r.rps)
            if direct is None or rps is None or not direct or not rps:
                lines.append(f"| {label} | {name} | - | - |")
                continue
            added = 1000 / rps - 1000 / direct
            extra_rtt = rtts[name] - rtts[direct_of[name]]
            trips = f"{added / extra_rtt:.1f}" if extra_rtt > 0 else "-"
            lines.append(f"| {label} | {name} | {added:.2f} | {trips} |")
    return "\n".join(lines)


def render_failures(results: Results) -> str:
    """Each failed figure: the error and what that registry logged meanwhile."""
    parts = []
    for label, outcomes in results.items():
        for name, outcome in outcomes.items():
            if outcome.error is not None:
                parts.append(f"**{name}: {label}**\n\n```\n{outcome.error}\n```")
                parts.append(f"{name} log during that run:\n\n```\n{outcome.server_log}\n```")
    return "\n\n".join(parts)


def render_report(
    results: Results,
    names: Sequence[str],
    context: dict[str, str],
    rtts: dict[str, float],
    sizes: Sizes,
    direct_of: dict[str, str],
) -> str:
    """The Markdown report: context, throughput, latency, serial cost, failures.
    `direct_of`: each skyreg's name -> the name of the direct one with its thread count."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Database latency benchmark, {now}", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "Throughput (median of the runs; higher is better):", ""]
    lines += [render_throughput(results, names, sizes, direct_of), ""]
    lines += ["Latency under that load (median over the runs of wrk's percentiles):", ""]
    lines += [render_latency(results, names), ""]
    lines += ["Time each request gained per added database round trip:", ""]
    lines += [render_serial_cost(results, names, rtts, direct_of), ""]
    failures = render_failures(results)
    if failures:
        lines += ["### Failures", "", failures, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options (see bench/README.md)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per wrk run instead of 10 s")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        action="append",
        help="a database round trip to add through a relay (repeatable; default: 2 and 10)",
    )
    parser.add_argument(
        "--db-threads",
        type=int,
        action="append",
        help="passed to every skyreg as --db-threads (repeatable: every skyreg, direct and "
        "delayed, runs once per value; default: skyreg's own)",
    )
    parser.add_argument("--markdown", type=Path, help="append the report to FILE")
    parser.add_argument("--tmp-dir", type=Path, help="parent of the temporary directory")
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="disable per-request access logs in every registry (default: all log)",
    )
    args = parser.parse_args(argv)
    rtts = args.rtt_ms or [2.0, 10.0]
    if any(not 0 < rtt <= 1000 for rtt in rtts) or len(set(rtts)) != len(rtts):
        parser.error("--rtt-ms: distinct values in (0, 1000]")
    args.rtt_ms = sorted(rtts)
    threads = args.db_threads or []
    if any(n < 1 for n in threads) or len(set(threads)) != len(threads):
        parser.error("--db-threads: distinct positive values (skyreg serve bounds them)")
    return args


@contextlib.contextmanager
def temp_dir(parent: Path | None) -> Iterator[Path]:
    """A temporary directory removed on exit, whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="db-latency-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; 0 if every figure was measured, 1 if one failed."""
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, rb.exit_on_signal)
    rtts: list[float] = [0.0, *args.rtt_ms]
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(temp_dir(args.tmp_dir))
        log(f"temp dir {tmp} on {rb.filesystem_of(tmp)}")
        thread_counts: list[int | None] = list(args.db_threads or [None])
        pg = start_postgres(stack, [database(r, n) for r in rtts for n in thread_counts])
        db_ports = {0.0: pg.port}
        for rtt in args.rtt_ms:
            db_ports[rtt] = start_relay(stack, tmp, pg.port, rtt)
        measured: dict[str, float] = {}
        rtt_notes = []
        direct_of: dict[str, str] = {}
        for rtt, port in db_ports.items():
            median, least = database_rtt(port, database(rtt, thread_counts[0]))
            for threads in thread_counts:
                measured[setup_name(rtt, threads)] = median
                direct_of[setup_name(rtt, threads)] = setup_name(0.0, threads)
            rtt_notes.append(f"{setup_name(rtt)} {median:.3f} ms (min {least:.3f})")
            if rtt and least < 0.9 * rtt:
                raise BenchError(f"the +{rtt:g} ms relay adds only {least:.3f} ms")
        log("SELECT 1 round trip: " + "; ".join(rtt_notes))
        servers = start_servers(stack, tmp, pg, db_ports, args.access_log, thread_counts)
        targets = [rb.Target(server, tmp / "scratch" / slug(server.name)) for server in servers]
        for target in targets:
            target.scratch.mkdir(parents=True)
        with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
            done = {t.name: pool.submit(prepare, t) for t in targets}
            prepared = {name: future.result() for name, future in done.items()}
        log(f"prepared and checked {len(targets)} registries in {time.monotonic() - started:.0f} s")
        results = run_figures(targets, prepared, sizes)
        names = [t.name for t in targets]
        context = {
            "command": f"`{shlex.join([sys.executable, *sys.argv])}`",
            "machine": rb.machine_description(),
            "machine load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
            "(1-min load average)",
            "database": pg_settings(pg) + " (as tests/support/postgres.py starts it; the figures "
            "are reads, so durability settings barely matter); one database per skyreg",
            "added latency": "bench/wanlab.py `relay` on 127.0.0.1 between skyreg and "
            "PostgreSQL (RTT/2 each way, a new connection pays 2 RTT); measured "
            f"SELECT 1 round trips (median of {PINGS}): " + "; ".join(rtt_notes),
            "skyreg": "1 worker, `--no-auth`, filesystem storage, `--database-url` to its "
            "database (direct or through a relay)"
            + (
                f", `--db-threads` {' / '.join(map(str, args.db_threads))} (one skyreg each)"
                if args.db_threads
                else ", skyreg's default database threads"
            ),
            "distribution": rb.tool_version(["docker-registry", "--version"])
            + ", filesystem storage, no auth",
            "access logs": "on in every registry" if args.access_log else "off everywhere",
            "clients": f"{rb.tool_version(['wrk', '-v'])}, 2 threads, "
            f"{sizes.wrk_connections} connections, --latency, --timeout {WRK_TIMEOUT_S}s; "
            f"blob HEAD: {rb.tool_version(['curl', '--version'])} --parallel, "
            f"{sizes.wrk_connections} connections (wrk 4.1 cannot read HEAD answers)",
            "method": f"{sizes.runs} runs of {sizes.wrk_seconds} s per figure and registry, "
            "alternating registries; medians; each registry has its own image (checked once: "
            "manifest digest, blob HEAD digest and length, tag list)",
        }
        report = render_report(results, names, context, measured, sizes, direct_of)
    print(report)
    log(f"finished in {time.monotonic() - started:.0f} s")
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write(report + "\n")
    return 1 if "### Failures" in report else 0


def cli() -> int:
    return rb.run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
