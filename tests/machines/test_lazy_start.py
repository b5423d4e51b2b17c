"""Lazy start (issue 18): a real agent starts a machine from a FUSE mount of its image's layer
indexes (made by a real registry's scan worker) while the whole image is pulled in the
background; later starts use the unpacked tree; an image that cannot be mounted is pulled whole,
and the agent says why; nothing stays mounted once the machines or the agent stop."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import zstandard

from skyreg.lazy.index import ARTIFACT_TYPE
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import Entry, busybox_layer, canonical_json, host_architecture, make_tar
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, OCI_MANIFEST, descriptor, push_blob, put_manifest, sha256
from tests.support.platform import Tenancy, authed
from tests.support.waiting import children, free_port, http_get, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(importlib.util.find_spec("pyfuse3") is None, reason="no pyfuse3"),
    pytest.mark.skipif(os.geteuid() != 0, reason="lazy mounts need a root agent"),
]

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAZY_STARTED = "Started from a lazy mount"
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass
class Platform:
    reg: InProcessRegistry
    admin: str
    agent: RunningAgent

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(method, f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), **kw)
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def push(self, app: str, tag: str, layers: list[tuple[str, bytes]], script: str) -> str:
        """Push an image of `layers` running `script` as nobody; waits for its layer-index
        referrer (the scan worker makes it); returns the manifest digest."""
        session = authed(self.admin)
        config = canonical_json(
            {
                "architecture": host_architecture(),
                "os": "linux",
                "config": {
                    "Env": ["PATH=/bin"],
                    "Cmd": ["/bin/sh", "-c", script],
                    "User": "nobody",
                },
                "rootfs": {"type": "layers", "diff_ids": [_diff_id(d) for _, d in layers]},
            }
        )
        for blob in [config, *(data for _, data in layers)]:
            push_blob(self.reg.url, app, blob, session)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(media_type, data) for media_type, data in layers],
            }
        ).encode()
        put = put_manifest(self.reg.url, app, tag, manifest, session=session)
        assert put.status_code == 201, put.text
        digest = sha256(manifest)

        def indexed() -> bool:
            listed = session.get(
                f"{self.reg.url}/v2/{app}/referrers/{digest}",
                params={"artifactType": ARTIFACT_TYPE},
                timeout=30,
            )
            return listed.status_code == 200 and bool(listed.json()["manifests"])

        wait_for(indexed, f"the layer-index referrer of {app}:{tag}", timeout=120)
        return digest

    def deploy(self, app: str, tag: str) -> dict[str, Any]:
        body = {"image": f"{app}:{tag}", "strategy": "immediate"}
        return dict(self.api("POST", f"/apps/{app}/releases", json=body))

    def machine(self, app: str, version: int) -> dict[str, Any]:
        found = self.api("GET", f"/apps/{app}/machines")["machines"]
        [m] = [m for m in found if m["release_version"] == version]
        return dict(m)

    def events(self, app: str, version: int) -> list[str]:
        return [e["message"] for e in self.machine(app, version)["events"]]

    def wait_event(self, app: str, version: int, prefix: str, count: int = 1) -> list[str]:
        def seen() -> list[str] | None:
            events = self.events(app, version)
            if any(e.startswith("Failed") for e in events):
                raise AssertionError(f"{events}\n{self.agent.log()}")
            return events if sum(e.startswith(prefix) for e in events) >= count else None

        try:
            return wait_for(seen, f"event {prefix!r} of {app} v{version}", timeout=120)
        except AssertionError:
            raise AssertionError(f"{self.events(app, version)}\n{self.agent.log()}") from None

    def logs(self, app: str) -> list[str]:
        return [ln["line"] for ln in self.api("GET", f"/apps/{app}/logs")["lines"]]

    def in_agent(self, path: Path) -> Path:
        """`path` as the agent sees it (its mounts are private to its mount namespace)."""
        return Path(f"/proc/{self.agent.pid}/root") / path.relative_to("/")

    def lazy_mounts(self) -> list[str]:
        """The agent's FUSE lazy mounts (mountinfo lines)."""
        text = Path(f"/proc/{self.agent.pid}/mountinfo").read_text()
        return [line for line in text.splitlines() if " fuse.skyreg " in line]

    def helpers(self) -> set[int]:
        """The agent's lazy mount helper processes."""
        found = set()
        for pid in children(self.agent.pid):
            with contextlib.suppress(OSError):
                if b"skyreg.machines.lazymount" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.add(pid)
        return found


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("lazystart") / "data",
        options={"scan_worker": True, "lazy_index": True},
    )
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-lazy-agent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        for app in ("lazy", "whole", "stop"):
            t.app(app, "acme")
        admin = t.admin_secret()
        agent = RunningAgent(reg.url, admin, top / "agent", top / "agent.log")
        stack.callback(agent.stop)
        agent.start()
        yield Platform(reg, admin, agent)


