"""Rolling deploys that follow machines' health, in the metadata layer on every database: which
old machine a step stops (its region first, the oldest first), and a newer deploy superseding
the machines a rolling one still holds waiting."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from skyreg.meta.machines import Machine, MachineMeta
from skyreg.meta.platform import PlatformMeta, ReleaseMeta
from skyreg.meta.registry import RegistryMeta, open_database
from tests.support.meta import DATABASES, link_blobs, manifest_of

CHECKED = {"internal_port": 80, "checks": [{"type": "tcp", "port": 80, "path": None,
           "interval": 10.0, "timeout": 2.0, "grace_period": 5.0}]}  # fmt: skip


@dataclass
class Stores:
    releases: ReleaseMeta
    machines: MachineMeta
    app_id: int
    digest: str


@pytest.fixture(params=sorted(DATABASES))
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    meta: RegistryMeta = open_database(DATABASES[request.param](request, tmp_path), tmp_path)
    platform = PlatformMeta(meta.db)
    org = platform.create_org("acme")
    platform.create_app("web", org.id)
    app = platform.get_app("web")
    assert app is not None
    link_blobs(meta, "web", b"config", b"layer")
    image = manifest_of(b"config", [b"layer"])
    meta.put_manifest("web", image, ["v1"])
    found = Stores(ReleaseMeta(meta.db), MachineMeta(meta.db), app.id, str(image.digest))
    yield found
    found.releases.close()
    found.machines.close()
    platform.close()
    meta.close()


def deploy(st: Stores, regions: list[str], count: int, strategy: str = "rolling") -> list[str]:
    release = st.releases.create_release(
        app_id=st.app_id,
        status="pending",
        description="d",
        reason="deploy",
        image_ref=f"h/web@{st.digest}",
        image_repository="web",
        image_digest=st.digest,
        strategy=strategy,
        regions=regions,
        machine_count=count,
        user_id="u",
        user_name="u",
        service=CHECKED,
    )
    st.machines.create_for_release(release.id, st.app_id, regions, count, strategy)
    return [m.id for m in st.machines.of_app(st.app_id) if m.release_id == release.id]


def ready(st: Stores, machine_id: str) -> None:
    st.machines.report_state(machine_id, "starting", None, "10.0.0.1")
    st.machines.report_state(machine_id, "started", None)
    assert st.machines.report_health(machine_id, "passing", None) is True


def of(st: Stores, ids: list[str]) -> list[Machine]:
    found = {m.id: m for m in st.machines.of_app(st.app_id)}
    return [found[i] for i in ids]


def test_a_step_stops_an_old_machine_of_the_next_ones_region_first(stores: Stores) -> None:
    st = stores
    old = deploy(st, ["ams", "iad"], 2)
    for mid in old:
        ready(st, mid)
    old_ams = [m.id for m in of(st, old) if m.region == "ams"]
    new = deploy(st, ["ams", "iad"], 2)
    by_region = {m.id: m.region for m in of(st, new)}
    assert [m.desired for m in of(st, new)] == ["started", "waiting", "waiting", "waiting"]

    ready(st, new[0])
    after = of(st, old)
    stopped = [m for m in after if m.desired == "stopped"]
    assert len(stopped) == 1
    assert stopped[0].region == by_region[new[1]]  # the region of the machine started next
    if by_region[new[1]] == "ams":
        assert stopped[0].id == old_ams[0]  # the oldest of that region
    assert [m.desired for m in of(st, new)] == ["started", "started", "waiting", "waiting"]


def test_a_newer_deploy_supersedes_machines_still_waiting(stores: Stores) -> None:
    st = stores
    for mid in deploy(st, ["ams"], 1):
        ready(st, mid)
    rolling = deploy(st, ["ams"], 3)
    assert [m.desired for m in of(st, rolling)] == ["started", "waiting", "waiting"]
    deploy(st, ["ams"], 1, strategy="immediate")
    assert [m.desired for m in of(st, rolling)] == ["stopped", "stopped", "stopped"]
    assert st.machines.live_count(st.app_id) == 1
