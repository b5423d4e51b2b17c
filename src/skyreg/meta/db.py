"""Opening the metadata database and bringing its schema up to date."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

_MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")

# PostgreSQL errors that mean "this transaction lost a race; running it again may succeed":
# serialization failure and deadlock (always), unique and foreign-key violations (for the
# writes that ask for it, whose read-then-insert may meet a row another writer just added or
# removed).
_RETRY_ALWAYS = frozenset({"40001", "40P01"})
_RETRY_CONFLICT = frozenset({"23505", "23503"})
MAX_ATTEMPTS = 8
# Serializes concurrent `upgrade_schema` runs on one PostgreSQL database (any constant will do).
_MIGRATION_LOCK = 0x736B7972  # "skyr"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's begin event decide how a transaction starts (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
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


def create_db_engine(url: str) -> Engine:
    """An engine for `url` (sqlite:///path, or postgresql[+psycopg]://... / postgres://...)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        _private_file(make_url(url).database)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # Row locks matter only where writers run concurrently (not SQLite, see above).
        self._locks = self._dialect != "sqlite"
        self._reader: Connection | None = None

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
            # Short, jittered: the caller may be an event loop (races are rare and brief).
            time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            attempt += 1

    def _retryable(self, error: DBAPIError, conflicts: bool) -> bool:
        if self._dialect != "postgresql":
            return False
        state = getattr(error.orig, "sqlstate", None)
        return state in _RETRY_ALWAYS or (conflicts and state in _RETRY_CONFLICT)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A held autocommit connection: every read sees the latest committed state.

        Checking a pooled connection out per query costs more than the query itself; reads run
        on the event loop thread only, so one connection per process serves them all.
        """
        if self._reader is None or self._reader.closed:
            self._reader = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            yield self._reader
        except BaseException:
            self._reader.close()
            self._reader = None
            raise

    def close_reader(self) -> None:
        """Release this store's reader connection, leaving the shared engine as it is (for a
        store made by a worker thread, which must not share the event loop's reader)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        """Release the reader connection and the engine's pool."""
        self.close_reader()
        self.engine.dispose()

    def _insert_ignore(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()
