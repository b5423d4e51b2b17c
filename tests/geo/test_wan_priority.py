"""The WAN priority gate (`skyreg.geo.transfer.WanPriority`, issue 18): Range reads and small
blobs go first, whole copies of large blobs (asked for in pieces of at most `PIECE` bytes) wait
for them before each piece, within bounds. Unit tests drive the gate with events and loop
iterations (no timed assertions); the integration test runs a real `Transfers` (SQLite
metadata, a filesystem store) against a peer region's HTTP server on 127.0.0.1 whose answers
the test holds and releases."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import insert

import skyreg.geo.transfer as transfer_module
from skyreg.geo.regions import RegionMap
from skyreg.geo.transfer import PIECE_HEADER, Counters, Transfers, WanPriority
from skyreg.meta import schema as s
from skyreg.meta.db import create_db_engine, sqlite_url, upgrade_schema
from skyreg.meta.geo import GeoMeta
from skyreg.oci.digest import Digest
from skyreg.store.filesystem import FilesystemBlobStore
from tests.geo.test_range_through_regions import Relay
from tests.support.aioserve import serve_on_loopback
from tests.support.regions import Regions, running_regions
from tests.support.waiting import free_port, wait_for

BOUND = 30.0  # seconds any awaited step may take before the test fails (a wait bound only)


async def _spin(iterations: int = 50) -> None:
    """Let the event loop run `iterations` rounds (other tasks get every chance to proceed)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


async def _until(check: Callable[[], bool], what: str) -> None:
    """Wait for `check` to hold, failing with `what` after BOUND seconds."""
    deadline = asyncio.get_running_loop().time() + BOUND
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
def bounds(monkeypatch: pytest.MonkeyPatch) -> Callable[[float, float], None]:
    """Set the gate's LINGER and MAX_YIELD for one test."""

    def set_bounds(linger: float, max_yield: float) -> None:
        monkeypatch.setattr(transfer_module, "LINGER", linger)
        monkeypatch.setattr(transfer_module, "MAX_YIELD", max_yield)

    return set_bounds


# -- the gate ------------------------------------------------------------------------------------


def test_a_background_turn_with_nothing_in_flight_returns_without_waiting() -> None:
    async def scenario() -> None:
        gate = WanPriority(Counters())
        turn = gate.background_turn()
        with pytest.raises(StopIteration):
            turn.send(None)  # it finished in one step: it never suspended
        assert gate.counters.yield_seconds == 0.0

    asyncio.run(scenario())


def test_a_background_turn_waits_while_a_foreground_fetch_is_open_and_for_the_linger_after(
    bounds: Callable[[float, float], None],
) -> None:
    bounds(0.02, 60.0)  # the bound is out of the way: only the foreground holds the turn

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate = WanPriority(Counters())
        ended = 0.0
        async with gate.foreground():
            turn = asyncio.create_task(gate.background_turn())
            await _spin()
            assert not turn.done()
            assert gate.waiting == 1
        ended = loop.time()
        await asyncio.wait_for(turn, BOUND)
        assert loop.time() >= ended + transfer_module.LINGER  # not before the linger passed
        assert gate.waiting == 0
        assert gate.counters.yield_seconds > 0

    asyncio.run(scenario())


def test_a_gap_between_foreground_reads_shorter_than_the_linger_keeps_the_link(
    bounds: Callable[[float, float], None],
) -> None:
    bounds(3600.0, 3600.0)  # the linger cannot pass during the test

    async def scenario() -> None:
        gate = WanPriority(Counters())
        async with gate.foreground():
            pass
        turn = asyncio.create_task(gate.background_turn())
        await _spin()
        assert not turn.done()  # the read ended a moment ago: the next one is likely coming
        async with gate.foreground():  # and it came
            await _spin()
            assert not turn.done()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        assert gate.waiting == 0

    asyncio.run(scenario())


def test_a_background_turn_returns_after_max_yield_even_if_the_foreground_never_ends(
    bounds: Callable[[float, float], None],
) -> None:
    bounds(0.01, 0.05)

    async def scenario() -> None:
        gate = WanPriority(Counters())
        forever = asyncio.Event()  # never set: the foreground stays open

        async def hold() -> None:
            async with gate.foreground():
                await forever.wait()

        holder = asyncio.create_task(hold())
        await _spin()
        assert gate.active == 1
        await asyncio.wait_for(gate.background_turn(), BOUND)  # slowed, not starved
        first = gate.counters.yield_seconds
        assert first > 0
        await asyncio.wait_for(gate.background_turn(), BOUND)  # each call has its own bound
        assert gate.counters.yield_seconds > first
        assert gate.active == 1 and not holder.done()
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert gate.active == 0

    asyncio.run(scenario())


