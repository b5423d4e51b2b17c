"""Holder regions and syd's side for tests of whole copies in pieces (`skyreg.geo.transfer`):
`Holder` serves blobs on 127.0.0.1 and records what it is asked, `Syd` is the copying region's
metadata and store; the fixtures `syd` and `small_pieces` (a plugin of tests/conftest.py).
Used by tests/geo/test_copy_pieces.py and tests/security/test_lazy_wan_attacks.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import insert

import skyreg.geo.transfer as transfer_module
from skyreg.geo.regions import RegionMap
from skyreg.geo.transfer import (
    PEER_HEADER,
    PIECE_HEADER,
    Transfer,
    Transfers,
)
from skyreg.meta import schema as s
from skyreg.meta.db import create_db_engine, sqlite_url, upgrade_schema
from skyreg.meta.geo import GeoMeta
from skyreg.oci.digest import Digest
from skyreg.store.filesystem import FilesystemBlobStore
from tests.support.aioserve import serve_on_loopback
from tests.support.waiting import free_port

BOUND = 30.0  # seconds any awaited step may take before the test fails (a wait bound only)
SMALL_PIECE = 1 << 20  # PIECE (and FOREGROUND_BLOB) in the splice tests: blobs of a few MiB


def _digest(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


def _bounds(wanted: str) -> tuple[int, int]:
    """First and last byte of `Range: bytes=first-last`."""
    first, last = wanted.removeprefix("bytes=").split("-")
    return int(first), int(last)


@dataclass(frozen=True)
class Asked:
    """One blob GET a holder answered."""

    digest: str
    range: str | None
    piece: bool  # it carried PIECE_HEADER


class Holder:
    """A holder region's node on 127.0.0.1 serving `blobs`, recording every request (`asked`).
    With `hold`, every piece of a whole copy after the first waits for `more` (`piece_held`
    once one does); with `alter_ranges`, Range reads (not pieces) are answered with their first
    byte flipped — a faulty holder the reader may catch, and the copy must."""

    def __init__(
        self,
        blobs: dict[str, bytes],
        *,
        hold: bool = False,
        alter_ranges: bool = False,
        no_ranges: bool = False,
    ) -> None:
        self.blobs = blobs
        self.alter_ranges = alter_ranges
        self.no_ranges = no_ranges  # answer every GET with the whole blob (an older node)
        self.asked: list[Asked] = []
        self.more, self.piece_held = asyncio.Event(), asyncio.Event()
        if not hold:
            self.more.set()
        self.port = 0

    def pieces(self, digest: Digest) -> list[tuple[int, int]]:
        """Bounds of the pieces of `digest` asked for, in the order asked."""
        return [_bounds(a.range or "") for a in self.asked if a.digest == str(digest) and a.piece]

    def others(self, digest: Digest) -> list[Asked]:
        """What else was asked of `digest`: Range reads, GETs without Range."""
        return [a for a in self.asked if a.digest == str(digest) and not a.piece]

    async def serve(self, request: web.Request) -> web.StreamResponse:
        assert request.headers.get(PEER_HEADER) == "syd"
        digest = request.path.rsplit("/", 1)[1]
        data = self.blobs[digest]
        wanted = request.headers.get("Range")
        piece = request.headers.get(PIECE_HEADER) == "1"
        self.asked.append(Asked(digest, wanted, piece))
        if wanted is None or self.no_ranges:
            return web.Response(body=data)
        first, last = _bounds(wanted)
        body = data[first : last + 1]
        if piece and first > 0 and not self.more.is_set():
            self.piece_held.set()
            await self.more.wait()
        if not piece and self.alter_ranges:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return web.Response(
            status=206, body=body, headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Holder]:
        async with serve_on_loopback(self.serve) as self.port:
            try:
                yield self
            finally:
                self.more.set()  # no handler is left waiting


class Syd:
    """syd's side: metadata knowing the blobs (held in the holders' regions), a filesystem
    store, and (`transfers`) a `Transfers` copying from the running holders."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.engine = create_db_engine(sqlite_url(tmp_path / "meta.db"))
        upgrade_schema(self.engine)
        self.meta = GeoMeta(self.engine)
        self.store = FilesystemBlobStore(tmp_path / "syd")

    def pushed(self, data: bytes, regions: tuple[str, ...]) -> Digest:
        """The registry knows the blob, copies of it are in `regions` (as after a push)."""
        digest = _digest(data)
        with self.engine.begin() as conn:
            conn.execute(
                insert(s.blobs).values(
                    digest=str(digest), size=len(data), created_at=datetime.now(UTC)
                )
            )
        for region in regions:
            assert self.meta.add_copy(str(digest), region)
        return digest

    @asynccontextmanager
    async def transfers(self, holders: dict[str, Holder]) -> AsyncIterator[Transfers]:
        async with AsyncExitStack() as stack:
            for holder in holders.values():
                await stack.enter_async_context(holder.running())
            session = await stack.enter_async_context(aiohttp.ClientSession())
            urls = {code: f"http://127.0.0.1:{h.port}" for code, h in holders.items()}
            urls["syd"] = f"http://127.0.0.1:{free_port()}"
            regions = self.tmp_path / "regions.json"
            regions.write_text(
                json.dumps({"regions": {code: {"url": url} for code, url in urls.items()}})
            )
            transfers = Transfers(
                "syd",
                RegionMap(regions, "syd"),
                self.store,
                self.meta,
                lambda: session,
                lambda: "t",
            )
            try:
                yield transfers
            finally:
                await transfers.close()

    async def stored(self, digest: Digest) -> bytes:
        return b"".join([c async for c in self.store.read(digest)])

    def uploads(self) -> list[Path]:
        root = self.tmp_path / "syd" / "uploads"
        return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []

    def close(self) -> None:
        self.meta.close()
        self.store.close()


@pytest.fixture
def syd(tmp_path: Path) -> Iterator[Syd]:
    region = Syd(tmp_path)
    try:
        yield region
    finally:
        region.close()


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blobs over 1 MiB are background copies in pieces of 1 MiB; the gate's linger is short and
    its bound out of the way (a copy waits exactly while a foreground fetch is in flight)."""
    monkeypatch.setattr(transfer_module, "FOREGROUND_BLOB", SMALL_PIECE)
    monkeypatch.setattr(transfer_module, "PIECE", SMALL_PIECE)
    monkeypatch.setattr(transfer_module, "LINGER", 0.01)
    monkeypatch.setattr(transfer_module, "MAX_YIELD", 3600.0)


async def read_through(
    transfers: Transfers, digest: Digest, size: int, first: int, last: int, repo: str = "web"
) -> bytes:
    """A Range read passed through from iad, as `repo`'s lazy reader (every chunk consumed)."""
    got = b""
    async for chunk in transfers.read_range(repo, digest, size, first, last, ["iad"]):
        got += chunk
    return got


async def wait_started(holder: Holder, copy: Transfer) -> None:
    """The whole copy got its first piece and waits (in the holder) for its second."""
    await asyncio.wait_for(holder.piece_held.wait(), BOUND)
    assert not copy.done.is_set()
