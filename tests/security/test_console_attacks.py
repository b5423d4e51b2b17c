"""The web console under attack: a hostile tenant (bravo's org token, a deploy or read-only
token), an anonymous page on another origin of 127.0.0.1, a stolen, expired or revoked
credential. Tenant-controlled text carries markup everywhere a page shows it; every form is
replayed without its CSRF token, with another session's, from another origin; pages are asked
for another org's things by id; inputs go out of bounds. SECURITY.md, "The web console"."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tests.support.browser import Browser, available, chromium
from tests.support.console import (
    Console,
    ConsoleSite,
    console_site,
    end_session_at,
    field,
    foreign_page,
    page_text,
    signed_in,
)
from tests.support.oci import push_image
from tests.support.platform import answer, api, authed
from tests.support.waiting import wait_for

# Markup a tenant controls; the inline handler would run if it reached the DOM as markup (the
# CSP forbids inline script too, so the browser test also checks it stays text).
PAYLOAD = "<svg/onload=window.pwned=1>"
ESCAPED = "&lt;svg/onload=window.pwned=1&gt;"
PAYLOAD_URL = quote(PAYLOAD, safe="")


@dataclass
class World:
    """acme: app `shop` deployed (machine `machine`, with markup in its release description,
    events and log lines), a token and a webhook named with markup and the webhook's failed
    deliveries; an app `cart` with a deploy token; a read-only token. bravo: a webhook."""

    site: ConsoleSite
    machine: str
    hook: str  # acme's webhook whose URL holds the payload
    delivery: int
    readonly: str  # a read-only token of acme (secret)
    marked_token: str  # id of acme's token named with the payload
    cart_deploy: str  # a deploy token of acme's app cart
    bravo_hook: str
    shop_digest: str

    @property
    def url(self) -> str:
        return self.site.url


def _deliveries(site: ConsoleSite, hook: str) -> list[dict[str, Any]]:
    found = answer(api(site.server, "GET", f"/webhooks/{hook}/deliveries", site.admin), 200)
    return list(found["deliveries"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    data = tmp_path_factory.mktemp("console-attacks") / "data"
    with console_site(data, webhook_allow_private=True, webhook_retry_base=3600.0) as site:
        acme = site.acme
        hook = answer(
            api(
                site.server, "POST", "/orgs/acme/webhooks", acme,
                json={"url": "http://127.0.0.1:9/hook?x=" + PAYLOAD},
            ),
            201,
        )["id"]  # fmt: skip
        bravo_hook = answer(
            api(site.server, "POST", "/orgs/bravo/webhooks", site.bravo,
                json={"url": "http://127.0.0.1:9/bravo"}),
            201,
        )["id"]  # fmt: skip
        shop_digest = push_image(site.url, "shop", "v1", session=authed(acme)).digest
        release = {
            "image": f"{site.server.host}/shop:v1",
            "description": PAYLOAD,
            "service": {"internal_port": 8080},
        }
        answer(api(site.server, "POST", "/apps/shop/releases", acme, json=release), 201)
        machines = answer(api(site.server, "GET", "/apps/shop/machines", acme), 200)["machines"]
        (machine,) = [m["id"] for m in machines]
        agent, _ = site.tenancy.token("agent", org="acme")
        for path, body in (
            ("events", {"message": PAYLOAD, "duration_ms": 1}),
            ("logs", {"lines": ["booting", PAYLOAD]}),
        ):
            answer(
                api(site.server, "POST", f"/agent/machines/{machine}/{path}", agent, json=body), 201
            )
        marked = answer(
            api(site.server, "POST", "/tokens", acme,
                json={"kind": "readonly", "org": "acme", "name": PAYLOAD}),
            201,
        )["id"]  # fmt: skip
        # An audited request whose path (its audit target) holds markup.
        api(site.server, "DELETE", f"/webhooks/{PAYLOAD_URL}", acme)
        site.tenancy.app("cart", "acme")
        cart_deploy, _ = site.tenancy.token("deploy", org="acme", app="cart")
        readonly, _ = site.tenancy.token("readonly", org="acme")
        delivery = wait_for(
            lambda: _deliveries(site, hook), what="a delivery of acme's webhook", timeout=60
        )[0]["id"]
        yield World(
            site, machine, hook, delivery, readonly, marked, cart_deploy, bravo_hook, shop_digest
        )


@pytest.fixture
def acme(world: World) -> Console:
    return signed_in(world.url, world.site.acme)


@pytest.fixture
def bravo(world: World) -> Console:
    return signed_in(world.url, world.site.bravo)


def _machine(world: World) -> dict[str, Any]:
    return dict(
        answer(api(world.site.server, "GET", f"/machines/{world.machine}", world.site.admin), 200)
    )


def _state(world: World) -> dict[str, Any]:
    """What a refused form must not have changed: acme's tokens, webhooks and deliveries, the
    machine's desired state."""
    server, admin = world.site.server, world.site.admin
    tokens = answer(api(server, "GET", "/tokens?org=acme", admin), 200)["tokens"]
    hooks = answer(api(server, "GET", "/orgs/acme/webhooks", admin), 200)["webhooks"]
    return {
        "tokens": sorted((t["id"], t["active"]) for t in tokens),
        "hooks": sorted(h["id"] for h in hooks),
        "deliveries": len(_deliveries(world.site, world.hook)),
        "machine": (_machine(world)["desired"], _machine(world)["generation"]),
    }


