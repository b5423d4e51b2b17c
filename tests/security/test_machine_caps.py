"""A deploy creates only a bounded number of machines, in regions that exist; listings page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from skyreg.machines.agent import Agent
from skyreg.services.releases import DeployLimits
from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, cli_env, run_skyreg
from tests.support.servers import ServedRegistry

PER_REGION, PER_RELEASE, PER_APP, MAX_REGIONS = 40, 60, 100, 3


@dataclass
class Server:
    reg: ServedRegistry
    admin: str
    deploy_token: str
    image: str  # app:tag of a pushed image

    def deploy(self, app: str = "caps", **body: Any) -> requests.Response:
        return requests.post(
            f"{self.reg.url}/api/v1/apps/{app}/releases",
            json={"image": self.image, **body},
            auth=("x", self.deploy_token),
        )

    def machines(self, app: str = "caps", **query: str) -> requests.Response:
        return requests.get(
            f"{self.reg.url}/api/v1/apps/{app}/machines", params=query, auth=("x", self.admin)
        )


@contextlib.contextmanager
def _serving(top: Path, apps: list[str], **options: object) -> Iterator[Server]:
    reg = InProcessRegistry(data_dir=top / "data", options=options)
    reg.start()
    try:
        t = Tenancy(reg.data_dir)
        t.org("acme")
        for app in apps:
            t.app(app, "acme")
        admin = t.admin_secret()
        session = requests.Session()
        session.auth = ("x", admin)
        push_image(reg.url, apps[0], "v1", session=session)
        token = t.token("org", org="acme")[0]
        yield Server(reg, admin, token, f"{apps[0]}:v1")
    finally:
        reg.stop()


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Server]:
    """A single-region server (region `local`) with small caps."""
    limits = DeployLimits(per_region=PER_REGION, per_release=PER_RELEASE, per_app=PER_APP)
    with _serving(tmp_path, ["caps", "other"], deploy_limits=limits) as server:
        yield server


@pytest.fixture
def multi(tmp_path: Path) -> Iterator[Server]:
    """A node of region iad in a registry of four regions, with small caps."""
    regions = {code: {"url": f"http://127.0.0.1:{9}"} for code in ("iad", "sin", "syd", "ams")}
    (tmp_path / "regions.json").write_text(json.dumps({"regions": regions}))
    limits = DeployLimits(
        per_region=PER_REGION, per_release=PER_RELEASE, per_app=PER_APP, regions=MAX_REGIONS
    )
    with _serving(
        tmp_path,
        ["caps"],
        region="iad",
        regions_file=tmp_path / "regions.json",
        deploy_limits=limits,
    ) as server:
        yield server


def _refused(r: requests.Response, *words: str) -> None:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    for word in words:
        assert word in message, message


def test_thousand_invented_regions_are_refused_and_create_nothing(single: Server) -> None:
    regions = [f"r{i:04d}" for i in range(1000)]
    _refused(single.deploy(regions=regions, count=100))
    assert single.machines().json()["machines"] == []
    assert (
        requests.get(
            f"{single.reg.url}/api/v1/apps/caps/releases", auth=("x", single.admin)
        ).json()["releases"]
        == []
    )


def test_unknown_region_is_named_in_the_refusal(single: Server) -> None:
    _refused(single.deploy(regions=["local", "iad"]), "'iad'")
    ok = single.deploy(regions=["local"])
    assert ok.status_code == 201, ok.text
    assert ok.json()["regions"] == ["local"]


def test_unknown_region_of_a_multi_region_registry_is_refused(multi: Server) -> None:
    _refused(multi.deploy(regions=["iad", "fra"]), "'fra'")
    ok = multi.deploy(regions=["iad", "sin"], count=2)
    assert ok.status_code == 201, ok.text


def test_count_per_region_is_capped(single: Server) -> None:
    _refused(single.deploy(count=PER_REGION + 1), str(PER_REGION))
    assert single.deploy(count=PER_REGION).status_code == 201


def test_regions_per_release_are_capped(multi: Server) -> None:
    _refused(multi.deploy(regions=["iad", "sin", "syd", "ams"]), str(MAX_REGIONS))


def test_machines_per_release_are_capped(multi: Server) -> None:
    # 3 regions x 21 = 63 > 60 machines in one release
    _refused(multi.deploy(regions=["iad", "sin", "syd"], count=21), str(PER_RELEASE))
    assert multi.deploy(regions=["iad", "sin", "syd"], count=20).status_code == 201


def test_live_machines_per_app_are_capped(single: Server) -> None:
    # Rolling deploys keep the previous machines until the new ones start: they all count.
    assert single.deploy(count=PER_REGION).status_code == 201
    assert single.deploy(count=PER_REGION).status_code == 201
    _refused(single.deploy(count=PER_REGION), str(PER_APP))
    # An immediate deploy stops the others at once: only its own machines stay live.
    assert single.deploy(count=PER_REGION, strategy="immediate").status_code == 201
    assert single.deploy(count=PER_REGION).status_code == 201
    # Another app has its own allowance.
    other = requests.post(
        f"{single.reg.url}/api/v1/apps/other/releases",
        json={"image": single.image, "count": PER_REGION},
        auth=("x", single.deploy_token),
    )
    assert other.status_code == 201, other.text


def test_machine_listing_pages_with_a_cursor(single: Server) -> None:
    for _ in range(3):
        assert single.deploy(count=3).status_code == 201
    everything = single.machines(limit="1000").json()
    assert len(everything["machines"]) == 9 and everything["next_cursor"] is None
    seen: list[str] = []
    query = {"limit": "4"}
    pages = 0
    while True:
        page = single.machines(**query).json()
        assert len(page["machines"]) <= 4
        seen += [m["id"] for m in page["machines"]]
        pages += 1
        if page["next_cursor"] is None:
            break
        query = {"limit": "4", "cursor": page["next_cursor"]}
    assert pages == 3
    assert seen == [m["id"] for m in everything["machines"]]
    for bad in ({"limit": "0"}, {"limit": "100000"}, {"limit": "x"}):
        assert single.machines(**bad).status_code == 400


def test_cli_machines_list_follows_pages(single: Server, tmp_path: Path) -> None:
    # 160 machines (80 of them live): more than one page of the CLI's and the server's
    for count, strategy in ((40, "rolling"), (40, "rolling"), (40, "immediate"), (40, "rolling")):
        assert single.deploy(count=count, strategy=strategy).status_code == 201
    env = cli_env(tmp_path, single.reg.url, single.admin)
    found = json.loads(run_skyreg(env, "machines", "list", "--app", "caps", "--json"))
    assert len({m["id"] for m in found}) == len(found) == 160


def test_agent_list_pages_and_the_agent_follows_them(single: Server, tmp_path: Path) -> None:
    for _ in range(3):
        assert single.deploy(count=3).status_code == 201
    url = f"{single.reg.url}/api/v1/agent/machines"
    auth = ("x", single.admin)
    page = requests.get(url, params={"region": "local", "limit": "4"}, auth=auth).json()
    assert len(page["machines"]) == 4 and page["next_cursor"]
    assert requests.get(url, params={"limit": "100000"}, auth=auth).status_code == 400
    every = requests.get(url, params={"region": "local"}, auth=auth).json()["machines"]
    # The first deploy's 3, then one of each rolling deploy's (the others wait their turn).
    assert len(every) == 5

    agent = Agent(
        server=single.reg.url, token=single.admin, region="local", data_dir=tmp_path, page_size=2
    )

    async def fetch() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            agent._session = session
            return await agent.fetch_wanted()

    found = asyncio.run(fetch())
    assert [m["id"] for m in found] == [m["id"] for m in every]


TIGHT = 3  # --max-machines-per-app of the `tight` server: 30 idle machines kept, 60 records


@pytest.fixture
def tight(tmp_path: Path) -> Iterator[Server]:
    """A single-region server whose apps may have 3 live machines."""
    with _serving(tmp_path, ["caps"], deploy_limits=DeployLimits(per_app=TIGHT)) as server:
        yield server


def _post(server: Server, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(
        f"{server.reg.url}/api/v1/{path}", json=body or {}, auth=("x", server.deploy_token)
    )


def _all_machines(server: Server) -> list[dict[str, Any]]:
    found = server.machines(limit="1000").json()
    assert found["next_cursor"] is None
    return list(found["machines"])


def _live(server: Server) -> list[str]:
    return [m["id"] for m in _all_machines(server) if m["desired"] == "started"]


def _report(server: Server, machine_id: str, state: str) -> None:
    r = requests.post(
        f"{server.reg.url}/api/v1/agent/machines/{machine_id}/state",
        json={"state": state},
        auth=("x", server.admin),
    )
    assert r.status_code == 200, r.text


def _immediate_deploys(server: Server, n: int) -> None:
    for _ in range(n):
        r = server.deploy(count=TIGHT, strategy="immediate")
        assert r.status_code == 201, r.text


def test_start_and_restart_of_stopped_machines_cannot_exceed_the_live_cap(tight: Server) -> None:
    _immediate_deploys(tight, 5)
    machines = _all_machines(tight)
    assert len(machines) == 5 * TIGHT
    live = _live(tight)
    assert len(live) == TIGHT
    for m in machines:
        if m["id"] in live:
            continue
        for action in ("start", "restart"):
            r = _post(tight, f"machines/{m['id']}/{action}")
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "bad_request"
            assert f"limit of {TIGHT}" in error["message"], error
    assert sorted(_live(tight)) == sorted(live)
    # Stopping one makes room for exactly one other.
    assert _post(tight, f"machines/{live[0]}/stop").status_code == 200
    stopped = [m["id"] for m in machines if m["id"] not in live]
    assert _post(tight, f"machines/{stopped[0]}/start").status_code == 200
    assert _post(tight, f"machines/{stopped[1]}/restart").status_code == 400
    assert len(_live(tight)) == TIGHT


def test_restart_or_start_of_a_live_machine_is_allowed_at_the_cap(tight: Server) -> None:
    _immediate_deploys(tight, 2)
    live = _live(tight)
    assert len(live) == TIGHT
    _report(tight, live[0], "started")
    _report(tight, live[1], "failed")  # fails the release: its machines are stopped
    _immediate_deploys(tight, 1)
    live = _live(tight)
    _report(tight, live[0], "started")
    for action in ("restart", "start"):
        for machine_id in live:
            r = _post(tight, f"machines/{machine_id}/{action}")
            assert r.status_code == 200, r.text
            assert r.json()["desired"] == "started"
    generations = {m["id"]: m["generation"] for m in _all_machines(tight)}
    # Restart bumps every generation; start bumps only the ones not running.
    assert generations[live[0]] == 2
    assert generations[live[1]] == generations[live[2]] == 3
    assert sorted(_live(tight)) == sorted(live)


def _db_rows(server: Server, table: str, machine_ids: list[str]) -> int:
    from sqlalchemy import func, select

    from skyreg.meta import schema
    from skyreg.meta.registry import open_database

    meta = open_database(None, server.reg.data_dir)
    try:
        t = schema.metadata.tables[table]
        column = t.c.id if table == "machines" else t.c.machine_id
        with meta.engine.connect() as conn:
            query = select(func.count()).select_from(t).where(column.in_(machine_ids))
            return int(conn.execute(query).scalar_one())
    finally:
        meta.close()


def test_idle_machines_beyond_the_kept_number_are_deleted_with_events_and_logs(
    tight: Server,
) -> None:
    kept = 10 * TIGHT
    _immediate_deploys(tight, 1)
    first = [m["id"] for m in _all_machines(tight)]
    for machine_id in first:
        _report(tight, machine_id, "starting")
        _post_agent(tight, machine_id, "events", {"message": "Pulling container image"})
        _post_agent(tight, machine_id, "logs", {"lines": ["hello", "world"]})
    _report(tight, first[0], "stopped")
    _report(tight, first[1], "failed")
    # first[2] stays `starting`: an agent may be running it, so it is kept whatever its age.
    # A deploy deletes before it stops the previous release: these leave 2 + 27 idle machines
    # (the last two releases' are live, then stopped by the next one but not yet counted).
    _immediate_deploys(tight, kept // TIGHT + 1)
    assert len(_all_machines(tight)) == kept + 2 * TIGHT
    assert _db_rows(tight, "machine_logs", first) == 6
    _immediate_deploys(tight, 1)  # now 32 idle: the 2 oldest go
    remaining = {m["id"] for m in _all_machines(tight)}
    assert first[2] in remaining
    assert first[0] not in remaining and first[1] not in remaining
    assert len(remaining) == 1 + kept + 2 * TIGHT
    assert _db_rows(tight, "machines", first[:2]) == 0
    assert _db_rows(tight, "machine_events", first[:2]) == 0
    assert _db_rows(tight, "machine_logs", first[:2]) == 0
    assert _db_rows(tight, "machine_logs", first[2:]) == 2
    # A log line an agent sends late for a deleted machine is a 404, not a 500.
    late = _post_agent(tight, first[0], "logs", {"lines": ["late"]}, expect=404)
    assert late["error"]["code"] == "not_found"


def _post_agent(
    server: Server, machine_id: str, what: str, body: dict[str, Any], expect: int = 201
) -> Any:
    r = requests.post(
        f"{server.reg.url}/api/v1/agent/machines/{machine_id}/{what}",
        json=body,
        auth=("x", server.admin),
    )
    assert r.status_code == expect, r.text
    return r.json()


def test_machine_records_of_an_app_are_capped(tight: Server) -> None:
    records = 20 * TIGHT
    # Machines an agent reports running are never deleted, even once desired stopped.
    for _ in range(records // TIGHT):
        _immediate_deploys(tight, 1)
        for machine_id in _live(tight):
            _report(tight, machine_id, "started")
    assert len(_all_machines(tight)) == records
    refused = tight.deploy(count=TIGHT, strategy="immediate")
    assert refused.status_code == 400, refused.text
    assert "machine records" in refused.json()["error"]["message"]
    assert len(_all_machines(tight)) == records
    # Once the agent reports them stopped they may go, and deploys work again.
    for m in _all_machines(tight):
        if m["desired"] == "stopped":
            _report(tight, m["id"], "stopped")
    ok = tight.deploy(count=TIGHT, strategy="immediate")
    assert ok.status_code == 201, ok.text
    assert len(_all_machines(tight)) <= 10 * TIGHT + 2 * TIGHT


@pytest.fixture(params=["postgresql", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'skyreg.db'}"


def test_concurrent_starts_never_exceed_the_live_cap(db_url: str, tmp_path: Path) -> None:
    from skyreg.meta.db import create_db_engine
    from skyreg.meta.machines import MachineMeta, TooManyMachines
    from skyreg.meta.platform import PlatformMeta, ReleaseMeta
    from skyreg.meta.registry import open_database

    registry = open_database(db_url, tmp_path)  # migrates
    platform = PlatformMeta(create_db_engine(db_url))
    releases = ReleaseMeta(create_db_engine(db_url))
    stores = [MachineMeta(create_db_engine(db_url)) for _ in range(3)]
    try:
        platform.create_app("web", platform.create_org("acme").id)
        app = platform.get_app("web")
        assert app is not None

        def deploy(count: int, strategy: str, keep_idle: int | None = None) -> list[str]:
            release = releases.create_release(
                app_id=app.id,
                status="pending",
                description="d",
                reason="deploy",
                image_ref="h/web:t",
                image_repository="web",
                image_digest="sha256:" + "0" * 64,
                strategy=strategy,
                regions=["local"],
                machine_count=count,
                user_id="t",
                user_name="token",
            )
            return stores[0].create_for_release(
                release.id, app.id, ["local"], count, strategy, max_live=TIGHT, keep_idle=keep_idle
            )

        old = deploy(3, "rolling")
        deploy(2, "immediate")  # old ones stopped: 2 live, room for 1
        barrier = threading.Barrier(len(old))

        def start(i: int) -> str:
            barrier.wait()
            try:
                stores[i].start(old[i], bump=True, max_live=TIGHT)
                return "started"
            except TooManyMachines:
                return "refused"

        with ThreadPoolExecutor(len(old)) as pool:
            outcomes = sorted(pool.map(start, range(len(old))))
        assert outcomes == ["refused", "refused", "started"]
        assert stores[0].live_count(app.id) == TIGHT
        # The two still stopped (`created`: idle) go, with their logs, when a deploy keeps none.
        idle = [m for m in old if (got := stores[0].get(m)) and got.desired == "stopped"]
        assert len(idle) == 2
        for machine_id in idle:
            stores[1].add_logs(machine_id, ["bye"])
        with pytest.raises(TooManyMachines):  # over the live cap: nothing is deleted either
            deploy(1, "rolling")
        assert all(stores[0].get(m) is not None for m in idle)
        stores[2].set_desired(old[[m not in idle for m in old].index(True)], "stopped")
        deploy(1, "rolling", keep_idle=0)
        assert all(stores[0].get(m) is None for m in old)
        stores[1].add_logs(idle[0], ["late"])  # a late agent report: dropped, not an error
        stores[1].add_event(idle[0], "late")
    finally:
        for store in (platform, releases, *stores, registry):
            store.close()
