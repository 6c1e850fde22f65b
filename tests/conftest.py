"""Shared fixtures (each real server is a plugin beside its code) and the no-skips rule."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.support.dns",
    "tests.support.mx",
    "tests.support.daemon",
    "tests.support.prometheus",
    "tests.support.tls",
]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is work not done: the run fails rather than count it as passing."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n{skipped} test(s) skipped: failing the run (no skipped work counts as passed)")