def _diff_id(blob: bytes) -> str:
    """The digest of a layer's tar (gzip, zstd or plain)."""
    if blob[:2] == b"\x1f\x8b":
        return sha256(gzip.decompress(blob))
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return sha256(zstandard.ZstdDecompressor().decompressobj().decompress(blob))
    return sha256(blob)


def _app_layer(motd: bytes, page: bytes) -> bytes:
    """An uncompressed layer: /etc (passwd, group, motd) and /www/index.html."""
    return make_tar(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/passwd", "file", data=PASSWD),
            Entry("etc/group", "file", data=GROUP),
            Entry("etc/motd", "file", data=motd),
            Entry("www", "dir", mode=0o755),
            Entry("www/index.html", "file", data=page),
            Entry("data", "dir", mode=0o777),  # where the machine (nobody) writes
        ]
    )


def test_a_machine_starts_from_a_lazy_mount_and_restarts_from_the_unpacked_tree(
    platform: Platform,
) -> None:
    p = platform
    port = free_port()
    page = "<h1>served through a lazy mount ✓</h1>\n".encode()
    script = (
        'echo "motd: $(cat /etc/motd)"; echo "$SKYREG_MACHINE_ID" > /data/written; '
        f"exec /bin/busybox httpd -f -p 127.0.0.1:{port} -h /www"
    )
    layers = [(LAYER_GZIP, busybox_layer().gz), (LAYER_TAR, _app_layer(b"lazy motd\n", page))]
    digest = p.push("lazy", "v1", layers, script)
    v = p.deploy("lazy", "v1")["version"]

    events = p.wait_event("lazy", v, LAZY_STARTED)
    assert events[:4] == ["Pulling container image", events[1], "Starting machine", LAZY_STARTED]
    assert events[1].startswith("Prepared a lazy mount of the image (")
    assert "machine" in p.agent.log() and "started from a lazy mount" in p.agent.log()
    # While it runs: the FUSE mount (the overlay's lower layer) and its helper process.
    [mounted] = p.lazy_mounts()
    assert f"/lazy/{digest.removeprefix('sha256:')}-" in mounted and "/mnt " in mounted
    [helper] = p.helpers()
    # The entrypoint (as nobody) read a file of the image and serves another one.
    assert wait_for(lambda: http_get(port), "the lazily started machine serving") == page
    wait_for(lambda: "motd: lazy motd" in p.logs("lazy"), "the motd in the machine's log")
    m = p.machine("lazy", v)
    rootfs = p.in_agent(p.agent.data_dir / "machines" / m["id"] / "rootfs")
    assert (rootfs / "data" / "written").read_text() == f"{m['id']}\n"
    (rootfs / "www" / "written-by-first-run").write_text("old")  # as if the machine wrote it

    # The whole image lands in the cache meanwhile and is unpacked there.
    unpacked = p.agent.data_dir / "cache" / "rootfs" / digest.removeprefix("sha256:")
    wait_for(lambda: (unpacked / "www" / "index.html").is_file(), "the background pull")
    assert (unpacked / "www" / "index.html").read_bytes() == page

    # A restart starts from the unpacked tree; the first run's writes are gone, and with no
    # machine over it the lazy mount and its helper are gone too.
    p.api("POST", f"/machines/{m['id']}/restart")
    events = p.wait_event("lazy", v, "Successfully prepared image (")
    assert sum(e == LAZY_STARTED for e in events) == 1
    assert wait_for(lambda: http_get(port), "the restarted machine serving") == page
    assert not (rootfs / "www" / "written-by-first-run").exists()
    wait_for(lambda: not p.lazy_mounts(), "the lazy mount removed")
    assert not p.helpers() and not Path(f"/proc/{helper}").exists()
    assert "lazy mount of " + digest in p.agent.log(20000)
    assert not (p.agent.data_dir / "lazy" / digest.removeprefix("sha256:")).exists()


def test_an_image_with_a_layer_without_index_is_pulled_whole_and_the_agent_logs_why(
    platform: Platform,
) -> None:
    p = platform
    # One zstd frame: no random access, so the registry indexes the other layer only.
    one_frame = zstandard.ZstdCompressor().compress(_app_layer(b"whole motd\n", b"x\n"))
    layers = [(LAYER_GZIP, busybox_layer().gz), (LAYER_ZSTD, one_frame)]
    p.push("whole", "v1", layers, 'echo "motd: $(cat /etc/motd)"; exec /bin/busybox sleep 600')
    v = p.deploy("whole", "v1")["version"]

    events = p.wait_event("whole", v, "Starting machine")
    # For the machine's owner, today's start; the agent's log says why it was not lazy.
    assert events[:3] == ["Pulling container image", events[1], "Starting machine"]
    assert events[1].startswith("Successfully prepared image (")
    reason = f"no lazy index for layer {sha256(one_frame)}"
    assert f"no lazy start ({reason}): pulling the whole image" in p.agent.log(20000)
    wait_for(lambda: "motd: whole motd" in p.logs("whole"), "the motd in the machine's log")
    assert LAZY_STARTED not in p.events("whole", v)
    p.api("POST", f"/machines/{p.machine('whole', v)['id']}/stop")


