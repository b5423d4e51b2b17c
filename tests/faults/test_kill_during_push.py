"""`kill -9` of `skyreg serve` (one process, or a master with two workers) while several clients
push images: every acknowledged blob and manifest survives byte for byte, nothing half-written
becomes visible, interrupted chunked uploads resume from what the server reports, the SQLite
file stays intact and every restart binds the same port.

The kills are driven by progress (a number of new acknowledgements), never by time; each run
is seeded, and the seed is in every failure message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.oci import OCI_MANIFEST, sha256
from tests.support.pushers import (
    Ledger,
    Pusher,
    Restarts,
    blob_files_match_their_names,
    plan_images,
    uploaded_size,
)
from tests.support.servers import RunningRegistry
from tests.support.waiting import children, wait_for

MiB = 1 << 20
KILLS = 3
PUSHERS = 4
# Enough work that the pushers are still pushing at the last kill: while a killed server
# restarts and its catalog is checked, the others' retries land many acknowledgements at once
# (a run with 5 images a pusher, ~160 acknowledgements, saw 150 of them before its third kill).
IMAGES_PER_PUSHER = 10
ACKS_BETWEEN_KILLS = 12  # at most 36 of the ~320 acknowledgements the pushers will get
_TIMEOUT = 30


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@contextlib.contextmanager
def _serving(data_dir: Path, workers: int) -> Iterator[tuple[RunningRegistry, set[int]]]:
    """`skyreg serve --no-auth --workers N` and the set of every process it ran (filled in by
    the test); every one of them is gone afterwards."""
    reg = RunningRegistry(data_dir=data_dir, extra_args=["--no-auth", "--workers", str(workers)])
    seen: set[int] = set()
    reg.start()
    try:
        yield reg, seen
    finally:
        if reg.proc is not None:
            seen |= children(reg.proc.pid)
        reg.stop()
        for pid in seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill(
    reg: RunningRegistry, workers: int, seen: set[int], probe: _Probe, restarts: Restarts
) -> None:
    """SIGKILL the master and wait until every worker it had is gone too (PR_SET_PDEATHSIG).

    An orphaned worker stops gracefully: it ends the requests it is serving, but aiohttp drops
    request bytes arriving after that began, so an upload whose body was still coming waits
    for its client to leave (`test_graceful_stop_finishes_an_upload_whose_body_is_arriving`).
    So pushers start no request once the kill is announced, and once the master is dead the
    probe and the pushers drop their open connections, which makes those requests what a kill
    of the workers too would: unknown outcomes."""
    assert reg.proc is not None
    master = reg.proc.pid
    restarts.killing()
    pids: set[int] = set()
    if workers > 1:
        pids = wait_for(
            lambda: found if len(found := children(master)) == workers else None,
            f"{workers} workers",
        )
        seen |= pids
    reg.stop(signal.SIGKILL)
    probe.killed.set()
    restarts.cut()
    wait_for(lambda: not any(_alive(p) for p in pids), "the workers to exit after their master")


def _start_again(reg: RunningRegistry) -> None:
    """Start on the same port and data dir; /v2/ must answer as a registry."""
    port = reg.port
    reg.start()
    assert reg.port == port
    resp = requests.get(f"{reg.url}/v2/", timeout=_TIMEOUT)
    assert resp.status_code == 200 and resp.json() == {}, resp.text
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


class _Probe:
    """A chunked upload the test drives itself across one kill: two acknowledged PATCHes, then
    a third whose body stalls part way while the server is killed."""

    SIZE = 4 * MiB
    ACKED = 3 * MiB // 2
    IN_FLIGHT = 5 * MiB // 4

    def __init__(self, base: str, repo: str, rng: random.Random) -> None:
        self.base, self.repo = base, repo
        self.data = rng.randbytes(self.SIZE)
        self.sent_part = threading.Event()
        self.killed = threading.Event()
        opened = requests.post(f"{base}/v2/{repo}/blobs/uploads/", timeout=_TIMEOUT)
        assert opened.status_code == 202, opened.text
        self.location = opened.headers["Location"]
        for start, end in ((0, MiB), (MiB, self.ACKED)):
            resp = self._patch(start, self.data[start:end])
            assert resp.status_code == 202, resp.text
            assert resp.headers["Range"] == f"0-{end - 1}"
        self.thread = threading.Thread(target=self._stalled_patch, daemon=True)
        self.thread.start()
        assert self.sent_part.wait(_TIMEOUT), "the stalled PATCH never sent its first part"

    def _patch(self, start: int, body: bytes | Iterator[bytes]) -> requests.Response:
        end = start + len(body) if isinstance(body, bytes) else self.SIZE
        return requests.patch(
            self.base + self.location,
            data=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{end - 1}",
            },
            timeout=_TIMEOUT,
        )

    def _stalled_patch(self) -> None:
        def body() -> Iterator[bytes]:
            yield self.data[self.ACKED : self.ACKED + self.IN_FLIGHT]
            self.sent_part.set()
            self.killed.wait(_TIMEOUT)
            raise ConnectionAbortedError("the probe gives up on this PATCH")

        with contextlib.suppress(Exception):  # it never completes: the server dies under it
            self._patch(self.ACKED, body())

    def resume(self) -> int:
        """After the restart: the upload holds at least the acknowledged bytes and at most the
        sent ones, and finishes from there with the right bytes. Returns the bytes it held."""
        self.killed.set()
        self.thread.join(_TIMEOUT)
        status = requests.get(self.base + self.location, timeout=_TIMEOUT)
        assert status.status_code == 204, status.text
        held = uploaded_size(status.headers["Range"])
        assert self.ACKED <= held <= self.ACKED + self.IN_FLIGHT, (held, status.headers)
        rest = self._patch(held, self.data[held:])
        assert rest.status_code == 202, rest.text
        assert rest.headers["Range"] == f"0-{self.SIZE - 1}"
        digest = sha256(self.data)
        done = requests.put(self.base + self.location, params={"digest": digest}, timeout=_TIMEOUT)
        assert done.status_code == 201, done.text
        pulled = requests.get(f"{self.base}/v2/{self.repo}/blobs/{digest}", timeout=_TIMEOUT)
        assert pulled.status_code == 200 and pulled.content == self.data
        return held


def _visible_state_problems(base: str, ledger: Ledger) -> list[str]:
    """Every broken promise in what the server shows now: an acknowledged blob or manifest
    missing or different, a visible blob with other bytes, a visible manifest with a missing
    blob, a tag on other bytes."""
    blobs_tried, blobs_acked, manifests_tried, manifests_acked = ledger.snapshot()
    problems = []
    with requests.Session() as http:
        for (repo, digest), data in sorted(blobs_tried.items()):
            url = f"{base}/v2/{repo}/blobs/{digest}"
            head = http.head(url, timeout=_TIMEOUT)
            if head.status_code == 404 and (repo, digest) not in blobs_acked:
                continue
            if head.status_code != 200:
                problems.append(f"HEAD {repo}@{digest}: {head.status_code}")
                continue
            if head.headers.get("Content-Length") != str(len(data)):
                problems.append(f"HEAD {repo}@{digest}: {head.headers.get('Content-Length')} bytes")
            got = http.get(url, timeout=_TIMEOUT)
            if got.status_code != 200 or got.content != data:
                problems.append(f"GET {repo}@{digest}: {got.status_code}, other bytes")
            elif sha256(got.content) != got.headers.get("Docker-Content-Digest"):
                problems.append(f"GET {repo}@{digest}: Docker-Content-Digest differs")
        accept = {"Accept": OCI_MANIFEST}
        for (repo, digest), (tag, body, blob_digests) in sorted(manifests_tried.items()):
            acked = (repo, digest) in manifests_acked
            for ref in (digest, tag):
                got = http.get(
                    f"{base}/v2/{repo}/manifests/{ref}", headers=accept, timeout=_TIMEOUT
                )
                if got.status_code == 404 and not acked:
                    continue
                if got.status_code != 200 or got.content != body:
                    problems.append(f"GET manifest {repo}:{ref}: {got.status_code}, other bytes")
            if (
                not acked
                and http.head(f"{base}/v2/{repo}/manifests/{digest}", timeout=_TIMEOUT).status_code
                == 404
            ):
                continue
            for blob in blob_digests:
                head = http.head(f"{base}/v2/{repo}/blobs/{blob}", timeout=_TIMEOUT)
                if head.status_code != 200:
                    problems.append(f"manifest {repo}@{digest} visible, its blob {blob} not")
    return problems


def _catalog_problems(base: str, ledger: Ledger, probe_repos: set[str]) -> list[str]:
    """Repositories and tags the server lists that no one pushed."""
    _, _, manifests_tried, _ = ledger.snapshot()
    tags = {(repo, tag) for (repo, _), (tag, _, _) in manifests_tried.items()}
    repos = {repo for repo, _ in tags} | probe_repos
    listed = requests.get(f"{base}/v2/_catalog", params={"n": 1000}, timeout=_TIMEOUT)
    assert listed.status_code == 200, listed.text
    problems = [f"unknown repository {r}" for r in listed.json()["repositories"] if r not in repos]
    for repo in sorted({repo for repo, _ in tags}):
        got = requests.get(f"{base}/v2/{repo}/tags/list", params={"n": 1000}, timeout=_TIMEOUT)
        assert got.status_code == 200, got.text
        problems += [f"unknown tag {repo}:{t}" for t in got.json()["tags"] if (repo, t) not in tags]
    return problems


@pytest.mark.parametrize("workers", [1, 2])
def test_acknowledged_pushes_survive_sigkill_and_uploads_resume(
    tmp_path: Path, workers: int
) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    began = time.monotonic()
    data_dir = tmp_path / "data"
    with _serving(data_dir, workers) as (reg, seen):
        ledger, restarts = Ledger(), Restarts()
        pushers = [
            Pusher(
                reg.url,
                plan_images(rng, f"kill/p{i}", IMAGES_PER_PUSHER),
                ledger,
                restarts,
                random.Random(rng.random()),
            )
            for i in range(PUSHERS)
        ]
        held: list[int] = []
        kill_times: list[float] = []
        try:
            for p in pushers:
                p.start()
            for kill in range(KILLS):
                target = ledger.acks + ACKS_BETWEEN_KILLS
                assert ledger.wait_for_acks(target, PUSHERS), (seed, ledger.violations)
                probe = _Probe(reg.url, f"kill/probe{kill}", rng)
                killed_at = time.monotonic()
                _kill(reg, workers, seen, probe, restarts)
                kill_times.append(round(time.monotonic() - killed_at, 2))
                _start_again(reg)
                held.append(probe.resume())
                problems = _visible_state_problems(reg.url, ledger)
                assert not problems, (seed, f"after kill {kill + 1}", problems)
                # Only now may the pushers go on: all of them lost a connection to the dead
                # server and wait for this, so between kills they make exactly the progress
                # that triggers the next one.
                restarts.advance()
            for p in pushers:
                p.join(120)
            assert not any(p.is_alive() for p in pushers), (seed, "a pusher is stuck")
        finally:
            restarts.close()
        assert not ledger.violations, (seed, ledger.violations)
        assert ledger.manifests_acked == set(ledger.manifests_tried), seed
        problems = _visible_state_problems(reg.url, ledger)
        problems += _catalog_problems(reg.url, ledger, {f"kill/probe{k}" for k in range(KILLS)})
        assert not problems, (seed, problems)
        for resume in ledger.resumes:
            assert resume.acked <= resume.reported <= resume.sent, (seed, resume)

        reg.stop()  # SIGTERM: a clean stop before SQLite is checked
        log = reg.log()
        assert "Traceback" not in log, log
        with contextlib.closing(sqlite3.connect(data_dir / "skyreg.db")) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert not blob_files_match_their_names(data_dir), seed
    print(
        f"\nworkers={workers} seed={seed}: {ledger.acks} acknowledgements "
        f"({ledger.patch_acks} PATCH), {ledger.lost} connections lost, "
        f"{len(ledger.resumes)} pusher resumes, probe held {held} bytes, "
        f"kills took {kill_times}s, "
        f"{time.monotonic() - began:.1f}s"
    )


def test_stopping_server_closes_an_upload_whose_body_is_arriving_at_once(
    registry: RunningRegistry,
) -> None:
    """SIGTERM (or the master's death) while an upload's body arrives: the connection closes at
    once instead of hanging until the shutdown grace, and the upload resumes after a restart."""
    data = random.Random(17).randbytes(3 * MiB)
    opened = requests.post(f"{registry.url}/v2/faults/blobs/uploads/", timeout=_TIMEOUT)
    assert opened.status_code == 202, opened.text
    location = opened.headers["Location"]
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: {registry.host}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Range: 0-{len(data) - 1}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", registry.port), timeout=20) as sock:
        sock.sendall(head.encode() + data[: 3 * MiB // 2])

        def held() -> int:
            status = requests.get(registry.url + location, timeout=_TIMEOUT)
            return uploaded_size(status.headers["Range"]) if status.status_code == 204 else 0

        wait_for(lambda: held() >= MiB, "the server to write the first part")  # handler running
        assert registry.proc is not None
        registry.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(OSError):  # a server that closes the connection is fine too
            sock.sendall(data[3 * MiB // 2 :])
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:  # closed with bytes of ours unread: a reset, not a FIN
            answer = b""
        except TimeoutError:
            pytest.fail("the stopping server neither answered the upload nor closed it in 20 s")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 202 "), answer
    assert registry.proc.wait(timeout=_TIMEOUT) == 0

    registry.start()  # same port and data dir: the upload goes on from what it holds
    held_now = held()
    assert MiB <= held_now <= len(data)
    if held_now < len(data):  # all of it may have reached the store before the stop
        rest = requests.patch(
            registry.url + location,
            data=data[held_now:],
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{held_now}-{len(data) - 1}",
            },
            timeout=_TIMEOUT,
        )
        assert rest.status_code == 202, rest.text
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    done = requests.put(registry.url + location, params={"digest": digest}, timeout=_TIMEOUT)
    assert done.status_code == 201, done.text
    pulled = requests.get(f"{registry.url}/v2/faults/blobs/{digest}", timeout=_TIMEOUT)
    assert pulled.content == data
