"""Opening the metadata database and bringing its schema up to date."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, ExceptionContext, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from skyreg.meta.threads import DEFAULT_THREADS, MAX_THREADS, SQLITE_WRITE_THREADS

log = logging.getLogger("skyreg.meta")

_MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
_P = ParamSpec("_P")

# PostgreSQL errors that mean "this transaction lost a race; running it again may succeed":
# serialization failure and deadlock (always), unique and foreign-key violations (for the
# writes that ask for it, whose read-then-insert may meet a row another writer just added or
# removed).
_RETRY_ALWAYS = frozenset({"40001", "40P01"})
_RETRY_CONFLICT = frozenset({"23505", "23503"})
MAX_ATTEMPTS = 8
# Serializes concurrent `upgrade_schema` runs on one PostgreSQL database (any constant will do).
_MIGRATION_LOCK = 0x736B7972  # "skyr"


SQLITE_SYNCHRONOUS = ("full", "normal")


def _sqlite_pragmas(synchronous: str, dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin event decide how a transaction starts (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit syncs the WAL before it returns, so a write acknowledged to a client
    # survives a power cut. NORMAL syncs only at checkpoints (a cut can take back commits).
    cur.execute(f"PRAGMA synchronous={synchronous.upper()}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return  # each statement is its own transaction (the held reader connection)
    # Writers take the write lock up front so two processes never deadlock upgrading a read lock.
    mode = "IMMEDIATE" if options.get("skyreg_write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


_SQLITE_FULL = 13  # "database or disk is full" (extended codes keep it in the low byte)
_PG_DISK_FULL = "53100"


def disk_full(error: BaseException) -> bool:
    """Whether `error` is the database refusing a write because its disk (or quota) is full."""
    if not isinstance(error, DBAPIError):
        return False
    code = getattr(error.orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
        return True
    return getattr(error.orig, "sqlstate", None) == _PG_DISK_FULL


# Threads a process runs queries on: each holds a reader connection, and may hold a writer,
# so an engine's pool has room for two connections per thread.


def _pool(threads: int) -> dict[str, Any]:
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"database threads must be 1 to {MAX_THREADS}, not {threads}")
    return {"pool_size": threads, "max_overflow": threads}


# Server states meaning "not now": shutting down (fast or crash), starting, out of connections.
_PG_UNREACHABLE = frozenset({"57P01", "57P02", "57P03", "53300"})
_PG_CONNECT_TIMEOUT = 5  # seconds; libpq's default is to wait forever, on the event loop


def _pg_unreachable(orig: BaseException | None) -> bool:
    if not isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        return False
    state = orig.sqlstate
    # No SQLSTATE: the client's side (refused, timed out, connection lost or closed).
    return state is None or state.startswith("08") or state in _PG_UNREACHABLE


def unreachable(error: BaseException) -> bool:
    """Whether `error` is PostgreSQL being out of reach: refused, shut down, restarting, or the
    connection lost. Never true on SQLite (a file, not a server)."""
    if not isinstance(error, DBAPIError):
        return False
    return error.connection_invalidated or _pg_unreachable(error.orig)


class _Reachability:
    """Logs the database becoming unreachable once (the first connection or query failing for
    that) and reachable again once (the next connection made), not a line per request. Before
    the first connection there is no outage: whoever connects first reports the failure."""

    def __init__(self) -> None:
        self.reached = False
        self.down = False

    def failed(self, context: ExceptionContext) -> None:
        # A stale pooled connection failing its ping is routine: the reconnect after it decides.
        if context.is_pre_ping or self.down or not self.reached:
            return
        if context.is_disconnect or _pg_unreachable(context.original_exception):
            self.down = True
            log.warning(
                "database unreachable: requests answer 503 until it is back: %s",
                str(context.original_exception).strip().splitlines()[0][:300],
            )

    def connected(self, _dbapi_conn: Any, _record: Any) -> None:
        self.reached = True
        if self.down:
            self.down = False
            log.info("database reachable again")


def _postgres_engine(url: str, threads: int) -> Engine:
    """Stale pooled connections are replaced before use (pre-ping), connecting gives up after
    `_PG_CONNECT_TIMEOUT` unless the URL says otherwise, and outages are logged once."""
    timeout = (
        {} if "connect_timeout" in make_url(url).query else {"connect_timeout": _PG_CONNECT_TIMEOUT}
    )
    engine = create_engine(url, pool_pre_ping=True, connect_args=timeout, **_pool(threads))
    reachability = _Reachability()
    event.listen(engine, "handle_error", reachability.failed)
    event.listen(engine, "connect", reachability.connected)
    return engine


def _hung_up(conn: Connection) -> bool:
    """Whether the server has spoken on this idle autocommit connection. It only does so to
    end the session (the FATAL before a shutdown or restart closes it), so it is dead."""
    try:
        fileno = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
    except Exception:
        return True
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` (libpq style) mean PostgreSQL through psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _private_file(path: str | None) -> None:
    """Create an SQLite file readable by its owner only (it holds token hashes and the token
    signing keys); SQLite gives its -wal and -shm files the same mode."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    # Never open (and close) an existing database file here: closing any descriptor of a file
    # drops every POSIX lock this process holds on it, SQLite's included.
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if os.stat(path).st_uid == os.geteuid():
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass  # its directory does not exist: SQLite will say so


