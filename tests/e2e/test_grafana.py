"""The Grafana dashboard (conf/grafana/relay.json): importable as it is, every expression naming
metrics and labels the relay exports, and every panel showing data when a real prometheus
scrapes the real relay under a little traffic of every kind."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from relay.observe import metrics
from tests.support.daemon import RelayFactory
from tests.support.mx import MxSink
from tests.support.webhooks import Receiver

if TYPE_CHECKING:
    from tests.support.prometheus import PrometheusFactory, PrometheusServer, Sample


DASHBOARD = Path(__file__).resolve().parents[2] / "conf" / "grafana" / "relay.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
WAIT = 30.0
# What Grafana puts in place of its interval variables. The rate window is wider than Grafana's
# (4 scrape intervals) so that all of this test's traffic stays inside it however slowly a busy
# machine runs the test: a rate over a window without the traffic reads 0, and a quantile NaN.
INTERVALS = {"__rate_interval": "5m", "__interval": "15s"}
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}
ROW = "row"  # a row panel only groups the panels below it: no query


@dataclass(frozen=True)
class Target:
    """One query of one panel, as Grafana sends it."""

    panel: str
    ref: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"panel {self.panel!r}, query {self.ref}: {self.expr}"


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def queries(dashboard: dict[str, Any]) -> list[Target]:
    return [
        Target(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in dashboard["panels"]
        if panel["type"] != ROW
        for target in panel["targets"]
    ]


def datasources(node: Any) -> Iterator[Any]:
    """Every datasource reference anywhere in the model."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasources(item)


def exported() -> dict[str, set[str]]:
    """Every sample name the relay's metrics endpoint can serve, with its label names: the
    declared metrics (a counter's name ends in _total on the wire, a histogram's in _bucket,
    _sum and _count) and what the supervisor measures at each scrape."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if isinstance(collector, MetricWrapperBase):
            labels = set(collector._labelnames)
            for family in collector.describe():
                for suffix in suffixes[family.type]:
                    extra = {"le"} if suffix == "_bucket" else set()
                    names[family.name + suffix] = labels | extra
    spool = metrics.SpoolCollector(lambda: 0, lambda: metrics.Room(0, 0, 0, 0))
    for family in spool.collect():
        for sample in family.samples:
            names[sample.name] = set(sample.labels)
    return names


def unquoted(expr: str) -> str:
    """The expression with its string literals emptied (label values are not names)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def grouping(expr: str) -> set[str]:
    """The labels kept by the expression's `by (...)` clauses."""
    found = re.findall(r"\bby\s*\(([^)]*)\)", unquoted(expr))
    return {label.strip() for clause in found for label in clause.split(",") if label.strip()}


def test_the_dashboard_is_importable_and_names_only_what_the_relay_exports() -> None:
    dashboard = load()
    assert (dashboard["uid"], dashboard["title"]) == ("relay", "relay")
    assert dashboard["schemaVersion"] == 39 and dashboard["id"] is None
    assert dashboard["refresh"] == "30s" and dashboard["time"]["from"] == "now-6h"
    [source] = dashboard["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["type"] == "datasource"
    assert source["pluginId"] == "prometheus"
    required = {(r["type"], r["id"]) for r in dashboard["__requires"]}
    kinds = {panel["type"] for panel in dashboard["panels"]} - {ROW}
    assert required >= {("grafana", "grafana"), ("datasource", "prometheus")}
    assert required >= {("panel", kind) for kind in kinds}, "a panel type is not in __requires"
    for ref in datasources(dashboard):
        assert ref == DATASOURCE or ref == {"type": "grafana", "uid": "-- Grafana --"}, ref

    # Layout: unique ids, on the 24-column grid, no two panels over the same cell.
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), f"duplicate panel titles: {sorted(titles)}"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]
        if panel["type"] == ROW:
            continue
        assert panel["targets"], f"{panel['title']!r} has no query"
        assert panel["description"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]

    # Every expression: metrics that exist, their labels, one relay, Grafana's rate window.
    names = exported()
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    for target in queries(dashboard):
        expr = unquoted(target.expr)
        selectors = re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", target.expr)
        assert selectors, target
        assert {name for name, _ in selectors} == set(re.findall(r"\brelay_\w+", expr)), target
        labels = set(TARGET_LABELS)
        for name, matchers in selectors:
            assert name in names, f"{target}: the relay exports no {name}"
            labels |= names[name]
            pairs = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers))
            assert pairs.get("job") == "$job" and pairs.get("instance") == "$instance", target
            assert set(pairs) <= labels, f"{target}: no such label in {sorted(labels)}"
        assert grouping(target.expr) <= labels, f"{target}: grouped by a label it lacks"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.legend))
        assert legend <= grouping(target.expr), f"{target}: legend {legend} is aggregated away"
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}, target
        used = {v for v in re.findall(r"\$(\w+)", target.expr) if not v.startswith("__")}
        assert used <= variables, f"{target}: undefined variable"


