"""Range through regions (issue 18, lazy pull): a region lacking a blob answers a Range read with
just those bytes from the nearest holder, while its one whole copy of the blob goes on in the
background. Three `skyreg serve` nodes (iad holds what is pushed; syd reaches iad through a
`Relay` that can hold whole-blob copies and alter the ranges it forwards; sin is farther).
Whole copies of blobs larger than `FOREGROUND_BLOB` come as bounded Range requests marked with
`PIECE_HEADER`: the relay tells them from Range reads by that header."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from skyreg.geo.transfer import MAX_RANGE_THROUGH, PEER_HEADER, PIECE, PIECE_HEADER
from tests.support.regions import Regions, running_regions
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

CODES = ("iad", "sin", "syd")
RTT = {("iad", "syd"): 50, ("sin", "syd"): 150, ("iad", "sin"): 100}  # syd asks iad first
_HOP = ("host", "content-length", "transfer-encoding", "connection", "keep-alive")


@dataclass(frozen=True)
class Seen:
    path: str
    range: str | None
    peer: str | None
    piece: bool = False  # it carried PIECE_HEADER: a piece of a whole copy

    @property
    def whole(self) -> bool:
        """Part of a whole-blob copy: a small blob's starts at 0 without Range (resumes with
        `bytes=N-`), a large blob's comes in pieces (bounded ranges with PIECE_HEADER)."""
        return self.piece or self.range is None or self.range.endswith("-")

    @property
    def bounds(self) -> tuple[int, int]:
        """First and last byte of a bounded `Range: bytes=first-last`."""
        assert self.range is not None and not self.range.endswith("-"), self.range
        first, last = self.range.removeprefix("bytes=").split("-")
        return int(first), int(last)


