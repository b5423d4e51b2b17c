"""`skyreg push`: docker-archives and OCI layouts pushed to a real `skyreg serve` with auth on."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from skyreg.cli.push import push_with_bars
from skyreg.client import push as push_module
from skyreg.client.imagesource import GzipDigestCache, detect_source, gzip_stream
from skyreg.client.push import PushError, PushResult, Task, parse_reference, push_image
from tests.support.images import (
    TestImage,
    build_image,
    build_platform_pair,
    gzip_bytes,
    write_oci_layout,
)
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST, OCI_INDEX, sha256
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry

ACCEPT = ", ".join(
    [
        DOCKER_MANIFEST,
        OCI_INDEX,
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@dataclass
class Setup:
    server: ServedRegistry
    token: str  # deploy token of app "web" in org "acme"

    @property
    def host(self) -> str:
        return self.server.host


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    server = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("push") / "data", options={"access_log": True}
    )
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        tenancy.app("web", "acme")
        tenancy.app("other", "acme")
        tenancy.org("zeta")
        tenancy.app("foreign", "zeta")
        secret, _ = tenancy.token("deploy", org="acme", app="web")
        yield Setup(server, secret)
    finally:
        server.stop()


@pytest.fixture
def cache(tmp_path: Path) -> GzipDigestCache:
    return GzipDigestCache(tmp_path / "cache" / "gzip-layers.json")


def repo() -> str:
    return f"web/{uuid.uuid4().hex[:10]}"


def get(setup: Setup, path: str, **headers: str) -> requests.Response:
    r = requests.get(
        f"{setup.server.url}{path}", auth=("x", setup.token), headers=headers, timeout=30
    )
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r


def check_docker_push(setup: Setup, name: str, tag: str, image: TestImage, digest: str) -> None:
    """The tag's manifest is Docker schema 2 and its blobs are the archive's config and layers."""
    r = get(setup, f"/v2/{name}/manifests/{tag}", Accept=ACCEPT)
    assert r.headers["Content-Type"] == DOCKER_MANIFEST
    assert sha256(r.content) == digest == r.headers["Docker-Content-Digest"]
    manifest = r.json()
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert manifest["config"]["digest"] == image.config_digest
    config = get(setup, f"/v2/{name}/blobs/{image.config_digest}").content
    assert config == image.config
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    assert len(manifest["layers"]) == len(image.layers) == len(diff_ids)
    for desc, layer, diff_id in zip(manifest["layers"], image.layers, diff_ids, strict=True):
        assert desc["mediaType"] == DOCKER_LAYER
        blob = get(setup, f"/v2/{name}/blobs/{desc['digest']}").content
        assert sha256(blob) == desc["digest"] and len(blob) == desc["size"]
        tar = gzip.decompress(blob)
        assert tar == layer.tar
        assert sha256(tar) == diff_id


def access_log_since(setup: Setup, offset: int, last: str | None = None) -> list[str]:
    """Access-log lines written since `offset`; with `last`, once a line containing it is there
    (the server logs a request after its response went out, so the client can be faster)."""
    deadline = time.monotonic() + 10
    while True:
        lines = setup.server.log()[offset:].splitlines()
        if last is None or any(last in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- docker-archive ------------------------------------------------------------------------------


def test_cli_pushes_a_plain_docker_archive(setup: Setup, tmp_path: Path) -> None:
    image = build_image(f"plain-{uuid.uuid4().hex}")
    archive = image.write_docker_archive(tmp_path / "image.tar", ["example.com/web:dev"])
    name = repo()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        SKYREG_TOKEN=setup.token,
        COLUMNS="120",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "push", str(archive), f"{setup.host}/{name}:v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    reference, _, digest = proc.stdout.strip().partition("@")
    assert reference == f"{setup.host}/{name}"
    assert "2 layer(s) uploaded, 0 already present" in proc.stderr
    check_docker_push(setup, name, "v1", image, digest)
    assert (tmp_path / "cache" / "skyreg" / "gzip-layers.json").is_file()


def test_gzipped_archive_through_a_result_symlink(
    setup: Setup, tmp_path: Path, cache: GzipDigestCache
) -> None:
    image = build_image(f"gz-{uuid.uuid4().hex}")
    plain = image.write_docker_archive(tmp_path / "image.tar")
    store = tmp_path / "nix" / "store" / "abc-docker-image-web.tar.gz"
    store.parent.mkdir(parents=True)
    store.write_bytes(gzip_bytes(plain.read_bytes()))
    result = tmp_path / "result"
    result.symlink_to(store)
    name = repo()
    pushed = push_image(result, f"{setup.host}/{name}:v1", setup.token, cache=cache)
    assert (pushed.layers_uploaded, pushed.layers_skipped) == (2, 0)
    assert pushed.media_type == DOCKER_MANIFEST
    assert pushed.reference == f"{setup.host}/{name}@{pushed.digest}"
    check_docker_push(setup, name, "v1", image, pushed.digest)
    # The same bytes give the same digests: the plain tarball pushes the identical manifest.
    again = push_image(f"docker-archive:{plain}", f"{setup.host}/{name}:v2", setup.token)
    assert again.digest == pushed.digest


def test_second_push_skips_every_layer(
    setup: Setup, tmp_path: Path, cache: GzipDigestCache
) -> None:
    image = build_image(f"again-{uuid.uuid4().hex}")
    archive = tmp_path / "image.tar.gz"
    archive.write_bytes(gzip_bytes(image.write_docker_archive(tmp_path / "i.tar").read_bytes()))
    name = repo()
    first = push_image(archive, f"{setup.host}/{name}:v1", setup.token, cache=cache)
    assert (first.layers_uploaded, first.layers_skipped) == (2, 0)

    # Warm cache (no compressing to learn digests) and cold cache (compress, then ask): either
    # way every blob is found and nothing is uploaded.
    for label, layer_cache in (("warm", cache), ("cold", GzipDigestCache(None))):
        offset = len(setup.server.log())
        second = push_with_bars(
            archive, f"{setup.host}/{name}:v2", setup.token, bars=True, cache=layer_cache
        )
        assert (second.layers_uploaded, second.layers_skipped) == (0, 2), label
        assert second.bytes_uploaded == 0
        assert second.digest == first.digest
        lines = access_log_since(setup, offset, last=f'"PUT /v2/{name}/manifests/v2')
        assert any(f'"HEAD /v2/{name}/blobs/' in line for line in lines), lines
        uploads = [
            line
            for line in lines
            if '"PATCH ' in line or '"POST ' in line or ('"PUT ' in line and "/blobs/" in line)
        ]
        assert uploads == [], (label, uploads)
        assert any(f'"PUT /v2/{name}/manifests/v2' in line for line in lines)


# -- OCI layout ----------------------------------------------------------------------------------


def test_oci_layout_pushes_the_exact_manifest(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small PATCH pieces: the busybox layer (about 1 MB) goes up in several requests.
    monkeypatch.setattr(push_module, "PATCH_SIZE", 256 * 1024)
    image = build_image(f"oci-{uuid.uuid4().hex}")
    layout = image.write_oci_layout(tmp_path / "layout", tag="v1")
    name = repo()
    offset = len(setup.server.log())
    pushed = push_image(layout, f"{setup.host}/{name}:latest", setup.token)
    assert pushed.digest == image.manifest_digest
    assert pushed.media_type == image.manifest_media_type
    assert (pushed.layers_uploaded, pushed.layers_skipped) == (2, 0)
    r = get(setup, f"/v2/{name}/manifests/latest", Accept=ACCEPT)
    assert r.content == image.manifest
    for digest, data in image.blobs().items():
        if digest != image.manifest_digest:
            assert get(setup, f"/v2/{name}/blobs/{digest}").content == data
    patches = [line for line in access_log_since(setup, offset) if '"PATCH ' in line]
    assert len(patches) >= 5, patches


def test_oci_layout_with_an_index_and_a_ref(setup: Setup, tmp_path: Path) -> None:
    host_image, other_image = build_platform_pair(f"idx-{uuid.uuid4().hex}")
    single = build_image(f"single-{uuid.uuid4().hex}")
    layout = write_oci_layout(
        tmp_path / "layout", [("single", single)], indexes=[("multi", [host_image, other_image])]
    )
    name = repo()
    with pytest.raises(PushError, match="holds 2 images: pick one with --ref"):
        push_image(layout, f"{setup.host}/{name}:x", setup.token)
    pushed = push_image(f"oci:{layout}:multi", f"{setup.host}/{name}:x", setup.token)
    assert pushed.media_type == OCI_INDEX
    index = get(setup, f"/v2/{name}/manifests/x", Accept=ACCEPT).content
    assert sha256(index) == pushed.digest
    for child in (host_image, other_image):
        got = get(setup, f"/v2/{name}/manifests/{child.manifest_digest}", Accept=ACCEPT)
        assert got.content == child.manifest
    # The busybox layer is shared by both platforms: uploaded once.
    assert (pushed.layers_uploaded, pushed.layers_skipped) == (3, 0)
    by_ref = push_image(layout, f"{setup.host}/{name}:one", setup.token, ref="single")
    assert by_ref.digest == single.manifest_digest
    assert by_ref.layers_skipped == 1  # busybox is already in this repository


# -- authentication and errors -------------------------------------------------------------------


def test_pushing_where_the_token_may_not_write_is_denied(setup: Setup, tmp_path: Path) -> None:
    image = build_image(f"denied-{uuid.uuid4().hex}")
    archive = image.write_docker_archive(tmp_path / "image.tar")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    # "other" is in the token's org (it may pull, not push): the upload is refused.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyreg",
            "push",
            "--quiet",
            "--token",
            setup.token,
            str(archive),
            f"{setup.host}/other:v1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "DENIED: requested access to the resource is denied" in proc.stderr
    # Another org's app: refused before anything is uploaded (the HEAD already is).
    with pytest.raises(PushError, match="DENIED: requested access to the resource is denied"):
        push_image(archive, f"{setup.host}/foreign:v1", setup.token)
    with pytest.raises(PushError, match=r"UNAUTHORIZED: .*invalid, expired or revoked"):
        push_image(archive, f"{setup.host}/web:v1", "skyreg_wrong")
    with pytest.raises(PushError, match=r"UNAUTHORIZED.*\(no token: pass --token"):
        push_image(archive, f"{setup.host}/web:v1", None)


def test_missing_and_unreadable_sources(setup: Setup, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYREG_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    missing = tmp_path / "result"
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "push", str(missing), f"{setup.host}/web:v1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr == f"error: {missing}: no such file or directory\n"

    missing.symlink_to(tmp_path / "gone.tar.gz")
    with pytest.raises(PushError, match=r"is a symlink to .*gone\.tar.gz, which does not exist"):
        push_image(missing, f"{setup.host}/web:v1", setup.token)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tarball" * 100)
    with pytest.raises(PushError, match=r"junk\.tar is not a readable tar archive"):
        push_image(junk, f"{setup.host}/web:v1", setup.token)
    truncated = tmp_path / "truncated.tar.gz"
    full = gzip_bytes(build_image("trunc").write_docker_archive(tmp_path / "t.tar").read_bytes())
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(PushError, match=r"cannot read .*truncated\.tar.gz"):
        push_image(truncated, f"{setup.host}/web:v1", setup.token)
    layout = tmp_path / "layout"
    layout.mkdir()
    with pytest.raises(PushError, match="not an OCI image layout"):
        push_image(layout, f"{setup.host}/web:v1", setup.token)
    with pytest.raises(PushError, match="invalid image reference"):
        push_image(junk, "web:v1", setup.token)


def test_unreachable_registry(tmp_path: Path) -> None:
    image = build_image("unreachable")
    archive = image.write_docker_archive(tmp_path / "image.tar")
    with pytest.raises(PushError, match=r"cannot reach 127\.0\.0\.1:1"):
        push_image(archive, "127.0.0.1:1/web:v1", "t")


# -- the Bearer challenge flow, through a proxy that hides Basic credentials from /v2/ -----------


class _Proxy(BaseHTTPRequestHandler):
    """Forwards to skyreg but drops Basic credentials on /v2/ (like registries that only take
    Bearer tokens there); records the Authorization schemes it forwarded."""

    upstream = ""
    seen: list[tuple[str, str, str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("transfer-encoding", "content-length", "connection")
        }
        auth = headers.get("Authorization", "")
        if self.path.startswith("/v2") and auth.startswith("Basic "):
            del headers["Authorization"]
            auth = ""
        self.seen.append((self.command, self.path, auth.partition(" ")[0]))
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() == "www-authenticate":  # as skyreg would say with --public-url = us
                v = v.replace(f"//{self.upstream}/", f"//{self.headers['Host']}/")
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _forward


def test_bearer_challenge_flow(setup: Setup, tmp_path: Path) -> None:
    _Proxy.upstream = setup.host
    _Proxy.seen = []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        image = build_image(f"bearer-{uuid.uuid4().hex}")
        archive = image.write_docker_archive(tmp_path / "image.tar")
        name = repo()
        target = f"127.0.0.1:{proxy.server_address[1]}/{name}:v1"
        pushed = push_image(archive, target, setup.token)
        assert pushed.layers_uploaded == 2
        check_docker_push(setup, name, "v1", image, pushed.digest)
        token_requests = [s for s in _Proxy.seen if s[1].startswith("/auth/token")]
        assert token_requests and token_requests[0][2] == "Basic"
        assert (
            f"scope=repository%3A{name.replace('/', '%2F')}%3Apull%2Cpush" in (token_requests[0][1])
        )
        v2 = [s for s in _Proxy.seen if s[1].startswith(f"/v2/{name}/")]
        assert v2 and all(scheme == "Bearer" for _, _, scheme in v2), v2
        # Denied through the Bearer flow: the token holds no push right for "other".
        with pytest.raises(PushError, match=r"UNAUTHORIZED.*insufficient scope.*repository:other"):
            push_image(archive, target.replace(name, "other"), setup.token)
    finally:
        proxy.shutdown()
        proxy.server_close()


# -- progress ------------------------------------------------------------------------------------


class RecordedProgress:
    """A `PushProgress` keeping what it was told, per task."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, object]] = []

    def add(self, description: str, total: int | None, status: str) -> Task:
        self.tasks.append({"description": description, "total": total, "statuses": [status]})
        self.tasks[-1]["advanced"] = 0
        return len(self.tasks) - 1

    def advance(self, task: Task, n: int) -> None:
        self.tasks[task]["advanced"] = int(str(self.tasks[task]["advanced"])) + n

    def status(self, task: Task, status: str) -> None:
        statuses = self.tasks[task]["statuses"]
        assert isinstance(statuses, list)
        statuses.append(status)

    def done(self, task: Task, status: str, total: int | None = None) -> None:
        self.status(task, status)
        if total is not None:
            self.tasks[task]["total"] = total


