"""Benchmark: what an idle SMTP session costs the intake. Starts the real daemon, holds N idle
connections from several loopback addresses and prints the intake's RSS before, while they are
held and after they are closed, per connection, as one JSON line (bounded in count and time;
loopback only)."""

from __future__ import annotations

import argparse
import json
import re
import resource
import smtplib
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import Relay

MAX_CONNECTIONS = 20_000
MIB = 1 << 20


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match[1]) * 1024


def settled_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS once the daemon has had a moment to finish what it was doing."""
    time.sleep(seconds)
    return rss(pid)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"need {needed} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def fresh_client_ms(relay: Relay) -> float:
    """One EHLO, NOOP, QUIT session while the idle ones are held."""
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="bench.test", timeout=10) as client:
        client.ehlo()
        client.noop()
    return (time.perf_counter() - started) * 1000


def run(connections: int, sources: int, deadline: float) -> dict[str, float]:
    addresses = [f"127.0.0.{10 + n}" for n in range(sources)]
    raise_fd_limit(connections + 200)
    with tempfile.TemporaryDirectory() as root:
        limits = {"max_connections": connections + 100}
        relay = Relay(Path(root), {"smtp": {"limits": limits}})
        relay.start()
        try:
            pid = relay.worker_pid("intake")
            before = settled_rss(pid)
            t0 = time.perf_counter()
            with ExitStack() as stack:
                for n in range(connections):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"out of time after {n} connections")
                    source = (addresses[n % sources], 0)
                    sock = socket.create_connection(("127.0.0.1", relay.port), 10, source)
                    stack.enter_context(sock)
                    if not sock.recv(512).startswith(b"220 "):
                        raise SystemExit(f"connection {n} was not greeted with 220")
                opened = time.perf_counter() - t0
                held = settled_rss(pid)
                fresh = fresh_client_ms(relay)
            released = settled_rss(pid)
        finally:
            relay.stop()
    return {
        "connections": connections,
        "sources": sources,
        "open_s": round(opened, 2),
        "rss_before_mib": round(before / MIB, 1),
        "rss_held_mib": round(held / MIB, 1),
        "rss_after_close_mib": round(released / MIB, 1),
        "per_connection_kib": round((held - before) / connections / 1024, 1),
        "fresh_client_ms": round(fresh, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--sources", type=int, default=10, help="127.0.0.10, .11, … (max 200)")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    if not 0 < args.connections <= MAX_CONNECTIONS or not 0 < args.sources <= 200:
        parser.error(f"--connections 1..{MAX_CONNECTIONS}, --sources 1..200")
    deadline = time.monotonic() + args.max_seconds
    print(json.dumps(run(args.connections, args.sources, deadline)), flush=True)


if __name__ == "__main__":
    main()