def test_copies_waiting_out_max_yield_together_go_one_per_max_yield(
    bounds: Callable[[float, float], None],
) -> None:
    """Three turns wait on a foreground fetch that never ends; their bounds end together, yet
    they return one at a time, each at least MAX_YIELD (loop time) after the one before."""
    bounds(0.01, 0.1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        gate = WanPriority(Counters())
        forever = asyncio.Event()  # never set: the foreground stays open
        went: list[float] = []  # loop time each turn returned, in the order they did

        async def hold() -> None:
            async with gate.foreground():
                await forever.wait()

        async def turn() -> None:
            await gate.background_turn()
            went.append(loop.time())

        holder = asyncio.create_task(hold())
        await _spin()
        assert gate.active == 1
        started = loop.time()
        turns = [asyncio.create_task(turn()) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*turns), BOUND)
        window = transfer_module.MAX_YIELD * 0.99  # (returning and reading the clock differ)
        assert went[0] >= started + window
        assert went[1] >= went[0] + window
        assert went[2] >= went[1] + window
        assert gate.active == 1 and gate.waiting == 0
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder

    asyncio.run(scenario())


def test_the_gate_opens_only_after_the_last_of_nested_and_concurrent_foregrounds_ends(
    bounds: Callable[[float, float], None],
) -> None:
    bounds(0.01, 3600.0)

    async def scenario() -> None:
        gate = WanPriority(Counters())
        end_other, other_in = asyncio.Event(), asyncio.Event()

        async def other() -> None:
            async with gate.foreground():
                other_in.set()
                await end_other.wait()

        concurrent = asyncio.create_task(other())
        await asyncio.wait_for(other_in.wait(), BOUND)
        async with gate.foreground():
            turn = asyncio.create_task(gate.background_turn())
            async with gate.foreground():  # nested in the same task
                await _spin()
                assert gate.active == 3
            await _spin()
            assert not turn.done()  # the outer one and the other task's are still open
        await _spin()
        assert gate.active == 1 and not turn.done()  # the other task's still is
        end_other.set()
        await asyncio.wait_for(concurrent, BOUND)
        await asyncio.wait_for(turn, BOUND)
        assert gate.active == 0

    asyncio.run(scenario())


# -- real transfers: a Range read and a small blob go before a large blob's whole copy ----------

BIG = os.urandom(3 << 20)
BIG_DIGEST = Digest.parse("sha256:" + hashlib.sha256(BIG).hexdigest())
SMALL = os.urandom(64 << 10)
SMALL_DIGEST = Digest.parse("sha256:" + hashlib.sha256(SMALL).hexdigest())
PIECE = 1 << 20  # BIG's pieces here (PIECE monkeypatched): BIG comes as three


def _bounds(wanted: str) -> tuple[int, int]:
    """First and last byte of `Range: bytes=first-last`."""
    first, last = wanted.removeprefix("bytes=").split("-")
    return int(first), int(last)


