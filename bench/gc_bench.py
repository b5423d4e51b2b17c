#!/usr/bin/env python3
"""Online garbage collection: how fast it collects, and what it costs pushes.

Two parts, one run, all on 127.0.0.1 with free ports (see bench/README.md):

1. **Reviews per second.** A `skyreg serve --no-gc --gc-review-delay 1` is filled with N images
   (a config and L small layers each, distinct digests) pushed by digest with aiohttp over the
   OCI API, so nothing holds them; once their reviews are due, `POST /api/v1/gc/runs` is repeated
   until `GET /api/v1/gc` shows every queue empty. A sampler reads the queue depths every
   `SAMPLE_INTERVAL` seconds meanwhile, which splits the passes' time into manifest reviews,
   blob reviews and byte deletions. At the end every pushed blob must be gone from the store
   (its files or objects listed), every manifest and blob must answer 404, and the bytes the
   passes report deleted must equal the bytes pushed.
2. **Push throughput with and without GC.** Two servers started the same way, one `--no-gc`,
   one running the gc worker (`--gc-interval 0.2`), both `--gc-review-delay 5` (longer than an
   image push: a delay of 0 would let GC take the blobs of an image whose manifest is still on
   its way); C concurrent clients push images of fresh random layers (256 KiB-4 MiB) under new
   tags for S seconds on each in turn (A B, B A, A B ..., to cancel drift), while a paced garbage
   maker sends both servers the same extra work (images whose tag moves on, images pushed by
   digest and deleted, blobs nothing references); it starts alone delay + 1 s before each
   window, so garbage is due for review all through it. Bytes and manifests count when their
   201 arrived inside the window. The GC server's
   `skyreg_gc_reviews_total` before and after each window proves the collector worked during
   it. Afterwards every acknowledged image must still read back whole on both servers, and
   the GC server must have removed the garbage's bytes from its store.

Prints a Markdown block for BENCHMARKS.md (command, date, machine, figures, ratio, goal).
Exit status: 0, 1 if a check failed (listed under Failures), 2 if a server could not be
started, 130 on Ctrl-C; every process and temp dir is removed in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import registry_bench as rb  # bench/ is on sys.path when run as a script

MIB, MB = rb.MIB, rb.MB
log = rb.log
BenchError = rb.BenchError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ORG = APP = "gcbench"
TIMEOUT = aiohttp.ClientTimeout(total=300)
SAMPLE_INTERVAL = 0.05  # seconds between queue-depth samples while passes run (part 1)
DRAIN_TIMEOUT = 300.0  # seconds the queues have to empty (part 1, and part 2's final check)
PUSH_GC_INTERVAL = 0.2  # --gc-interval of the GC server (part 2)
GOAL = 0.90  # push throughput with GC running / without (the issue: at most 10 % slower)
REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class CheckFailed(BenchError):
    """The registry answered or stored something it should not have; the figures are void."""


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Plan:
    images: int  # part 1: images pushed, then collected
    layers: int  # part 1: layers per image (plus one config)
    layer_size: int  # part 1: bytes per layer
    fill_concurrency: int
    clients: int  # part 2: concurrent pushing clients
    seconds: float  # part 2: length of one window
    rounds: int  # part 2: windows per server (alternating)
    push_layers: int  # part 2: layers per image
    min_layer: int
    max_layer: int
    garbage_rate: float  # part 2: garbage images per second, on each server
    review_delay: float  # part 2: --gc-review-delay of both servers


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    return Plan(
        images=args.images or (100 if quick else 300),
        layers=args.layers,
        layer_size=4096,
        fill_concurrency=16,
        clients=args.clients,
        seconds=args.seconds or (6.0 if quick else 20.0),
        rounds=args.rounds or (2 if quick else 3),
        push_layers=3,
        min_layer=256 * 1024,
        max_layer=4 * MIB,
        garbage_rate=args.garbage_rate,
        review_delay=args.review_delay,
    )


# -------------------------------------------------------------------------- servers


@dataclass
class GcServer:
    """One `skyreg serve` with auth (the GC API needs an admin token), its data dir, and a way
    to list the digests whose bytes its store holds."""

    server: rb.Server
    admin: str
    data_dir: Path
    list_store: Callable[[], set[str]]

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def url(self) -> str:
        return self.server.base_url

    @property
    def auth(self) -> dict[str, str]:
        basic = base64.b64encode(f"admin:{self.admin}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}


def filesystem_digests(data_dir: Path) -> Callable[[], set[str]]:
    """The digests under `data_dir/blobs/<algorithm>/<xx>/<hex>` (filesystem storage)."""

    def listing() -> set[str]:
        root = data_dir / "blobs"
        return {
            f"{path.parent.parent.name}:{path.name}" for path in root.rglob("*") if path.is_file()
        }

    return listing


@dataclass
class Backing:
    """Where each server keeps its metadata and blobs: SQLite + filesystem in its data dir, or
    its own PostgreSQL database and S3 bucket (one PostgreSQL and one SeaweedFS for all)."""

    kind: str
    stack: contextlib.ExitStack
    root: Path
    description: str = "SQLite + filesystem in each server's data dir (the defaults)"
    _pg: Any = None
    _s3: Any = None
    _made: int = 0

    def start(self) -> None:
        if self.kind != "postgres-s3":
            return
        import scaleout_bench as sb  # imports pytest and tests/support: only when asked for

        self._s3, _ = sb.start_seaweedfs(self.stack, self.root / "seaweedfs")
        self._pg = sb.start_postgres_server(self.stack, "gc-bench-pg-")
        self.description = (
            f"PostgreSQL {self._pg.major} (fsync off, as tests/support/postgres.py) and "
            "SeaweedFS S3 (`weed server -s3`); a database and a bucket per server"
        )

    def server_args(
        self,
    ) -> tuple[list[str], dict[str, str], Callable[[Path], Callable[[], set[str]]]]:
        """Arguments and environment for one more server, and how to list its store."""
        if self.kind != "postgres-s3":
            return [], {}, filesystem_digests
        self._made += 1
        database, bucket = f"gc_bench_{self._made}", f"gc-bench-{self._made}"
        with self._pg.admin() as conn:
            conn.execute(f"CREATE DATABASE {database}")
        client = self._s3.client()
        client.create_bucket(Bucket=bucket)
        args = ["--database-url", self._pg.url(database), "--storage", f"s3://{bucket}/registry"]
        args += ["--s3-endpoint", self._s3.endpoint]

        def bucket_digests(_data_dir: Path) -> Callable[[], set[str]]:
            def listing() -> set[str]:
                found: set[str] = set()
                pages = client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix="registry/blobs/"
                )
                for page in pages:
                    for obj in page.get("Contents", []):
                        algorithm, _, hex_digest = (
                            obj["Key"].removeprefix("registry/blobs/").split("/")
                        )
                        found.add(f"{algorithm}:{hex_digest}")
                return found

            return listing

        return args, dict(self._s3.aws_env()), bucket_digests


def start_server(
    stack: contextlib.ExitStack,
    backing: Backing,
    name: str,
    workdir: Path,
    gc_args: list[str],
    access_log: bool,
) -> GcServer:
    """`skyreg serve` with auth on and `gc_args`; an org and app `gcbench` made through the
    management API. Stopped (its process group) when `stack` unwinds."""
    workdir.mkdir(parents=True)
    port_file, log_path, data_dir = workdir / "port", workdir / "skyreg.log", workdir / "data"
    extra, env, lister = backing.server_args()
    argv = [sys.executable, "-m", "skyreg", "serve", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--data-dir", str(data_dir), "--port-file", str(port_file), *extra, *gc_args]
    if not access_log:
        argv.append("--no-access-log")
    log(f"starting {name}: {shlex.join(argv)}")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,  # own process group: Ctrl-C is handled by us, not it
        )
    stack.callback(rb.stop_process, proc)
    port = rb.read_port_file(port_file, proc, log_path)
    server = rb.Server(name, f"http://127.0.0.1:{port}", proc, log_path)
    rb.wait_ready(server)
    admin = (data_dir / "admin-token").read_text().strip()
    gc_server = GcServer(server, admin, data_dir, lister(data_dir))
    asyncio.run(make_app(gc_server))
    return gc_server


async def make_app(server: GcServer) -> None:
    async with aiohttp.ClientSession(headers=server.auth, timeout=TIMEOUT) as http:
        for path, body in (("/orgs", {"name": ORG}), ("/apps", {"name": APP, "org": ORG})):
            async with http.post(f"{server.url}/api/v1{path}", json=body) as resp:
                if resp.status != 201:
                    raise BenchError(
                        f"{server.name}: POST {path}: {resp.status} {await resp.text()}"
                    )


# ---------------------------------------------------------------------- OCI client


def sha256(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    repo: str
    reference: str  # tag or digest it was pushed under
    digest: str
    manifest: bytes
    blobs: tuple[tuple[str, int], ...]  # (digest, size): config, then layers


def image_manifest(config: bytes, layers: Sequence[tuple[str, int]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": digest, "size": size} for digest, size in layers
            ],
        }
    ).encode()


def config_blob(note: str) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "bench": note}).encode()


class Client:
    """The OCI API of one server over one aiohttp session (Basic auth with the admin token).
    Every unexpected answer raises CheckFailed with the request and the answer."""

    def __init__(self, http: aiohttp.ClientSession, server: GcServer) -> None:
        self.http = http
        self.server = server

    async def call(
        self,
        method: str,
        path: str,
        expect: int,
        data: bytes | memoryview | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bytes, Any]:
        url = f"{self.server.url}{path}"
        async with self.http.request(
            method, url, data=data, headers={**self.server.auth, **(headers or {})}
        ) as resp:
            body = await resp.read()
            if resp.status != expect:
                raise CheckFailed(
                    f"{self.server.name}: {method} {path} answered {resp.status} (expected "
                    f"{expect}): {body[:300]!r}"
                )
            return body, resp.headers

    async def push_blob(self, repo: str, data: bytes | memoryview, digest: str) -> None:
        """One request: POST with ?digest= and the whole blob."""
        path = f"/v2/{repo}/blobs/uploads/?digest={digest}"
        await self.call("POST", path, 201, data, {"Content-Type": "application/octet-stream"})

    async def put_manifest(self, repo: str, reference: str, manifest: bytes) -> None:
        path = f"/v2/{repo}/manifests/{reference}"
        await self.call("PUT", path, 201, manifest, {"Content-Type": OCI_MANIFEST})

    async def api(self, method: str, path: str, expect: int = 200) -> Any:
        body, _ = await self.call(method, f"/api/v1{path}", expect)
        return json.loads(body)

    async def present(self, image: Image) -> None:
        await self.check_image(image, present=True)

    async def absent(self, image: Image) -> None:
        await self.check_image(image, present=False)

    async def check_image(self, image: Image, present: bool) -> None:
        """The manifest reads back byte for byte and every blob HEADs with its size; or, with
        `present` false, all of them answer 404."""
        path = f"/v2/{image.repo}/manifests/{image.reference}"
        accept = {"Accept": OCI_MANIFEST}
        if not present:
            await self.call("GET", f"/v2/{image.repo}/manifests/{image.digest}", 404, None, accept)
            for digest, _ in image.blobs:
                await self.call("HEAD", f"/v2/{image.repo}/blobs/{digest}", 404)
            return
        body, _ = await self.call("GET", path, 200, None, accept)
        if body != image.manifest:
            raise CheckFailed(f"{self.server.name}: {path} returned other bytes than were pushed")
        for digest, size in image.blobs:
            _, headers = await self.call("HEAD", f"/v2/{image.repo}/blobs/{digest}", 200)
            if headers.get("Content-Length") != str(size):
                raise CheckFailed(
                    f"{self.server.name}: HEAD blob {digest}: Content-Length "
                    f"{headers.get('Content-Length')}, pushed {size} bytes"
                )


async def bounded(
    concurrency: int, items: Sequence[T], job: Callable[[T], Awaitable[None]]
) -> None:
    """`job(item)` for every item, at most `concurrency` at a time; the first failure
    propagates."""
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await job(queue.pop())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


# ----------------------------------------------------- part 1: reviews per second


@dataclass
class Sample:
    at: float
    manifests: int
    blobs: int
    deletions: int


@dataclass
class ReviewResult:
    images: int
    blobs: int
    bytes_pushed: int
    fill_seconds: float
    passes: int = 0
    pass_seconds: float = 0.0  # the POSTs that did work, end to end
    wall_seconds: float = 0.0  # first POST to empty queues (review delays included)
    manifests_reviewed: int = 0
    blobs_reviewed: int = 0
    blobs_deleted: int = 0
    bytes_deleted: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    sample_latency: float = 0.0  # median seconds of the sampler's GET /api/v1/gc


def queue_depths(status: dict[str, Any]) -> tuple[int, int, int, int]:
    """(manifest reviews, blob reviews, byte deletions queued, reviews due now)."""
    deletions = sum(int(d["queued"]) for d in status["deletions"])
    due = int(status["manifest_reviews"]["due"]) + int(status["blob_reviews"]["due"])
    return (
        int(status["manifest_reviews"]["queued"]),
        int(status["blob_reviews"]["queued"]),
        deletions,
        due,
    )


def phase_seconds(samples: Sequence[Sample]) -> dict[str, float]:
    """Per queue, the time between consecutive samples in which it shrank. A sample pair
    straddling the start or end of a phase counts whole: each phase's time is over-counted by
    up to two sampling intervals per pass."""
    seconds = {"manifests": 0.0, "blobs": 0.0, "deletions": 0.0}
    for before, after in itertools.pairwise(samples):
        for name in seconds:
            if getattr(before, name) > getattr(after, name):
                seconds[name] += after.at - before.at
    return seconds


async def fill(server: GcServer, plan: Plan) -> tuple[list[Image], float]:
    """Push `plan.images` images by digest (nothing tags them), over 8 repositories."""
    images: list[Image] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, server)

        async def push(i: int) -> None:
            repo = f"{APP}/r{i % 8}"
            layers = [os.urandom(plan.layer_size) for _ in range(plan.layers)]
            config = config_blob(f"fill-{i}")
            blobs = [(config, sha256(config))] + [(layer, sha256(layer)) for layer in layers]
            for data, digest in blobs:
                await client.push_blob(repo, data, digest)
            manifest = image_manifest(config, [(sha256(x), len(x)) for x in layers])
            digest = sha256(manifest)
            await client.put_manifest(repo, digest, manifest)
            sizes = tuple((d, len(b)) for b, d in blobs)
            images.append(Image(repo, digest, digest, manifest, sizes))

        start = time.monotonic()
        await bounded(plan.fill_concurrency, range(plan.images), push)
        return images, time.monotonic() - start


async def collect(server: GcServer, images: Sequence[Image], result: ReviewResult) -> None:
    """Wait for every review to be due, then POST /gc/runs until the queues are empty, sampling
    the queue depths meanwhile."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, server)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:  # every manifest and blob review queued and due (the 1 s delay has passed)
            m, b, _, due = queue_depths(await client.api("GET", "/gc"))
            if m >= len(images) and b >= result.blobs and due == m + b:
                break
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"reviews not queued and due: {m} manifests, {b} blobs, {due} due"
                )
            await asyncio.sleep(0.1)
        samples: list[Sample] = []
        latencies: list[float] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as own:  # its own connection
                sampling = Client(own, server)
                while not stop.is_set():
                    asked = time.monotonic()
                    status = await sampling.api("GET", "/gc")
                    latencies.append(time.monotonic() - asked)
                    m, b, d, _ = queue_depths(status)
                    samples.append(Sample(time.monotonic(), m, b, d))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)

        sampling_task = asyncio.create_task(sampler())
        try:
            first = time.monotonic()
            while True:
                t0 = time.monotonic()
                run = await client.api("POST", "/gc/runs", 200)
                elapsed = time.monotonic() - t0
                reviewed = int(run["manifests_reviewed"]) + int(run["blobs_reviewed"])
                if reviewed or int(run["bytes_deleted"]):
                    result.passes += 1
                    result.pass_seconds += elapsed
                    result.manifests_reviewed += int(run["manifests_reviewed"])
                    result.blobs_reviewed += int(run["blobs_reviewed"])
                    result.blobs_deleted += int(run["blobs_deleted"])
                    result.bytes_deleted += int(run["bytes_deleted"])
                    log(
                        f"pass {result.passes}: {run['manifests_reviewed']} manifests, "
                        f"{run['blobs_reviewed']} blobs reviewed, {run['bytes_deleted']} bytes "
                        f"deleted in {elapsed:.2f} s"
                    )
                if int(run["failures"]):
                    raise CheckFailed(f"a GC pass counted {run['failures']} failures: {run}")
                m, b, d, due = queue_depths(await client.api("GET", "/gc"))
                if m == b == d == 0:
                    break
                if time.monotonic() > deadline:
                    raise CheckFailed(
                        f"queues not empty after {DRAIN_TIMEOUT:.0f} s: {m}, {b}, {d}"
                    )
                while due == 0 and d == 0:  # what the last pass queued waits for the delay
                    await asyncio.sleep(0.05)
                    m, b, d, due = queue_depths(await client.api("GET", "/gc"))
            result.wall_seconds = time.monotonic() - first
        finally:
            stop.set()
            await sampling_task
        result.phase_seconds = phase_seconds(samples)
        result.sample_latency = statistics.median(latencies) if latencies else 0.0


