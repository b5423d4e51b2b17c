"""Opening the metadata database and bringing its schema up to date."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite

_MIGRATIONS = Path(__file__).parent / "migrations"


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


def create_db_engine(url: str) -> Engine:
    """An engine for `url` (sqlite:///path or postgresql+psycopg://...)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade_schema(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    with engine.connect().execution_options(skyreg_write=True) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        conn.commit()


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite:///{path}"


class SqlStore:
    """Base of the metadata query classes: transactions and the held reader connection."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        self._reader: Connection | None = None

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(skyreg_write=True) as conn, conn.begin():
            yield conn

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

    def close(self) -> None:
        """Release the reader connection and the engine's pool."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.engine.dispose()

    def _insert_ignore(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        return sqlite.insert(table).on_conflict_do_nothing()
