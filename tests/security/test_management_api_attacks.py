"""The management API under /api/v1 (and GraphQL) against a hostile tenant.

Two organizations share one registry: `victim` (a private app with a pushed image, a release and
a machine; a public app) and `mallory`, whose every token kind attacks. The promises
(ARCHITECTURE.md, platform/ and services/): another org's resources answer exactly like missing
ones; a token kind does no more than it may; a bad body is a 400 naming what is wrong, never a
500; a refused caller is refused before its body is looked at; listings are bounded.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from skyreg.platform.api.scans import TRIVY_MEDIA_TYPE
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image, put_manifest
from tests.support.platform import Tenancy, authed

API = "/api/v1"


@dataclass
class World:
    reg: InProcessRegistry
    admin: str
    victim_org: str
    victim_org_id: str
    victim_deploy: str
    victim_deploy_id: str
    victim_ro: str
    mallory_org: str
    mallory_deploy: str
    mallory_ro: str
    machine_id: str
    image_digest: str

    @property
    def url(self) -> str:
        return self.reg.url + API

    def mallory(self) -> dict[str, str]:
        """The attacker's tokens by kind."""
        return {"org": self.mallory_org, "deploy": self.mallory_deploy, "readonly": self.mallory_ro}

    def call(
        self, secret: str | None, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> requests.Response:
        session = authed(secret) if secret else requests.Session()
        with session:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            return session.request(
                method,
                self.url + path,
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reg = InProcessRegistry(data_dir=tmp_path_factory.mktemp("attacks") / "data")
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        for org in ("victim", "mallory"):
            t.org(org)
        t.app("vapp", "victim")
        t.app("vpub", "victim", public=True)
        t.app("mapp", "mallory")
        victim_org, victim_org_id = t.token("org", org="victim")
        victim_deploy, victim_deploy_id = t.token("deploy", org="victim", app="vapp")
        victim_ro, _ = t.token("readonly", org="victim")
        mallory_org, _ = t.token("org", org="mallory")
        mallory_deploy, _ = t.token("deploy", org="mallory", app="mapp")
        mallory_ro, _ = t.token("readonly", org="mallory")
        with authed(victim_org) as session:
            image = push_image(reg.url, "vapp", "latest", session=session)
            r = session.post(f"{reg.url}{API}/apps/vapp/releases", json={"image": "vapp:latest"})
            assert r.status_code == 201, r.text
            r = session.get(f"{reg.url}{API}/apps/vapp/machines")
            assert r.status_code == 200, r.text
            machine_id = r.json()["machines"][0]["id"]
        with authed(mallory_org) as session:  # mallory's machine is newer than the victim's
            push_image(reg.url, "mapp", "latest", session=session)
            r = session.post(f"{reg.url}{API}/apps/mapp/releases", json={"image": "mapp:latest"})
            assert r.status_code == 201, r.text
        yield World(
            reg,
            t.admin_secret(),
            victim_org,
            victim_org_id,
            victim_deploy,
            victim_deploy_id,
            victim_ro,
            mallory_org,
            mallory_deploy,
            mallory_ro,
            machine_id,
            image.digest,
        )
    finally:
        reg.stop()


def _answer(r: requests.Response, name: str) -> tuple[int, str]:
    """Status and body, the probed name replaced by a placeholder."""
    return r.status_code, r.text.replace(name, "NAME")


# Requests that name an app, an org, a token or a machine ({} is where the name goes).
APP_PROBES: list[tuple[str, str, Any]] = [
    ("GET", "/apps/{}", None),
    ("PATCH", "/apps/{}", {"public": True}),
    ("GET", "/apps/{}/images", None),
    ("GET", "/apps/{}/images/latest", None),
    ("GET", "/apps/{}/releases", None),
    ("POST", "/apps/{}/releases", {"image": "mapp:latest"}),
    ("GET", "/apps/{}/machines", None),
    ("GET", "/apps/{}/logs", None),
    ("POST", "/tokens", {"kind": "deploy", "app": "{}"}),
    ("POST", "/apps/mapp/releases", {"image": "{}:latest"}),
    ("POST", "/apps/mapp/releases", {"image": "{}/sub:latest"}),
]
ORG_PROBES: list[tuple[str, str, Any]] = [
    ("GET", "/apps?org={}", None),
    ("GET", "/tokens?org={}", None),
    ("POST", "/apps", {"name": "mallory-new", "org": "{}"}),
    ("POST", "/tokens", {"kind": "org", "org": "{}"}),
    ("POST", "/tokens", {"kind": "readonly", "org": "{}"}),
]
MACHINE_PROBES: list[tuple[str, str, Any]] = [
    ("POST", "/machines/{}/stop", None),
    ("POST", "/machines/{}/start", None),
    ("POST", "/machines/{}/restart", None),
    ("POST", "/agent/machines/{}/state", {"state": "failed"}),
    ("POST", "/agent/machines/{}/events", {"message": "hello"}),
    ("POST", "/agent/machines/{}/logs", {"lines": ["hello"]}),
]


def _fill(body: Any, name: str) -> Any:
    return None if body is None else json.loads(json.dumps(body).replace("{}", name))


def _probe(
    world: World, secret: str | None, probes: list[tuple[str, str, Any]], real: str, missing: str
) -> None:
    for method, path, body in probes:
        foreign = world.call(secret, method, path.format(real), _fill(body, real))
        absent = world.call(secret, method, path.format(missing), _fill(body, missing))
        assert foreign.status_code < 500, (method, path, foreign.text)
        assert foreign.status_code not in (200, 201), (method, path, foreign.text)
        assert _answer(foreign, real) == _answer(absent, missing), (method, path)


@pytest.mark.parametrize("kind", ["org", "deploy", "readonly"])
def test_another_orgs_app_answers_exactly_like_a_missing_one(world: World, kind: str) -> None:
    secret = world.mallory()
    _probe(world, secret[kind], APP_PROBES, "vapp", "nope")


@pytest.mark.parametrize("kind", ["org", "deploy", "readonly"])
def test_another_org_answers_exactly_like_a_missing_one(world: World, kind: str) -> None:
    secret = world.mallory()
    _probe(world, secret[kind], ORG_PROBES, "victim", "nobody")


@pytest.mark.parametrize("kind", ["org", "deploy", "readonly"])
def test_another_orgs_machine_answers_exactly_like_a_missing_one(world: World, kind: str) -> None:
    secret = world.mallory()
    missing = secrets.token_hex(7)
    _probe(world, secret[kind], MACHINE_PROBES, world.machine_id, missing)
    r = world.call(world.mallory_org, "GET", "/agent/machines")
    assert r.status_code == 200, r.text
    assert world.machine_id not in r.text


@pytest.mark.parametrize("path", ["/apps/mapp/machines?cursor={}", "/agent/machines?cursor={}"])
def test_another_orgs_machine_id_as_a_cursor_pages_like_a_missing_one(
    world: World, path: str
) -> None:
    """A page after a cursor compares with the cursor machine's creation time: another org's
    machine must not be usable as one (it would confirm the id and bound its creation time)."""
    mine = world.call(world.mallory_org, "GET", path.format("")).json()["machines"]
    assert [m["app"] for m in mine] == ["mapp"]
    missing = secrets.token_hex(7)
    foreign = world.call(world.mallory_org, "GET", path.format(world.machine_id))
    absent = world.call(world.mallory_org, "GET", path.format(missing))
    assert foreign.status_code == absent.status_code
    assert foreign.json()["machines"] == absent.json()["machines"]


@pytest.mark.parametrize("kind", ["org", "deploy", "readonly"])
def test_another_orgs_token_answers_exactly_like_a_missing_one(world: World, kind: str) -> None:
    secret = world.mallory()
    for target in (world.victim_org_id, world.victim_deploy_id):
        foreign = world.call(secret[kind], "DELETE", f"/tokens/{target}")
        missing = secrets.token_hex(8)
        absent = world.call(secret[kind], "DELETE", f"/tokens/{missing}")
        assert _answer(foreign, target) == _answer(absent, missing)
        assert foreign.status_code == 404
    assert world.call(world.victim_org, "GET", "/whoami").status_code == 200


def test_a_private_app_answers_anonymous_callers_like_a_missing_one(world: World) -> None:
    probes = [p for p in APP_PROBES if p[0] == "GET"]
    _probe(world, None, probes, "vapp", "nope")
    assert world.call(None, "GET", "/apps/vpub").status_code == 200


def test_graphql_answers_another_orgs_app_like_a_missing_one(world: World) -> None:
    def ask(name: str) -> requests.Response:
        query = '{ app(name: "%s") { name releasesUnprocessed(first: 5) { nodes { id } } } }'
        with authed(world.mallory_org) as s:
            return s.post(f"{world.reg.url}/graphql", json={"query": query % name}, timeout=60)

    foreign, absent = ask("vapp"), ask("nope")
    assert "releasesUnprocessed" not in foreign.text.replace("releasesUnprocessed(", "")
    assert _answer(foreign, "vapp") == _answer(absent, "nope")


def test_a_public_app_is_seen_but_never_changed_or_deployed_by_another_org(world: World) -> None:
    assert world.call(world.mallory_org, "GET", "/apps/vpub").status_code == 200
    r = world.call(world.mallory_org, "PATCH", "/apps/vpub", {"public": False})
    assert r.status_code == 403, r.text
    r = world.call(world.mallory_org, "POST", "/apps/vpub/releases", {"image": "vpub:latest"})
    assert r.status_code == 404, r.text
    r = world.call(world.mallory_org, "GET", "/apps/vpub/machines")
    assert r.status_code == 404, r.text
    r = world.call(world.mallory_org, "POST", "/tokens", {"kind": "deploy", "app": "vpub"})
    assert r.status_code == 404, r.text
    assert world.call(world.admin, "GET", "/apps/vpub").json()["public"] is True


def test_a_public_app_shows_no_image_of_a_private_one(world: World) -> None:
    """A digest is looked up in the public app's repository only, never in every repository."""
    missing = "sha256:" + "0" * 64
    for reference in (world.image_digest, f"vpub@{world.image_digest}"):
        foreign = world.call(None, "GET", f"/apps/vpub/images/{reference}")
        absent = world.call(
            None, "GET", f"/apps/vpub/images/{reference.replace(world.image_digest, missing)}"
        )
        assert foreign.status_code == 404, foreign.text
        assert _answer(foreign, world.image_digest) == _answer(absent, missing)
    r = world.call(None, "GET", f"/apps/vpub/images/vapp@{world.image_digest}")
    assert r.status_code == 404, r.text
    assert world.call(world.victim_org, "GET", f"/apps/vapp/images/{world.image_digest}").ok


@pytest.mark.parametrize(
    ("kind", "method", "path", "body"),
    [
        ("deploy", "POST", "/tokens", {"kind": "deploy", "app": "mapp"}),
        ("deploy", "POST", "/tokens", {"kind": "org"}),
        ("readonly", "POST", "/tokens", {"kind": "readonly"}),
        ("deploy", "GET", "/tokens", None),
        ("readonly", "GET", "/tokens", None),
        ("deploy", "POST", "/apps", {"name": "deployer-app"}),
        ("readonly", "POST", "/apps", {"name": "reader-app"}),
        ("deploy", "PATCH", "/apps/mapp", {"public": True}),
        ("readonly", "PATCH", "/apps/mapp", {"public": True}),
        ("readonly", "POST", "/apps/mapp/releases", {"image": "mapp:latest"}),
        ("deploy", "POST", "/orgs", {"name": "deployer-org"}),
        ("org", "POST", "/orgs", {"name": "mallory-two"}),
        ("org", "GET", "/replication", None),
        ("deploy", "GET", "/agent/machines", None),
        ("readonly", "GET", "/agent/machines", None),
    ],
)
def test_a_token_kind_does_no_more_than_it_may(
    world: World, kind: str, method: str, path: str, body: Any
) -> None:
    secret = world.mallory()
    r = world.call(secret[kind], method, path, body)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"


def test_no_token_creates_an_admin_token(world: World) -> None:
    for secret in (world.mallory_org, world.admin):
        r = world.call(secret, "POST", "/tokens", {"kind": "admin"})
        assert r.status_code == 400, r.text
        assert "admin tokens are not created" in r.json()["error"]["message"]
    kinds = [t["kind"] for t in world.call(world.admin, "GET", "/tokens").json()["tokens"]]
    assert kinds.count("admin") == 1


def test_readonly_and_deploy_tokens_revoke_only_themselves(world: World) -> None:
    r = world.call(world.victim_ro, "DELETE", f"/tokens/{world.victim_deploy_id}")
    assert r.status_code == 403, r.text
    assert world.call(world.victim_deploy, "GET", "/whoami").status_code == 200
    r = world.call(world.victim_ro, "POST", f"/machines/{world.machine_id}/stop")
    assert r.status_code == 403, r.text


def test_a_deploy_token_revokes_itself_and_is_then_refused_everywhere(world: World) -> None:
    r = world.call(world.mallory_org, "POST", "/tokens", {"kind": "deploy", "app": "mapp"})
    assert r.status_code == 201, r.text
    secret, token_id = r.json()["secret"], r.json()["id"]
    assert world.call(secret, "DELETE", f"/tokens/{token_id}").status_code == 200
    for method, path in (("GET", "/whoami"), ("GET", "/apps/mapp"), ("GET", "/agent/machines")):
        r = world.call(secret, method, path)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/agent/machines"),
        ("POST", "/agent/machines/{}/state"),
        ("POST", "/agent/machines/{}/logs"),
        ("POST", "/machines/{}/stop"),
        ("GET", "/whoami"),
        ("GET", "/tokens"),
        ("GET", "/replication"),
    ],
)
def test_anonymous_callers_reach_no_agent_or_user_route(
    world: World, method: str, path: str
) -> None:
    r = world.call(None, method, path.format(world.machine_id), raw=b'{"state": "failed"}')
    assert r.status_code == 401, r.text


