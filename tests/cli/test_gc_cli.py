"""`skyreg gc status`, `skyreg gc run [--dry-run]` and `skyreg images delete`, run as subprocesses
against a registry served in-process (no gc worker, review delay 0: only the passes the test
asks for collect), and `skyreg serve`'s refusal of bad --gc-* values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import fails, ok, skyreg_as
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import image_manifest, push_blob, push_image, put_manifest, sha256
from tests.support.platform import Tenancy, authed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("gccli") / "data") as reg:
        yield reg


def skyreg(
    tmp_path: Path, server: InProcessRegistry, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return skyreg_as(tmp_path, server.url, token, *args)


def test_gc_status_and_runs(tmp_path: Path, server: InProcessRegistry) -> None:
    t = Tenancy(server.data_dir)
    org, app = f"o{uuid.uuid4().hex[:8]}", f"a{uuid.uuid4().hex[:8]}"
    t.org(org)
    t.app(app, org)
    admin = t.admin_secret()
    session = authed(admin)
    kept = push_image(server.url, app, "v1", session=session)
    config = json.dumps({"os": "linux", "n": uuid.uuid4().hex}).encode()
    push_blob(server.url, app, config, session)
    manifest = image_manifest(config, kept.layers)
    untagged = sha256(manifest)
    assert put_manifest(server.url, app, untagged, manifest, session=session).status_code == 201

    human = ok(skyreg(tmp_path, server, admin, "gc", "status"))
    assert "manifest reviews" in human and "blob reviews" in human
    assert "the gc worker off here (--no-gc)" in human
    status = json.loads(ok(skyreg(tmp_path, server, admin, "gc", "status", "--json")))
    assert status["manifest_reviews"]["due"] >= 1

    dry = ok(skyreg(tmp_path, server, admin, "gc", "run", "--dry-run"))
    assert dry.startswith("Would delete ")
    assert f"manifest {app}@{untagged}" in dry
    assert session.get(f"{server.url}/v2/{app}/manifests/{untagged}", timeout=30).status_code == 200

    run = json.loads(ok(skyreg(tmp_path, server, admin, "gc", "run", "--json")))
    assert f"{app}@{untagged}" in run["deleted_manifests"]
    assert sha256(config) in run["deleted_blobs"]
    assert session.get(f"{server.url}/v2/{app}/manifests/{untagged}", timeout=30).status_code == 404
    assert "manual" in ok(skyreg(tmp_path, server, admin, "gc", "status"))

    readonly = t.token("readonly", org=org)[0]
    assert "(HTTP 403)" in fails(skyreg(tmp_path, server, readonly, "gc", "status"))
    assert "(HTTP 403)" in fails(skyreg(tmp_path, server, readonly, "gc", "run"))


def test_images_delete(tmp_path: Path, server: InProcessRegistry) -> None:
    t = Tenancy(server.data_dir)
    org, app = f"o{uuid.uuid4().hex[:8]}", f"a{uuid.uuid4().hex[:8]}"
    t.org(org)
    t.app(app, org)
    deploy = t.token("deploy", org=org, app=app)[0]
    readonly = t.token("readonly", org=org)[0]
    session = authed(deploy)
    image = push_image(server.url, app, "v1", session=session)
    assert put_manifest(server.url, app, "v2", image.manifest, session=session).status_code == 201

    refused = fails(skyreg(tmp_path, server, readonly, "images", "delete", f"{app}:v1"))
    assert "(HTTP 403)" in refused
    out = ok(skyreg(tmp_path, server, deploy, "images", "delete", f"{app}:v1"))
    assert out.startswith(f"Deleted tag {app}:v1;")
    assert session.get(f"{server.url}/v2/{app}/manifests/v1", timeout=30).status_code == 404
    assert session.get(f"{server.url}/v2/{app}/manifests/v2", timeout=30).status_code == 200
    assert "(HTTP 404)" in fails(skyreg(tmp_path, server, deploy, "images", "delete", f"{app}:v1"))

    deleted = json.loads(
        ok(skyreg(tmp_path, server, deploy, "images", "delete", f"{app}@{image.digest}", "--json"))
    )
    assert deleted == {"repository": app, "digest": image.digest}
    assert session.get(f"{server.url}/v2/{app}/manifests/v2", timeout=30).status_code == 404

    message = fails(skyreg(tmp_path, server, deploy, "images", "delete", app))
    assert "APP:TAG or APP@DIGEST" in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--gc-review-delay", "-1"),
        ("--gc-interval", "0"),
        ("--gc-keep-releases", "-1"),
    ],
)
def test_serve_refuses_bad_gc_settings(tmp_path: Path, flag: str, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "skyreg", "serve", "--data-dir", str(tmp_path / "d"), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"},
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert flag in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made
