"""A client that goes away in the middle of an upload body is logged in one INFO line, not as a
server error, and the upload keeps what reached the store (it can be resumed)."""

from __future__ import annotations

import hashlib
import re
import socket

import requests

from tests.support.oci import sha256
from tests.support.servers import RunningRegistry
from tests.support.waiting import wait_for

MiB = 1 << 20
_SERVER_ERRORS = ("Traceback", "Error handling request", "Unhandled exception", "unhandled error")


def _send_part_and_close(reg: RunningRegistry, head: str, body: bytes) -> None:
    """Send a request head promising more body than `body`, then the body, then hang up."""
    with socket.create_connection(("127.0.0.1", reg.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)


def _went_away_line(reg: RunningRegistry, what: str) -> re.Match[str]:
    pattern = re.compile(
        rf"^.*{re.escape(what)}: connection lost after (\d+) bytes"
        r"(?:; the upload holds (\d+) bytes)?.*$",
        re.MULTILINE,
    )
    # Whichever comes first: the line, or a server error instead of it.
    wait_for(
        lambda: pattern.search(reg.log()) or any(m in reg.log() for m in _SERVER_ERRORS),
        f"the log line about {what}",
    )
    line = pattern.search(reg.log())
    assert line is not None, reg.log()
    return line


def _assert_no_server_error(reg: RunningRegistry) -> None:
    log = reg.log()
    for marker in _SERVER_ERRORS:
        assert marker not in log, log
    assert not re.search(r'"(PATCH|POST) [^"]*" 500 ', log), log


def test_client_leaving_mid_patch_is_one_info_line_and_upload_resumes(
    registry: RunningRegistry,
) -> None:
    data = hashlib.shake_256(b"disconnect").digest(3 * MiB)
    r = requests.post(f"{registry.url}/v2/faults/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    upload_id = r.headers["Docker-Upload-UUID"]

    _send_part_and_close(
        registry,
        f"PATCH {location} HTTP/1.1\r\nHost: {registry.host}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {10 * MiB}\r\n\r\n",
        data[:MiB],
    )

    line = _went_away_line(registry, f"upload {upload_id}")
    assert line.group(2) is not None, line.group(0)
    received, kept = int(line.group(1)), int(line.group(2))
    assert kept <= received <= MiB, line.group(0)
    assert len(re.findall(re.escape(upload_id) + ": connection lost", registry.log())) == 1
    _assert_no_server_error(registry)

    # The status reports what was kept, and the upload continues from there.
    status = requests.get(f"{registry.url}{location}", timeout=30)
    assert status.status_code == 204, status.text
    assert status.headers["Range"] == f"0-{max(kept - 1, 0)}"
    rest = requests.patch(
        f"{registry.url}{location}",
        data=data[kept:],
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{kept}-{len(data) - 1}",
        },
        timeout=60,
    )
    assert rest.status_code == 202, rest.text
    done = requests.put(f"{registry.url}{location}", params={"digest": sha256(data)}, timeout=60)
    assert done.status_code == 201, done.text
    blob = requests.get(f"{registry.url}/v2/faults/blobs/{sha256(data)}", timeout=60)
    assert blob.status_code == 200 and blob.content == data


def test_client_leaving_mid_monolithic_upload_is_one_info_line(
    registry: RunningRegistry,
) -> None:
    data = hashlib.shake_256(b"monolithic").digest(10 * MiB)
    digest = sha256(data)
    _send_part_and_close(
        registry,
        f"POST /v2/faults/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {registry.host}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n",
        data[:MiB],
    )

    _went_away_line(registry, f"monolithic upload of {digest} to faults")
    _assert_no_server_error(registry)
    assert requests.head(f"{registry.url}/v2/faults/blobs/{digest}", timeout=30).status_code == 404
    r = requests.get(f"{registry.url}/v2/", timeout=30)
    assert r.status_code == 200