def test_the_last_admin_token_is_never_revoked(world: World) -> None:
    me = world.call(world.admin, "GET", "/whoami").json()
    r = world.call(world.admin, "DELETE", f"/tokens/{me['id']}")
    assert r.status_code == 409, r.text
    r = world.call(world.mallory_org, "DELETE", f"/tokens/{me['id']}")
    assert r.status_code == 404, r.text
    assert world.call(world.admin, "GET", "/whoami").status_code == 200


def test_no_route_answers_a_token_in_the_url_or_a_secret(world: World) -> None:
    listed = world.call(world.victim_org, "GET", "/tokens").text
    assert world.victim_org not in listed and world.victim_deploy not in listed
    assert "secret" not in listed


BAD_BODIES: list[tuple[str, str, Any]] = [
    # wrong JSON types where msgspec could have coerced
    ("POST", "/apps", {"name": "x1", "public": 1}),
    ("POST", "/apps", {"name": "x1", "public": "true"}),
    ("POST", "/apps", {"name": "x1", "generate_name": 1}),
    ("POST", "/apps", {"name": {"nested": "object"}}),
    ("POST", "/apps", {"name": ["x1"]}),
    ("POST", "/apps", {"name": 12}),
    ("PATCH", "/apps/mapp", {"public": None}),
    ("PATCH", "/apps/mapp", {"public": 0}),
    ("PATCH", "/apps/mapp", {"regions": "local"}),
    ("PATCH", "/apps/mapp", {"regions": [1]}),
    ("PATCH", "/apps/mapp", {"replicate_ahead": "yes"}),
    ("POST", "/tokens", {"kind": "org", "expiry": True}),
    ("POST", "/tokens", {"kind": "org", "expiry": 10**400}),
    ("POST", "/tokens", {"kind": "org", "expiry": "9" * 5000}),
    ("POST", "/tokens", {"kind": "org", "expiry": "9" * 5000 + "s"}),
    ("POST", "/tokens", {"kind": "org", "expiry": "\u00b2"}),
    ("POST", "/tokens", {"kind": "org", "expiry": -1}),
    ("POST", "/tokens", {"kind": "org", "expiry": {"h": 1}}),
    ("POST", "/tokens", {"kind": "org", "name": 5}),
    ("POST", "/tokens", {"kind": "org", "name": "x" * 101}),
    ("POST", "/tokens", {"kind": "org", "name": "tab\there"}),
    ("POST", "/tokens", {"kind": ["org"]}),
    ("POST", "/tokens", {"kind": "org", "org": 1}),
    ("POST", "/tokens", {"kind": "org", "app": "mapp"}),
    ("POST", "/tokens", {}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": True}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": 2.0}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": 10**30}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": 2**63}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": -(2**63) - 1}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "count": 0}),
    (
        "POST",
        "/apps/mapp/releases",
        {"image": "mapp:latest", "regions": [f"r{i}" for i in range(5000)]},
    ),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "regions": [{"a": 1}]}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "strategy": 1}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "image_label": "a" * 200}),
    ("POST", "/apps/mapp/releases", {"image": ["mapp:latest"]}),
    ("POST", "/apps/mapp/releases", {"image": "x" * 60000}),
    ("POST", "/apps/mapp/releases", {"image": "mapp:latest", "unknown": 1}),
    ("POST", "/orgs", {"name": "x", "extra": 1}),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_BODIES)
