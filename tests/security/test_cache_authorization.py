"""The agent's layer cache is a speed-up, never an authorization.

Org B pushes a manifest naming one of org A's layer digests with `urls` (the registry accepts a
missing blob then) and deploys it. The agent has A's layer in its host cache, but it must first
prove through the registry that B's repository may read every blob of the image (a HEAD per
blob), also when the unpacked tree is already there; otherwise the machine fails with an event
naming the blob and A's bytes never reach B's machine.

Also here (same serve + agent): a layer that breaks the agent's unpack limits fails the release
with a clear machine event and leaves no partial tree in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from skyreg.client.push import push_image as push_layout
from skyreg.machines.layercache import LayerCache
from skyreg.machines.prepare import PreparedImage, PrepareError, RegistrySource, prepare_image
from tests.support.agents import RunningAgent, machine_top
from tests.support.images import Entry, TestImage, build_app_image, busybox_layer, canonical_json
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, push_blob, put_manifest, sha256
from tests.support.platform import Tenancy
from tests.support.servers import ServedRegistry
from tests.support.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap is not installed"),
]

SECRET = b"org A's secret: 7c1f0e2d-only-for-alpha\n"
AGENT_MAX_LAYER_BYTES = 8 << 20
WAIT = 120.0  # seconds for the agent to prepare (and fail) a machine


@dataclass
class Site:
    reg: ServedRegistry
    admin: str
    token_a: str  # org token of org A (apps `alpha`, `charlie`)
    token_b: str  # org token of org B (app `bravo`)
    agent: RunningAgent
    work: Path

    @property
    def agent_dir(self) -> Path:
        return self.agent.data_dir

    def api(self, method: str, path: str, token: str, **kw: Any) -> requests.Response:
        return requests.request(method, f"{self.reg.url}/api/v1{path}", auth=("x", token), **kw)

    def deploy(self, app: str, image: str, token: str) -> requests.Response:
        return self.api("POST", f"/apps/{app}/releases", token, json={"image": image})

    def machines(self, app: str, version: int) -> list[dict[str, Any]]:
        r = self.api("GET", f"/apps/{app}/machines", self.admin)
        assert r.status_code == 200, r.text
        return [m for m in r.json()["machines"] if m["release_version"] == version]

    def release(self, app: str, version: int) -> dict[str, Any]:
        r = self.api("GET", f"/apps/{app}/releases", self.admin, params={"limit": 100})
        assert r.status_code == 200, r.text
        return dict(next(x for x in r.json()["releases"] if x["version"] == version))

    def wait_until_release_failed(self, app: str, version: int) -> None:
        def failed() -> bool:
            return bool(self.release(app, version)["status"] == "failed")

        wait_for(failed, f"{app} v{version} to fail", WAIT)

    def app_logs(self, app: str) -> str:
        r = self.api("GET", f"/apps/{app}/logs", self.admin, params={"after": 0})
        assert r.status_code == 200, r.text
        return "\n".join(line["line"] for line in r.json()["lines"])

    def settled_machine(self, app: str, version: int) -> dict[str, Any]:
        """The release's one machine once the agent is done preparing it."""

        def settled() -> dict[str, Any] | None:
            found = self.machines(app, version)
            done = [m for m in found if m["state"] not in ("created", "starting")]
            return done[0] if done else None

        try:
            return wait_for(settled, f"{app} v{version}'s machine to start or fail", WAIT)
        except AssertionError:
            raise AssertionError(self.agent.log()) from None

    def push_app_image(self, image: TestImage, ref: str, token: str) -> str:
        layout = image.write_oci_layout(self.work / image.marker)
        return push_layout(layout, f"{self.reg.host}/{ref}", token).digest

    def push_and_deploy(self, image: TestImage, app: str, tag: str, token: str) -> tuple[str, int]:
        """Push `image` as `app:tag` and deploy it; returns its digest and the release version."""
        digest = self.push_app_image(image, f"{app}:{tag}", token)
        r = self.deploy(app, f"{app}:{tag}", token)
        assert r.status_code == 201, r.text
        return digest, int(r.json()["version"])


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("cacheauth") / "data")
    with contextlib.ExitStack() as stack:
        top = machine_top(stack, "skyreg-agent-")
        stack.callback(reg.stop)
        reg.start()
        t = Tenancy(reg.data_dir)
        t.org("orga")
        t.org("orgb")
        t.app("alpha", "orga")
        t.app("charlie", "orga")
        t.app("delta", "orga")
        t.app("bravo", "orgb")
        token_a, _ = t.token("org", org="orga")
        token_b, _ = t.token("org", org="orgb")
        agent = RunningAgent(
            reg.url,
            t.admin_secret(),
            top / "agent",
            top / "agent.log",
            extra_args=["--max-layer-bytes", str(AGENT_MAX_LAYER_BYTES)],
        )
        stack.callback(agent.stop)
        agent.start()
        yield Site(
            reg, t.admin_secret(), token_a, token_b, agent, tmp_path_factory.mktemp("images")
        )