async def check_collected(server: GcServer, images: Sequence[Image]) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, server)
        await bounded(16, images, client.absent)


def part_reviews(stack: contextlib.ExitStack, backing: Backing, tmp: Path, plan: Plan,
                 access_log: bool) -> ReviewResult:  # fmt: skip
    args = ["--no-gc", "--gc-review-delay", "1"]
    with contextlib.ExitStack() as own:  # stopped before part 2 starts
        server = start_server(own, backing, "skyreg --no-gc", tmp / "reviews", args, access_log)
        log(
            f"part 1: pushing {plan.images} images, 1 config + {plan.layers} layers "
            f"of {plan.layer_size} B each"
        )
        images, fill_seconds = asyncio.run(fill(server, plan))
        digests = {d for image in images for d, _ in image.blobs}
        pushed_bytes = sum(size for image in images for _, size in image.blobs)
        log(f"part 1: pushed {len(images)} images, {len(digests)} blobs in {fill_seconds:.1f} s")
        missing = digests - server.list_store()
        if missing:  # the final check must be able to fail: the bytes are there now
            raise CheckFailed(
                f"{len(missing)} pushed blobs are not in the store, e.g. {min(missing)}"
            )
        result = ReviewResult(len(images), len(digests), pushed_bytes, fill_seconds)
        asyncio.run(collect(server, images, result))
        left = digests & server.list_store()
        if left:
            raise CheckFailed(f"{len(left)} collected blobs still in the store, e.g. {min(left)}")
        if result.bytes_deleted != pushed_bytes or result.blobs_deleted != len(digests):
            raise CheckFailed(
                f"passes deleted {result.blobs_deleted} blobs, {result.bytes_deleted} bytes; "
                f"pushed {len(digests)} blobs, {pushed_bytes} bytes"
            )
        asyncio.run(check_collected(server, images))
        log("part 1: store empty of the pushed blobs; every manifest and blob answers 404")
    return result