# -- tenant text is text -----------------------------------------------------------------------


def _marked_pages(world: World) -> list[str]:
    return [
        "/orgs/acme/tokens",  # the token's name
        "/orgs/acme/webhooks",  # the webhook's URL
        f"/orgs/acme/webhooks/{world.hook}",
        f"/machines/{world.machine}",  # an event, a log line
        f"/machines/{world.machine}/logs",
        "/apps/shop/releases",  # the release's description
        "/orgs/acme/audit",  # a target with markup
        f"/orgs/acme?q={PAYLOAD_URL}",  # the search box
        f"/apps/shop/machines?q={PAYLOAD_URL}",
        f"/orgs/acme/audit?since={PAYLOAD_URL}",  # echoed with its error
        f"/apps/{PAYLOAD_URL}",  # a 404 naming the app
        f"/machines/{PAYLOAD_URL}",
    ]


def test_tenant_markup_is_escaped_on_every_page_that_shows_it(world: World, acme: Console) -> None:
    for path in _marked_pages(world):
        page = acme.get(path)
        assert page.status_code in (200, 400, 404), (path, page.status_code)
        assert PAYLOAD not in page.text, path
        assert ESCAPED in page.text, (path, page_text(page.text)[-800:])


def test_sign_in_next_parameter_is_neither_markup_nor_another_site(world: World) -> None:
    console = Console(world.url)
    tries = ("/" + PAYLOAD, '/"><svg/onload=1>', "javascript:alert(1)", "//evil.test/",
             "/\\evil.test", "https://evil.test/", "/%0d%0aSet-Cookie:%20x=1")  # fmt: skip
    for following in tries:
        form = console.get("/signin?next=" + quote(following, safe=""))
        assert form.status_code == 200
        assert "<svg" not in form.text
        kept = field(form.text, "next")
        assert kept.startswith("/") and not kept.startswith("//") and "\\" not in kept
        done = console.post(
            "/signin",
            {
                "form_secret": field(form.text, "form_secret"),
                "token": world.site.bravo,
                "next": kept,
            },
        )
        assert done.status_code == 303
        location = done.headers["Location"]
        assert location.startswith("/") and not location.startswith("//"), location
        assert "\r" not in location and "\n" not in location and "<" not in location
        assert "x=1" not in done.headers.get("Set-Cookie", "")
        console.http.cookies.clear()


@pytest.fixture(scope="module")
def module_browser(world: World) -> Iterator[Browser]:
    if not available():
        pytest.skip("chromium and chromedriver not installed")
    with chromium(world.url) as browser:
        yield browser


@pytest.fixture
def browser(module_browser: Browser) -> Browser:
    module_browser.get("/signin")
    module_browser.driver.delete_all_cookies()
    return module_browser


def test_tenant_markup_runs_no_script_in_chromium_and_reads_as_text(
    world: World, browser: Browser
) -> None:
    browser.sign_in(world.site.acme, then="/orgs/acme/tokens")
    for path in _marked_pages(world):
        browser.get(path)
        title = browser.title
        live = path.startswith("/machines/") and path.count("/") == 2 and world.machine in path
        if live:  # the log tail refreshes itself from its fragment: let it, once
            wait_for(
                lambda: browser.find("[data-live-url]").get_attribute("data-live-updated"),
                what="the log tail to refresh",
                timeout=30,
            )
        assert browser.driver.execute_script("return window.pwned === undefined")
        assert browser.find_all("svg") == [], path
        assert browser.title == title
        assert PAYLOAD in browser.text("body"), path
    browser.get(f"/machines/{world.machine}")
    browser.screenshot("attack-machine-markup")


