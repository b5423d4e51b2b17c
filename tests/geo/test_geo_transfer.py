"""Transfers into a region (`skyreg.geo.transfer`) against real SQLite metadata and a real store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from skyreg.geo.regions import RegionMap
from skyreg.geo.transfer import TransferFailed, Transfers
from skyreg.meta.db import create_db_engine, sqlite_url, upgrade_schema
from skyreg.meta.geo import GeoMeta
from skyreg.oci.digest import Digest
from skyreg.store.filesystem import FilesystemBlobStore
from tests.support.waiting import free_port

DIGEST = Digest.parse("sha256:" + "ab" * 32)


def _closed_port() -> int:
    return free_port()  # nothing listens once the picking socket is closed


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
    meta.add_copy(str(DIGEST), "iad")
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
    meta.add_copy(str(DIGEST), "iad")
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
