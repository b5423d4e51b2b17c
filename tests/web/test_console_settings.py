"""An org's settings in the console — tokens (secret shown once), webhooks and their delivery log,
the audit log, storage and quota — and replication status: in Debian's Chromium, against a real
server, with images pushed by a real HTTP client and webhooks delivered to a receiver here."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from selenium.webdriver.support.select import Select

from skyreg.units import human_size
from tests.support.browser import Browser
from tests.support.console import ConsoleSite, console_site
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed
from tests.support.regions import Regions
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleSite]:
    """conftest's site, on a server that lets webhooks reach a receiver on 127.0.0.1 (the
    shared fixture's server refuses private targets, as a server does by default)."""
    data_dir = tmp_path_factory.mktemp("console-settings") / "data"
    with console_site(data_dir, webhook_allow_private=True, webhook_retry_base=0.05) as made:
        yield made


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every request (signature header, body)."""

    port: int = 0
    received: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self, secret: str) -> list[dict[str, Any]]:
        """The CloudEvents received whose signature verifies with `secret` (all must)."""
        found = []
        for signature, body in list(self.received):
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(signature, expected), "a delivery's signature is wrong"
            found.append(json.loads(body))
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.received.append((self.headers.get("X-Skyreg-Signature", ""), body))
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"received")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _session_of(browser: Browser) -> requests.Session:
    """A requests session holding the browser's console cookie (not the token)."""
    session = requests.Session()
    session.cookies.set("skyreg_session", str(browser.cookies()["skyreg_session"]["value"]))
    return session


