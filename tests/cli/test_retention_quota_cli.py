"""`skyreg apps retention set|show|unset`, `skyreg orgs quota set|unset` and `skyreg orgs
usage`, run as subprocesses against a registry served in-process (no gc worker)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyreg.cli.retention import size
from tests.support.cli import fails, ok, skyreg_as
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import push_image, put_manifest
from tests.support.platform import Tenancy, authed


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessRegistry]:
    with gc_on_request(tmp_path_factory.mktemp("retcli") / "data") as reg:
        yield reg


def skyreg(
    tmp_path: Path, server: InProcessRegistry, token: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return skyreg_as(tmp_path, server.url, token, *args)


def tenancy(server: InProcessRegistry) -> tuple[Tenancy, str, str]:
    t = Tenancy(server.data_dir)
    org, app = f"o{uuid.uuid4().hex[:8]}", f"a{uuid.uuid4().hex[:8]}"
    t.org(org)
    t.app(app, org)
    return t, org, app


def test_retention_set_show_unset(tmp_path: Path, server: InProcessRegistry) -> None:
    t, org, app = tenancy(server)
    org_token = t.token("org", org=org)[0]
    readonly = t.token("readonly", org=org)[0]
    session = authed(org_token)
    image = push_image(server.url, app, "v1", session=session)
    assert (
        put_manifest(server.url, app, "build-7", image.manifest, session=session).status_code == 201
    )

    def run(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        return skyreg(tmp_path, server, token, "apps", "retention", *args)

    assert f"{app} has no retention policy" in ok(run(readonly, "show", app))
    policy = ("--keep-tag", "v*", "--keep-tag", "release-?", "--keep-recent", "0")
    dry = ok(run(org_token, "set", app, *policy, "--keep-within", "0", "--dry-run"))
    lines = dry.splitlines()
    assert "nothing was saved" in lines[0] and "1 tag(s)" in lines[0]
    assert lines[1].startswith(f"{app}:build-7  {image.digest}  pushed 20")
    assert lines[1].endswith("  pulled never")
    assert len(lines) == 2
    assert "no retention policy" in ok(run(org_token, "show", app))

    refused = fails(run(readonly, "set", app, "--keep-recent", "3"))
    assert "(HTTP 403)" in refused
    bad = fails(run(org_token, "set", app, "--keep-within", "12 parsecs"))
    assert "invalid keep_within '12 parsecs'" in bad and "(HTTP 400)" in bad

    saved = ok(run(org_token, "set", app, *policy, "--untagged-after", "12h"))
    assert saved.startswith(f"Retention of {app} set: keep tags v*, release-?; keep recent 0;")
    assert "untagged after 12h" in saved
    assert "1 tag(s) go on its next run." in saved and f"{app}:build-7  " in saved
    shown = ok(run(readonly, "show", app))
    assert "v*, release-?" in shown and "12h" in shown
    assert "0 tag(s) deleted so far; 1 would be deleted now:" in shown
    assert f"{app}:build-7  {image.digest}" in shown
    as_json = json.loads(ok(run(readonly, "show", app, "--json")))
    assert as_json["policy"]["untagged_after"] == 43200
    assert [t["tag"] for t in as_json["would_delete"]] == ["build-7"]

    assert "(HTTP 403)" in fails(run(readonly, "unset", app))
    assert ok(run(org_token, "unset", app)) == f"Removed the retention policy of {app}.\n"
    assert "no retention policy" in ok(run(readonly, "show", app))
    # Nothing was deleted along the way.
    r = session.get(f"{server.url}/v2/{app}/manifests/build-7", timeout=30)
    assert r.status_code == 200


def test_quota_and_usage(tmp_path: Path, server: InProcessRegistry) -> None:
    t, org, app = tenancy(server)
    admin = t.admin_secret()
    org_token = t.token("org", org=org)[0]
    image = push_image(server.url, app, "v1", layers=1, layer_size=600, session=authed(admin))
    used = len(image.config) + 600 + len(image.manifest)  # manifests count too

    assert ok(skyreg(tmp_path, server, org_token, "orgs", "usage", org)) == (
        f"{org}: {size(used)} in 2 blob(s) and manifests; no quota\n"
    )
    refused = fails(skyreg(tmp_path, server, org_token, "orgs", "quota", "set", org, "5GiB"))
    assert "admin" in refused and "(HTTP 403)" in refused
    bad = fails(skyreg(tmp_path, server, admin, "orgs", "quota", "set", org, "12 parsecs"))
    assert "invalid hard '12 parsecs'" in bad and "(HTTP 400)" in bad

    out = ok(skyreg(tmp_path, server, admin, "orgs", "quota", "set", org, "5GiB", "--soft", "1B"))
    assert out == (
        f"{org}: {size(used)} in 2 blob(s) and manifests of 5 GiB (hard), soft 1 B: over the "
        "soft limit\n"
    )
    usage = ok(skyreg(tmp_path, server, org_token, "orgs", "usage", org))
    assert usage == out
    doc = json.loads(ok(skyreg(tmp_path, server, org_token, "orgs", "usage", org, "--json")))
    assert doc == {
        "org": org,
        "bytes": used,
        "blobs": 2,
        "quota": {"soft": 1, "hard": 5 * 2**30},
        "state": "soft",
    }
    over = ok(skyreg(tmp_path, server, admin, "orgs", "quota", "set", org, "10b"))
    assert over.endswith("of 10 B (hard): over the hard limit: pushes of new blobs are refused\n")
    within = ok(skyreg(tmp_path, server, admin, "orgs", "quota", "set", org, "1.5GiB"))
    assert within.endswith("of 1.5 GiB (hard): within the quota\n")

    assert "(HTTP 403)" in fails(skyreg(tmp_path, server, org_token, "orgs", "quota", "unset", org))
    assert ok(skyreg(tmp_path, server, admin, "orgs", "quota", "unset", org)) == (
        f"Removed the quota of {org}.\n"
    )
    assert ok(skyreg(tmp_path, server, org_token, "orgs", "usage", org)).endswith("; no quota\n")
    stranger = "nosuchorg0"
    assert "(HTTP 404)" in fails(skyreg(tmp_path, server, admin, "orgs", "usage", stranger))
