#!/usr/bin/env python3
"""Side-by-side benchmark: skyreg vs CNCF Distribution (Debian ``docker-registry``).

Both registries are started on 127.0.0.1 in one run and receive the same workload:
monolithic and chunked blob push, blob pull, manifest GET by tag under ``wrk`` and
parallel blob pulls. Byte transfers use ``curl`` so the client is not the bottleneck.
See bench/README.md for usage and the meaning of each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType

MIB = 1024 * 1024
MB = 1_000_000  # rates are reported in MB/s with MB = 10**6 bytes
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCTET = "application/octet-stream"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CURL_WRITE_OUT = "%{http_code} %{size_download} %{size_upload} %{time_total}"
BODY_EXCERPT = 2000
ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|PATCH|POST|DELETE) \S+ HTTP/1\.[01]" \d{3}')


# --------------------------------------------------------------------------- errors


class BenchError(Exception):
    """A benchmark step could not be completed."""


class RequestFailed(BenchError):
    """A registry answered a request wrongly; carries the request and response verbatim."""

    def __init__(self, request: str, response: str) -> None:
        super().__init__(f"request:\n{request}\nresponse:\n{response}")
        self.request = request
        self.response = response


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Sizes:
    blob: int
    chunk: int
    parallel_blob: int
    parallel_pulls: int
    wrk_seconds: int
    wrk_connections: int
    runs: int
    small_writes: int  # manifests PUT (and small blobs pushed) per run, one after another


FULL = Sizes(512 * MIB, 64 * MIB, 64 * MIB, 16, 10, 64, 3, 300)
QUICK = Sizes(32 * MIB, 8 * MIB, 8 * MIB, 16, 3, 64, 3, 50)


def human_size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} B"


# ------------------------------------------------------------------------------ URLs


def check_loopback(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise BenchError(f"refusing non-loopback URL {url!r}")
    return url


def resolve(current_url: str, location: str) -> str:
    """Resolve a Location header (relative or absolute) against the request URL."""
    return check_loopback(urllib.parse.urljoin(current_url, location))


def add_query(url: str, key: str, value: str) -> str:
    parts = urllib.parse.urlsplit(url)
    extra = urllib.parse.urlencode({key: value})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urllib.parse.urlunsplit(parts._replace(query=query))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ reporting helpers

Headers = list[tuple[str, str]]


def header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None


def describe_request(method: str, url: str, headers: Sequence[str], body: str) -> str:
    lines = [f"  {method} {url}", *(f"  {h}" for h in headers), f"  <body: {body}>"]
    return "\n".join(lines)


def describe_response(status: int | str, headers: Headers, body: bytes) -> str:
    lines = [f"  HTTP {status}", *(f"  {k}: {v}" for k, v in headers)]
    text = body[:BODY_EXCERPT].decode("utf-8", errors="replace")
    more = f" ... ({len(body)} bytes total)" if len(body) > BODY_EXCERPT else ""
    lines.append(f"  <body: {text!r}{more}>")
    return "\n".join(lines)


# ------------------------------------------------------------ control-plane requests


@dataclass(frozen=True)
class Response:
    status: int
    headers: Headers
    body: bytes


def http_request(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    expect: Sequence[int] = (200,),
    max_body: int | None = None,
) -> Response:
    """One small request with http.client (no redirects); raise RequestFailed if unexpected."""
    parts = urllib.parse.urlsplit(check_loopback(url))
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    request = describe_request(
        method, url, [f"{k}: {v}" for k, v in all_headers.items()], f"{len(body)} bytes"
    )
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        conn.request(method, target, body=body or None, headers=all_headers)
        raw = conn.getresponse()
        data = raw.read(max_body) if max_body is not None else raw.read()
        response = Response(raw.status, raw.getheaders(), data)
    except (OSError, http.client.HTTPException) as exc:
        raise RequestFailed(request, f"  <no response: {exc!r}>") from exc
    finally:
        conn.close()
    if response.status not in expect:
        raise RequestFailed(request, describe_response(response.status, response.headers, data))
    return response


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def start_upload(base: str, repo: str) -> str:
    url = f"{base}/v2/{repo}/blobs/uploads/"
    response = http_request("POST", url, expect=(202,))
    location = header(response.headers, "Location")
    if not location:
        raise RequestFailed(
            describe_request("POST", url, [], "0 bytes"),
            describe_response(response.status, response.headers, response.body)
            + "\n  (no Location header)",
        )
    return resolve(url, location)


class Session:
    """One kept-alive HTTP connection to a registry, for many small requests in a row."""

    def __init__(self, base: str) -> None:
        parts = urllib.parse.urlsplit(check_loopback(base))
        self.conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=60
        )

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, expect: int
    ) -> Response:
        all_headers = {"Content-Length": str(len(body)), **headers}
        try:
            self.conn.request(method, path, body=body or None, headers=all_headers)
            raw = self.conn.getresponse()
            response = Response(raw.status, raw.getheaders(), raw.read())
        except (OSError, http.client.HTTPException) as exc:
            request = describe_request(method, path, list(all_headers), f"{len(body)} bytes")
            raise RequestFailed(request, f"  <no response: {exc!r}>") from exc
        if response.status != expect:
            raise RequestFailed(
                describe_request(method, path, list(all_headers), f"{len(body)} bytes"),
                describe_response(response.status, response.headers, response.body),
            )
        return response

    def close(self) -> None:
        self.conn.close()


def push_small_blob(base: str, repo: str, data: bytes) -> str:
    digest = sha256_digest(data)
    url = add_query(start_upload(base, repo), "digest", digest)
    http_request("PUT", url, {"Content-Type": OCTET}, data, expect=(201,))
    return digest


# -------------------------------------------------------------------- curl transfers


@dataclass(frozen=True)
class CurlResult:
    status: int
    headers: Headers
    size_download: int
    size_upload: int
    time_total: float


@dataclass(frozen=True)
class CurlCall:
    method: str
    url: str
    headers: tuple[str, ...] = ()
    upload: Path | None = None  # None with PUT/PATCH means an empty body
    follow: bool = False

    def argv(self, header_file: Path, body_out: Path | str) -> list[str]:
        argv = ["curl", "-sS", "--fail-with-body", "-o", str(body_out)]
        argv += ["-D", str(header_file), "-w", CURL_WRITE_OUT]
        if self.method != "GET":
            argv += ["-X", self.method]
        if self.follow:
            argv.append("-L")
        for h in self.headers:
            argv += ["-H", h]
        if self.upload is not None:
            argv += ["-T", str(self.upload), "-H", "Expect:"]
        elif self.method in ("PUT", "PATCH", "POST"):
            argv += ["--data-binary", ""]
        return [*argv, check_loopback(self.url)]

    def describe(self) -> str:
        body = f"{self.upload.stat().st_size} bytes" if self.upload else "0 bytes"
        return describe_request(self.method, self.url, self.headers, body)


def parse_header_file(path: Path) -> Headers:
    """Headers of the last response in a curl -D dump (skips redirects and 1xx)."""
    blocks: list[Headers] = []
    text = path.read_text("latin-1") if path.exists() else ""
    for line in text.splitlines():
        if line.startswith("HTTP/"):
            blocks.append([])
        elif ":" in line and blocks:
            key, _, value = line.partition(":")
            blocks[-1].append((key.strip(), value.strip()))
    return blocks[-1] if blocks else []


def curl_result(
    call: CurlCall, proc: subprocess.CompletedProcess[str], header_file: Path, body: bytes
) -> CurlResult:
    fields = proc.stdout.split()
    if proc.returncode not in (0, 22) or len(fields) != 4:
        response = f"  curl exit {proc.returncode}: {proc.stderr.strip()!r} stdout={proc.stdout!r}"
        raise RequestFailed(call.describe(), response)
    status, down, up, total = int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3])
    return CurlResult(status, parse_header_file(header_file), down, up, total)


def check_status(call: CurlCall, result: CurlResult, expect: int, body: bytes) -> CurlResult:
    if result.status != expect:
        raise RequestFailed(call.describe(), describe_response(result.status, result.headers, body))
    return result


def run_curl(call: CurlCall, expect: int, scratch: Path) -> CurlResult:
    """Run one transfer. Upload response bodies are kept (small); downloads go to /dev/null."""
    header_file, body_file = scratch / "curl.headers", scratch / "curl.body"
    header_file.unlink(missing_ok=True)
    body_file.unlink(missing_ok=True)
    body_out: Path | str = (
        body_file if call.upload is not None or call.method != "GET" else "/dev/null"
    )
    proc = subprocess.run(call.argv(header_file, body_out), capture_output=True, text=True)
    body = body_file.read_bytes() if body_file.exists() else b""
    result = curl_result(call, proc, header_file, body)
    if result.status != expect and body_out == "/dev/null":
        body = diagnose_get(call.url)
    return check_status(call, result, expect, body)


def diagnose_get(url: str) -> bytes:
    """Re-issue a failed GET to capture (the start of) the response body for the report."""
    with contextlib.suppress(RequestFailed):
        return http_request("GET", url, expect=range(100, 600), max_body=BODY_EXCERPT).body
    return b"<could not re-fetch the body>"


def refetch_description(url: str) -> str:
    """Status, headers and start of the body of a fresh GET of url (for failure reports)."""
    try:
        response = http_request("GET", url, expect=range(100, 600), max_body=BODY_EXCERPT)
    except RequestFailed as exc:
        return exc.response
    return describe_response(response.status, response.headers, response.body)


# ---------------------------------------------------------------------- test data


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path  # the whole blob in one file
    chunks: tuple[Path, ...] = ()  # the same bytes split into chunk files (chunked push)


@dataclass(frozen=True)
class TestData:
    monolithic: tuple[Blob, ...]  # one distinct blob per run so nothing can be deduplicated
    chunked: tuple[Blob, ...]
    parallel: Blob


def write_blob(directory: Path, name: str, pool: bytes, chunk: int) -> Blob:
    """Write pool with a fresh random 32-byte prefix (distinct digest), plus chunk files."""
    directory.mkdir(parents=True, exist_ok=True)
    data = memoryview(os.urandom(32) + pool[32:])
    path = directory / f"{name}.bin"
    path.write_bytes(data)
    chunks: list[Path] = []
    if chunk:
        for index, start in enumerate(range(0, len(data), chunk)):
            chunk_path = directory / f"{name}.part{index:03d}"
            chunk_path.write_bytes(data[start : start + chunk])
            chunks.append(chunk_path)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return Blob(digest, len(data), path, tuple(chunks))


def make_test_data(directory: Path, sizes: Sizes) -> TestData:
    log(f"generating test data in {directory}")
    pool = os.urandom(sizes.blob)
    mono = tuple(write_blob(directory, f"mono{i}", pool, 0) for i in range(sizes.runs))
    chunked = tuple(
        write_blob(directory, f"chunked{i}", pool, sizes.chunk) for i in range(sizes.runs)
    )
    for blob in chunked:  # the single-file copy is only needed for monolithic pushes
        blob.path.unlink()
    parallel = write_blob(directory, "parallel", os.urandom(sizes.parallel_blob), 0)
    return TestData(mono, chunked, parallel)


# -------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "<no log>"
    return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the process group we started, then kill it if it does not exit."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a dead parent
        os.killpg(proc.pid, signal.SIGKILL)


def spawn(stack: contextlib.ExitStack, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C is handled by us, not it
        )
    stack.callback(stop_process, proc)
    return proc


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.proc.returncode}:\n{log_tail(server.log_path)}"
            )
        with contextlib.suppress(RequestFailed):
            http_request("GET", f"{server.base_url}/v2/", expect=(200, 401))
            return
        time.sleep(0.1)
    raise BenchError(f"{server.name} did not answer GET /v2/ in {timeout:.0f} s")


def distribution_config(root: Path, port: int, access_log: bool) -> str:
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": not access_log}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    return json.dumps(config, indent=2)  # JSON is valid YAML


def start_distribution(
    stack: contextlib.ExitStack, name: str, workdir: Path, access_log: bool
) -> Server:
    workdir.mkdir(parents=True)
    port = free_port()
    config = workdir / "config.yml"
    config.write_text(distribution_config(workdir / "storage", port, access_log))
    log_path = workdir / "registry.log"
    proc = spawn(stack, ["docker-registry", "serve", str(config)], log_path)
    server = Server(name, f"http://127.0.0.1:{port}", proc, log_path)
    wait_ready(server)
    return server


def read_port_file(path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"skyreg exited with {proc.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        time.sleep(0.1)
    raise BenchError(f"skyreg did not write {path} within 60 s:\n{log_tail(log_path)}")


def start_skyreg(
    stack: contextlib.ExitStack,
    workdir: Path,
    workers: int | None,
    access_log: bool,
    synchronous: str = "full",
    name: str = "skyreg",
) -> Server:
    workdir.mkdir(parents=True)
    port_file, log_path = workdir / "port", workdir / "skyreg.log"
    argv = [sys.executable, "-m", "skyreg", "serve", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--data-dir", str(workdir / "data"), "--port-file", str(port_file)]
    argv.append("--no-auth")  # Distribution runs without auth too: compare the same work
    if workers is not None:
        argv += ["--workers", str(workers)]
    if not access_log:
        argv.append("--no-access-log")
    argv += ["--sqlite-synchronous", synchronous]
    log(f"starting: {shlex.join(argv)}")
    proc = spawn(stack, argv, log_path)
    port = read_port_file(port_file, proc, log_path)
    server = Server(name, f"http://127.0.0.1:{port}", proc, log_path)
    wait_ready(server)
    return server


# ------------------------------------------------------------------------- workload


@dataclass
class Target:
    server: Server
    scratch: Path
    pushed: Blob | None = None  # the monolithic blob pulled by the pull figures
    image: ImageParts | None = None  # the blobs the manifest PUT figure refers to

    @property
    def name(self) -> str:
        return self.server.name

    def url(self, path: str) -> str:
        return f"{self.server.base_url}{path}"


def push_monolithic(target: Target, repo: str, blob: Blob) -> float:
    """POST, then one PUT ?digest= of the whole body; returns the PUT's curl time_total."""
    url = add_query(start_upload(target.server.base_url, repo), "digest", blob.digest)
    call = CurlCall("PUT", url, (f"Content-Type: {OCTET}",), blob.path)
    return run_curl(call, 201, target.scratch).time_total