def _csrf_of(session: requests.Session, url: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', session.get(url).text)
    assert found is not None
    return found.group(1)


def _tokens(site: ConsoleSite, org: str) -> list[dict[str, Any]]:
    return list(answer(api(site.server, "GET", f"/tokens?org={org}", site.admin), 200)["tokens"])


def _row_of(browser: Browser, css: str, needle: str) -> list[str]:
    rows = [row for row in browser.rows(css) if any(needle in cell for cell in row)]
    assert len(rows) == 1, (needle, browser.rows(css))
    return rows[0]


def _create_token_by_form(browser: Browser, name: str, kind: str, app: str, expiry: str) -> None:
    browser.get("/orgs/acme/tokens")
    browser.fill("#token-name", name)
    Select(browser.find("#token-kind")).select_by_value(kind)
    Select(browser.find("#token-app")).select_by_value(app)
    browser.fill("#token-expiry", expiry)
    browser.submit("#create-token button[type=submit]")


def test_a_new_tokens_secret_is_shown_once_and_works_until_revoked(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/tokens")
    assert browser.path == "/orgs/acme/tokens"
    assert browser.find("h1").text == "Tokens of acme"
    assert browser.find(".tabs a[aria-current=page]").text == "Tokens"
    browser.screenshot("settings-tokens")

    _create_token_by_form(browser, "ci-deploy", "deploy", "shop", "720h")
    assert browser.path == "/orgs/acme/tokens"  # the POST's own answer: no redirect, no URL
    notice = browser.text("#created-token")
    assert "it will not be shown again" in notice and "app shop" in notice
    secret = browser.find("#new-secret").get_attribute("value")
    assert secret and browser.find("button.copy-button[data-copy=new-secret]").text == "Copy"
    assert secret not in browser.path
    row = _row_of(browser, "#tokens", "ci-deploy")
    assert row[1:3] == ["deploy", "shop"] and row[4] != "never" and row[5] == "active"
    assert secret not in " ".join(row)
    browser.screenshot("settings-token-created")

    # The secret works against the API as the new token.
    me = answer(api(site.server, "GET", "/whoami", secret), 200)
    assert (me["name"], me["kind"], me["app"], me["org"]) == ("ci-deploy", "deploy", "shop", "acme")

    # Back, and the list loaded again: the secret is in neither.
    browser.driver.back()
    assert browser.path == "/orgs/acme/tokens"
    assert secret not in browser.driver.page_source
    browser.get("/orgs/acme/tokens")
    assert secret not in browser.driver.page_source
    assert browser.find_all("#created-token") == []
    assert "ci-deploy" in browser.text("#tokens")

    # Revoking asks first: declining leaves the token working.
    revoke = f"form[action='/orgs/acme/tokens/{me['id']}/revoke'] button"
    browser.submit(revoke, confirm=False)
    assert api(site.server, "GET", "/whoami", secret).status_code == 200
    assert _row_of(browser, "#tokens", "ci-deploy")[5] == "active"
    browser.submit(revoke)
    assert browser.path == "/orgs/acme/tokens"  # 303 back to the list
    assert _row_of(browser, "#tokens", "ci-deploy")[5].startswith("revoked")
    assert api(site.server, "GET", "/whoami", secret).status_code == 401
    browser.screenshot("settings-token-revoked")


def test_a_token_form_with_a_bad_expiry_is_shown_again_with_the_error(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/tokens")
    _create_token_by_form(browser, "bad-expiry", "readonly", "", "soon")
    assert "expiry" in browser.text("#form-error").lower()
    assert browser.find("#token-name").get_attribute("value") == "bad-expiry"
    assert browser.find_all("#created-token") == []
    assert "bad-expiry" not in [t["name"] for t in _tokens(site, "acme")]
    browser.screenshot("settings-token-refused")


def test_a_token_form_without_its_csrf_field_is_refused_and_creates_nothing(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/tokens")
    status, text = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/orgs/acme/tokens', {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/x-www-form-urlencoded'},
          body: 'kind=org&name=sneaky-js'})
          .then(r => r.text().then(t => done([r.status, t])));"""
    )
    assert status == 403 and "CSRF token is missing or wrong" in text
    session = _session_of(browser)
    refused = session.post(
        site.url + "/orgs/acme/tokens",
        data={"kind": "org", "name": "sneaky-requests"},
        headers={"Origin": site.url},
        allow_redirects=False,
    )
    assert refused.status_code == 403 and "CSRF token is missing or wrong" in refused.text
    names = {t["name"] for t in _tokens(site, "acme")}
    assert not names & {"sneaky-js", "sneaky-requests"}
    # The same cookie with the page's CSRF field does create one: only the field was missing.
    made = session.post(
        site.url + "/orgs/acme/tokens",
        data={"kind": "readonly", "name": "with-csrf", "csrf": _csrf_of(session, site.url + "/")},
        headers={"Origin": site.url},
        allow_redirects=False,
    )
    assert made.status_code == 200 and "will not be shown again" in made.text
    assert "with-csrf" in {t["name"] for t in _tokens(site, "acme")}


def _deliveries_text(browser: Browser) -> str:
    return browser.text("#deliveries")


def test_a_webhook_shows_its_secret_once_and_its_delivery_log_after_a_push(
    site: ConsoleSite, browser: Browser, receiver: Receiver
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/webhooks")
    assert browser.find("h1").text == "Webhooks of acme"
    browser.fill("#hook-url", receiver.url)
    Select(browser.find("#hook-app")).select_by_value("shop")
    browser.find("input[name='event:dev.skyreg.image.pushed']").click()
    browser.submit("#create-webhook button[type=submit]")
    assert browser.path == "/orgs/acme/webhooks"
    assert "it will not be shown again" in browser.text("#created-webhook")
    secret = browser.find("#new-secret").get_attribute("value")
    assert secret and secret.startswith("whsec_")
    row = _row_of(browser, "#webhooks", receiver.url)
    assert row[1:3] == ["shop", "dev.skyreg.image.pushed"]
    browser.screenshot("settings-webhook-created")
    browser.get("/orgs/acme/webhooks")
    assert secret not in browser.driver.page_source

    image = push_image(site.url, "shop", "v1", session=authed(site.acme))
    event = wait_for(lambda: receiver.events(secret), "the push's delivery", 30)[0]
    assert event["type"] == "dev.skyreg.image.pushed" and event["data"]["digest"] == image.digest

    browser.submit("#webhooks a[href^='/orgs/acme/webhooks/']")
    assert browser.text("dl.facts").startswith("URL\n" + receiver.url)
    wait_for(lambda: "delivered" in _deliveries_text(browser), "the page to show it delivered", 30)
    [delivered] = browser.rows("#deliveries table")
    assert "dev.skyreg.image.pushed" in delivered[1] and event["id"] in delivered[1]
    assert delivered[2].startswith("delivered") and delivered[3:5] == ["1", "200"]
    assert delivered[5].endswith(" ms") and delivered[6] == "received"
    browser.screenshot("settings-webhook-deliveries")

    hook_path = browser.path
    browser.submit("#deliveries button")  # Redeliver
    assert browser.path == hook_path  # 303 back to the log
    wait_for(lambda: len(receiver.received) == 2, "the redelivery", 30)
    assert [e["id"] for e in receiver.events(secret)] == [event["id"], event["id"]]
    # The log refreshes itself (data-live-url) until it shows both delivered.
    wait_for(
        lambda: _deliveries_text(browser).count("delivered") == 2, "the live log to update", 30
    )
    assert [r[1].count(event["id"]) for r in browser.rows("#deliveries table")] == [1, 1]

    browser.get("/orgs/acme/webhooks")
    browser.submit("#webhooks form[action^='/orgs/acme/webhooks/'] button")  # Delete
    assert browser.path == "/orgs/acme/webhooks"
    assert browser.rows("#webhooks") == [["No webhook."]]


def test_the_audit_page_shows_the_consoles_own_changes_with_their_actor(
    site: ConsoleSite, browser: Browser
) -> None:
    since = datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%S")
    browser.sign_in(site.acme, "/orgs/acme/tokens")
    _create_token_by_form(browser, "audited", "readonly", "", "")
    [made] = [t for t in _tokens(site, "acme") if t["name"] == "audited"]
    browser.submit(f"form[action='/orgs/acme/tokens/{made['id']}/revoke'] button")

    browser.get("/orgs/acme/audit")
    browser.fill("#since", since)
    browser.submit("form[action='/orgs/acme/audit'] button[type=submit]")
    assert browser.path.startswith("/orgs/acme/audit?since=")
    rows = browser.rows("#audit")
    actions = [row[2] for row in rows]
    assert actions[:2] == ["revokeToken", "createToken"]  # newest first
    revoke, create = rows[0], rows[1]
    assert revoke[3] == f"DELETE /api/v1/tokens/{made['id']} (console)"
    assert create[3] == "POST /api/v1/tokens (console)"
    for row in (revoke, create):
        assert "(org)" in row[1] and site.acme_id in row[1]
        assert row[4] == "127.0.0.1"
    assert revoke[5] == "200" and create[5] == "201"
    assert "consoleSignIn" in actions
    assert "Download the log as JSON lines" in browser.text("main")
    browser.screenshot("settings-audit")


def test_the_audit_log_pages_newest_first_to_older_entries(
    site: ConsoleSite, browser: Browser
) -> None:
    for i in range(4):  # two pages of two at least
        body = {"kind": "readonly", "org": "acme", "name": f"paging-{i}"}
        answer(api(site.server, "POST", "/tokens", site.acme, json=body), 201)
    browser.sign_in(site.acme, "/orgs/acme/audit?limit=2")
    # The sign-in is the newest entry, then the four token creations, newest first.
    expected = answer(
        api(site.server, "GET", "/orgs/acme/audit?order=newest&limit=4", site.admin), 200
    )
    targets = [e["target"] for e in expected["entries"]]
    assert [e["action"] for e in expected["entries"]][1:4] == ["createToken"] * 3
    assert [row[3] for row in browser.rows("#audit")] == targets[:2]
    browser.screenshot("settings-audit-page-1")
    browser.submit("a[rel=next]")
    assert "before=" in browser.path and "limit=2" in browser.path
    assert [row[3] for row in browser.rows("#audit")] == targets[2:4]
    assert browser.find("nav.pager a[href='/orgs/acme/audit?limit=2']").text == "Newest entries"
    browser.screenshot("settings-audit-page-2")


def test_the_audit_log_exports_as_json_lines_oldest_first(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/audit")
    link = browser.find("a[download]")
    assert link.get_attribute("href") == site.url + "/orgs/acme/audit/export"
    cookie = browser.cookies()["skyreg_session"]["value"]
    got = requests.get(
        site.url + "/orgs/acme/audit/export", cookies={"skyreg_session": str(cookie)}, timeout=30
    )
    assert got.status_code == 200
    assert got.headers["Content-Type"].startswith("application/x-ndjson")
    assert 'filename="audit-acme.jsonl"' in got.headers["Content-Disposition"]
    exported = [json.loads(line) for line in got.text.splitlines()]
    entries = answer(api(site.server, "GET", "/orgs/acme/audit?limit=1000", site.admin), 200)
    # Everything the API lists, in its order (the export's own sign-in may come after).
    assert exported[: len(entries["entries"])] == entries["entries"]
    assert len(exported) >= 2
    # Another org's export is refused like its page.
    refused_export = requests.get(
        site.url + "/orgs/bravo/audit/export", cookies={"skyreg_session": str(cookie)}, timeout=30
    )
    assert refused_export.status_code == 404
    assert "application/x-ndjson" not in refused_export.headers["Content-Type"]


def test_a_since_the_audit_page_cannot_read_is_explained(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme, "/orgs/acme/audit?since=yesterday")
    assert "must be a date" in browser.text("#filter-error")
    assert browser.find("#since").get_attribute("value") == "yesterday"


def test_usage_shows_the_bytes_a_push_holds_against_the_quota(
    site: ConsoleSite, browser: Browser
) -> None:
    push_image(site.url, "shop", "usage", layers=2, layer_size=50_000, session=authed(site.acme))
    answer(api(site.server, "PUT", "/orgs/acme/quota", site.admin, json={"hard": "1GiB"}), 200)
    policy = {"keep_recent": 5, "keep_tags": ["release-*"]}
    answer(api(site.server, "PUT", "/apps/shop/retention", site.acme, json=policy), 200)
    used = answer(api(site.server, "GET", "/orgs/acme/usage", site.admin), 200)
    assert used["bytes"] > 100_000
    browser.sign_in(site.acme, "/orgs/acme/usage")
    storage = browser.text("#storage")
    assert f"({used['bytes']} bytes in {used['blobs']} unique blobs" in storage
    assert "Hard limit\n1.0 GiB" in storage or "Hard limit\n1 GiB" in storage
    assert "State\nok" in storage
    [shop] = browser.rows("#retention")
    assert shop == [
        "shop",
        "Keeps the 5 most recent tags of each repository; never deletes tags matching release-*.",
        "—",
        "0",
        "0",
    ]
    assert "not available to this token" in browser.text("#gc-unavailable")
    browser.screenshot("settings-usage")

    browser.driver.delete_all_cookies()
    browser.sign_in(site.admin, "/orgs/acme/usage")
    gc = browser.text("#gc")  # the server runs a collector: an admin sees its status
    assert "runs the collector" in gc and "Blob reviews" in gc and "Latest pass" in gc
    assert browser.find_all("#gc-unavailable") == []
    browser.screenshot("settings-usage-admin")


def test_replication_says_there_are_no_regions_and_needs_an_admin(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.admin, "/replication")
    assert browser.find("h1").text == "Replication"
    assert "no regions" in browser.text("#no-regions")
    assert browser.find("header nav a[aria-current=page]").text == "Replication"
    browser.screenshot("settings-replication")
    browser.driver.delete_all_cookies()
    browser.sign_in(site.acme, "/replication")
    assert "not available to this token" in browser.text("#replication-unavailable")
    browser.screenshot("settings-replication-org")


def test_replication_shows_the_queue_and_jobs_of_a_registry_with_regions(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    regions = Regions.on_free_ports(tmp_path_factory.mktemp("console-regions"), ["iad", "syd"])
    regions.write_regions()
    try:
        regions.start_all()
        regions.api("iad", "POST", "/orgs", json={"name": "acme"})
        regions.api("iad", "POST", "/apps", json={"name": "web", "org": "acme"})
        ahead = {"regions": ["syd"], "replicate_ahead": True}
        regions.api("iad", "PATCH", "/apps/web", json=ahead)
        _, blobs = regions.push_image("iad", "web", "v1", [os.urandom(4096)])

        def copied() -> dict[str, Any] | None:
            status: dict[str, Any] = regions.api("iad", "GET", "/replication")
            done = {j["digest"] for j in status["recent"] if j["state"] == "done"}
            return status if set(blobs) <= done else None

        status = wait_for(copied, "the image's blobs copied to syd", 60)
        iad = Browser(browser.driver, regions.url("iad"))
        iad.sign_in(regions.admin, "/replication")
        assert iad.find("h1").text == "Replication"
        assert "Answered by\nregion iad" in iad.text("dl.facts")
        assert "Regions\niad, syd" in iad.text("dl.facts")
        counts = [[j["region"], j["state"], str(j["count"])] for j in status["jobs"]]
        assert [row[:3] for row in iad.rows("#replication-jobs")] == counts
        recent = iad.rows("#replication-recent")
        assert len(recent) == len(status["recent"])
        for blob in blobs:
            [row] = [r for r in recent if r[0] == blob[:19]]
            assert row[1:5] == ["syd", "iad", "done", "1"]
        iad.screenshot("settings-replication-regions")
        # The image's page says which regions hold it, and each blob's copies.
        detail = regions.api("iad", "GET", "/apps/web/images/v1")
        assert set(detail["regions"]) == {"iad", "syd"}
        held = human_size(detail["size"])
        iad.get("/apps/web/images/v1")
        assert iad.rows("table.regions") == [["iad", "yes", held], ["syd", "yes", held]]
        assert {row[0]: row[2] for row in iad.rows("table.blobs")} == {
            blob[:19]: "iad, syd" for blob in blobs
        }
        iad.screenshot("image-regions")
    finally:
        regions.stop_all()


def test_a_token_of_bravo_gets_the_404_page_for_every_acme_settings_page(
    site: ConsoleSite, browser: Browser
) -> None:
    hook = answer(
        api(
            site.server,
            "POST",
            "/orgs/acme/webhooks",
            site.acme,
            json={"url": "http://127.0.0.1:9/never", "events": ["dev.skyreg.release.failed"]},
        ),
        201,
    )
    pages = [
        "/orgs/acme/tokens",
        "/orgs/acme/webhooks",
        f"/orgs/acme/webhooks/{hook['id']}",
        f"/orgs/acme/webhooks/{hook['id']}/deliveries",
        "/orgs/acme/audit",
        "/orgs/acme/usage",
    ]
    browser.sign_in(site.bravo, "/orgs/bravo/tokens")
    assert browser.find("h1").text == "Tokens of bravo"
    session = _session_of(browser)
    for path in pages:
        browser.get(path)
        assert browser.find("h1").text == "Not found", path
        assert browser.find_all("main table") == [], path  # nothing of acme's
        assert "shop" not in browser.text("main"), path
        assert session.get(site.url + path, allow_redirects=False).status_code == 404, path
    browser.screenshot("settings-404")

    # Nor can bravo's forms change acme's tokens or webhooks.
    csrf = _csrf_of(session, site.url + "/orgs/bravo/tokens")
    posts = {
        f"/orgs/acme/tokens/{site.acme_id}/revoke": {},
        "/orgs/acme/tokens": {"kind": "org", "name": "bravo-in-acme"},
        f"/orgs/acme/webhooks/{hook['id']}/delete": {},
        "/orgs/acme/webhooks": {"url": "http://127.0.0.1:9/x"},
    }
    for path, data in posts.items():
        done = session.post(
            site.url + path,
            data={**data, "csrf": csrf},
            headers={"Origin": site.url},
            allow_redirects=False,
        )
        assert done.status_code == 404, (path, done.status_code)
    assert answer(api(site.server, "GET", "/whoami", site.acme), 200)["active"] is True
    assert "bravo-in-acme" not in {t["name"] for t in _tokens(site, "acme")}
    hooks = answer(api(site.server, "GET", "/orgs/acme/webhooks", site.acme), 200)["webhooks"]
    assert [h["id"] for h in hooks] == [hook["id"]]