def test_push_reports_every_blob_to_its_progress(setup: Setup, tmp_path: Path) -> None:
    image = build_image(f"progress-{uuid.uuid4().hex}")
    layout = image.write_oci_layout(tmp_path / "layout", tag="v1")
    name = repo()
    first = RecordedProgress()
    pushed = push_image(layout, f"{setup.host}/{name}:v1", setup.token, progress=first)
    sent = [t for t in first.tasks if t["statuses"] == ["waiting", "pushing", "pushed"]]
    # The config and each layer: every byte sent was reported, and each bar ends full.
    assert len(sent) == 1 + pushed.layers_uploaded, first.tasks
    assert sum(int(str(t["advanced"])) for t in sent) == pushed.bytes_uploaded
    assert all(t["advanced"] == t["total"] for t in sent), sent
    again = RecordedProgress()
    push_image(layout, f"{setup.host}/{name}:v2", setup.token, progress=again)
    assert [t["statuses"] for t in again.tasks] == [["exists", "exists"]] * len(image.layers)


# -- pure parts ----------------------------------------------------------------------------------


def test_parse_reference() -> None:
    ref = parse_reference("registry.example.com:5000/app/api:v1.2")
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (
        "registry.example.com:5000",
        "app/api",
        "v1.2",
        None,
    )
    assert parse_reference("localhost:5000/app").tag == "latest"
    digest = "sha256:" + "a" * 64
    ref = parse_reference(f"127.0.0.1:5000/app@{digest}")
    assert (ref.tag, ref.digest) == (None, digest)
    assert push_module.registry_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert push_module.registry_url("localhost") == "http://localhost"
    assert push_module.registry_url("reg.example.com") == "https://reg.example.com"
    assert push_module.registry_url("reg.example.com", insecure=True) == "http://reg.example.com"
    for bad in ("app:v1", "host/App:v1", "host/app:-v1", "host/app@sha256:12", "/app"):
        with pytest.raises(PushError, match="invalid image reference"):
            parse_reference(bad)


