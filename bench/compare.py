"""Side-by-side benchmark: the relay and Postfix (a pure relay, same machine, same sink), fed by
Postfix's smtp-source and delivering to its smtp-sink on loopback, run alternately; writes a
Markdown table and the raw JSON under bench/results/ (every loop bounded in count and time)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paced  # noqa: E402

from tests.support.daemon import Relay, free_port  # noqa: E402

SINK_IP = "127.0.0.3"
SENDER, RCPT = "bench@source.test", "user@sink.test"
PROBE_EVERY = 0.05  # seconds between latency probes while smtp-source loads the server
COUNT_RE = re.compile(rb"mesg=(\d+)")
HALF_BASIS = 20  # sessions whose max rate the half-load cases take half of


@dataclass(frozen=True)
class Case:
    size: int  # bytes per message
    sessions: int  # smtp-source's parallel sessions
    messages: int


class Sink:
    """smtp-sink on SINK_IP:port, its running message counter read from its output."""

    def __init__(self) -> None:
        self.port = free_port(SINK_IP)
        self.count = 0
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"{SINK_IP}:{self.port}", "1024"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(SINK_IP, self.port)

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert isinstance(stdout, io.BufferedReader)
        while chunk := stdout.read1(65536):
            found = COUNT_RE.findall(chunk)
            if found:
                self.count = int(found[-1])

    def wait_for(self, count: int, deadline: float) -> bool:
        while self.count < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


class Postfix:
    """A private Postfix instance (own config and queue directories) relaying everything on
    127.0.0.1:port to the sink, with its default durability (queue files fsync'd before 250)."""

    def __init__(self, root: Path, sink_port: int) -> None:
        self.port = free_port()
        self.etc, self.spool = root / "etc", root / "spool"
        for directory in (self.etc, self.spool, root / "data"):
            directory.mkdir(parents=True)
        shutil.chown(root / "data", "postfix")
        master = Path("/usr/share/postfix/master.cf.dist").read_text()
        master = re.sub(r"^smtp\s+inet\s.*$", f"127.0.0.1:{self.port} inet n - y - - smtpd",
                        master, count=1, flags=re.M)  # fmt: skip
        (self.etc / "master.cf").write_text(master)
        (self.etc / "main.cf").write_text(
            "\n".join([
                "compatibility_level = 3.6",
                f"queue_directory = {self.spool}",
                f"data_directory = {root / 'data'}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "inet_interfaces = 127.0.0.1",
                "inet_protocols = ipv4",
                "myhostname = postfix.bench.test",
                "mydestination =",
                "mynetworks = 127.0.0.0/8",
                f"relayhost = [{SINK_IP}]:{sink_port}",
                "smtpd_relay_restrictions = permit_mynetworks, reject",
                "smtp_tls_security_level = none",
                "default_process_limit = 200",
                f"maillog_file_prefixes = {root}",
                f"maillog_file = {root / 'maillog'}",
                "",
            ])
        )  # fmt: skip
        self.env = dict(os.environ)
        # Creates the queue tree; its first run on a new queue exits 1 over mere warnings.
        subprocess.run(["postfix", "-c", str(self.etc), "check"], env=self.env, check=False,
                       capture_output=True)  # fmt: skip
        subprocess.run(["postfix", "-c", str(self.etc), "start"], env=self.env, check=True,
                       capture_output=True)  # fmt: skip
        wait_port("127.0.0.1", self.port)

    def pids(self) -> list[int]:
        master = int((self.spool / "pid" / "master.pid").read_text().split()[0])
        return [master, *descendants(master)]

    def close(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], env=self.env,
                       capture_output=True, check=False)  # fmt: skip


class RelayUnderTest:
    """The relay daemon with a catch-all route to the sink (as Postfix's relayhost)."""

    def __init__(self, root: Path, sink_port: int) -> None:
        route = {"host": SINK_IP, "port": sink_port, "tls": "none"}
        self.relay = Relay(root, {"routes": [{"domains": ["*"], "via": [route]}]})
        self.relay.start()
        self.port = self.relay.port

    def pids(self) -> list[int]:
        assert self.relay.proc is not None
        return [self.relay.proc.pid, *descendants(self.relay.proc.pid)]

    def close(self) -> None:
        self.relay.stop()
        self.relay.close()


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout.split()  # fmt: skip
    children = [int(p) for p in out]
    return children + [g for c in children for g in descendants(c)]


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


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP(host, port, timeout=2) as client:
                client.noop()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers SMTP on {host}:{port}")


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


def measure(system: Any, sink: Sink, case: Case, limit: float) -> dict[str, Any]:
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

    start_count = sink.count
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
    latencies.sort()
    return {
        "accept_per_s": round(case.messages / accepted, 1),
        "end_to_end_per_s": round(case.messages / total, 1) if complete else None,
        "accept_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "accept_p99_ms": round(percentile(latencies, 0.99) * 1000, 2) if latencies else None,
        "probes": len(latencies),
        "probe_failures": failures[:3],
        "peak_rss_mib": round(peak[0] / 1024, 1),
        "complete": complete,
    }


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))]