# -- CSRF and cross-origin forms ---------------------------------------------------------------


def _forms(world: World, victim: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("/orgs/acme/tokens", {"kind": "readonly", "name": "csrf-probe"}),
        (f"/orgs/acme/tokens/{victim}/revoke", {"go": "1"}),
        ("/orgs/acme/webhooks", {"url": "http://127.0.0.1:9/csrf"}),
        (f"/orgs/acme/webhooks/{world.hook}/delete", {"go": "1"}),
        (f"/orgs/acme/webhooks/{world.hook}/deliveries/{world.delivery}/redeliver", {"go": "1"}),
        (f"/machines/{world.machine}/stop", {"go": "1"}),
        (f"/machines/{world.machine}/start", {"go": "1"}),
        (f"/machines/{world.machine}/restart", {"go": "1"}),
        ("/signout", {"go": "1"}),
    ]


def test_every_form_is_refused_without_its_sessions_csrf_token_or_from_another_origin(
    world: World, acme: Console
) -> None:
    victim = world.marked_token
    other = signed_in(world.url, world.site.acme)
    ended = signed_in(world.url, world.site.acme)
    ended_csrf = ended.csrf()
    assert ended.post("/signout", {"csrf": ended_csrf}).status_code == 303
    good = acme.csrf()
    foreign = "http://127.0.0.1:1"
    before = _state(world)
    for path, form in _forms(world, victim):
        with_csrf = {**form, "csrf": good}
        elsewhere = {"Referer": foreign + "/x"}
        attempts: list[tuple[str, requests.Response, str]] = [
            ("no csrf", acme.post(path, form), "CSRF"),
            ("another session's", acme.post(path, {**form, "csrf": other.csrf()}), "CSRF"),
            ("a signed-out session's", acme.post(path, {**form, "csrf": ended_csrf}), "CSRF"),
            ("foreign Origin", acme.post(path, with_csrf, origin=foreign), "another site"),
            ("Origin null", acme.post(path, with_csrf, origin="null"), "another site"),
            (
                "foreign Referer",
                acme.post(path, with_csrf, origin=None, headers=elsewhere),
                "another site",
            ),
        ]  # fmt: skip
        for what, refused, says in attempts:
            assert refused.status_code == 403, (path, what, refused.status_code)
            assert says in page_text(refused.text), (path, what)
            assert refused.headers["Content-Type"].startswith("text/html")
        # The signed-out session's own cookie is no session at all.
        assert ended.post(path, {**form, "csrf": ended_csrf}).status_code == 401
    assert _state(world) == before
    assert acme.get("/orgs/acme").status_code == 200  # still signed in: signout was refused too


def test_a_form_with_its_csrf_token_from_its_own_origin_is_done(
    world: World, acme: Console
) -> None:
    made = acme.post(
        "/orgs/acme/tokens", {"kind": "readonly", "name": "made-here", "csrf": acme.csrf()}
    )
    assert made.status_code == 200
    assert "made-here created" in page_text(made.text)
    # No Origin but the console's own Referer: accepted as the console's.
    again = acme.post(
        "/orgs/acme/tokens",
        {"kind": "readonly", "name": "made-by-referer", "csrf": acme.csrf()},
        origin=None,
        headers={"Referer": world.url + "/orgs/acme/tokens"},
    )
    assert again.status_code == 200 and "made-by-referer created" in page_text(again.text)


def test_sign_in_form_is_refused_without_its_double_submit_cookie_or_from_another_origin(
    world: World,
) -> None:
    bravo = world.site.bravo
    fresh = Console(world.url)
    no_cookie = fresh.post("/signin", {"form_secret": "x" * 43, "token": bravo})
    assert no_cookie.status_code == 403 and "expired" in page_text(no_cookie.text)
    form = fresh.get("/signin")
    mismatched = fresh.post("/signin", {"form_secret": "y" * 43, "token": bravo})
    assert mismatched.status_code == 403
    cross = fresh.post(
        "/signin",
        {"form_secret": field(form.text, "form_secret"), "token": bravo},
        origin="http://127.0.0.1:1",
    )
    assert cross.status_code == 403 and "another site" in page_text(cross.text)
    assert fresh.session is None
    assert fresh.get("/orgs").status_code == 303  # still signed out