class Peer:
    """A peer region's node on 127.0.0.1 serving BIG and SMALL. It answers BIG's first piece at
    once and holds every later one until `more` (`piece_held` once one waits); holds a Range
    read's answer (once `range_asked`) until `answer_range`; holds SMALL's whole copy (once
    `small_asked`) until `answer_small`. `pieces`: the pieces asked, in order."""

    def __init__(self) -> None:
        self.more, self.piece_held = asyncio.Event(), asyncio.Event()
        self.range_asked, self.answer_range = asyncio.Event(), asyncio.Event()
        self.small_asked, self.answer_small = asyncio.Event(), asyncio.Event()
        self.pieces: list[tuple[int, int]] = []
        self.port = 0

    async def serve(self, request: web.Request) -> web.StreamResponse:
        data = BIG if request.path.endswith(str(BIG_DIGEST)) else SMALL
        wanted = request.headers.get("Range", "")
        if request.headers.get(PIECE_HEADER) == "1":  # a piece of a whole copy
            first, last = _bounds(wanted)
            self.pieces.append((first, last))
            if first > 0:
                self.piece_held.set()
                await self.more.wait()
        elif wanted:  # a Range read passed through
            first, last = _bounds(wanted)
            self.range_asked.set()
            await self.answer_range.wait()
        else:  # a small blob's whole copy, in one answer
            assert data is SMALL
            self.small_asked.set()
            await self.answer_small.wait()
            return web.Response(body=data)
        return web.Response(
            status=206,
            body=data[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Peer]:
        async with serve_on_loopback(self.serve) as self.port:
            try:
                yield self
            finally:
                for held in (self.more, self.answer_range, self.answer_small):
                    held.set()  # no handler is left waiting


def test_a_large_blobs_whole_copy_waits_for_a_range_read_and_a_small_blob_then_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bounds: Callable[[float, float], None]
) -> None:
    monkeypatch.setattr(transfer_module, "FOREGROUND_BLOB", len(BIG) - 1)  # BIG: background
    monkeypatch.setattr(transfer_module, "PIECE", PIECE)
    bounds(0.01, 3600.0)  # the copy waits as long as a foreground fetch is in flight
    engine = create_db_engine(sqlite_url(tmp_path / "meta.db"))
    upgrade_schema(engine)
    meta = GeoMeta(engine)
    for digest, data in ((BIG_DIGEST, BIG), (SMALL_DIGEST, SMALL)):
        with engine.begin() as conn:  # the registry knows the blob (as after a push to iad)
            conn.execute(
                insert(s.blobs).values(
                    digest=str(digest), size=len(data), created_at=datetime.now(UTC)
                )
            )
        assert meta.add_copy(str(digest), "iad")
    store = FilesystemBlobStore(tmp_path / "syd")

    async def scenario() -> None:
        async with Peer().running() as peer, aiohttp.ClientSession() as session:
            regions = tmp_path / "regions.json"
            regions.write_text(
                json.dumps(
                    {
                        "regions": {
                            "iad": {"url": f"http://127.0.0.1:{peer.port}"},
                            "syd": {"url": f"http://127.0.0.1:{free_port()}"},
                        }
                    }
                )
            )
            transfers = Transfers(
                "syd", RegionMap(regions, "syd"), store, meta, lambda: session, lambda: "t"
            )
            gate, counters = transfers.priority, transfers.counters
            try:
                copy = transfers.get("web", BIG_DIGEST, len(BIG))
                await asyncio.wait_for(peer.piece_held.wait(), BOUND)  # the second piece asked
                assert counters.bytes_in == PIECE  # the first one copied
                assert gate.active == 0  # a large blob's copy is no foreground fetch

                # A Range read begins: the copy takes at most the piece in flight (held by the
                # peer so far), then waits for the link before asking for the next one.
                seen_at_last_byte: list[int] = []

                async def read() -> bytes:
                    got = b""
                    chunks = transfers.read_range(
                        "web", BIG_DIGEST, len(BIG), 2_000_000, 2_262_143, ["iad"]
                    )
                    async for chunk in chunks:
                        got += chunk
                        if len(got) == 262_144:  # still inside the read's foreground
                            seen_at_last_byte.append(counters.bytes_in)
                    return got

                reading = asyncio.create_task(read())
                await asyncio.wait_for(peer.range_asked.wait(), BOUND)
                assert gate.active == 1
                peer.more.set()
                await _until(lambda: gate.waiting == 1, "the copy waiting for its turn")
                parked = counters.bytes_in
                assert parked == 2 * PIECE  # the piece in flight, and not a byte more
                await _spin()
                assert counters.bytes_in == parked and gate.waiting == 1
                assert peer.pieces == [(0, PIECE - 1), (PIECE, 2 * PIECE - 1)]  # none asked since

                # A small blob's whole copy is foreground too: the copy still waits once the
                # Range read is answered, while the small one is in flight.
                small = transfers.get("web", SMALL_DIGEST, len(SMALL))
                await asyncio.wait_for(peer.small_asked.wait(), BOUND)
                assert gate.active == 2
                peer.answer_range.set()
                assert await asyncio.wait_for(reading, BOUND) == BIG[2_000_000:2_262_144]
                assert seen_at_last_byte == [parked]  # no byte of the copy during the read
                await _spin()
                assert gate.active == 1 and gate.waiting == 1
                assert counters.bytes_in == parked  # nor of the small one yet (held by the peer)
                assert len(peer.pieces) == 2
                peer.answer_small.set()
                await asyncio.wait_for(small.wait(), BOUND)

                # Both foreground fetches ended: the copy goes on and lands whole, verified.
                await asyncio.wait_for(copy.wait(), BOUND)
                assert gate.active == 0 and gate.waiting == 0
                assert peer.pieces == [(n, n + PIECE - 1) for n in range(0, len(BIG), PIECE)]
                # The read began behind what the copy had (2 * PIECE > 2_000_000): nothing kept.
                assert counters.spliced_bytes == 0
                assert counters.bytes_in == len(BIG) + len(SMALL)
                assert counters.range_bytes_in == 262_144 and counters.ranges_done == 1
                assert counters.transfers_done == 2
                assert counters.yield_seconds > 0
                assert b"".join([c async for c in store.read(BIG_DIGEST)]) == BIG
            finally:
                await transfers.close()

    try:
        asyncio.run(scenario())
    finally:
        meta.close()
        store.close()


# -- over real nodes: syd's whole copy of a large blob gives way to a Range read ---------------


