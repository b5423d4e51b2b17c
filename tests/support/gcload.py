"""Real registries with online GC on (a 1 s review delay), two orgs pushing into them over the
OCI API with aiohttp, and what the tests check afterwards: the GC queues drain, and the database
and the store hold exactly the blobs something still references.

A support module for `tests/gc/`, not a test module. The registries are `skyreg serve` processes
(tests/support/servers.py): one on SQLite + filesystem, or two nodes on one PostgreSQL database
and one S3 bucket (SeaweedFS).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import sqlalchemy
from sqlalchemy import func, select

from skyreg.meta import schema as s
from tests.support.servers import RunningRegistry, scaleout_backing

# GC on, and quick: anything enqueued is reviewed a second later, workers look 5 times a second.
GC_SERVE_ARGS = ["--gc-review-delay", "1", "--gc-interval", "0.2"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120)
DRAIN_TIMEOUT = 120.0  # seconds for the GC queues to empty once the load stopped


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(config: bytes, layers: list[bytes]) -> bytes:
    """An OCI image manifest referencing `config` and `layers` (by digest and size)."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)}
                for layer in layers
            ],
        }
    ).encode()


def manifest_blobs(manifest: bytes) -> list[str]:
    """The digests an image manifest references: its config, then its layers."""
    doc = json.loads(manifest)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


# -- the registry under test ---------------------------------------------------------------------


@dataclass(frozen=True)
class Org:
    """An org, its one app (the first component of its repositories) and an org token."""

    name: str
    app: str
    token: str


@dataclass
class GcRegistry:
    """One registry with GC on: its nodes (same metadata, same store), two orgs, and direct
    access to its database and store for the checks."""

    backing: str
    nodes: list[RunningRegistry]
    orgs: list[Org]
    metadata_url: str
    s3: Any = None  # a botocore client on the registry's bucket (S3 backing)
    bucket: str = ""
    prefix: str = ""
    _engine: sqlalchemy.Engine | None = field(default=None, repr=False)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def engine(self) -> sqlalchemy.Engine:
        """An engine on the registry's metadata database (for reads only)."""
        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.metadata_url)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def stored_digests(self) -> set[str]:
        """Every blob whose bytes the store holds (files under the data dir's `blobs/`, or keys
        under the bucket prefix's `blobs/`)."""
        found: set[str] = set()
        if self.s3 is None:
            root = self.nodes[0].data_dir / "blobs"
            for path in root.rglob("*"):
                if path.is_file():
                    found.add(f"{path.parent.parent.name}:{path.name}")
            return found
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}blobs/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                algorithm, _, hex_digest = (
                    obj["Key"].removeprefix(f"{self.prefix}blobs/").split("/")
                )
                found.add(f"{algorithm}:{hex_digest}")
        return found

    def logs(self) -> str:
        """The tail of every node's log, for failure messages."""
        return "\n".join(
            f"--- node {i} ({node.url}):\n" + "\n".join(node.log().splitlines()[-60:])
            for i, node in enumerate(self.nodes)
        )


