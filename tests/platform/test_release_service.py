"""`ReleaseService.deploy` in-process, on a real SQLite database: what a deploy records and
creates, each domain error it refuses with (nothing recorded), and a source manifest that
disappears between the deploy's lookup and its copy."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from skyreg.auth.policy import AccessPolicy
from skyreg.auth.secrets import new_token_id, secret_sha256
from skyreg.meta.machines import MachineMeta
from skyreg.meta.platform import PlatformMeta, Release, ReleaseMeta, TokenRecord
from skyreg.meta.registry import RegistryMeta, open_database
from skyreg.oci.digest import Digest
from skyreg.oci.manifest import parse_manifest
from skyreg.services.errors import Forbidden, Invalid, LimitExceeded, NotFound, ServiceError
from skyreg.services.releases import DeployLimits, DeployRequest, ReleaseService
from tests.support.oci import (
    OCI_LAYER,
    OCI_MANIFEST,
    descriptor,
    image_manifest,
    sha256,
)

HOST = "registry.test:5000"


class DeletedBeforeCopy(RegistryMeta):
    """A registry where a concurrent DELETE of the source manifest lands after the deploy read
    it and before it copies it (the deploy's lookup and copy are separate transactions)."""

    def copy_manifest(self, source: str, digest: str, target: str, tag: str) -> bool:
        assert self.delete_manifest(source, digest)
        return super().copy_manifest(source, digest, target, tag)


class RacedMachines(MachineMeta):
    """Machines whose live count is read before a concurrent deploy of the same app commits
    its machines: the deploy's own check passes, the re-check under the app's row must not."""

    def live_count(self, app_id: int) -> int:
        return 0


def _token(platform: PlatformMeta, kind: str, org: str | None, app: str | None) -> TokenRecord:
    org_row = platform.get_org(org) if org else None
    app_row = platform.get_app(app) if app else None
    return platform.create_token(
        token_id=new_token_id(),
        name=kind,
        kind=kind,
        secret_sha256=secret_sha256(os.urandom(16).hex()),
        org_id=None if org_row is None else org_row.id,
        app_id=None if app_row is None else app_row.id,
        expires_at=None,
    )


@dataclass
class World:
    meta: RegistryMeta
    service: ReleaseService
    admin: TokenRecord
    deploy2: TokenRecord  # deploy token of app2 (org acme)
    deploy1: TokenRecord  # deploy token of app1 (org acme)
    build: str = ""  # digest of app1:build-1

    @property
    def platform(self) -> PlatformMeta:
        return self.service.platform

    @property
    def releases(self) -> ReleaseMeta:
        return self.service.releases

    @property
    def machines(self) -> MachineMeta:
        return self.service.machines

    def push(self, repo: str, tag: str, layers: int = 2, foreign: bool = False) -> str:
        """Link a config and layers to `repo` and put an image manifest tagged `tag`; with
        `foreign`, one more layer named only by its `urls` (never linked anywhere)."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
        blobs = [config.encode(), *(os.urandom(512) for _ in range(layers))]
        for blob in blobs:
            self.meta.link_blob(repo, sha256(blob), len(blob))
        raw = image_manifest(blobs[0], blobs[1:])
        if foreign:
            doc = json.loads(raw)
            absent = os.urandom(512)
            doc["layers"].append(descriptor(OCI_LAYER, absent, urls=["https://example.invalid/"]))
            raw = json.dumps(doc).encode()
        manifest = parse_manifest(raw, OCI_MANIFEST, Digest.parse(sha256(raw)))
        self.meta.put_manifest(repo, manifest, [tag])
        return sha256(raw)

    def app_id(self, name: str) -> int:
        app = self.platform.get_app(name)
        assert app is not None
        return app.id

    def release_statuses(self, app: str) -> list[str]:
        return [r.status for r in self.releases.list_releases(self.app_id(app), 1000)]

    def deploy(self, image: str = "app1:build-1", **fields: Any) -> Release:
        """Deploy `image` to app2 with app2's deploy token (unless `fields` say otherwise)."""
        fields.setdefault("token", self.deploy2)
        request = DeployRequest(app=fields.pop("app", "app2"), image=image, **fields)
        return asyncio.run(self.service.deploy(request))


def _world(
    tmp_path: Path,
    registry: type[RegistryMeta] = RegistryMeta,
    machines: type[MachineMeta] = MachineMeta,
) -> World:
    meta = open_database(None, tmp_path)
    platform = PlatformMeta(meta.db)
    service = ReleaseService(
        registry=meta if registry is RegistryMeta else registry(meta.db),
        releases=ReleaseMeta(meta.db),
        machines=machines(meta.db),
        platform=platform,
        policy=AccessPolicy(platform),
        public_host=HOST,
        limits=DeployLimits(per_region=5, per_release=8, per_app=10, regions=3),
    )
    acme, other = platform.create_org("acme"), platform.create_org("other")
    for app, org in (("app1", acme), ("app2", acme), ("foreign", other)):
        platform.create_app(app, org.id)
    world = World(
        meta,
        service,
        admin=_token(platform, "admin", None, None),
        deploy2=_token(platform, "deploy", "acme", "app2"),
        deploy1=_token(platform, "deploy", "acme", "app1"),
    )
    world.build = world.push("app1", "build-1")
    world.push("foreign", "v1")
    return world


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = _world(tmp_path)
    try:
        yield w
    finally:
        w.meta.close()


def test_deploy_from_another_app_pins_the_digest_tags_it_records_and_creates_machines(
    world: World,
) -> None:
    release = world.deploy("elsewhere:1/app1:build-1", count=2)  # a host in front is ignored
    assert release.image_digest == world.build
    assert release.image_repository == "app2"
    assert release.image_ref.startswith(f"{HOST}/app2:deployment-")
    tag = release.image_ref.rsplit(":", 1)[1]
    tagged = world.meta.get_manifest("app2", tag, by_digest=False)
    assert tagged is not None and tagged.digest == world.build
    assert world.service.unavailable_blobs("app2", world.build, "app2") == []  # blobs linked
    assert release.status == "running" and release.version == 1
    assert release.regions == ("local",) and release.machine_count == 2
    assert release.user_id == world.deploy2.id
    assert release.description == f"Deploy image {release.image_ref}"
    machines = world.machines.of_app(world.app_id("app2"))
    assert [(m.release_id, m.desired, m.region) for m in machines] == [
        (release.id, "started", "local")
    ] * 2
    assert world.release_statuses("app2") == ["running"]


def test_deploy_of_the_apps_own_image_references_it_without_a_copy(world: World) -> None:
    by_tag = world.deploy(app="app1", token=world.deploy1)
    assert by_tag.image_ref == f"{HOST}/app1:build-1"
    by_digest = world.deploy(f"app1@{world.build}", app="app1", token=world.deploy1)
    assert by_digest.image_ref == f"{HOST}/app1@{world.build}"
    assert by_digest.version == by_tag.version + 1
    assert world.meta.list_tags("app1", None, None) == ["build-1"]


def test_label_names_the_tag(world: World) -> None:
    release = world.deploy(f"app1@{world.build}", token=world.admin, label="v42")
    assert release.image_ref == f"{HOST}/app2:v42"
    tagged = world.meta.get_manifest("app2", "v42", by_digest=False)
    assert tagged is not None and tagged.digest == world.build


@pytest.mark.parametrize(
    ("fields", "error", "reason"),
    [
        ({"app": "nope"}, NotFound, "app 'nope' not found"),
        ({"app": "foreign"}, NotFound, "app 'foreign' not found"),  # another org's: as if missing
        ({"token": "deploy1"}, Forbidden, "this token may not deploy app app2"),
        ({"image": ""}, Invalid, "image is required: REPOSITORY[:TAG] or REPOSITORY@DIGEST"),
        ({"image": "app1:bad tag!"}, Invalid, "image 'app1:bad tag!': "),
        ({"label": "-no"}, Invalid, "image_label must be a valid tag"),
        ({"strategy": "canary"}, Invalid, "strategy must be one of rolling, immediate"),
        ({"regions": ("NOT A REGION",)}, Invalid, "regions must be a list of region codes"),
        ({"regions": ("iad", "sin", "syd", "ams")}, LimitExceeded, "a release may name at most 3"),
        ({"count": 0}, Invalid, "count must be a whole number from 1 to 5"),
        ({"count": 6}, LimitExceeded, "count must be a whole number from 1 to 5"),
        ({"regions": ("local", "iad")}, Invalid, "unknown region 'iad'"),
        ({"image": "app1:nope"}, NotFound, "image 'app1:nope' not found"),
        ({"image": "foreign:v1"}, NotFound, "image 'foreign:v1' not found"),  # not pullable
    ],
)
def test_deploy_refuses_with_a_domain_error_and_records_nothing(
    world: World, fields: dict[str, Any], error: type[ServiceError], reason: str
) -> None:
    if "token" in fields:
        fields = {**fields, "token": getattr(world, fields["token"])}
    with pytest.raises(ServiceError) as raised:
        world.deploy(**fields)
    assert type(raised.value) is error
    assert raised.value.reason.startswith(reason), raised.value.reason
    for app in ("app1", "app2"):
        assert world.release_statuses(app) == []
        assert world.machines.of_app(world.app_id(app)) == []
    assert world.meta.list_tags("app2", None, None) == []


def test_machines_per_release_are_bounded(world: World) -> None:
    world.service.limits = DeployLimits(per_region=5, per_release=4)
    with pytest.raises(LimitExceeded) as raised:
        world.deploy(count=5)
    assert raised.value.reason == (
        "5 machines in each of 1 regions is 5, over the limit of 4 machines per release"
    )
    assert raised.value.limit == 4
    assert world.release_statuses("app2") == []


def test_live_machines_per_app_are_bounded_and_an_immediate_deploy_counts_its_own(
    world: World,
) -> None:
    world.deploy(count=5)
    world.deploy(count=5)  # rolling: 10 live
    with pytest.raises(LimitExceeded) as raised:
        world.deploy(count=1)
    assert raised.value.reason == (
        "app app2 has 10 live machines; 1 more would exceed its limit of 10 "
        "(an immediate deploy stops the others first)"
    )
    world.deploy(count=5, strategy="immediate")
    assert world.machines.live_count(world.app_id("app2")) == 5
    assert world.release_statuses("app2") == ["running"] * 3


def test_a_deploy_losing_the_race_for_the_last_machines_is_recorded_failed(
    tmp_path: Path,
) -> None:
    world = _world(tmp_path, machines=RacedMachines)
    try:
        world.deploy(count=5)
        world.deploy(count=5)
        with pytest.raises(LimitExceeded) as raised:
            world.deploy(count=1)
        assert raised.value.reason == (
            "app app2: the app has 10 live machines; 1 more would exceed its limit of 10"
        )
        assert world.release_statuses("app2") == ["failed", "running", "running"]
    finally:
        world.meta.close()


def test_a_blob_the_app_would_not_hold_is_refused_by_digest(world: World) -> None:
    digest = world.push("app1", "foreign-layer", foreign=True)
    with pytest.raises(Invalid) as raised:
        world.deploy("app1:foreign-layer")
    assert raised.value.reason.startswith("blob sha256:")
    assert "is not in repository app2: push every layer" in raised.value.reason
    assert world.meta.get_manifest("app2", digest, by_digest=True) is None
    assert world.release_statuses("app2") == []


def test_a_source_manifest_deleted_before_the_copy_records_nothing_and_stops_nothing(
    tmp_path: Path,
) -> None:
    world = _world(tmp_path, registry=DeletedBeforeCopy)
    try:
        own = world.push("app2", "running")
        running = world.deploy(f"app2@{own}")
        with pytest.raises(NotFound) as raised:
            world.deploy(strategy="immediate")
        assert raised.value.reason == "image 'app1:build-1' not found"
        assert world.release_statuses("app2") == ["running"]
        machines = world.machines.of_app(world.app_id("app2"))
        assert [(m.release_id, m.desired) for m in machines] == [(running.id, "started")]
        assert world.meta.list_tags("app2", None, None) == ["running"]
    finally:
        world.meta.close()
