"""End to end through Prometheus: the real relay's metrics endpoint, read directly, and scraped by a
real prometheus whose PromQL answers follow mail being delivered, bounced and deferred."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.daemon import RelayFactory
from tests.support.mx import MxSink

if TYPE_CHECKING:
    from tests.support.prometheus import PrometheusFactory


RULES = Path(__file__).resolve().parents[2] / "conf" / "prometheus" / "relay-alerts.yml"
WAIT = 30.0


def test_endpoint_reports_zeros_health_and_readiness_before_any_mail(relay: RelayFactory) -> None:
    daemon = relay()
    code, body = daemon.get("/metrics")
    assert code == 200, body
    lines = body.splitlines()
    assert 'relay_messages_rejected_total{reason="relay_denied"} 0.0' in lines, body
    assert 'relay_queue_messages{state="held"} 0.0' in lines, body
    code, body = daemon.get("/healthz")
    assert (code, body.strip()) == (200, "ok")
    code, body = daemon.get("/readyz")
    assert code == 200, body


def test_prometheus_sees_mail_delivered_bounced_and_deferred(
    relay: RelayFactory, sink: MxSink, prometheus: PrometheusFactory
) -> None:
    daemon = relay({"delivery": {"retry": {"schedule": ["1h"]}}})  # a deferral stays deferred
    prom = prometheus(f"127.0.0.1:{daemon.metrics_port}", rule_files=[RULES])
    prom.wait_for('up{job="relay"} == 1', timeout=WAIT)

    daemon.send(["user@a.test"])
    sink.wait_for(1, timeout=WAIT)
    prom.wait_for('relay_messages_received_total{job="relay"} >= 1', timeout=WAIT)
    prom.wait_for('relay_recipients_total{result="delivered"} >= 1', timeout=WAIT)

    sink.script_rcpt("gone@a.test", "550 5.1.1 no such user")
    daemon.send(["gone@a.test"])
    prom.wait_for("relay_dead_letter_messages == 1", timeout=WAIT)
    prom.wait_for('relay_recipients_total{result="bounced"} >= 1', timeout=WAIT)

    sink.script_rcpt("later@a.test", "451 4.3.0 try later")
    daemon.send(["later@a.test"])
    prom.wait_for('relay_queue_messages{state="deferred"} == 1', timeout=WAIT)
    prom.wait_for(
        'relay_delivery_attempts_total{outcome="temporary", provider="other"} >= 1', timeout=WAIT
    )
    prom.wait_for('relay_delivery_deferrals_total{provider="other"} >= 1', timeout=WAIT)

    # The shipped alert rules evaluate cleanly against the real series, and RelayDown watches
    # the job this relay is scraped as: quiet while it is up, pending once it stops.
    rules = prom.wait_rules(lambda rules: all(r["health"] == "ok" for r in rules), timeout=WAIT)
    assert {rule["name"] for rule in rules} >= {"RelayDown", "RelayDeferralRatioHigh"}
    assert prom.query('ALERTS{alertname="RelayDown"}') == []
    assert daemon.stop() == 0
    prom.wait_for('ALERTS{alertname="RelayDown", alertstate="pending", job="relay"}', timeout=WAIT)