def _admin_post(url: str, admin: str, path: str, body: dict[str, str]) -> dict[str, Any]:
    resp = requests.post(f"{url}/api/v1/{path}", json=body, auth=("x", admin), timeout=30)
    assert resp.status_code == 201, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def _make_orgs(url: str, admin: str) -> list[Org]:
    """Two orgs with an app and an org token each, through the management API."""
    orgs = []
    for name, app in (("gc-alpha", "alpha"), ("gc-beta", "beta")):
        _admin_post(url, admin, "orgs", {"name": name})
        _admin_post(url, admin, "apps", {"name": app, "org": name})
        token = _admin_post(url, admin, "tokens", {"kind": "org", "org": name})["secret"]
        orgs.append(Org(name, app, str(token)))
    return orgs


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@contextlib.contextmanager
def gc_registry(request: pytest.FixtureRequest, root: Path, backing: str) -> Iterator[GcRegistry]:
    """A registry with GC on (GC_SERVE_ARGS) on `backing`: "embedded" is one `skyreg serve` on
    SQLite + filesystem; "s3+postgresql" two nodes on one fresh database and bucket. Every node
    is stopped and the backing dropped afterwards."""
    with contextlib.ExitStack() as stack:
        if backing == "embedded":
            args: list[str] = []
            env: dict[str, str] = {}
            count = 1
        else:
            args, env = stack.enter_context(scaleout_backing(request))
            count = 2
        nodes = [
            RunningRegistry(data_dir=root / f"node{i}", extra_args=[*args, *GC_SERVE_ARGS], env=env)
            for i in range(count)
        ]
        for node in nodes:
            stack.callback(node.stop)
            node.start()  # the first creates the admin token (in its data dir and the database)
        admin = (nodes[0].data_dir / "admin-token").read_text().strip()
        orgs = _make_orgs(nodes[0].url, admin)
        if backing == "embedded":
            reg = GcRegistry(backing, nodes, orgs, f"sqlite:///{nodes[0].data_dir / 'skyreg.db'}")
        else:
            bucket, _, prefix = _option(args, "--storage").removeprefix("s3://").partition("/")
            reg = GcRegistry(
                backing,
                nodes,
                orgs,
                _option(args, "--database-url"),
                s3=request.getfixturevalue("seaweedfs").client(),
                bucket=bucket,
                prefix=f"{prefix}/" if prefix else "",
            )
        stack.callback(reg.close)
        yield reg


# -- the OCI API, from a client's side ----------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A response: status, the headers that matter here, the whole body."""

    status: int
    body: bytes
    location: str | None = None

    def codes(self) -> list[str]:
        """The error codes of a spec error body (none when it is not one)."""
        try:
            return [str(e["code"]) for e in json.loads(self.body)["errors"]]
        except (ValueError, KeyError, TypeError):
            return []

    def describe(self) -> str:
        """The status and the error codes (or the start of the body)."""
        codes = self.codes()
        return f"{self.status} {' '.join(codes) if codes else repr(self.body[:200])}"