class PieceRelay(Relay):
    """The Range tests' relay (iad, for syd), holding a whole copy's pieces by where they start:
    those before `held_from` pass at once; the one starting there waits until a Range read of
    the blob arrived (`piece_held` once it waits), later ones until `more_pieces`. It holds the
    Range read's answer until `answer_ranges`."""

    def __init__(self, target: str, held_from: int) -> None:
        super().__init__(target)
        self.held_from = held_from
        self.piece_held = threading.Event()
        self.range_asked = threading.Event()
        self.later_piece_asked = threading.Event()
        self._range_asked = asyncio.Event()  # the same, on the relay's loop
        self._answer = asyncio.Event()
        self._more = asyncio.Event()

    def __enter__(self) -> PieceRelay:
        super().__enter__()
        return self

    def answer_ranges(self) -> None:
        self._loop.call_soon_threadsafe(self._answer.set)

    def more_pieces(self) -> None:
        self._loop.call_soon_threadsafe(self._more.set)

    def __exit__(self, *exc: object) -> None:
        self.answer_ranges()
        self.more_pieces()
        self._loop.call_soon_threadsafe(self._range_asked.set)
        super().__exit__(*exc)

    async def _relay(self, request: web.Request) -> web.Response:
        wanted = request.headers.get("Range")
        if "/blobs/sha256:" in request.path and request.method == "GET":
            if request.headers.get(PIECE_HEADER) == "1":
                first, _ = _bounds(wanted or "")
                if first == self.held_from:
                    self.piece_held.set()
                    await self._range_asked.wait()
                elif first > self.held_from:
                    self.later_piece_asked.set()
                    await self._more.wait()
            elif wanted is not None and not wanted.endswith("-"):  # a Range read passed through
                self.range_asked.set()
                self._range_asked.set()
                await self._answer.wait()
        return await super()._relay(request)  # records it (`release`d: holds nothing more)


@pytest.fixture(scope="module")
def two_regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Regions]:
    with running_regions(tmp_path_factory.mktemp("wan"), ("iad", "syd"), rtt_ms={}) as r:
        yield r


@pytest.mark.slow
def test_a_nodes_whole_copy_of_a_large_blob_waits_while_a_range_read_is_in_flight(
    two_regions: Regions,
) -> None:
    r = two_regions
    piece = transfer_module.PIECE
    data = os.urandom(transfer_module.FOREGROUND_BLOB + piece)  # a background copy: 5 pieces
    first, last = 20_000_000, 20_262_143  # in the last piece
    digest = r.put_blob("iad", "web", data)
    with PieceRelay(r.url("iad"), held_from=piece) as relay, ThreadPoolExecutor(2) as pool:
        relay.release()  # the base relay holds nothing here
        r.peer_urls["syd"] = {"iad": relay.url}
        r.write_regions()
        try:
            r.mark()
            whole = pool.submit(r.get_blob, "syd", "web", digest)  # a pull: the whole copy
            assert relay.piece_held.wait(60), "syd's whole copy never asked for its 2nd piece"
            ranged = pool.submit(r.get_blob, "syd", "web", digest, Range=f"bytes={first}-{last}")
            assert relay.range_asked.wait(60), "syd never passed the Range read on"
            # The second piece is on its way now, but the Range read (its answer held in the
            # relay) is in flight: the copy waits before the next piece, MAX_YIELD at a time.
            wait_for(
                lambda: r.metric("syd", "skyreg_transfer_yield_seconds_total") > 0,
                "syd's copy waiting for the Range read",
            )
            assert not ranged.done() and not whole.done()
            assert relay.later_piece_asked.wait(60), "syd's copy never went on after MAX_YIELD"
            relay.answer_ranges()
            got = ranged.result(timeout=120)
            assert got.status_code == 206 and got.content == data[first : last + 1]
            # The read is done (its bytes kept for the copy, which has not got that far).
            wait_for(
                lambda: (
                    r.metric("syd", 'skyreg_range_reads_total{region="syd",result="done"}') == 1
                ),
                "syd's Range read counted",
            )
            relay.more_pieces()
            pulled = whole.result(timeout=300)
            assert pulled.status_code == 200 and pulled.content == data
            wait_for(lambda: r.copies(digest) == {"iad", "syd"}, "syd's whole copy recorded")
            # Pieces of at most PIECE bytes, in order, around the Range read's bytes: those
            # crossed the WAN once, taken from the read for the copy.
            starts = range(0, 4 * piece, piece)
            assert relay.pieces_for(digest) == [
                *((n, n + piece - 1) for n in starts),
                (4 * piece, first - 1),
                (last + 1, len(data) - 1),
            ]
            assert all(s.piece for s in relay.requests_for(digest) if s.whole)
            assert r.metric("syd", "skyreg_transfer_spliced_bytes_total") == last + 1 - first
            assert r.metric("syd", "skyreg_transfer_bytes_in_total") == len(data) - (
                last + 1 - first
            )
        finally:
            r.peer_urls.clear()
            r.write_regions()