@contextmanager
def instance(name: str) -> Iterator[tuple[Any, Sink]]:
    """A fresh sink and a fresh system under test relaying to it, both stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's unprivileged processes must reach their queue
        sink = Sink()
        system: Any = None
        try:
            system = (Postfix if name == "postfix" else RelayUnderTest)(Path(tmp), sink.port)
            yield system, sink
        finally:
            if system is not None:
                system.close()
            sink.close()


def run_one(name: str, case: Case, limit: float) -> dict[str, Any]:
    with instance(name) as (system, sink):
        return measure(system, sink, case, limit)


def measure_half(system: Any, sink: Sink, size: int, rate: float, args: Any) -> dict[str, Any]:
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
        measured = {r["sessions"] for r in select(raw, "max_rate", "relay", size=size)}
        if not measured:
            continue
        basis = HALF_BASIS if HALF_BASIS in measured else max(measured)
        accept = median_of(select(raw, "max_rate", "relay", size=size, sessions=basis),
                           "accept_per_s")  # fmt: skip
        rates[size] = (round((accept or 0) / 2, 1), basis)
    return rates


def alternate(runs: int) -> Iterator[tuple[int, str]]:
    """(run, system) in the order run: relay first on even runs, Postfix first on odd ones."""
    for run in range(runs):
        for name in ("relay", "postfix") if run % 2 == 0 else ("postfix", "relay"):
            yield run, name


def run_cases(cases: list[Case], args: Any) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    for case in cases:
        for run, name in alternate(args.runs):
            measured = run_one(name, case, args.max_seconds)
            raw.append({"kind": "max_rate", "system": name, "run": run, **vars(case), **measured})
            print(json.dumps(raw[-1]), flush=True)
    return raw


def run_half(rates: dict[int, tuple[float, int]], args: Any) -> list[dict[str, Any]]:
    raw: list[dict[str, Any]] = []
    for size, (rate, basis) in rates.items():
        if rate <= 0:
            continue
        for run, name in alternate(args.runs):
            with instance(name) as (system, sink):
                measured = measure_half(system, sink, size, rate, args)
            head = {"kind": "half_load", "system": name, "run": run, "size": size}
            raw.append({**head, "basis_sessions": basis, "rate_per_s": rate, **measured})
            print(json.dumps(raw[-1]), flush=True)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each system per case")
    parser.add_argument("--messages", type=int, default=1000, help="per run at 1 KiB")
    parser.add_argument("--sessions", default="1,20,100", help="comma-separated")
    parser.add_argument("--sizes", default="1024,102400", help="bytes, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per run")
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
    sizes = [int(size) for size in args.sizes.split(",")]
    cases = [
        Case(size, sessions, args.messages if size <= 10_240 else max(1, args.messages // 2))
        for size in sizes
        for sessions in map(int, args.sessions.split(","))
    ]
    raw = run_cases(cases, args)
    raw += run_half(half_rates(raw, sizes), args)
    write(out, raw, scale)


def write(out: Path, raw: list[dict[str, Any]], scale: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "postfix": version.stdout.strip(),
    }
    results = {**meta, "runs": raw}
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    publish(out, results, scale)


def publish(out: Path, results: dict[str, Any], scale: Path) -> None:
    """Render latest.md from the results (and scale.json when there is one); print it."""
    scaled = json.loads(scale.read_text()) if scale.is_file() else None
    raw = results["runs"]
    cases = list(dict.fromkeys(
        Case(r["size"], r["sessions"], r["messages"]) for r in raw
        if r.get("kind", "max_rate") == "max_rate"))  # fmt: skip
    text = render(raw, cases, results, scaled)
    (out / "latest.md").write_text(text)
    print(text)


METRICS = (
    ("end_to_end_per_s", "end to end/s"), ("accept_per_s", "accepted/s"),
    ("accept_p50_ms", "accept p50 ms"), ("accept_p99_ms", "accept p99 ms"),
    ("peak_rss_mib", "peak RSS MiB"),
)  # fmt: skip
HALF_METRICS = (("accept_p50_ms", "accept p50 ms"), ("accept_p99_ms", "accept p99 ms"))
SYSTEMS = ("relay", "postfix")


def render(raw: list[dict[str, Any]], cases: list[Case], meta: dict[str, Any], scale: Any) -> str:
    """The targets, then the median of the runs per case and system and the relay/Postfix
    ratio of each: at max rate (smtp-source), then at 50% of the relay's max rate (paced)."""
    return "\n".join([
        f"Benchmark {meta['date']} on {meta['machine']}; Postfix {meta['postfix']}. "
        "Median of each system's runs (alternating); ratio = relay / Postfix.",
        "", *render_targets(raw, scale),
        "", "## Max rate (smtp-source)", "", *render_max(raw, cases),
        "", "## Accept latency at 50% of the relay's max rate", "", *render_half(raw),
    ]) + "\n"  # fmt: skip


