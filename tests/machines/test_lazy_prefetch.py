"""Learned prefetch (issue 18): a real agent records what a lazily started machine read in its
first seconds and reports it to the server for the image; the next lazy start of the image, by
another agent with nothing cached, reads those chunks into its helper's spool before `ready`,
so the entrypoint finds them there."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from skyreg.lazy.index import ARTIFACT_TYPE, CHUNK_SIZE
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import Entry, busybox_layer, canonical_json, host_architecture, make_tar
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, OCI_MANIFEST, descriptor, push_blob, put_manifest, sha256
from tests.support.platform import Tenancy, authed
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing"),
    pytest.mark.skipif(importlib.util.find_spec("pyfuse3") is None, reason="no pyfuse3"),
    pytest.mark.skipif(os.geteuid() != 0, reason="lazy mounts need a root agent"),
]

LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAZY_STARTED = "Started from a lazy mount"
CHUNK = CHUNK_SIZE  # the index's chunk size
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass
class Site:
    reg: InProcessRegistry
    admin: str
    top: Path
    stack: contextlib.ExitStack

    def api(self, method: str, path: str, **kw: Any) -> Any:
        r = requests.request(method, f"{self.reg.url}/api/v1{path}", auth=("x", self.admin), **kw)
        assert r.status_code < 400, (method, path, r.status_code, r.text)
        return r.json()

    def agent(self, name: str) -> RunningAgent:
        agent = RunningAgent(self.reg.url, self.admin, self.top / name, self.top / f"{name}.log")
        self.stack.callback(agent.stop)
        agent.start()
        return agent

    def events(self, app: str) -> list[str]:
        [m] = self.api("GET", f"/apps/{app}/machines")["machines"]
        return [e["message"] for e in m["events"]]

    def logs(self, app: str) -> list[str]:
        return [ln["line"] for ln in self.api("GET", f"/apps/{app}/logs")["lines"]]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    reg = InProcessRegistry(
        data_dir=tmp_path_factory.mktemp("lazyprefetch") / "data",
        options={"scan_worker": True, "lazy_index": True},
    )
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-prefetch-agent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("acme")
        t.app("learn", "acme")
        yield Site(reg, t.admin_secret(), top, stack)


def _push(site: Site, app: str, tag: str, layers: list[bytes], script: str) -> str:
    """Push gzip `layers` running `script` as nobody; wait for the layer-index referrer."""
    session = authed(site.admin)
    config = canonical_json(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh", "-c", script], "User": "nobody"},
            "rootfs": {"type": "layers", "diff_ids": [sha256(gzip.decompress(d)) for d in layers]},
        }
    )
    for blob in [config, *layers]:
        push_blob(site.reg.url, app, blob, session)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(LAYER_GZIP, data) for data in layers],
        }
    ).encode()
    assert put_manifest(site.reg.url, app, tag, manifest, session=session).status_code == 201
    digest = sha256(manifest)

    def indexed() -> bool:
        listed = session.get(
            f"{site.reg.url}/v2/{app}/referrers/{digest}",
            params={"artifactType": ARTIFACT_TYPE},
            timeout=30,
        )
        return listed.status_code == 200 and bool(listed.json()["manifests"])

    wait_for(indexed, f"the layer-index referrer of {app}:{tag}", timeout=120)
    return digest


def _wait_started(site: Site, app: str, agent: RunningAgent, count: int) -> None:
    def started() -> bool:
        events = site.events(app)
        if any(e.startswith("Failed") for e in events):
            raise AssertionError(f"{events}\n{agent.log()}")
        return sum(e == LAZY_STARTED for e in events) >= count

    try:
        wait_for(started, f"lazy start {count} of {app}", timeout=120)
    except AssertionError:
        raise AssertionError(f"{site.events(app)}\n{agent.log()}") from None


def test_a_second_lazy_start_reads_what_the_first_one_read_before_its_entrypoint_runs(
    site: Site,
) -> None:
    needed = os.urandom(200 << 10)
    tar = make_tar(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/passwd", "file", data=PASSWD),
            Entry("etc/group", "file", data=GROUP),
            Entry("filler", "file", data=os.urandom(6 << 20)),  # never read
            Entry("app", "dir", mode=0o755),
            Entry("app/needed", "file", data=needed),
        ]
    )
    data = gzip.compress(tar, 6, mtime=0)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        offset = archive.getmember("app/needed").offset_data
    script = 'echo "read $(/bin/busybox md5sum < /app/needed)"; exec /bin/busybox sleep 600'
    digest = _push(site, "learn", "v1", [busybox_layer().gz, data], script)
    prefetch = f"/agent/apps/learn/images/{digest}/prefetch"
    assert site.api("GET", prefetch)["ranges"] == []

    # First start: nothing learned yet; the agent reports what the machine read.
    first = site.agent("a")
    site.api("POST", "/apps/learn/releases", json={"image": "learn:v1", "strategy": "immediate"})
    _wait_started(site, "learn", first, 1)
    wait_for(lambda: any(ln.startswith("read ") for ln in site.logs("learn")), "the read")
    learned = wait_for(
        lambda: site.api("GET", prefetch)["ranges"] or None, "the reported list", timeout=90
    )
    assert {r["layer"] for r in learned} <= {sha256(busybox_layer().gz), sha256(data)}
    # It holds the chunks of /app/needed (the filler, never read, is not in it).
    needed_chunks = set(range(offset // CHUNK, (offset + len(needed) - 1) // CHUNK + 1))
    covered = {
        n
        for r in learned
        if r["layer"] == sha256(data)
        for n in range(r["offset"] // CHUNK, (r["offset"] + r["length"] - 1) // CHUNK + 1)
    }
    assert needed_chunks <= covered
    # Of the 6 MiB layer: the chunks read (chunk 0: /etc/passwd and /etc/group, which a start
    # reads), none of the filler's.
    assert covered <= needed_chunks | {0}
    assert f"reported the prefetch list of {digest}: {len(learned)} ranges" in first.log(50000)
    first.stop()

    # Second start, by another agent with nothing cached: the list is read before `ready`.
    second = site.agent("b")
    _wait_started(site, "learn", second, 2)
    text = second.log(50000)
    [(kept, wanted, listed)] = re.findall(
        r"prefetched (\d+) of (\d+) chunks \((\d+) ranges listed", text
    )
    assert int(kept) == int(wanted) >= len(needed_chunks) and int(listed) == len(learned)
    mounted = text.index(f"lazy mount of {digest} at")
    assert text.index("prefetched ") < mounted  # before the helper said `ready`
    assert f", {len(learned)} prefetch ranges given)" in text
    # The spool holds the chunks of /app/needed, verified bytes of the layer's stream.
    lazy = Path(f"/proc/{second.pid}/root") / (second.data_dir / "lazy").relative_to("/")
    [mount] = lazy.glob(digest.removeprefix("sha256:") + "-*")  # the image's, through its repo
    spool = mount / "spool"
    for n in needed_chunks:
        assert (spool / f"1-{n}").read_bytes() == tar[n * CHUNK : (n + 1) * CHUNK]
    want = f"read {hashlib.md5(needed).hexdigest()}"
    wait_for(
        lambda: sum(ln.startswith(want) for ln in site.logs("learn")) >= 2,
        "the second machine read /app/needed",
    )
    second.stop()
