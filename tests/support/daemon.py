"""The real daemon for end-to-end tests: `relay serve` as a subprocess on loopback, its JSON log
lines collected, its CLI run as a user would run it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dns import DnsServer
from tests.support.mx import MxNet, MxSink, free_port


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


class Relay:
    """One relay daemon: config file, spool, process, log lines and an SMTP client."""

    def __init__(self, root: Path, settings: dict[str, Any], source: Path | None = None) -> None:
        self.root = root
        self.source = source  # a directory holding another relay/ package to run (the bench)
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.spool = root / "spool"
        self.config = root / "relay.yaml"
        base = {
            "smtp": {"listen": [f"127.0.0.1:{self.port}"], "hostname": "relay.test"},
            "spool": {"path": str(self.spool)},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            # Timeouts long enough for the test process's own MX sink and DNS server on a busy
            # machine (pytest-xdist workers side by side): a reply that comes late but comes must
            # not turn into a retry (and, after the final dot, a second copy). Tests of the
            # timeouts set their own.
            "delivery": {
                "helo_name": "relay.test",
                "connect_timeout": "10s",
                "command_timeout": "30s",
                "data_timeout": "60s",
                "dns": {"timeout": "5s"},
                "retry": {"schedule": ["1s"], "max_age": "1h", "jitter": 0},
            },
        }
        if source is None or (source / "relay" / "api").is_dir():  # a revision with the API
            base["api"] = {"listen": ""}  # off unless a test turns it on (api_on)
        if source is None or (source / "relay" / "bounces").is_dir():  # a revision with DSNs
            # Off unless a test turns them on: a failure would otherwise send a DSN to the
            # sender's domain, which most tests do not route (tests/e2e/test_bounces.py).
            base["bounces"] = {"enabled": False}
        final = merge(base, settings)
        self.config.write_text(yaml.safe_dump(final))
        listen = final.get("api", {}).get("listen")
        self.api_url = f"http://{listen}" if listen else None
        self.lines: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    # --- process -------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        mark = len(self.lines)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.source,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()
        self.wait_event("ready", timeout, since=mark, process="supervisor")

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for raw in proc.stdout:
                try:
                    self.lines.append(json.loads(raw))
                except ValueError:
                    self.lines.append({"event": "raw", "text": raw.decode(errors="replace")})

    def stop(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float) -> int:
        """The exit status once the supervisor has ended; AssertionError with the last log
        lines if it is still running after timeout seconds."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s; {self.tail()}") from None
        self.reader.join(10)
        return code

    def kill9(self) -> None:
        """SIGKILL the supervisor and both workers at once (the whole process group)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)

    def worker_pid(self, role: str) -> int:
        started = [e for e in self.lines if e.get("event") == "started" and e.get("role") == role]
        return int(started[-1]["pid"])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()

    # --- logs ----------------------------------------------------------------------------------

    def events(self, name: str, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.lines[since:]
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(
        self, name: str, timeout: float = 10.0, count: int = 1, since: int = 0, **match: Any
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name, since, **match)
            if len(found) >= count:
                return found
            if self.proc is not None and self.proc.poll() is not None and name != "stopped":
                break
            time.sleep(0.02)
        raise AssertionError(f"no {count}x {name} {match} within {timeout}s; {self.tail()}")

    def tail(self, count: int = 15) -> str:
        """The last log lines, for a failure's message."""
        return "last lines:\n" + "\n".join(json.dumps(e) for e in self.lines[-count:])

    # --- clients -------------------------------------------------------------------------------

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=10)
        client.ehlo()
        return client

    def send(
        self,
        rcpts: list[str],
        body: bytes = b"Subject: test\r\n\r\nhello\r\n",
        sender: str = "app@sender.test",
    ) -> str:
        """Submit one message; return its queue id from `250 2.0.0 queued as <id>`."""
        with self.smtp() as client:
            code, text = client.mail(sender)
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, code, text)
            code, text = client.data(body)
        reply = text.decode()
        assert code == 250 and reply.startswith("2.0.0 queued as "), (code, reply)
        return reply.rsplit(" ", 1)[1]

    def get(self, path: str) -> tuple[int, str]:
        """Status and body of a GET on the metrics endpoint, whatever the status."""
        try:
            with urllib.request.urlopen(f"{self.metrics_url}{path}", timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode()

    def api(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body (None if empty) of a request to the HTTP API; body is
        sent as JSON, raw_body as it is."""
        assert self.api_url, "turn the API on: relay(api_on())"
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        data = raw_body if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"{self.api_url}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, head, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, head, raw = exc.code, dict(exc.headers), exc.read()
        return status, head, json.loads(raw) if raw else None

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample /metrics serves, by name and sorted labels."""
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.samples()[(name, tuple(sorted(labels.items())))]

    def change_config(self, **changes: object) -> None:
        """Rewrite the config file: section__key[__subkey]=value (reload it with SIGHUP)."""
        settings = yaml.safe_load(self.config.read_text())
        for dotted, value in changes.items():
            section, key, *rest = dotted.split("__")
            target = settings.setdefault(section, {})
            if rest:
                target = target.setdefault(key, {})
                key = rest[0]
            target[key] = value
        self.config.write_text(yaml.safe_dump(settings))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "relay", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def cli_json(self, *args: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli(*args, "--json").stdout))


RelayFactory = Callable[..., Relay]


def api_on(**settings: Any) -> dict[str, Any]:
    """Settings turning the HTTP API on, on a free loopback port (api.tokens_file=… etc.)."""
    return {"api": {"listen": f"127.0.0.1:{free_port()}", **settings}}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll check (a gauge is published once a second) until it holds; fail at timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@contextlib.contextmanager
def under_systemd(
    tmp_path: Path, start: Callable[[], Relay]
) -> Iterator[tuple[socket.socket, Relay]]:
    """Start a relay as systemd starts a Type=notify unit with WatchdogSec=1s; its messages
    come on a socket of our own."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(10)
        os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"] = path, "1000000"
        try:
            daemon = start()
        finally:
            del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
        yield notify, daemon


@pytest.fixture
def relay(tmp_path: Path, dns_server: DnsServer, mx: MxNet) -> Iterator[RelayFactory]:
    """Build and start a relay using the test DNS server and MX port; settings override."""
    made: list[Relay] = []

    def make(settings: dict[str, Any] | None = None, start: bool = True) -> Relay:
        wiring = {"delivery": {"port": mx.port, "dns": {"nameservers": [dns_server.address]}}}
        daemon = Relay(tmp_path / f"relay{len(made)}", merge(wiring, settings or {}))
        made.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    try:
        for daemon in made:
            if daemon.proc is not None and daemon.proc.poll() is None:
                assert daemon.stop() == 0, "relay serve did not exit 0 on SIGTERM"
            daemon.close()
            raw = [e["text"] for e in daemon.lines if e.get("event") == "raw"]
            assert not any("Traceback" in t for t in raw), f"the daemon printed a traceback: {raw}"
    finally:  # a daemon that would not stop is killed, not left to the next test
        for daemon in made:
            daemon.close()


@pytest.fixture
def sink(dns_server: DnsServer, mx: MxNet) -> MxSink:
    """The MX of a.test: mx.a.test, a sink on 127.0.0.2."""
    sink = mx.sink("127.0.0.2")
    dns_server.mx("a.test", (10, "mx.a.test"))
    dns_server.a("mx.a.test", "127.0.0.2")
    return sink
