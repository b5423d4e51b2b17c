"""Org quotas at `/v2/` (`registry/quotas.py`) on a served registry: a push that would pass the
hard limit is refused with DENIED and a message naming the org, the usage and the limit, at
upload start (known size), at upload finish (any upload), at a mount and at a manifest PUT; a
retag still works; past the soft limit a push succeeds with a `Warning` header; deleting and
collecting gives the room back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy

from skyreg.meta.quotas import Quota, QuotaMeta
from tests.support.backings import create_org_and_app
from tests.support.inprocess import InProcessRegistry, gc_on_request
from tests.support.oci import OCI_MANIFEST, error_codes, image_manifest, push_blob, sha256
from tests.support.platform import authed

KIB = 1024


class Org:
    """A served registry with org `acme` (app `web`) and a way to set its quota."""

    def __init__(self, reg: InProcessRegistry) -> None:
        self.reg = reg
        self.url = reg.url
        self.http = authed((reg.data_dir / "admin-token").read_text().strip())
        create_org_and_app(self.http, reg.url, "acme", "web")
        self.engine = sqlalchemy.create_engine(f"sqlite:///{reg.data_dir / 'skyreg.db'}")
        self.quotas = QuotaMeta(self.engine)
        with self.engine.connect() as conn:
            self.org_id = conn.execute(sqlalchemy.text("SELECT id FROM orgs")).scalar_one()

    def limit(self, *, soft: int | None = None, hard: int | None = None) -> None:
        self.quotas.set_quota(self.org_id, Quota(soft, hard))

    def used(self) -> int:
        return self.quotas.usage(self.org_id).bytes

    def has_blob(self, digest: str) -> bool:
        r = self.http.head(f"{self.url}/v2/web/blobs/{digest}", timeout=30)
        return r.status_code == 200


@pytest.fixture
def org(tmp_path: Path) -> Iterator[Org]:
    with gc_on_request(tmp_path / "data") as reg:
        o = Org(reg)
        yield o
        o.engine.dispose()


def _denied(r: requests.Response) -> str:
    assert r.status_code == 403, r.text
    assert error_codes(r) == ["DENIED"]
    message = str(r.json()["errors"][0]["message"])
    assert "acme" in message and "quota" in message, message
    return message


def _config() -> bytes:
    return json.dumps({"os": "linux", "nonce": os.urandom(8).hex()}).encode()


def test_uploads_that_would_pass_the_hard_limit_are_denied_and_nothing_is_linked(
    org: Org,
) -> None:
    org.limit(hard=100 * KIB)
    small = os.urandom(60 * KIB)
    push_blob(org.url, "web", small, org.http)
    assert org.used() == 60 * KIB

    # a monolithic upload declares its size: refused before a byte is stored
    big = os.urandom(50 * KIB)
    r = org.http.post(
        f"{org.url}/v2/web/blobs/uploads/",
        params={"digest": sha256(big)},
        data=big,
        headers={"Content-Type": "application/octet-stream"},
    )
    message = _denied(r)
    assert "60.0 KiB used" in message and "100.0 KiB" in message
    assert not org.has_blob(sha256(big))

    # a chunked upload: its size is known when it finishes, and nothing is linked then
    r = org.http.post(f"{org.url}/v2/web/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    r = org.http.patch(
        org.url + location, data=big, headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 202, r.text
    r = org.http.put(org.url + location, params={"digest": sha256(big)})
    _denied(r)
    assert not org.has_blob(sha256(big))
    assert org.used() == 60 * KIB

    # the same bytes again are free: the org holds them already
    push_blob(org.url, "web", small, org.http)
    # a blob that fits still goes in
    push_blob(org.url, "web", os.urandom(30 * KIB), org.http)
    assert org.used() == 90 * KIB


def test_a_mount_counts_against_the_quota_of_the_org_mounting(org: Org) -> None:
    other = org.http.post(f"{org.url}/api/v1/orgs", json={"name": "other"})
    assert other.status_code == 201, other.text
    r = org.http.post(f"{org.url}/api/v1/apps", json={"name": "lib", "org": "other"})
    assert r.status_code == 201, r.text
    shared = os.urandom(40 * KIB)
    push_blob(org.url, "lib", shared, org.http)  # the admin may read both
    org.limit(hard=30 * KIB)
    r = org.http.post(
        f"{org.url}/v2/web/blobs/uploads/", params={"mount": sha256(shared), "from": "lib"}
    )
    _denied(r)
    assert not org.has_blob(sha256(shared))
    org.limit(hard=50 * KIB)
    r = org.http.post(
        f"{org.url}/v2/web/blobs/uploads/", params={"mount": sha256(shared), "from": "lib"}
    )
    assert r.status_code == 201, r.text
    assert org.used() == 40 * KIB


def test_over_the_hard_limit_new_manifests_and_sessions_are_denied_but_a_retag_works(
    org: Org,
) -> None:
    config, layer = _config(), os.urandom(20 * KIB)
    for blob in (config, layer):
        push_blob(org.url, "web", blob, org.http)
    manifest = image_manifest(config, [layer])
    put = org.http.put(
        f"{org.url}/v2/web/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert put.status_code == 201, put.text
    org.limit(hard=10 * KIB)  # lowered below what the org holds

    _denied(org.http.post(f"{org.url}/v2/web/blobs/uploads/"))  # size unknown, no room
    other = image_manifest(_config(), [layer])
    _denied(
        org.http.put(
            f"{org.url}/v2/web/manifests/v2", data=other, headers={"Content-Type": OCI_MANIFEST}
        )
    )
    retag = org.http.put(
        f"{org.url}/v2/web/manifests/stable", data=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert retag.status_code == 201, retag.text  # the manifest is there: no bytes added
    assert "Warning" not in retag.headers  # no soft limit set
    got = org.http.get(f"{org.url}/v2/web/manifests/stable", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200 and got.content == manifest


def test_past_the_soft_limit_a_push_succeeds_with_a_warning(org: Org) -> None:
    org.limit(soft=10 * KIB, hard=1024 * KIB)
    config, layer = _config(), os.urandom(20 * KIB)
    for blob in (config, layer):
        push_blob(org.url, "web", blob, org.http)
    r = org.http.put(
        f"{org.url}/v2/web/manifests/v1",
        data=image_manifest(config, [layer]),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert r.status_code == 201, r.text
    warning = r.headers["Warning"]
    assert warning.startswith('299 - "') and warning.endswith('"')
    assert "acme" in warning and "soft quota of 10.0 KiB" in warning, warning


def test_deleting_and_collecting_gives_the_room_back(org: Org) -> None:
    config, layer = _config(), os.urandom(80 * KIB)
    for blob in (config, layer):
        push_blob(org.url, "web", blob, org.http)
    manifest = image_manifest(config, [layer])
    r = org.http.put(
        f"{org.url}/v2/web/manifests/v1", data=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status_code == 201, r.text
    org.limit(hard=100 * KIB)
    nxt = os.urandom(50 * KIB)
    big = org.http.post(
        f"{org.url}/v2/web/blobs/uploads/",
        params={"digest": sha256(nxt)},
        data=nxt,
        headers={"Content-Type": "application/octet-stream"},
    )
    _denied(big)
    assert org.http.delete(f"{org.url}/v2/web/manifests/{sha256(manifest)}").status_code == 202
    run = org.http.post(f"{org.url}/api/v1/gc/runs", json={})
    assert run.status_code == 200, run.text
    assert org.used() == 0
    push_blob(org.url, "web", nxt, org.http)
    assert org.used() == 50 * KIB
