"""Benchmark, first cut: accept rate, end-to-end rate and wake-up latency of the real daemon
against a loopback sink (bounded in count and time; loopback only)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import Relay
from tests.support.dns import DnsServer
from tests.support.mx import MxNet


def stamp(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def run(messages: int, sessions: int, size: int, reuse: int, deadline: float) -> dict[str, float]:
    dns, net = DnsServer(), MxNet()
    dns.start()
    sink = net.sink("127.0.0.2")
    dns.mx("bench.test", (10, "mx.bench.test"))
    dns.a("mx.bench.test", "127.0.0.2")
    body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
    with tempfile.TemporaryDirectory() as root:
        relay = Relay(
            Path(root),
            {
                "delivery": {
                    "port": net.port,
                    "dns": {"nameservers": [dns.address]},
                    "reuse": {"max_messages": reuse},
                }
            },
        )
        relay.start()
        per_session = messages // sessions
        latencies: list[float] = []

        def client() -> None:
            for _ in range(per_session):
                if time.monotonic() > deadline:
                    return
                started = time.perf_counter()
                relay.send(["user@bench.test"], body)
                latencies.append(time.perf_counter() - started)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(sessions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepted = time.perf_counter() - t0
        sink.wait_for(len(latencies), timeout=max(1.0, deadline - time.monotonic()))
        total = time.perf_counter() - t0
        received = {e["id"]: stamp(e) for e in relay.events("received")}
        pickup = [stamp(e) - received[e["id"]] for e in relay.events("attempt")]
        relay.stop()
    net.close()
    dns.close()
    latencies.sort()
    return {
        "messages": len(latencies),
        "accept_per_s": round(len(latencies) / accepted, 1),
        "end_to_end_per_s": round(len(latencies) / total, 1),
        "accept_p50_ms": round(statistics.median(latencies) * 1000, 2),
        "accept_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "pickup_p50_ms": round(statistics.median(pickup) * 1000, 2),
        "pickup_max_ms": round(max(pickup) * 1000, 2),
        "sink_connections": sink.connections,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument(
        "--reuse", type=int, default=100, help="delivery.reuse.max_messages (1 = no reuse)"
    )
    args = parser.parse_args()
    results = []
    for _ in range(args.runs):
        deadline = time.monotonic() + args.max_seconds
        results.append(run(args.messages, args.sessions, args.size, args.reuse, deadline))
        print(json.dumps(results[-1]), flush=True)
    medians = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(json.dumps({"median_of": args.runs, **medians}))


if __name__ == "__main__":
    main()
