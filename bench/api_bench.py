#!/usr/bin/env python3
"""The management API's throughput: this tree against an anchor revision.

Starts one `skyreg serve` from this tree and one from an anchor revision (exported with
`git archive` into a temporary directory and run with `PYTHONPATH=<export>/src` on the same
interpreter), one after the other on 127.0.0.1, seeds each through its own API (an org, N apps,
N readonly tokens, N tagged images in one app), then drives each request for a fixed time with
concurrent aiohttp clients: GET /api/v1/apps, GET /api/v1/apps/{app}/images, GET /api/v1/tokens
and POST /api/v1/tokens (last, as it adds tokens). Prints a markdown table of requests per
second and the ratio new/anchor. Every answer must have the expected status, else the run fails.

    .venv/bin/python bench/api_bench.py [--anchor 6378f93] [--seconds 10] [--clients 32] [--n 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ORG = "bench"
APP = "bench-app"
START_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[api-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Server:
    name: str
    url: str
    admin: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def serve(name: str, src: Path, workdir: Path) -> Iterator[Server]:
    """`skyreg serve` with `src` first on the import path; stopped (its process group) on
    leaving, whatever happened."""
    workdir.mkdir(parents=True)
    port_file, data_dir = workdir / "port", workdir / "data"
    argv = [sys.executable, "-m", "skyreg", "serve", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--data-dir", str(data_dir), "--port-file", str(port_file), "--no-access-log"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("SKYREG_STRICT_DB_THREADS", None)
    with (workdir / "serve.log").open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name}: skyreg exited with {proc.returncode}; see {workdir}")
            with contextlib.suppress(OSError, ValueError):
                port = int(port_file.read_text().strip())
                admin = (data_dir / "admin-token").read_text().strip()
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: skyreg did not start in {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        log(f"{name}: serving on port {port} (PYTHONPATH={src})")
        yield Server(name, f"http://127.0.0.1:{port}", admin, proc)
    finally:
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _expect(resp: aiohttp.ClientResponse, status: int) -> None:
    if resp.status != status:
        raise SystemExit(f"{resp.method} {resp.url}: {resp.status} {(await resp.text())[:300]}")


async def seed(server: Server, n: int) -> None:
    """An org, `n` apps (one of them APP), `n` readonly tokens and `n` tags of APP."""
    headers = {"Authorization": f"Bearer {server.admin}"}
    api = f"{server.url}/api/v1"
    async with aiohttp.ClientSession(headers=headers) as s:

        async def post(path: str, body: dict[str, object]) -> None:
            async with s.post(api + path, json=body) as r:
                await _expect(r, 201)

        await post("/orgs", {"name": ORG})
        await post("/apps", {"name": APP, "org": ORG})
        for i in range(n - 1):
            await post("/apps", {"name": f"app-{i}", "org": ORG})
        for i in range(n):
            await post("/tokens", {"kind": "readonly", "org": ORG, "name": f"t{i}"})
    async with aiohttp.ClientSession(auth=aiohttp.BasicAuth("admin", server.admin)) as s:
        for i in range(n):
            config = json.dumps({"os": "linux", "architecture": "amd64", "n": i}).encode()
            layer = os.urandom(256)
            for blob in (config, layer):
                url = f"{server.url}/v2/{APP}/blobs/uploads/?digest={_sha256(blob)}"
                async with s.post(url, data=blob) as r:
                    await _expect(r, 201)
            manifest = json.dumps({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _sha256(config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": _sha256(layer), "size": len(layer)}],
            }).encode()  # fmt: skip
            async with s.put(
                f"{server.url}/v2/{APP}/manifests/v{i}",
                data=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            ) as r:
                await _expect(r, 201)


@dataclass(frozen=True)
class Workload:
    label: str
    method: str
    path: str
    status: int
    body: dict[str, object] | None = None


WORKLOADS = [
    Workload("GET /api/v1/apps", "GET", "/apps", 200),
    Workload("GET /api/v1/apps/{app}/images", "GET", f"/apps/{APP}/images", 200),
    Workload("GET /api/v1/tokens", "GET", "/tokens", 200),
    Workload("POST /api/v1/tokens", "POST", "/tokens", 201, {"kind": "readonly", "org": ORG}),
]


async def drive(server: Server, work: Workload, seconds: float, clients: int) -> float:
    """Requests per second of `clients` concurrent clients sending `work` for `seconds`."""
    headers = {"Authorization": f"Bearer {server.admin}"}
    connector = aiohttp.TCPConnector(limit=clients)
    url = f"{server.url}/api/v1{work.path}"
    done = 0
    async with aiohttp.ClientSession(headers=headers, connector=connector) as s:

        async def client(deadline: float) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with s.request(work.method, url, json=work.body) as r:
                    await r.read()
                    if r.status != work.status:
                        raise SystemExit(f"{server.name} {work.label}: {r.status}")
                done += 1

        await asyncio.gather(*(client(time.monotonic() + 1.0) for _ in range(clients)))  # warm
        done = 0
        start = time.monotonic()
        await asyncio.gather(*(client(start + seconds) for _ in range(clients)))
        return done / (time.monotonic() - start)


def measure(name: str, src: Path, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    with serve(name, src, workdir) as server:
        log(f"{name}: seeding {args.n} apps, tokens and images")
        asyncio.run(seed(server, args.n))
        rates: dict[str, float] = {}
        for work in WORKLOADS:
            rates[work.label] = asyncio.run(drive(server, work, args.seconds, args.clients))
            log(f"{name}: {work.label}: {rates[work.label]:.0f} req/s")
        return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", default="6378f93", help="git revision to compare with")
    parser.add_argument("--seconds", type=float, default=10.0, help="per request kind")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--n", type=int, default=100, help="apps, tokens and images seeded")
    args = parser.parse_args()
    if not (1 <= args.clients <= 1024 and 1 <= args.n <= 10_000 and 0 < args.seconds <= 600):
        parser.error("--clients 1-1024, --n 1-10000, --seconds up to 600")
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        root = Path(tmp)
        anchor = root / "anchor"
        anchor.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.anchor], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(anchor)], input=archive, check=True)
        old = measure(f"anchor {args.anchor}", anchor / "src", root / "run-anchor", args)
        new = measure("this tree", REPO / "src", root / "run-new", args)
    print(f"\n{args.clients} clients, {args.seconds:.0f} s each, {args.n} apps/tokens/images\n")
    print(f"| request | anchor {args.anchor} req/s | this tree req/s | new/anchor |")
    print("|---|---:|---:|---:|")
    for work in WORKLOADS:
        a, b = old[work.label], new[work.label]
        print(f"| {work.label} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
