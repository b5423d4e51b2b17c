"""Whole copies of large blobs in pieces, and no double transfer (`skyreg.geo.transfer`, issue
18): a blob larger than `FOREGROUND_BLOB` comes as bounded Range requests of at most `PIECE`
bytes marked with `PIECE_HEADER`, one after the other; the bytes of a Range read passed through
while its whole copy runs are kept (within `MAX_KEPT`) and spliced into the copy instead of
crossing the WAN again, checked with the blob's digest like every other byte.

A real `Transfers` (SQLite metadata, a filesystem store) copies from holder regions' HTTP
servers on 127.0.0.1 (`Holder`) that record what they are asked and hold pieces until the test
releases them; no step depends on timing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
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
    FOREGROUND_BLOB,
    PEER_HEADER,
    PIECE,
    PIECE_HEADER,
    Transfer,
    TransferFailed,
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


async def _read(transfers: Transfers, digest: Digest, size: int, first: int, last: int) -> bytes:
    """A Range read passed through from iad, as a lazy reader's (every chunk consumed)."""
    got = b""
    async for chunk in transfers.read_range("web", digest, size, first, last, ["iad"]):
        got += chunk
    return got


def _assert_tiled(
    pieces: list[tuple[int, int]], spliced: list[tuple[int, int]], size: int, piece: int
) -> None:
    """`pieces` (as asked) were in order, of at most `piece` bytes each, and together with the
    `spliced` byte ranges cover the blob exactly once: each piece starts where the piece or
    spliced range before it ended, no piece overlaps a spliced range."""
    assert all(last - first + 1 <= piece for first, last in pieces), pieces
    position = 0
    for first, last in sorted(pieces + spliced):
        assert first == position, (position, pieces, spliced)
        position = last + 1
    assert position == size, (position, size)
    assert pieces == sorted(pieces)  # asked in order


async def _started(holder: Holder, copy: Transfer) -> None:
    """The whole copy got its first piece and waits (in the holder) for its second."""
    await asyncio.wait_for(holder.piece_held.wait(), BOUND)
    assert not copy.done.is_set()


# -- pieces ---------------------------------------------------------------------------------------


def test_a_large_blob_is_copied_as_bounded_marked_pieces_in_order_and_a_small_one_in_one_get(
    syd: Syd,
) -> None:
    large = os.urandom(FOREGROUND_BLOB + 2 * PIECE + 12345)  # the real sizes: 7 pieces
    small = os.urandom(FOREGROUND_BLOB)  # the largest foreground blob
    large_digest, small_digest = syd.pushed(large, ("iad",)), syd.pushed(small, ("iad",))
    holder = Holder({str(large_digest): large, str(small_digest): small})

    async def scenario() -> None:
        async with syd.transfers({"iad": holder}) as transfers:
            copy = transfers.get("web", large_digest, len(large))
            await asyncio.wait_for(copy.wait(), BOUND)
            assert copy.source == "iad"
            starts = range(0, len(large), PIECE)
            assert holder.pieces(large_digest) == [
                (n, min(n + PIECE, len(large)) - 1) for n in starts
            ]
            assert holder.others(large_digest) == []  # every request of it was a marked piece
            assert await syd.stored(large_digest) == large
            assert await syd.store.stat(large_digest) == len(large)

            await asyncio.wait_for(transfers.get("web", small_digest, len(small)).wait(), BOUND)
            assert holder.pieces(small_digest) == []
            assert holder.others(small_digest) == [Asked(str(small_digest), None, False)]
            assert await syd.stored(small_digest) == small

            counters = transfers.counters
            assert counters.bytes_in == len(large) + len(small)
            assert counters.spliced_bytes == 0 and counters.transfers_done == 2

    asyncio.run(scenario())


def test_a_source_that_ignores_ranges_still_gives_a_large_blob_in_one_answer(syd: Syd) -> None:
    large = os.urandom(FOREGROUND_BLOB + PIECE + 1)
    digest = syd.pushed(large, ("iad",))
    holder = Holder({str(digest): large}, no_ranges=True)

    async def scenario() -> None:
        async with syd.transfers({"iad": holder}) as transfers:
            await asyncio.wait_for(transfers.get("web", digest, len(large)).wait(), BOUND)
            assert await syd.stored(digest) == large
            # One piece asked for, answered whole: then the blob in one answer from 0.
            assert holder.pieces(digest) == [(0, PIECE - 1)]
            assert holder.others(digest) == [Asked(str(digest), None, False)]

    asyncio.run(scenario())


# -- no double transfer -----------------------------------------------------------------------


