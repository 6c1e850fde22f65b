"""Prometheus for tests: Debian's prometheus package installed once per session, and a real
prometheus server on loopback that scrapes one relay and answers PromQL through its HTTP API."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.support.daemon import free_port

# apt-get update plus the package (about 30 MB; 10 s here) on a slow mirror, all told.
INSTALL_TIMEOUT = 480
# pytest-timeout counts a session fixture's setup against the first test that uses it.
TEST_TIMEOUT = INSTALL_TIMEOUT + 120
# invoke-rc.d asks this script whether a package may start its service; 101 means "no", so the
# package's postinst leaves no system prometheus running on :9090 (see invoke-rc.d(8)).
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Held around every apt-get the suite runs: pytest-xdist workers each set up their own session
# fixtures, and a second apt-get fails at once on the lock the first holds.
APT_LOCK = Path(tempfile.gettempdir()) / "relay-tests-apt.lock"
QUERY_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the two binaries, and how long installing them took (None: already there)."""

    prometheus: str
    promtool: str
    install_seconds: float | None

    def run_promtool(self, *args: str, cwd: Path | None = None) -> tuple[int, str]:
        """Run promtool; return its exit status and everything it printed."""
        proc = subprocess.run(
            [self.promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
        )
        return proc.returncode, proc.stdout + proc.stderr


def _which() -> PrometheusTools | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        return None
    return PrometheusTools(prometheus, promtool, None)


def _apt_get(deadline: float, *args: str) -> None:
    """Run apt-get non-interactively; on failure raise RuntimeError with its last error line."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120", *args]
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            timeout=max(deadline - time.monotonic(), 1),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{' '.join(command)}: {exc}") from exc
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E:")] or lines or ["no output"]
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {errors[-1]}")


@contextlib.contextmanager
def apt_lock() -> Iterator[None]:
    """Wait until no other process of this suite runs apt-get, and keep it so."""
    with APT_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def install() -> PrometheusTools:
    """Install Debian's prometheus package unless both binaries are on PATH already."""
    found = _which()
    if found is not None:
        return found
    with apt_lock():
        return _which() or _install()  # another worker may have installed it meanwhile


def _install() -> PrometheusTools:
    started = time.monotonic()
    own_policy = not POLICY_RC_D.exists()
    if own_policy:
        POLICY_RC_D.write_text(
            "#!/bin/sh\n# relay tests: no service starts during install\nexit 101\n"
        )
        POLICY_RC_D.chmod(0o755)
    try:
        deadline = started + INSTALL_TIMEOUT
        _apt_get(deadline, "update")
        _apt_get(deadline, "install", "-y", "--no-install-recommends", "prometheus")
    finally:
        if own_policy:
            POLICY_RC_D.unlink()
    found = _which()
    if found is None:
        raise RuntimeError(
            "the prometheus package installed, but prometheus/promtool are not on PATH"
        )
    return PrometheusTools(found.prometheus, found.promtool, time.monotonic() - started)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test using prometheus_tools time to install the package first."""
    for item in items:
        if "prometheus_tools" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


@pytest.fixture(scope="session")
def prometheus_tools() -> PrometheusTools:
    """prometheus and promtool, installed once per session; a failed install fails the test."""
    try:
        tools = install()
    except RuntimeError as exc:
        pytest.fail(f"cannot install Debian's prometheus package: {exc}", pytrace=False)
    if tools.install_seconds is not None:
        print(f"installed Debian's prometheus package in {tools.install_seconds:.1f}s")
    return tools


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels (the metric name as __name__) and value."""

    labels: dict[str, str]
    value: float


Predicate = Callable[[list[Sample]], bool]


class PrometheusServer:
    """One prometheus process on 127.0.0.1:<free port>, scraping job `relay` every second."""

    def __init__(
        self, tools: PrometheusTools, root: Path, target: str, rule_files: Sequence[Path] = ()
    ) -> None:
        self.tools = tools
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "prometheus.yml"
        self.log = root / "prometheus.log"
        settings: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path.resolve()) for path in rule_files],
            "scrape_configs": [
                {"job_name": "relay", "static_configs": [{"targets": [target]}]},
            ],
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start prometheus and wait until /-/ready says it serves queries."""
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    self.tools.prometheus,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
            if self._get("/-/ready") is not None:
                return
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (prometheus closes its TSDB cleanly), SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # --- HTTP API ------------------------------------------------------------------------------

    def _get(self, path: str) -> bytes | None:
        """The body of a 200 answer, or None when prometheus is not (yet) answering."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=QUERY_TIMEOUT) as response:
                return bytes(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; return its `data`, or raise AssertionError with the error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}/api/v1/{path}{query}"
        try:
            with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                answer = json.load(exc)
        if answer.get("status") != "success":
            raise AssertionError(f"{url}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[Sample]:
        """Evaluate an instant PromQL query now; a scalar comes back as one unlabelled sample."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        raise AssertionError(f"{expr}: unexpected result type {data['resultType']}")

    def wait_for(
        self, expr: str, predicate: Predicate = bool, timeout: float = 30.0
    ) -> list[Sample]:
        """Query until predicate holds for the result (default: any sample at all, which with a
        PromQL comparison like `x >= 1` means "true")."""
        return self._poll(expr, lambda: self.query(expr), predicate, timeout)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health ("ok" once evaluated), lastError and alert state."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_rules(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Fetch the rules until predicate holds for them (rules load at once, evaluate later)."""
        return self._poll("rules", self.rules, predicate, timeout)

    def _poll(
        self, what: str, fetch: Callable[[], T], predicate: Callable[[T], bool], timeout: float
    ) -> T:
        """fetch() until predicate holds; AssertionError with the last answer and the scrape
        state if it never does."""
        deadline = time.monotonic() + timeout
        while True:
            answer = fetch()
            if predicate(answer):
                return answer
            if time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        raise AssertionError(
            f"{what}: condition not met within {timeout}s; last answer {answer}; "
            f"targets {self.targets()}"
        )

    def targets(self) -> list[dict[str, Any]]:
        """The scrape targets with their health and last error, for diagnostics."""
        active = self.api("targets")["activeTargets"]
        keys = ("scrapeUrl", "health", "lastError")
        return [{key: target.get(key) for key in keys} for target in active]


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture
def prometheus(tmp_path: Path, prometheus_tools: PrometheusTools) -> Iterator[PrometheusFactory]:
    """Start prometheus servers scraping a given host:port as job `relay`; stopped afterwards."""
    made: list[PrometheusServer] = []

    def make(target: str, rule_files: list[Path] | None = None) -> PrometheusServer:
        root = tmp_path / f"prometheus{len(made)}"
        server = PrometheusServer(prometheus_tools, root, target, rule_files or [])
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()
