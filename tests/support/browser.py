"""A real browser for tests: Debian's chromium installed once per session (as prometheus is),
driven headless by Python Playwright (never `playwright install`: the system's chromium)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, sync_playwright

from tests.support.prometheus import _apt_get, apt_lock

CHROMIUM = Path("/usr/bin/chromium")
# apt-get update plus chromium and its libraries (about 100 MB) on a slow mirror, all told.
INSTALL_TIMEOUT = 600
TEST_TIMEOUT = INSTALL_TIMEOUT + 120
# Headless in a container: no sandbox (no user namespaces), no GPU, nothing fetched from Google.
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 900}


def installed() -> bool:
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


def install() -> float | None:
    """Install Debian's chromium unless it is there; how long it took (None: it was there).
    Waits on the suite's apt lock, and so on another install of it (the lead's, a worker's)."""
    if installed():
        return None
    with apt_lock():
        if installed():
            return None
        started = time.monotonic()
        deadline = started + INSTALL_TIMEOUT
        _apt_get(deadline, "update")
        _apt_get(deadline, "install", "-y", "--no-install-recommends", "chromium")
    if not installed():
        raise RuntimeError(f"the chromium package installed, but {CHROMIUM} is not there")
    return time.monotonic() - started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test using the browser time to install chromium first."""
    for item in items:
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(scope="session")
def chromium() -> Path:
    """/usr/bin/chromium, installed once per session; a failed install fails the test."""
    try:
        took = install()
    except RuntimeError as exc:
        pytest.fail(f"cannot install Debian's chromium package: {exc}", pytrace=False)
    if took is not None:
        print(f"installed Debian's chromium package in {took:.1f}s")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Browser]:
    """Headless chromium for a module's tests (module-scoped: Playwright's sync API keeps an
    event loop of its own, which no other module's asyncio.run() should meet)."""
    with sync_playwright() as playwright:
        yield launch(playwright, chromium)


def launch(playwright: Playwright, executable: Path) -> Browser:
    return playwright.chromium.launch(executable_path=str(executable), args=ARGS)


@dataclass
class Tab:
    """A page in a fresh context (its own sessionStorage), and what its console said."""

    page: Page
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    def heard(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A new 1280x900 page; closed afterwards."""
    context = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    page = context.new_page()
    opened = Tab(page)
    page.on("console", opened.heard)
    page.on("pageerror", lambda exc: opened.errors.append(f"uncaught: {exc}"))
    page.set_default_timeout(10_000)
    try:
        yield opened
    finally:
        context.close()