def test_a_page_on_another_origin_can_neither_post_forms_nor_read_fragments(
    world: World, browser: Browser
) -> None:
    browser.sign_in(world.site.acme, then="/orgs/acme/tokens")
    before = _state(world)
    target = world.url
    attack = f"""<!doctype html><title>attack</title>
<form id="f" method="post" action="{target}/orgs/acme/tokens">
<input name="kind" value="org"><input name="name" value="planted"></form>
<p id="read">pending</p>
<script>
fetch("{target}/machines/{world.machine}/logs", {{credentials: "include"}})
  .then(r => r.text()).then(t => {{ document.getElementById("read").textContent = "read:" + t; }})
  .catch(() => {{ document.getElementById("read").textContent = "blocked"; }});
</script>"""
    with foreign_page(attack) as url:
        browser.driver.get(url)
        read = wait_for(
            lambda: (t := browser.text("#read")) != "pending" and t, what="the fetch to settle"
        )
        assert read == "blocked"  # CORS: another origin cannot read the log fragment
        browser.driver.execute_script("document.getElementById('f').submit()")
        wait_for(lambda: browser.path.startswith("/orgs/acme/tokens"), what="the form to post")
        assert "another site" in browser.text("main") or "CSRF" in browser.text("main")
        browser.screenshot("attack-cross-origin-form")
    assert _state(world) == before


def test_a_page_on_another_origin_cannot_sign_the_browser_in_by_planting_the_form_cookie(
    world: World, browser: Browser
) -> None:
    # Cookies do not keep ports apart: a page on another port of 127.0.0.1 can set the
    # double-submit cookie. The Origin check still refuses its sign-in form.
    planted = "p" * 43
    attack = f"""<!doctype html><title>login csrf</title>
<form id="f" method="post" action="{world.url}/signin">
<input name="form_secret" value="{planted}"><input name="token" value="{world.site.bravo}">
<input name="next" value="/orgs/bravo"></form>
<script>document.cookie = "skyreg_signin={planted}; path=/";
document.getElementById("f").submit();</script>"""
    with foreign_page(attack) as url:
        browser.driver.get(url)
        wait_for(lambda: browser.path.startswith("/signin"), what="the sign-in form to post")
        assert "another site" in browser.text("main")
    assert "skyreg_session" not in browser.cookies()
    browser.get("/orgs/bravo")
    assert browser.path.startswith("/signin")


# -- sessions ----------------------------------------------------------------------------------


def test_sign_in_issues_a_new_session_whatever_cookie_the_browser_held(world: World) -> None:
    console = Console(world.url)
    planted = "attacker-chosen-session-secret-0123456789abcdef"
    console.http.cookies.set("skyreg_session", planted)
    assert console.get("/orgs").status_code == 303  # the planted value is no session
    done = console.sign_in(world.site.bravo)
    assert done.status_code == 303
    assert done.cookies.get("skyreg_session") not in (None, planted)
    visitor = Console(world.url)
    visitor.http.cookies.set("skyreg_session", planted)
    assert visitor.get("/orgs").status_code == 303


def test_session_cookie_is_httponly_and_samesite_strict(world: World) -> None:
    console = Console(world.url)
    done = console.sign_in(world.site.bravo)
    cookie = [c for c in done.headers.get("Set-Cookie", "").split(", ") if "skyreg_session" in c]
    assert cookie, done.headers
    assert "HttpOnly" in cookie[0] and "SameSite=Strict" in cookie[0]
    assert world.site.bravo not in done.headers.get("Set-Cookie", "")


def test_a_revoked_tokens_session_and_an_ended_session_are_signed_out(world: World) -> None:
    secret, token_id = world.site.tenancy.token("org", org="bravo")
    console = signed_in(world.url, secret)
    assert console.get("/orgs/bravo").status_code == 200
    world.site.tenancy.revoke(token_id)
    gone = console.get("/orgs/bravo")
    assert gone.status_code == 303 and gone.headers["Location"].startswith("/signin")
    assert console.post("/signout", {"csrf": "x"}).status_code == 401
    expiring = signed_in(world.url, world.site.bravo)
    assert expiring.session is not None
    end_session_at(
        world.site.server.data_dir, expiring.session, datetime.now(UTC) - timedelta(seconds=1)
    )
    assert expiring.get("/orgs/bravo").status_code == 303


