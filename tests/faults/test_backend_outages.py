"""The backends failing under a running skyreg: the S3 store (SeaweedFS) killed mid-upload, and
PostgreSQL restarted mid-push. Clients get 503 + Retry-After + UNAVAILABLE while a backend is
gone, the log holds the condition once, and once the backend is back the same `skyreg serve`
serves again with every acknowledged blob and manifest intact.

Every test starts its own SeaweedFS and/or PostgreSQL (the session-wide ones other tests use are
never stopped), with the helpers of tests/support/s3.py and tests/support/postgres.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.oci import (
    OCI_MANIFEST,
    Image,
    error_codes,
    patch_chunk,
    push_image,
    sha256,
    start_upload,
)
from tests.support.postgres import PG_SUPERUSER, PostgresServer, postgres_bindir
from tests.support.s3 import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    S3Bucket,
    SeaweedS3,
    _stop,
    _wait_until_ready,
    free_ports,
    weed_binary,
    weed_server_command,
)
from tests.support.servers import RunningRegistry

MiB = 1 << 20
_SERVER_ERRORS = ("Traceback", "Error handling request", "Unhandled exception", "unhandled error")
_TIMEOUT = 30  # a stall fails the request instead of hanging the test


# -- a SeaweedFS of the test's own, killed and restarted on the same ports and data ------------


@dataclass
class PrivateWeed:
    """A `weed server -s3` only this test uses; `kill` and `start` keep ports and data."""

    root: Path
    ports: list[int]
    server: SeaweedS3
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.root / "s3.json"
        args = weed_server_command(
            weed_binary(), self.root, self.root / "data", config, self.ports, volume_size_mb=64
        )
        # A restarted master waits out the election timeout (10 s) before it leads again.
        args.append("-master.electionTimeout=1s")
        env = {**os.environ, "TMPDIR": str(self.root), "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        with open(self.server.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        _wait_until_ready(self.server, self.proc, time.monotonic() + 60)

    def kill(self) -> None:
        """SIGKILL every weed process at once (no graceful shutdown), and wait for them."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def private_weed() -> Iterator[PrivateWeed]:
    """A SeaweedFS on 127.0.0.1 with one bucket, `registry`; removed whatever the test did."""
    root = Path(tempfile.mkdtemp(prefix="skyreg-weed-outage-"))
    ports = free_ports(8)
    (root / "data").mkdir()
    (root / "s3.json").write_text(
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
    server = SeaweedS3(
        endpoint=f"http://127.0.0.1:{ports[6]}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        log_path=root / "weed.log",
    )
    weed = PrivateWeed(root=root, ports=ports, server=server)
    try:
        weed.start()
        server.client().create_bucket(Bucket="registry")
        yield weed
    finally:
        if weed.proc is not None:
            _stop(weed.proc)
        shutil.rmtree(root, ignore_errors=True)
        for kind in ("master", "volume", "filer", "s3"):
            for port in ports:
                Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


# -- a PostgreSQL of the test's own, restarted on the same port and data -----------------------


class PrivatePostgres(PostgresServer):
    """A PostgresServer whose restarts keep its port (pg_ctl reuses postmaster.opts)."""

    def pg_ctl(self, *args: str) -> None:
        proc = self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile), *args)
        self._check(proc, f"pg_ctl {' '.join(args)}")

    def restart_fast(self) -> None:
        """`pg_ctl restart -m fast`: every session is terminated, the server is back at once."""
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "restart")

    def stop_fast(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def start_again(self) -> None:
        """Start after `stop_fast` on the same port (the options of PostgresServer.start)."""
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={self.port}",
            f"-c unix_socket_directories={self.root}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
        ]
        self.pg_ctl("-o", " ".join(options), "-w", "-t", "60", "start")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL on 127.0.0.1 with one database, `skyreg`; removed whatever the test did."""
    root = Path(tempfile.mkdtemp(prefix="skyreg-pg-outage-", dir="/tmp"))
    server = PrivatePostgres(bindir=postgres_bindir(), root=root)
    try:
        if os.geteuid() == 0:  # initdb refuses to run as root
            user = pwd.getpwnam(PG_SUPERUSER)
            os.chmod(root, 0o700)
            os.chown(root, user.pw_uid, user.pw_gid)
            server.as_user = PG_SUPERUSER
        server.init()
        server.start()
        with server.admin() as conn:
            conn.execute("CREATE DATABASE skyreg")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- skyreg on them ------------------------------------------------------------------------------


@pytest.fixture
def registry_on_private_weed(
    private_weed: PrivateWeed, pg_url: str, tmp_path: Path
) -> Iterator[RunningRegistry]:
    """`skyreg serve` on the test's own SeaweedFS (and a database of the session PostgreSQL)."""
    args = [
        "--no-auth",
        "--database-url", pg_url,
        "--storage", "s3://registry/reg",
        "--s3-endpoint", private_weed.server.endpoint,
    ]  # fmt: skip
    reg = RunningRegistry(
        data_dir=tmp_path / "data", extra_args=args, env=private_weed.server.aws_env()
    )
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def registry_on_private_postgres(
    private_postgres: PrivatePostgres, s3_bucket: S3Bucket, tmp_path: Path
) -> Iterator[RunningRegistry]:
    """`skyreg serve` on the test's own PostgreSQL (and a bucket of the session SeaweedFS)."""
    args = [
        "--no-auth",
        "--database-url", private_postgres.url("skyreg"),
        "--storage", f"s3://{s3_bucket.name}/reg",
        "--s3-endpoint", s3_bucket.endpoint,
    ]  # fmt: skip
    reg = RunningRegistry(
        data_dir=tmp_path / "data", extra_args=args, env=s3_bucket.server.aws_env()
    )
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def _get_manifest(base: str, repo: str, ref: str) -> requests.Response:
    return requests.get(
        f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}, timeout=_TIMEOUT
    )