def push_chunked(target: Target, repo: str, blob: Blob) -> float:
    """POST, PATCH per chunk (following Location), final PUT ?digest=; sums curl time_total."""
    url = start_upload(target.server.base_url, repo)
    elapsed, offset = 0.0, 0
    for chunk in blob.chunks:
        size = chunk.stat().st_size
        headers = (f"Content-Type: {OCTET}", f"Content-Range: {offset}-{offset + size - 1}")
        call = CurlCall("PATCH", url, headers, chunk)
        result = run_curl(call, 202, target.scratch)
        location = header(result.headers, "Location")
        if not location:
            raise RequestFailed(call.describe(), "  202 without a Location header")
        url, elapsed, offset = resolve(url, location), elapsed + result.time_total, offset + size
    final = CurlCall("PUT", add_query(url, "digest", blob.digest), (f"Content-Type: {OCTET}",))
    return elapsed + run_curl(final, 201, target.scratch).time_total


def blob_url(target: Target, repo: str, digest: str) -> str:
    return target.url(f"/v2/{repo}/blobs/{digest}")


def verify_blob(url: str, blob: Blob) -> None:
    """Download once (untimed) and compare size and sha256 with what was pushed."""
    proc = subprocess.Popen(["curl", "-sS", "--fail", "-L", url], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    hasher, size = hashlib.sha256(), 0
    while piece := proc.stdout.read(4 * MIB):
        hasher.update(piece)
        size += len(piece)
    if proc.wait() != 0 or size != blob.size or "sha256:" + hasher.hexdigest() != blob.digest:
        got = f"curl exit {proc.returncode}, {size} bytes, sha256:{hasher.hexdigest()}"
        raise RequestFailed(
            describe_request("GET", url, [], "0 bytes"),
            f"  {got}; expected {blob.size} bytes, {blob.digest}\n"
            f"  re-fetched without following redirects:\n{refetch_description(url)}",
        )


def pull_once(target: Target, repo: str, blob: Blob) -> float:
    call = CurlCall("GET", blob_url(target, repo, blob.digest), follow=True)
    result = run_curl(call, 200, target.scratch)
    if result.size_download != blob.size:
        raise RequestFailed(call.describe(), f"  200 but {result.size_download} bytes")
    return result.time_total


def parallel_pulls(target: Target, repo: str, blob: Blob, count: int) -> float:
    """Start `count` curl downloads at once; returns the wall time until all finished."""
    call = CurlCall("GET", blob_url(target, repo, blob.digest), follow=True)
    header_files = [target.scratch / f"parallel{i}.headers" for i in range(count)]
    procs: list[subprocess.Popen[str]] = []
    try:
        start = time.perf_counter()
        for header_file in header_files:
            argv = call.argv(header_file, "/dev/null")
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        outputs = [proc.communicate()[0] for proc in procs]
        wall = time.perf_counter() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out, header_file in zip(procs, outputs, header_files, strict=True):
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
        result = curl_result(call, done, header_file, b"")
        check_status(call, result, 200, diagnose_get(call.url) if result.status != 200 else b"")
        if result.size_download != blob.size:
            raise RequestFailed(call.describe(), f"  200 but {result.size_download} bytes")
    return wall


@dataclass(frozen=True)
class ImageParts:
    """A config and a layer pushed to a registry, for manifests that refer to them."""

    config: bytes
    layer: bytes

    def manifest(self, note: str | None = None) -> bytes:
        """An OCI image manifest of the two; `note` (an annotation) makes each one distinct."""
        doc: dict[str, object] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(self.config),
                "size": len(self.config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(self.layer),
                    "size": len(self.layer),
                }
            ],
        }
        if note is not None:
            doc["annotations"] = {"org.example.bench": note}
        return json.dumps(doc, separators=(",", ":")).encode()


