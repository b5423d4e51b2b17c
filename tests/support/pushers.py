"""Concurrent image pushers for fault tests: each records every acknowledgement the registry
gave it, treats a broken connection as an unknown outcome, waits for the next server start and
carries on (resuming a chunked upload from the size the server reports).

A support module for `tests/faults/test_kill_during_push.py`, not a test module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import random
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.support.oci import OCI_MANIFEST, image_manifest, sha256

Mode = Literal["post-digest", "post-put", "chunked"]
MODES: tuple[Mode, ...] = ("post-digest", "post-put", "chunked")

REQUEST_TIMEOUT = 30.0  # seconds for any one request: a stall fails the pusher, not the run
RESTART_TIMEOUT = 90.0  # how long a pusher waits for the next server start
MAX_ATTEMPTS = 8  # per blob or manifest; each failed attempt waited for a new server start


class Lost(Exception):
    """A request whose connection broke: it may or may not have taken effect."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"connection lost during server epoch {epoch}")
        self.epoch = epoch


@dataclass
class Answer:
    """A response: status, headers and the whole body."""

    status_code: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Restarts:
    """Which server start pushers talk to (the test advances the epoch after each restart and
    its checks), and the connections they have open, which the test can cut."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._epoch = 0
        self._kills = 0
        self._closed = False
        self._open: set[http.client.HTTPConnection] = set()
        self._cut: set[http.client.HTTPConnection] = set()

    def begin(self, conn: http.client.HTTPConnection, epoch: int) -> None:
        """Connect `conn` for a request of `epoch`, unless that server is being killed; a
        connection the test cut while it was being made is closed at once."""
        with self._cond:
            if self._kills > epoch:
                raise ConnectionAbortedError("the server is being killed")
            self._open.add(conn)
        conn.connect()
        with self._cond:
            if conn in self._cut:
                raise ConnectionAbortedError("cut while connecting")

    def end(self, conn: http.client.HTTPConnection) -> None:
        """That connection is done."""
        with self._cond:
            self._open.discard(conn)
            self._cut.discard(conn)

    def cut(self) -> None:
        """Shut down every pusher connection open or being made: each such request becomes
        `Lost` (no new one starts until the next epoch: `killing` came first)."""
        with self._cond:
            for conn in self._open:
                if conn.sock is None:
                    self._cut.add(conn)
                else:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)

    def current(self) -> int:
        """The epoch of the server start now answering (or about to be killed)."""
        with self._cond:
            return self._epoch

    def killing(self) -> None:
        """The server is about to be killed: a request of this epoch that stalls from now on
        has an unknown outcome; it is not a hung server."""
        with self._cond:
            self._kills += 1

    def kills(self) -> int:
        """How many kills the test announced so far."""
        with self._cond:
            return self._kills

    def advance(self) -> None:
        """A new server start answers: wake every pusher waiting for one."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def close(self) -> None:
        """The test is over: release every waiting pusher."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_past(self, epoch: int) -> None:
        """Block until a server start later than `epoch` answers."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._closed or self._epoch > epoch, timeout=RESTART_TIMEOUT
            ):
                raise AssertionError(
                    f"a connection broke in server epoch {epoch} and no restart followed "
                    "(a connection error while the server was up?)"
                )
            if self._closed:
                raise AssertionError("the test ended while a pusher waited for a restart")


@dataclass
class Resume:
    """A chunked upload continued after a broken connection: what the client knew and what the
    server reported (bytes held)."""

    repo: str
    location: str
    acked: int
    sent: int
    reported: int


