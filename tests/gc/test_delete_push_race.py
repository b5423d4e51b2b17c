"""Regression (issue 12): when org B deletes a blob at the moment org A pushes the same digest,
A's upload was acknowledged (201) and A's later pull answered BLOB_UNKNOWN (21 of 150 tries):
B's DELETE, finding itself the last link, deleted the bytes after A had linked its new copy.

Each round (`SKYREG_GC_RACE_ROUNDS`, default 150) B holds a fresh blob X, referenced by a tagged
manifest in half the rounds, and deletes it (the manifest, then the blob) while A uploads X
(monolithic or chunked) and pushes a manifest referencing it, through another node where there
are two. Whenever A's manifest PUT was acknowledged, A's pull of it and of every blob must work,
at once, and through every node after GC has reviewed everything.

The second test moves A's push to the moment GC, a review delay after B's DELETE, collects X
(`SKYREG_GC_RACE_LATE_ROUNDS`, default 60, ten at a time): the upload must cancel the pending
deletion of X's bytes or find them deleted before it installs its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.support.gcload import (
    GcRegistry,
    OciClient,
    Reply,
    blob_row_exists,
    garbage_problems,
    holdings,
    image_manifest,
    sha256,
    untidy_problems,
    wait_for_gc_drain,
)

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("SKYREG_GC_RACE_ROUNDS", "150"))
PARALLEL = 3  # rounds at once (each its own blob and tag): the same races, sooner
MAX_JITTER = 0.015  # seconds one side may start after the other: spreads the interleavings
LATE_ROUNDS = int(os.environ.get("SKYREG_GC_RACE_LATE_ROUNDS", "60"))
LATE_PARALLEL = 10


@dataclass
class Race:
    """The two orgs' clients, where each talks, and what the rounds gave."""

    a: OciClient
    b: OciClient
    a_url: str
    b_url: str
    urls: list[str]
    reg: GcRegistry
    blobs: dict[str, bytes] = field(default_factory=dict)
    acknowledged: dict[str, bytes] = field(default_factory=dict)  # A's tag -> its manifest
    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)

    @property
    def a_repo(self) -> str:
        return f"{self.a.org.app}/race"

    @property
    def b_repo(self) -> str:
        return f"{self.b.org.app}/race"


def _expect(reply: Reply, status: int, what: str) -> Reply:
    assert reply.status == status, f"{what}: {reply.describe()}"
    return reply


def _config(org: str, n: int) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "org": org, "round": n}).encode()


async def _round(race: Race, n: int, late: bool) -> None:
    """One round; `late`: B's delete is done first, and A pushes about when GC, a review delay
    later, collects X (not in the issue's race, but the same bytes at stake)."""
    rng = random.Random(n)
    x = rng.randbytes(rng.randint(20_000, 400_000))
    referenced = n % 2 == 1
    chunked = n % 4 >= 2
    tag = f"r{n}"
    race.blobs[sha256(x)] = x

    # B holds X (and, in odd rounds, a tagged manifest referencing it).
    config_b = _config("b", n)
    b_manifest = image_manifest(config_b, [x]) if referenced else None
    for _ in range(3):  # a refusal (GC took a blob of a slow push: allowed) is pushed again
        for blob in [x, config_b] if referenced else [x]:
            race.blobs[sha256(blob)] = blob
            stored = await race.b.upload_monolithic(race.b_url, race.b_repo, blob)
            _expect(stored, 201, "B's upload")
        if b_manifest is None:
            break
        put = await race.b.put_manifest(race.b_url, race.b_repo, tag, b_manifest)
        if put.status == 201:
            break
        assert "MANIFEST_BLOB_UNKNOWN" in put.codes(), f"B's manifest: {put.describe()}"
    else:
        raise AssertionError("B's manifest was refused 3 times")
    # A has its config (late: right after X, or GC takes it while A waits), and for a chunked upload
    # every byte of X but the final PUT (an upload session is no GC's business).
    config_a = _config("a", n)
    race.blobs[sha256(config_a)] = config_a

    async def a_config() -> None:
        upload = await race.a.upload_monolithic(race.a_url, race.a_repo, config_a)
        _expect(upload, 201, "A's config")

    if not late:
        await a_config()
    location = None
    if chunked:
        begun = await race.a.begin_chunked(race.a_url, race.a_repo, x, 2)
        location = _expect(begun, 202, "A's chunks").location
    a_manifest = image_manifest(config_a, [x])
    b_first = late or rng.random() < 0.5
    jitter = 0.0 if late else rng.uniform(0, MAX_JITTER)

    async def b_deletes() -> None:
        if not b_first:
            await asyncio.sleep(jitter)
        if b_manifest is not None:
            gone = await race.b.delete_manifest(race.b_url, race.b_repo, sha256(b_manifest))
            _expect(gone, 202, "B's manifest DELETE")
        reply = await race.b.delete_blob(race.b_url, race.b_repo, sha256(x))
        assert reply.status == 202 or "BLOB_UNKNOWN" in reply.codes(), reply.describe()

    async def a_pushes() -> Reply:
        if b_first:
            await asyncio.sleep(jitter)
        if location is None:
            uploaded = await race.a.upload_monolithic(race.a_url, race.a_repo, x)
        else:
            uploaded = await race.a.finish(race.a_url, location, sha256(x))
        _expect(uploaded, 201, f"A's {'chunked' if chunked else 'monolithic'} upload of X")
        if late:
            await a_config()
        return await race.a.put_manifest(race.a_url, race.a_repo, tag, a_manifest)

    if late:
        await b_deletes()
        await _until_collected(race.reg, sha256(x))
        pushed = await a_pushes()
    else:
        _, pushed = await asyncio.gather(b_deletes(), a_pushes())
    if pushed.status != 201:
        assert "MANIFEST_BLOB_UNKNOWN" in pushed.codes(), pushed.describe()
        race.outcomes["A's manifest PUT refused (MANIFEST_BLOB_UNKNOWN)"] += 1
        return
    race.outcomes["A's manifest PUT acknowledged"] += 1
    race.acknowledged[tag] = a_manifest
    problems = await race.a.pull_problems(race.a_url, race.a_repo, tag, a_manifest, race.blobs)
    if problems:
        mode = "chunked" if chunked else "monolithic"
        state = "referenced" if referenced else "unreferenced"
        race.lost.append(f"round {n} ({mode}, X {state} in B): {'; '.join(problems)}")


