"""The services in-process on a real SQLite database, built as `server/process.py` builds them:
who sees and may change what (other orgs' resources are NotFound exactly like missing ones,
admin sees all, public apps are visible to anyone), the domain errors, and one database hop
per call."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from skyreg.auth.keys import KeyRing
from skyreg.auth.service import Authenticator
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import PlatformMeta, ReleaseMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci.digest import Digest
from skyreg.oci.manifest import parse_manifest
from skyreg.services.apps import AppService
from skyreg.services.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    ServiceError,
    Unauthenticated,
)
from skyreg.services.images import ImageService
from skyreg.services.inputs import (
    CreateApp,
    CreateOrg,
    CreateToken,
    LogLines,
    StateReport,
    UpdateApp,
)
from skyreg.services.machines import MachineService
from skyreg.services.orgs import OrgService
from skyreg.services.releases import DeployLimits, DeployRequest, ReleaseService
from skyreg.services.tokens import TokenService
from tests.support.oci import OCI_MANIFEST, image_manifest, sha256

T = TypeVar("T")


def run(work: Awaitable[T]) -> T:
    async def main() -> T:
        return await work

    return asyncio.run(main())


def refused(kind: type[ServiceError], work: Awaitable[Any]) -> ServiceError:
    with pytest.raises(kind) as caught:
        run(work)
    return caught.value


@dataclass
class World:
    meta: RegistryMeta
    auth: Authenticator
    orgs: OrgService
    apps: AppService
    tokens: TokenService
    images: ImageService
    machines: MachineService
    releases: ReleaseService
    admin: TokenRecord
    acme_org: TokenRecord  # org token of acme (apps web, site)
    acme_deploy: TokenRecord  # deploy token of web
    acme_readonly: TokenRecord
    other_org: TokenRecord  # org token of other (app theirs)
    machine: str = ""  # a machine of web

    def token(self, kind: str, org: str | None = None, app: str | None = None) -> TokenRecord:
        platform = self.auth.platform
        org_row = platform.get_org(org) if org else None
        app_row = platform.get_app(app) if app else None
        return self.auth.create_token(
            kind,
            org_id=None if org_row is None else org_row.id,
            app_id=None if app_row is None else app_row.id,
        )[1]

    def push(self, repo: str, tag: str) -> str:
        blobs = [json.dumps({"os": "linux", "n": os.urandom(8).hex()}).encode(), os.urandom(64)]
        for blob in blobs:
            self.meta.link_blob(repo, sha256(blob), len(blob))
        raw = image_manifest(blobs[0], blobs[1:])
        self.meta.put_manifest(
            repo, parse_manifest(raw, OCI_MANIFEST, Digest.parse(sha256(raw))), [tag]
        )
        return sha256(raw)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    meta = open_database(None, tmp_path)
    platform = PlatformMeta(meta.db)
    auth = Authenticator(
        platform, KeyRing(meta.db, legacy_dir=tmp_path / "keys"), service="registry.test"
    )
    releases = ReleaseService(
        registry=meta,
        releases=ReleaseMeta(meta.db),
        machines=MachineMeta(meta.db),
        platform=platform,
        policy=auth.policy,
        public_host="registry.test",
        limits=DeployLimits(per_region=5, per_release=8, per_app=10, regions=3),
    )
    acme, other = platform.create_org("acme"), platform.create_org("other")
    for app, org in (("web", acme), ("site", acme), ("theirs", other)):
        platform.create_app(app, org.id)
    admin = auth.create_token("admin")[1]
    web = platform.get_app("web")
    assert web is not None
    w = World(
        meta,
        auth,
        OrgService(platform),
        AppService(platform),
        TokenService(auth),
        ImageService(platform, meta),
        MachineService(releases.machines, platform, auth.policy, releases.limits),
        releases,
        admin=admin,
        acme_org=auth.create_token("org", org_id=acme.id)[1],
        acme_deploy=auth.create_token("deploy", org_id=acme.id, app_id=web.id)[1],
        acme_readonly=auth.create_token("readonly", org_id=acme.id)[1],
        other_org=auth.create_token("org", org_id=other.id)[1],
    )
    try:
        w.push("web", "v1")
        w.push("theirs", "v1")
        run(w.releases.deploy(DeployRequest(app="web", image="web:v1", token=w.admin)))
        page = run(w.machines.list_machines(w.admin, "web", 10, None))
        w.machine = page.machines[0][0].id
        yield w
    finally:
        meta.close()


def test_other_orgs_resources_are_not_found_exactly_like_missing_ones(world: World) -> None:
    w, them = world, world.other_org
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda app: w.apps.get_app(them, app),
        lambda app: w.apps.update_app(them, app, UpdateApp(public=True)),
        lambda app: w.images.list_images(them, app),
        lambda app: w.images.show_image(them, app, "v1"),
        lambda app: w.releases.list_releases(them, app, 10),
        lambda app: w.machines.list_machines(them, app, 10, None),
        lambda app: w.machines.app_logs(them, app, 0),
        lambda app: w.tokens.create_token(them, lambda: CreateToken(kind="deploy", app=app)),
    ]
    for call in calls:
        foreign = refused(NotFound, call("web"))
        missing = refused(NotFound, call("nowhere"))
        assert foreign.reason.replace("web", "X") == missing.reason.replace("nowhere", "X")
    for org in ("acme", "nowhere"):
        assert isinstance(refused(NotFound, w.apps.list_apps(them, org)), NotFound)
        refused(NotFound, w.tokens.list_tokens(them, org))
    for call in (
        w.machines.change(them, w.machine, "stop"),
        w.machines.report_state(them, w.machine, lambda: StateReport(state="started")),
    ):
        refused(NotFound, call)
    refused(NotFound, w.tokens.revoke_token(them, w.acme_deploy.id))
    assert run(w.tokens.revoke_token(w.acme_org, w.acme_deploy.id)).revoked_at is not None


def test_an_admin_sees_everything_and_others_their_own_org(world: World) -> None:
    w = world
    assert {o.name for o in run(w.orgs.list_orgs(w.admin))} == {"acme", "other"}
    assert {a.name for a in run(w.apps.list_apps(w.admin, None))} == {"web", "site", "theirs"}
    assert {a.name for a in run(w.apps.list_apps(w.admin, "other"))} == {"theirs"}
    for token in (w.acme_org, w.acme_deploy, w.acme_readonly):
        assert [o.name for o in run(w.orgs.list_orgs(token))] == ["acme"]
        assert {a.name for a in run(w.apps.list_apps(token, None))} == {"web", "site"}
    kinds = {t.kind for t in run(w.tokens.list_tokens(w.admin, None))}
    assert kinds == {"admin", "org", "deploy", "readonly"}
    assert {t.org_name for t in run(w.tokens.list_tokens(w.acme_org, None))} == {"acme"}
    app, tags = run(w.images.list_images(w.admin, "theirs"))
    assert (app.name, [t.tag for t in tags]) == ("theirs", ["v1"])


def test_public_apps_are_visible_to_anyone_and_changed_only_by_their_org(world: World) -> None:
    w = world
    assert isinstance(refused(Unauthenticated, w.apps.get_app(None, "web")), Unauthenticated)
    refused(Unauthenticated, w.images.list_images(None, "web"))
    refused(Forbidden, w.apps.update_app(w.acme_deploy, "web", UpdateApp(public=True)))
    assert run(w.apps.update_app(w.acme_org, "web", UpdateApp(public=True))).app.public
    assert run(w.apps.get_app(None, "web")).app.public
    assert run(w.apps.get_app(w.other_org, "web")).app.name == "web"
    assert [t.tag for t in run(w.images.list_images(None, "web"))[1]] == ["v1"]
    refused(Forbidden, w.apps.update_app(w.other_org, "web", UpdateApp(public=False)))
    # Public is for reading: releases and machines stay the org's.
    refused(NotFound, w.releases.list_releases(w.other_org, "web", 10))
    refused(NotFound, w.machines.list_machines(w.other_org, "web", 10, None))


def test_what_each_token_kind_may_do(world: World) -> None:
    w = world
    for token in (w.acme_org, w.acme_deploy, w.acme_readonly):
        refused(Forbidden, w.orgs.create_org(token, CreateOrg(name="new")))
    for token in (w.acme_deploy, w.acme_readonly):
        refused(Forbidden, w.apps.create_app(token, CreateApp(name="new")))
        refused(Forbidden, w.tokens.list_tokens(token, None))
        refused(Forbidden, w.machines.agent_machines(token, None, 10, None))
    refused(Forbidden, w.machines.change(w.acme_readonly, w.machine, "stop"))
    assert run(w.machines.change(w.acme_deploy, w.machine, "stop")).desired == "stopped"
    refused(Forbidden, w.tokens.revoke_token(w.acme_readonly, w.acme_deploy.id))
    assert not run(w.tokens.revoke_token(w.acme_readonly, w.acme_readonly.id)).active()
    created = run(w.apps.create_app(w.acme_org, CreateApp(generate_name=True, public=True)))
    assert created.org_name == "acme" and created.public
    refused(Invalid, w.apps.create_app(w.admin, CreateApp(name="orphan")))  # admin: org needed
    refused(Invalid, w.apps.create_app(w.acme_org, CreateApp(name="Not-A-Label")))
    refused(Invalid, w.tokens.create_token(w.acme_org, lambda: CreateToken(kind="admin")))


def test_refused_callers_are_refused_before_their_body_is_read(world: World) -> None:
    """Bodies are read when a service asks: a caller refused earlier never has its body read
    (the API then answers 403/404 for a request whose body is too large or malformed)."""
    w = world

    def never() -> Any:
        raise AssertionError("the body was asked for")

    refused(Forbidden, w.tokens.create_token(w.acme_readonly, never))
    refused(
        NotFound, w.tokens.create_token(w.other_org, lambda: CreateToken(kind="deploy", app="web"))
    )
    refused(NotFound, w.machines.report_state(w.admin, "0f", never))
    refused(NotFound, w.machines.add_logs(w.other_org, w.machine, never))
    refused(Forbidden, w.machines.add_event(w.acme_deploy, w.machine, never))
    run(w.machines.add_logs(w.acme_org, w.machine, lambda: LogLines(lines=["hello"])))
    assert [ln.line for ln in run(w.machines.app_logs(w.acme_readonly, "web", 0))[1]] == ["hello"]


def test_names_taken_and_the_last_admin_token_are_conflicts(world: World) -> None:
    w = world
    refused(Conflict, w.orgs.create_org(w.admin, CreateOrg(name="acme")))
    refused(Conflict, w.apps.create_app(w.other_org, CreateApp(name="web")))  # names are global
    refused(Conflict, w.tokens.revoke_token(w.admin, w.admin.id))
    second = w.auth.create_token("admin")[1]
    assert not run(w.tokens.revoke_token(second, w.admin.id)).active()
    refused(Conflict, w.tokens.revoke_token(second, second.id))


def test_each_call_is_at_most_one_hop_to_a_database_thread(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request costs the caller's identification and one service call: the service does
    its queries in one hop (`Database.run`), or none on SQLite when it only reads a little."""
    w = world
    db = w.meta.db
    hops: list[str] = []
    original = db.run

    async def counted(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(db, "run", counted)
    web_token = CreateToken(kind="readonly", org="acme")
    calls: list[tuple[Awaitable[Any], int]] = [
        (w.orgs.list_orgs(w.admin), 0),
        (w.orgs.create_org(w.admin, CreateOrg(name="fresh")), 1),
        (w.apps.list_apps(w.acme_org, None), 0),
        (w.apps.create_app(w.acme_org, CreateApp(name="another")), 1),
        (w.apps.get_app(w.acme_org, "web"), 0),
        (w.apps.update_app(w.acme_org, "web", UpdateApp(public=True)), 1),
        (w.images.list_images(w.acme_org, "web"), 1),  # a heavy read: on a thread
        (w.images.show_image(w.acme_org, "web", "v1"), 0),
        (w.tokens.list_tokens(w.acme_org, None), 0),
        (w.tokens.create_token(w.acme_org, lambda: web_token), 1),
        (w.releases.list_releases(w.acme_org, "web", 10), 0),
        (w.releases.deploy(DeployRequest(app="web", image="web:v1", token=w.acme_org)), 1),
        (w.machines.list_machines(w.acme_org, "web", 10, None), 0),
        (w.machines.change(w.acme_org, w.machine, "restart"), 1),
        (w.machines.agent_machines(w.acme_org, None, 10, None), 0),
        (w.machines.report_state(w.acme_org, w.machine, lambda: StateReport(state="started")), 1),
        (w.machines.add_logs(w.acme_org, w.machine, lambda: LogLines(lines=["x"])), 1),
        (w.machines.app_logs(w.acme_org, "web", 0), 0),
    ]
    for work, expected in calls:
        hops.clear()
        run(work)
        assert len(hops) == expected, hops