def create_db_engine(
    url: str, *, sqlite_synchronous: str = "full", threads: int = DEFAULT_THREADS
) -> Engine:
    """An engine for `url` (sqlite:///path, or postgresql[+psycopg]://... / postgres://...),
    its pool sized for a `Database` with `threads` threads.

    `sqlite_synchronous` ("full" or "normal") is SQLite's durability setting; see
    `_sqlite_pragmas`. PostgreSQL's defaults already make every commit durable.
    """
    if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}")
    url = normalize_url(url)
    if url.startswith("sqlite"):
        _private_file(make_url(url).database)
        engine = create_engine(url, connect_args={"check_same_thread": False}, **_pool(threads))
        event.listen(engine, "connect", functools.partial(_sqlite_pragmas, sqlite_synchronous))
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return _postgres_engine(url, threads)


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    return cfg


def upgrade_schema(engine: Engine) -> str:
    """Apply every Alembic migration not yet applied; returns the revision now in force.

    The whole upgrade is one transaction begun here, so Alembic commits nothing itself (on
    SQLite it would otherwise commit after each migration): on SQLite it holds the write lock
    (`BEGIN IMMEDIATE`) throughout, on PostgreSQL an advisory lock. Servers starting at once
    migrate the database once.
    """
    cfg = _alembic_config()
    with engine.connect().execution_options(skyreg_write=True) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    return str(revision)


