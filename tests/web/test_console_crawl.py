"""Every page the console links to, as an admin sees them with real data: each loads without a
script error or Content-Security-Policy violation, and is built for keyboards and screen
readers (one h1, labelled controls, tables with captions and column headers, a language)."""

from __future__ import annotations

from urllib.parse import urlsplit

from selenium.webdriver.common.by import By

from tests.support.browser import Browser
from tests.support.console import ConsoleSite
from tests.support.oci import push_image
from tests.support.platform import authed

MAX_PAGES = 150


def _links(browser: Browser, base: str) -> list[str]:
    found = []
    for anchor in browser.driver.find_elements(By.CSS_SELECTOR, "a[href]"):
        href = anchor.get_attribute("href") or ""
        if not href.startswith(base + "/"):
            continue
        path = href[len(base) :].split("#")[0]
        if path.startswith("/static/") or path.startswith("/signin"):
            continue
        found.append(path)
    return found


def _check_page(browser: Browser, path: str) -> None:
    driver = browser.driver
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en", path
    headings = driver.find_elements(By.TAG_NAME, "h1")
    assert len(headings) == 1 and headings[0].text.strip(), path
    assert headings[0].text not in ("Not found", "Error", "Bad request", "Forbidden"), (
        path,
        browser.text("main")[:300],
    )
    for field in driver.find_elements(
        By.CSS_SELECTOR, "input:not([type=hidden]):not([type=submit]), select, textarea"
    ):
        field_id = field.get_attribute("id")
        labelled = field.get_attribute("aria-label") or (
            field_id and driver.find_elements(By.CSS_SELECTOR, f"label[for='{field_id}']")
        )
        assert labelled, (path, field.get_attribute("outerHTML"))
    for table in driver.find_elements(By.TAG_NAME, "table"):
        assert table.find_elements(By.TAG_NAME, "caption"), (path, "a table without a caption")
        assert table.find_elements(By.CSS_SELECTOR, "th[scope=col]"), (path, "no column headers")
    for button in driver.find_elements(By.TAG_NAME, "button"):
        name = button.text.strip() or button.get_attribute("aria-label")
        assert name, (path, button.get_attribute("outerHTML"))
    for image in driver.find_elements(By.TAG_NAME, "img"):
        assert image.get_attribute("alt") is not None, path
    assert browser.console_errors() == [], path


def test_every_linked_page_loads_cleanly_and_accessibly(
    site: ConsoleSite, browser: Browser
) -> None:
    acme = authed(site.acme)
    for tag in ("v1", "v2"):
        push_image(site.url, "shop", tag, session=acme)
    browser.sign_in(site.admin, then="/orgs")
    browser.console_errors()
    base = site.url
    queue = ["/orgs", "/replication"]
    seen: set[str] = set()
    while queue and len(seen) < MAX_PAGES:
        path = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        browser.get(path)
        assert urlsplit(browser.driver.current_url).path != "/signin", path
        _check_page(browser, path)
        queue.extend(p for p in _links(browser, base) if p not in seen)
    # The crawl reached every part of the console.
    for part in ("/orgs/acme", "/apps/shop", "/orgs/acme/tokens", "/orgs/acme/audit"):
        assert part in seen, sorted(seen)
    assert len(seen) >= 10, sorted(seen)
