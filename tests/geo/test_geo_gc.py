"""Garbage collection across regions: a `skyreg serve` node per region over one metadata
database, each with its own blob directory and its own collector (`--gc-review-delay 1
--gc-interval 0.2`). A dead image's blobs go from every region's store and from the database;
a blob another image references stays everywhere; a copy into a region never brings a blob GC
deleted back (DESIGN rule 5, `geo.transfer`)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.regions import Regions, sha256
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

CODES = ("iad", "syd")
GC_FLAGS = ["--gc-review-delay", "1", "--gc-interval", "0.2"]


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


@pytest.fixture
def regions(tmp_path: Path) -> Iterator[Regions]:
    r = Regions.on_free_ports(tmp_path, CODES, extra_args=GC_FLAGS)
    r.write_regions()
    try:
        yield r
    finally:
        r.stop_all()


def _start(regions: Regions) -> None:
    regions.start_all()  # iad first: it creates the admin token
    regions.api("iad", "POST", "/orgs", json={"name": "acme"})
    regions.api("iad", "POST", "/apps", json={"name": "web", "org": "acme"})
    # Pushes to iad are copied ahead into syd.
    regions.api("iad", "PATCH", "/apps/web", json={"regions": ["syd"], "replicate_ahead": True})


def test_a_dead_image_leaves_every_region_and_a_shared_layer_stays_in_both(
    regions: Regions,
) -> None:
    _start(regions)
    shared, only_a, only_b = os.urandom(300_000), os.urandom(200_000), os.urandom(100_000)
    manifest_a, blobs_a = regions.push_image("iad", "web", "a", [shared, only_a])
    manifest_b, blobs_b = regions.push_image("iad", "web", "b", [shared, only_b])
    everything = set(blobs_a) | set(blobs_b)

    def replicated() -> bool:
        return all(
            regions.copies(d) == {"iad", "syd"} and regions.stored("syd", d).exists()
            for d in everything
        )

    wait_for(replicated, "both images copied ahead into syd")
    for d in everything:  # referenced: every review so far kept them
        assert regions.stored("iad", d).exists()

    regions.delete_manifest("iad", "web", "a")  # untag: nothing holds image a any more
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
        manifest, (config, big) = regions.push_image("iad", "web", "v1", [layer])
        # syd's replication worker copies the layer through the gate, which holds it at 1 MiB.
        assert gate.held.wait(60), "syd's copy of the layer never started"
        regions.delete_manifest("iad", "web", manifest)

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
