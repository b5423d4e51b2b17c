#!/usr/bin/env python3
"""Async PostgreSQL drivers against skyreg's thread-pool `Database` façade (issue 11).

One process, one event loop. It starts what bench/db_latency_bench.py starts (its helpers,
not copies): a throwaway PostgreSQL and one delaying relay per added round trip, all on
127.0.0.1; creates the skyreg schema in one database and seeds it through `RegistryMeta`
(two blobs, one OCI manifest, 50 tags in `bench/image`). Then, for every database path
(direct, +2 ms, +10 ms by default) and every variant, `--tasks` asyncio tasks (64) repeat one
of the lookups skyreg's handlers make, without auth, for `--seconds`:

- manifest GET by tag: `RegistryMeta.get_manifest` (one query);
- blob HEAD: `RegistryMeta.blob_size` (one query);
- tags list: `repository_known` then `list_tags` in one hop, as registry/discovery.py does
  (three queries).

Variants: (a) today's façade — `Database(threads=N)` and `RegistryMeta`, every read through
`Database.read` on a thread holding its own autocommit connection (sync psycopg 3) — with
4, 8, 16 and 32 threads; (b) SQLAlchemy `create_async_engine("postgresql+psycopg://…")` and
(c) `create_async_engine("postgresql+asyncpg://…")`, pools of 16 and 32 connections (no
overflow, AUTOCOMMIT like the façade's readers, no pre-ping: a held reader does not ping
either), a connection checked out per lookup, running the same SQLAlchemy Core statements
`RegistryMeta` runs. Every answer is compared with the seeded one; a wrong answer or an
error fails the figure. The report gives ops/s, p50 and p99 per variant and path, and each
variant's ops/s over the façade with 16 threads (today's default). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import db_latency_bench as dlb  # bench/ is on sys.path when run as a script
import registry_bench as rb
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from skyreg.meta import schema as s
from skyreg.meta.db import Database, create_db_engine, upgrade_schema
from skyreg.meta.registry import (
    _BLOB_SIZE_IN_REPO,
    _MANIFEST_BY_TAG,
    _REPOSITORY_ID,
    RegistryMeta,
)
from skyreg.oci import mediatypes as mt
from skyreg.oci.digest import Digest
from skyreg.oci.manifest import parse_manifest
from tests.support import (
    postgres as pg_fixtures,  # importable once db_latency_bench put the repository on sys.path
)

log = rb.log
BenchError = rb.BenchError

DATABASE = "skyreg_driver_bench"
REPO = dlb.REPO
THREAD_COUNTS = (4, 8, 16, 32)
POOL_SIZES = (16, 32)
BASELINE = "threads 16"
WARMUP_S = 1.0  # per variant and figure, not measured: connections, prepared statements
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
STALL_GRACE_S = 120.0  # a figure not finished this long after its deadline fails


# ------------------------------------------------------------------------- seeding


@dataclass(frozen=True)
class Seeded:
    """What the database holds, and so what every lookup must answer."""

    manifest_digest: str
    layer_digest: str
    layer_size: int
    tags: list[str]


def sha256(data: bytes) -> str:
    """The `sha256:<hex>` digest of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def seed(url: str) -> Seeded:
    """Create the schema and push, through `RegistryMeta`, what db_latency_bench pushes over
    HTTP: a config and a random layer linked into REPO, one OCI manifest, dlb.tag_names()."""
    engine = create_db_engine(url)
    upgrade_schema(engine)
    meta = RegistryMeta(engine)
    try:
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layer = os.urandom(4096)
        for blob in (config, layer):
            meta.link_blob(REPO, sha256(blob), len(blob))
        descriptor = {"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}
        raw = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mt.OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": sha256(config),
                    "size": len(config),
                },
                "layers": [descriptor],
            }
        ).encode()
        digest = Digest.parse(sha256(raw))
        meta.put_manifest(REPO, parse_manifest(raw, mt.OCI_MANIFEST, digest), dlb.tag_names())
    finally:
        meta.close()
    return Seeded(str(digest), sha256(layer), len(layer), dlb.tag_names())


# ------------------------------------------------------------------------- variants


class Lookups(Protocol):
    """The three lookups, answered the way one variant answers them."""

    async def manifest(self) -> str | None:
        """The digest of the manifest REPO:latest names."""

    async def blob_size(self, digest: str) -> int | None:
        """The size of a blob linked into REPO."""

    async def tags(self) -> list[str] | None:
        """REPO's tags (None: unknown repository), as the tags list handler gets them."""

    async def close(self) -> None:
        """Release every connection and thread."""