def test_long_and_odd_session_cookies_are_no_session_and_no_error(world: World) -> None:
    for value in ("a" * 4000, "%00%ff", '"quoted"', "a" * 43 + "\\", "=" * 80):
        console = Console(world.url)
        console.http.cookies.set("skyreg_session", value)
        page = console.get("/orgs")
        assert page.status_code == 303 and page.headers["Location"].startswith("/signin"), value
        refused = console.post("/orgs/bravo/tokens", {"kind": "org"})
        assert refused.status_code == 401 and "sign in again" in page_text(refused.text)


def test_failed_sign_ins_are_throttled_and_a_right_token_still_signs_in(world: World) -> None:
    console = Console(world.url)
    statuses: list[int] = []
    for attempt in range(200):
        form = console.get("/signin")
        tried = console.post(
            "/signin",
            {"form_secret": field(form.text, "form_secret"), "token": f"sk_wrong{attempt}"},
        )
        statuses.append(tried.status_code)
        if tried.status_code == 429:
            assert "Too many failed attempts" in page_text(tried.text)
            break
    assert statuses[-1] == 429 and set(statuses[:-1]) <= {401}, statuses
    assert console.session is None
    # Valid credentials always pass the limiter (auth/service.py `limited`).
    assert signed_in(world.url, world.site.bravo).get("/orgs/bravo").status_code == 200


def test_a_cookie_that_is_not_utf8_is_no_session_and_no_error(world: World) -> None:
    console = Console(world.url)
    console.http.cookies.set("skyreg_session", "\xe9" * 50)  # sent as latin-1 bytes
    page = console.get("/orgs")
    assert page.status_code == 303, page.status_code
    signin = Console(world.url)
    signin.http.cookies.set("skyreg_signin", "\xe9" * 50)
    assert signin.get("/signin").status_code == 200
    refused = signin.post("/signin", {"form_secret": "\xe9" * 50, "token": world.site.bravo})
    assert refused.status_code == 403, refused.status_code


# -- another tenant's things -------------------------------------------------------------------


def test_bravo_reaches_none_of_acmes_things_by_id(world: World, bravo: Console) -> None:
    before = _state(world)
    csrf = bravo.csrf()
    for path in (
        f"/machines/{world.machine}",
        f"/machines/{world.machine}/logs",
        f"/orgs/acme/webhooks/{world.hook}",
        f"/orgs/acme/webhooks/{world.hook}/deliveries",
        f"/orgs/bravo/webhooks/{world.hook}",
        f"/orgs/bravo/webhooks/{world.hook}/deliveries",
        "/orgs/acme/tokens",
        "/orgs/acme/webhooks",
        "/orgs/acme/audit",
        "/orgs/acme/audit/export",
        "/orgs/acme/usage",
        "/apps/shop",
        "/apps/shop/releases",
        "/apps/shop/machines",
        f"/apps/shop/images/{world.shop_digest}",
        f"/apps/bank/images/shop@{world.shop_digest}",  # acme's repository through bravo's app
        "/apps/bank/images/shop:v1",
        "/apps/bank/images/..%2Fshop:v1",
    ):
        page = bravo.get(path)
        assert page.status_code in (403, 404), (path, page.status_code)
        assert page.headers["Content-Type"].startswith("text/html"), path
        text = page_text(page.text)
        assert "booting" not in text and "127.0.0.1:9/hook" not in text, path
        assert "consoleSignIn" not in text and "Redeliver" not in text, path
    for path in (
        f"/orgs/bravo/tokens/{world.marked_token}/revoke",
        f"/orgs/acme/tokens/{world.marked_token}/revoke",
        f"/orgs/bravo/webhooks/{world.hook}/delete",
        f"/orgs/acme/webhooks/{world.hook}/delete",
        f"/orgs/bravo/webhooks/{world.bravo_hook}/deliveries/{world.delivery}/redeliver",
        f"/orgs/acme/webhooks/{world.hook}/deliveries/{world.delivery}/redeliver",
        f"/machines/{world.machine}/stop",
        f"/machines/{world.machine}/restart",
        "/orgs/acme/tokens",
        "/orgs/acme/webhooks",
    ):
        refused = bravo.post(path, {"csrf": csrf, "kind": "org", "url": "http://127.0.0.1:9/x"})
        assert refused.status_code in (403, 404), (path, refused.status_code)
    assert _state(world) == before
    assert _deliveries(world.site, world.bravo_hook) == []


