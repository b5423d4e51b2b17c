"""Transfers into a region (`skyreg.geo.transfer`) against real SQLite metadata and a real store,
and the records of a copy racing garbage collection (`GeoMeta`, on every database)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import Engine, delete, insert, select, text

from skyreg.geo.regions import RegionMap
from skyreg.geo.transfer import BlobDeleted, TransferFailed, Transfers
from skyreg.meta import schema as s
from skyreg.meta.db import create_db_engine, sqlite_url, upgrade_schema
from skyreg.meta.gc import GcMeta, GcSettings, enqueue_blobs, queue_deletion
from skyreg.meta.geo import GeoMeta
from skyreg.oci.digest import Digest
from skyreg.store.filesystem import FilesystemBlobStore
from tests.support.meta import DATABASES
from tests.support.waiting import free_port, wait_for

DIGEST = Digest.parse("sha256:" + "ab" * 32)


def _closed_port() -> int:
    return free_port()  # nothing listens once the picking socket is closed


def _known(engine: Engine, digest: str, size: int) -> None:
    """The registry knows the blob (its `blobs` row), as after a push."""
    with engine.begin() as conn:
        conn.execute(insert(s.blobs).values(digest=digest, size=size, created_at=datetime.now(UTC)))


def test_a_pull_joins_the_job_its_own_replication_worker_claimed(tmp_path: Path) -> None:
    regions = tmp_path / "regions.json"
    regions.write_text(
        json.dumps(
            {
                "regions": {
                    "iad": {"url": f"http://127.0.0.1:{_closed_port()}"},
                    "syd": {"url": f"http://127.0.0.1:{_closed_port()}"},
                }
            }
        )
    )
    engine = create_db_engine(sqlite_url(tmp_path / "meta.db"))
    upgrade_schema(engine)
    meta = GeoMeta(engine)
    _known(engine, str(DIGEST), 10)
    assert meta.add_copy(str(DIGEST), "iad")
    store = FilesystemBlobStore(tmp_path / "syd")

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            transfers = Transfers(
                "syd", RegionMap(regions, "syd"), store, meta, lambda: session, lambda: None
            )
            transfers.lease = 1.0
            # The worker claims the job in the database; a pull of the same blob then starts
            # the transfer without it (the worker joins that transfer, not the other way).
            await meta.run(meta.enqueue, str(DIGEST), 10, "web", "syd")
            claimed = await meta.run(meta.claim_next, "syd", transfers.owner, transfers.lease)
            assert claimed is not None
            transfer = transfers.get("web", DIGEST, 10)
            with pytest.raises(TransferFailed, match="iad"):
                await transfer.wait()

    try:
        asyncio.run(scenario())
        job = meta.job(str(DIGEST), "syd")
        # One attempt: the transfer used its own process's claim instead of waiting for that
        # lease to expire and claiming the job a second time.
        assert job is not None and job.attempts == 1 and job.state == "queued"
        assert job.error is not None and "iad" in job.error
    finally:
        meta.close()
        store.close()


def test_a_peer_sending_more_than_the_blob_is_cut_off_at_its_size(tmp_path: Path) -> None:
    # A peer region (here a server answering every blob GET with endless bytes) cannot make
    # this region store more than the blob's size: the copy fails once it goes past it.
    size = 10
    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        assert request.headers.get("X-Skyreg-Peer") == "syd"
        resp = web.StreamResponse()
        await resp.prepare(request)
        while sent < 64 << 20:  # ends on its own, should the client not stop reading
            await resp.write(b"x" * (1 << 16))
            sent += 1 << 16
        return resp

    engine = create_db_engine(sqlite_url(tmp_path / "meta.db"))
    upgrade_schema(engine)
    meta = GeoMeta(engine)
    _known(engine, str(DIGEST), 10)
    assert meta.add_copy(str(DIGEST), "iad")
    store = FilesystemBlobStore(tmp_path / "syd")

    async def scenario() -> tuple[str, int]:
        app = web.Application()
        app.router.add_get("/v2/{tail:.*}", endless)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            regions = tmp_path / "regions.json"
            regions.write_text(
                json.dumps(
                    {
                        "regions": {
                            "iad": {"url": f"http://127.0.0.1:{port}"},
                            "syd": {"url": f"http://127.0.0.1:{_closed_port()}"},
                        }
                    }
                )
            )
            async with aiohttp.ClientSession() as session:
                transfers = Transfers(
                    "syd", RegionMap(regions, "syd"), store, meta, lambda: session, lambda: "t"
                )
                transfer = transfers.get("web", DIGEST, size)
                with pytest.raises(TransferFailed) as failed:
                    await transfer.wait()
                await transfers.close()
                return str(failed.value), transfers.counters.bytes_in
        finally:
            await runner.cleanup()

    try:
        message, received = asyncio.run(scenario())
        assert f"more than {size} bytes" in message, message
        assert received <= size
        assert sent < 64 << 20  # the copy stopped reading; the peer did not run out
    finally:
        meta.close()
        store.close()


# -- garbage collection: a copy never brings a deleted blob back (DESIGN rule 5) ----------------

DATA = os.urandom(3 << 20)
BLOB = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())


@asynccontextmanager
async def _peer(
    halfway: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[int]:
    """A region's node serving BLOB (its port); `halfway` runs after half the bytes went."""

    async def serve(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
        await resp.prepare(request)
        half = len(DATA) // 2
        await resp.write(DATA[:half])
        if halfway is not None:
            await halfway()
        await resp.write(DATA[half:])
        return resp

    app = web.Application()
    app.router.add_get("/v2/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


class _Region:
    """syd's side of a copy from iad: metadata (with a collector's view of it) and a store."""

    def __init__(
        self,
        tmp_path: Path,
        store: FilesystemBlobStore | None = None,
        gc_regions: tuple[str, ...] = ("iad", "syd"),
    ) -> None:
        self.tmp_path = tmp_path
        self.engine = create_db_engine(sqlite_url(tmp_path / "meta.db"))
        upgrade_schema(self.engine)
        self.meta = GeoMeta(self.engine)
        self.gc = GcMeta(self.engine)
        self.gc.settings = GcSettings(review_delay=0.0, regions=gc_regions)
        self.store = store or FilesystemBlobStore(tmp_path / "syd")

    def pushed_in_iad(self) -> None:
        _known(self.engine, str(BLOB), len(DATA))
        assert self.meta.add_copy(str(BLOB), "iad")
        with self.engine.begin() as conn:  # unreferenced and unlinked: GC takes it when it runs
            enqueue_blobs(conn, [str(BLOB)], "test", 0.0)

    async def collect(self) -> None:
        """A GC pass deleting BLOB (nothing links or references it)."""
        review = await self.gc.run(self.gc.review_blob, str(BLOB))
        assert review.outcome == "deleted", review

    async def copy(self, port: int) -> None:
        """Copy BLOB into syd from iad at `port` (raises what the transfer raised)."""
        regions = self.tmp_path / "regions.json"
        regions.write_text(
            json.dumps(
                {
                    "regions": {
                        "iad": {"url": f"http://127.0.0.1:{port}"},
                        "syd": {"url": f"http://127.0.0.1:{_closed_port()}"},
                    }
                }
            )
        )
        async with aiohttp.ClientSession() as session:
            transfers = Transfers(
                "syd",
                RegionMap(regions, "syd"),
                self.store,
                self.meta,
                lambda: session,
                lambda: "t",
            )
            try:
                await transfers.get("web", BLOB, len(DATA)).wait()
            finally:
                await transfers.close()

    def rows(self, table: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(table))]

    def deletions(self) -> set[tuple[str, str]]:
        d = s.gc_blob_deletions
        with self.engine.connect() as conn:
            return {(str(a), str(b)) for a, b in conn.execute(select(d.c.digest, d.c.region))}

    def uploads(self) -> list[Path]:
        root = self.tmp_path / "syd" / "uploads"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def close(self) -> None:
        self.gc.close()
        self.meta.close()
        self.store.close()


def test_a_copy_whose_blob_gc_deletes_mid_way_is_never_installed(tmp_path: Path) -> None:
    region = _Region(tmp_path)
    region.pushed_in_iad()

    async def scenario() -> None:
        # GC deletes the blob while its bytes are on their way into syd: they all arrive and
        # verify, but the install is refused (the store's before_install hook).
        async with _peer(halfway=region.collect) as port:
            with pytest.raises(BlobDeleted, match="deleted by garbage collection"):
                await region.copy(port)
        assert await region.store.stat(BLOB) is None

    try:
        asyncio.run(scenario())
        assert not region.uploads()  # the verified upload was aborted
        assert region.rows(s.blobs) == [] and region.rows(s.blob_regions) == []
        assert region.rows(s.replication_jobs) == []  # not retried: nothing to copy
        # GC's own deletions (one per region) stand; syd's finds nothing there
        assert region.deletions() == {(str(BLOB), "iad"), (str(BLOB), "syd")}
    finally:
        region.close()


class _CollectedAtInstall(FilesystemBlobStore):
    """A store that lets a GC pass run right after it installs a blob: GC deleting the blob
    between a copy's install and the record of that copy."""

    collect: Callable[[], Awaitable[None]] | None = None

    async def _install_upload(self, upload_id: str, upload: Any, digest: Digest) -> None:
        await super()._install_upload(upload_id, upload, digest)
        if self.collect is not None:
            await self.collect()


def test_a_copy_landing_as_gc_deletes_the_blob_queues_its_bytes_for_deletion(
    tmp_path: Path,
) -> None:
    store = _CollectedAtInstall(tmp_path / "syd")
    # GC's regions lack syd (a region added to the map after the collector started): the only
    # deletion of syd's bytes is the one the copy itself queues.
    region = _Region(tmp_path, store, gc_regions=("iad",))
    region.pushed_in_iad()
    store.collect = region.collect

    async def scenario() -> None:
        async with _peer() as port:
            with pytest.raises(BlobDeleted):
                await region.copy(port)
        assert await region.store.stat(BLOB) == len(DATA)  # installed: garbage now

    try:
        asyncio.run(scenario())
        # Not recorded as syd's copy: the deletion of syd's bytes is queued instead.
        assert region.rows(s.blob_regions) == [] and region.rows(s.blobs) == []
        assert region.deletions() == {(str(BLOB), "iad"), (str(BLOB), "syd")}
        assert region.rows(s.replication_jobs) == []
    finally:
        region.close()


class _DeletionsAtInstall(FilesystemBlobStore):
    """A store noting the pending deletions of the blob it installs, as it installs it."""

    seen: set[tuple[str, str]] | None = None
    region: _Region | None = None

    async def _install_upload(self, upload_id: str, upload: Any, digest: Digest) -> None:
        assert self.region is not None
        self.seen = await self.region.meta.run(self.region.deletions)
        await super()._install_upload(upload_id, upload, digest)


def test_a_copy_cancels_a_pending_deletion_in_its_region_before_installing(
    tmp_path: Path,
) -> None:
    # The blob was deleted by GC once (its bytes' deletions still pending) and pushed again:
    # a copy into syd must not leave syd's deletion to remove the bytes it installs.
    store = _DeletionsAtInstall(tmp_path / "syd")
    region = _Region(tmp_path, store)
    store.region = region
    _known(region.engine, str(BLOB), len(DATA))
    assert region.meta.add_copy(str(BLOB), "iad")
    with region.engine.begin() as conn:
        queue_deletion(conn, str(BLOB), len(DATA), "syd")
        queue_deletion(conn, str(BLOB), len(DATA), "iad")

    async def scenario() -> None:
        async with _peer() as port:
            await region.copy(port)
        assert await region.store.stat(BLOB) == len(DATA)

    try:
        asyncio.run(scenario())
        assert store.seen == {(str(BLOB), "iad")}  # syd's went before the bytes were installed
        assert region.meta.regions_of(str(BLOB)) == ["iad", "syd"]
        job = region.meta.job(str(BLOB), "syd")
        assert job is not None and job.state == "done"
    finally:
        region.close()


def test_a_queued_job_for_a_blob_gc_deleted_ends_without_copying(tmp_path: Path) -> None:
    region = _Region(tmp_path)
    region.meta.enqueue(str(BLOB), len(DATA), "web", "syd")  # queued; the blob is gone since

    async def scenario() -> None:
        async with _peer() as port:
            with pytest.raises(BlobDeleted):
                await region.copy(port)
        assert await region.store.stat(BLOB) is None

    try:
        asyncio.run(scenario())
        assert region.rows(s.replication_jobs) == [] and region.rows(s.blob_regions) == []
        assert not region.uploads()
    finally:
        region.close()


@pytest.fixture(params=sorted(DATABASES))
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return DATABASES[request.param](request, tmp_path)


def _waiting_on_a_lock(engine: Engine) -> bool:
    """PostgreSQL: some session of this database waits for a row lock."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("step", ["prepare_install", "finish"])
def test_a_copy_record_waits_for_gc_deleting_the_blob_and_never_resurrects_it(
    database_url: str, step: str
) -> None:
    """GC's blob delete is under way (uncommitted, its row locks held) when a copy into syd
    asks to install (`prepare_install`) or to be recorded (`finish`): the copy's transaction
    waits for GC, then sees the blob gone: nothing recorded, syd's bytes queued for deletion."""
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    meta = GeoMeta(engine)
    digest = str(BLOB)
    try:
        _known(engine, digest, len(DATA))
        assert meta.add_copy(digest, "iad")
        meta.enqueue(digest, len(DATA), "web", "syd")
        job = meta.claim_next("syd", "node-a", 30)
        assert job is not None
        job_id = job.id
        outcome: list[bool] = []
        with engine.connect().execution_options(skyreg_write=True) as gc, gc.begin():
            # what GC's blob review does, in its order (the blob's row locked first)
            b = s.blobs
            gc.execute(select(b.c.digest).where(b.c.digest == digest).with_for_update())
            gc.execute(delete(s.blob_regions).where(s.blob_regions.c.digest == digest))
            gc.execute(delete(s.replication_jobs).where(s.replication_jobs.c.digest == digest))
            gc.execute(delete(b).where(b.c.digest == digest))
            # GC's regions: iad only (syd joined the map after the collector started), so a
            # deletion of syd's bytes can come from the copy alone
            queue_deletion(gc, digest, len(DATA), "iad")
            if step == "prepare_install":
                work = threading.Thread(
                    target=lambda: outcome.append(meta.prepare_install(digest, "syd"))
                )
            else:  # as `Transfers` records a copy: the job done, else (job gone) add_copy

                def record() -> None:
                    outcome.append(
                        meta.finish(job_id, "node-a", len(DATA), "iad")
                        or meta.add_copy(digest, "syd", len(DATA))
                    )

                work = threading.Thread(target=record)
            work.start()
            if meta._locks:  # PostgreSQL: the copy's transaction waits for GC's locks
                wait_for(lambda: _waiting_on_a_lock(engine), "the copy waiting for GC")
                assert not outcome
        work.join(60)
        meta.close_reader()
        assert outcome == [False]
        assert meta.regions_of(digest) == []
        assert meta.job(digest, "syd") is None
        with engine.connect() as conn:
            pending = {str(r) for r in conn.execute(select(s.gc_blob_deletions.c.region)).scalars()}
        # finish: the bytes it copied are garbage (queued again); prepare: nothing installed
        assert pending == ({"iad", "syd"} if step == "finish" else {"iad"})
    finally:
        meta.close()