class ThreadLookups:
    """(a) Today's façade: `RegistryMeta` on a `Database` of `threads` threads."""

    def __init__(self, url: str, threads: int) -> None:
        self.db = Database(create_db_engine(url), threads=threads)
        self.meta = RegistryMeta(self.db)

    async def manifest(self) -> str | None:
        """`get_manifest` by tag through `Database.read`."""
        stored = await self.meta.read(self.meta.get_manifest, REPO, "latest", False)
        return None if stored is None else stored.digest

    async def blob_size(self, digest: str) -> int | None:
        """`blob_size` through `Database.read`."""
        return await self.meta.read(self.meta.blob_size, REPO, digest)

    async def tags(self) -> list[str] | None:
        """registry/discovery.py's `known_and_tags` (no `n`, no `last`): one hop."""
        meta = self.meta

        def known_and_tags() -> list[str] | None:
            if not meta.repository_known(REPO):
                return None
            return meta.list_tags(REPO, None, None)

        return await meta.read(known_and_tags)

    async def close(self) -> None:
        """Stop the threads and dispose the pool, off the loop (both wait)."""
        await asyncio.to_thread(self.db.close)


class AsyncLookups:
    """(b)/(c) An async SQLAlchemy engine (`postgresql+psycopg` or `postgresql+asyncpg`) with
    `pool` connections, running `RegistryMeta`'s statements; one checkout per lookup."""

    def __init__(self, url: str, pool: int) -> None:
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=pool, max_overflow=0, isolation_level="AUTOCOMMIT"
        )

    async def manifest(self) -> str | None:
        """`_MANIFEST_BY_TAG`, digest, media type and content, as `get_manifest`."""
        async with self.engine.connect() as conn:
            result = await conn.execute(_MANIFEST_BY_TAG, {"repo": REPO, "ref": "latest"})
            row = result.first()
        return None if row is None else str(row[0])

    async def blob_size(self, digest: str) -> int | None:
        """`_BLOB_SIZE_IN_REPO`, as `blob_size`."""
        async with self.engine.connect() as conn:
            result = await conn.execute(_BLOB_SIZE_IN_REPO, {"repo": REPO, "digest": digest})
            value = result.scalar_one_or_none()
        return None if value is None else int(value)

    async def tags(self) -> list[str] | None:
        """`repository_known`'s then `list_tags`'s statements on one connection."""
        async with self.engine.connect() as conn:
            if not await self._repository_known(conn):
                return None
            t = s.tags
            query = (
                select(t.c.name)
                .select_from(s.repositories.join(t, t.c.repository_id == s.repositories.c.id))
                .where(s.repositories.c.name == REPO)
                .order_by(t.c.name)
            )
            return [row[0] for row in await conn.execute(query)]

    @staticmethod
    async def _repository_known(conn: AsyncConnection) -> bool:
        repo_id = (await conn.execute(_REPOSITORY_ID, {"name": REPO})).scalar_one_or_none()
        if repo_id is None:
            return False
        for table in (s.manifests, s.repository_blobs):
            query = select(table.c.repository_id).where(table.c.repository_id == repo_id).limit(1)
            if (await conn.execute(query)).first() is not None:
                return True
        return False

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


@dataclass(frozen=True)
class Variant:
    """One way of reaching the database: a name, a URL scheme and a builder."""

    name: str
    scheme: str
    build: Callable[[str], Lookups]


def variants(with_asyncpg: bool) -> list[Variant]:
    """(a) threads 4/8/16/32, (b) psycopg async pools, (c) asyncpg pools when installed."""
    found: list[Variant] = []
    for n in THREAD_COUNTS:
        found.append(Variant(f"threads {n}", "postgresql+psycopg", _threads(n)))
    for n in POOL_SIZES:
        found.append(Variant(f"psycopg async {n}", "postgresql+psycopg", _pool(n)))
    if with_asyncpg:
        for n in POOL_SIZES:
            found.append(Variant(f"asyncpg {n}", "postgresql+asyncpg", _pool(n)))
    return found


def _threads(n: int) -> Callable[[str], Lookups]:
    return lambda url: ThreadLookups(url, n)


def _pool(n: int) -> Callable[[str], Lookups]:
    return lambda url: AsyncLookups(url, n)


# ------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One lookup and the answer it must give."""

    label: str
    call: Callable[[Lookups, Seeded], Awaitable[object]]
    expected: Callable[[Seeded], object]


FIGURES = (
    Figure("manifest GET by tag", lambda lk, _s: lk.manifest(), lambda sd: sd.manifest_digest),
    Figure("blob HEAD", lambda lk, sd: lk.blob_size(sd.layer_digest), lambda sd: sd.layer_size),
    Figure(f"tags list ({dlb.TAG_COUNT} tags)", lambda lk, _s: lk.tags(), lambda sd: sd.tags),
)


