#!/usr/bin/env python3
"""`skyreg proxy` against Debian's nginx as a reverse proxy, and against no proxy at all.

Starts N backend HTTP servers on 127.0.0.1 (one child process, raw asyncio, each answering every
request with the same small body), a routes server (the server's `GET /api/v1/agent/routes`)
naming them as the machines of app `web`, a real `skyreg proxy` process fed by it, and
`/usr/sbin/nginx` (`--workers` processes each, default one; non-daemon, its own prefix in a temp
dir, an `upstream` of the same backends, `least_conn`, keep-alive to the backends, access log
off) on a free port. Then, in rounds that alternate the targets, a fixed-concurrency aiohttp
client (`--connections` kept-alive connections, each sending GETs one after another for
`--seconds`) measures requests/s and p50/p99 latency: straight to one backend, through skyreg
proxy, through nginx. Every answer must be 200 with the backend's body. Prints a markdown table
of the medians over the rounds and the ratios.

    .venv/bin/python bench/proxy_bench.py [--backends 4] [--seconds 10] [--connections 32]
        [--rounds 3] [--nginx /usr/sbin/nginx] [--client aiohttp|wrk] [--workers 1]

The aiohttp client is one Python process and can be the bottleneck itself (nginx then measures
about what "direct" does); `--client wrk` drives the same connections from wrk instead.

nginx: `apt-get install nginx-light` (or nginx) if /usr/sbin/nginx is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
TOKEN = "proxy-bench"
BODY = b"hello from a machine\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
)
START_TIMEOUT = 30.0


def log(message: str) -> None:
    print(f"[proxy-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The backends (a child process: `--serve-backends N`) -------------------------------------------


class _Backend(asyncio.Protocol):
    """Answers each request head (GETs only, no body) with RESPONSE, keeping the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(RESPONSE)


