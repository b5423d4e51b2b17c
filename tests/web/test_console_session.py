"""Signing in to the console with a token, its session cookie, signing out, CSRF, and what each
org's token sees: in Debian's Chromium, against a real server."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium.webdriver.common.keys import Keys

from tests.support.browser import Browser
from tests.support.console import ConsoleSite, foreign_page
from tests.support.inprocess import InProcessRegistry
from tests.support.platform import Tenancy, answer, api
from tests.support.waiting import wait_for


def _audit(site: ConsoleSite, org: str) -> list[dict[str, object]]:
    log = answer(api(site.server, "GET", f"/orgs/{org}/audit", site.admin), 200)
    return list(log["entries"])


def test_a_page_asks_a_signed_out_browser_to_sign_in_and_returns_there(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.get("/orgs/acme")
    assert browser.path == "/signin?next=%2Forgs%2Facme"
    assert browser.find("label[for=token]").text == "Access token"
    browser.screenshot("signin")
    browser.fill("#token", site.acme)
    browser.submit("form.signin button[type=submit]")
    assert browser.path == "/orgs/acme"
    assert browser.find("h1").text == "acme"
    assert [row[0] for row in browser.rows()] == ["shop"]
    assert "Signed in as" in browser.text("header")
    browser.screenshot("org")


def test_the_session_cookie_is_httponly_strict_and_not_the_token(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.sign_in(site.acme)
    cookie = browser.cookies()["skyreg_session"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http on loopback; https sets Secure (below)
    assert cookie["value"] != site.acme and site.acme not in str(cookie["value"])
    # Scripts of the page cannot read it.
    assert "skyreg_session" not in browser.driver.execute_script("return document.cookie")


def _sign_in_by_form(
    url: str, secret: str, cookie: str = "skyreg_signin", **headers: str
) -> requests.Response:
    """Sign in as a browser would, over plain http even when the cookies are Secure."""
    form = requests.get(url + "/signin", headers=headers)
    found = re.search(r'name="form_secret" value="([^"]+)"', form.text)
    assert found is not None
    return requests.post(
        url + "/signin",
        data={"form_secret": found.group(1), "token": secret, "next": "/"},
        headers=headers,
        cookies={cookie: found.group(1)},
        allow_redirects=False,
    )


def test_a_forwarded_https_header_from_an_untrusted_peer_does_not_change_the_cookie(
    site: ConsoleSite,
) -> None:
    response = _sign_in_by_form(site.url, site.acme, **{"X-Forwarded-Proto": "https"})
    assert response.status_code == 303
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie


def test_a_server_public_on_https_sets_secure_host_only_cookies(tmp_path: Path) -> None:
    server = InProcessRegistry(
        data_dir=tmp_path / "data", options={"public_url": "https://registry.example"}
    )
    server.start()
    try:
        tenancy = Tenancy(server.data_dir)
        tenancy.org("acme")
        secret, _ = tenancy.token("org", org="acme")
        response = _sign_in_by_form(server.url, secret, "__Host-skyreg_signin")
        assert response.status_code == 303, response.text
        cookie = response.headers["Set-Cookie"]
        # A cookie a sibling host could set (no __Host- prefix) is not the session's.
        assert cookie.startswith("__Host-skyreg_session=") and "Path=/" in cookie
        assert "Domain" not in cookie
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    finally:
        server.stop()


def test_a_wrong_token_is_refused_and_the_attempt_audited(
    site: ConsoleSite, browser: Browser
) -> None:
    browser.get("/signin")
    browser.fill("#token", "skyreg_wrong" + "x" * 40)
    browser.submit("form.signin button[type=submit]")
    assert browser.path == "/signin"
    assert "invalid, expired or revoked" in browser.text("#signin-error")
    assert browser.find("#token").get_attribute("aria-invalid") == "true"
    assert "skyreg_session" not in browser.cookies()
    browser.screenshot("signin-refused")
    entries = answer(api(site.server, "GET", "/audit?limit=1000", site.admin), 200)
    failed = [
        e for e in entries["entries"] if e["action"] == "consoleSignIn" and e["status"] == 401
    ]
    assert failed and failed[-1]["actor_id"] is None


def test_sign_in_and_sign_out_are_audited_in_the_tokens_org(
    site: ConsoleSite, browser: Browser
) -> None:
    before = len([e for e in _audit(site, "acme") if e["action"] == "consoleSignIn"])
    browser.sign_in(site.acme)
    browser.sign_out()
    entries = _audit(site, "acme")
    signins = [e for e in entries if e["action"] == "consoleSignIn"]
    assert len(signins) == before + 1
    assert signins[-1]["actor_id"] == site.acme_id and signins[-1]["status"] == 303
    signouts = [e for e in entries if e["action"] == "consoleSignOut"]
    assert signouts and signouts[-1]["actor_id"] == site.acme_id


def test_sign_out_ends_the_session_on_the_server(site: ConsoleSite, browser: Browser) -> None:
    browser.sign_in(site.acme)
    stolen = browser.cookies()["skyreg_session"]["value"]
    browser.sign_out()
    assert browser.path == "/signin"
    assert "skyreg_session" not in browser.cookies()
    # The cookie's value, replayed after sign-out, no longer opens anything.
    replay = requests.get(
        site.url + "/orgs/acme", cookies={"skyreg_session": str(stolen)}, allow_redirects=False
    )
    assert replay.status_code == 303
    assert replay.headers["Location"].startswith("/signin")


def test_a_revoked_token_ends_its_sessions(site: ConsoleSite, browser: Browser) -> None:
    secret, token_id = site.tenancy.token("org", org="acme")
    browser.sign_in(secret)
    assert browser.path == "/orgs/acme"
    site.tenancy.revoke(token_id)
    browser.get("/orgs/acme")
    assert browser.path.startswith("/signin")


@pytest.mark.parametrize("kind", ["agent", "proxy"])
def test_host_tokens_cannot_sign_in(site: ConsoleSite, browser: Browser, kind: str) -> None:
    secret, _ = site.tenancy.token(kind)
    browser.sign_in(secret)
    assert browser.path.startswith("/signin")
    assert f"A {kind} token cannot sign in" in browser.text("#signin-error")
    assert "skyreg_session" not in browser.cookies()


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
def test_sign_in_never_sends_the_browser_to_another_site(
    site: ConsoleSite, browser: Browser, target: str
) -> None:
    browser.get("/signin?next=" + requests.utils.quote(target, safe=""))
    browser.fill("#token", site.acme)
    browser.submit("form.signin button[type=submit]")
    assert browser.driver.current_url.startswith(site.url + "/")
    assert browser.path == "/orgs/acme"


def test_a_form_without_its_csrf_token_is_refused(site: ConsoleSite, browser: Browser) -> None:
    browser.sign_in(site.acme)
    # The page's own script context posts the sign-out form without the CSRF field.
    status = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/signout', {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'csrf=wrong'})
          .then(r => done(r.status));"""
    )
    assert status == 403
    browser.get("/orgs/acme")
    assert browser.path == "/orgs/acme"  # still signed in


