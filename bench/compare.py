"""Side-by-side benchmark: the relay and Postfix (a pure relay, same machine, same sink), fed by
Postfix's smtp-source and delivering to its smtp-sink on loopback, run alternately; writes a
Markdown table and the raw JSON under bench/results/ (every loop bounded in count and time)."""

from __future__ import annotations

import argparse
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

from tests.support.daemon import Relay, free_port  # noqa: E402

SINK_IP = "127.0.0.3"
SENDER, RCPT = "bench@source.test", "user@sink.test"
PROBE_EVERY = 0.05  # seconds between latency probes while smtp-source loads the server
COUNT_RE = re.compile(rb"mesg=(\d+)")


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
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
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


def measure(system: Any, sink: Sink, case: Case, limit: float) -> dict[str, Any]:
    """Load the system with smtp-source; time acceptance and the sink's count; sample RSS
    and accept latency (a probe message every PROBE_EVERY s) meanwhile."""
    deadline = time.monotonic() + limit
    body = b"Subject: probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, case.size // 78)
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


def run_one(name: str, case: Case, limit: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        os.chmod(tmp, 0o755)  # Postfix's unprivileged processes must reach their queue
        sink = Sink()
        system: Any = None
        try:
            system = (Postfix if name == "postfix" else RelayUnderTest)(Path(tmp), sink.port)
            return measure(system, sink, case, limit)
        finally:
            if system is not None:
                system.close()
            sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each system per case")
    parser.add_argument("--messages", type=int, default=1000, help="per run at 1 KiB")
    parser.add_argument("--sessions", default="1,20,100", help="comma-separated")
    parser.add_argument("--sizes", default="1024,102400", help="bytes, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    if shutil.which("smtp-source") is None:
        sys.exit("bench: smtp-source not found; `make bench` installs Debian's postfix")
    cases = [
        Case(size, sessions, args.messages if size <= 10_240 else max(1, args.messages // 2))
        for size in map(int, args.sizes.split(","))
        for sessions in map(int, args.sessions.split(","))
    ]
    raw: list[dict[str, Any]] = []
    for case in cases:
        for run in range(args.runs):
            for name in ("relay", "postfix") if run % 2 == 0 else ("postfix", "relay"):
                measured = run_one(name, case, args.max_seconds)
                result = {"system": name, "run": run, **vars(case), **measured}
                raw.append(result)
                print(json.dumps(result), flush=True)
    write(Path(args.out), raw, cases)


def write(out: Path, raw: list[dict[str, Any]], cases: list[Case]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "postfix": version.stdout.strip(),
    }
    (out / "latest.json").write_text(json.dumps({**meta, "runs": raw}, indent=1) + "\n")
    table = render(raw, cases, meta)
    (out / "latest.md").write_text(table)
    print(table)


METRICS = (
    ("end_to_end_per_s", "end to end/s"), ("accept_per_s", "accepted/s"),
    ("accept_p50_ms", "accept p50 ms"), ("accept_p99_ms", "accept p99 ms"),
    ("peak_rss_mib", "peak RSS MiB"),
)  # fmt: skip


def render(raw: list[dict[str, Any]], cases: list[Case], meta: dict[str, str]) -> str:
    """Median of the runs per case and system, and the relay/Postfix ratio of each."""
    lines = [
        f"Benchmark {meta['date']} on {meta['machine']}; Postfix {meta['postfix']}. "
        "Median of each system's runs (alternating); ratio = relay / Postfix.",
        "",
        "| size | sessions | messages | " + " | ".join(
            f"{title} relay | Postfix | ratio" for _, title in METRICS) + " |",
        "|---|---|---|" + "---|---|---|" * len(METRICS),
    ]  # fmt: skip
    for case in cases:
        cells = [f"{case.size // 1024} KiB", str(case.sessions), str(case.messages)]
        for key, _ in METRICS:
            relay, postfix = (median(raw, case, name, key) for name in ("relay", "postfix"))
            ratio = f"{relay / postfix:.2f}x" if relay and postfix else "-"
            cells += [fmt(relay), fmt(postfix), ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def median(raw: list[dict[str, Any]], case: Case, system: str, key: str) -> float | None:
    values = [r[key] for r in raw if r["system"] == system and r["size"] == case.size
              and r["sessions"] == case.sessions and r[key] is not None]  # fmt: skip
    return statistics.median(values) if values else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