@dataclass
class Ledger:
    """Everything the pushers tried and everything the registry acknowledged."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    acks: int = 0
    patch_acks: int = 0
    lost: int = 0
    blobs_tried: dict[tuple[str, str], bytes] = field(default_factory=dict)
    blobs_acked: set[tuple[str, str]] = field(default_factory=set)
    # (repo, manifest digest) → (tag, manifest bytes, [blob digests])
    manifests_tried: dict[tuple[str, str], tuple[str, bytes, list[str]]] = field(
        default_factory=dict
    )
    manifests_acked: set[tuple[str, str]] = field(default_factory=set)
    resumes: list[Resume] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    finished: int = 0

    def ack(self, kind: Literal["blob", "manifest", "patch"], repo: str, digest: str = "") -> None:
        """Record one acknowledgement and wake the test waiting for progress."""
        with self.cond:
            self.acks += 1
            if kind == "blob":
                self.blobs_acked.add((repo, digest))
            elif kind == "manifest":
                self.manifests_acked.add((repo, digest))
            else:
                self.patch_acks += 1
            self.cond.notify_all()

    def violation(self, message: str) -> None:
        """Record a broken promise (checked by the test at the end)."""
        with self.cond:
            self.violations.append(message)
            self.cond.notify_all()

    def wait_for_acks(self, count: int, pushers: int) -> bool:
        """Wait until `count` acknowledgements arrived in total; False if all `pushers` finished
        (or a generous deadline passed) first."""
        with self.cond:
            self.cond.wait_for(
                lambda: self.acks >= count or self.finished >= pushers, timeout=RESTART_TIMEOUT
            )
            return self.acks >= count

    def snapshot(
        self,
    ) -> tuple[
        dict[tuple[str, str], bytes],
        set[tuple[str, str]],
        dict[tuple[str, str], tuple[str, bytes, list[str]]],
        set[tuple[str, str]],
    ]:
        """Copies of what was tried and acknowledged so far."""
        with self.cond:
            return (
                dict(self.blobs_tried),
                set(self.blobs_acked),
                dict(self.manifests_tried),
                set(self.manifests_acked),
            )


@dataclass
class PlannedImage:
    """One image a pusher will push: its blobs (config first) and how each is uploaded."""

    repo: str
    tag: str
    blobs: list[bytes]
    modes: list[Mode]
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def plan_images(rng: random.Random, prefix: str, count: int) -> list[PlannedImage]:
    """`count` random images: a config and 1-3 layers of 4 KiB to 2 MiB each (most small), every
    blob with a random upload mode, in repositories and tags no other pusher uses."""
    images = []
    for i in range(count):
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "nonce": rng.randbytes(16).hex()}
        ).encode()
        layers = [
            rng.randbytes(
                rng.randint(4 << 10, 64 << 10)
                if rng.random() < 0.6
                else rng.randint(256 << 10, 2 << 20)
            )
            for _ in range(rng.randint(1, 3))
        ]
        blobs = [config, *layers]
        images.append(
            PlannedImage(
                repo=f"{prefix}/r{i % 2}",
                tag=f"t{i}",
                blobs=blobs,
                modes=[rng.choice(MODES) for _ in blobs],
                manifest=image_manifest(config, layers),
            )
        )
    return images


def uploaded_size(range_header: str | None) -> int:
    """The byte count an upload's `Range: 0-N` header reports (N + 1; "0-0" may mean 0)."""
    if range_header is None or not range_header.startswith("0-"):
        raise ValueError(f"bad upload Range header {range_header!r}")
    return int(range_header[2:]) + 1


@dataclass
class _Chunked:
    """A chunked upload's client-side state, kept across broken connections."""

    location: str | None = None
    acked: int = 0  # bytes the server acknowledged with a 202
    sent: int = 0  # bytes the client put on the wire, acknowledged or not
    broken: bool = False  # the last request on it lost its connection
    put_sent: bool = False  # the finishing PUT went out (it may have committed the blob)