def _secret_image(marker: str) -> TestImage:
    return build_app_image(
        marker,
        [Entry("secret.txt", "file", data=SECRET + marker.encode())],
        cmd=["/bin/sh", "-c", "cat /secret.txt; exec sleep 3600"],
    )


def _push_borrowing_manifest(site: Site, repo: str, foreign_layer: str, size: int) -> str:
    """As org B: push busybox (its own bytes), a config, and a manifest whose second layer is
    `foreign_layer` (bytes B does not have) with `urls`; returns the manifest digest."""
    s = requests.Session()
    s.auth = ("x", site.token_b)
    busybox = busybox_layer()
    push_blob(site.reg.url, repo, busybox.gz, s)
    config = canonical_json(
        {
            "architecture": _secret_image("probe").architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh", "-c", "cat /secret.txt; exec sleep 3600"]},
            "rootfs": {"type": "layers", "diff_ids": [busybox.diff_id, sha256(b"unknown")]},
        }
    )
    push_blob(site.reg.url, repo, config, s)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                busybox.descriptor(OCI_LAYER),
                {
                    "mediaType": OCI_LAYER,
                    "digest": foreign_layer,
                    "size": size,
                    "urls": ["http://127.0.0.1:1/x"],
                },
            ],
        }
    ).encode()
    r = put_manifest(site.reg.url, repo, "borrowed", manifest, session=s)
    assert r.status_code == 201, r.text  # a foreign layer is accepted at push
    return sha256(manifest)


def _prepare(site: Site, cache: LayerCache, repo: str, digest: str) -> PreparedImage:
    async def go() -> PreparedImage:
        async with aiohttp.ClientSession() as session:
            source = RegistrySource(site.reg.url, site.admin, session)
            return await prepare_image(source, cache, repo, digest)

    return asyncio.run(go())


def test_prepare_refuses_a_cached_blob_the_repository_may_not_read(
    site: Site, tmp_path: Path
) -> None:
    a_image = _secret_image("prepare-a")
    a_digest = site.push_app_image(a_image, "alpha:prepare", site.token_a)
    cache = LayerCache(tmp_path / "cache")
    a_prepared = _prepare(site, cache, "alpha", a_digest)  # A's blobs and tree are cached
    secret_layer = a_image.layers[-1]
    assert cache.has(secret_layer.digest)

    b_digest = _push_borrowing_manifest(site, "bravo", secret_layer.digest, secret_layer.size)
    with pytest.raises(PrepareError) as caught:
        _prepare(site, cache, "bravo", b_digest)
    message = str(caught.value)
    assert secret_layer.digest in message and "bravo" in message
    assert not cache.rootfs_path(b_digest).exists()
    assert (a_prepared.rootfs / "secret.txt").read_bytes().startswith(SECRET)  # A unaffected


def test_prepare_checks_access_even_when_the_tree_is_cached(site: Site, tmp_path: Path) -> None:
    image = _secret_image("prepare-warm")
    digest = site.push_app_image(image, "alpha:warm", site.token_a)
    cache = LayerCache(tmp_path / "cache")
    _prepare(site, cache, "alpha", digest)
    assert cache.rootfs_path(digest).is_dir()
    # The repository loses the right to the layer: the cached tree must not be used any more.
    marker = image.layers[-1].digest
    r = requests.delete(f"{site.reg.url}/v2/alpha/blobs/{marker}", auth=("x", site.token_a))
    assert r.status_code == 202, r.text
    with pytest.raises(PrepareError, match=marker):
        _prepare(site, cache, "alpha", digest)


