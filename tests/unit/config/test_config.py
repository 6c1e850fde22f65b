"""Config parsing: defaults, durations, and one-line errors that name the key."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Config, load, parse
from relay.config.values import duration
from tests.support.config import error_of

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("3d", 259200), (45, 45), (1.5, 1.5), ("10", 10),
     ("0.5s", 0.5), (" 2m ", 120)],
)  # fmt: skip
def test_duration(text: str | int | float, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "m", "", "-1s", "1w", True, "5 minutes"])
def test_bad_duration(text: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        duration(text)


def test_example_config_is_the_defaults_except_spool_path() -> None:
    example = load(ROOT / "conf" / "relay.yaml")
    defaults = Config()
    assert example.smtp == defaults.smtp
    assert example.delivery == defaults.delivery
    assert example.metrics == defaults.metrics
    assert example.lifecycle == defaults.lifecycle
    assert example.providers == defaults.providers
    assert example.dkim == defaults.dkim
    assert example.lanes == defaults.lanes
    assert example.destinations == defaults.destinations
    assert example.throttle == defaults.throttle
    assert example.quotas == defaults.quotas
    assert example.routes == defaults.routes
    assert example.spool.path == Path("var/spool").absolute()
    assert defaults.spool.path == Path("/var/spool/relay")


def test_contract_keys() -> None:
    cfg = parse(
        """
smtp:
  listen: ["127.0.0.1:2525", "[::1]:2526"]
  hostname: relay.example.net
  max_message_size: 1000
  max_recipients: 3
  relay_networks: ["10.0.0.0/8"]
spool: {path: /tmp/x}
delivery:
  port: 2500
  helo_name: out.example.net
  concurrency: 7
  dns: {nameservers: ["127.0.0.1:5353"], timeout: 2s}
  retry: {schedule: [1m, 1h], max_age: 1d, jitter: 0}
