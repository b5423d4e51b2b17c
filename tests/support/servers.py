"""Real `skyreg serve` processes for tests, and the backings they run on."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from skyreg.auth.envelope import generate_key_file


def assert_serves_v2(url: str, timeout: float) -> None:
    """`GET /v2/` at `url` answers as a registry: 200, or 401 with a challenge when auth is on."""
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=timeout) as resp:
            headers = resp.headers
    except urllib.error.HTTPError as e:
        assert e.code == 401, e
        headers = e.headers
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"


class ServedRegistry(Protocol):
    """What a test sees of a registry it talks to, in its own process or in this one."""

    data_dir: Path
    port: int

    @property
    def host(self) -> str: ...

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self) -> None: ...

    def log(self) -> str: ...


@dataclass
class RunningRegistry:
    """A `skyreg serve` process bound to 127.0.0.1 on a port it picked itself."""

    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        args = [
            sys.executable,
            "-m",
            "skyreg",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--port-file",
            str(port_file),
            # No scan worker unless a test asks (`--scan`): it adds SBOM referrers to pushed
            # images, which tests of other features would count.
            *([] if "--scan" in self.extra_args else ["--no-scan"]),
            # Nor layer indexes for lazy pull (another referrer) unless asked (`--lazy-index`).
            *([] if "--lazy-index" in self.extra_args else ["--no-lazy-index"]),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"skyreg serve exited:\n{self.log()}")
            if port_file.exists() and port_file.read_text().strip():
                self.port = int(port_file.read_text().strip())
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"skyreg serve did not start:\n{self.log()}")
        assert_serves_v2(self.url, timeout=10)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@contextlib.contextmanager
def scaleout_backing(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], dict[str, str]]]:
    """A fresh bucket on the session's SeaweedFS and a fresh database on its PostgreSQL: the
    `skyreg serve` arguments and environment that put a node on them (dropped afterwards), with
    a master key file for app secrets that every node of the backing shares (as the nodes of a
    real deployment must)."""
    s3 = request.getfixturevalue("seaweedfs")
    keys = Path(tempfile.mkdtemp(prefix="skyreg-keys-"))
    generate_key_file(keys / "secrets.key")
    pg = request.getfixturevalue("postgres_server")
    bucket = f"reg-{uuid.uuid4().hex[:16]}"
    database = f"skyreg_{uuid.uuid4().hex[:16]}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    with pg.admin() as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        yield (
            [
                "--database-url", pg.url(database),
                "--storage", f"s3://{bucket}/registry",
                "--s3-endpoint", s3.endpoint,
                "--secrets-key-file", str(keys / "secrets.key"),
            ],
            s3.aws_env(),
        )  # fmt: skip
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        with pg.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=bucket)


BACKINGS = ["embedded", "s3+postgresql"]
