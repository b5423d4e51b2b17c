"""`GET /machines/{id}` and `GET /machines/{id}/logs` (after / tail): one machine and its own log
lines, for the org that owns it only; lines reported by an agent token through /agent/."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.inprocess import InProcessRegistry
from tests.support.oci import push_image
from tests.support.platform import Tenancy, answer, api, authed, refused


@dataclass
class Fleet:
    server: InProcessRegistry
    acme: str
    bravo: str
    first: str  # two machines of acme's app `shop`
    second: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = InProcessRegistry(data_dir=tmp_path_factory.mktemp("reads") / "data")
    server.start()
    try:
        t = Tenancy(server.data_dir)
        t.org("acme")
        t.org("bravo")
        t.app("shop", "acme")
        acme, _ = t.token("org", org="acme")
        bravo, _ = t.token("org", org="bravo")
        agent, _ = t.token("agent", org="acme")
        push_image(server.url, "shop", "v1", session=authed(acme))
        body = {"image": f"{server.host}/shop:v1", "regions": ["local"], "count": 2}
        answer(api(server, "POST", "/apps/shop/releases", acme, json=body), 201)
        machines = answer(api(server, "GET", "/apps/shop/machines", acme), 200)["machines"]
        first, second = sorted(m["id"] for m in machines)
        for n in range(3):  # interleaved: 30 lines of each machine
            for machine in (first, second):
                lines = [f"{machine} line {n * 10 + i}" for i in range(10)]
                path = f"/agent/machines/{machine}/logs"
                answer(api(server, "POST", path, agent, json={"lines": lines}), 201)
        yield Fleet(server, acme, bravo, first, second)
    finally:
        server.stop()


def test_a_machine_is_shown_with_its_events_to_its_org(fleet: Fleet) -> None:
    got = answer(api(fleet.server, "GET", f"/machines/{fleet.first}", fleet.acme), 200)
    assert got["id"] == fleet.first and got["app"] == "shop" and got["region"] == "local"
    assert isinstance(got["events"], list)


def test_another_orgs_machine_answers_as_a_missing_one(fleet: Fleet) -> None:
    for path in (f"/machines/{fleet.first}", f"/machines/{fleet.first}/logs?tail=5"):
        message = refused(api(fleet.server, "GET", path, fleet.bravo), 404, "not_found")
        missing = refused(
            api(fleet.server, "GET", path.replace(fleet.first, "0" * 32), fleet.bravo),
            404,
            "not_found",
        )
        assert message.replace(fleet.first, "X") == missing.replace("0" * 32, "X")


def test_the_tail_holds_the_machines_own_last_lines_oldest_first(fleet: Fleet) -> None:
    got = answer(
        api(fleet.server, "GET", f"/machines/{fleet.second}/logs?tail=12", fleet.acme), 200
    )
    assert [ln["line"] for ln in got["lines"]] == [
        f"{fleet.second} line {i}" for i in range(18, 30)
    ]
    assert {ln["machine_id"] for ln in got["lines"]} == {fleet.second}
    assert got["last"] == got["lines"][-1]["id"]


def test_following_after_the_last_line_reads_only_newer_lines(fleet: Fleet) -> None:
    first_page = answer(api(fleet.server, "GET", f"/machines/{fleet.first}/logs", fleet.acme), 200)
    assert len(first_page["lines"]) == 30
    middle = first_page["lines"][14]["id"]
    rest = answer(
        api(fleet.server, "GET", f"/machines/{fleet.first}/logs?after={middle}", fleet.acme), 200
    )
    assert [ln["line"] for ln in rest["lines"]] == [
        f"{fleet.first} line {i}" for i in range(15, 30)
    ]


@pytest.mark.parametrize("tail", ["0", "1001", "-1", "x"])
def test_a_tail_out_of_bounds_is_refused(fleet: Fleet, tail: str) -> None:
    path = f"/machines/{fleet.first}/logs?tail={tail}"
    refused(api(fleet.server, "GET", path, fleet.acme), 400, "bad_request")
