"""Several regions on one machine: a `skyreg serve` node per region, each with its own blob
directory, over one metadata database — pushes land where they are made, pulls from elsewhere
go through, and the replication queue copies images ahead of machines."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from skyreg.client.push import push_image
from tests.support.images import Entry, build_app_image
from tests.support.regions import Regions, running_regions, sha256
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

CODES = ("iad", "sin", "syd")
RTT = {("iad", "sin"): 230, ("iad", "syd"): 200, ("sin", "syd"): 95}
LEASE_ARGS = ["--replication-lease", "2.0"]  # seconds: a killed node's job is claimable again soon


class Throttle:
    """A TCP proxy on 127.0.0.1 passing at most `rate` bytes/s from the target to the client:
    a slow link, so a transfer can be caught (and its node killed) in the middle."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Throttle:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await src.read(16384):
                    dst.write(data)
                    await dst.drain()
                    if slow:
                        await asyncio.sleep(len(data) / self.rate)
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))


@pytest.fixture(scope="module")
def region_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Regions]:
    """The three regions' nodes, started once for the module's tests (`regions` hands them
    over fresh to each)."""
    top = tmp_path_factory.mktemp("regions")
    with running_regions(top, CODES, rtt_ms=RTT, extra_args=LEASE_ARGS) as r:
        yield r


@pytest.fixture
def regions(region_nodes: Regions) -> Regions:
    """Every region's node running, on the regions file as first written, app web on its default
    placement (no regions, no copies ahead), logs and counters counted from this test's start
    (blobs are random: no test sees another's)."""
    r = region_nodes
    if r.peer_urls:
        r.peer_urls.clear()
        r.write_regions()  # nodes re-read it on their next use
    for code in r.codes:
        if not r.running(code):
            r.start(code)
    r.api("iad", "PATCH", "/apps/web", json={"regions": [], "replicate_ahead": False})
    r.mark()
    return r


def test_a_pull_in_another_region_goes_through_once_then_is_local(regions: Regions) -> None:
    data = os.urandom(3 << 20)
    digest = regions.put_blob("iad", "web", data)
    got = regions.get_blob("syd", "web", digest)
    assert got.status_code == 200 and got.content == data
    assert got.headers["Docker-Content-Digest"] == digest
    assert regions.metric("syd", "skyreg_transfer_bytes_in_total") == len(data)
    assert regions.peer_fetches("iad", digest) == 1

    again = regions.get_blob("syd", "web", digest)
    assert again.content == data
    assert regions.peer_fetches("iad", digest) == 1  # local now: iad was not asked again
    assert regions.metric("syd", "skyreg_transfer_bytes_in_total") == len(data)
    ranged = regions.get_blob("syd", "web", digest, Range="bytes=100-199")
    assert ranged.status_code == 206 and ranged.content == data[100:200]
    stored = regions.top / "syd" / "data" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert stored.read_bytes() == data  # in syd's own blob directory


def test_concurrent_pulls_of_a_missing_blob_share_one_transfer(regions: Regions) -> None:
    data = os.urandom(8 << 20)
    digest = regions.put_blob("iad", "web", data)
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def pull() -> None:
        barrier.wait()
        results.append(regions.get_blob("sin", "web", digest).content)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r == data for r in results)
    assert regions.peer_fetches("iad", digest) == 1
    assert regions.metric("sin", "skyreg_transfer_bytes_in_total") == len(data)


