#!/usr/bin/env python3
"""What an org's usage walk costs (`QuotaMeta.org_usage`, what a quota check reads), by size.

For each N, a fresh SQLite database in a temporary directory gets an org with one app, eleven
repositories of it, N distinct blobs linked round-robin into them and N/100 manifests; the walk
is timed `--runs` times (median reported). This is why `registry/quotas.py` computes it at most
once per `USAGE_MAX_AGE` seconds per org and process instead of once per check.

    python bench/quota_usage_bench.py [--links 10000 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, select

from skyreg.meta import schema as s
from skyreg.meta.db import sqlite_url
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.quotas import QuotaMeta
from skyreg.meta.registry import open_database


def walk_seconds(links: int, runs: int) -> tuple[float, int]:
    """Median seconds of one walk over `links` links, and the bytes it counted."""
    with tempfile.TemporaryDirectory(prefix="quota-bench-") as tmp:
        meta = open_database(sqlite_url(Path(tmp) / "skyreg.db"), Path(tmp))
        try:
            org = PlatformMeta(meta.db).create_org("acme")
            PlatformMeta(meta.db).create_app("web", org.id)
            now = datetime.now(UTC)
            with meta.engine.begin() as conn:
                names = ["web"] + [f"web/r{i}" for i in range(10)]
                conn.execute(
                    insert(s.repositories), [{"name": n, "created_at": now} for n in names]
                )
                ids = list(conn.execute(select(s.repositories.c.id)).scalars())
                digests = [
                    "sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(links)
                ]
                conn.execute(
                    insert(s.blobs),
                    [
                        {"digest": d, "size": 1000 + i, "created_at": now}
                        for i, d in enumerate(digests)
                    ],
                )
                conn.execute(
                    insert(s.repository_blobs),
                    [
                        {"repository_id": ids[i % len(ids)], "digest": d, "created_at": now}
                        for i, d in enumerate(digests)
                    ],
                )
                conn.execute(
                    insert(s.manifests),
                    [
                        {
                            "repository_id": ids[i % len(ids)],
                            "digest": digests[i],
                            "media_type": "application/vnd.oci.image.manifest.v1+json",
                            "content": b"{}",
                            "size": 2,
                            "created_at": now,
                        }
                        for i in range(links // 100)
                    ],
                )
            quotas = QuotaMeta(meta.db)
            times, counted = [], 0
            for _ in range(runs):
                start = time.perf_counter()
                counted, _ = quotas.org_usage(org.id)
                times.append(time.perf_counter() - start)
            return statistics.median(times), counted
        finally:
            meta.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    print("| links | walk (median) | bytes counted |\n|---:|---:|---:|")
    for links in args.links:
        seconds, counted = walk_seconds(links, args.runs)
        print(f"| {links:,} | {seconds * 1000:.0f} ms | {counted:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