class OciClient:
    """One org's client of the OCI distribution API over an aiohttp session (Basic auth with
    the org's token); every method takes the node to talk to."""

    def __init__(self, session: aiohttp.ClientSession, org: Org) -> None:
        self.session = session
        self.org = org
        basic = base64.b64encode(f"x:{org.token}".encode()).decode()
        self._auth = {"Authorization": f"Basic {basic}"}

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        async with self.session.request(
            method,
            url,
            data=data,
            params=params,
            headers={**self._auth, **(headers or {})},
            timeout=REQUEST_TIMEOUT,
            allow_redirects=False,
        ) as resp:
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError as e:  # e.g. a blob's bytes vanished mid-answer
                return Reply(0, f"{resp.status} cut off: {e}".encode())
            return Reply(resp.status, body, resp.headers.get("Location"))

    async def upload_monolithic(self, base: str, repo: str, data: bytes) -> Reply:
        """POST ?digest= with the whole blob (201 when stored)."""
        return await self.request(
            "POST",
            f"{base}/v2/{repo}/blobs/uploads/",
            data=data,
            params={"digest": sha256(data)},
            headers={"Content-Type": "application/octet-stream"},
        )

    async def open_upload(self, base: str, repo: str) -> Reply:
        """POST a session (202 with its Location)."""
        return await self.request("POST", f"{base}/v2/{repo}/blobs/uploads/")

    async def patch(self, base: str, location: str, chunk: bytes, offset: int) -> Reply:
        """PATCH one chunk at `offset` (202 with the next Location)."""
        return await self.request(
            "PATCH",
            base + location,
            data=chunk,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            },
        )

    async def begin_chunked(self, base: str, repo: str, data: bytes, chunks: int) -> Reply:
        """Open a session and PATCH `data` in `chunks` pieces; the last answer (202 and the
        Location to finish at, or the first failure)."""
        opened = await self.open_upload(base, repo)
        if opened.status != 202 or opened.location is None:
            return opened
        step = max(1, -(-len(data) // chunks))
        reply = opened
        for offset in range(0, len(data), step):
            assert reply.location is not None
            reply = await self.patch(base, reply.location, data[offset : offset + step], offset)
            if reply.status != 202 or reply.location is None:
                return reply
        return reply

    async def finish(self, base: str, location: str, digest: str, tail: bytes = b"") -> Reply:
        """PUT ?digest= on an upload session, with the last bytes (201 when stored)."""
        return await self.request(
            "PUT",
            base + location,
            data=tail,
            params={"digest": digest},
            headers={"Content-Type": "application/octet-stream"},
        )

    async def upload_chunked(self, base: str, repo: str, data: bytes, chunks: int) -> Reply:
        """A chunked upload: POST, PATCH x `chunks`, PUT ?digest= (201 when stored)."""
        begun = await self.begin_chunked(base, repo, data, chunks)
        if begun.status != 202 or begun.location is None:
            return begun
        return await self.finish(base, begun.location, sha256(data))

    async def upload_post_put(self, base: str, repo: str, data: bytes) -> Reply:
        """POST a session, then PUT ?digest= with the whole blob (201 when stored)."""
        opened = await self.open_upload(base, repo)
        if opened.status != 202 or opened.location is None:
            return opened
        return await self.finish(base, opened.location, sha256(data), data)

    async def upload_mount(self, base: str, repo: str, data: bytes, source: str) -> Reply:
        """POST ?mount=&from=: 201 when mounted; a 202 (not mountable) is finished with the
        bytes, as clients do."""
        mounted = await self.request(
            "POST",
            f"{base}/v2/{repo}/blobs/uploads/",
            params={"mount": sha256(data), "from": source},
        )
        if mounted.status != 202 or mounted.location is None:
            return mounted
        return await self.finish(base, mounted.location, sha256(data), data)

    async def head_blob(self, base: str, repo: str, digest: str) -> Reply:
        return await self.request("HEAD", f"{base}/v2/{repo}/blobs/{digest}")

    async def get_blob(self, base: str, repo: str, digest: str) -> Reply:
        return await self.request("GET", f"{base}/v2/{repo}/blobs/{digest}")

    async def delete_blob(self, base: str, repo: str, digest: str) -> Reply:
        return await self.request("DELETE", f"{base}/v2/{repo}/blobs/{digest}")

    async def put_manifest(self, base: str, repo: str, reference: str, manifest: bytes) -> Reply:
        return await self.request(
            "PUT",
            f"{base}/v2/{repo}/manifests/{reference}",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )

    async def get_manifest(self, base: str, repo: str, reference: str) -> Reply:
        return await self.request(
            "GET", f"{base}/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        )

    async def delete_manifest(self, base: str, repo: str, reference: str) -> Reply:
        """DELETE by digest (the manifest and its tags) or by tag (that tag only)."""
        return await self.request("DELETE", f"{base}/v2/{repo}/manifests/{reference}")

    async def pull_problems(
        self, base: str, repo: str, reference: str, manifest: bytes, blobs: dict[str, bytes]
    ) -> list[str]:
        """Pull `reference` and every blob its manifest references: what differs from
        `manifest` and the bytes in `blobs` (nothing when the pull is byte-identical)."""
        where = f"{base}/v2/{repo} {reference}"
        got = await self.get_manifest(base, repo, reference)
        if got.status != 200 or got.body != manifest:
            return [f"{where}: manifest answered {got.describe()}"]
        problems = []
        for digest in manifest_blobs(manifest):
            blob = await self.get_blob(base, repo, digest)
            if blob.status != 200:
                problems.append(f"{where}: blob {digest} answered {blob.describe()}")
            elif blob.body != blobs[digest]:
                problems.append(f"{where}: blob {digest} has other bytes ({len(blob.body)})")
        return problems


# -- what the database and the store hold afterwards ---------------------------------------------


def gc_queue_depths(reg: GcRegistry) -> dict[str, int]:
    """Rows in each GC queue: blob reviews, manifest reviews, byte deletions."""
    with reg.engine().connect() as conn:
        return {
            name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            for name, table in (
                ("blob reviews", s.gc_blob_reviews),
                ("manifest reviews", s.gc_manifest_reviews),
                ("deletions", s.gc_blob_deletions),
            )
        }


def blob_row_exists(reg: GcRegistry, digest: str) -> bool:
    """Whether the database has a `blobs` row for `digest` (GC's review deletes it)."""
    with reg.engine().connect() as conn:
        found = conn.execute(select(s.blobs.c.digest).where(s.blobs.c.digest == digest)).first()
        return found is not None


def wait_for_gc_drain(reg: GcRegistry, timeout: float = DRAIN_TIMEOUT) -> None:
    """Poll until every GC queue is empty (the load must have stopped); at the deadline, fail
    with the rows still queued (their attempts and last errors) and the nodes' logs."""
    deadline = time.monotonic() + timeout
    while True:
        depths = gc_queue_depths(reg)
        if not any(depths.values()):
            return
        if time.monotonic() > deadline:
            with reg.engine().connect() as conn:
                left = [
                    dict(row._mapping)
                    for table in (s.gc_blob_reviews, s.gc_manifest_reviews, s.gc_blob_deletions)
                    for row in conn.execute(select(table).limit(10))
                ]
            raise AssertionError(
                f"GC queues still hold {depths} after {timeout:.0f} s: {left}\n{reg.logs()}"
            )
        time.sleep(0.2)


@dataclass(frozen=True)
class Holdings:
    """What the metadata and the store hold, read once the GC queues are empty."""

    blob_rows: set[str]
    links: set[tuple[str, str]]  # (repository, digest)
    references: set[tuple[str, str]]  # (repository, blob digest) a manifest there references
    manifests: set[tuple[str, str]]  # (repository, digest)
    tags: dict[tuple[str, str], str]  # (repository, tag) -> manifest digest
    stored: set[str]

    @property
    def referenced(self) -> set[str]:
        return {digest for _, digest in self.references}

    @property
    def linked(self) -> set[str]:
        return {digest for _, digest in self.links}


def holdings(reg: GcRegistry) -> Holdings:
    """Read the blobs, links, manifests, references and tags, then list the store."""
    repo = s.repositories
    with reg.engine().connect() as conn:
        blob_rows = set(conn.execute(select(s.blobs.c.digest)).scalars())
        links = {
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                select(repo.c.name, s.repository_blobs.c.digest).join(
                    repo, repo.c.id == s.repository_blobs.c.repository_id
                )
            )
        }
        refs = s.manifest_references
        references = {
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                select(repo.c.name, refs.c.child_digest)
                .join(repo, repo.c.id == refs.c.repository_id)
                .where(refs.c.kind == "blob")
            )
        }
        manifests = {
            (str(r[0]), str(r[1]))
            for r in conn.execute(
                select(repo.c.name, s.manifests.c.digest).join(
                    repo, repo.c.id == s.manifests.c.repository_id
                )
            )
        }
        tags = {
            (str(r[0]), str(r[1])): str(r[2])
            for r in conn.execute(
                select(repo.c.name, s.tags.c.name, s.tags.c.manifest_digest).join(
                    repo, repo.c.id == s.tags.c.repository_id
                )
            )
        }
    return Holdings(blob_rows, links, references, manifests, tags, reg.stored_digests())


def garbage_problems(held: Holdings, known: set[str]) -> list[str]:
    """What a drained GC left wrong: a referenced blob missing from the database or the store,
    or a blob nothing references nor links (among `known`, what the test pushed, and whatever
    the database or store holds) still in either."""
    problems = []
    for digest in sorted(held.referenced - held.blob_rows):
        problems.append(f"{digest} is referenced but has no blobs row")
    for digest in sorted(held.referenced - held.stored):
        problems.append(f"{digest} is referenced but its bytes are gone from the store")
    for digest in sorted((known | held.blob_rows | held.stored) - held.referenced - held.linked):
        if digest in held.blob_rows:
            problems.append(f"{digest} is neither referenced nor linked but has a blobs row")
        if digest in held.stored:
            problems.append(f"{digest} is neither referenced nor linked but its bytes remain")
    return problems


def untidy_problems(held: Holdings) -> list[str]:
    """What a drained GC should have removed when nothing else protects a manifest (no index,
    referrer or release in the load): a link no manifest of its repository references, a
    manifest no tag points at."""
    problems = [
        f"{repo} still links {digest}, which no manifest there references"
        for repo, digest in sorted(held.links - held.references)
    ]
    tagged = {(repo, digest) for (repo, _), digest in held.tags.items()}
    problems += [
        f"{repo}@{digest} is untagged and still stored"
        for repo, digest in sorted(held.manifests - tagged)
    ]
    return problems