def test_pull_falls_back_to_another_region_and_fails_clearly_when_none_answers(
    regions: Regions,
) -> None:
    data = os.urandom(1 << 20)
    digest = regions.put_blob("iad", "web", data)
    assert regions.get_blob("sin", "web", digest).content == data  # now in iad and sin
    regions.nodes["sin"].stop()  # syd's nearest holder (95 ms) is down
    got = regions.get_blob("syd", "web", digest)
    assert got.status_code == 200 and got.content == data  # from iad instead
    assert regions.peer_fetches("iad", digest) == 2  # sin's copy, then syd's

    lonely = os.urandom(1 << 20)
    only_in_iad = regions.put_blob("iad", "web", lonely)
    regions.nodes["iad"].stop()
    failed = regions.get_blob("syd", "web", only_in_iad)
    assert failed.status_code == 503
    body = failed.json()["errors"][0]
    assert body["code"] == "UNAVAILABLE" and "iad" not in body["message"]
    assert "iad" in regions.log("syd")  # the regions tried are in the log


def test_a_blob_this_region_lacks_is_refused_to_other_regions_and_unavailable_without_holders(
    regions: Regions,
) -> None:
    """The exact answers (geo/'s domain errors, shaped by registry/app.py): a node asked by
    another region's node never chains a pull-through; none answering is a 503 naming no region."""
    data = os.urandom(1 << 10)
    digest = regions.put_blob("iad", "web", data)
    peer = {"X-Skyreg-Peer": "sin"}
    not_here = json.dumps(
        {
            "errors": [
                {
                    "code": "BLOB_UNKNOWN",
                    "message": f"blob {digest} is not in this region",
                    "detail": {"digest": digest},
                }
            ]
        }
    ).encode()
    chained = regions.get_blob("syd", "web", digest, **peer)
    assert chained.status_code == 404 and chained.content == not_here
    url = f"{regions.url('syd')}/v2/web/blobs/{digest}"
    head = requests.head(url, auth=("x", regions.admin), headers=peer, timeout=60)
    assert head.status_code == 404 and head.content == b""
    head = requests.head(url, auth=("x", regions.admin), timeout=60)  # answered, nothing fetched
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
    assert regions.peer_fetches("iad", digest) == 0

    regions.nodes["iad"].stop()
    failed = regions.get_blob("syd", "web", digest)
    message = f"blob {digest} cannot be fetched from the regions holding it right now"
    unavailable = {"code": "UNAVAILABLE", "message": message, "detail": {"digest": digest}}
    assert failed.status_code == 503
    assert failed.content == json.dumps({"errors": [unavailable]}).encode()


def test_a_node_killed_mid_replication_finishes_the_job_after_restart(regions: Regions) -> None:
    data = os.urandom(24 << 20)
    digest = regions.put_blob("iad", "web", data)
    with Throttle(regions.ports["iad"], rate=4 << 20) as slow:  # ~6 s for the blob
        regions.peer_urls["syd"] = {"iad": f"http://127.0.0.1:{slow.port}"}
        regions.write_regions()
        regions.api("iad", "PATCH", "/apps/web", json={"regions": ["syd"], "replicate_ahead": True})
        push_manifest(regions, digest, len(data))  # a tagged push queues the copy to syd
        uploads = regions.top / "syd" / "data" / "uploads"

        def partial() -> bool:
            return any(p.stat().st_size > (1 << 20) for p in uploads.glob("*") if p.is_file())

        wait_for(partial, "syd's copy under way")
        regions.nodes["syd"].stop(9)  # SIGKILL mid-transfer
        status = regions.api("iad", "GET", "/replication")
        job = next(j for j in status["recent"] if (j["digest"], j["region"]) == (digest, "syd"))
        assert job["state"] == "running"
        assert regions.get_blob("sin", "web", digest).content == data  # other regions unaffected
        regions.start("syd")

        def done() -> bool:
            jobs = regions.api("iad", "GET", "/replication")["recent"]
            return any(
                (j["digest"], j["region"], j["state"]) == (digest, "syd", "done") for j in jobs
            )

        wait_for(done, "the job finished by the restarted node", timeout=120)
        jobs = regions.api("iad", "GET", "/replication")["recent"]
        job = next(j for j in jobs if (j["digest"], j["region"]) == (digest, "syd"))
        assert job["attempts"] >= 2  # claimed again after the kill (sin, nearer, has it by now)
    stored = regions.top / "syd" / "data" / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert sha256(stored.read_bytes()) == digest
    assert "syd" in regions.image("iad", "web", "v1")["blobs"][1]["regions"]