def resolve(prom: PrometheusServer, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each template variable's first value, queried as Grafana queries it (label_values)."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = substitute(match[1], values), match[2]
        found: list[str] = []
        deadline = time.monotonic() + WAIT
        while not found and time.monotonic() < deadline:
            found = prom.api(f"label/{label}/values", **{"match[]": selector})
            time.sleep(0 if found else 0.25)
        assert found, f"variable {variable['name']}: no {label} of {selector}"
        values[variable["name"]] = sorted(found)[0]
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in {**INTERVALS, **values}.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, f"a variable left in {expr}"
    return expr


@pytest.mark.e2e
def test_every_panel_shows_data_for_a_relay_under_traffic(
    relay: RelayFactory, sink: MxSink, tmp_path: Path, prometheus: PrometheusFactory
) -> None:
    receiver = Receiver("whsec_" + "A" * 43)
    try:
        hook = {"name": "app", "url": receiver.url, "secret_file": str(tmp_path / "app.secret")}
        daemon = relay(
            {"webhooks": [hook], "delivery": {"retry": {"schedule": ["1h"]}}}, start=False
        )  # a deferral stays deferred
        daemon.cli("webhook", "secret", "app")
        daemon.start()
        receiver.secret = (tmp_path / "app.secret").read_text().split()[0]
        prom = prometheus(f"127.0.0.1:{daemon.metrics_port}")
        prom.wait_for('up{job="relay"} == 1', timeout=WAIT)

        # Delivered, bounced (a dead letter), refused at intake, then deferred by a rate limit
        # (which throttles a.test, giving the throttle panels their series) last.
        sink.script_rcpt("gone@a.test", "550 5.1.1 no such user")
        sink.script_rcpt("later@a.test", "451 4.7.28 rate limited, try again later")
        daemon.send(["ok@a.test"])
        daemon.send(["gone@a.test"])
        with daemon.smtp() as client:
            client.mail("app@sender.test")
            assert client.rcpt("no-at-sign")[0] == 501
        sink.wait_for(1, timeout=WAIT)
        daemon.wait_event("dead_lettered", timeout=WAIT)
        daemon.send(["later@a.test"])
        daemon.wait_event("throttle_changed", timeout=WAIT, destination="a.test")
        receiver.wait(lambda got: any(d["type"] == "message.deferred" for d in got), WAIT)

        prom.wait_for("relay_dead_letter_messages == 1", timeout=WAIT)

        dashboard = load()
        values = resolve(prom, dashboard)
        assert values == {"job": "relay", "instance": f"127.0.0.1:{daemon.metrics_port}"}
        # Scrapes come every second and the gauges are published every second: poll until
        # every query has a number, then name the panels that never got one.
        pending = queries(dashboard)
        answers: dict[Target, list[Sample]] = {}
        deadline = time.monotonic() + WAIT
        while pending and time.monotonic() < deadline:
            for target in list(pending):
                answers[target] = prom.query(substitute(target.expr, values))
                if any(not math.isnan(sample.value) for sample in answers[target]):
                    pending.remove(target)
            time.sleep(0.5 if pending else 0)
        assert not pending, "no data:\n" + "\n".join(f"{t} -> {answers[t]}" for t in pending)

        for target, samples in answers.items():
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.legend))
            for sample in samples:
                assert legend <= set(sample.labels), f"{target}: legend {legend} on {sample}"
        by_title = {t.panel: answers[t] for t in answers}
        assert [s.value for s in by_title["Dead letters"]] == [1.0]
        assert {s.labels["destination"] for s in by_title["Throttle level by destination"]} == {
            "a.test"
        }
        assert {s.labels["webhook"] for s in by_title["Webhook lag by endpoint"]} == {"app"}
    finally:
        receiver.close()
