"""A power cut takes back nothing the registry acknowledged: a manifest PUT answered 201 is in
the SQLite database that a power cut at that moment would leave on disk.

Why this shows it without cutting power: after a power cut, a file holds what was synced to the
disk (fsync/fdatasync) and nothing written after its last sync can be counted on. Copying the
data dir at the moment of the answer would prove nothing, because a copy reads the page cache,
which holds written-but-unsynced bytes too. So the test records every write and sync the server
makes to its database files (strace, attached to the running server), and rebuilds the files as
the disk holds them at the moment the 201 goes out: the state when the server was attached (made
durable by `sync` first), plus each write issued before the last sync of its file that completed
before the answer was written to the socket. Unsynced writes are dropped — the worst a power cut
can do. The rebuilt files are then opened with SQLite, which recovers its WAL as after a crash.

That the rebuilt copy can miss an acknowledged write is shown by the same test with
`--sqlite-synchronous normal`, where SQLite syncs the WAL only at checkpoints: the manifest is in
the files (the page cache) but not in the copy a power cut would leave.

Assumed, not shown: the disk honours fsync, and file names, once synced, stay (SQLite syncs the
directory when it creates its WAL; the blob store syncs the directory after each rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.support.oci import image_manifest, push_blob, put_manifest, sha256
from tests.support.servers import RunningRegistry
from tests.support.waiting import wait_for

_DB_FILES = ("skyreg.db", "skyreg.db-wal")
_SYSCALLS = "pwrite64,write,writev,sendto,sendmsg,fsync,fdatasync,ftruncate"
# `12 pwrite64(7</d/skyreg.db-wal>, "\x37\x7f", 4096, 32 <unfinished ...>` or `... ) = 4096`
_CALL_RE = re.compile(r"^(\d+) +(\w+)\((\d+)<([^>]*)>(.*)$")  # strace pads short pids
_RESUMED_RE = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>.*\) = (-?\d+)")
_STRING_RE = re.compile(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?')
_RESULT_RE = re.compile(r"\) = (-?\d+)")


@dataclass
class _Write:
    path: str
    offset: int
    data: bytes
    seq: int


@dataclass
class _Sync:
    path: str
    issued: int  # position in the trace where the sync was called
    done: int = -1  # where it returned 0 (-1: it did not, before the trace ended)


@dataclass
class _Trace:
    """The database writes and syncs, and socket sends, in the order the trace shows them."""

    writes: list[_Write] = field(default_factory=list)
    truncates: list[tuple[str, int, int]] = field(default_factory=list)  # path, length, seq
    syncs: list[_Sync] = field(default_factory=list)
    sends: list[tuple[bytes, int]] = field(default_factory=list)


def _bytes(args: str) -> tuple[bytes, bool]:
    m = _STRING_RE.search(args)
    assert m is not None, args
    return bytes.fromhex(m.group(1).replace("\\x", "")), m.group(2) is not None


def _parse(text: str, data_dir: Path) -> _Trace:
    trace = _Trace()
    pending: dict[tuple[str, str], _Sync] = {}  # (thread, syscall) -> a sync not yet returned
    db_paths = {str(data_dir / name) for name in _DB_FILES}
    for seq, line in enumerate(text.splitlines()):
        if (resumed := _RESUMED_RE.match(line)) is not None:
            tid, call, result = resumed.groups()
            sync = pending.pop((tid, call), None)
            if sync is not None and result == "0":
                sync.done = seq
            continue
        m = _CALL_RE.match(line)
        if m is None:
            continue
        tid, call, _fd, raw_path, rest = m.groups()
        path = bytes.fromhex(raw_path.replace("\\x", "")).decode(errors="replace")
        finished = _RESULT_RE.search(rest)
        if path in db_paths:
            if call == "pwrite64":
                data, cut = _bytes(rest)
                assert not cut, f"strace cut a database write short: {line[:200]}"
                offset = int(rest.rsplit(",", 1)[1].split(")")[0].split("<")[0].strip())
                trace.writes.append(_Write(path, offset, data, seq))
            elif call in ("write", "writev"):
                raise AssertionError(
                    f"a database write without an offset cannot be replayed: {line}"
                )
            elif call == "ftruncate":
                length = int(rest.split(",", 1)[1].split(")")[0].split("<")[0].strip())
                trace.truncates.append((path, length, seq))
            elif call in ("fsync", "fdatasync"):
                sync = _Sync(path, seq)
                trace.syncs.append(sync)
                if finished is not None:
                    sync.done = seq if finished.group(1) == "0" else -1
                else:
                    pending[(tid, call)] = sync
        elif call in ("sendto", "write") and path.startswith("socket:") and '"' in rest:
            trace.sends.append((_bytes(rest)[0], seq))
    return trace


def _rebuild(
    trace: _Trace, base: dict[str, bytes], data_dir: Path, cut: int, out: Path, *, synced: bool
) -> None:
    """The database files at trace position `cut`: as the disk holds them after a power cut
    there (`synced`: only writes a completed sync covers), or as the page cache holds them."""
    out.mkdir()
    for name in _DB_FILES:
        path = str(data_dir / name)
        limit = cut
        if synced:
            limit = max(
                (s.issued for s in trace.syncs if s.path == path and 0 <= s.done < cut),
                default=-1,
            )
        content = bytearray(base.get(name, b""))
        steps: list[tuple[int, int, bytes | None]] = [
            (w.seq, w.offset, w.data) for w in trace.writes if w.path == path
        ]
        steps += [(seq, length, None) for p, length, seq in trace.truncates if p == path]
        for seq, offset, data in sorted(steps, key=lambda step: step[0]):
            if seq >= limit:
                break
            if data is None:
                del content[offset:]
            else:
                content.extend(bytes(max(0, offset - len(content))))
                content[offset : offset + len(data)] = data
        if content or name in base:
            (out / name).write_bytes(bytes(content))


def _manifest_in(copy: Path, digest: str, tag: str) -> bool:
    db = sqlite3.connect(copy / "skyreg.db")
    try:
        found = db.execute("SELECT 1 FROM manifests WHERE digest = ?", (digest,)).fetchone()
        tagged = db.execute(
            "SELECT 1 FROM tags WHERE name = ? AND manifest_digest = ?", (tag, digest)
        ).fetchone()
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return found is not None and tagged is not None
    finally:
        db.close()


@pytest.fixture
def strace() -> str:
    found = shutil.which("strace")
    if found is None:
        pytest.fail("strace is not installed (scripts/install-test-tools.sh installs it)")
    probe = subprocess.run(
        [found, "-qq", "-e", "trace=none", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"tracing processes is not permitted here: {probe.stderr.decode().strip()}")
    return found


def _attach(strace: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """strace following every thread of `pid`, writing database writes and syncs and socket
    sends (their bytes in hex, whole) to `out`."""
    options = ["-f", "-qq", "-y", "-xx", "-s", "65536", "-e", f"trace={_SYSCALLS}"]
    return subprocess.Popen([strace, *options, "-o", str(out), "-p", str(pid)])


@pytest.mark.parametrize(
    ("synchronous", "survives"),
    [("full", True), ("normal", False)],
    ids=["full-keeps-every-acknowledged-manifest", "normal-can-lose-one"],
)
def test_acknowledged_manifest_is_on_disk_when_the_answer_goes_out(
    tmp_path: Path, strace: str, synchronous: str, survives: bool
) -> None:
    data_dir = tmp_path / "data"
    reg = RunningRegistry(
        data_dir=data_dir, extra_args=["--no-auth", "--sqlite-synchronous", synchronous]
    )
    tracer: subprocess.Popen[bytes] | None = None
    trace_file = tmp_path / "trace.txt"
    try:
        reg.start()
        assert reg.proc is not None
        base_url, repo, tag = reg.url, "app/durable", "v1"
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()})
        layer = os.urandom(2048)
        for blob in (config.encode(), layer):
            push_blob(base_url, repo, blob)
        manifest = image_manifest(config.encode(), [layer])
        digest = sha256(manifest)

        # Everything so far is made durable: the power cut is modelled from here on.
        os.sync()
        base = {n: (data_dir / n).read_bytes() for n in _DB_FILES if (data_dir / n).exists()}
        tracer = _attach(strace, reg.proc.pid, trace_file)

        def attached() -> bool:
            # An answer the server sends shows in the trace once strace follows it.
            assert requests.get(f"{base_url}/v2/", timeout=10).status_code == 200
            return trace_file.exists() and b"HTTP/1.1 200" in _sent(trace_file, data_dir)

        wait_for(attached, "strace attached to the server")
        resp = put_manifest(base_url, repo, tag, manifest)
        assert resp.status_code == 201, resp.text
        assert resp.headers["Docker-Content-Digest"] == digest
    finally:
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)  # detach, flush the trace and exit
            tracer.wait(timeout=30)
        reg.stop()

    trace = _parse(trace_file.read_text(), data_dir)
    acks = [
        seq
        for data, seq in trace.sends
        if data.startswith(b"HTTP/1.1 201") and digest.encode() in data
    ]
    assert len(acks) == 1, "the 201 answer to the manifest PUT is not in the trace"
    written, durable = tmp_path / "written", tmp_path / "durable"
    _rebuild(trace, base, data_dir, acks[0], written, synced=False)
    _rebuild(trace, base, data_dir, acks[0], durable, synced=True)

    # The commit was written before the answer in both modes: the copies differ only by syncs.
    assert _manifest_in(written, digest, tag)
    assert _manifest_in(durable, digest, tag) is survives


def _sent(trace_file: Path, data_dir: Path) -> bytes:
    return b"".join(data for data, _ in _parse(trace_file.read_text(), data_dir).sends)