def test_a_bad_body_is_a_400_never_coerced_nor_a_500(
    world: World, method: str, path: str, body: Any
) -> None:
    secret = world.admin if path == "/orgs" else world.mallory_org
    r = world.call(secret, method, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"


def test_duplicate_keys_are_read_as_one_value(world: World) -> None:
    raw = b'{"public": true, "public": "no"}'
    r = world.call(world.mallory_org, "PATCH", "/apps/mapp", raw=raw)
    assert r.status_code == 400, r.text
    raw = b'{"kind": "admin", "kind": "admin"}'
    r = world.call(world.mallory_org, "POST", "/tokens", raw=raw)
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    ("kind", "method", "path", "status"),
    [
        ("org", "POST", "/orgs", 403),
        ("deploy", "POST", "/apps", 403),
        ("readonly", "POST", "/tokens", 403),
        ("readonly", "PATCH", "/apps/mapp", 403),
        ("org", "PATCH", "/apps/vapp", 404),
        ("org", "POST", "/agent/machines/{machine}/state", 404),
        (None, "POST", "/tokens", 401),
        (None, "POST", "/orgs", 401),
        (None, "PATCH", "/apps/vapp", 401),
    ],
)
@pytest.mark.parametrize("body", [b"{" * 10 + b"not json", b"x" * (64 * 1024 + 10)])
def test_a_refused_caller_is_refused_whatever_body_it_sends(
    world: World, kind: str | None, method: str, path: str, status: int, body: bytes
) -> None:
    secret = world.mallory()
    caller = None if kind is None else secret[kind]
    r = world.call(caller, method, path.format(machine=world.machine_id), raw=body)
    assert r.status_code == status, r.text