def _assert_unavailable(resp: requests.Response, backend: str) -> None:
    """503 + Retry-After + UNAVAILABLE naming the unreachable backend (`storage`/`database`)."""
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert int(resp.headers["Retry-After"]) > 0, resp.headers
    if resp.request.method != "HEAD":
        assert error_codes(resp) == ["UNAVAILABLE"], resp.text
        assert f"{backend} is unreachable" in resp.json()["errors"][0]["message"], resp.text


def _assert_image_intact(base: str, repo: str, tag: str, image: Image) -> None:
    """The manifest under `tag` and every blob it names, byte for byte as pushed."""
    manifest = _get_manifest(base, repo, tag)
    assert manifest.status_code == 200 and manifest.content == image.manifest, manifest.text
    for blob in [image.config, *image.layers]:
        got = requests.get(f"{base}/v2/{repo}/blobs/{sha256(blob)}", timeout=_TIMEOUT)
        assert got.status_code == 200, got.text
        assert got.content == blob


def _assert_no_server_errors(log: str) -> None:
    assert not [m for m in _SERVER_ERRORS if m in log], log


# -- S3 ------------------------------------------------------------------------------------------


def test_s3_killed_mid_upload_answers_503_and_the_upload_resumes_once_it_is_back(
    registry_on_private_weed: RunningRegistry, private_weed: PrivateWeed
) -> None:
    reg = registry_on_private_weed
    base, repo = reg.url, "app/outage"
    image = push_image(base, repo, "v1", layer_size=64 << 10)
    # More than one 8 MiB part: the acknowledged bytes are a multipart upload plus a tail.
    first, second = os.urandom(9 * MiB), os.urandom(MiB)
    location = start_upload(base, repo)
    acked = patch_chunk(base, location, first, 0)
    assert acked.status_code == 202, acked.text

    # Killed while a monolithic body streams in.
    whole = os.urandom(2 * MiB)

    def killed_half_way() -> Iterator[bytes]:
        yield whole[:MiB]
        private_weed.kill()
        yield whole[MiB:]

    monolithic = requests.post(
        f"{base}/v2/{repo}/blobs/uploads/",
        params={"digest": sha256(whole)},
        data=killed_half_way(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=_TIMEOUT,
    )
    _assert_unavailable(monolithic, "storage")
    # ... and between two PATCHes of a chunked upload.
    _assert_unavailable(patch_chunk(base, location, second, len(first)), "storage")
    _assert_unavailable(requests.get(base + location, timeout=_TIMEOUT), "storage")
    # Stored blobs cannot be read either; metadata still answers.
    layer_url = f"{base}/v2/{repo}/blobs/{sha256(image.layers[0])}"
    _assert_unavailable(requests.get(layer_url, timeout=_TIMEOUT), "storage")
    _assert_unavailable(requests.head(layer_url, timeout=_TIMEOUT), "storage")
    manifest = _get_manifest(base, repo, "v1")
    assert manifest.status_code == 200 and manifest.content == image.manifest
    log = reg.log()
    _assert_no_server_errors(log)
    assert log.count("storage unreachable") == 1, log

    private_weed.start()  # same ports, same data; skyreg is not restarted
    status = requests.get(base + location, timeout=_TIMEOUT)
    assert status.status_code == 204, status.text
    assert status.headers["Range"] == f"0-{len(first) - 1}"  # resumes where it was acknowledged
    resumed = patch_chunk(base, location, second, len(first))
    assert resumed.status_code == 202, resumed.text
    digest = sha256(first + second)
    done = requests.put(base + location, params={"digest": digest}, timeout=_TIMEOUT)
    assert done.status_code == 201, done.text
    pulled = requests.get(f"{base}/v2/{repo}/blobs/{digest}", timeout=_TIMEOUT)
    assert pulled.status_code == 200 and pulled.content == first + second
    _assert_image_intact(base, repo, "v1", image)
    log = reg.log()
    _assert_no_server_errors(log)
    assert log.count("storage unreachable") == 1, log
    assert log.count("storage reachable again") == 1, log


def test_s3_killed_during_a_monolithic_put_answers_503_and_the_put_succeeds_once_it_is_back(
    registry_on_private_weed: RunningRegistry, private_weed: PrivateWeed
) -> None:
    reg = registry_on_private_weed
    base, repo = reg.url, "app/outage"
    image = push_image(base, repo, "v1")
    whole = os.urandom(3 * MiB)
    digest = sha256(whole)
    location = start_upload(base, repo)

    def killed_half_way() -> Iterator[bytes]:
        yield whole[:MiB]
        private_weed.kill()
        yield whole[MiB:]

    refused = requests.put(
        base + location,
        params={"digest": digest},
        data=killed_half_way(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=_TIMEOUT,
    )
    _assert_unavailable(refused, "storage")

    private_weed.start()
    # Nothing of the refused body counts: the session is still open and empty.
    status = requests.get(base + location, timeout=_TIMEOUT)
    assert status.status_code == 204, status.text
    assert status.headers["Range"] == "0-0", status.headers  # the spec's "empty" (0 bytes)
    done = requests.put(
        base + location,
        params={"digest": digest},
        data=whole,
        headers={"Content-Type": "application/octet-stream"},
        timeout=_TIMEOUT,
    )
    assert done.status_code == 201, done.text
    pulled = requests.get(f"{base}/v2/{repo}/blobs/{digest}", timeout=_TIMEOUT)
    assert pulled.status_code == 200 and pulled.content == whole
    _assert_image_intact(base, repo, "v1", image)
    log = reg.log()
    _assert_no_server_errors(log)
    assert log.count("storage unreachable") == 1, log


# -- PostgreSQL ----------------------------------------------------------------------------------


def test_postgres_restarted_mid_push_the_push_goes_on_without_restarting_skyreg(
    registry_on_private_postgres: RunningRegistry, private_postgres: PrivatePostgres
) -> None:
    reg = registry_on_private_postgres
    base, repo = reg.url, "app/outage"
    image = push_image(base, repo, "v1")
    first, second = os.urandom(MiB), os.urandom(MiB)
    location = start_upload(base, repo)
    assert patch_chunk(base, location, first, 0).status_code == 202

    private_postgres.restart_fast()
    # Every session skyreg held (its reader, its pool) is gone; the very next requests work.
    resumed = patch_chunk(base, location, second, len(first))
    assert resumed.status_code == 202, resumed.text
    digest = sha256(first + second)
    done = requests.put(base + location, params={"digest": digest}, timeout=_TIMEOUT)
    assert done.status_code == 201, done.text
    _assert_image_intact(base, repo, "v1", image)
    later = push_image(base, repo, "v2")
    _assert_image_intact(base, repo, "v2", later)
    _assert_no_server_errors(reg.log())


def test_postgres_down_answers_503_and_skyreg_recovers_once_it_is_back(
    registry_on_private_postgres: RunningRegistry, private_postgres: PrivatePostgres
) -> None:
    reg = registry_on_private_postgres
    base, repo = reg.url, "app/outage"
    image = push_image(base, repo, "v1")
    first, second = os.urandom(MiB), os.urandom(MiB)
    location = start_upload(base, repo)
    assert patch_chunk(base, location, first, 0).status_code == 202

    private_postgres.stop_fast()
    _assert_unavailable(patch_chunk(base, location, second, len(first)), "database")
    _assert_unavailable(_get_manifest(base, repo, "v1"), "database")
    _assert_unavailable(
        requests.put(
            f"{base}/v2/{repo}/manifests/v2",
            data=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
            timeout=_TIMEOUT,
        ),
        "database",
    )
    _assert_unavailable(
        requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=_TIMEOUT), "database"
    )
    _assert_unavailable(
        requests.get(f"{base}/v2/{repo}/blobs/{sha256(image.config)}", timeout=_TIMEOUT),
        "database",
    )
    log = reg.log()
    _assert_no_server_errors(log)
    assert log.count("database unreachable") == 1, log

    private_postgres.start_again()
    resumed = patch_chunk(base, location, second, len(first))
    assert resumed.status_code == 202, resumed.text
    digest = sha256(first + second)
    done = requests.put(base + location, params={"digest": digest}, timeout=_TIMEOUT)
    assert done.status_code == 201, done.text
    _assert_image_intact(base, repo, "v1", image)
    later = push_image(base, repo, "v2")
    _assert_image_intact(base, repo, "v2", later)
    log = reg.log()
    _assert_no_server_errors(log)
    assert log.count("database unreachable") == 1, log
    assert log.count("database reachable again") == 1, log


def test_postgres_down_management_api_and_token_endpoint_answer_503(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """With tokens on, /api/v1, /auth/token and /v2 answer 503 + Retry-After (not 500 with a
    traceback) while PostgreSQL is down, and serve again once it is back."""
    reg = RunningRegistry(
        data_dir=tmp_path / "data", extra_args=["--database-url", private_postgres.url("skyreg")]
    )
    reg.start()
    try:
        secret = (reg.data_dir / "admin-token").read_text().strip()
        admin = {"Authorization": "Bearer " + secret}
        apps = f"{reg.url}/api/v1/orgs"
        assert requests.get(apps, headers=admin, timeout=_TIMEOUT).status_code == 200

        private_postgres.stop_fast()
        refused = requests.get(apps, headers=admin, timeout=_TIMEOUT)
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "unavailable"
        token = requests.get(
            f"{reg.url}/auth/token",
            params={"service": "skyreg", "scope": "repository:x/y:pull"},
            auth=("admin", secret),
            timeout=_TIMEOUT,
        )
        _assert_unavailable(token, "database")
        _assert_no_server_errors(reg.log())

        private_postgres.start_again()
        assert requests.get(apps, headers=admin, timeout=_TIMEOUT).status_code == 200
    finally:
        reg.stop()
