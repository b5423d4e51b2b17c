"""Several stateless `skyreg serve` nodes over one S3 bucket (SeaweedFS) and one PostgreSQL
database behave as one registry — directly, and behind nginx with the example config."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.images import build_image
from tests.support.servers import RunningRegistry, scaleout_backing
from tests.support.waiting import free_port

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nginx" / "skyreg.conf"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Cluster:
    a: RunningRegistry
    b: RunningRegistry
    lb_port: int  # where nginx listens when a test puts it in front: the nodes' public URL

    @property
    def admin(self) -> str:
        return (self.a.data_dir / "admin-token").read_text().strip()

    @property
    def auth(self) -> tuple[str, str]:
        return ("x", self.admin)

    def push_blob(self, node: RunningRegistry, repo: str, data: bytes) -> str:
        digest = sha256(data)
        r = requests.post(
            f"{node.url}/v2/{repo}/blobs/uploads/",
            params={"digest": digest},
            data=data,
            auth=self.auth,
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return digest

    def push_manifest(self, node: RunningRegistry, repo: str, tag: str, layers: list[bytes]) -> str:
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": random.random()}).encode()
        descs = []
        for blob in [config, *layers]:
            descs.append({"digest": self.push_blob(node, repo, blob), "size": len(blob)})
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **descs[0]},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", **d} for d in descs[1:]
                ],
            }
        ).encode()
        r = requests.put(
            f"{node.url}/v2/{repo}/manifests/{tag}",
            data=manifest,
            auth=self.auth,
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return sha256(manifest)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with scaleout_backing(request) as (args, env):
        lb_port = free_port()  # nginx (examples/) is in front in one test
        args = [
            *args,
            "--trusted-proxy",
            "127.0.0.1",
            "--public-url",
            f"http://127.0.0.1:{lb_port}",
        ]
        a = RunningRegistry(data_dir=tmp_path / "a", extra_args=args, env=env)
        b = RunningRegistry(data_dir=tmp_path / "b", extra_args=args, env=env)
        try:
            a.start()  # creates the admin token in its data dir (and in the shared database)
            b.start()
            c = Cluster(a, b, lb_port)
            for path, body in (
                ("/orgs", {"name": "acme"}),
                ("/apps", {"name": "web", "org": "acme"}),
            ):
                r = requests.post(f"{a.url}/api/v1{path}", json=body, auth=c.auth, timeout=30)
                assert r.status_code == 201, r.text
            yield c
        finally:
            a.stop()
            b.stop()


def test_a_push_through_one_node_is_pulled_through_the_other_at_once(cluster: Cluster) -> None:
    layer = os.urandom(3 << 20)
    digest = cluster.push_manifest(cluster.a, "web", "v1", [layer])
    got = requests.get(
        f"{cluster.b.url}/v2/web/manifests/v1",
        auth=cluster.auth,
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=30,
    )
    assert got.status_code == 200 and sha256(got.content) == digest
    blob = requests.get(f"{cluster.b.url}/v2/web/blobs/{sha256(layer)}", auth=cluster.auth)
    assert blob.content == layer
    tags = requests.get(f"{cluster.b.url}/v2/web/tags/list", auth=cluster.auth).json()
    assert tags["tags"] == ["v1"]


def test_a_token_issued_by_one_node_is_honoured_by_the_other(cluster: Cluster) -> None:
    cluster.push_manifest(cluster.a, "web", "v1", [b"layer"])
    token = requests.get(
        f"{cluster.a.url}/auth/token",
        params={"service": "skyreg", "scope": "repository:web:pull"},
        auth=cluster.auth,
        timeout=30,
    ).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    r = requests.get(f"{cluster.b.url}/v2/web/tags/list", headers=bearer, timeout=30)
    assert r.status_code == 200 and r.json()["tags"] == ["v1"]
    denied = requests.get(f"{cluster.b.url}/v2/other/tags/list", headers=bearer, timeout=30)
    assert denied.status_code == 401  # the token's scope, not the node, decides


def test_a_chunked_upload_moves_between_nodes_and_survives_a_killed_node(
    cluster: Cluster,
) -> None:
    data = os.urandom(20 << 20)
    pieces = [data[i : i + (6 << 20)] for i in range(0, len(data), 6 << 20)]
    started = requests.post(f"{cluster.a.url}/v2/web/blobs/uploads/", auth=cluster.auth)
    assert started.status_code == 202
    location = started.headers["Location"]
    offset = 0
    for i, piece in enumerate(pieces[:2]):
        node = (cluster.a, cluster.b)[i % 2]  # A, then B
        r = requests.patch(
            f"{node.url}{location}",
            data=piece,
            auth=cluster.auth,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(piece) - 1}",
            },
            timeout=60,
        )
        assert r.status_code == 202, r.text
        offset += len(piece)
        location = r.headers["Location"]
    cluster.b.stop(signal.SIGKILL)  # the node that took the last chunk dies
    status = requests.get(f"{cluster.a.url}{location}", auth=cluster.auth, timeout=30)
    assert status.status_code == 204 and status.headers["Range"] == f"0-{offset - 1}"
    rest = b"".join(pieces[2:])
    r = requests.put(
        f"{cluster.a.url}{location}",
        params={"digest": sha256(data)},
        data=rest,
        auth=cluster.auth,
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    cluster.b.start()
    got = requests.get(f"{cluster.b.url}/v2/web/blobs/{sha256(data)}", auth=cluster.auth)
    assert got.status_code == 200 and got.content == data


def test_concurrent_pushes_and_tag_moves_through_two_nodes_stay_consistent(
    cluster: Cluster,
) -> None:
    tags = ["latest", "stable", "edge"]
    errors: list[BaseException] = []
    shared = os.urandom(1 << 20)  # one blob every client pushes at once

    def client(n: int) -> None:
        rng = random.Random(n)
        try:
            for i in range(6):
                node = (cluster.a, cluster.b)[(n + i) % 2]
                own = os.urandom(rng.randrange(1, 64 << 10))
                cluster.push_manifest(node, "web", rng.choice(tags), [shared, own])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    listed = requests.get(f"{cluster.b.url}/v2/web/tags/list", auth=cluster.auth).json()
    assert sorted(listed["tags"]) == sorted(tags)
    for tag in tags:
        node = random.choice((cluster.a, cluster.b))
        r = requests.get(
            f"{node.url}/v2/web/manifests/{tag}",
            auth=cluster.auth,
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        assert r.status_code == 200
        doc = r.json()
        for desc in [doc["config"], *doc["layers"]]:
            other = cluster.b if node is cluster.a else cluster.a
            blob = requests.get(f"{other.url}/v2/web/blobs/{desc['digest']}", auth=cluster.auth)
            assert blob.status_code == 200 and sha256(blob.content) == desc["digest"]
            assert len(blob.content) == desc["size"]


@pytest.fixture
def nginx(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (scripts/install-test-tools.sh installs it)")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = cluster.lb_port
    conf = (
        EXAMPLE.read_text()
        .replace("@PREFIX@", str(prefix))
        .replace("@NODE_A@", str(cluster.a.port))
        .replace("@NODE_B@", str(cluster.b.port))
        .replace("@PORT@", str(port))
    )
    (prefix / "nginx.conf").write_text(conf)
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2)
                if r.headers.get("Docker-Distribution-API-Version") == "registry/2.0":
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_skopeo_pushes_and_pulls_through_nginx_in_front_of_two_nodes(
    cluster: Cluster, nginx: str, tmp_path: Path
) -> None:
    image = build_image("scaleout")
    archive = image.write_docker_archive(tmp_path / "image.tar")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    creds = f"x:{cluster.admin}"

    def skopeo(*args: str) -> str:
        done = subprocess.run(
            ["skopeo", "--policy", str(policy), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", creds,
        f"docker-archive:{archive}", f"docker://{nginx}/web:lb",
    )  # fmt: skip
    out = tmp_path / "out"
    skopeo(
        "copy", "--src-tls-verify=false", "--src-creds", creds,
        f"docker://{nginx}/web:lb", f"dir:{out}",
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    for desc in [manifest["config"], *manifest["layers"]]:
        blob = (out / desc["digest"].removeprefix("sha256:")).read_bytes()
        assert sha256(blob) == desc["digest"] and len(blob) == desc["size"]
    config = json.loads((out / manifest["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    # Round robin spread the requests (token flow included) over both nodes.
    for node in (cluster.a, cluster.b):
        assert '"GET /v2/web/' in node.log() or '"HEAD /v2/web/' in node.log()
        assert "/auth/token" in cluster.a.log() + cluster.b.log()
