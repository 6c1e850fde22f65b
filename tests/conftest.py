"""Shared fixtures (each real server is a plugin beside its code) and the no-skips rule."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.dns",
    "tests.support.mx",
    "tests.support.daemon",
    "tests.support.prometheus",
    "tests.support.browser",  # after prometheus, whose apt lock it takes
    "tests.support.programs",  # after prometheus, whose apt lock it takes
    "tests.support.tls",
]


def pytest_configure(config: pytest.Config) -> None:
    """Every daemon and CLI run a test starts is a new Python process importing relay: with
    bytecode caching off (PYTHONDONTWRITEBYTECODE, as on this machine) each one compiled
    relay's modules anew, a quarter of a CPU second each time. They keep the bytecode outside
    the tree instead."""
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) and "PYTHONPYCACHEPREFIX" not in os.environ:
        prefix = Path(tempfile.gettempdir()) / "relay-tests-pycache"
        os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is work not done: the run fails rather than count it as passing. Under
    pytest-xdist this is the controller's to say: every worker's reports reach its reporter."""
    if hasattr(session.config, "workerinput"):  # a worker: it has seen only its own tests
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\n{skipped} test(s) skipped: failing the run (no skipped work counts as passed)")