def image_parts(target: Target, repo: str) -> ImageParts:
    """Push a random layer and its config to `repo`."""
    layer = os.urandom(4096)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]},
        }
    ).encode()
    base = target.server.base_url
    push_small_blob(base, repo, config)
    push_small_blob(base, repo, layer)
    return ImageParts(config, layer)


def push_image(target: Target, repo: str, tag: str) -> str:
    """Push config + layer blobs and an OCI image manifest under `tag`; return its digest."""
    body = image_parts(target, repo).manifest()
    url = target.url(f"/v2/{repo}/manifests/{tag}")
    http_request("PUT", url, {"Content-Type": OCI_MANIFEST}, body, expect=(201,))
    return sha256_digest(body)


def check_manifest(url: str, digest: str) -> None:
    response = http_request("GET", url, {"Accept": OCI_MANIFEST}, expect=(200,))
    if sha256_digest(response.body) != digest:
        raise RequestFailed(
            describe_request("GET", url, [f"Accept: {OCI_MANIFEST}"], "0 bytes"),
            describe_response(response.status, response.headers, response.body)
            + f"\n  (body sha256 {sha256_digest(response.body)} != pushed {digest})",
        )


def run_wrk(url: str, seconds: int, connections: int) -> float:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", f"Accept: {OCI_MANIFEST}"]
    proc = subprocess.run([*argv, check_loopback(url)], capture_output=True, text=True)
    match = re.search(r"Requests/sec:\s*([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", proc.stdout)
    if bad:
        raise BenchError(f"wrk saw {bad.group(1)} error responses:\n{proc.stdout}")
    errors = re.search(r"Socket errors:.*", proc.stdout)
    if errors:
        log(f"wrk {errors.group(0)}")
    return float(match.group(1))


