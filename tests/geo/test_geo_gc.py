"""Garbage collection across regions: a `skyreg serve` node per region over one metadata
database, each with its own blob directory and its own collector (`--gc-review-delay 1
--gc-interval 0.2`). A dead image's blobs go from every region's store and from the database;
a blob another image references stays everywhere; a copy into a region never brings a blob GC
deleted back (DESIGN rule 5, `geo.transfer`)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.servers import RunningRegistry
from tests.support.waiting import free_port, wait_for

pytestmark = pytest.mark.slow

CODES = ("iad", "syd")
GC_FLAGS = ["--gc-review-delay", "1", "--gc-interval", "0.2"]
# Every table that may hold a row about a blob, and the column naming it.
BLOB_TABLES = {
    "blobs": "digest",
    "repository_blobs": "digest",
    "blob_regions": "digest",
    "replication_jobs": "digest",
    "manifest_references": "child_digest",
    "gc_blob_reviews": "digest",
    "gc_blob_deletions": "digest",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Gate:
    """A TCP proxy on 127.0.0.1 to `target_port` that passes at most `allow` bytes per
    connection back to the client while it is closed, and everything once opened: a transfer
    between regions held in the middle for as long as a test needs."""

    def __init__(self, target_port: int, allow: int) -> None:
        self.target_port = target_port
        self.allow = allow
        self.port = 0
        self.held = threading.Event()  # a connection reached `allow` bytes and waits
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._stop: asyncio.Event
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Gate:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def open(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gated: bool) -> None:
            passed = 0
            try:
                while data := await src.read(16384):
                    if gated and not self._open.is_set():
                        room = max(0, self.allow - passed)
                        dst.write(data[:room])
                        passed += min(room, len(data))
                        if room < len(data):
                            self.held.set()
                            await self._open.wait()
                            dst.write(data[room:])
                    else:
                        dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, False), pipe(up_r, writer, True))


@dataclass
class Regions:
    """Two regions' nodes over one SQLite database; syd may reach iad through `peer_urls`."""

    top: Path
    ports: dict[str, int]
    peer_urls: dict[str, dict[str, str]] = field(default_factory=dict)
    nodes: dict[str, RunningRegistry] = field(default_factory=dict)

    @property
    def admin(self) -> str:
        return (self.top / "iad" / "data" / "admin-token").read_text().strip()

    def write_regions(self) -> None:
        regions: dict[str, Any] = {
            code: {"url": f"http://127.0.0.1:{port}", "rtt_ms": {}}
            for code, port in self.ports.items()
        }
        for code, peers in self.peer_urls.items():
            regions[code]["peer_urls"] = peers
        path = self.top / "regions.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"regions": regions}))
        os.replace(tmp, path)

    def start(self, code: str) -> None:
        (self.top / code).mkdir(exist_ok=True)
        node = RunningRegistry(
            data_dir=self.top / code / "data",
            extra_args=[
                "--database-url", f"sqlite:///{self.top / 'meta.db'}",
                "--region", code,
                "--regions-file", str(self.top / "regions.json"),
                "--peer-token-file", str(self.top / "iad" / "data" / "admin-token"),
                *GC_FLAGS,
            ],
        )  # fmt: skip
        node.port = self.ports[code]
        self.nodes[code] = node
        node.start()

    def url(self, code: str) -> str:
        return f"http://127.0.0.1:{self.ports[code]}"

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(
            method, f"{self.url('iad')}/api/v1{path}", auth=("x", self.admin), timeout=60, **kw
        )
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def put_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        r = requests.post(
            f"{self.url('iad')}/v2/{repo}/blobs/uploads/",
            params={"digest": digest},
            data=data,
            auth=("x", self.admin),
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
        assert r.status_code == 201, r.text
        return digest

    def push_image(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, list[str]]:
        """Push config + layers and a manifest tagged `tag` to iad: (manifest digest, blobs)."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
        blobs = [config, *layers]
        digests = [self.put_blob(repo, b) for b in blobs]
        descriptors = [{"digest": d, "size": len(b)} for d, b in zip(digests, blobs, strict=True)]
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    **descriptors[0],
                },
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", **d}
                    for d in descriptors[1:]
                ],
            }
        ).encode()
        r = requests.put(
            f"{self.url('iad')}/v2/{repo}/manifests/{tag}",
            data=manifest,
            auth=("x", self.admin),
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        return sha256(manifest), digests

    def delete_manifest(self, repo: str, reference: str) -> None:
        r = requests.delete(
            f"{self.url('iad')}/v2/{repo}/manifests/{reference}",
            auth=("x", self.admin),
            timeout=60,
        )
        assert r.status_code == 202, r.text

    def get_blob(self, code: str, repo: str, digest: str) -> requests.Response:
        return requests.get(
            f"{self.url(code)}/v2/{repo}/blobs/{digest}", auth=("x", self.admin), timeout=120
        )

    def stored(self, code: str, digest: str) -> Path:
        """Where `code`'s store keeps `digest` (it may not exist)."""
        hexa = digest.split(":", 1)[1]
        return self.top / code / "data" / "blobs" / "sha256" / hexa[:2] / hexa

    def uploads(self, code: str) -> list[Path]:
        """What `code`'s store holds of uploads under way (files; none once all ended)."""
        root = self.top / code / "data" / "uploads"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def rows(self, digest: str) -> dict[str, int]:
        """Rows naming `digest`, per table (tables with none left out)."""
        found: dict[str, int] = {}
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            for table, column in BLOB_TABLES.items():
                (n,) = db.execute(
                    f"SELECT count(*) FROM {table} WHERE {column} = ?",
                    (digest,),
                ).fetchone()
                if n:
                    found[table] = int(n)
        return found

    def copies(self, digest: str) -> set[str]:
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            return {
                str(r[0])
                for r in db.execute("SELECT region FROM blob_regions WHERE digest = ?", (digest,))
            }

    def manifest_exists(self, digest: str) -> bool:
        with closing(sqlite3.connect(self.top / "meta.db", timeout=30)) as db:
            (n,) = db.execute(
                "SELECT count(*) FROM manifests WHERE digest = ?", (digest,)
            ).fetchone()
        return bool(n)

    def metric(self, code: str, name: str) -> float:
        text = requests.get(f"{self.url(code)}/metrics", auth=("x", self.admin), timeout=10).text
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def gone(self, digest: str) -> bool:
        """No region's store holds `digest` and no row names it."""
        return not any(self.stored(c, digest).exists() for c in CODES) and not self.rows(digest)


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[Regions]:
    r = Regions(top=tmp_path, ports={code: free_port() for code in CODES})
    r.write_regions()
    try:
        yield r
    finally:
        for node in r.nodes.values():
            node.stop()


def _start(regions: Regions) -> None:
    for code in CODES:  # iad first: it creates the admin token
        regions.start(code)
    regions.api("POST", "/orgs", json={"name": "acme"})
    regions.api("POST", "/apps", json={"name": "web", "org": "acme"})
    # Pushes to iad are copied ahead into syd.
    regions.api("PATCH", "/apps/web", json={"regions": ["syd"], "replicate_ahead": True})


def test_a_dead_image_leaves_every_region_and_a_shared_layer_stays_in_both(
    regions: Regions,
) -> None:
    _start(regions)
    shared, only_a, only_b = os.urandom(300_000), os.urandom(200_000), os.urandom(100_000)
    manifest_a, blobs_a = regions.push_image("web", "a", [shared, only_a])
    manifest_b, blobs_b = regions.push_image("web", "b", [shared, only_b])
    everything = set(blobs_a) | set(blobs_b)

    def replicated() -> bool:
        return all(
            regions.copies(d) == {"iad", "syd"} and regions.stored("syd", d).exists()
            for d in everything
        )

    wait_for(replicated, "both images copied ahead into syd")
    for d in everything:  # referenced: every review so far kept them
        assert regions.stored("iad", d).exists()

    regions.delete_manifest("web", "a")  # untag: nothing holds image a any more
    dead = set(blobs_a) - set(blobs_b)
    assert len(dead) == 2  # a's config and its own layer

    def collected() -> bool:
        return not regions.manifest_exists(manifest_a) and all(regions.gone(d) for d in dead)

    wait_for(collected, "image a's manifest and blobs gone from both regions and the database")

    for d in blobs_b:  # image b (with the layer a shared) is whole in both regions
        assert regions.copies(d) == {"iad", "syd"}
        rows = regions.rows(d)
        assert rows.get("blobs") == 1 and rows.get("repository_blobs") == 1, rows
        assert "gc_blob_deletions" not in rows, rows
        for code in CODES:
            assert sha256(regions.stored(code, d).read_bytes()) == d
    assert regions.manifest_exists(manifest_b)
    for code in CODES:
        got = regions.get_blob(code, "web", blobs_b[1])
        assert got.status_code == 200 and got.content == shared
        assert regions.get_blob(code, "web", blobs_a[2]).status_code == 404
        assert not regions.uploads(code)


def test_a_copy_under_way_when_gc_deletes_the_blob_does_not_bring_it_back(
    regions: Regions,
) -> None:
    layer = os.urandom(4 << 20)
    with Gate(regions.ports["iad"], allow=1 << 20) as gate:
        regions.peer_urls["syd"] = {"iad": f"http://127.0.0.1:{gate.port}"}
        regions.write_regions()
        _start(regions)
        manifest, (config, big) = regions.push_image("web", "v1", [layer])
        # syd's replication worker copies the layer through the gate, which holds it at 1 MiB.
        assert gate.held.wait(60), "syd's copy of the layer never started"
        regions.delete_manifest("web", manifest)

        def deleted() -> bool:
            rows = regions.rows(big)
            # the blob's row and its queued deletions (both regions) are done with
            return not rows.get("blobs") and not rows.get("gc_blob_deletions")

        wait_for(deleted, "GC deleting the layer in both regions while its copy waits")
        assert not regions.stored("iad", big).exists()
        gate.open()  # the copy goes on: every byte reaches syd and verifies, but is refused

        def refused() -> bool:
            return f"not copying {big} into syd" in regions.nodes["syd"].log()

        wait_for(refused, "syd's transfer of the layer refused at its install")

    assert not regions.stored("syd", big).exists()
    assert not regions.uploads("syd")  # the verified upload was aborted, not installed
    assert regions.rows(big) == {}, regions.rows(big)
    wait_for(lambda: regions.gone(config), "the config gone too")
    assert regions.metric("syd", 'skyreg_transfers_total{region="syd",result="failed"}') >= 1
    for code in CODES:
        assert regions.get_blob(code, "web", big).status_code == 404