def test_the_openapi_document_shows_nothing_internal(world: World) -> None:
    r = world.call(None, "GET", "/openapi.json")
    assert r.status_code == 200
    # The media type of Trivy-shaped reports is skyreg's own vendor type, not a module path,
    # and webhook event types are reverse-DNS CloudEvents types (dev.skyreg.image.pushed).
    text = r.text.replace(TRIVY_MEDIA_TYPE, "application/vnd.x").replace("dev.skyreg.", "dev.x.")
    for internal in (
        "skyreg.",
        "secret_sha256",
        "sha256_hex",
        "TokenRecord",
        "sqlalchemy",
        str(world.reg.data_dir),
        "/work/",
        "Traceback",
        world.admin,
    ):
        assert internal not in text, internal
    doc = r.json()
    assert not any("secret" in name for name in doc["components"]["schemas"]["Token"]["properties"])


def test_an_apps_images_are_listed_a_bounded_page_at_a_time(world: World) -> None:
    """Listing every tag at once let one tenant's thousands of tags (of a public app: for
    anyone's requests) hold the event loop for seconds; pages are bounded and follow a cursor."""
    with authed(world.mallory_org) as session:
        image = push_image(world.reg.url, "mapp/paged", "t0", session=session)
        for i in range(1, 5):
            r = put_manifest(world.reg.url, "mapp/paged", f"t{i}", image.manifest, session=session)
            assert r.status_code == 201, r.text
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        r = world.call(world.mallory_org, "GET", f"/apps/mapp/images?limit=2&cursor={cursor}")
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["images"]) <= 2
        seen += [f"{i['repository']}:{i['tag']}" for i in page["images"]]
        if "next_cursor" not in page:
            break
        cursor = page["next_cursor"]
    assert seen == ["mapp:latest"] + [f"mapp/paged:t{i}" for i in range(5)]
    assert {
        i["size"]
        for i in world.call(world.mallory_org, "GET", "/apps/mapp/images?limit=1000").json()[
            "images"
        ]
        if i["repository"] == "mapp/paged"
    } == {len(image.manifest) + len(image.config) + sum(len(x) for x in image.layers)}
    for bad in ("limit=0", "limit=1001", "limit=-1", "limit=x", "cursor=nocolon", "cursor=:t"):
        r = world.call(world.mallory_org, "GET", f"/apps/mapp/images?{bad}")
        assert r.status_code == 400, (bad, r.text)
    # Another org's private app stays a 404 whatever the paging asks.
    for query in ("", "?limit=0", "?cursor=vapp:latest"):
        foreign = world.call(world.mallory_org, "GET", f"/apps/vapp/images{query}")
        absent = world.call(world.mallory_org, "GET", f"/apps/nope/images{query}")
        assert _answer(foreign, "vapp") == _answer(absent, "nope")
