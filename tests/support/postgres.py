"""A real PostgreSQL for the tests: one server per session, one fresh database per test.

The server comes from Debian's `postgresql` package (binaries under /usr/lib/postgresql/N/bin,
not on PATH; scripts/install-test-tools.sh installs it). It listens on 127.0.0.1 on a free port
with trust authentication, keeps its data and socket in a temporary directory, and is stopped
and removed at the end of the session whatever the tests did.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.waiting import free_port

PG_ROOT = "/usr/lib/postgresql"
PG_SUPERUSER = "postgres"  # the database role, and the system user when running as root


def postgres_bindir() -> Path:
    """The bin directory of the newest PostgreSQL under /usr/lib/postgresql; fails the test
    run (not skips) when there is none."""
    found = [Path(p).parent for p in glob.glob(f"{PG_ROOT}/*/bin/initdb")]

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in bindir.parent.name.split(".") if x.isdigit())

    if not found:
        pytest.fail(
            f"PostgreSQL is not installed: no {PG_ROOT}/*/bin/initdb. "
            "Run scripts/install-test-tools.sh (Debian package `postgresql`).",
            pytrace=False,
        )
    return max(found, key=version)


@dataclass
class PostgresServer:
    """A running PostgreSQL on 127.0.0.1:`port`, superuser `postgres`, trust authentication."""

    bindir: Path
    root: Path
    port: int = 0
    as_user: str | None = None  # the system user the server runs as (when we are root)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_user is not None:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            raise RuntimeError(
                f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{log}"
            )

    @property
    def major(self) -> int:
        return int(self.bindir.parent.name.split(".")[0])

    def init(self) -> None:
        # Databases in production use a linguistic locale, where "a-b" sorts after "ab": the
        # tests get one too (ICU, from PostgreSQL 15), so ordering that relies on byte order
        # shows up here.
        locale = ["--locale-provider=icu", "--icu-locale=en-US"] if self.major >= 15 else []
        proc = self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            *locale,
            "--no-sync",
        )
        self._check(proc, "initdb")

    def start(self) -> None:
        proc = None
        for _ in range(5):  # the free port may be taken between picking and binding it
            self.port = free_port()
            options = [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
            ]
            proc = self._run(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                " ".join(options),
                "-w",
                "-t",
                "60",
                "start",
            )
            if proc.returncode == 0:
                return
        assert proc is not None
        self._check(proc, "pg_ctl start")

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the `postgres` database (CREATE/DROP DATABASE)."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=PG_SUPERUSER, dbname="postgres", autocommit=True
        )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session, stopped and removed at its end."""
    bindir = postgres_bindir()
    # As root the server runs as `postgres`, which must reach the directory: keep it in /tmp.
    root = Path(tempfile.mkdtemp(prefix="skyreg-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    server = PostgresServer(bindir=bindir, root=root)
    try:
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                user = pwd.getpwnam(PG_SUPERUSER)
            except KeyError:
                pytest.fail(f"running as root but there is no `{PG_SUPERUSER}` system user")
            os.chmod(root, 0o700)
            os.chown(root, user.pw_uid, user.pw_gid)
            server.as_user = PG_SUPERUSER
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL of a new, empty database, dropped after the test."""
    name = f"skyreg_test_{uuid.uuid4().hex[:16]}"
    with postgres_server.admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield postgres_server.url(name)
    finally:
        with postgres_server.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
