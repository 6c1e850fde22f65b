"""Side-by-side benchmark: the relay, a tuned Postfix and the bench's earlier Postfix (each a pure
relay on the same machine to the same sink), fed by Postfix's smtp-source and delivering to its
smtp-sink on loopback, alternating within each round and adding rounds where a case's ratios
spread wide; writes a Markdown table and the raw JSON under bench/results/ (every loop bounded in
count and time)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paced
from systems import TUNING, Sink, System, instance

ROOT = Path(__file__).resolve().parent.parent
SENDER, RCPT = "bench@source.test", "user@sink.test"
PROBE_EVERY = 0.05  # seconds between latency probes while smtp-source loads the server
HALF_BASIS = 20  # sessions whose max rate the half-load cases take half of
# The relay, the tuned Postfix the ratios are taken against, the bench's Postfix before issue 12.
SYSTEMS = ("relay", "postfix", "postfix-old")
RELAY, POSTFIX, OLD = SYSTEMS


@dataclass(frozen=True)
class Case:
    size: int  # bytes per message
    sessions: int  # smtp-source's parallel sessions
    messages: int


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) if match else 0
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of the processes and of their children that have exited (a parent
    that reaped them holds their time: Postfix's master reaps its daemons)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def sampling(sample: Callable[[], None], every: float) -> Iterator[None]:
    """Call sample every `every` seconds in a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every):
            sample()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def probe(port: int, body: bytes) -> float:
    """One message over a new connection, connect to 250 after DATA: the accept latency."""
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.test", timeout=30) as client:
        client.sendmail(SENDER, [RCPT], body)
    return time.perf_counter() - started


def message(size: int) -> bytes:
    """The probe's and the paced load's message: a header and `size` bytes or so of text."""
    return b"Subject: probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)


def measure(system: System, sink: Sink, case: Case, limit: float) -> dict[str, Any]:
    """Load the system with smtp-source; time acceptance and the sink's count; sample RSS
    and accept latency (a probe message every PROBE_EVERY s) meanwhile."""
    deadline = time.monotonic() + limit
    body = message(case.size)
    latencies: list[float] = []
    failures: list[str] = []
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], rss_kib(system.pids()))

    def probe_loop(stop: threading.Event) -> None:
        while not stop.wait(PROBE_EVERY) and time.monotonic() < deadline:
            try:
                latencies.append(probe(system.port, body))
            except (OSError, smtplib.SMTPException) as exc:
                failures.append(str(exc))

    start_count, cpu = sink.count, cpu_seconds(system.pids())
    stop = threading.Event()
    prober = threading.Thread(target=probe_loop, args=(stop,), daemon=True)
    with sampling(sample, 0.1):
        t0 = time.perf_counter()
        prober.start()
        subprocess.run(
            ["smtp-source", "-s", str(case.sessions), "-m", str(case.messages),
             "-l", str(case.size), "-f", SENDER, "-t", RCPT, "-M", "source.test",
             f"127.0.0.1:{system.port}"],
            check=True, timeout=max(1.0, deadline - time.monotonic()), capture_output=True,
        )  # fmt: skip
        accepted = time.perf_counter() - t0
        stop.set()
        prober.join()
        expected = start_count + case.messages + len(latencies)
        complete = sink.wait_for(expected, deadline)
        total = time.perf_counter() - t0
    cpu = cpu_seconds(system.pids()) - cpu
    latencies.sort()
    return {
        "accept_per_s": round(case.messages / accepted, 1),
        "end_to_end_per_s": round(case.messages / total, 1) if complete else None,
        "accept_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "accept_p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "probes": len(latencies),
        "probe_failures": failures[:3],
        "peak_rss_mib": round(peak[0] / 1024, 1),
        "cpu_ms_per_message": round(cpu * 1000 / (case.messages + len(latencies)), 3),
        "complete": complete,
    }


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


def run_one(name: str, case: Case, limit: float) -> dict[str, Any]:
    with instance(name) as (system, sink):
        return measure(system, sink, case, limit)