metrics: {listen: "127.0.0.1:9100"}
"""
    )
    assert cfg.smtp.listen == (("127.0.0.1", 2525), ("::1", 2526))
    assert cfg.smtp.relay_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert cfg.delivery.dns.nameservers == (("127.0.0.1", 5353),)
    assert cfg.delivery.retry.schedule == (60.0, 3600.0)
    assert cfg.delivery.retry.max_age == 86400.0
    assert cfg.delivery.retry.jitter == 0.0
    assert cfg.metrics.listen == ("127.0.0.1", 9100)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("smtp: {listen: [x]}", "smtp.listen: [0] 'x' is not host:port"),
        ("smtp: {listen: '1.2.3.4:25'}", "smtp.listen: '1.2.3.4:25' is not a list"),
        ("smtp: {listen: ['1.2.3.4:99999']}", "smtp.listen: [0] 99999 is not a TCP port"),
        ("smtp: {max_recipients: 0}", "smtp.max_recipients: 0 must be at least 1"),
        ("smtp: {max_message_size: big}", "smtp.max_message_size: 'big' is not an integer"),
        ("smtp: {relay_networks: [300.1.1.1/8]}", "smtp.relay_networks: [0] '300.1.1.1/8' is not an IP network"),
        ("smtp: {hostname: 'bad host'}", "smtp.hostname: 'bad host' is not a host name"),
        ("smtp: {colour: blue}", "smtp.colour: unknown key"),
        ("delivery: {retry: {schedule: [5m, 5x]}}", "delivery.retry.schedule: [1] '5x' is not a duration"),
        ("delivery: {retry: {schedule: []}}", "delivery.retry.schedule: must list at least one duration"),
        ("delivery: {retry: {jitter: 1.5}}", "delivery.retry.jitter: 1.5 must be at least 0 and below 1"),
        ("delivery: {retry: {max_age: forever}}", "delivery.retry.max_age: 'forever' is not a duration"),
        ("delivery: {dns: {nameservers: [8.8.8.8]}}", "delivery.dns.nameservers: [0] '8.8.8.8' is not host:port"),
        ("delivery: {dns: {nameservers: ['localhost:53']}}", "'localhost' is not an IP address"),
        ("delivery: {port: 0}", "delivery.port: 0 must be at least 1"),
        ("delivery: 5", "delivery: expected a mapping of keys"),
        ("- a\n- b", "top level: expected a mapping of keys"),
        ("smtp: {listen: [", "line"),
        ("lanes: {low_share: 0}", "lanes.low_share: 0 is not a share above 0 and at most 0.5"),
        ("lanes: {users: {alice: urgent}}", "lanes.users: alice: 'urgent' is not one of high, normal, low"),
        ("lanes: {listeners: {port25: high}}", "lanes.listeners: port25: 'port25' is not one of relay, submission, smtps"),
        ("destinations: {a.test: {rate: fast}}", "destinations: a.test: 'fast' is not a rate (use 10/s, 600/min, 5000/h or 0)"),
        ("destinations: {a.test: {connections: 0}}", "destinations: a.test: 0 must be at least 1"),
        ("destinations: {a.test: {conns: 2}}", "destinations: a.test: conns: unknown key (known: connections, rate)"),
        ("destinations: {'bad name!': {rate: 0}}", "destinations: bad name!: not a provider name or a domain"),
        ("throttle: {patterns: ['(']}", "throttle.patterns: [0] '(' is not a regular expression"),
        ("throttle: {suspend: [{pattern: TS03}]}", "throttle.suspend: [0] {'pattern': 'TS03'} needs exactly pattern and for"),
        ("quotas: {users: {alice: {weekly: 5}}}", "quotas.users: alice: weekly: not hourly, daily or a duration of 1s or more"),
        ("quotas: {users: {alice: {hourly: 0}}}", "quotas.users: alice: hourly: 0 must be at least 1"),
        ("quotas: {action: drop}", "quotas.action: 'drop' is not one of hold, refuse"),
        ("routes: [{domains: [a.test]}]", "routes: [0] a route needs exactly domains and via"),
        ("routes: [{domains: [a.test], via: [{port: 25}]}]", "routes: [0] via[0] host: missing"),
        ("routes: [{domains: [a.test], via: [{host: h.test, username: u}]}]", "routes: [0] via[0] username and password (or password_file) go together"),
        ("routes: [{domains: [a.test], via: [{host: h.test, tls: maybe}]}]", "'maybe' is not one of starttls, smtps, opportunistic, none"),
        ("routes: [{domains: [a.test], via: [{host: h.test, password_file: /nonexistent/pw, username: u}]}]", "password_file /nonexistent/pw: cannot read"),
        ("destinations: {gmial: {connections: 5}}", "destinations: gmial: not a domain nor a provider (known: default, gmail, icloud, outlook, yahoo)"),
        ("delivery: {reuse: {max_messages: 0}}", "delivery.reuse.max_messages: 0 must be at least 1"),
    ],
)  # fmt: skip
def test_errors_name_the_key(text: str, error: str) -> None:
    assert error in error_of(text)


def test_empty_file_is_the_defaults() -> None:
    assert parse("") == Config()


@pytest.mark.parametrize(
    ("domain", "mx_host", "destination", "connections", "rate"),
    [
        ("a.test", "mx.a.test", "a.test", 2, 0.0),  # its own entry
        ("b.test", "mx.shared.test", "mx.shared.test", 3, 0.5),  # its MX host's entry
        ("corp.test", "aspmx.l.google.com", "gmail", 10, 0.0),  # its provider's
        ("c.test", "mx.c.test", "c.test", 20, 10.0),  # the default, on its own
        ("[192.0.2.1]", None, "[192.0.2.1]", 20, 10.0),
    ],
)
def test_destination_of_a_domain(
    domain: str, mx_host: str | None, destination: str, connections: int, rate: float
) -> None:
    cfg = parse(
        "destinations: {a.test: {connections: 2}, mx.shared.test: {connections: 3, rate: 30/min},"
        " default: {rate: 10/s}}"
    )
    assert cfg.destination(domain, mx_host) == destination
    limits = cfg.limits(destination)
    assert (limits.connections, limits.rate) == (connections, rate)


@pytest.mark.parametrize(
    ("domain", "via"),
    [
        ("a.test", "smart.test"),
        ("x.b.test", "smart.test"),
        ("b.test", None),
        ("c.test", "catch.test"),
    ],
)
def test_the_first_route_that_matches_wins(domain: str, via: str | None) -> None:
    cfg = parse(
        "routes:\n"
        "  - {domains: [a.test, .b.test], via: [{host: smart.test, port: 587}]}\n"
        "  - {domains: [b.test], via: mx}\n"
        "  - {domains: ['*'], via: [{host: catch.test, tls: none}]}\n"
    )
    rule = cfg.route_rule(domain)
    assert (rule.via[0].host if rule else None) == via


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("delivery:\n  retry:\n    schedule: [5m, soon]\n", "delivery.retry.schedule: [1] 'soon'"),
        ("smtp: [", "relay.yaml: line"),
    ],
)
def test_check_config_command_prints_one_line(tmp_path: Path, content: str, fragment: str) -> None:
    file = tmp_path / "relay.yaml"
    file.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 78
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_config_accepts_the_example() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(ROOT / "conf/relay.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