def _ready_line(proc: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    """The helper's first line on stdout (`ready` or `error: …`), read with a bound."""
    stdout = proc.stdout
    assert stdout is not None
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert got, "the mount helper said nothing in time"
    return got[0]


def _helper(spec: dict[str, Any], stderr: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyreg.machines.lazymount"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr.open("wb"),
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec).encode() + b"\n")
    proc.stdin.flush()
    return proc


def _mounted_here(path: Path) -> bool:
    return f" {path} " in Path("/proc/self/mountinfo").read_text()


def test_the_mount_helper_reads_by_range_before_the_layer_is_cached_and_refuses_a_bad_index(
    platform: Platform, tmp_path: Path
) -> None:
    p = platform
    filler = os.urandom(12 << 20)
    big = gzip.compress(
        make_tar([Entry("filler", "file", data=filler), Entry("hello", "file", data=b"hi\n")]),
        6,
        mtime=0,
    )
    plain = _app_layer(b"helper motd\n", b"p\n")
    digest = p.push("lazy", "helper", [(LAYER_GZIP, big), (LAYER_TAR, plain)], "true")
    session = authed(p.admin)
    listed = session.get(
        f"{p.reg.url}/v2/lazy/referrers/{digest}", params={"artifactType": ARTIFACT_TYPE}
    ).json()["manifests"]
    referrer = session.get(
        f"{p.reg.url}/v2/lazy/manifests/{listed[0]['digest']}", headers={"Accept": OCI_MANIFEST}
    ).json()
    files: dict[tuple[str, str], str] = {}
    for d in referrer["layers"]:
        path = tmp_path / d["digest"].replace(":", "-")
        path.write_bytes(session.get(f"{p.reg.url}/v2/lazy/blobs/{d['digest']}").content)
        files[(d["annotations"]["dev.skyreg.lazy.layer"], d["mediaType"])] = str(path)

    def layer(blob: bytes, index_of: bytes | None = None) -> dict[str, Any]:
        described = sha256(index_of if index_of is not None else blob)
        points = files.get((described, "application/vnd.skyreg.gzip-seek-points.v1"))
        return {
            "digest": sha256(blob),
            "size": len(blob),
            "index": files[(described, "application/vnd.skyreg.layer-index.v1+json")],
            "points": points,
            "blob": str(tmp_path / "not-cached-yet"),  # every byte by Range
        }

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    spec = {
        "mountpoint": str(mnt),
        "registry": p.reg.url,
        "repository": "lazy",
        "password": p.admin,
        "layers": [layer(big), layer(plain)],
    }
    proc = _helper(spec, tmp_path / "helper.log")
    try:
        assert _ready_line(proc) == b"ready\n", (tmp_path / "helper.log").read_text()
        assert (mnt / "hello").read_bytes() == b"hi\n"
        assert (mnt / "etc" / "motd").read_bytes() == b"helper motd\n"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the end of stdin unmounts
        assert proc.wait(timeout=30) == 0
    assert not _mounted_here(mnt)
    [ranged] = re.findall(r"\((\d+) bytes by Range\)", (tmp_path / "helper.log").read_text())
    assert 0 < int(ranged) < len(big) / 2  # one seek span of the 12 MiB layer, not all of it

    # An index that describes another blob: no mount, and the reason on the first line.
    spec["layers"] = [layer(big, index_of=plain), layer(plain)]
    proc = _helper(spec, tmp_path / "bad.log")
    line = _ready_line(proc)
    assert proc.wait(timeout=30) == 2
    assert line.startswith(b"error: the index of layer " + sha256(big).encode())
    assert not _mounted_here(mnt)


def test_no_lazy_mount_is_left_once_the_agent_stopped(platform: Platform) -> None:
    p = platform
    layers = [(LAYER_GZIP, busybox_layer().gz), (LAYER_TAR, _app_layer(b"stop motd\n", b"s\n"))]
    p.push("stop", "v1", layers, 'echo "motd: $(cat /etc/motd)"; exec /bin/busybox sleep 600')
    v = p.deploy("stop", "v1")["version"]
    p.wait_event("stop", v, LAZY_STARTED)
    wait_for(lambda: "motd: stop motd" in p.logs("stop"), "the motd in the machine's log")
    assert p.lazy_mounts()
    helpers = p.helpers()
    assert helpers

    p.agent.stop()
    assert not any(Path(f"/proc/{pid}").exists() for pid in helpers)
    found = subprocess.run(
        ["findmnt", "-rn", "-t", "fuse.skyreg,overlay", "-o", "TARGET"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert str(p.agent.data_dir) not in found.stdout
    assert list((p.agent.data_dir / "lazy").iterdir()) == []
    assert "lazy mount of " in p.agent.log(20000)