def measure_half(system: System, sink: Sink, size: int, rate: float, args: Any) -> dict[str, Any]:
    """Paced open-loop load (bench/paced.py) at `rate`, then wait for the sink to have it all."""
    deadline = time.monotonic() + args.max_seconds
    start_count = sink.count
    load = paced.paced(system.port, rate, (SENDER, RCPT), message(size), args.half_seconds,
                       args.max_seconds)  # fmt: skip
    out = asyncio.run(load)
    lat = out.latencies
    return {
        "messages": out.messages,
        "accepted": len(lat),
        "errors": out.errors,
        "late": out.late,
        "failures": out.failures[:3],
        "achieved_per_s": round(paced.achieved_per_s(out), 1),
        **{f"accept_{name}_ms": round(percentile(lat, q) * 1000, 2) if lat else None
           for name, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))},
        "accept_max_ms": round(lat[-1] * 1000, 2) if lat else None,
        "complete": sink.wait_for(start_count + len(lat), deadline),
    }  # fmt: skip


def half_rates(raw: list[dict[str, Any]], sizes: list[int]) -> dict[int, tuple[float, int]]:
    """Per size: half the relay's median accepted/s at HALF_BASIS sessions (else the most
    sessions measured), and the sessions it was taken at."""
    rates = {}
    for size in sizes:
        measured = {r["sessions"] for r in select(raw, "max_rate", RELAY, size=size)}
        if not measured:
            continue
        basis = HALF_BASIS if HALF_BASIS in measured else max(measured)
        accept = median_of(select(raw, "max_rate", RELAY, size=size, sessions=basis),
                           "accept_per_s")  # fmt: skip
        rates[size] = (round((accept or 0) / 2, 1), basis)
    return rates


def rotation(systems: Sequence[str], round_: int) -> list[str]:
    """The order of one round: each round starts one system further on, so every system takes
    every place in turn (this machine's speed drifts within minutes)."""
    shift = round_ % len(systems)
    return [*systems[shift:], *systems[:shift]]


def run_rounds(cases: list[Case], systems: Sequence[str], args: Any) -> list[dict[str, Any]]:
    """Every case: rounds of all systems in rotation, args.runs of them, then more while the
    first two systems' per-round ratios spread wide, within the case's share of the budget
    (more_rounds)."""
    raw: list[dict[str, Any]] = []
    started = time.monotonic()
    for index, case in enumerate(cases):
        share = started + args.budget * 60 * (index + 1) / len(cases)
        rows: list[dict[str, Any]] = []
        for round_ in range(max(args.runs, args.max_runs)):
            if not more_rounds(rows, round_, systems, args, share):
                break
            for name in rotation(systems, round_):
                measured = run_one(name, case, args.max_seconds)
                rows.append({"kind": "max_rate", "system": name, "run": round_, **vars(case),
                             **measured})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        raw += rows
    return raw


def more_rounds(
    rows: list[dict[str, Any]], done: int, systems: Sequence[str], args: Any, until: float
) -> bool:
    """args.runs rounds; then another while the end-to-end ratio of the first two systems
    (relay / Postfix) varies between rounds by more than args.spread of its median, up to
    args.max_runs rounds and only until `until` (monotonic): the cases share args.budget, so an
    early noisy case cannot take the later ones' extra rounds."""
    if done < args.runs:
        return True
    if time.monotonic() > until:
        return False
    ratios = round_ratios(rows, "end_to_end_per_s", systems[0], systems[1])
    return spread(ratios) > float(args.spread)


def run_half(
    rates: dict[int, tuple[float, int]], systems: Sequence[str], args: Any
) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    for size, (rate, basis) in rates.items():
        if rate <= 0:
            continue
        for run in range(args.runs):
            for name in rotation(systems, run):
                with instance(name) as (system, sink):
                    measured = measure_half(system, sink, size, rate, args)
                head = {"kind": "half_load", "system": name, "run": run, "size": size}
                raw.append({**head, "basis_sessions": basis, "rate_per_s": rate, **measured})
                print(json.dumps(raw[-1]), flush=True)
    return raw


