"""Blob bytes and garbage collection at the API: DELETE /v2/<name>/blobs/<digest> only unlinks
(the collector deletes bytes, later), an upload links its blob before the bytes are installed
(so a pending deletion of them is cancelled first), and a mount whose blob the collector took is
a normal upload (202), on both backings. The orderings only a lock wait can show (a request held
between two steps) run on PostgreSQL, where a waiting backend is visible in pg_stat_activity;
SQLite's writers wait inside SQLite, where nothing shows they are there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
import requests
from sqlalchemy import Connection, Engine, delete, select, text

from skyreg.meta import schema as s
from skyreg.meta.db import create_db_engine, sqlite_url
from skyreg.meta.gc import GcMeta, enqueue_blobs, queue_deletion
from skyreg.oci.digest import Digest
from skyreg.privatefs import private_dir
from skyreg.server.process import close_blob_store, open_blob_store
from skyreg.store.base import BlobStore
from tests.support.inprocess import InProcessRegistry, environment, serve_options
from tests.support.oci import error_codes, push_blob, sha256
from tests.support.servers import BACKINGS, scaleout_backing
from tests.support.waiting import wait_for

_TIMEOUT = 60
T = TypeVar("T")


@dataclass
class Served:
    """The registry under test, its database (as the collector sees it) and its blob store."""

    reg: InProcessRegistry
    backing: str
    _gc: GcMeta | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.reg.url

    @property
    def gc(self) -> GcMeta:
        """The collector's view of the registry's database (what `skyreg gc run` uses)."""
        if self._gc is None:
            cfg = self.reg.config()
            url = cfg.database_url or sqlite_url(cfg.data_dir / "skyreg.db")
            self._gc = GcMeta(create_db_engine(url))
        return self._gc

    @property
    def engine(self) -> Engine:
        return self.gc.engine

    def on_store(self, work: Callable[[BlobStore, Digest], Awaitable[T]], d: str) -> T:
        """`await work(store, digest)` on a store over the server's storage (own event loop)."""

        async def go() -> T:
            store = open_blob_store(self.reg.config())
            try:
                return await work(store, Digest.parse(d))
            finally:
                await close_blob_store(store)

        return asyncio.run(go())

    def stored(self, d: str) -> int | None:
        """The size of `d`'s bytes in the store, None when they are not there."""
        return self.on_store(lambda store, digest: store.stat(digest), d)

    def collect_bytes(self, d: str) -> tuple[int | None, list[str]]:
        """The collector's second step for `d` in this (region-less) registry: what it freed and
        which digests it asked the store to remove."""
        removed: list[str] = []

        def remove(digest: str) -> int | None:
            removed.append(digest)
            size = self.stored(digest)
            self.on_store(lambda store, dg: store.delete(dg), digest)
            return size

        return self.gc.delete_bytes(d, "", remove), removed

    def pending_deletions(self, d: str) -> list[str]:
        with self.engine.connect() as conn:
            query = select(s.gc_blob_deletions.c.region).where(s.gc_blob_deletions.c.digest == d)
            return [str(r) for r in conn.execute(query).scalars()]

    def close(self) -> None:
        if self._gc is not None:
            self._gc.close()
            self._gc.engine.dispose()


