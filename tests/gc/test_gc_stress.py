"""Online GC under load (issue 12): 8 clients push, retag, delete tags, manifests and blobs for
`SKYREG_GC_STRESS_SECONDS` seconds (default 60) while GC runs with a 1 s review delay, on
PostgreSQL + S3 (SeaweedFS) with two nodes and on SQLite + filesystem.

Layers come from small pools shared across the two orgs: each pair of clients (one per org)
pushes and deletes the same few layers, which only their two repositories link, so a digest is
pushed in one org while the other deletes its last link; a few common layers every client
uses. Each client owns one repository (and so its tags), and keeps an exact model of what the
registry acknowledged: a manifest PUT answered 201 with tag T is what T pulls until the client
itself moves or deletes T. A manifest PUT refused with MANIFEST_BLOB_UNKNOWN (GC took a blob
nothing referenced any more, after the delay) is allowed and counted (the counts are printed);
a 201 followed by a pull that fails or differs is a failure.

At the end every tag pulls byte-identical through every node; once the GC queues are empty the
database and the store hold every referenced blob and none that nothing references or links,
no link that no manifest of its repository references, and no untagged manifest.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.support.gcload import (
    GcRegistry,
    OciClient,
    Org,
    garbage_problems,
    holdings,
    image_manifest,
    manifest_blobs,
    sha256,
    untidy_problems,
    wait_for_gc_drain,
)

pytestmark = pytest.mark.slow

DURATION = float(os.environ.get("SKYREG_GC_STRESS_SECONDS", "60"))
CLIENTS = 8
REVIEW_DELAY = 1.0  # --gc-review-delay of GC_SERVE_ARGS
EARLY_REFUSAL = "manifest PUT refused within the review delay of its uploads"
TAGS = ("t0", "t1", "t2", "t3")
CONTESTED_LAYERS = 3  # per pair of clients, one in each org: linked in those two repositories
COMMON_LAYERS = 6  # drawn by every client
# How often each operation is drawn (a client with nothing to act on pushes instead).
WEIGHTS = {
    "push_tagged": 28,
    "push_untagged": 8,
    "retag": 14,
    "delete_tag": 10,
    "delete_manifest": 10,
    "delete_blob": 20,
    "pull": 14,
}


@dataclass
class Shared:
    """What every client draws from and reports to."""

    contested: list[list[bytes]]  # one pool per pair of clients (clients 2k and 2k + 1)
    common: list[bytes]
    blobs: dict[str, bytes]  # every blob any client pushed, by digest
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@dataclass
class Model:
    """One client's exact view of its repository, from its own acknowledged operations."""

    repo: str
    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    manifests: dict[str, bytes] = field(default_factory=dict)  # every acknowledged manifest
    live: set[str] = field(default_factory=set)  # acknowledged, not deleted by this client
    history: list[str] = field(default_factory=list)  # acknowledged operations, in order