def test_another_orgs_cached_layer_never_reaches_a_machine(site: Site) -> None:
    a_image = _secret_image("deploy-a")
    _, version = site.push_and_deploy(a_image, "alpha", "v1", site.token_a)
    a_machine = site.settled_machine("alpha", version)
    assert a_machine["state"] == "started", a_machine  # A's layers are in the agent's cache
    wait_for(lambda: SECRET.decode().strip() in site.app_logs("alpha"), "A's log line", WAIT)

    secret_layer = a_image.layers[-1]
    b_digest = _push_borrowing_manifest(site, "bravo", secret_layer.digest, secret_layer.size)
    r = site.deploy("bravo", "bravo:borrowed", site.token_b)
    if r.status_code < 400:
        version = r.json()["version"]
        machine = site.settled_machine("bravo", version)
        assert machine["state"] == "failed", machine
        events = [e["message"] for e in machine["events"]]
        assert any(
            e.startswith("Failed to prepare image:") and secret_layer.digest in e for e in events
        ), events
        site.wait_until_release_failed("bravo", version)
        rootfs = site.agent_dir / "machines" / machine["id"] / "rootfs"
        assert not (rootfs / "secret.txt").exists()
        assert not (site.agent_dir / "cache" / "rootfs" / b_digest.split(":")[1]).exists()
    else:  # the server's deploy check refused it first: fine, as long as it is a clear 4xx
        assert 400 <= r.status_code < 500, r.text
    assert SECRET.decode().strip() not in site.app_logs("bravo")


def test_a_restart_rechecks_access_although_the_tree_is_cached(site: Site) -> None:
    # Independent of any deploy-time check on the server: the release was fine when deployed.
    image = _secret_image("restart")
    _, version = site.push_and_deploy(image, "delta", "v1", site.token_a)
    machine = site.settled_machine("delta", version)
    assert machine["state"] == "started", machine
    marker = image.layers[-1].digest
    r = requests.delete(f"{site.reg.url}/v2/delta/blobs/{marker}", auth=("x", site.token_a))
    assert r.status_code == 202, r.text
    r = site.api("POST", f"/machines/{machine['id']}/restart", site.token_a)
    assert r.status_code < 300, r.text

    def failed_with_event() -> list[str] | None:
        m = next(x for x in site.machines("delta", machine["release_version"]))
        events = [e["message"] for e in m["events"]]
        named = [e for e in events if e.startswith("Failed to prepare image:") and marker in e]
        return named if m["state"] == "failed" and named else None

    named = wait_for(failed_with_event, "the restarted machine to fail, naming the blob", WAIT)
    assert "delta" in named[0]


def test_a_layer_past_the_agent_limit_fails_the_release_with_a_clear_event(site: Site) -> None:
    big = AGENT_MAX_LAYER_BYTES * 2
    image = build_app_image(
        "too-big",
        [Entry("zeros.bin", "file", data=bytes(big))],
        cmd=["/bin/sh", "-c", "exec sleep 3600"],
    )
    assert image.layers[-1].size < AGENT_MAX_LAYER_BYTES // 8  # small compressed, big inflated
    digest, version = site.push_and_deploy(image, "charlie", "big", site.token_a)
    machine = site.settled_machine("charlie", version)
    assert machine["state"] == "failed", machine
    events = [e["message"] for e in machine["events"]]
    expected = f"more than {AGENT_MAX_LAYER_BYTES} bytes once decompressed"
    assert any(e.startswith("Failed to prepare image:") and expected in e for e in events), events
    site.wait_until_release_failed("charlie", version)
    rootfs_dir = site.agent_dir / "cache" / "rootfs"
    hexdigest = digest.split(":")[1]
    assert not [p.name for p in rootfs_dir.iterdir() if hexdigest in p.name]