@dataclass(frozen=True)
class Run:
    """One measurement: lookups per second and latency percentiles (ms)."""

    ops: float
    p50: float
    p99: float
    count: int


async def load(lookups: Lookups, seeded: Seeded, figure: Figure, tasks: int, seconds: float) -> Run:
    """`tasks` tasks repeat `figure`'s lookup until `seconds` have passed; every answer is
    checked. A lookup still pending STALL_GRACE_S after that fails the figure."""
    expected = figure.expected(seeded)
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            answer = await figure.call(lookups, seeded)
            latencies.append(time.perf_counter() - began)
            if answer != expected:
                raise BenchError(f"{figure.label}: got {answer!r}, expected {expected!r}")

    async with asyncio.timeout(seconds + STALL_GRACE_S):
        async with asyncio.TaskGroup() as group:
            for _ in range(tasks):
                group.create_task(worker())
    elapsed = time.perf_counter() - start
    if not latencies:
        raise BenchError(f"{figure.label}: no lookup finished in {elapsed:.1f} s")
    latencies.sort()
    n = len(latencies)
    return Run(
        n / elapsed, latencies[n // 2] * 1000, latencies[min(n - 1, n * 99 // 100)] * 1000, n
    )


@dataclass
class Cell:
    """The runs of one figure, variant and database path, or why it failed."""

    runs: list[Run] = field(default_factory=list)
    error: str | None = None

    def median(self, pick: Callable[[Run], float]) -> float | None:
        """The median over the runs; None when the cell failed or is empty."""
        if self.error is not None or not self.runs:
            return None
        return statistics.median(pick(run) for run in self.runs)


Key = tuple[str, float, str]  # figure label, RTT (ms), variant name


async def measure_variant(
    variant: Variant,
    rtt: float,
    url: str,
    seeded: Seeded,
    args: argparse.Namespace,
    cells: dict[Key, Cell],
) -> None:
    """Build one variant on `url` (`rtt` ms away), warm it up, measure every figure, close it."""
    lookups = variant.build(url)
    try:
        for figure in FIGURES:
            cell = cells.setdefault((figure.label, rtt, variant.name), Cell())
            if cell.error is not None:
                continue
            try:
                await load(lookups, seeded, figure, args.tasks, WARMUP_S)
                run = await load(lookups, seeded, figure, args.tasks, args.seconds)
            except Exception as exc:  # a driver's error of any type fails this cell only
                cell.error = f"{type(exc).__name__}: {exc}"
                log(f"{dlb.setup_name(rtt)}, {variant.name}: {figure.label}: FAILED: {cell.error}")
                continue
            cell.runs.append(run)
            log(
                f"{dlb.setup_name(rtt)}, {variant.name}: {figure.label}: {run.ops:.0f} ops/s, "
                f"p50 {run.p50:.2f} ms, p99 {run.p99:.2f} ms, {run.count} lookups"
            )
    finally:
        await lookups.close()


async def measure_all(
    urls: dict[float, str], seeded: Seeded, chosen: Sequence[Variant], args: argparse.Namespace
) -> dict[Key, Cell]:
    """Every variant on every path, `args.runs` times (the variants' order alternates)."""
    cells: dict[Key, Cell] = {}
    for run in range(args.runs):
        for rtt, base in urls.items():
            order = list(chosen) if run % 2 == 0 else list(reversed(chosen))
            for variant in order:
                url = base.replace("postgresql+psycopg", variant.scheme, 1)
                await measure_variant(variant, rtt, url, seeded, args, cells)
    return cells


# ------------------------------------------------------------------------- report


def render_table(
    cells: dict[Key, Cell], label: str, rtts: Sequence[float], names: Sequence[str]
) -> str:
    """One figure: per variant and path, ops/s, its ratio to BASELINE, p50 and p99 (ms)."""
    head = ["variant"]
    for rtt in rtts:
        path = "direct" if rtt == 0 else f"+{rtt:g} ms"
        head += [f"{path} ops/s", f"x {BASELINE}", "p50 ms", "p99 ms"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in names:
        row = [name]
        for rtt in rtts:
            cell = cells.get((label, rtt, name), Cell())
            base = cells.get((label, rtt, BASELINE), Cell()).median(lambda r: r.ops)
            ops = cell.median(lambda r: r.ops)
            row += [
                dlb.fmt(ops, 0),
                dlb.quotient(ops, base),
                dlb.fmt(cell.median(lambda r: r.p50), 2),
                dlb.fmt(cell.median(lambda r: r.p99), 2),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_report(
    cells: dict[Key, Cell], rtts: Sequence[float], names: Sequence[str], context: dict[str, str]
) -> str:
    """The Markdown report: context, one table per figure, failures."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Database driver benchmark, {now}", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    for figure in FIGURES:
        lines += ["", f"{figure.label}:", "", render_table(cells, figure.label, rtts, names)]
    failures = [
        f"- {dlb.setup_name(rtt)}, {name}: {label}: {cell.error}"
        for (label, rtt, name), cell in cells.items()
        if cell.error is not None
    ]
    if failures:
        lines += ["", "### Failures", "", *failures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options (see bench/README.md)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 s per figure")
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks (default 64)")
    parser.add_argument("--runs", type=int, default=1, help="runs per cell, medians (default 1)")
    parser.add_argument(
        "--rtt-ms",
        type=float,
        action="append",
        help="a database round trip to add through a relay (repeatable; default: 2 and 10)",
    )
    parser.add_argument(
        "--only", action="append", help="measure only this variant, e.g. 'threads 16'"
    )
    parser.add_argument("--markdown", type=Path, help="append the report to FILE")
    parser.add_argument("--tmp-dir", type=Path, help="parent of the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 2.0
    if not 0 < args.seconds <= 600:
        parser.error("--seconds: in (0, 600]")
    if not 1 <= args.tasks <= 1024:
        parser.error("--tasks: 1 to 1024")
    if not 1 <= args.runs <= 10:
        parser.error("--runs: 1 to 10")
    rtts = args.rtt_ms or [2.0, 10.0]
    if any(not 0 < rtt <= 1000 for rtt in rtts) or len(set(rtts)) != len(rtts):
        parser.error("--rtt-ms: distinct values in (0, 1000]")
    args.rtt_ms = sorted(rtts)
    return args


def main(argv: Sequence[str]) -> int:
    """Run the benchmark; 0 if every cell was measured, 1 if one failed."""
    args = parse_args(argv)
    with_asyncpg = importlib.util.find_spec("asyncpg") is not None
    chosen = [v for v in variants(with_asyncpg) if not args.only or v.name in args.only]
    if not chosen:
        raise BenchError(f"--only names no variant of {[v.name for v in variants(True)]}")
    if not with_asyncpg:
        log("asyncpg is not installed (pip install asyncpg): its variants are left out")
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, rb.exit_on_signal)
    rtts = [0.0, *args.rtt_ms]
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(dlb.temp_dir(args.tmp_dir))
        pg = dlb.start_postgres(stack, [DATABASE])
        ports = {0.0: pg.port}
        for rtt in args.rtt_ms:
            ports[rtt] = dlb.start_relay(stack, tmp, pg.port, rtt)
        notes = []
        for rtt, port in ports.items():
            median, least = dlb.database_rtt(port, DATABASE)
            notes.append(f"{dlb.setup_name(rtt)} {median:.3f} ms (min {least:.3f})")
            if rtt and least < 0.9 * rtt:
                raise BenchError(f"the +{rtt:g} ms relay adds only {least:.3f} ms")
        log("SELECT 1 round trip: " + "; ".join(notes))
        urls = {
            rtt: f"postgresql+psycopg://{pg_fixtures.PG_SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
            for rtt, port in ports.items()
        }
        seeded = seed(urls[0.0])
        log(f"seeded {REPO}: manifest {seeded.manifest_digest}, {len(seeded.tags)} tags")
        cells = asyncio.run(measure_all(urls, seeded, chosen, args))
        context = {
            "command": f"`{shlex.join([sys.executable, *sys.argv])}`",
            "machine": rb.machine_description(),
            "machine load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
            "(1-min load average)",
            "database": dlb.pg_settings(pg) + " (as tests/support/postgres.py starts it)",
            "added latency": "bench/wanlab.py `relay` (RTT/2 each way); SELECT 1 round trips "
            f"(median of {dlb.PINGS}): " + "; ".join(notes),
            "drivers": _versions(with_asyncpg),
            "method": f"one process, one event loop; {args.tasks} tasks per figure, "
            f"{WARMUP_S:g} s warm-up then {args.seconds:g} s, {args.runs} run(s) "
            "(medians); every answer checked; ratio: ops/s over `threads 16` on that path",
        }
        report = render_report(cells, rtts, [v.name for v in chosen], context)
    print(report)
    log(f"finished in {time.monotonic() - started:.0f} s")
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write(report)
    return 1 if "### Failures" in report else 0


def _versions(with_asyncpg: bool) -> str:
    from importlib.metadata import version

    names = ["sqlalchemy", "psycopg", "greenlet", *(["asyncpg"] if with_asyncpg else [])]
    found: list[str] = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except Exception:
            found.append(f"{name} ?")
    return ", ".join(found)


def cli() -> int:
    return rb.run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