class StressClient:
    """One of the 8 clients: its own repository in its org, random operations until the
    deadline, every answer checked against its model."""

    def __init__(
        self,
        index: int,
        oci: OciClient,
        urls: list[str],
        siblings: list[str],
        shared: Shared,
    ) -> None:
        self.index = index
        self.oci = oci
        self.urls = urls
        self.siblings = siblings  # the other repositories of this org (mount sources)
        self.shared = shared
        self.model = Model(f"{oci.org.app}/c{index}")
        self.layers = shared.contested[index // 2]
        self.rng = random.Random(index)
        self.serial = 0
        self.skipped = False  # the last push skipped an upload (its blob was there already)

    def node(self) -> str:
        return self.rng.choice(self.urls)

    def fail(self, what: str) -> None:
        recent = "; ".join(self.model.history[-8:])
        self.shared.failures.append(f"client {self.index} ({self.model.repo}): {what} [{recent}]")

    def count(self, outcome: str) -> None:
        self.shared.outcomes[outcome] += 1

    async def run(self, deadline: float) -> None:
        ops = list(WEIGHTS)
        weights = list(WEIGHTS.values())
        while time.monotonic() < deadline:
            op = self.rng.choices(ops, weights)[0]
            if op == "push_tagged":
                await self.push(tagged=True)
            elif op == "push_untagged":
                await self.push(tagged=False)
            elif op == "retag" and self.model.manifests:
                await self.retag()
            elif op == "delete_tag" and self.model.tags:
                await self.delete_tag()
            elif op == "delete_manifest" and self.model.live:
                await self.delete_manifest()
            elif op == "delete_blob":
                await self.delete_blob()
            elif op == "pull" and self.model.tags:
                await self.pull()
            else:
                await self.push(tagged=True)

    async def upload(self, blob: bytes) -> bool:
        """Put `blob` in the repository one of five ways; False (a failure) unless stored."""
        mode = self.rng.choice(["head-first", "monolithic", "chunked", "post-put", "mount"])
        base, repo = self.node(), self.model.repo
        if mode == "head-first":  # as docker does: skip what the repository already has
            head = await self.oci.head_blob(base, repo, sha256(blob))
            if head.status == 200:
                self.count("upload skipped (present)")
                self.skipped = True
                return True
            reply = await self.oci.upload_monolithic(base, repo, blob)
        elif mode == "monolithic":
            reply = await self.oci.upload_monolithic(base, repo, blob)
        elif mode == "chunked":
            reply = await self.oci.upload_chunked(base, repo, blob, self.rng.randint(1, 3))
        elif mode == "post-put":
            reply = await self.oci.upload_post_put(base, repo, blob)
        else:
            source = self.rng.choice(self.siblings)
            reply = await self.oci.upload_mount(base, repo, blob, source)
        if reply.status != 201:
            self.fail(f"{mode} upload of {sha256(blob)} answered {reply.describe()}")
            return False
        self.count(f"upload {mode}")
        return True

    async def push(self, tagged: bool) -> None:
        """Upload a fresh config, 1-2 layers of this client's contested pool (which the client
        of the other org in its pair pushes and deletes too) and maybe a common one, then PUT
        the manifest by tag or digest."""
        self.serial += 1
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "client": self.index, "n": self.serial}
        ).encode()
        self.shared.blobs[sha256(config)] = config
        layers = self.rng.sample(self.layers, self.rng.randint(1, 2))
        layers += self.rng.sample(self.shared.common, self.rng.randint(0, 1))
        started, self.skipped = time.monotonic(), False
        for blob in [config, *layers]:
            if not await self.upload(blob):
                return
        manifest = image_manifest(config, layers)
        await self.put(manifest, self.rng.choice(TAGS) if tagged else None, started)

    async def retag(self) -> None:
        """PUT a manifest pushed before (perhaps deleted or collected since) under a tag."""
        digest = self.rng.choice(sorted(self.model.manifests))
        await self.put(self.model.manifests[digest], self.rng.choice(TAGS))

    async def put(self, manifest: bytes, tag: str | None, started: float | None = None) -> None:
        """PUT `manifest` by `tag` (or digest) and note the answer in the model. `started`:
        when this push's uploads began; a refusal within the review delay of that, when every
        blob was uploaded (none skipped), means GC reviewed a link before its time: counted
        apart (not asserted: timing), for the lead to look at."""
        digest = sha256(manifest)
        reply = await self.oci.put_manifest(self.node(), self.model.repo, tag or digest, manifest)
        if reply.status == 201:
            self.model.manifests[digest] = manifest
            self.model.live.add(digest)
            if tag is not None:
                self.model.tags[tag] = digest
            self.model.history.append(f"PUT {tag or digest[:19]} -> {digest[:19]}")
            self.count("manifest PUT acknowledged")
        elif "MANIFEST_BLOB_UNKNOWN" in reply.codes():
            self.count("manifest PUT refused (MANIFEST_BLOB_UNKNOWN)")
            early = started is not None and time.monotonic() - started < REVIEW_DELAY
            if early and not self.skipped:
                self.count(EARLY_REFUSAL)
        else:
            self.fail(f"manifest PUT {tag or digest} answered {reply.describe()}")

    async def delete_tag(self) -> None:
        tag = self.rng.choice(sorted(self.model.tags))
        reply = await self.oci.delete_manifest(self.node(), self.model.repo, tag)
        if reply.status != 202:
            self.fail(f"DELETE tag {tag} (-> {self.model.tags[tag]}) answered {reply.describe()}")
            return
        del self.model.tags[tag]
        self.model.history.append(f"DELETE {tag}")
        self.count("tag deleted")

    async def delete_manifest(self) -> None:
        """DELETE a manifest by digest: its tags go with it. A tagged one must be there; an
        untagged one GC may have collected already (MANIFEST_UNKNOWN)."""
        digest = self.rng.choice(sorted(self.model.live))
        tagged = sorted(t for t, d in self.model.tags.items() if d == digest)
        reply = await self.oci.delete_manifest(self.node(), self.model.repo, digest)
        if reply.status == 202:
            for tag in tagged:
                del self.model.tags[tag]
            self.model.live.discard(digest)
            self.model.history.append(f"DELETE {digest[:19]} (tags {tagged})")
            self.count("manifest deleted")
        elif not tagged and "MANIFEST_UNKNOWN" in reply.codes():
            self.model.live.discard(digest)
            self.count("manifest delete: collected already")
        else:
            self.fail(f"DELETE manifest {digest} (tags {tagged}) answered {reply.describe()}")

    async def delete_blob(self) -> None:
        """DELETE a layer of this client's contested pool, or a blob of a manifest it pushed,
        that no manifest it still has references (so no tag loses a blob); linked or not
        (BLOB_UNKNOWN), both are fine."""
        referenced = {
            digest for m in self.model.live for digest in manifest_blobs(self.model.manifests[m])
        }
        own = {
            digest
            for m in self.model.manifests
            for digest in manifest_blobs(self.model.manifests[m])
        }
        candidates = sorted(({sha256(layer) for layer in self.layers} | own) - referenced)
        if not candidates:
            return
        digest = self.rng.choice(candidates)
        reply = await self.oci.delete_blob(self.node(), self.model.repo, digest)
        if reply.status == 202:
            self.count("blob deleted")
        elif "BLOB_UNKNOWN" in reply.codes():
            self.count("blob delete: not linked")
        else:
            self.fail(f"DELETE blob {digest} answered {reply.describe()}")

    async def pull(self) -> None:
        tag = self.rng.choice(sorted(self.model.tags))
        digest = self.model.tags[tag]
        problems = await self.oci.pull_problems(
            self.node(), self.model.repo, tag, self.model.manifests[digest], self.shared.blobs
        )
        for problem in problems:
            self.fail(f"pull during the load: {problem}")
        self.count("pull checked")

    async def pull_every_tag(self) -> list[str]:
        """Pull each tag of the model through every node: what differs."""
        problems = []
        for tag, digest in sorted(self.model.tags.items()):
            for base in self.urls:
                problems += await self.oci.pull_problems(
                    base, self.model.repo, tag, self.model.manifests[digest], self.shared.blobs
                )
        return problems


