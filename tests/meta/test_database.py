"""The metadata database never blocks the event loop: queries run on database threads, and a
query issued on an event loop thread is refused in strict mode (the test suite's)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from skyreg.meta.db import Database, LoopBlocked, create_db_engine, sqlite_url, upgrade_schema
from skyreg.meta.registry import RegistryMeta

_DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def sqlite_meta(tmp_path: Path) -> RegistryMeta:
    engine = create_db_engine(sqlite_url(tmp_path / "skyreg.db"))
    upgrade_schema(engine)
    return RegistryMeta(Database(engine, strict=True))


def test_a_write_on_the_event_loop_is_refused_in_strict_mode(sqlite_meta: RegistryMeta) -> None:
    """On SQLite a read may run inline (a WAL reader never waits for a lock); a write, which
    may wait for SQLite's write lock, never does."""

    async def main() -> None:
        with pytest.raises(LoopBlocked):
            sqlite_meta.link_blob("app/web", _DIGEST, 3)
        assert await sqlite_meta.read(sqlite_meta.repository_known, "app/web") is False
        await sqlite_meta.run(sqlite_meta.link_blob, "app/web", _DIGEST, 3)
        assert sqlite_meta.blob_size("app/web", _DIGEST) == 3  # a read, inline

    try:
        asyncio.run(main())
    finally:
        sqlite_meta.close()


def test_every_query_on_the_event_loop_is_refused_in_strict_mode_on_postgresql(
    pg_url: str,
) -> None:
    engine = create_db_engine(pg_url)
    upgrade_schema(engine)
    meta = RegistryMeta(Database(engine, strict=True))

    async def main() -> None:
        with pytest.raises(LoopBlocked):
            meta.repository_known("app/web")
        assert await meta.read(meta.repository_known, "app/web") is False
        assert await meta.run(meta.repository_known, "app/web") is False

    try:
        asyncio.run(main())
    finally:
        meta.close()


def test_queries_outside_any_event_loop_run_where_they_are_called(
    sqlite_meta: RegistryMeta,
) -> None:
    try:
        sqlite_meta.link_blob("app/web", _DIGEST, 3)
        assert sqlite_meta.blob_size("app/web", _DIGEST) == 3
    finally:
        sqlite_meta.close()


def test_a_write_waiting_for_the_database_lock_does_not_stall_the_event_loop(
    tmp_path: Path, sqlite_meta: RegistryMeta
) -> None:
    """Another process holds SQLite's write lock: the write waits on its database thread while
    the event loop goes on serving (here: counting ticks), and completes once the lock is free."""
    holder = sqlite3.connect(tmp_path / "skyreg.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    async def main() -> int:
        write = asyncio.create_task(sqlite_meta.run(sqlite_meta.link_blob, "app/web", _DIGEST, 3))
        ticks = 0
        while ticks < 20:  # the loop runs while the write waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
            assert not write.done(), write
        holder.execute("COMMIT")
        await write
        return ticks

    try:
        assert asyncio.run(main()) == 20
        assert sqlite_meta.blob_size("app/web", _DIGEST) == 3
    finally:
        holder.close()
        sqlite_meta.close()


def test_each_database_thread_reads_through_its_own_connection(sqlite_meta: RegistryMeta) -> None:
    seen: dict[str, int] = {}

    def reader_id() -> int:
        seen[threading.current_thread().name] = id(sqlite_meta.db.reader())
        return id(sqlite_meta.db.reader())  # held: the same one again on this thread

    async def main() -> list[int]:
        gate = threading.Barrier(3)

        def on_three_threads() -> int:
            gate.wait(timeout=10)  # three calls in flight at once: three threads
            return reader_id()

        return list(await asyncio.gather(*(sqlite_meta.run(on_three_threads) for _ in range(3))))

    try:
        ids = asyncio.run(main())
        assert len(set(ids)) == 3
        assert sorted(seen.values()) == sorted(ids)
    finally:
        sqlite_meta.close()
