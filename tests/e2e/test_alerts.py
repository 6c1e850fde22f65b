"""The shipped Prometheus files: rules and example config valid by promtool, the alert rules' own
unit tests pass, and every alert is tested both firing and quiet."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from tests.support.prometheus import PrometheusTools


CONF = Path(__file__).resolve().parents[2] / "conf" / "prometheus"
RULES = CONF / "relay-alerts.yml"
RULE_TESTS = CONF / "relay-alerts.test.yml"
ALERTS = {
    "RelayDown": "critical",
    "RelayQueueAgeGrowing": "warning",
    "RelayQueueAgeCritical": "critical",
    "RelayDeadLetterGrowth": "warning",
    "RelayDeferralRatioHigh": "warning",
    "RelaySpoolDiskLow": "warning",
    "RelaySpoolBelowReserve": "critical",
    "RelayWebhookLagging": "warning",
}


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    "args",
    [
        ("check", "rules", "relay-alerts.yml"),
        ("test", "rules", "relay-alerts.test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
    ids=" ".join,
)
def test_promtool_accepts(prometheus_tools: PrometheusTools, args: tuple[str, ...]) -> None:
    code, output = prometheus_tools.run_promtool(*args, cwd=CONF)
    assert code == 0, f"promtool {' '.join(args)} exited {code}:\n{output}"


def test_every_alert_has_severity_for_and_annotations() -> None:
    [group] = load(RULES)["groups"]
    assert group["name"] == "relay"
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert {name: rule["labels"]["severity"] for name, rule in rules.items()} == ALERTS
    for name, rule in rules.items():
        assert rule["for"], name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert "$value" in rule["annotations"]["description"], name


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = [case for test in load(RULE_TESTS)["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == set(ALERTS)
    assert quiet == set(ALERTS)