# --------------------------------------------- part 2: pushes with and without GC


@dataclass
class Window:
    """What one window on one server acknowledged, and the gc work counters around it."""

    server: str
    round: int
    seconds: float
    bytes: int = 0
    manifests: int = 0
    garbage_images: int = 0
    reviews: dict[str, float] = field(default_factory=dict)  # metric deltas in the window

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds

    @property
    def pushes_per_s(self) -> float:
        return self.manifests / self.seconds


METRIC_LINE = re.compile(r"^(skyreg_gc_\w+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$", re.MULTILINE)


async def gc_counters(client: Client) -> dict[str, float]:
    """The server's `skyreg_gc_*` counters: reviews by kind and outcome, bytes deleted."""
    body, _ = await client.call("GET", "/metrics", 200)
    found: dict[str, float] = {}
    for name, labels, value in METRIC_LINE.findall(body.decode()):
        if name == "skyreg_gc_reviews_total":
            found[labels.replace('"', "")] = float(value)
        elif name == "skyreg_gc_bytes_deleted_total":
            found["bytes_deleted"] = float(value)
    return found


class Pool:
    """Random bytes to cut layers from: a fresh 32-byte prefix gives every layer its own
    digest without generating megabytes of randomness per layer in the client."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)

    def layer(self, rng: random.Random, size: int) -> bytes:
        offset = rng.randrange(0, len(self.data) - size + 1)
        return os.urandom(32) + self.data[offset + 32 : offset + size]


async def push_window(
    server: GcServer,
    plan: Plan,
    pool: Pool,
    round_: int,
    images: list[Image],
    junk: dict[str, Image],
    preroll: float,
) -> Window:
    """`plan.clients` clients push images under new tags for `plan.seconds`, beside the
    garbage maker; only 201s received inside the window count (what is under way at the end
    finishes uncounted, so every image started is whole). `junk[server]`: the image the
    garbage maker's tag points at last."""
    window = Window(server.name, round_, plan.seconds)
    connector = aiohttp.TCPConnector(limit=plan.clients + 4)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as http:
        client = Client(http, server)
        deadline = math.inf

        async def pusher(c: int) -> None:
            rng = random.Random(f"{c}-{round_}")  # the same sizes on both servers
            repo = f"{APP}/push{c}"
            i = 0
            while time.monotonic() < deadline:  # an image under way at the deadline finishes
                i += 1
                sizes = [
                    rng.randint(plan.min_layer, plan.max_layer) for _ in range(plan.push_layers)
                ]
                layers = [pool.layer(rng, size) for size in sizes]
                config = config_blob(f"{server.name}-{round_}-{c}-{i}")
                blobs = [(config, sha256(config))] + [(x, sha256(x)) for x in layers]
                for data, digest in blobs:
                    await client.push_blob(repo, data, digest)
                    if time.monotonic() <= deadline:
                        window.bytes += len(data)
                manifest = image_manifest(config, [(sha256(x), len(x)) for x in layers])
                tag = f"r{round_}-c{c}-{i}"
                await client.put_manifest(repo, tag, manifest)
                if time.monotonic() <= deadline:
                    window.manifests += 1
                sizes_ = tuple((d, len(b)) for b, d in blobs)
                images.append(Image(repo, tag, sha256(manifest), manifest, sizes_))

        junk_lock = asyncio.Lock()  # tag moves one at a time: the last acknowledged is current

        async def garbage(i: int) -> None:
            """A small image: the tag `junk` moves to it (its old target becomes garbage), or
            it is pushed by digest and deleted; and a blob nothing will reference."""
            repo = f"{APP}/garbage"
            layers = [os.urandom(32 * 1024) for _ in range(2)]
            config = config_blob(f"garbage-{server.name}-{round_}-{i}")
            for data in (config, *layers):
                await client.push_blob(repo, data, sha256(data))
            manifest = image_manifest(config, [(sha256(x), len(x)) for x in layers])
            if i % 2:
                async with junk_lock:
                    await client.put_manifest(repo, "junk", manifest)
                    blobs = tuple((sha256(x), len(x)) for x in (config, *layers))
                    junk[server.name] = Image(repo, "junk", sha256(manifest), manifest, blobs)
            else:
                digest = sha256(manifest)
                await client.put_manifest(repo, digest, manifest)
                await client.call("DELETE", f"/v2/{repo}/manifests/{digest}", 202)
            stray = os.urandom(16 * 1024)
            await client.push_blob(repo, stray, sha256(stray))
            window.garbage_images += 1

        async def garbage_maker(until: float) -> None:
            """Starts `garbage` at `plan.garbage_rate` per second until `until`, however long
            each takes (the same work on every server), then waits for them."""
            steps: list[asyncio.Task[None]] = []
            try:
                start = time.monotonic()
                for i in itertools.count():
                    at = start + i / plan.garbage_rate
                    if at >= until:
                        break
                    await asyncio.sleep(max(0.0, at - time.monotonic()))
                    steps.append(asyncio.create_task(garbage(i)))
                await asyncio.gather(*steps)
            finally:
                for step in steps:
                    step.cancel()
                await asyncio.gather(*steps, return_exceptions=True)

        # The garbage maker runs alone for `preroll` seconds first, so garbage is due for
        # review (on the GC server) from the first second of the window on.
        garbage_task = asyncio.create_task(garbage_maker(time.monotonic() + preroll + plan.seconds))
        tasks = [garbage_task]
        try:
            await asyncio.wait([garbage_task], timeout=preroll)
            if garbage_task.done():
                garbage_task.result()
            before = await gc_counters(client)
            deadline = time.monotonic() + plan.seconds
            tasks += [asyncio.create_task(pusher(c)) for c in range(plan.clients)]
            await asyncio.gather(*tasks)  # a failed push ends the bench
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        after = await gc_counters(client)
        window.reviews = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return window