# ------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    label: str
    runs: int
    measure: Callable[[Target, int], float]  # (target, run index) -> value, higher is better
    prepare: Callable[[Target], None] = lambda _target: None


def make_figures(data: TestData, sizes: Sizes) -> list[Figure]:
    big, par, n = human_size(sizes.blob), human_size(sizes.parallel_blob), sizes.parallel_pulls
    runs = sizes.runs

    def push_mono(target: Target, run: int) -> float:
        blob = data.monolithic[run]
        seconds = push_monolithic(target, "bench/push", blob)
        target.pushed = blob
        return blob.size / MB / seconds

    def push_chunks(target: Target, run: int) -> float:
        blob = data.chunked[run]
        return blob.size / MB / push_chunked(target, "bench/chunked", blob)

    def prepare_pull(target: Target) -> None:
        if target.pushed is None:
            raise BenchError("skipped: the monolithic push did not succeed")
        verify_blob(blob_url(target, "bench/push", target.pushed.digest), target.pushed)

    def pull(target: Target, _run: int) -> float:
        assert target.pushed is not None
        return target.pushed.size / MB / pull_once(target, "bench/push", target.pushed)

    def prepare_manifest(target: Target) -> None:
        digest = push_image(target, "bench/image", "latest")
        check_manifest(target.url("/v2/bench/image/manifests/latest"), digest)

    def manifest_rps(target: Target, _run: int) -> float:
        url = target.url("/v2/bench/image/manifests/latest")
        return run_wrk(url, sizes.wrk_seconds, sizes.wrk_connections)

    def prepare_parallel(target: Target) -> None:
        push_monolithic(target, "bench/parallel", data.parallel)
        verify_blob(blob_url(target, "bench/parallel", data.parallel.digest), data.parallel)

    def parallel(target: Target, _run: int) -> float:
        seconds = parallel_pulls(target, "bench/parallel", data.parallel, n)
        return n * data.parallel.size / MB / seconds

    def prepare_writes(target: Target) -> None:
        target.image = image_parts(target, "bench/writes")

    def manifest_puts(target: Target, run: int) -> float:
        assert target.image is not None
        session = Session(target.server.base_url)
        try:
            start = time.perf_counter()
            for i in range(sizes.small_writes):
                body = target.image.manifest(f"{run}-{i}")
                session.request(
                    "PUT",
                    f"/v2/bench/writes/manifests/r{run}-{i}",
                    {"Content-Type": OCI_MANIFEST},
                    body,
                    201,
                )
            return sizes.small_writes / (time.perf_counter() - start)
        finally:
            session.close()

    def small_blob_pushes(target: Target, run: int) -> float:
        session = Session(target.server.base_url)
        blobs = [os.urandom(4096) for _ in range(sizes.small_writes)]
        try:
            start = time.perf_counter()
            for blob in blobs:
                opened = session.request("POST", "/v2/bench/small/blobs/uploads/", {}, b"", 202)
                location = urllib.parse.urlsplit(header(opened.headers, "Location") or "")
                query = location.query + ("&" if location.query else "")
                query += "digest=" + urllib.parse.quote(sha256_digest(blob))
                session.request(
                    "PUT", f"{location.path}?{query}", {"Content-Type": OCTET}, blob, 201
                )
            return sizes.small_writes / (time.perf_counter() - start)
        finally:
            session.close()

    chunk = human_size(sizes.chunk)
    conns = sizes.wrk_connections
    writes = sizes.small_writes
    return [
        Figure(f"push {big} blob, single PUT (MB/s)", runs, push_mono),
        Figure(f"push {big} blob, PATCH {chunk} chunks + PUT (MB/s)", runs, push_chunks),
        Figure(f"pull {big} blob (MB/s)", runs, pull, prepare_pull),
        Figure(
            f"manifest GET by tag, {conns} conns, {sizes.wrk_seconds} s (req/s)",
            runs,
            manifest_rps,
            prepare_manifest,
        ),
        Figure(
            f"{n} parallel pulls of {par} blob (aggregate MB/s)", runs, parallel, prepare_parallel
        ),
        Figure(
            f"manifest PUT with a new tag, 1 client, {writes} in a row (req/s)",
            runs,
            manifest_puts,
            prepare_writes,
        ),
        Figure(
            f"push 4 KiB blob, POST + PUT, 1 client, {writes} in a row (blobs/s)",
            runs,
            small_blob_pushes,
        ),
    ]


