"""Config parsing: defaults, durations, and one-line errors that name the key."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import Config, ConfigError, duration, load, parse

ROOT = Path(__file__).resolve().parent.parent


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
    ],
)  # fmt: skip
def test_errors_name_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, "relay.yaml")
    assert error in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_file_is_the_defaults() -> None:
    assert parse("") == Config()


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
