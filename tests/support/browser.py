"""Debian's Chromium, headless, driven through its chromedriver by selenium: the console's tests
load pages as a person's browser does (cookies, redirects, forms, JavaScript) and save a
screenshot of each page they assert on, for review, under build/console-screenshots/."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.support.waiting import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(
    os.environ.get(
        "SKYREG_SCREENSHOTS", Path(__file__).parents[2] / "build" / "console-screenshots"
    )
)
_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root in a container: Chromium's own sandbox needs user namespaces it lacks
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--password-store=basic",
    "--window-size=1280,900",
    # Every request stays on loopback: no DNS prefetch or proxy detection elsewhere.
    "--no-proxy-server",
    "--dns-prefetch-disable",
)


class Browser:
    """One headless Chromium: `get` a page, find things, fill forms, save screenshots."""

    def __init__(self, driver: webdriver.Chrome, base_url: str) -> None:
        self.driver = driver
        self.base_url = base_url.rstrip("/")

    def get(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    @property
    def path(self) -> str:
        url = self.driver.current_url
        return url[len(self.base_url) :] if url.startswith(self.base_url) else url

    @property
    def title(self) -> str:
        return self.driver.title

    def text(self, css: str = "main") -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def rows(self, css: str = "main table") -> list[list[str]]:
        """The body rows of the first table matching `css`, as cell texts."""
        table = self.find(css)
        return [
            [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "td, th")]
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")
        ]

    def fill(self, css: str, value: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def submit(self, css: str, *, confirm: bool = True) -> None:
        """Click the submit button `css` (accepting the question a `data-confirm` form asks,
        unless `confirm` is False) and wait for the next page."""
        old = self.find("html")
        self.find(css).click()
        try:
            alert = self.driver.switch_to.alert
        except NoAlertPresentException:
            alert = None
        if alert is not None:
            if not confirm:
                alert.dismiss()
                return
            alert.accept()
        wait_for(lambda: _stale(old), timeout=30, what="the next page to load")

    def console_errors(self) -> list[str]:
        """The page's console errors since the last call (CSP violations, script errors)."""
        entries: list[dict[str, object]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [str(e["message"]) for e in entries if e.get("level") == "SEVERE"]

    def cookies(self) -> dict[str, dict[str, object]]:
        return {c["name"]: c for c in self.driver.get_cookies()}

    def screenshot(self, name: str) -> Path:
        """Save the whole page as build/console-screenshots/NAME.png."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        target = SCREENSHOTS / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png")
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1280, max(900, min(int(height) + 40, 6000)))
        try:
            self.driver.save_screenshot(str(target))
        finally:
            self.driver.set_window_size(1280, 900)
        assert target.stat().st_size > 1000, target
        return target

    def sign_in(self, secret: str, then: str = "/") -> None:
        self.get("/signin?next=" + then)
        self.fill("#token", secret)
        self.submit("form.signin button[type=submit]")

    def sign_out(self) -> None:
        self.submit("header form[action='/signout'] button")


def _stale(element: WebElement) -> bool:
    try:
        element.is_enabled()
    except Exception:  # StaleElementReferenceException: the page was replaced
        return True
    return False


def available() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


@contextlib.contextmanager
def chromium(base_url: str) -> Iterator[Browser]:
    """A headless Chromium with a fresh profile (removed after), pointed at `base_url`."""
    profile = tempfile.mkdtemp(prefix="skyreg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in _FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # The page's console messages (script errors, Content-Security-Policy violations).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.unhandled_prompt_behavior = "ignore"  # `submit` answers the console's questions
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(60)
        yield Browser(driver, base_url)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