@dataclass
class Outcome:
    values: list[float] = field(default_factory=list)
    error: str | None = None
    server_log: str = ""  # what the registry logged during the failing step

    def cell(self) -> str:
        if self.error is not None:
            return "FAILED"
        return f"{statistics.median(self.values):.1f}" if self.values else "-"


Results = dict[str, dict[str, Outcome]]  # figure label -> target name -> outcome


def measure(figure: Figure, target: Target, run: int, outcome: Outcome) -> None:
    value = figure.measure(target, run)
    outcome.values.append(value)
    log(f"{target.name}: {figure.label} run {run + 1}/{figure.runs}: {value:.1f}")


def log_since(path: Path, offset: int, lines: int = 40) -> str:
    """Server log written since offset, without access-log lines (to explain a failure)."""
    with path.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode("utf-8", errors="replace")
    kept = [line for line in text.splitlines() if not ACCESS_LINE.search(line)]
    return "\n".join(kept[-lines:]) or "<nothing but access-log lines>"


def attempt(figure: Figure, target: Target, outcome: Outcome, step: Callable[[], None]) -> None:
    """Run one step unless this target already failed this figure; record a failure."""
    if outcome.error is not None:
        return
    log_path = target.server.log_path
    offset = log_path.stat().st_size
    try:
        step()
    except BenchError as exc:
        outcome.error = str(exc)
        outcome.server_log = log_since(log_path, offset)
        log(f"{target.name}: {figure.label}: FAILED\n{exc}\nserver log:\n{outcome.server_log}")