def push_manifest(regions: Regions, layer_digest: str, layer_size: int) -> str:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                         "diff_ids": []}}).encode()  # fmt: skip
    config_digest = regions.put_blob("iad", "web", config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": layer_size,
                }
            ],
        }
    ).encode()
    r = requests.put(
        f"{regions.url('iad')}/v2/web/manifests/v1",
        data=manifest,
        auth=("x", regions.admin),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    return sha256(manifest)


def test_a_deploy_copies_the_image_to_its_regions(regions: Regions, tmp_path: Path) -> None:
    image = build_app_image(
        "regions",
        [Entry("www", "dir", mode=0o755), Entry("www/index.html", "file", data=b"far\n")],
        cmd=["/bin/sh", "-c", "exit 0"],
    )
    layout = image.write_oci_layout(tmp_path / "layout")
    push_image(layout, f"127.0.0.1:{regions.ports['iad']}/web:v2", regions.admin)
    shown = regions.image("iad", "web", "v2")
    assert shown["regions"]["iad"]["complete"] is True
    assert shown["regions"]["sin"]["complete"] is False
    release = regions.api(
        "iad", "POST", "/apps/web/releases", json={"image": "web:v2", "regions": ["sin", "syd"]}
    )
    assert release["regions"] == ["sin", "syd"]

    def complete() -> bool:
        got = regions.image("syd", "web", "v2")["regions"]
        return bool(got["sin"]["complete"] and got["syd"]["complete"])

    wait_for(complete, "the image complete in sin and syd")
    for code in ("sin", "syd"):
        for blob in shown["blobs"]:
            stored = regions.top / code / "data" / "blobs" / "sha256" / blob["digest"][7:9]
            assert sha256((stored / blob["digest"][7:]).read_bytes()) == blob["digest"]
    bad = requests.post(
        f"{regions.url('iad')}/api/v1/apps/web/releases",
        json={"image": "web:v2", "regions": ["mars"]},
        auth=("x", regions.admin),
        timeout=30,
    )
    assert bad.status_code == 400 and "mars" in bad.json()["error"]["message"]


def test_a_region_with_its_own_s3_bucket_takes_copies_into_it(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    s3 = request.getfixturevalue("seaweedfs")
    bucket = f"syd-{os.urandom(6).hex()}"
    s3.client().create_bucket(Bucket=bucket)
    r = Regions.on_free_ports(tmp_path, CODES, rtt_ms=RTT, extra_args=LEASE_ARGS)
    r.storage["syd"] = (
        ["--storage", f"s3://{bucket}/syd", "--s3-endpoint", s3.endpoint],
        s3.aws_env(),
    )
    r.write_regions()
    try:
        r.start_all()
        r.api("iad", "POST", "/orgs", json={"name": "acme"})
        r.api("iad", "POST", "/apps", json={"name": "web", "org": "acme"})
        data = os.urandom(12 << 20)  # more than one S3 part
        digest = r.put_blob("iad", "web", data)
        got = r.get_blob("syd", "web", digest)
        assert got.status_code == 200 and got.content == data
        head = s3.client().head_object(
            Bucket=bucket, Key=f"syd/blobs/sha256/{digest[7:9]}/{digest[7:]}"
        )
        assert head["ContentLength"] == len(data)  # in syd's bucket before the last byte came
        ranged = r.get_blob("syd", "web", digest, Range="bytes=5000000-5000009")
        assert ranged.status_code == 206 and ranged.content == data[5000000:5000010]
        assert r.peer_fetches("iad", digest) == 1  # the range came from syd's own bucket
        assert not (tmp_path / "syd" / "data" / "blobs").exists()
    finally:
        r.stop_all()