class Pusher(threading.Thread):
    """Pushes its planned images one after another through every kill and restart."""

    def __init__(
        self,
        base: str,
        images: list[PlannedImage],
        ledger: Ledger,
        restarts: Restarts,
        rng: random.Random,
    ) -> None:
        super().__init__(daemon=True, name=f"pusher-{images[0].repo if images else ''}")
        self.host = base.removeprefix("http://")
        self.images = images
        self.ledger = ledger
        self.restarts = restarts
        self.rng = rng
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for image in self.images:
                self._push(image)
        except BaseException as e:  # reported by the test, with its traceback
            self.error = e
            self.ledger.violation(f"{self.name} stopped: {e!r}")
        finally:
            with self.ledger.cond:
                self.ledger.finished += 1
                self.ledger.cond.notify_all()

    def _push(self, image: PlannedImage) -> None:
        digests = [sha256(b) for b in image.blobs]
        with self.ledger.cond:
            for data, digest in zip(image.blobs, digests, strict=True):
                self.ledger.blobs_tried[(image.repo, digest)] = data
            self.ledger.manifests_tried[(image.repo, image.digest)] = (
                image.tag,
                image.manifest,
                digests,
            )
        for data, mode in zip(image.blobs, image.modes, strict=True):
            if mode == "chunked":
                self._retry(functools.partial(self._chunked, image.repo, data, _Chunked()))
            elif mode == "post-put":
                self._retry(functools.partial(self._post_put, image.repo, data))
            else:
                self._retry(functools.partial(self._post_digest, image.repo, data))
        self._retry(functools.partial(self._put_manifest, image))

    # -- requests -----------------------------------------------------------------------------

    def _retry(self, attempt: Callable[[], None]) -> None:
        for _ in range(MAX_ATTEMPTS):
            try:
                attempt()
                return
            except Lost as lost:
                self.restarts.wait_past(lost.epoch)
        raise AssertionError(f"no success after {MAX_ATTEMPTS} attempts")

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        data: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """One request on a new connection the test can cut (`Restarts.cut`); a broken
        connection is `Lost`, and so is a stall after the test announced a kill."""
        epoch = self.restarts.current()
        if params:
            url += "?" + urllib.parse.urlencode(params)
        conn = http.client.HTTPConnection(self.host, timeout=REQUEST_TIMEOUT)
        try:
            self.restarts.begin(conn, epoch)
            conn.request(method, url, body=data, headers=headers or {})
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read())
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, TimeoutError) and self.restarts.kills() <= epoch:
                raise AssertionError(f"{method} {url}: no answer within {REQUEST_TIMEOUT}s") from e
            with self.ledger.cond:
                self.ledger.lost += 1
            raise Lost(epoch) from e
        finally:
            self.restarts.end(conn)
            conn.close()

    def _expect(self, resp: Answer, status: int, what: str) -> None:
        if resp.status_code != status:
            raise AssertionError(f"{what}: {resp.status_code} {resp.text[:300]}")

    def _blob_created(self, resp: Answer, repo: str, digest: str, what: str) -> None:
        self._expect(resp, 201, what)
        if resp.headers.get("Docker-Content-Digest") != digest:
            self.ledger.violation(f"{what}: 201 names {resp.headers.get('Docker-Content-Digest')}")
        self.ledger.ack("blob", repo, digest)

    def _post_digest(self, repo: str, data: bytes) -> None:
        digest = sha256(data)
        resp = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            params={"digest": digest},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        self._blob_created(resp, repo, digest, f"POST ?digest={digest} to {repo}")

    def _post_put(self, repo: str, data: bytes) -> None:
        digest = sha256(data)
        opened = self._request("POST", f"/v2/{repo}/blobs/uploads/")
        self._expect(opened, 202, f"POST upload to {repo}")
        resp = self._request(
            "PUT",
            opened.headers["Location"],
            params={"digest": digest},
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        self._blob_created(resp, repo, digest, f"PUT ?digest={digest} to {repo}")

    def _chunked(self, repo: str, data: bytes, state: _Chunked) -> None:
        try:
            self._chunked_attempt(repo, data, state)
        except Lost:
            state.broken = True
            raise

    def _chunked_attempt(self, repo: str, data: bytes, state: _Chunked) -> None:
        digest = sha256(data)
        offset = 0
        if state.location is not None and state.broken and state.acked > 0:
            offset = self._resume(repo, digest, state)
            if offset < 0:  # the finishing PUT committed it: start again from nothing
                state.location = None
        elif state.location is not None and state.broken:
            state.location = None  # no byte acknowledged yet: a new upload is simpler
        state.broken = False
        if state.location is None:
            opened = self._request("POST", f"/v2/{repo}/blobs/uploads/")
            self._expect(opened, 202, f"POST upload to {repo}")
            state.location = opened.headers["Location"]
            state.acked = state.sent = offset = 0
            state.put_sent = False
        pieces = self.rng.randint(2, 4)
        step = max(len(data) // pieces, 1)
        while offset < len(data):
            chunk = data[offset : offset + step]
            end = offset + len(chunk)
            state.sent = max(state.sent, end)
            resp = self._request(
                "PATCH",
                state.location,
                data=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end - 1}",
                },
            )
            self._expect(resp, 202, f"PATCH {offset}-{end - 1} of {state.location}")
            if resp.headers.get("Range") != f"0-{end - 1}":
                got = resp.headers.get("Range")
                self.ledger.violation(f"PATCH {offset}-{end - 1} of {state.location}: Range {got}")
            state.acked = offset = end
            self.ledger.ack("patch", repo)
        state.put_sent = True
        resp = self._request("PUT", state.location, params={"digest": digest})
        self._blob_created(resp, repo, digest, f"PUT ?digest={digest} of {state.location}")

    def _resume(self, repo: str, digest: str, state: _Chunked) -> int:
        """Where to continue an interrupted upload (the size the server holds), checked against
        what was acknowledged and sent; -1 when the finishing PUT had committed it."""
        assert state.location is not None
        status = self._request("GET", state.location)
        if status.status_code == 404 and state.put_sent:
            return -1
        if status.status_code != 204:
            self.ledger.violation(
                f"resuming {state.location} ({state.acked} bytes acknowledged): "
                f"{status.status_code} {status.text[:300]}"
            )
            return -1
        reported = uploaded_size(status.headers.get("Range"))
        with self.ledger.cond:
            self.ledger.resumes.append(
                Resume(repo, state.location, state.acked, state.sent, reported)
            )
        if not state.acked <= reported <= state.sent:
            self.ledger.violation(
                f"resuming {state.location}: the server holds {reported} bytes, but "
                f"{state.acked} were acknowledged and {state.sent} sent"
            )
            return -1
        return reported

    def _put_manifest(self, image: PlannedImage) -> None:
        resp = self._request(
            "PUT",
            f"/v2/{image.repo}/manifests/{image.tag}",
            data=image.manifest,
            headers={"Content-Type": OCI_MANIFEST},
        )
        self._expect(resp, 201, f"PUT manifest {image.repo}:{image.tag}")
        if resp.headers.get("Docker-Content-Digest") != image.digest:
            self.ledger.violation(f"manifest {image.repo}:{image.tag}: digest header differs")
        self.ledger.ack("manifest", image.repo, image.digest)


def blob_files_match_their_names(data_dir: Path) -> list[str]:
    """Every file under `data_dir/blobs/sha256` whose bytes do not hash to its name."""
    bad = []
    for path in sorted((data_dir / "blobs" / "sha256").glob("*/*")):
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(str(path))
    return bad