def reviews_in(window: Window, kind: str) -> int:
    return int(sum(v for k, v in window.reviews.items() if k.startswith(f"kind={kind},")))


async def check_images(server: GcServer, images: Sequence[Image]) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, server)
        await bounded(16, images, client.present)


async def drain(server: GcServer) -> None:
    """Until every GC queue of `server` is empty (the gc worker does the work)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        client = Client(http, server)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            m, b, d, _ = queue_depths(await client.api("GET", "/gc"))
            if m == b == d == 0:
                return
            if time.monotonic() > deadline:
                raise CheckFailed(f"{server.name}: GC queues not empty: {m}, {b}, {d}")
            await asyncio.sleep(0.2)


@dataclass
class PushResult:
    windows: list[Window]
    names: tuple[str, str]
    images: dict[str, int]
    garbage_left: int = 0


def part_pushes(stack: contextlib.ExitStack, backing: Backing, tmp: Path, plan: Plan,
                access_log: bool) -> PushResult:  # fmt: skip
    delay = [
        "--gc-review-delay",
        f"{plan.review_delay:g}",
        "--gc-interval",
        f"{PUSH_GC_INTERVAL:g}",
    ]
    off = start_server(stack, backing, "GC off", tmp / "gc-off", [*delay, "--no-gc"], access_log)
    on = start_server(stack, backing, "GC on", tmp / "gc-on", delay, access_log)
    pool = Pool(plan.max_layer + 32)
    preroll = plan.review_delay + 1.0
    images: dict[str, list[Image]] = {off.name: [], on.name: []}
    junk: dict[str, Image] = {}  # per server, the image the tag `junk` points at
    windows: list[Window] = []
    for round_ in range(plan.rounds):
        for server in (off, on) if round_ % 2 == 0 else (on, off):
            window = asyncio.run(
                push_window(server, plan, pool, round_, images[server.name], junk, preroll)
            )
            windows.append(window)
            log(
                f"part 2: {server.name} round {round_ + 1}/{plan.rounds}: "
                f"{window.mb_per_s:.1f} MB/s, {window.pushes_per_s:.2f} pushes/s; gc reviews "
                f"{reviews_in(window, 'manifest')} manifests, {reviews_in(window, 'blob')} blobs"
            )
    for window in windows:
        if window.server == off.name and window.reviews and any(window.reviews.values()):
            raise CheckFailed(f"the --no-gc server did GC work in a window: {window.reviews}")
    stored_on = on.list_store()
    for server in (off, on):
        log(f"part 2: checking the {len(images[server.name])} acknowledged images on {server.name}")
        asyncio.run(check_images(server, images[server.name]))
    log(f"part 2: waiting for {on.name} to collect the rest of the garbage")
    asyncio.run(drain(on))
    kept = [*images[on.name], *([junk[on.name]] if on.name in junk else [])]
    wanted = {d for image in kept for d, _ in image.blobs}
    stored = on.list_store()
    if wanted - stored:
        raise CheckFailed(f"{on.name}: {len(wanted - stored)} acknowledged blobs left the store")
    garbage = stored_on - wanted
    left = garbage & stored
    if left:
        raise CheckFailed(f"{on.name}: {len(left)} of {len(garbage)} garbage blobs still stored")
    asyncio.run(check_images(on, kept))
    log(f"part 2: {on.name} removed all {len(garbage)} garbage blobs it held after the windows")
    return PushResult(
        windows, (off.name, on.name), {k: len(v) for k, v in images.items()}, len(garbage)
    )


# -------------------------------------------------------------------------- report


def rate(items: int, seconds: float) -> str:
    return f"{items / seconds:.0f}" if seconds > 0 else "-"


def render(
    reviews: ReviewResult | None,
    pushes: PushResult | None,
    plan: Plan,
    context: dict[str, str],
    failures: list[str],
) -> str:
    lines = ["### Online GC (bench/gc_bench.py)", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    if reviews is not None:
        r = reviews
        items = r.manifests_reviewed + r.blobs_reviewed + r.blobs_deleted
        ps = r.phase_seconds

        counts = {
            "manifests": r.manifests_reviewed,
            "blobs": r.blobs_reviewed,
            "deletions": r.blobs_deleted,  # one region: each blob deleted is one byte deletion
        }

        def row(label: str, key: str) -> str:
            n, t = counts[key], ps.get(key, 0.0)
            return f"| {label} | {n} | {t:.2f} | {rate(n, t)} |"

        lines += [
            "",
            f"Reviews: {r.images} images pushed by digest ({r.blobs} blobs, "
            f"{r.bytes_pushed / MB:.1f} MB, in {r.fill_seconds:.1f} s), collected by "
            f"{r.passes} pass{'' if r.passes == 1 else 'es'} of `POST /api/v1/gc/runs` on a "
            "`--no-gc` server "
            f"({r.pass_seconds:.2f} s in passes; {r.wall_seconds:.2f} s from the first pass to "
            "empty queues, the 1 s review delay of what each pass queued included):",
            "",
            "| figure | items | seconds | items/s |",
            "|---|---:|---:|---:|",
            row("manifest reviews (each deleted: unreferenced)", "manifests"),
            row("blob reviews (each deleted)", "blobs"),
            row("byte deletions from the store", "deletions"),
            f"| all of them, over the passes' time | {items} | {r.pass_seconds:.2f} | "
            f"{rate(items, r.pass_seconds)} |",
            "",
            "Per-kind seconds come from the queue depths sampled every "
            f"{SAMPLE_INTERVAL * 1000:.0f} ms during the passes (each phase over-counted by "
            "up to two intervals per pass; a sample's GET took "
            f"{r.sample_latency * 1000:.0f} ms, median). "
            f"Checked: {r.bytes_deleted} bytes deleted = bytes pushed; no pushed blob left in "
            "the store; every manifest and blob answers 404.",
        ]
    if pushes is not None:
        off, on = pushes.names
        by = {name: [w for w in pushes.windows if w.server == name] for name in (off, on)}

        def med(name: str, value: Callable[[Window], float]) -> float:
            return statistics.median(value(w) for w in by[name])

        mb = (med(off, lambda w: w.mb_per_s), med(on, lambda w: w.mb_per_s))
        ps_ = (med(off, lambda w: w.pushes_per_s), med(on, lambda w: w.pushes_per_s))
        ratio_mb, ratio_ps = mb[1] / mb[0], ps_[1] / ps_[0]
        met = ratio_mb >= GOAL and ratio_ps >= GOAL
        gc_windows = by[on]
        lines += [
            "",
            f"Pushes: {plan.clients} clients, {plan.seconds:g} s windows, {plan.rounds} per "
            f"server (order off-on, on-off, off-on, ...); each window after "
            f"{plan.review_delay + 1:g} s of garbage alone, so reviews are due from its start; "
            f"images of a config and {plan.push_layers} fresh random layers "
            f"of {plan.min_layer // 1024} KiB-{plan.max_layer // MIB} MiB under new tags; beside "
            f"them on both servers {plan.garbage_rate:g} garbage images/s. Both servers: "
            f"`--gc-review-delay {plan.review_delay:g} --gc-interval {PUSH_GC_INTERVAL:g}`, one "
            "with `--no-gc`. Median of the windows:",
            "",
            "| figure | GC off (`--no-gc`) | GC on | ratio on/off |",
            "|---|---:|---:|---:|",
            f"| push throughput (MB/s acknowledged) | {mb[0]:.1f} | {mb[1]:.1f} | {ratio_mb:.2f} |",
            f"| images pushed (manifests acknowledged/s) | {ps_[0]:.2f} | {ps_[1]:.2f} | "
            f"{ratio_ps:.2f} |",
            "",
            f"Goal: GC on ≥ {GOAL:.2f} x GC off (at most 10 % slower): "
            + ("**met**" if met else "**not met**")
            + ".",
            "",
            "GC work in each window of the GC server (from its `/metrics`; the `--no-gc` "
            "server did none, checked): "
            + "; ".join(
                f"round {w.round + 1}: {reviews_in(w, 'manifest')} manifest and "
                f"{reviews_in(w, 'blob')} blob reviews, "
                f"{int(w.reviews.get('kind=blob,outcome=deleted', 0))} blobs and "
                f"{w.reviews.get('bytes_deleted', 0) / MB:.1f} MB deleted"
                for w in gc_windows
            )
            + ".",
            "",
            "Per window (MB/s, pushes/s, garbage images made with the pre-roll): "
            + "; ".join(
                f"{w.server} r{w.round + 1} {w.mb_per_s:.1f}, {w.pushes_per_s:.2f}, "
                f"{w.garbage_images}"
                for w in pushes.windows
            )
            + ".",
            f"Checked after the windows: all {pushes.images[off]} + {pushes.images[on]} "
            "acknowledged images read back whole (manifest bytes, blob sizes) on their server; "
            f"the GC server then removed all {pushes.garbage_left} garbage blobs it still held.",
        ]
    if failures:
        lines += ["", "#### Failures", "", *(f"- {failure}" for failure in failures)]
    return "\n".join(lines)


def revision() -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: smaller figures")
    parser.add_argument("--only", choices=("reviews", "pushes"), help="run one part alone")
    parser.add_argument(
        "--backing",
        choices=("sqlite-fs", "postgres-s3"),
        default="sqlite-fs",
        help="sqlite-fs (default) or PostgreSQL + SeaweedFS S3 (scaleout_bench's helpers)",
    )
    parser.add_argument("--images", type=int, help="part 1: images (default 300, quick 100)")
    parser.add_argument("--layers", type=int, default=4, help="part 1: layers per image (4)")
    parser.add_argument("--clients", type=int, default=8, help="part 2: pushing clients (8)")
    parser.add_argument("--seconds", type=float, help="part 2: window length (20, quick 6)")
    parser.add_argument("--rounds", type=int, help="part 2: windows per server (3, quick 2)")
    parser.add_argument(
        "--garbage-rate", type=float, default=10.0, help="part 2: garbage images/s (10)"
    )
    parser.add_argument(
        "--review-delay",
        type=float,
        default=5.0,
        help="part 2: --gc-review-delay of both servers (5 s: longer than an image push, so "
        "GC never reviews a blob whose manifest is still on its way)",
    )
    parser.add_argument("--access-log", action="store_true", help="servers log every request")
    parser.add_argument("--markdown", type=Path, help="append the report to FILE")
    parser.add_argument("--tmp-dir", type=Path, help="parent of the temporary directory")
    args = parser.parse_args(argv)
    if (args.images is not None and args.images < 1) or args.layers < 1 or args.clients < 1:
        parser.error("--images, --layers and --clients must be at least 1")
    if (args.rounds is not None and args.rounds < 1) or args.garbage_rate <= 0:
        parser.error("--rounds must be at least 1, --garbage-rate above 0")
    if (args.seconds is not None and args.seconds <= 0) or args.review_delay < 0:
        parser.error("--seconds must be above 0, --review-delay 0 or more")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    plan = plan_from(args)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, rb.exit_on_signal)
    reviews: ReviewResult | None = None
    pushes: PushResult | None = None
    failures: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(rb.temp_dir(args.tmp_dir, "gc-bench-"))
        log(f"temp dir {tmp} on {rb.filesystem_of(tmp)}")
        backing = Backing(args.backing, stack, tmp)
        backing.start()
        try:
            if args.only != "pushes":
                reviews = part_reviews(stack, backing, tmp, plan, args.access_log)
            if args.only != "reviews":
                pushes = part_pushes(stack, backing, tmp, plan, args.access_log)
        except CheckFailed as exc:
            log(f"check failed: {exc}")
            failures.append(str(exc))
        context = {
            "date": when,
            "command": f"`{shlex.join(['python', 'bench/gc_bench.py', *argv])}`",
            "code": revision(),
            "machine": rb.machine_description(),
            "machine load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
            "(1-min load average)",
            "backing": backing.description,
            "temp dir": f"{tmp} on {rb.filesystem_of(tmp)}",
            "servers": "`skyreg serve`, 1 worker, auth on (admin token), access logs "
            + ("on" if args.access_log else "off"),
            "duration": f"{time.monotonic() - started:.0f} s",
        }
    report = render(reviews, pushes, plan, context, failures)
    print(report)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write(report + "\n")
    return 1 if failures else 0


def cli() -> int:
    return rb.run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