async def _serve_backends(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(_Backend, "127.0.0.1", 0, backlog=1024) for _ in range(count)
    ]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(" ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# The routes server ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def routes_server(ports: list[int]) -> AsyncIterator[str]:
    """GET /api/v1/agent/routes naming `ports` as the healthy machines of app `web`."""
    doc = {
        "apps": [
            {
                "app": "web",
                "machines": [
                    {"id": f"m{i}", "region": "local", "address": "127.0.0.1", "port": p,
                     "healthy": True, "draining": False}
                    for i, p in enumerate(ports)
                ],
            }
        ],
        "truncated": False,
    }  # fmt: skip

    async def answer(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthorized"}}, status=401)
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/api/v1/agent/routes", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# The proxies -----------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], name: str) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    log(f"{name} did not stop")


@contextlib.asynccontextmanager
async def skyreg_proxy(routes_url: str, workdir: Path, workers: int) -> AsyncIterator[str]:
    """A real `skyreg proxy` process following `routes_url` (served on this event loop: it must
    keep running while the proxy starts); yields its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(SKYREG_TOKEN=TOKEN, PYTHONPATH=str(REPO / "src"))
    argv = [sys.executable, "-m", "skyreg", "proxy", "--server", routes_url,
            "--listen", "127.0.0.1:0", "--region", "local", "--poll", "1",
            "--workers", str(workers)]  # fmt: skip
    with (workdir / "skyreg-proxy.log").open("wb") as err:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            start_new_session=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.to_thread(proc.stdout.readline)).decode()
        if not line.startswith("skyreg proxy listening on "):
            raise SystemExit(f"skyreg proxy did not start: {line!r}; see {workdir}")
        url = line.split()[4]
        log(f"skyreg proxy: {url} (pid {proc.pid})")
        yield url
    finally:
        stop_process(proc, "skyreg proxy")


NGINX_CONF = """\
daemon off;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream web {{
        least_conn;
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        server_name web.localhost;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(binary: str, ports: list[int], workdir: Path, workers: int) -> Iterator[str]:
    """nginx (`workers` worker processes, no daemon) proxying to `ports`; yields its URL."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in ports)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=prefix, servers=servers, port=port, workers=workers))
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                error = (prefix / "error.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"nginx exited with {proc.returncode}: {error}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise SystemExit("nginx did not start")
            time.sleep(0.05)
        log(f"nginx: http://127.0.0.1:{port} (pid {proc.pid})")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc, "nginx")


# The client ----------------------------------------------------------------------------------


@dataclass
class Figures:
    rate: float
    p50_ms: float
    p99_ms: float


async def drive(url: str, seconds: float, connections: int) -> Figures:
    """`connections` clients, each sending GETs one after another on its own kept-alive
    connection for `seconds` (after one second of warm-up); any answer but 200 + BODY fails."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    headers = {"Host": "web.localhost"}
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector, headers=headers) as s:

        async def client(deadline: float, record: bool) -> None:
            while (start := time.perf_counter()) < deadline:
                async with s.get(url + "/") as r:
                    body = await r.read()
                if r.status != 200 or body != BODY:
                    raise SystemExit(f"{url}: {r.status} {body[:200]!r}")
                if record:
                    latencies.append(time.perf_counter() - start)

        warm = time.perf_counter() + 1.0
        await asyncio.gather(*(client(warm, False) for _ in range(connections)))
        begin = time.perf_counter()
        await asyncio.gather(*(client(begin + seconds, True) for _ in range(connections)))
        elapsed = time.perf_counter() - begin
    q = statistics.quantiles(latencies, n=100)
    return Figures(len(latencies) / elapsed, q[49] * 1000, q[98] * 1000)


def _wrk_ms(value: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * scale
    raise ValueError(value)


async def drive_wrk(url: str, seconds: float, connections: int) -> Figures:
    """The same load from `wrk -t2 --latency` (C, two threads: a client that is not the
    bottleneck); any answer but 2xx/3xx fails (wrk does not check bodies)."""
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-H", "Host: web.localhost", url + "/"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out = (await proc.communicate())[0].decode()
    if proc.returncode != 0 or "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"{url}: wrk failed:\n{out}")
    fields = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            fields["rate"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            fields[parts[0]] = _wrk_ms(parts[1])
    return Figures(fields["rate"], fields["50%"], fields["99%"])


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, list[Figures]]:
    backends = subprocess.Popen(
        [sys.executable, __file__, "--serve-backends", str(args.backends)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert backends.stdout is not None
        ports = [int(p) for p in backends.stdout.readline().split()]
        if len(ports) != args.backends:
            raise SystemExit("the backends did not start")
        log(f"backends on ports {ports}")
        async with (
            routes_server(ports) as routes_url,
            skyreg_proxy(routes_url, workdir, args.workers) as skyreg_url,
        ):
            with nginx(args.nginx, ports, workdir, args.workers) as nginx_url:
                targets = {
                    "direct (one backend)": f"http://127.0.0.1:{ports[0]}",
                    "skyreg proxy": skyreg_url,
                    "nginx": nginx_url,
                }
                results: dict[str, list[Figures]] = {name: [] for name in targets}
                for round_ in range(args.rounds):
                    for name, url in targets.items():
                        if args.client == "wrk":
                            await drive(url, 1.0, args.connections)  # warm-up and body check
                            f = await drive_wrk(url, args.seconds, args.connections)
                        else:
                            f = await drive(url, args.seconds, args.connections)
                        results[name].append(f)
                        log(
                            f"round {round_ + 1} {name}: {f.rate:.0f} req/s, "
                            f"p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms"
                        )
                return results
    finally:
        stop_process(backends, "backends")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=4, help="backend servers (machines)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per target and round")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the targets")
    parser.add_argument("--nginx", default="/usr/sbin/nginx", help="the nginx binary")
    parser.add_argument(
        "--client", choices=("aiohttp", "wrk"), default="aiohttp", help="the load generator"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes of each proxy (skyreg and nginx alike)"
    )
    parser.add_argument("--serve-backends", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backends:
        asyncio.run(_serve_backends(args.serve_backends))
        return
    if not (1 <= args.backends <= 64 and 1 <= args.connections <= 1024 and args.rounds >= 1):
        parser.error("--backends 1-64, --connections 1-1024, --rounds 1 or more")
    if not shutil.which(args.nginx):
        raise SystemExit(f"{args.nginx} not found: apt-get install nginx-light")
    version = subprocess.run([args.nginx, "-v"], capture_output=True, text=True).stderr.strip()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        results = asyncio.run(bench(args, Path(tmp)))
    med = {
        name: Figures(
            statistics.median(f.rate for f in runs),
            statistics.median(f.p50_ms for f in runs),
            statistics.median(f.p99_ms for f in runs),
        )
        for name, runs in results.items()
    }
    sky, ngx = med["skyreg proxy"], med["nginx"]
    print(
        f"\n{args.backends} backends, {args.connections} connections ({args.client}), "
        f"{args.seconds:.0f} s per target, median of {args.rounds} rounds; {version}\n"
    )
    print("| target | req/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for name, f in med.items():
        print(f"| {name} | {f.rate:.0f} | {f.p50_ms:.2f} | {f.p99_ms:.2f} |")
    print(
        f"\nskyreg/nginx: req/s {sky.rate / ngx.rate:.2f}x, p50 {sky.p50_ms / ngx.p50_ms:.2f}x, "
        f"p99 {sky.p99_ms / ngx.p99_ms:.2f}x (req/s: higher is better; latency: lower)"
    )


if __name__ == "__main__":
    main()