@pytest.fixture(scope="module", params=BACKINGS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One registry per backing for the module: reviews due at once, no collector worker (the
    tests run the collector's steps themselves, when they choose)."""
    with contextlib.ExitStack() as stack:
        options: dict[str, object] = {"auth": False, "gc_review_delay": 0.0, "gc_worker": False}
        if request.param == "s3+postgresql":
            args, env = stack.enter_context(scaleout_backing(request))
            options.update(serve_options(args))
            stack.enter_context(environment(env))
        reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("gc") / "data", options=options)
        reg.start()
        stack.callback(reg.stop)
        target = Served(reg, request.param)
        stack.callback(target.close)
        yield target


@pytest.fixture
def postgres(served: Served) -> Served:
    if served.backing != "s3+postgresql":
        pytest.skip("needs a lock wait to be visible (PostgreSQL's pg_stat_activity)")
    return served


def _repo() -> str:
    return f"gc/{uuid.uuid4().hex[:12]}"


def _get(served: Served, repo: str, d: str) -> requests.Response:
    return requests.get(f"{served.url}/v2/{repo}/blobs/{d}", timeout=_TIMEOUT)


# -- DELETE only unlinks ------------------------------------------------------------------------


def test_a_blob_delete_leaves_the_bytes_while_another_repository_links_them(
    served: Served,
) -> None:
    data = os.urandom(50_000)
    first, second = _repo(), _repo()
    d = push_blob(served.url, first, data)
    push_blob(served.url, second, data)
    r = requests.delete(f"{served.url}/v2/{first}/blobs/{d}", timeout=_TIMEOUT)
    assert r.status_code == 202 and r.content == b""
    assert r.headers["Docker-Content-Digest"] == d
    gone = _get(served, first, d)
    assert gone.status_code == 404 and error_codes(gone) == ["BLOB_UNKNOWN"]
    assert _get(served, second, d).content == data
    assert served.stored(d) == len(data)


def test_a_blob_delete_of_the_last_link_leaves_the_bytes_to_the_collector(served: Served) -> None:
    data = os.urandom(40_000)
    repo = _repo()
    d = push_blob(served.url, repo, data)
    assert requests.delete(f"{served.url}/v2/{repo}/blobs/{d}", timeout=_TIMEOUT).status_code == 202
    again = requests.delete(f"{served.url}/v2/{repo}/blobs/{d}", timeout=_TIMEOUT)
    assert again.status_code == 404 and error_codes(again) == ["BLOB_UNKNOWN"]
    assert _get(served, repo, d).status_code == 404
    assert served.stored(d) == len(data)  # no repository links it: still the collector's job

    # The collector's review drops the blob (nothing links or references it), queueing the
    # deletion of its bytes; only that second step removes them.
    assert served.gc.review_blob(d).outcome == "deleted"
    assert served.stored(d) == len(data)
    assert served.pending_deletions(d) == [""]
    assert served.collect_bytes(d) == (len(data), [d])
    assert served.stored(d) is None
    assert served.pending_deletions(d) == []


# -- an upload links before it installs; a mount needs the blob row --------------------------


def _finish_upload(served: Served, repo: str, location: str, data: bytes) -> requests.Response:
    return requests.put(
        served.url + location,
        params={"digest": sha256(data)},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=_TIMEOUT,
    )


def test_a_mount_of_a_blob_the_collector_took_is_an_upload_that_cancels_its_deletion(
    served: Served,
) -> None:
    data = os.urandom(30_000)
    source, target = _repo(), _repo()
    d = push_blob(served.url, source, data)
    assert (
        requests.delete(f"{served.url}/v2/{source}/blobs/{d}", timeout=_TIMEOUT).status_code == 202
    )
    assert served.gc.review_blob(d).outcome == "deleted"
    assert served.stored(d) == len(data)  # its bytes await the deletion step

    r = requests.post(
        f"{served.url}/v2/{target}/blobs/uploads/",
        params={"mount": d, "from": source},
        timeout=_TIMEOUT,
    )
    assert r.status_code == 202, r.text  # not mounted: upload it
    done = _finish_upload(served, target, r.headers["Location"], data)
    assert done.status_code == 201, done.text
    # Linked before the bytes went in, which cancelled the pending deletion: the deletion step
    # finds nothing to do and the acknowledged bytes stay.
    assert served.pending_deletions(d) == []
    assert served.collect_bytes(d) == (None, [])
    assert _get(served, target, d).content == data


def _waiting_on_a_lock(served: Served) -> bool:
    """Whether a backend of the registry's database waits for a lock (a held row)."""
    with served.engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(conn.execute(query).scalar_one()) > 0


@contextlib.contextmanager
def _holding(served: Served, hold: Callable[[Connection], None]) -> Iterator[Connection]:
    """A transaction that ran `hold` and stays open (its row locks held) until the block ends,
    then commits."""
    with served.engine.connect() as conn, conn.begin():
        hold(conn)
        yield conn


def _blocked(
    served: Served, pool: ThreadPoolExecutor, send: Callable[[], requests.Response]
) -> Future[requests.Response]:
    """`send` in the background, once it waits for a lock the test holds."""
    answer = pool.submit(send)
    wait_for(
        lambda: _waiting_on_a_lock(served) or answer.done(),
        "the request to wait for the held row",
        timeout=_TIMEOUT,
    )
    assert not answer.done(), answer.result().text
    return answer


def test_a_mount_the_collector_races_for_the_blob_row_is_a_normal_upload(
    postgres: Served,
) -> None:
    """The mount found the blob linked in the source (a committed read), then the collector
    deleted the blob before the mount could link it: the mount must not bring the row back for
    bytes whose deletion is queued, but answer 202 (upload them)."""
    served = postgres
    data = os.urandom(20_000)
    source, target = _repo(), _repo()
    d = push_blob(served.url, source, data)

    def take(conn: Connection) -> None:  # what the collector's review does, held open
        conn.execute(delete(s.gc_blob_reviews).where(s.gc_blob_reviews.c.digest == d))
        conn.execute(delete(s.repository_blobs).where(s.repository_blobs.c.digest == d))
        conn.execute(delete(s.blob_regions).where(s.blob_regions.c.digest == d))
        conn.execute(delete(s.blobs).where(s.blobs.c.digest == d))
        queue_deletion(conn, d, len(data), "")

    def mount() -> requests.Response:
        return requests.post(
            f"{served.url}/v2/{target}/blobs/uploads/",
            params={"mount": d, "from": source},
            timeout=_TIMEOUT,
        )

    with ThreadPoolExecutor(1) as pool:
        with _holding(served, take):
            answer = _blocked(served, pool, mount)
        r = answer.result(timeout=_TIMEOUT)
    assert r.status_code == 202, r.text
    assert _get(served, target, d).status_code == 404
    assert served.pending_deletions(d) == [""]
    done = _finish_upload(served, target, r.headers["Location"], data)
    assert done.status_code == 201, done.text
    assert served.pending_deletions(d) == []
    assert _get(served, target, d).content == data


@pytest.mark.parametrize("how", ["chunked", "monolithic"])
def test_an_upload_links_its_blob_before_installing_the_bytes(postgres: Served, how: str) -> None:
    """Held at its link (a review of the blob under way holds the review row), an upload has not
    put its bytes in the store yet; released, it installs them and answers 201."""
    served = postgres
    data = os.urandom(25_000)
    d = sha256(data)
    repo = _repo()
    if how == "chunked":
        start = requests.post(f"{served.url}/v2/{repo}/blobs/uploads/", timeout=_TIMEOUT)
        assert start.status_code == 202, start.text
        location = start.headers["Location"]

        def send() -> requests.Response:
            return _finish_upload(served, repo, location, data)

    else:

        def send() -> requests.Response:
            return requests.post(
                f"{served.url}/v2/{repo}/blobs/uploads/",
                params={"digest": d},
                data=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=_TIMEOUT,
            )

    def review_under_way(conn: Connection) -> None:
        enqueue_blobs(conn, [d], "test", 0.0)

    with ThreadPoolExecutor(1) as pool:
        with _holding(served, review_under_way):
            answer = _blocked(served, pool, send)
            assert served.stored(d) is None  # not installed while its link waits
        r = answer.result(timeout=_TIMEOUT)
    assert r.status_code == 201, r.text
    assert served.stored(d) == len(data)
    assert _get(served, repo, d).content == data


def test_an_upload_whose_install_fails_after_its_link_can_be_finished_again(
    served: Served,
) -> None:
    """The link (which ends the upload session in the same commit) comes before the install; if
    the install then fails, the session is recorded again, so the client finishes the upload,
    which the store still holds, with another PUT, as it could before."""
    if served.backing != "embedded":
        pytest.skip("breaks the filesystem store's blob directory")
    blobs = private_dir(served.reg.data_dir / "blobs" / "sha256")
    data = os.urandom(10_000)
    while (blobs / sha256(data)[7:9]).exists():  # a directory no other blob of the module uses
        data = os.urandom(10_000)
    repo = _repo()
    start = requests.post(f"{served.url}/v2/{repo}/blobs/uploads/", timeout=_TIMEOUT)
    location = start.headers["Location"]
    patched = requests.patch(
        served.url + location,
        data=data,
        headers={"Content-Range": f"0-{len(data) - 1}", "Content-Type": "application/octet-stream"},
        timeout=_TIMEOUT,
    )
    assert patched.status_code == 202, patched.text
    blocker = blobs / sha256(data)[7:9]
    blocker.write_bytes(b"")  # a file where the blob's directory must go: the install fails
    try:
        failed = requests.put(
            served.url + location, params={"digest": sha256(data)}, timeout=_TIMEOUT
        )
        assert failed.status_code == 500, failed.text
        status = requests.get(served.url + location, timeout=_TIMEOUT)
        assert status.status_code == 204, status.text
        assert status.headers["Range"] == f"0-{len(data) - 1}"
    finally:
        blocker.unlink()
    done = requests.put(served.url + location, params={"digest": sha256(data)}, timeout=_TIMEOUT)
    assert done.status_code == 201, done.text
    assert _get(served, repo, sha256(data)).content == data
