"""A skyreg for the console's browser tests: two orgs (acme, bravo), each with an app and an org
token, an admin token, and a headless Chromium per module (tests/support/browser.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.browser import Browser, available, chromium
from tests.support.console import ConsoleSite, console_site

pytestmark = pytest.mark.skipif(not available(), reason="chromium and chromedriver not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleSite]:
    with console_site(
        tmp_path_factory.mktemp("console") / "data", scan_worker=True, pull_flush_interval=0.5
    ) as made:
        yield made


@pytest.fixture(scope="module")
def module_browser(site: ConsoleSite) -> Iterator[Browser]:
    if not available():
        pytest.skip("chromium and chromedriver not installed")
    with chromium(site.url) as browser:
        yield browser


@pytest.fixture
def browser(module_browser: Browser) -> Browser:
    """The module's Chromium, signed out (no cookies) at the start of each test."""
    module_browser.get("/signin")
    module_browser.driver.delete_all_cookies()
    return module_browser