def run_figure(figure: Figure, targets: Sequence[Target]) -> dict[str, Outcome]:
    outcomes = {t.name: Outcome() for t in targets}
    for target in targets:
        attempt(figure, target, outcomes[target.name], partial(figure.prepare, target))
    for run in range(figure.runs):  # alternate targets run by run to spread any drift
        for target in targets:
            outcome = outcomes[target.name]
            attempt(figure, target, outcome, partial(measure, figure, target, run, outcome))
    return outcomes


def run_workload(targets: Sequence[Target], figures: Sequence[Figure]) -> Results:
    return {figure.label: run_figure(figure, targets) for figure in figures}


# ------------------------------------------------------------------------- reports


def machine_description() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    meminfo = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    mem = f"{int(meminfo.group(1)) / MIB:.1f} GiB RAM" if meminfo else "unknown RAM"
    cpus = len(os.sched_getaffinity(0))
    cpu = model.group(1).strip() if model else platform.processor() or "unknown CPU"
    return f"nproc {cpus}, {cpu}, {mem}, Linux {platform.release()}"


def filesystem_of(path: Path) -> str:
    best, device = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, mount = line.split()[:2]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, device = mount, dev
    return f"{device} mounted on {best or '/'}"


def tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{exc}>"
    words = (proc.stdout + proc.stderr).split()
    return " ".join(words[:2]) if argv[0] != "docker-registry" else " ".join(words[1:3])


