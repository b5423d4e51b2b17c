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
import os

import pytest

import skyreg.geo.transfer as transfer_module
from skyreg.geo.transfer import (
    FOREGROUND_BLOB,
    PIECE,
    TransferFailed,
)
from tests.support.holders import (
    BOUND,
    SMALL_PIECE,
    Asked,
    Holder,
    Syd,
    read_through,
    wait_started,
)


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
            await wait_started(holder, copy)
            assert (
                await read_through(transfers, digest, len(data), first, last)
                == data[first : last + 1]
            )
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
            await wait_started(iad, copy)
            got = await read_through(transfers, digest, len(data), first, last)
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
            await wait_started(holder, copy)
            for first, last in (larger, kept, over):
                got = await read_through(transfers, digest, len(data), first, last)
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