async def _until_collected(reg: GcRegistry, digest: str) -> None:
    """Poll (5 ms) until GC's review has deleted `digest`'s row, which queues the deletion of
    its bytes; a push now races that deletion."""
    deadline = asyncio.get_running_loop().time() + 30
    while await asyncio.to_thread(blob_row_exists, reg, digest):
        assert asyncio.get_running_loop().time() < deadline, f"GC never collected {digest}"
        await asyncio.sleep(0.005)


async def _rounds(reg: GcRegistry, count: int, parallel: int, late: bool) -> Race:
    async with aiohttp.ClientSession() as session:
        a_org, b_org = reg.orgs
        race = Race(
            OciClient(session, a_org),
            OciClient(session, b_org),
            a_url=reg.urls[-1],
            b_url=reg.urls[0],
            urls=reg.urls,
            reg=reg,
        )
        for first in range(0, count, parallel):
            batch = range(first, min(count, first + parallel))
            await asyncio.gather(*(_round(race, n, late) for n in batch))
        return race


async def _pull_acknowledged(reg: GcRegistry, race: Race) -> list[str]:
    async with aiohttp.ClientSession() as session:
        a = OciClient(session, race.a.org)
        problems = []
        for tag, manifest in sorted(race.acknowledged.items()):
            for base in reg.urls:
                problems += await a.pull_problems(base, race.a_repo, tag, manifest, race.blobs)
        return problems


def _check(reg: GcRegistry, race: Race, count: int) -> None:
    """No acknowledged push lost a byte, at once or once GC has reviewed everything the rounds
    enqueued; then A's images are whole and everything of B's is gone."""
    acknowledged = race.outcomes["A's manifest PUT acknowledged"]
    assert not race.lost, (
        f"{len(race.lost)} of {count} rounds: A's push was acknowledged and its pull failed "
        f"({dict(race.outcomes)}):\n" + "\n".join(race.lost[:20])
    )
    assert acknowledged > 0, dict(race.outcomes)
    wait_for_gc_drain(reg)
    after = asyncio.run(_pull_acknowledged(reg, race))
    assert not after, "\n".join(after[:20]) + "\n" + reg.logs()
    held = holdings(reg)
    assert {repo for repo, _ in held.manifests} == {race.a_repo}
    problems = garbage_problems(held, set(race.blobs)) + untidy_problems(held)
    assert not problems, "\n".join(problems[:40])


def test_a_push_racing_another_orgs_delete_of_the_same_blob_keeps_its_bytes(
    gc_reg: GcRegistry,
) -> None:
    _check(gc_reg, asyncio.run(_rounds(gc_reg, ROUNDS, PARALLEL, late=False)), ROUNDS)


def test_a_push_as_gc_collects_the_blob_another_org_deleted_keeps_its_bytes(
    gc_reg: GcRegistry,
) -> None:
    _check(gc_reg, asyncio.run(_rounds(gc_reg, LATE_ROUNDS, LATE_PARALLEL, late=True)), LATE_ROUNDS)