def render_table(results: Results, names: Sequence[str]) -> str:
    """One row per figure; with several registries, each one's ratio to the last (the anchor)."""
    anchor, others = names[-1], list(names[:-1])
    head = ["figure", *names] + [f"ratio {name}/{anchor}" for name in others]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, outcomes in results.items():
        cells = [outcomes[name].cell() for name in names]
        b = outcomes[anchor]
        for name in others:
            a = outcomes[name]
            ok = a.values and b.values and a.error is None and b.error is None
            quotient = statistics.median(a.values) / statistics.median(b.values) if ok else None
            cells.append(f"{quotient:.2f}" if quotient is not None else "-")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def render_failures(results: Results) -> str:
    parts = []
    for label, outcomes in results.items():
        for name, outcome in outcomes.items():
            if outcome.error is not None:
                parts.append(f"**{name}: {label}**\n\n```\n{outcome.error}\n```")
                parts.append(f"{name} log during that step:\n\n```\n{outcome.server_log}\n```")
    return "\n\n".join(parts)


def render_report(results: Results, names: Sequence[str], context: dict[str, str]) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Registry benchmark, {now}", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", render_table(results, names), ""]
    failures = render_failures(results)
    if failures:
        lines += ["### Failures", "", failures, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skyreg-workers", type=int, help="passed to skyreg as --workers")
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    parser.add_argument("--markdown", type=Path, help="append the results table to FILE")
    parser.add_argument("--only", choices=("skyreg", "distribution"), help="run one registry")
    parser.add_argument(
        "--sqlite-synchronous",
        choices=("full", "normal", "both"),
        default="full",
        help="passed to skyreg as --sqlite-synchronous; both: one skyreg of each, side by side "
        "(what durable commits cost)",
    )
    parser.add_argument(
        "--tmp-dir", type=Path, help="parent of the temporary directory (default: system temp)"
    )
    parser.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="disable per-request access logs in both registries (default: both log)",
    )
    parser.add_argument(
        "--skyreg-is-distribution",
        action="store_true",
        help="development aid: a second docker-registry stands in for skyreg (ratios ~1)",
    )
    return parser.parse_args(argv)


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup in main()