def rounds_arguments(
    parser: argparse.ArgumentParser, runs: int, max_runs: int, sessions: str, systems: Sequence[str]
) -> None:
    """The options of a run in rounds, shared with bench/postfix_tuning.py."""
    parser.add_argument("--sessions", default=sessions, help="comma-separated")
    parser.add_argument("--sizes", default="1024,102400", help="bytes, comma-separated")
    parser.add_argument("--systems", default=",".join(systems),
                        help="comma-separated names (bench/systems.py)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=runs, help="rounds of every case")
    parser.add_argument("--max-runs", type=int, default=max_runs,
                        help="rounds of a case whose ratios spread beyond --spread")  # fmt: skip
    parser.add_argument("--spread", type=float, default=0.15,
                        help="(max - min) / median of a case's per-round ratios")  # fmt: skip
    parser.add_argument("--budget", type=float, default=30.0,
                        help="minutes of rounds; each case may start extra rounds until its share "
                             "of them has passed")  # fmt: skip
    parser.add_argument(
        "--messages", type=int, default=1000, help="per run at 1 KiB; half at 100 KiB"
    )
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per run")


def make_cases(args: Any) -> list[Case]:
    """Every size with every session count; messages over 10 KiB get half the count."""
    return [
        Case(size, sessions, args.messages if size <= 10_240 else max(1, args.messages // 2))
        for size in map(int, args.sizes.split(","))
        for sessions in map(int, args.sessions.split(","))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    rounds_arguments(parser, runs=3, max_runs=7, sessions="1,20,100", systems=SYSTEMS)
    parser.add_argument("--half-seconds", type=float, default=15.0,
                        help="each paced run at 50%% of the relay's max rate")  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--scale", help="scale results (bench/scale.py); default OUT/scale.json")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite OUT/latest.md from OUT/latest.json, run nothing")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    scale = Path(args.scale) if args.scale else out / "scale.json"
    if args.render_only:
        publish(out, json.loads((out / "latest.json").read_text()), scale)
        return
    if shutil.which("smtp-source") is None:
        sys.exit("bench: smtp-source not found; `make bench` installs Debian's postfix")
    started, systems = time.monotonic(), args.systems.split(",")
    cases = make_cases(args)
    raw = run_rounds(cases, systems, args)
    raw += run_half(half_rates(raw, sorted({case.size for case in cases})), systems, args)
    write(
        out,
        raw,
        scale,
        {"systems": systems, "minutes": round((time.monotonic() - started) / 60, 1)},
    )


def write(out: Path, raw: list[dict[str, Any]], scale: Path, extra: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "postfix": version.stdout.strip(),
        "postfix_tuning": {name: setting.lines() for name, setting in TUNING.items()},
        **extra,
    }
    results = {**meta, "runs": raw}
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    publish(out, results, scale)


def publish(out: Path, results: dict[str, Any], scale: Path) -> None:
    """Render latest.md from the results (and scale.json when there is one); print it."""
    scaled = json.loads(scale.read_text()) if scale.is_file() else None
    raw = legacy(results)
    cases = list(dict.fromkeys(
        Case(r["size"], r["sessions"], r["messages"]) for r in raw
        if r.get("kind", "max_rate") == "max_rate"))  # fmt: skip
    text = render(raw, cases, results, scaled)
    (out / "latest.md").write_text(text)
    print(text)


def legacy(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs; in results from before issue 12 (no "systems") "postfix" was what is now
    "postfix-old"."""
    if "systems" in results:
        return list(results["runs"])
    return [
        {**r, "system": OLD if r["system"] == POSTFIX else r["system"]} for r in results["runs"]
    ]


RATES = (("end_to_end_per_s", "end to end/s"), ("accept_per_s", "accepted/s"))
OTHERS = (
    ("accept_p50_ms", "accept p50 ms"), ("accept_p99_ms", "accept p99 ms"),
    ("peak_rss_mib", "peak RSS MiB"), ("cpu_ms_per_message", "CPU ms/message"),
)  # fmt: skip
HALF_METRICS = (("accept_p50_ms", "accept p50 ms"), ("accept_p99_ms", "accept p99 ms"))


def render(raw: list[dict[str, Any]], cases: list[Case], meta: dict[str, Any], scale: Any) -> str:
    """The targets, then per case and system the median of the rounds with their range, and
    the relay / Postfix ratios: at max rate (smtp-source), then at 50% of the relay's max rate
    (paced)."""
    took = f" The whole run took {meta['minutes']:g} min." if "minutes" in meta else ""
    return "\n".join([
        f"Benchmark {meta['date']} on {meta['machine']}; Postfix {meta['postfix']}. "
        "Postfix is tuned as a pure relay to one next hop (bench/systems.py TUNING, "
        "bench/results/postfix-tuning.md); old Postfix is the bench's configuration before "
        "issue 12. The systems alternate within each round; a figure is the median of the "
        "rounds with their range (min-max), a ratio the median of the per-round ratios "
        f"relay / Postfix with their range.{took}",
        "", *render_targets(raw, scale),
        "", "## Max rate (smtp-source)", "", *render_metrics(raw, cases, RATES, spread_cell),
        "", *render_metrics(raw, cases, OTHERS, median_cell),
        "", "## Accept latency at 50% of the relay's max rate", "", *render_half(raw),
    ]) + "\n"  # fmt: skip


def render_metrics(
    raw: list[dict[str, Any]], cases: list[Case], metrics: tuple[tuple[str, str], ...], cell: Cell
) -> list[str]:
    """One row per case: each metric's relay, Postfix, old Postfix (by `cell`) and ratios."""
    lines = [
        "| size | sessions | messages | rounds | " + " | ".join(
            f"{title} relay | Postfix | ratio | old Postfix | ratio to old"
            for _, title in metrics) + " |",
        "|---|---|---|---|" + "---|---|---|---|---|" * len(metrics),
    ]  # fmt: skip
    for case in cases:
        match = {"size": case.size, "sessions": case.sessions}
        rounds = len({r["run"] for r in select(raw, "max_rate", RELAY, **match)})
        cells = [f"{case.size // 1024} KiB", str(case.sessions), str(case.messages), str(rounds)]
        for key, _ in metrics:
            cells += compared(raw, "max_rate", key, cell, **match)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_half(raw: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Open loop (bench/paced.py): one message per new connection, message i started at "
        "t0 + i/rate whatever the others are doing, latency from its scheduled start to the "
        "250 after DATA; rate = 50% of the relay's median accepted/s at the sessions shown. "
        "Errors (not accepted) and late starts (> 10 ms behind schedule) summed over the runs.",
        "",
        "| size | sessions | rate/s | messages | achieved/s relay | Postfix | old Postfix | "
        + " | ".join(f"{title} relay | Postfix | ratio | old Postfix | ratio to old"
                     for _, title in HALF_METRICS)
        + " | errors relay | Postfix | old Postfix | late relay | Postfix | old Postfix |",
        "|---|---|---|---|---|---|---|" + "---|---|---|---|---|" * len(HALF_METRICS)
        + "---|---|---|---|---|---|",
    ]  # fmt: skip
    for size, rate, basis in half_cases(raw):
        rows = {name: select(raw, "half_load", name, size=size) for name in SYSTEMS}
        cells = [f"{size // 1024} KiB", str(basis), fmt(rate), fmt(rows[RELAY][0]["messages"])]
        cells += [fmt(median_of(rows[name], "achieved_per_s")) for name in SYSTEMS]
        for key, _ in HALF_METRICS:
            cells += compared(raw, "half_load", key, median_cell, size=size)
        cells += [fmt(sum(r[key] for r in rows[name]) if rows[name] else None)
                  for key in ("errors", "late") for name in SYSTEMS]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines if len(lines) > 4 else [*lines[:2], "Not measured."]


def half_cases(raw: list[dict[str, Any]]) -> list[tuple[int, float, int]]:
    """(size, rate, basis sessions) of each half-load case, in the order run."""
    return list(dict.fromkeys((r["size"], r["rate_per_s"], r["basis_sessions"]) for r in raw
                              if r.get("kind") == "half_load"))  # fmt: skip


SIZE_TARGETS = ((1024, 2.0), (102_400, 1.5))  # end to end at HALF_BASIS sessions: x Postfix
SCALE_TARGETS = (  # key in scale.json, label, limit, unit
    ("scheduler_rss_mib", "scheduler RSS", 1024.0, "MiB"),
    ("restart_to_first_delivery_s", "restart to first delivery", 15.0, "s"),
    ("summary_s", "`relay queue summary`", 10.0, "s"),
)


def render_targets(raw: list[dict[str, Any]], scale: Any) -> list[str]:
    lines = ["## Targets", "",
             "| target | relay | Postfix | ratio | old Postfix | ratio to old | goal | status |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for size, goal in SIZE_TARGETS:
        match = {"size": size, "sessions": HALF_BASIS}
        cells = compared(raw, "max_rate", "end_to_end_per_s", median_cell, **match)
        label = f"{size // 1024} KiB, {HALF_BASIS} sessions: end to end/s"
        value = ratio(raw, "max_rate", "end_to_end_per_s", POSTFIX, **match)
        lines.append(row([label, *cells, f"≥ {goal:.1f}x Postfix"], value, goal, True))
    rates = {size: f" ({rate:g}/s)" for size, rate, _ in half_cases(raw)}
    for size in dict.fromkeys([*(r["size"] for r in raw), *rates]):
        cells = compared(raw, "half_load", "accept_p99_ms", median_cell, size=size)
        label = (
            f"{size // 1024} KiB: accept p99 ms at 50% of the relay's max rate{rates.get(size, '')}"
        )
        value = ratio(raw, "half_load", "accept_p99_ms", POSTFIX, size=size)
        lines.append(row([label, *cells, "≤ Postfix's"], value, 1.0, False))
    lines += render_scale(scale)
    return lines


def render_scale(scale: Any) -> list[str]:
    lines = []
    for key, label, limit, unit in SCALE_TARGETS:
        value = scale.get(key) if isinstance(scale, dict) else None
        if not isinstance(value, int | float):
            lines.append(f"| {label} | not measured (run `make bench-scale`) | - | - | - | - | "
                         f"≤ {limit:g} {unit} | not measured |")  # fmt: skip
            continue
        cell = f"{value:g} {unit}"
        if key == "summary_s" and scale.get("summary_offline_s") is not None:
            cell += f" (offline {scale['summary_offline_s']:g} s)"
        if key == "scheduler_rss_mib" and scale.get("messages") is not None:
            label += f", {scale['messages']:,} messages queued"
        cells = [label, cell, "-", "-", "-", "-", f"≤ {limit:g} {unit}"]
        lines.append(row(cells, value, limit, False))
    if isinstance(scale, dict) and scale.get("measured_at"):
        lines += ["", f"Scale rows: bench/scale.py, measured {scale['measured_at']}."]
    return lines


def row(cells: list[str], value: float | None, goal: float, at_least: bool) -> str:
    """A target row with its status: met, or how far the value is from the goal."""
    if value is None:
        status = "not measured"
    elif value >= goal if at_least else value <= goal:
        status = "met"
    else:
        status = f"not met ({value / goal:.2f}x of target)"
    return "| " + " | ".join([*cells, status]) + " |"


def round_ratios(
    raw: list[dict[str, Any]],
    key: str,
    system: str,
    reference: str,
    kind: str = "max_rate",
    **match: Any,
) -> list[float]:
    """system / reference of `key` in each round where both were measured: the two ran minutes
    apart at most, so the machine's drift between rounds mostly cancels."""
    mine, theirs = (
        {r["run"]: float(r[key]) for r in select(raw, kind, name, **match) if r.get(key)}
        for name in (system, reference)
    )
    return [mine[run] / theirs[run] for run in sorted(mine.keys() & theirs.keys())]


def ratio(
    raw: list[dict[str, Any]], kind: str, key: str, reference: str, **match: Any
) -> float | None:
    """The median of the per-round ratios relay / reference."""
    ratios = round_ratios(raw, key, RELAY, reference, kind, **match)
    return statistics.median(ratios) if ratios else None


def ratio_cell(raw: list[dict[str, Any]], kind: str, key: str, reference: str, **match: Any) -> str:
    """relay / reference: median and range of the per-round ratios."""
    return ratios_text(round_ratios(raw, key, RELAY, reference, kind, **match))


def ratios_text(ratios: list[float]) -> str:
    """`1.05x (0.92-1.20)`: the median ratio and the range."""
    if not ratios:
        return "-"
    median = f"{statistics.median(ratios):.2f}x"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}-{max(ratios):.2f})"


def spread(values: list[float]) -> float:
    """(max - min) / median; 0 for fewer than two values."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


Cell = Callable[[list[dict[str, Any]], str], str]


def median_cell(rows: list[dict[str, Any]], key: str) -> str:
    return fmt(median_of(rows, key))


def spread_cell(rows: list[dict[str, Any]], key: str) -> str:
    """`709.6 (650-720)`: the median of `key` over the rows and its range."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if len(values) < 2:
        return fmt(values[0] if values else None)
    return f"{statistics.median(values):g} ({min(values):g}-{max(values):g})"


def compared(raw: list[dict[str, Any]], kind: str, key: str, cell: Cell, **match: Any) -> list[str]:
    """Relay, Postfix, relay / Postfix, old Postfix, relay / old Postfix: each system's rows
    rendered by `cell`, the ratios with their range over the rounds."""
    relay, postfix, old = (cell(select(raw, kind, name, **match), key) for name in SYSTEMS)
    tuned, previous = (ratio_cell(raw, kind, key, other, **match) for other in (POSTFIX, OLD))
    return [relay, postfix, tuned, old, previous]


def select(raw: list[dict[str, Any]], kind: str, system: str, **match: Any) -> list[dict[str, Any]]:
    """The runs of one kind ("max_rate": smtp-source; "half_load": paced) and system matching
    every field given; runs from before "kind" existed are max-rate runs."""
    return [r for r in raw if r.get("kind", "max_rate") == kind and r["system"] == system
            and all(r.get(field) == value for field, value in match.items())]  # fmt: skip


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