def render_max(raw: list[dict[str, Any]], cases: list[Case]) -> list[str]:
    lines = [
        "| size | sessions | messages | " + " | ".join(
            f"{title} relay | Postfix | ratio" for _, title in METRICS) + " |",
        "|---|---|---|" + "---|---|---|" * len(METRICS),
    ]  # fmt: skip
    for case in cases:
        cells = [f"{case.size // 1024} KiB", str(case.sessions), str(case.messages)]
        for key, _ in METRICS:
            cells += compared(raw, "max_rate", key, size=case.size, sessions=case.sessions)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_half(raw: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Open loop (bench/paced.py): one message per new connection, message i started at "
        "t0 + i/rate whatever the others are doing, latency from its scheduled start to the "
        "250 after DATA; rate = 50% of the relay's median accepted/s at the sessions shown. "
        "Errors (not accepted) and late starts (> 10 ms behind schedule) summed over the runs.",
        "",
        "| size | sessions | rate/s | messages | achieved/s relay | Postfix | "
        + " | ".join(f"{title} relay | Postfix | ratio" for _, title in HALF_METRICS)
        + " | errors relay | Postfix | late relay | Postfix |",
        "|---|---|---|---|---|---|" + "---|---|---|" * len(HALF_METRICS) + "---|---|---|---|",
    ]
    for size, rate, basis in half_cases(raw):
        rows = {name: select(raw, "half_load", name, size=size) for name in SYSTEMS}
        cells = [f"{size // 1024} KiB", str(basis), fmt(rate), fmt(rows["relay"][0]["messages"])]
        cells += [fmt(median_of(rows[name], "achieved_per_s")) for name in SYSTEMS]
        for key, _ in HALF_METRICS:
            cells += compared(raw, "half_load", key, size=size)
        cells += [str(sum(r[key] for r in rows[name])) for key in ("errors", "late")
                  for name in SYSTEMS]  # fmt: skip
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
    lines = ["## Targets", "", "| target | relay | Postfix | ratio | goal | status |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for size, goal in SIZE_TARGETS:
        cells = compared(raw, "max_rate", "end_to_end_per_s", size=size, sessions=HALF_BASIS)
        label = f"{size // 1024} KiB, {HALF_BASIS} sessions: end to end/s"
        value = ratio(raw, "max_rate", "end_to_end_per_s", size=size, sessions=HALF_BASIS)
        lines.append(row([label, *cells, f"≥ {goal:.1f}x Postfix"], value, goal, True))
    rates = {size: f" ({rate:g}/s)" for size, rate, _ in half_cases(raw)}
    for size in dict.fromkeys([*(r["size"] for r in raw), *rates]):
        cells = compared(raw, "half_load", "accept_p99_ms", size=size)
        rate = rates.get(size, "")
        label = f"{size // 1024} KiB: accept p99 ms at 50% of the relay's max rate{rate}"
        value = ratio(raw, "half_load", "accept_p99_ms", size=size)
        lines.append(row([label, *cells, "≤ Postfix's"], value, 1.0, False))
    lines += render_scale(scale)
    return lines


def render_scale(scale: Any) -> list[str]:
    lines = []
    for key, label, limit, unit in SCALE_TARGETS:
        value = scale.get(key) if isinstance(scale, dict) else None
        if not isinstance(value, int | float):
            lines.append(f"| {label} | not measured (run `make bench-scale`) | - | - | "
                         f"≤ {limit:g} {unit} | not measured |")  # fmt: skip
            continue
        cell = f"{value:g} {unit}"
        if key == "summary_s" and scale.get("summary_offline_s") is not None:
            cell += f" (offline {scale['summary_offline_s']:g} s)"
        if key == "scheduler_rss_mib" and scale.get("messages") is not None:
            label += f", {scale['messages']:,} messages queued"
        lines.append(row([label, cell, "-", "-", f"≤ {limit:g} {unit}"], value, limit, False))
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


def medians(
    raw: list[dict[str, Any]], kind: str, key: str, **match: Any
) -> tuple[float | None, float | None]:
    """The relay's and Postfix's median of `key` over the matching runs."""
    relay, postfix = (median_of(select(raw, kind, name, **match), key) for name in SYSTEMS)
    return relay, postfix


def ratio(raw: list[dict[str, Any]], kind: str, key: str, **match: Any) -> float | None:
    relay, postfix = medians(raw, kind, key, **match)
    return relay / postfix if relay is not None and postfix else None


def compared(raw: list[dict[str, Any]], kind: str, key: str, **match: Any) -> list[str]:
    """Relay median, Postfix median, relay / Postfix."""
    relay, postfix = medians(raw, kind, key, **match)
    share = ratio(raw, kind, key, **match)
    return [fmt(relay), fmt(postfix), "-" if share is None else f"{share:.2f}x"]


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
