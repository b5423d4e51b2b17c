"""The console's releases and machines pages in Debian's Chromium: acme's app `shop` gets two
releases of pushed images; an agent token of acme reports its first machine's state, health,
events and log lines through /api/v1/agent/ (real data through the real API, no host needed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.support.browser import Browser
from tests.support.console import ConsoleSite
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed
from tests.support.waiting import wait_for


@dataclass
class Shop:
    """acme's app `shop`: release v1 (machine `running`, started and healthy) and v2 (machine
    `fresh`, never reported by an agent)."""

    v1: dict[str, Any]
    v2: dict[str, Any]
    running: str
    fresh: str
    agent: str  # an agent token of acme

    def post(self, site: ConsoleSite, path: str, body: dict[str, Any], status: int) -> None:
        answer(api(site.server, "POST", f"/agent/machines/{path}", self.agent, json=body), status)


def _deploy(site: ConsoleSite, tag: str, description: str) -> dict[str, Any]:
    push_image(site.url, "shop", tag, session=authed(site.acme))
    body = {
        "image": f"{site.server.host}/shop:{tag}",
        "description": description,
        "service": {"internal_port": 8080, "checks": [{"type": "http", "path": "/healthz"}]},
    }
    return dict(answer(api(site.server, "POST", "/apps/shop/releases", site.acme, json=body), 201))


def _machines(site: ConsoleSite) -> list[dict[str, Any]]:
    return list(answer(api(site.server, "GET", "/apps/shop/machines", site.acme), 200)["machines"])


@pytest.fixture(scope="module")
def shop(site: ConsoleSite) -> Shop:
    agent, _ = site.tenancy.token("agent", org="acme")
    v1 = _deploy(site, "v1", "first cut")
    (running,) = [m["id"] for m in _machines(site)]
    shop = Shop(v1, {}, running, "", agent)
    shop.post(site, f"{running}/events", {"message": "image unpacked", "duration_ms": 1234}, 201)
    shop.post(site, f"{running}/state", {"state": "starting"}, 200)
    shop.post(site, f"{running}/state", {"state": "started", "address": "127.0.0.1"}, 200)
    shop.post(site, f"{running}/health", {"status": "passing"}, 200)
    lines = ["listening on :8080", "GET /healthz 200", "<b>not bold</b>"]
    shop.post(site, f"{running}/logs", {"lines": lines}, 201)
    shop.v2 = _deploy(site, "v2", "second cut")
    (shop.fresh,) = [m["id"] for m in _machines(site) if m["id"] != running]
    return shop


def _audit(site: ConsoleSite) -> list[dict[str, Any]]:
    return list(answer(api(site.server, "GET", "/orgs/acme/audit", site.admin), 200)["entries"])


def test_releases_page_lists_versions_newest_first_with_image_author_and_reason(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.acme, then="/apps/shop/releases")
    assert browser.path == "/apps/shop/releases"
    assert browser.find("h1").text == "shop"
    assert browser.find(".tabs a[aria-current=page]").text == "Releases"
    assert [a.text for a in browser.find_all(".crumbs a")] == [
        "Organizations", "acme", "shop", "Releases",
    ]  # fmt: skip
    rows = browser.rows("table.releases")
    assert [row[0] for row in rows] == ["v2", "v1"]
    v2, v1 = rows
    assert v1[1] == "complete"  # its one machine started and passes its checks
    assert v2[1] == "running"  # its machine is not ready yet
    assert f"{site.server.host}/shop:v1" in v1[2] and shop.v1["image_digest"][:19] in v1[2]
    assert f"{site.server.host}/shop:v2" in v2[2]
    assert v1[3] == shop.v1["user"]["name"]
    assert v1[4].endswith(" UTC") and v1[4][:10] == shop.v1["created_at"][:10]
    assert v1[5] == "deploy" and v1[6] == "first cut" and v2[6] == "second cut"
    assert "2 in all" in browser.text("main")
    browser.screenshot("releases")
    browser.fill("#q", "second")
    browser.submit("form.search button")
    assert [row[0] for row in browser.rows("table.releases")] == ["v2"]


def test_machines_page_shows_state_region_health_release_and_image_and_searches(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.acme, then="/apps/shop/machines")
    assert browser.find(".tabs a[aria-current=page]").text == "Machines"
    rows = {row[0]: row for row in browser.rows("table.machines")}
    assert set(rows) == {shop.running, shop.fresh}
    running = rows[shop.running]
    assert running[1:6] == ["started", "local", "passing", "v1", f"{site.server.host}/shop:v1"]
    assert running[6].endswith(" UTC")
    fresh = rows[shop.fresh]
    assert fresh[1].startswith("created") and fresh[3] == "not reported yet"
    assert fresh[4:6] == ["v2", f"{site.server.host}/shop:v2"]
    browser.screenshot("machines")
    browser.fill("#q", "created")
    browser.submit("form.search button")
    assert [row[0] for row in browser.rows("table.machines")] == [shop.fresh]
    browser.fill("#q", shop.running[:10])
    browser.submit("form.search button")
    assert [row[0] for row in browser.rows("table.machines")] == [shop.running]
    browser.submit(f"table.machines a[href='/machines/{shop.running}']")
    assert browser.path == f"/machines/{shop.running}"


def test_machine_page_shows_facts_checks_events_and_log_tail(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.acme, then=f"/machines/{shop.running}")
    assert browser.find("h1").text == f"Machine {shop.running}"
    facts = browser.text("dl.facts")
    for expected in ("State\nstarted", "Region\nlocal", "Health\npassing", "Address\n127.0.0.1"):
        assert expected in facts, facts
    assert "v1 (complete)" in facts and f"{site.server.host}/shop:v1" in facts
    (check,) = browser.rows("table.checks")
    assert check[:3] == ["http", "8080", "/healthz"]
    assert all(cell.endswith(" s") for cell in check[3:])
    events = browser.rows("table.events")
    assert ["image unpacked", "1234 ms"] in [row[1:] for row in events]
    logs = browser.text("pre.logs")
    assert "listening on :8080" in logs and "GET /healthz 200" in logs
    assert "<b>not bold</b>" in logs  # text, not markup
    live = browser.find("[data-live-url]")
    assert live.get_attribute("data-live-url") == f"/machines/{shop.running}/logs"
    assert live.get_attribute("data-live-every") == "2"
    assert browser.find("a[href$='#logs']").text == "Refresh"
    assert browser.find("#machine-stop").text == "Stop"
    browser.screenshot("machine")


def test_the_log_tail_follows_new_lines_in_the_browser(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.acme, then=f"/machines/{shop.running}")
    assert "a line reported later" not in browser.text("pre.logs")
    shop.post(site, f"{shop.running}/logs", {"lines": ["a line reported later"]}, 201)
    wait_for(
        lambda: "a line reported later" in browser.text(".live-logs"),
        "the new log line on the page",
        timeout=30,
    )
    assert "listening on :8080" in browser.text(".live-logs")
    browser.screenshot("machine-logs-followed")


def test_the_log_tail_holds_the_newest_lines_of_the_machine_only(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    shop.post(site, f"{shop.running}/logs", {"lines": ["from the other machine"]}, 201)
    shop.post(site, f"{shop.fresh}/logs", {"lines": [f"line {i}" for i in range(250)]}, 201)
    browser.sign_in(site.acme, then=f"/machines/{shop.fresh}")
    lines = browser.text("pre.logs").splitlines()
    assert len(lines) == 200
    assert lines[-1].endswith("line 249") and lines[0].endswith("line 50")
    assert "from the other machine" not in browser.text("pre.logs")


def test_the_log_tail_is_found_past_many_pages_of_every_apps_log(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    # Line ids are shared by all apps: bravo's lines leave gaps in shop's, and fresh's noise
    # fills pages of shop's log between two lines of the running machine.
    push_image(site.url, "bank", "v1", session=authed(site.bravo))
    body = {"image": f"{site.server.host}/bank:v1"}
    answer(api(site.server, "POST", "/apps/bank/releases", site.bravo, json=body), 201)
    machines = answer(api(site.server, "GET", "/apps/bank/machines", site.bravo), 200)
    bank = machines["machines"][0]["id"]
    bravo_agent, _ = site.tenancy.token("agent", org="bravo")
    bank_lines = {"lines": [f"bank {i}" for i in range(1500)]}
    answer(
        api(site.server, "POST", f"/agent/machines/{bank}/logs", bravo_agent, json=bank_lines), 201
    )
    shop.post(site, f"{shop.running}/logs", {"lines": ["before the noise"]}, 201)
    for batch in range(3):
        noise = {"lines": [f"noise {batch}.{i}" for i in range(900)]}
        shop.post(site, f"{shop.fresh}/logs", noise, 201)
        answer(
            api(site.server, "POST", f"/agent/machines/{bank}/logs", bravo_agent, json=bank_lines),
            201,
        )
    shop.post(site, f"{shop.running}/logs", {"lines": ["after the noise"]}, 201)
    browser.sign_in(site.acme, then=f"/machines/{shop.running}")
    lines = browser.text("pre.logs").splitlines()
    assert lines[-1].endswith("after the noise") and lines[-2].endswith("before the noise")
    assert not any("noise " in line or "bank " in line for line in lines)
    browser.get(f"/machines/{shop.fresh}")
    lines = browser.text("pre.logs").splitlines()
    assert (
        len(lines) == 200 and lines[-1].endswith("noise 2.899") and lines[0].endswith("noise 2.700")
    )


def _signed_in(site: ConsoleSite, secret: str) -> requests.Session:
    session = requests.Session()
    form = session.get(site.url + "/signin")
    found = re.search(r'name="form_secret" value="([^"]+)"', form.text)
    assert found is not None
    data = {"form_secret": found.group(1), "token": secret, "next": "/"}
    assert session.post(site.url + "/signin", data=data).status_code == 200
    return session


def test_the_log_fragment_is_html_without_the_layout_and_with_the_consoles_headers(
    site: ConsoleSite, shop: Shop
) -> None:
    fragment = _signed_in(site, site.acme).get(f"{site.url}/machines/{shop.running}/logs")
    assert fragment.status_code == 200
    assert fragment.headers["Content-Type"].startswith("text/html")
    assert fragment.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert fragment.headers["Cache-Control"] == "no-store"
    assert fragment.text.lstrip().startswith('<pre class="logs"')
    assert "<html" not in fragment.text and "Sign out" not in fragment.text
    assert "listening on :8080" in fragment.text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in fragment.text


def test_stop_and_start_buttons_change_the_machine_and_are_audited(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.acme, then=f"/machines/{shop.fresh}")
    browser.submit("#machine-stop")
    assert browser.path == f"/machines/{shop.fresh}"
    assert "(desired stopped)" in browser.text("dl.facts")
    assert browser.find_all("#machine-stop") == []
    assert any(row[1].startswith("Stop requested by") for row in browser.rows("table.events"))
    browser.screenshot("machine-stopped")
    stopped = next(m for m in _machines(site) if m["id"] == shop.fresh)
    assert stopped["desired"] == "stopped"
    entry = [e for e in _audit(site) if e["action"] == "stopMachine"][-1]
    assert entry["target"] == f"POST /api/v1/machines/{shop.fresh}/stop (console)"
    assert entry["actor_id"] == site.acme_id and entry["status"] == 200

    browser.submit("#machine-start")
    assert browser.path == f"/machines/{shop.fresh}"
    assert any(row[1].startswith("Start requested by") for row in browser.rows("table.events"))
    assert browser.find("#machine-stop").text == "Stop"
    started = next(m for m in _machines(site) if m["id"] == shop.fresh)
    assert started["desired"] == "started"
    entry = [e for e in _audit(site) if e["action"] == "startMachine"][-1]
    assert entry["target"] == f"POST /api/v1/machines/{shop.fresh}/start (console)"
    assert entry["actor_id"] == site.acme_id


def test_a_read_only_token_sees_the_machine_without_buttons(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    readonly, _ = site.tenancy.token("readonly", org="acme")
    browser.sign_in(readonly, then=f"/machines/{shop.running}")
    assert "Region\nlocal" in browser.text("dl.facts")
    assert browser.find_all("form[action$='/stop'], form[action$='/start']") == []


def test_a_token_of_bravo_gets_not_found_for_acmes_releases_and_machines(
    site: ConsoleSite, shop: Shop, browser: Browser
) -> None:
    browser.sign_in(site.bravo)
    for path in (
        "/apps/shop/releases",
        "/apps/shop/machines",
        f"/machines/{shop.running}",
        f"/machines/{shop.running}/logs",
    ):
        browser.get(path)
        assert browser.find("h1").text == "Not found", path
        text = browser.text("main")
        assert "shop:v1" not in text and "listening on" not in text and "passing" not in text
    browser.get(f"/machines/{shop.running}")
    browser.screenshot("machine-other-org-not-found")
    # Nor may it stop the machine, with its own valid CSRF token.
    csrf = browser.find("header input[name=csrf]").get_attribute("value")
    status = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0], {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/x-www-form-urlencoded'},
          body: 'csrf=' + encodeURIComponent(arguments[1])}).then(r => done(r.status));""",
        f"/machines/{shop.running}/stop",
        csrf,
    )
    assert status == 404
    running = next(m for m in _machines(site) if m["id"] == shop.running)
    assert running["desired"] == "started"
