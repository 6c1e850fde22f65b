"""Real programs for tests: Debian packages (PHP's command line, git's send-email) installed once
per session when missing, under the suite's apt lock, as prometheus and chromium are."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.prometheus import _apt_get, apt_lock

# apt-get update plus a few small packages and their dependencies on a slow mirror, all told.
INSTALL_TIMEOUT = 480
TEST_TIMEOUT = INSTALL_TIMEOUT + 120
PHP = Path("/usr/bin/php")
GIT = Path("/usr/bin/git")
GIT_SEND_EMAIL = Path("/usr/lib/git-core/git-send-email")
# Each fixture below, and the packages whose files it needs.
FIXTURES = {"php": ("php-cli",), "git_send_email": ("git", "git-email")}


def missing(packages: Sequence[str]) -> list[str]:
    """The packages dpkg does not report as installed."""
    out = []
    for package in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if proc.stdout.strip() != "installed":
            out.append(package)
    return out


def install(packages: Sequence[str]) -> float | None:
    """Install the Debian packages not installed yet; how long it took (None: none was
    missing). Waits on the suite's apt lock, and so on any other install the suite runs."""
    if not missing(packages):
        return None
    with apt_lock():
        wanted = missing(packages)  # another worker may have installed them meanwhile
        if not wanted:
            return None
        started = time.monotonic()
        deadline = started + INSTALL_TIMEOUT
        _apt_get(deadline, "update")
        _apt_get(deadline, "install", "-y", "--no-install-recommends", *wanted)
    still = missing(packages)
    if still:
        raise RuntimeError(f"apt-get install succeeded, but dpkg lists {still} as not installed")
    return time.monotonic() - started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test using one of these programs time to install its packages first."""
    for item in items:
        if any(name in FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


def _installed(fixture: str, program: Path) -> Path:
    """program, once the fixture's packages are installed; a failed install fails the test."""
    packages = FIXTURES[fixture]
    try:
        took = install(packages)
    except RuntimeError as exc:
        pytest.fail(f"cannot install Debian's {' '.join(packages)}: {exc}", pytrace=False)
    if took is not None:
        print(f"installed Debian's {' '.join(packages)} in {took:.1f}s")
    if not os.access(program, os.X_OK):
        pytest.fail(f"{' '.join(packages)} installed, but {program} is not there", pytrace=False)
    return program


@pytest.fixture(scope="session")
def php() -> Path:
    """/usr/bin/php (Debian's php-cli), installed once per session."""
    return _installed("php", PHP)


@pytest.fixture(scope="session")
def git_send_email() -> Path:
    """/usr/bin/git with its send-email command (Debian's git-email), installed once per
    session."""
    _installed("git_send_email", GIT_SEND_EMAIL)
    return GIT