@pytest.mark.usefixtures("small_pieces")
def test_a_range_read_during_the_whole_copy_crosses_the_wan_once(syd: Syd) -> None:
    data = os.urandom(5 * SMALL_PIECE + 7)
    digest = syd.pushed(data, ("iad",))
    holder = Holder({str(digest): data}, hold=True)
    first, last = 3_000_000, 3_499_999  # beyond the copy's first two pieces

    async def scenario() -> None:
        async with syd.transfers({"iad": holder}) as transfers:
            copy = transfers.get("web", digest, len(data))
            await _started(holder, copy)
            assert await _read(transfers, digest, len(data), first, last) == data[first : last + 1]
            holder.more.set()
            await asyncio.wait_for(copy.wait(), BOUND)

            # The copy asked for everything but the read's bytes: the piece before them ends
            # where they start, the one after starts where they end.
            pieces = holder.pieces(digest)
            _assert_tiled(pieces, [(first, last)], len(data), SMALL_PIECE)
            assert (first, last) not in pieces
            assert any(end == first - 1 for _, end in pieces)
            assert any(start == last + 1 for start, _ in pieces)
            assert [a.range for a in holder.others(digest)] == [f"bytes={first}-{last}"]
            counters = transfers.counters
            assert counters.spliced_bytes == last + 1 - first
            assert counters.bytes_in + counters.spliced_bytes == len(data)
            assert counters.range_bytes_in == last + 1 - first
            assert await syd.stored(digest) == data
            assert transfers._kept == {} and transfers._kept_bytes == 0

    asyncio.run(scenario())


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("holders", [("iad",), ("iad", "sin")], ids=["one-holder", "two-holders"])
def test_wrong_bytes_kept_from_a_range_read_fail_the_digest_and_are_never_stored(
    syd: Syd, holders: tuple[str, ...]
) -> None:
    """iad answers Range reads with a flipped byte and pieces right: the copy from iad splices
    the wrong bytes and fails its digest check. It then copies from the next holder (sin,
    answering right) from the start, asking for those bytes too; with none left it fails. A
    wrong blob is never stored, and the kept bytes are gone either way."""
    data = os.urandom(5 * SMALL_PIECE + 7)
    digest = syd.pushed(data, holders)
    iad = Holder({str(digest): data}, hold=True, alter_ranges=True)
    sin = Holder({str(digest): data})
    first, last = 3_000_000, 3_499_999

    async def scenario() -> None:
        running = {"iad": iad, "sin": sin} if "sin" in holders else {"iad": iad}
        async with syd.transfers(running) as transfers:
            copy = transfers.get("web", digest, len(data))
            await _started(iad, copy)
            got = await _read(transfers, digest, len(data), first, last)
            assert got != data[first : last + 1]  # (the reader's chunk digests catch this)
            iad.more.set()
            if "sin" in holders:
                await asyncio.wait_for(copy.wait(), BOUND)
                assert copy.source == "sin"
                assert await syd.stored(digest) == data
                # sin was asked for every byte, the read's too: no kept bytes were used again
                _assert_tiled(sin.pieces(digest), [], len(data), SMALL_PIECE)
            else:
                with pytest.raises(TransferFailed, match="does not match the digest"):
                    await asyncio.wait_for(copy.wait(), BOUND)
                assert await syd.store.stat(digest) is None
                assert syd.uploads() == []
            _assert_tiled(iad.pieces(digest), [(first, last)], len(data), SMALL_PIECE)
            assert transfers.counters.spliced_bytes == last + 1 - first  # in the failed try
            assert transfers._kept == {} and transfers._kept_bytes == 0

    asyncio.run(scenario())


@pytest.mark.usefixtures("small_pieces")
def test_range_reads_beyond_max_kept_are_not_kept_and_the_copy_fetches_those_bytes_itself(
    syd: Syd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer_module, "MAX_KEPT", 100_000)
    data = os.urandom(5 * SMALL_PIECE + 7)
    digest = syd.pushed(data, ("iad",))
    holder = Holder({str(digest): data}, hold=True)
    larger = (2_200_000, 2_349_999)  # 150_000 bytes: more than MAX_KEPT on its own
    kept = (3_000_000, 3_059_999)  # 60_000: within it
    over = (4_000_000, 4_059_999)  # 60_000 more: over it together with the kept ones

    async def scenario() -> None:
        async with syd.transfers({"iad": holder}) as transfers:
            copy = transfers.get("web", digest, len(data))
            await _started(holder, copy)
            for first, last in (larger, kept, over):
                got = await _read(transfers, digest, len(data), first, last)
                assert got == data[first : last + 1]
            assert transfers._kept_bytes == kept[1] + 1 - kept[0]
            holder.more.set()
            await asyncio.wait_for(copy.wait(), BOUND)

            _assert_tiled(holder.pieces(digest), [kept], len(data), SMALL_PIECE)
            counters = transfers.counters
            assert counters.spliced_bytes == kept[1] + 1 - kept[0]
            assert counters.bytes_in == len(data) - counters.spliced_bytes
            assert await syd.stored(digest) == data
            assert transfers._kept_bytes == 0

    asyncio.run(scenario())