class Relay:
    """An HTTP relay on 127.0.0.1 in front of one region's node, for another region's node (its
    `peer_urls`). It records every request, holds whole-blob copies until `release` (so a copy
    cannot finish yet, without any timing), and with `tamper` alters the range reads it
    forwards: "shift" asks for the bytes one further on, "strip" drops the Range (a 200)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.port = 0
        self.tamper: str | None = None
        self.seen: list[Seen] = []
        self.holding = threading.Event()  # a whole-blob copy waits for `release`
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._open: asyncio.Event
        self._stop: asyncio.Event

    def __enter__(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def requests_for(self, digest: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path.endswith(f"/blobs/{digest}")]

    def pieces_for(self, digest: str) -> list[tuple[int, int]]:
        """The byte bounds of the whole-copy pieces asked for `digest`, in the order asked."""
        return [s.bounds for s in self.requests_for(digest) if s.piece]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._open, self._stop = asyncio.Event(), asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            self._session = session
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _relay(self, request: web.Request) -> web.Response:
        seen = Seen(
            request.path,
            request.headers.get("Range"),
            request.headers.get(PEER_HEADER),
            request.headers.get(PIECE_HEADER) == "1",
        )
        with self._lock:
            self.seen.append(seen)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        if "/blobs/sha256:" in seen.path and seen.whole:
            self.holding.set()
            await self._open.wait()
        elif seen.range is not None and self.tamper is not None:
            first, last = (int(n) for n in seen.range.removeprefix("bytes=").split("-"))
            if self.tamper == "shift":
                headers["Range"] = f"bytes={first + 1}-{last + 1}"
            else:
                del headers["Range"]
        body = await request.read() if request.body_exists else None
        async with self._session.request(
            request.method,
            self.target + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            answer = await up.read()
            out = CIMultiDict((k, v) for k, v in up.headers.items() if k.lower() not in _HOP)
            return web.Response(status=up.status, body=answer, headers=out)


@pytest.fixture(scope="module")
def region_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Regions]:
    with running_regions(tmp_path_factory.mktemp("ranges"), CODES, rtt_ms=RTT) as r:
        yield r


@pytest.fixture
def relay(region_nodes: Regions) -> Iterator[Relay]:
    """syd reaches iad only through a fresh relay for this test (blobs are random: no test sees
    another's); logs and counters count from here."""
    r = region_nodes
    with Relay(r.url("iad")) as gate:
        r.peer_urls["syd"] = {"iad": gate.url}
        r.write_regions()
        r.mark()
        yield gate
    r.peer_urls.clear()
    r.write_regions()


def _transfers_done(r: Regions) -> float:
    return r.metric("syd", 'skyreg_transfers_total{region="syd",result="done"}')


def test_a_range_read_is_answered_from_the_holder_before_the_whole_copy_lands(
    region_nodes: Regions, relay: Relay
) -> None:
    r = region_nodes
    data = os.urandom(8 << 20)
    digest = r.put_blob("iad", "web", data)

    got = r.get_blob("syd", "web", digest, Range="bytes=3000000-3099999")
    assert got.status_code == 206, got.text
    assert got.content == data[3000000:3100000]
    assert got.headers["Content-Range"] == f"bytes 3000000-3099999/{len(data)}"
    assert got.headers["Docker-Content-Digest"] == digest
    tail = r.get_blob("syd", "web", digest, Range="bytes=-100")  # a suffix range too
    assert tail.status_code == 206 and tail.content == data[-100:]

    # The whole copy had started and is held in the relay: syd answered without it.
    assert relay.holding.wait(60), "syd's whole copy never started"
    assert not r.stored("syd", digest).exists()
    assert r.copies(digest) == {"iad"}
    ranged = [s for s in relay.requests_for(digest) if not s.whole]
    assert [(s.range, s.peer) for s in ranged] == [
        ("bytes=3000000-3099999", "syd"),
        (f"bytes={len(data) - 100}-{len(data) - 1}", "syd"),
    ]
    assert r.metric("syd", "skyreg_range_bytes_in_total") == 100000 + 100

    relay.release()
    wait_for(lambda: r.copies(digest) == {"iad", "syd"}, "syd's whole copy recorded")
    assert r.stored("syd", digest).read_bytes() == data
    assert [s.range for s in relay.requests_for(digest) if s.whole] == [None]  # one whole copy
    assert _transfers_done(r) == 1
    assert r.metric("syd", "skyreg_transfer_bytes_in_total") == len(data)

    asked = len(relay.requests_for(digest))
    local = r.get_blob("syd", "web", digest, Range="bytes=5-1000004")
    assert local.status_code == 206 and local.content == data[5:1000005]
    assert len(relay.requests_for(digest)) == asked  # local now: iad is not asked again


def test_a_range_beyond_the_bound_waits_for_the_whole_copy(
    region_nodes: Regions, relay: Relay
) -> None:
    r = region_nodes
    data = os.urandom(MAX_RANGE_THROUGH + (1 << 20))
    digest = r.put_blob("iad", "web", data)
    last = MAX_RANGE_THROUGH  # bytes 0..last: one byte more than a range may ask through regions

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(r.get_blob, "syd", "web", digest, Range=f"bytes=0-{last}")
        assert relay.holding.wait(60), "syd's whole copy never started"
        assert not answer.done()  # it cannot have been answered while the copy is held
        relay.release()
        got = answer.result(timeout=300)
    assert got.status_code == 206
    assert got.content == data[: last + 1]
    assert r.stored("syd", digest).exists()  # answered from syd's own copy...
    asked = relay.requests_for(digest)
    assert all(s.piece for s in asked), asked  # ...with no Range read asked: only the copy's
    # pieces, in order, each at most PIECE bytes, together the blob once
    starts = range(0, len(data), PIECE)
    assert relay.pieces_for(digest) == [(n, min(n + PIECE, len(data)) - 1) for n in starts]
    assert r.metric("syd", "skyreg_range_bytes_in_total") == 0


def test_a_holder_answering_another_range_is_not_passed_on(
    region_nodes: Regions, relay: Relay
) -> None:
    r = region_nodes
    data = os.urandom(4 << 20)
    digest = r.put_blob("iad", "web", data)

    for tamper in ("shift", "strip"):  # iad answers bytes 1001-2000, then the whole blob (200)
        relay.tamper = tamper
        got = r.get_blob("syd", "web", digest, Range="bytes=1000-1999")
        assert got.status_code == 503, (tamper, got.status_code)
        assert got.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert data[1001:1100] not in got.content and data[1000:1100] not in got.content
    assert [s.range for s in relay.requests_for(digest) if not s.whole] == ["bytes=1000-1999"] * 2
    assert r.metric("syd", "skyreg_range_bytes_in_total") == 0

    # A farther holder that answers right is asked next.
    assert r.get_blob("sin", "web", digest).content == data  # sin's own copy (not via the relay)
    wait_for(lambda: "sin" in r.copies(digest), "sin's copy recorded")
    r.mark()
    got = r.get_blob("syd", "web", digest, Range="bytes=1000-1999")
    assert got.status_code == 206 and got.content == data[1000:2000]
    # sin's access log line is written after its answer went out: wait for it, then count.
    wait_for(lambda: r.peer_fetches("sin", digest) >= 1, "sin's access log line")
    assert r.peer_fetches("sin", digest) == 1
    assert not r.stored("syd", digest).exists()  # its whole copy is still held

    relay.tamper = None
    relay.release()
    wait_for(lambda: "syd" in r.copies(digest), "syd's whole copy recorded")
    assert r.stored("syd", digest).read_bytes() == data


def test_a_peer_asking_for_a_range_this_region_lacks_is_refused(
    region_nodes: Regions, relay: Relay
) -> None:
    r = region_nodes
    data = os.urandom(1 << 20)
    digest = r.put_blob("iad", "web", data)

    got = r.get_blob("syd", "web", digest, Range="bytes=0-99", **{PEER_HEADER: "sin"})
    assert got.status_code == 404
    assert got.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert relay.requests_for(digest) == []  # nothing chained on to iad
    assert r.copies(digest) == {"iad"}
    assert "replication_jobs" not in r.rows(digest)  # and no copy started
