"""Retention policies, org quotas and pull times against a hostile tenant.

Org `victim` (A) owns the private app `web` (with `web/...` repositories) and the public app
`shared`; org `attacker` (B) owns `evil`, `webby` and `web-x` (names sharing A's prefix). B uses
its org, deploy and read-only tokens to read or change A's retention and quota, to make its own
policies reach A's tags or manifests, to dodge its own hard quota, to grow A's usage and to make
the registry record pulls it should not. Registries are served in-process without a gc worker:
only the passes a test asks for (`POST /api/v1/gc/runs`, admin) apply policies and collect.

An attack that succeeds is marked `xfail(strict=True, reason="HOLE: ...")`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy
from sqlalchemy import event, select

from skyreg.meta import schema as s
from skyreg.meta.platform import PlatformMeta
from skyreg.meta.quotas import QuotaMeta
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.meta.retention import RetentionMeta, RetentionPolicy
from skyreg.registry.pulls import PullTimes
from tests.support.inprocess import InProcessRegistry
from tests.support.meta import link_blobs, manifest_of
from tests.support.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    descriptor,
    error_codes,
    image_manifest,
    push_blob,
    push_image,
    put_manifest,
    sha256,
)
from tests.support.platform import Tenancy, authed, cli_env

KIB = 1024
API = "/api/v1"


@dataclass
class World:
    """A served registry with A and B set up, and direct access to its database."""

    reg: InProcessRegistry
    engine: sqlalchemy.Engine
    tokens: dict[str, str] = field(default_factory=dict)  # who -> secret

    @property
    def url(self) -> str:
        return self.reg.url

    def session(self, who: str) -> requests.Session:
        return authed(self.tokens[who])

    def api(self, method: str, path: str, who: str | None, **kw: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return requests.request(method, self.url + API + path, headers=headers, timeout=60, **kw)

    def org_id(self, name: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(s.orgs.c.id).where(s.orgs.c.name == name)).scalar_one())

    def used(self, org: str) -> int:
        """The org's usage walked now (not the gate's cached figure)."""
        return QuotaMeta(self.engine).usage(self.org_id(org)).bytes

    def set_hard(self, org: str, hard: int | None) -> None:
        if hard is None:
            assert self.api("DELETE", f"/orgs/{org}/quota", "admin").status_code == 204
            return
        r = self.api("PUT", f"/orgs/{org}/quota", "admin", json={"hard": hard})
        assert r.status_code == 200, r.text

    def policy(self, app: str) -> Any:
        r = self.api("GET", f"/apps/{app}/retention", "admin")
        assert r.status_code == 200, r.text
        return r.json()["policy"]

    def gc(self) -> Any:
        r = self.api("POST", "/gc/runs", "admin", json={})
        assert r.status_code == 200, r.text
        return r.json()

    def linked(self, repo: str, digest: str) -> bool:
        r = self.session("admin").head(f"{self.url}/v2/{repo}/blobs/{digest}", timeout=30)
        return r.status_code == 200

    def pull_rows(self, prefix: str) -> int:
        with self.engine.connect() as conn:
            return len(
                conn.execute(
                    select(s.manifest_pulls.c.digest)
                    .select_from(
                        s.manifest_pulls.join(
                            s.repositories, s.repositories.c.id == s.manifest_pulls.c.repository_id
                        )
                    )
                    .where(
                        (s.repositories.c.name == prefix)
                        | s.repositories.c.name.startswith(prefix + "/")
                    )
                ).all()
            )


@contextlib.contextmanager
def world(tmp_path: Path, **options: Any) -> Iterator[World]:
    opts: dict[str, Any] = {"gc_worker": False, "gc_review_delay": 0.0, **options}
    reg = InProcessRegistry(data_dir=tmp_path / "data", options=opts)
    reg.start()
    engine = sqlalchemy.create_engine(f"sqlite:///{reg.data_dir / 'skyreg.db'}")
    try:
        t = Tenancy(reg.data_dir)
        t.org("victim")
        t.app("web", "victim")
        t.app("shared", "victim", public=True)
        t.org("attacker")
        for app in ("evil", "webby", "web-x"):
            t.app(app, "attacker")
        w = World(reg, engine)
        w.tokens = {
            "admin": t.admin_secret(),
            "a-org": t.token("org", org="victim")[0],
            "b-org": t.token("org", org="attacker")[0],
            "b-deploy": t.token("deploy", org="attacker", app="evil")[0],
            "b-readonly": t.token("readonly", org="attacker")[0],
        }
        yield w
    finally:
        reg.stop()
        engine.dispose()


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    with world(tmp_path) as found:
        yield found


def _denied(r: requests.Response, org: str = "attacker") -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert error_codes(r) == ["DENIED"], r.text
    message = r.json()["errors"][0]["message"]
    assert org in message and "quota" in message, message


B_TOKENS = ("b-org", "b-deploy", "b-readonly")


# -- 1. B's tokens against A's retention and quotas, and its own quota ------------------------


def test_b_cannot_read_or_change_a_retention_usage_or_any_quota(w: World) -> None:
    policy = {"keep_tags": ["v*"], "keep_recent": 3, "untagged_after": "1h"}
    for app in ("web", "shared"):
        assert w.api("PUT", f"/apps/{app}/retention", "a-org", json=policy).status_code == 200
    w.set_hard("victim", 10**9)
    w.set_hard("attacker", 10**6)
    before = {app: w.policy(app) for app in ("web", "shared")}
    evil = {"keep_recent": 0, "keep_within": 0, "untagged_after": 0}
    for who in B_TOKENS:
        # A's private app: not found, whatever the method
        for method, params in (("GET", None), ("PUT", None), ("PUT", {"dry_run": "true"})):
            r = w.api(method, "/apps/web/retention", who, json=evil, params=params)
            assert r.status_code == 404, (who, method, r.text)
        assert w.api("DELETE", "/apps/web/retention", who).status_code == 404, who
        # A's public app: its images are visible, its retention is not, changing it refused
        assert w.api("GET", "/apps/shared/retention", who).status_code == 404, who
        for params in (None, {"dry_run": "true"}):
            r = w.api("PUT", "/apps/shared/retention", who, json=evil, params=params)
            assert r.status_code == 403, (who, r.text)
        assert w.api("DELETE", "/apps/shared/retention", who).status_code == 403, who
        # A's usage and quota: not found
        assert w.api("GET", "/orgs/victim/usage", who).status_code == 404, who
        assert w.api("PUT", "/orgs/victim/quota", who, json={"hard": 1}).status_code == 404
        assert w.api("DELETE", "/orgs/victim/quota", who).status_code == 404, who
        # its own quota: seen, never changed
        assert w.api("GET", "/orgs/attacker/usage", who).status_code == 200, who
        r = w.api("PUT", "/orgs/attacker/quota", who, json={"hard": "1TB"})
        assert r.status_code == 403, (who, r.text)
        assert w.api("DELETE", "/orgs/attacker/quota", who).status_code == 403, who
    # B's deploy and read-only tokens cannot set B's own retention either
    for who in ("b-deploy", "b-readonly"):
        r = w.api("PUT", "/apps/evil/retention", who, json=evil)
        assert r.status_code == 403, (who, r.text)
    assert {app: w.policy(app) for app in ("web", "shared")} == before
    usage = w.api("GET", "/orgs/attacker/usage", "admin").json()
    assert usage["quota"] == {"soft": None, "hard": 10**6}
    assert w.api("GET", "/orgs/victim/usage", "admin").json()["quota"]["hard"] == 10**9


def _cli(w: World, tmp_path: Path, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(tmp_path / who, w.url, w.tokens[who])
    return subprocess.run(
        [sys.executable, "-m", "skyreg", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_b_cannot_change_a_retention_or_any_quota_through_the_cli(w: World, tmp_path: Path) -> None:
    assert w.api("PUT", "/apps/web/retention", "a-org", json={"keep_recent": 3}).status_code == 200
    w.set_hard("attacker", 10**6)
    before = w.policy("web")
    attempts = [
        ("apps", "retention", "set", "web", "--keep-recent", "0"),
        ("apps", "retention", "unset", "web"),
        ("apps", "retention", "show", "web"),
        ("orgs", "usage", "victim"),
        ("orgs", "quota", "set", "attacker", "1TB"),
        ("orgs", "quota", "unset", "attacker"),
    ]
    for args in attempts:
        done = _cli(w, tmp_path, "b-org", *args)
        assert done.returncode != 0, (args, done.stdout)
        assert "404" in done.stderr or "403" in done.stderr or "not" in done.stderr.lower()
    assert w.policy("web") == before
    assert w.api("GET", "/orgs/attacker/usage", "admin").json()["quota"]["hard"] == 10**6


# -- 2. prefix confusion ------------------------------------------------------------------------


def test_policies_never_cross_an_app_prefix(w: World) -> None:
    admin = w.session("admin")
    a_images = {
        repo: push_image(w.url, repo, "old", layers=1, session=admin) for repo in ("web", "web/sub")
    }
    b_images = {
        repo: push_image(w.url, repo, "old", layers=1, session=admin)
        for repo in ("webby", "webby/sub", "web-x")
    }
    delete_all = {"keep_recent": 0, "untagged_after": 0}
    for app in ("webby", "web-x"):  # B's policies
        r = w.api("PUT", f"/apps/{app}/retention", "b-org", json=delete_all)
        assert r.status_code == 200, r.text
        planned = {t["repository"] for t in r.json()["would_delete"]}
        assert planned == {repo for repo in b_images if repo.split("/")[0] == app}, planned
    run = w.gc()
    assert sorted(run["deleted_tags"]) == sorted(f"{repo}:old" for repo in b_images)
    for repo, image in a_images.items():
        got = admin.get(f"{w.url}/v2/{repo}/manifests/old", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200 and got.content == image.manifest, repo
        for blob in (image.config, *image.layers):
            assert admin.get(f"{w.url}/v2/{repo}/blobs/{sha256(blob)}").content == blob

    # A's policy deletes only A's tags (B's are re-pushed first)
    b_again = {repo: push_image(w.url, repo, "new", layers=1, session=admin) for repo in b_images}
    for app in ("webby", "web-x"):
        assert w.api("DELETE", f"/apps/{app}/retention", "b-org").status_code == 204
    r = w.api("PUT", "/apps/web/retention", "a-org", json=delete_all)
    assert {t["repository"] for t in r.json()["would_delete"]} == {"web", "web/sub"}
    run = w.gc()
    assert sorted(run["deleted_tags"]) == ["web/sub:old", "web:old"]
    for repo, image in b_again.items():
        got = admin.get(f"{w.url}/v2/{repo}/manifests/new", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200 and got.content == image.manifest, repo

    # usage and quota map each repository to its own app's org
    meta = QuotaMeta(w.engine)
    assert meta.quota_for("webby/sub") is None  # no quota yet
    w.set_hard("attacker", 10**9)
    found = meta.quota_for("webby/sub")
    assert found is not None and found[1] == "attacker"
    assert meta.quota_for("web/sub") is None
    assert w.used("victim") == 0  # A's images were collected
    b_bytes = sum(len(b) for i in b_again.values() for b in (i.config, *i.layers, i.manifest))
    assert w.used("attacker") == b_bytes


# -- 3. quota dodges ----------------------------------------------------------------------------


def _chunks(data: bytes, size: int = 8 * KIB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _raw_post(w: World, path: str, head: dict[str, str], body: bytes, declared: int) -> bytes:
    """One HTTP/1.1 request over a socket with exactly the headers given: the head and the
    `declared` first bytes of `body`, then (once the answer began) the rest of `body`; the
    first answer."""
    auth = "Basic " + base64.b64encode(f"x:{w.tokens['b-org']}".encode()).decode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {w.reg.host}", f"Authorization: {auth}"]
    lines += [f"{k}: {v}" for k, v in head.items()] + ["", ""]
    with socket.create_connection(("127.0.0.1", w.reg.port), timeout=30) as sock:
        sock.sendall("\r\n".join(lines).encode() + body[:declared])
        got = sock.recv(65536)
        with contextlib.suppress(OSError):
            sock.sendall(body[declared:])
    return got


def test_b_cannot_upload_past_its_hard_limit(w: World) -> None:
    b = w.session("b-org")
    push_blob(w.url, "evil", os.urandom(60 * KIB), b)
    w.set_hard("attacker", 100 * KIB)
    big = os.urandom(50 * KIB)

    # a chunked session: PATCH without Content-Length, then PUT (with and without a last chunk)
    for last in (b"", big[-KIB:]):
        r = b.post(f"{w.url}/v2/evil/blobs/uploads/")
        assert r.status_code == 202, r.text
        loc = r.headers["Location"]
        first = big[: len(big) - len(last)]
        r = b.patch(w.url + loc, data=_chunks(first))
        assert r.status_code == 202, r.text
        _denied(b.put(w.url + loc, params={"digest": sha256(big)}, data=last))
        assert not w.linked("evil", sha256(big))

    # a monolithic POST, Transfer-Encoding: chunked
    _denied(
        b.post(f"{w.url}/v2/evil/blobs/uploads/", params={"digest": sha256(big)}, data=_chunks(big))
    )
    assert not w.linked("evil", sha256(big))

    # a monolithic POST declaring 10 bytes and sending 50 KiB
    answer = _raw_post(
        w,
        f"/v2/evil/blobs/uploads/?digest={sha256(big)}",
        {"Content-Length": "10", "Content-Type": "application/octet-stream"},
        big,
        10,
    )
    assert answer.startswith(b"HTTP/1.1 400") and b"DIGEST_INVALID" in answer, answer[:300]
    assert not w.linked("evil", sha256(big))
    # ... claiming the digest of its first 10 bytes stores those 10 bytes, no more
    answer = _raw_post(
        w,
        f"/v2/evil/blobs/uploads/?digest={sha256(big[:10])}",
        {"Content-Length": "10", "Content-Type": "application/octet-stream"},
        big,
        10,
    )
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    assert w.used("attacker") == 60 * KIB + 10

    # B's second app is the same org
    _denied(b.post(f"{w.url}/v2/webby/blobs/uploads/", params={"digest": sha256(big)}, data=big))
    assert not w.linked("webby", sha256(big))
    assert w.used("attacker") <= 60 * KIB + 10


def test_b_cannot_mount_past_its_hard_limit_nor_grow_a_usage(w: World) -> None:
    admin, b = w.session("admin"), w.session("b-org")
    public_big, public_small = os.urandom(50 * KIB), os.urandom(10 * KIB)
    for blob in (public_big, public_small):
        push_blob(w.url, "shared", blob, admin)
    a_used = w.used("victim")
    assert a_used == 60 * KIB
    mine = os.urandom(60 * KIB)
    push_blob(w.url, "evil/a", mine, b)
    w.set_hard("attacker", 100 * KIB)

    # from A's public app: too big for B's quota
    r = b.post(
        f"{w.url}/v2/evil/blobs/uploads/",
        params={"mount": sha256(public_big), "from": "shared"},
    )
    _denied(r)
    assert not w.linked("evil", sha256(public_big))
    # without `from`
    _denied(b.post(f"{w.url}/v2/evil/blobs/uploads/", params={"mount": sha256(public_big)}))
    # a small one fits: B pays for it, A's usage does not move
    r = b.post(
        f"{w.url}/v2/evil/blobs/uploads/",
        params={"mount": sha256(public_small), "from": "shared"},
    )
    assert r.status_code == 201, r.text
    assert w.used("attacker") == 70 * KIB
    # within B's org: already held, free; into B's other app too
    for repo in ("evil/b", "webby"):
        r = b.post(
            f"{w.url}/v2/{repo}/blobs/uploads/", params={"mount": sha256(mine), "from": "evil/a"}
        )
        assert r.status_code == 201, r.text
    assert w.used("attacker") == 70 * KIB

    # B uploads bytes A holds: B's usage grows, A's never
    push_blob(w.url, "evil", public_small, b)
    assert w.used("victim") == a_used
    w.set_hard("attacker", None)
    push_blob(w.url, "webby", public_big, b)
    assert w.used("attacker") == 120 * KIB
    assert w.used("victim") == a_used


def test_b_cannot_add_manifests_over_its_hard_limit(w: World) -> None:
    b = w.session("b-org")
    image = push_image(w.url, "evil", "v1", layers=1, layer_size=20 * KIB, session=b)
    used = w.used("attacker")
    w.set_hard("attacker", used - 1)
    # a new image manifest, an index of an existing one, both in B's two apps
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [descriptor(OCI_MANIFEST, image.manifest)],
        }
    ).encode()
    _denied(put_manifest(w.url, "evil", "idx", index, OCI_INDEX, session=b))
    other = image_manifest(image.config, image.layers, annotations={"x": "y"})
    _denied(put_manifest(w.url, "evil", "v2", other, session=b))
    _denied(put_manifest(w.url, "webby", "v1", image.manifest, session=b))
    for ref in ("idx", "v2"):
        assert b.get(f"{w.url}/v2/evil/manifests/{ref}").status_code == 404
    # a retag of a manifest the repository holds adds nothing: documented, allowed
    assert put_manifest(w.url, "evil", "again", image.manifest, session=b).status_code == 201
    assert w.used("attacker") == used


def test_b_cannot_store_unbounded_manifests_at_its_hard_limit(w: World) -> None:
    b = w.session("b-org")
    config = b"{}"
    push_blob(w.url, "evil", config, b)
    w.set_hard("attacker", len(config))  # at the limit, not over it
    stored = 0
    for i in range(8):
        pad = os.urandom(384 * KIB).hex()  # 768 KiB of annotation
        body = image_manifest(config, [], annotations={"pad": pad, "n": str(i)})
        if put_manifest(w.url, "evil", f"m{i}", body, session=b).status_code == 201:
            stored += len(body)
    # manifests count: an org at its hard limit adds none (this stored 6 MB before they did)
    assert stored == 0
    assert w.used("attacker") == len(config)


def test_b_cannot_reach_a_private_blobs_by_mount_or_manifest(w: World) -> None:
    a, b = w.session("a-org"), w.session("b-org")
    image = push_image(w.url, "web", "v1", layers=1, layer_size=30 * KIB, session=a)
    a_used = w.used("victim")
    w.set_hard("attacker", 10 * KIB)
    layer = sha256(image.layers[0])
    for params in ({"mount": layer, "from": "web"}, {"mount": layer}):
        r = b.post(f"{w.url}/v2/evil/blobs/uploads/", params=params)
        # not a mount (a plain session), and not a quota answer that would tell A holds it
        assert r.status_code == 202, (params, r.status_code, r.text)
    assert not w.linked("evil", layer)
    # a manifest naming A's blobs without holding them
    w.set_hard("attacker", None)
    r = put_manifest(w.url, "evil", "stolen", image.manifest, session=b)
    assert r.status_code == 400 and error_codes(r) == ["MANIFEST_BLOB_UNKNOWN"], r.text
    assert b.get(f"{w.url}/v2/evil/blobs/{layer}").status_code == 404
    assert w.used("attacker") == 0 and w.used("victim") == a_used


def _parallel_uploads(w: World, repo: str, blobs: list[bytes], chunked: bool) -> list[int]:
    """Every blob uploaded at once (chunked: sessions written first, their PUTs together)."""
    b = w.session("b-org")
    barrier = threading.Barrier(len(blobs))

    def one(blob: bytes) -> int:
        if chunked:
            r = b.post(f"{w.url}/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["Location"]
            assert b.patch(w.url + loc, data=blob).status_code == 202
            barrier.wait()
            return b.put(w.url + loc, params={"digest": sha256(blob)}).status_code
        barrier.wait()
        return b.post(
            f"{w.url}/v2/{repo}/blobs/uploads/",
            params={"digest": sha256(blob)},
            data=blob,
            headers={"Content-Type": "application/octet-stream"},
        ).status_code

    with ThreadPoolExecutor(len(blobs)) as pool:
        return list(pool.map(one, blobs))


OVERSHOOT: dict[str, float] = {}


@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
def test_parallel_uploads_pass_the_limit_by_one_wave_at_most(w: World, chunked: bool) -> None:
    hard, size, n = 100 * KIB, 40 * KIB, 8
    w.set_hard("attacker", hard)
    statuses = _parallel_uploads(w, "evil", [os.urandom(size) for _ in range(n)], chunked)
    assert set(statuses) <= {201, 403}, statuses
    used = w.used("attacker")
    OVERSHOOT["chunked" if chunked else "monolithic"] = used / hard
    print(
        f"\n{n} parallel {'chunked' if chunked else 'monolithic'} uploads of {size} B, "
        f"hard {hard} B: {statuses.count(201)} linked, usage {used} B = {used / hard:.2f}x"
    )
    assert used == statuses.count(201) * size
    assert used <= hard + (n - 1) * size  # the documented race: one wave of uploads at most
    # the next wave sees what the first linked: nothing more goes in
    again = _parallel_uploads(w, "webby", [os.urandom(size) for _ in range(n)], chunked)
    if used >= hard:
        assert set(again) == {403}, again
    assert w.used("attacker") <= max(used, hard)


# -- 5. policy bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"keep_tags": [f"v{i}*" for i in range(33)]},
        {"keep_tags": ["x" * 129]},
        {"keep_tags": ["v\x00*"]},
        {"keep_tags": ["v\n*"]},
        {"keep_tags": [""]},
        {"keep_tags": "v*"},
        {"keep_recent": 10**20},
        {"keep_recent": 100_001},
        {"keep_recent": -1},
        {"keep_recent": 1.5},
        {"keep_recent": "3"},
        {"keep_within": "99999999999d"},
        {"keep_within": 10**30},
        {"keep_within": -1},
        {"keep_within": "nan"},
        {"keep_within": float("inf")},
        {"untagged_after": "-1s"},
        {"keep_recent": 1, "delete_everything": True},
        {"keep_recent": 1, "app": "web"},
    ],
)
def test_bad_policy_bodies_are_refused(w: World, body: dict[str, Any]) -> None:
    assert w.api("PUT", "/apps/evil/retention", "b-org", json={"keep_recent": 9}).status_code == 200
    before = w.policy("evil")
    for dry in ("true", "false"):
        r = w.api(
            "PUT", "/apps/evil/retention", "b-org", data=json.dumps(body), params={"dry_run": dry}
        )
        assert r.status_code == 400, (body, r.status_code, r.text)
    assert w.policy("evil") == before
    assert w.policy("web") is None


@pytest.mark.parametrize(
    "hard",
    ["\uff11\uff10GB", "\u0661\u0660GB", "1e3", "0x10", "1_000", " ", 2**63, "-0"],
)
def test_bad_quota_sizes_are_refused(w: World, hard: Any) -> None:
    r = w.api("PUT", "/orgs/attacker/quota", "admin", data=json.dumps({"hard": hard}))
    assert r.status_code == 400, (hard, r.status_code, r.text)
    assert w.api("GET", "/orgs/attacker/usage", "admin").json()["quota"] is None


def test_hostile_patterns_match_in_linear_time(w: World) -> None:
    b = w.session("b-org")
    image = push_image(w.url, "evil", "seed", layers=1, session=b)
    tags = [f"{i:03d}" + "a" * 125 for i in range(300)]
    for tag in tags:
        assert put_manifest(w.url, "evil", tag, image.manifest, session=b).status_code == 201
    hostile = [
        "*" * 128,
        "*a" * 63 + "*b",
        "a*" * 63 + "ab",
        "*?" * 63 + "*c",
        "[" + "*a" * 63 + "b",
        "[!" * 64,
        "[[[[" + "*" * 124,
        "*" + "a" * 126 + "b",
    ] * 4
    assert len(hostile) == 32 and all(len(p) <= 128 for p in hostile)
    without_star = [p for p in hostile if p != "*" * 128]
    body = {"keep_tags": without_star, "keep_recent": 0}
    started = time.monotonic()
    r = w.api("PUT", "/apps/evil/retention", "b-org", json=body, params={"dry_run": "true"})
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert len(r.json()["would_delete"]) == len(tags) + 1  # none matches; all would go
    assert took < 5, took
    print(f"\ndry run of 28 hostile 128-char patterns over 301 128-char tags: {took:.3f}s")
    # the full 32 (with `*`*128, keeping everything) are accepted and keep every tag
    r = w.api("PUT", "/apps/evil/retention", "b-org", json={"keep_tags": hostile, "keep_recent": 0})
    assert r.status_code == 200 and r.json()["would_delete"] == [], r.text


# -- 6. pull times ------------------------------------------------------------------------------


def test_pull_times_are_bounded_in_memory() -> None:
    pulls = PullTimes(None, max_pending=1000)  # type: ignore[arg-type]
    for i in range(5000):
        pulls.record(f"web/r{i % 7}", "sha256:" + hashlib.sha256(str(i).encode()).hexdigest())
    assert len(pulls._pending) == 1000
    assert pulls.dropped == 4000


def test_only_authorized_gets_of_existing_manifests_are_recorded(tmp_path: Path) -> None:
    with world(tmp_path, pull_flush_interval=0.1) as w:
        a = w.session("a-org")
        image = push_image(w.url, "web", "v1", layers=1, session=a)
        push_image(w.url, "shared", "v1", layers=1, session=a)
        accept = {"Accept": OCI_MANIFEST}
        for who in (*B_TOKENS, None):
            s_ = w.session(who) if who else requests.Session()
            for ref in ("v1", image.digest):
                r = s_.get(f"{w.url}/v2/web/manifests/{ref}", headers=accept)
                assert r.status_code in (401, 403, 404), (who, r.status_code)
        assert a.head(f"{w.url}/v2/web/manifests/v1", headers=accept).status_code == 200
        for i in range(300):  # nonexistent manifests, by digest and by tag
            digest = "sha256:" + hashlib.sha256(f"nothing {i}".encode()).hexdigest()
            assert a.get(f"{w.url}/v2/web/manifests/{digest}").status_code == 404
            assert a.get(f"{w.url}/v2/web/r{i}/manifests/t{i}").status_code == 404
        time.sleep(1.0)  # ten flushes
        assert w.pull_rows("web") == 0
        # the control: A's own GET is recorded
        assert a.get(f"{w.url}/v2/web/manifests/v1", headers=accept).status_code == 200
        deadline = time.monotonic() + 30
        while w.pull_rows("web") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert w.pull_rows("web") == 1


# -- 7. the delete condition: a push between plan and delete survives ---------------------------


@pytest.mark.parametrize("change", ["repushed", "moved"])
def test_a_tag_changed_between_plan_and_delete_survives(tmp_path: Path, change: str) -> None:
    meta: RegistryMeta = open_database(None, tmp_path)
    try:
        platform = PlatformMeta(meta.db)
        org = platform.create_org("victim")
        platform.create_app("web", org.id)
        app = platform.get_app("web")
        assert app is not None
        config, layer = b"config", b"layer"
        link_blobs(meta, "web", config, layer)
        m = manifest_of(config, [layer])
        other = manifest_of(config, [layer], annotations={"n": "2"})
        meta.put_manifest("web", m, ["hot", "cold"])
        meta.put_manifest("web", other, [])
        retention = RetentionMeta(meta.db)
        retention.set_policy(app.id, RetentionPolicy(keep_recent=0))
        fired: list[str] = []

        def between(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            # The plan is made; just before its first tag DELETE, "hot" is pushed again.
            if statement.lstrip().upper().startswith("DELETE FROM TAGS") and not fired:
                fired.append(statement)
                if change == "repushed":
                    cursor.execute(
                        "UPDATE tags SET updated_at = ? WHERE name = 'hot'",
                        (datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),),
                    )
                else:
                    cursor.execute(
                        "UPDATE tags SET manifest_digest = ? WHERE name = 'hot'",
                        (str(other.digest),),
                    )

        event.listen(meta.engine, "before_cursor_execute", between)
        try:
            run = retention.apply(app.id, "web")
        finally:
            event.remove(meta.engine, "before_cursor_execute", between)
        assert fired
        assert [t.tag for t in run.tags] == ["cold"]
        found = meta.get_manifest("web", "hot", by_digest=False)
        assert found is not None
        assert found.digest == str(m.digest if change == "repushed" else other.digest)
        assert meta.get_manifest("web", "cold", by_digest=False) is None
    finally:
        meta.close()


def test_tags_pushed_while_retention_runs_always_pull(w: World) -> None:
    """`hot` is always its repository's newest tag (keep_recent 1 keeps it) while junk tags on
    the same manifests go at every run, and `hot` moves back and forth between manifests that
    lose their last other tag: every acknowledged push must stay, and pull, until the next."""
    a, admin = w.session("a-org"), w.session("admin")
    base = push_image(w.url, "web", "keep-base", layers=1, layer_size=4 * KIB, session=a)
    layer = base.layers[0]
    policy = {"keep_tags": ["keep-*"], "keep_recent": 1, "untagged_after": 0}
    assert w.api("PUT", "/apps/web/retention", "a-org", json=policy).status_code == 200
    stop = threading.Event()
    acked: list[str] = []
    lost: list[str] = []
    runs: list[Any] = []

    def pull(body: bytes) -> str:
        """ "" when `hot` serves `body` and its blobs, else what is wrong."""
        got = admin.get(f"{w.url}/v2/web/manifests/hot", headers={"Accept": OCI_MANIFEST})
        if got.status_code != 200 or got.content != body:
            return f"hot -> {sha256(body)} answered {got.status_code}"
        for d in [*json.loads(body)["layers"], json.loads(body)["config"]]:
            if admin.head(f"{w.url}/v2/web/blobs/{d['digest']}").status_code != 200:
                return f"hot -> {sha256(body)} without {d['digest']}"
        return ""

    def pusher() -> None:
        bodies: list[bytes] = []
        i = 0
        while not stop.is_set():
            i += 1
            if bodies and (problem := pull(bodies[-1])):
                lost.append(problem)
            if len(bodies) < 2 or i % 3 == 0:
                config = json.dumps({"os": "linux", "n": i}).encode()
                r = a.post(
                    f"{w.url}/v2/web/blobs/uploads/", params={"digest": sha256(config)}, data=config
                )
                if r.status_code != 201:
                    continue
                body = image_manifest(config, [layer])
            else:
                body = bodies[-2]  # back to the manifest hot left a moment ago
            if put_manifest(w.url, "web", f"junk-{i}", body, session=a).status_code != 201:
                continue
            if put_manifest(w.url, "web", "hot", body, session=a).status_code == 201:
                acked.append(sha256(body))
                bodies.append(body)
        if bodies and (problem := pull(bodies[-1])):
            lost.append(problem)

    def collector() -> None:
        while not stop.is_set():
            runs.append(w.gc())

    threads = [threading.Thread(target=f) for f in (pusher, collector)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    junk = sum(1 for r in runs for tag in r["deleted_tags"] if tag.startswith("web:junk-"))
    manifests = sum(len(r["deleted_manifests"]) for r in runs)
    hot = sum(
        1 for r in runs if "web:hot" in r["deleted_tags"]
    )  # planned while a junk tag was newer
    print(
        f"\n{len(acked)} acknowledged pushes of hot ({len(set(acked))} manifests), "
        f"{len(runs)} gc runs deleting {junk} junk tags, hot {hot} times, {manifests} manifests"
    )
    assert not lost, lost
    assert len(acked) > 10 and junk > 5 and manifests > 0  # the race took place
    assert len(set(acked)) < len(acked)  # hot went back to manifests it had left
    w.gc()
    assert pull(admin.get(f"{w.url}/v2/web/manifests/{acked[-1]}").content) == ""


# -- 8. B's untagged_after: 0 never collects A's manifests --------------------------------------


def test_b_untagged_after_zero_never_collects_a_manifests(tmp_path: Path) -> None:
    with world(tmp_path, gc_review_delay=3600.0) as w:
        a, b, admin = w.session("a-org"), w.session("b-org"), w.session("admin")
        image = push_image(w.url, "web", "v1", layers=2, session=a)
        loose = push_image(w.url, "web/sub", None, layers=1, session=a)  # untagged, by digest
        moved = push_image(w.url, "web", "moving", layers=1, session=a)
        push_image(w.url, "web", "moving", layers=1, session=a)  # `moved` lost its tag
        # B holds the same blobs and the same manifest, in an app named like A's
        for blob in (image.config, *image.layers):
            push_blob(w.url, "webby", blob, b)
        assert put_manifest(w.url, "webby", "t", image.manifest, session=b).status_code == 201
        policy = {"keep_recent": 0, "untagged_after": 0}
        for app in ("webby", "web-x", "evil"):
            r = w.api("PUT", f"/apps/{app}/retention", "b-org", json=policy)
            assert r.status_code == 200, r.text
        runs = [w.gc() for _ in range(3)]
        assert runs[0]["deleted_tags"] == ["webby:t"]
        deleted = [m for r in runs for m in r["deleted_manifests"]]
        assert deleted == [f"webby@{image.digest}"], deleted  # B's copy went at once
        for repo, img in (("web", image), ("web/sub", loose), ("web", moved)):
            got = admin.get(f"{w.url}/v2/{repo}/manifests/{img.digest}")
            assert got.status_code == 200 and got.content == img.manifest, repo
            for blob in (img.config, *img.layers):
                got = admin.get(f"{w.url}/v2/{repo}/blobs/{sha256(blob)}")
                assert got.status_code == 200 and got.content == blob, repo
        assert admin.get(f"{w.url}/v2/webby/manifests/t").status_code == 404