def make_clients(
    reg: GcRegistry, session: aiohttp.ClientSession, shared: Shared
) -> list[StressClient]:
    """8 clients, alternating between the two orgs, each with its own repository."""

    def org_of(index: int) -> Org:
        return reg.orgs[index % len(reg.orgs)]

    clients = []
    for index in range(CLIENTS):
        org = org_of(index)
        siblings = [f"{org.app}/c{i}" for i in range(CLIENTS) if i != index and org_of(i) == org]
        clients.append(StressClient(index, OciClient(session, org), reg.urls, siblings, shared))
    return clients


async def _load(reg: GcRegistry, shared: Shared) -> list[Model]:
    """Run the clients for DURATION seconds, then pull every tag of every model."""
    async with aiohttp.ClientSession() as session:
        clients = make_clients(reg, session, shared)
        deadline = time.monotonic() + DURATION
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(client.run(deadline))
        for client in clients:
            shared.failures += [f"final pull: {p}" for p in await client.pull_every_tag()]
        return [client.model for client in clients]


async def _pull_all(reg: GcRegistry, shared: Shared, models: list[Model]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        clients = make_clients(reg, session, shared)
        problems = []
        for client, model in zip(clients, models, strict=True):
            client.model = model
            problems += await client.pull_every_tag()
        return problems


def test_gc_under_load_keeps_every_acknowledged_tag_and_collects_the_rest(
    gc_reg: GcRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(12)

    def layer() -> bytes:
        return rng.randbytes(rng.choice([900, 20_000, 150_000, 600_000]))

    contested = [[layer() for _ in range(CONTESTED_LAYERS)] for _ in range(CLIENTS // 2)]
    common = [layer() for _ in range(COMMON_LAYERS)]
    everything = [*common, *(blob for pool in contested for blob in pool)]
    shared = Shared(contested, common, {sha256(blob): blob for blob in everything})
    for always in ("manifest PUT refused (MANIFEST_BLOB_UNKNOWN)", EARLY_REFUSAL):
        shared.outcomes[always] += 0  # printed even when none happened
    models = asyncio.run(_load(gc_reg, shared))
    summary = ", ".join(f"{name}: {n}" for name, n in sorted(shared.outcomes.items()))
    with capsys.disabled():
        print(f"\n[{gc_reg.backing}, {DURATION:.0f} s] {summary}")
    assert not shared.failures, "\n".join(shared.failures[:40]) + "\n" + gc_reg.logs()
    assert shared.outcomes["manifest PUT acknowledged"] > 0

    wait_for_gc_drain(gc_reg)
    held = holdings(gc_reg)
    expected_tags = {
        (model.repo, tag): digest for model in models for tag, digest in model.tags.items()
    }
    assert held.tags == expected_tags
    problems = garbage_problems(held, set(shared.blobs)) + untidy_problems(held)
    assert not problems, "\n".join(problems[:40])
    # What the drained GC kept still pulls, byte for byte, through every node.
    after = asyncio.run(_pull_all(gc_reg, shared, models))
    assert not after, "\n".join(after[:40]) + "\n" + gc_reg.logs()