@pytest.fixture
def hostile_site(site: ConsoleSite) -> Iterator[str]:
    """A page on another origin (another loopback port: the same *site* to the browser, so
    SameSite cookies alone would not stop it) that posts the console's sign-out form."""
    page = f"""<!doctype html><html><body>
    <form id="f" method="post" action="{site.url}/signout"><input name="csrf" value="guess"></form>
    <script>document.getElementById('f').submit();</script></body></html>"""
    with foreign_page(page) as url:
        yield url


def test_a_form_posted_from_another_origin_is_refused(
    site: ConsoleSite, browser: Browser, hostile_site: str
) -> None:
    browser.sign_in(site.acme)
    browser.driver.get(hostile_site)
    wait_for(lambda: browser.driver.current_url.startswith(site.url), "the hostile form's post")
    assert browser.find("h1").text == "Forbidden"
    assert "another site" in browser.text("main")
    browser.screenshot("csrf-refused")
    browser.get("/orgs/acme")
    assert browser.path == "/orgs/acme"  # the session survived


def test_a_token_of_bravo_sees_nothing_of_acme(site: ConsoleSite, browser: Browser) -> None:
    browser.sign_in(site.bravo)
    assert browser.path == "/orgs/bravo"
    browser.get("/orgs")
    assert [row[0] for row in browser.rows()] == ["bravo"]
    for path in ("/orgs/acme", "/apps/shop"):
        browser.get(path)
        assert browser.find("h1").text == "Not found", path
        assert "acme" not in browser.text("main") or path == "/orgs/acme"
        assert "shop" not in browser.text("main") or path == "/apps/shop"
    browser.get("/orgs/acme")
    browser.screenshot("other-org-not-found")