def test_a_deploy_token_changes_no_other_apps_machines_and_readonly_creates_no_token(
    world: World,
) -> None:
    before = _state(world)
    deploy = signed_in(world.url, world.cart_deploy)
    stop = deploy.post(f"/machines/{world.machine}/stop", {"csrf": deploy.csrf("/orgs/acme")})
    assert stop.status_code in (403, 404), stop.status_code
    readonly = signed_in(world.url, world.readonly)
    made = readonly.post("/orgs/acme/tokens", {"kind": "org", "csrf": readonly.csrf("/orgs/acme")})
    assert made.status_code == 403, made.status_code
    assert "sk_" not in made.text
    assert _state(world) == before


def test_an_unreadable_since_is_a_400_and_an_unknown_orgs_audit_a_404(
    world: World, bravo: Console
) -> None:
    mine = bravo.get("/orgs/bravo/audit?since=nonsense")
    assert mine.status_code == 400 and "Since" in page_text(mine.text)
    missing = bravo.get("/orgs/no-such-org/audit")
    assert missing.status_code == 404


def test_another_orgs_audit_page_answers_404_even_with_an_unreadable_since(
    world: World, bravo: Console
) -> None:
    page = bravo.get("/orgs/acme/audit?since=nonsense")
    assert page.status_code == 404, page.status_code
    assert "Audit log of acme" not in page_text(page.text)


# -- bounds ------------------------------------------------------------------------------------


def test_out_of_bound_inputs_are_a_clear_4xx_page(world: World, acme: Console) -> None:
    errors = world.site.server.log().count("unhandled error in console")
    huge = "q" * 5000
    for path, status in (
        (f"/orgs/acme?q={huge}", 400),
        (f"/orgs/acme/tokens?q={huge}", 400),
        ("/orgs?page=" + "9" * 30, 400),
        ("/orgs/acme/audit?limit=1000000000", 400),
        ("/orgs/acme/audit?before=" + "9" * 25, 400),
        ("/orgs/acme/audit?before=-1", 400),
        ("/orgs/acme/audit?since=99999-01-01", 400),
        ("/apps/shop?cursor=" + "z" * 300, 400),
        ("/apps/a%00b", 404),
        ("/apps/%ED%A0%80", 404),
        ("/machines/%00", 404),
        ("/machines/%ED%A0%80/logs", 404),
        ("/orgs/%ED%A0%80", 404),
    ):
        page = acme.get(path)
        assert page.status_code == status, (path[:80], page.status_code)
        assert page.headers["Content-Type"].startswith("text/html")
        assert "internal server error" not in page.text
    # A page far past the end is the last page.
    assert acme.get("/orgs?page=999999999").status_code == 200
    assert world.site.server.log().count("unhandled error in console") == errors


def test_numbers_written_with_non_ascii_digits_are_a_400(world: World, acme: Console) -> None:
    for path in (
        "/orgs?page=%C2%B2",
        "/orgs/acme/audit?limit=%C2%B2",
        "/orgs/acme/audit?before=%E2%91%A0",
    ):
        page = acme.get(path)
        assert page.status_code == 400, (path, page.status_code)


