"""The `gc` worker of a served registry: with `--gc-review-delay 0` an image pushed and then
untagged disappears (manifest, blobs, links: from the database; bytes: from the store), while a
tagged image sharing a layer with it keeps everything and still pulls byte for byte. On both
backings (SQLite + filesystem; PostgreSQL + S3, whose bytes are deleted from a database thread
through the event loop's S3 client)."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.backings import create_org_and_app
from tests.support.inprocess import (
    InProcessRegistry,
    environment,
    in_store,
    rows,
    serve_options,
)
from tests.support.oci import OCI_MANIFEST, image_manifest, push_blob, push_image, put_manifest
from tests.support.oci import sha256 as digest_of
from tests.support.platform import authed
from tests.support.servers import BACKINGS, scaleout_backing
from tests.support.waiting import wait_for

LAYER = 256 * 1024


def gc_status(reg: InProcessRegistry, admin: str) -> dict[str, Any]:
    r = requests.get(
        f"{reg.url}/api/v1/gc", headers={"Authorization": f"Bearer {admin}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.parametrize("backing", BACKINGS)
def test_the_worker_deletes_an_untagged_image_and_keeps_what_a_tagged_one_shares(
    request: pytest.FixtureRequest, tmp_path: Path, backing: str
) -> None:
    # First no worker, so nothing is reviewed while the images are half pushed (a delay of 0
    # makes an uploaded layer due at once: only a real delay covers pushes in flight).
    options: dict[str, object] = {"gc_worker": False, "gc_review_delay": 0.0, "gc_interval": 0.2}
    with contextlib.ExitStack() as stack:
        if backing == "s3+postgresql":
            args, env = stack.enter_context(scaleout_backing(request))
            options.update(serve_options(args))
            stack.enter_context(environment(env))
        reg = InProcessRegistry(data_dir=tmp_path / "data", options=options)
        stack.callback(reg.stop)
        reg.start()
        collects(reg)


def collects(reg: InProcessRegistry) -> None:
    """Push, untag, let the worker run; check what went and what stayed."""
    admin = (reg.data_dir / "admin-token").read_text().strip()
    session = authed(admin)
    create_org_and_app(session, reg.url, "acme", "web")
    kept = push_image(reg.url, "web", "stable", layers=2, layer_size=LAYER, session=session)
    config = json.dumps({"os": "linux", "nonce": uuid.uuid4().hex}).encode()
    own_layer = uuid.uuid4().bytes * (LAYER // 16)
    for blob in (config, own_layer):
        push_blob(reg.url, "web", blob, session)
    manifest = image_manifest(config, [kept.layers[0], own_layer])
    untagged = digest_of(manifest)
    r = put_manifest(reg.url, "web", "old", manifest, session=session)
    assert r.status_code == 201, r.text
    r = session.delete(f"{reg.url}/v2/web/manifests/old", timeout=30)
    assert r.status_code == 202, r.text
    dead = [digest_of(config), digest_of(own_layer)]
    alive = [digest_of(b) for b in (kept.config, *kept.layers)]
    for digest in dead + alive:
        assert in_store(reg, digest)

    reg.options["gc_worker"] = True
    reg.restart()

    def settled() -> bool:
        status = gc_status(reg, admin)
        queues = [status["manifest_reviews"], status["blob_reviews"], *status["deletions"]]
        return all(q["queued"] == 0 for q in queues)

    wait_for(settled, "the gc worker to empty its queues", timeout=60)

    assert rows(reg, "SELECT digest FROM manifests WHERE digest = :digest", untagged) == []
    for digest in dead:
        assert rows(reg, "SELECT digest FROM blobs WHERE digest = :digest", digest) == []
        links = "SELECT digest FROM repository_blobs WHERE digest = :digest"
        assert rows(reg, links, digest) == []
        assert not in_store(reg, digest), digest
    for digest in alive:
        assert rows(reg, "SELECT digest FROM blobs WHERE digest = :digest", digest) == [(digest,)]
        assert in_store(reg, digest), digest

    got = session.get(
        f"{reg.url}/v2/web/manifests/stable", headers={"Accept": OCI_MANIFEST}, timeout=30
    )
    assert got.status_code == 200 and got.content == kept.manifest
    for blob in (kept.config, *kept.layers):
        got = session.get(f"{reg.url}/v2/web/blobs/{digest_of(blob)}", timeout=30)
        assert got.status_code == 200 and got.content == blob
    gone = session.get(f"{reg.url}/v2/web/manifests/{untagged}", timeout=30)
    assert gone.status_code == 404

    status = gc_status(reg, admin)
    assert status["worker"] is True
    assert status["totals"]["manifests_deleted"] == 1
    assert status["totals"]["blobs_deleted"] == 2
    assert status["totals"]["bytes_deleted"] == len(config) + len(own_layer)
    assert any(run["kind"] == "worker" for run in status["runs"])
    metrics = session.get(f"{reg.url}/metrics", timeout=30).text
    assert 'skyreg_worker_up{worker="gc"} 1' in metrics
    assert 'skyreg_gc_reviews_total{kind="manifest",outcome="deleted"} 1' in metrics
    assert 'skyreg_gc_reviews_total{kind="blob",outcome="deleted"} 2' in metrics
    assert f"skyreg_gc_bytes_deleted_total {len(config) + len(own_layer)}" in metrics