def start_targets(stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path) -> list[Target]:
    servers: list[Server] = []
    access_log = args.access_log
    if args.only != "distribution":
        if args.skyreg_is_distribution:
            servers.append(start_distribution(stack, "distribution#2", tmp / "skyreg", access_log))
        else:
            modes = (
                ["full", "normal"]
                if args.sqlite_synchronous == "both"
                else [args.sqlite_synchronous]
            )
            for mode in modes:
                name = "skyreg" if mode == "full" else f"skyreg ({mode})"
                workdir = tmp / ("skyreg" if mode == "full" else f"skyreg-{mode}")
                server = start_skyreg(stack, workdir, args.skyreg_workers, access_log, mode, name)
                servers.append(server)
    if args.only != "skyreg":
        servers.append(start_distribution(stack, "distribution", tmp / "distribution", access_log))
    for server in servers:
        log(f"{server.name} ready at {server.base_url} (pid {server.proc.pid})")
    targets = [Target(server, tmp / "scratch" / server.name) for server in servers]
    for target in targets:
        target.scratch.mkdir(parents=True)
    return targets


def report_context(
    args: argparse.Namespace, sizes: Sizes, tmp: Path, load_before: float
) -> dict[str, str]:
    load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (1-min load average)"
    return {
        "command": f"`{shlex.join([sys.executable, *sys.argv])}`",
        "machine": machine_description(),
        "machine load": load,
        "temp dir (test data and both registries' storage)": f"{tmp} on {filesystem_of(tmp)}",
        "distribution": tool_version(["docker-registry", "--version"]),
        "skyreg workers": str(args.skyreg_workers) if args.skyreg_workers else "default",
        "skyreg --sqlite-synchronous": args.sqlite_synchronous,
        "access logs": "on in both registries" if args.access_log else "off in both registries",
        "clients": f"{tool_version(['curl', '--version'])}; {tool_version(['wrk', '-v'])}",
        "method": f"median of {sizes.runs} runs per figure, alternating registries; "
        "MB = 10^6 bytes; higher is better everywhere",
    }


@contextlib.contextmanager
def temp_dir(parent: Path | None, prefix: str = "registry-bench-") -> Iterator[Path]:
    """A temporary directory under `parent` (None: the system's), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()[0]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, exit_on_signal)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(temp_dir(args.tmp_dir))
        log(f"temp dir {tmp} on {filesystem_of(tmp)}")
        data = make_test_data(tmp / "data", sizes)
        targets = start_targets(stack, args, tmp)
        results = run_workload(targets, make_figures(data, sizes))
        names = [t.name for t in targets]
        context = report_context(args, sizes, tmp, load_before)
        report = render_report(results, names, context)
    print(report)
    if args.markdown:
        with args.markdown.open("a") as out:
            out.write(report + "\n")
    return 1 if "### Failures" in report else 0


def run_cli(main: Callable[[Sequence[str]], int]) -> int:
    """A bench's entry point around its `main`: exit 2 when a server could not be started or
    data generated (BenchError), 130 on Ctrl-C (servers and temp dirs are cleaned up by then)."""
    try:
        return main(sys.argv[1:])
    except BenchError as exc:
        log(f"aborted: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted; servers stopped and temp dirs removed")
        return 130


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