def test_oversized_forms_are_refused_and_others_are_served_meanwhile(
    world: World, acme: Console
) -> None:
    csrf = acme.csrf()
    before = _state(world)
    try:
        big = acme.post(
            "/orgs/acme/tokens", {"csrf": csrf, "kind": "org", "name": "x" * (10 * 2**20)}
        )
        assert big.status_code == 413 and "Too large" in page_text(big.text)
    except requests.ConnectionError:
        pass  # the server answered 413 and closed while the body was still being sent
    many = acme.post(
        "/orgs/acme/tokens", "&".join([f"csrf={csrf}", "kind=org", *("f=1" for _ in range(4000))]),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert many.status_code == 400 and "could not be read" in page_text(many.text)
    multipart = acme.http.post(
        world.url + "/orgs/acme/tokens",
        files={"csrf": (None, csrf), "kind": (None, "org")},
        headers={"Origin": world.url},
        allow_redirects=False,
        timeout=60,
    )
    assert multipart.status_code == 415
    assert Console(world.url).get("/signin").status_code == 200
    assert _state(world) == before


def test_other_methods_are_a_405_page_with_allow(world: World, acme: Console) -> None:
    tries = (("PUT", "/orgs/acme"), ("DELETE", "/orgs/acme/tokens"), ("PATCH", "/signin"),
             ("GET", "/signout"), ("DELETE", f"/machines/{world.machine}/stop"))  # fmt: skip
    for method, path in tries:
        page = acme.http.request(method, world.url + path, allow_redirects=False, timeout=60)
        assert page.status_code == 405, (method, path, page.status_code)
        assert page.headers["Allow"] and "not supported" in page_text(page.text)
    head = acme.http.head(world.url + "/orgs/acme", allow_redirects=False, timeout=60)
    assert head.status_code == 200 and head.content == b""
    assert _machine(world)["desired"] != "stopped"


# -- headers and static files ------------------------------------------------------------------


def _secure_headers(response: requests.Response) -> None:
    csp = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp, response.url
    assert "'unsafe-inline'" not in csp
    assert response.headers.get("X-Content-Type-Options") == "nosniff", response.url
    assert response.headers.get("Cache-Control") == "no-store", response.url


def test_every_console_answer_carries_the_security_headers(world: World, acme: Console) -> None:
    anonymous = Console(world.url)
    for console, path in (
        (anonymous, "/signin"),
        (anonymous, "/orgs"),  # a redirect
        (acme, "/orgs"),
        (acme, "/orgs/acme/tokens"),
        (acme, f"/machines/{world.machine}"),
        (acme, f"/machines/{world.machine}/logs"),
        (acme, f"/orgs/acme/webhooks/{world.hook}/deliveries"),
        (acme, "/orgs/acme/audit"),
        (acme, "/orgs/acme/audit/export"),
        (acme, "/apps/nothing-here"),  # 404
        (acme, "/orgs?page=x"),  # 400
    ):
        _secure_headers(console.get(path))
    for refused in (
        acme.post("/orgs/acme/tokens", {}),
        acme.http.put(world.url + "/orgs", timeout=60),
    ):
        _secure_headers(refused)
    export = acme.get("/orgs/acme/audit/export")
    assert export.headers["Content-Type"].startswith("application/x-ndjson")
    assert export.headers["Content-Disposition"].startswith("attachment")


def test_static_paths_serve_only_the_consoles_own_files(world: World) -> None:
    console = Console(world.url)
    page = console.get("/signin")
    script = re.search(r'src="(/static/[^"]+)"', page.text)
    assert script is not None
    served = console.get(script.group(1))
    assert served.status_code == 200 and served.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/static/..%2F..%2Fpyproject.toml", "/static/%2e%2e/base.py", "/static/console.js",
                 "/static/../web/base.py", "/static/console.css%00.js"):  # fmt: skip
        found = console.http.get(world.url + path, allow_redirects=False, timeout=60)
        assert found.status_code == 404, (path, found.status_code)
        assert "[project]" not in found.text and "import" not in found.text


def test_a_missing_static_file_answers_with_the_security_headers(world: World) -> None:
    _secure_headers(Console(world.url).get("/static/nothing.js"))


def test_audit_export_and_fragments_of_another_org_are_refused_pages(
    world: World, bravo: Console
) -> None:
    for path in ("/orgs/acme/audit/export", f"/machines/{world.machine}/logs",
                 f"/orgs/acme/webhooks/{world.hook}/deliveries"):  # fmt: skip
        page = bravo.get(path)
        assert page.status_code == 404, (path, page.status_code)
        assert "Content-Disposition" not in page.headers
        assert page.headers["Content-Type"].startswith("text/html")
        assert "booting" not in page.text and "consoleSignIn" not in page.text
    mine = bravo.get("/orgs/bravo/audit/export")
    entries = [line for line in mine.text.splitlines() if line]
    assert entries and all(
        '"acme"' not in line and world.site.acme_id not in line for line in entries
    )