def head_revision() -> str:
    """The newest migration's revision."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return str(head)


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite:///{path}"


class LoopBlocked(RuntimeError):
    """A database query was about to run on an event loop thread (see `Database`)."""


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Database:
    """The metadata database of one process: the engine and its connection pool, the threads
    queries run on, and one held reader connection per thread.

    Async code never waits for the database on its event loop: it hands the work to `run`,
    which runs it on one of `threads` database threads (a query that waits for PostgreSQL 2 ms
    away, or for SQLite's write lock, stalls that thread only). Reads go through `read`: on
    PostgreSQL the same as `run`; on SQLite inline, because a WAL-mode reader never waits for a
    lock and reads the page cache in microseconds, less than a thread hop costs (the registry
    bench's manifest GET: 1.54x Distribution with every read on a thread, 2.38x inline; see
    BENCHMARKS.md). With `strict`, a query issued
    on a thread that runs an event loop raises `LoopBlocked` (the test suite turns it on with
    SKYREG_STRICT_DB_THREADS=1) — on SQLite only a write does; otherwise it is logged once.
    """

    def __init__(
        self, engine: Engine, *, threads: int = DEFAULT_THREADS, strict: bool | None = None
    ) -> None:
        self.engine = engine
        self.inline_reads = engine.dialect.name == "sqlite"
        # SQLite writes one at a time: more threads than writers in flight would only contend.
        self.threads = min(threads, SQLITE_WRITE_THREADS) if self.inline_reads else threads
        self.strict = (
            os.environ.get("SKYREG_STRICT_DB_THREADS") == "1" if strict is None else strict
        )
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._readers: set[Connection] = set()
        self._readers_lock = threading.Lock()
        self._warned = False
        event.listen(engine, "before_cursor_execute", self._check_thread)

    def _check_thread(self, conn: Connection, *_args: Any) -> None:
        if not _on_event_loop():
            return
        if self.inline_reads and not conn.get_execution_options().get("skyreg_write"):
            return  # an SQLite read (see the class docstring)
        if self.strict:
            raise LoopBlocked("a database query on the event loop: use Database.run")
        if not self._warned:
            self._warned = True
            log.warning("a database query ran on the event loop", stack_info=True)

    async def run(self, fn: Callable[_P, T], *args: _P.args, **kwargs: _P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a database thread; its result or its exception."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="db")
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def read(self, fn: Callable[_P, T], *args: _P.args, **kwargs: _P.kwargs) -> T:
        """`fn(*args, **kwargs)`, which only reads: inline on SQLite, else on a database thread."""
        if self.inline_reads:
            return fn(*args, **kwargs)
        return await self.run(fn, *args, **kwargs)

    def reader(self) -> Connection:
        """This thread's held autocommit connection, (re)connected as needed."""
        reader: Connection | None = getattr(self._local, "reader", None)
        postgres = self.engine.dialect.name == "postgresql"
        if reader is not None and not reader.closed and postgres and _hung_up(reader):
            # Reconnect now rather than fail the next request on a session the server ended.
            reader.invalidate()
            self.drop_reader()
            reader = None
        if reader is None or reader.closed:
            reader = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._local.reader = reader
            with self._readers_lock:
                self._readers.add(reader)
        return reader

    def drop_reader(self) -> None:
        """Close this thread's reader connection (the next read connects again)."""
        reader: Connection | None = getattr(self._local, "reader", None)
        self._local.reader = None
        if reader is not None:
            with self._readers_lock:
                self._readers.discard(reader)
            with contextlib.suppress(Exception):
                reader.close()

    def close(self) -> None:
        """Stop the threads (after their current query), close every reader, dispose the pool."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._readers_lock:
            readers, self._readers = list(self._readers), set()
        for reader in readers:
            with contextlib.suppress(Exception):
                reader.close()
        self.engine.dispose()


class Retry(Exception):
    """Raised inside a transaction that lost a race it wins by running again from the start
    (e.g. a row it had just checked was deleted by a writer that committed first)."""


class SqlStore:
    """Base of the metadata query classes: transactions and the held reader connection.

    Concurrency: SQLite writers take the database's write lock up front (`BEGIN IMMEDIATE`),
    so write transactions run one at a time. PostgreSQL runs them concurrently at READ
    COMMITTED: writes rely on unique constraints with ON CONFLICT, lock the rows a decision
    depends on (SELECT ... FOR UPDATE / FOR NO KEY UPDATE / FOR KEY SHARE, only where `_locks`)
    and run through `_transaction`, which repeats a transaction that lost a race (deadlock,
    serialization failure, `Retry`). No lock is ever held in the process.
    """

    def __init__(self, database: Database | Engine) -> None:
        # A store made from a bare engine (a test, a CLI command) owns a Database of its own.
        self._owns_db = not isinstance(database, Database)
        self.db = database if isinstance(database, Database) else Database(database)
        self.engine = self.db.engine
        self._dialect = self.engine.dialect.name
        # Row locks matter only where writers run concurrently (not SQLite, see above).
        self._locks = self._dialect != "sqlite"

    async def run(self, fn: Callable[_P, T], *args: _P.args, **kwargs: _P.kwargs) -> T:
        """`fn(*args, **kwargs)` — one or more of this store's methods — on a database thread,
        never on the event loop."""
        return await self.db.run(fn, *args, **kwargs)

    async def read(self, fn: Callable[_P, T], *args: _P.args, **kwargs: _P.kwargs) -> T:
        """`fn(*args, **kwargs)`, which only reads: see `Database.read`."""
        return await self.db.read(fn, *args, **kwargs)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(skyreg_write=True) as conn, conn.begin():
            yield conn

    def _transaction(self, work: Callable[[Connection], T], *, conflicts: bool = False) -> T:
        """Run `work` in one write transaction, again (from the start) when it loses a race.

        `conflicts`: also repeat on unique and foreign-key violations, for work whose checks
        and inserts may meet another writer's rows (its next run sees them committed).
        """
        attempt = 1
        while True:
            try:
                with self._write() as conn:
                    return work(conn)
            except Retry:
                if attempt >= MAX_ATTEMPTS:
                    raise
            except DBAPIError as e:
                if attempt >= MAX_ATTEMPTS or not self._retryable(e, conflicts):
                    raise
            # Short (at most 50 ms) and jittered, on the database thread this transaction runs
            # on, never the event loop. Not an asyncio.sleep: the retry belongs to this one
            # transaction, while a `run` call may hold several, and re-running the whole call from
            # the loop would repeat the ones that already committed.
            time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            attempt += 1

    def _retryable(self, error: DBAPIError, conflicts: bool) -> bool:
        if self._dialect != "postgresql":
            return False
        state = getattr(error.orig, "sqlstate", None)
        return state in _RETRY_ALWAYS or (conflicts and state in _RETRY_CONFLICT)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """This thread's held autocommit connection: every read sees the latest committed
        state (checking a pooled connection out per query costs more than the query)."""
        reader = self.db.reader()
        try:
            yield reader
        except BaseException:
            self.db.drop_reader()
            raise

    def close_reader(self) -> None:
        """Release this thread's reader connection, leaving the database as it is."""
        self.db.drop_reader()

    def close(self) -> None:
        """Release the database if this store owns it (else its owner closes it)."""
        if self._owns_db:
            self.db.close()
        else:
            self.db.drop_reader()

    def _insert_ignore(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()