def test_gzip_stream_is_deterministic_and_standard() -> None:
    data = os.urandom(3 * 1024 * 1024) + b"\0" * (2 * 1024 * 1024)
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    out = b"".join(gzip_stream(chunks))
    assert gzip.decompress(out) == data
    reference = gzip.compress(data, compresslevel=6, mtime=0)
    assert out[9] == 0xFF  # OS "unknown" on every platform, so digests do not depend on it
    assert out[:9] + out[10:] == reference[:9] + reference[10:]
    assert hashlib.sha256(b"".join(gzip_stream(iter(chunks)))).digest() == (
        hashlib.sha256(out).digest()
    )


def test_detect_source_prefixes(tmp_path: Path) -> None:
    archive = build_image("detect").write_docker_archive(tmp_path / "a.tar")
    layout = build_image("detect").write_oci_layout(tmp_path / "layout", tag="v1")
    assert detect_source(archive).kind == "docker-archive"
    assert detect_source(f"docker-archive:{archive}").path == archive
    assert detect_source(layout).kind == "oci"
    src = detect_source(f"oci:{layout}:v1")
    assert (src.kind, src.path, src.ref) == ("oci", layout, "v1")


def test_push_result_is_typed() -> None:
    fields = PushResult.__dataclass_fields__
    assert {"digest", "media_type", "size", "layers_uploaded", "layers_skipped"} <= set(fields)