def test_admin_lists_orgs_with_search_and_pages(site: ConsoleSite, browser: Browser) -> None:
    for i in range(55):
        site.tenancy.org(f"many-{i:02d}")
    browser.sign_in(site.admin, then="/orgs")
    assert browser.path == "/orgs"
    first = [row[0] for row in browser.rows()]
    assert len(first) == 50
    assert "Page 1 of 2 (57 in all)" in browser.text(".pager")
    browser.submit(".pager a[rel=next]")
    second = [row[0] for row in browser.rows()]
    assert len(second) == 7 and not set(first) & set(second)
    browser.fill("#q", "many-4")
    browser.submit("form.search button")
    assert [row[0] for row in browser.rows()] == [f"many-{i}" for i in range(40, 50)]
    assert browser.path == "/orgs?q=many-4"
    browser.screenshot("orgs-search")


def test_the_console_is_usable_from_the_keyboard(site: ConsoleSite, browser: Browser) -> None:
    browser.sign_in(site.acme)
    body = browser.find("body")
    body.send_keys(Keys.TAB)
    active = browser.driver.switch_to.active_element
    assert active.text == "Skip to content"
    active.send_keys(Keys.ENTER)
    assert browser.driver.switch_to.active_element.get_attribute("id") == "main"
    # Every form control has a label a screen reader announces.
    for field in browser.find_all("input:not([type=hidden]), select, textarea"):
        field_id = field.get_attribute("id")
        assert field_id and browser.find_all(f"label[for='{field_id}']"), field_id


def test_pages_are_complete_without_javascript(site: ConsoleSite) -> None:
    session = requests.Session()
    form = session.get(site.url + "/signin")
    secret = re.search(r'name="form_secret" value="([^"]+)"', form.text)
    assert secret is not None
    session.post(
        site.url + "/signin", data={"form_secret": secret.group(1), "token": site.acme, "next": "/"}
    )
    page = session.get(site.url + "/orgs/acme")
    assert page.status_code == 200
    assert '<a href="/apps/shop">shop</a>' in page.text
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert page.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("target", ["/orgs/ü", "/orgs/a%0d%0aSet-Cookie:%20x=1", "/orgs/a\r\nX: y"])
def test_sign_in_redirects_only_to_a_well_formed_local_path(site: ConsoleSite, target: str) -> None:
    form = requests.get(site.url + "/signin")
    found = re.search(r'name="form_secret" value="([^"]+)"', form.text)
    assert found is not None
    response = requests.post(
        site.url + "/signin",
        data={"form_secret": found.group(1), "token": site.acme, "next": target},
        cookies={"skyreg_signin": found.group(1)},
        allow_redirects=False,
    )
    assert response.status_code == 303
    location = response.headers["Location"]
    assert location.startswith("/") and location.isascii()
    assert "\r" not in location and "\n" not in location
    assert "Set-Cookie" not in response.headers or "x=1" not in response.headers["Set-Cookie"]
