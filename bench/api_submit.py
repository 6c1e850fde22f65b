"""Benchmark: submitting over HTTP (`POST /v1/messages`) against submitting over SMTP, on the same
daemon: messages accepted per second and the latency of each acceptance, at 1 and 8 concurrent
clients, in alternating rounds (HTTP, SMTP, SMTP, HTTP, ...). Each SMTP message is its own
session, as an application without a connection pool sends; each HTTP client keeps its
connection. Prints one JSON line per run and a summary; bounded in count and time; loopback
only."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import Relay, free_port
from tests.support.mx import MxSink

SINK_IP = "127.0.0.3"
DEADLINE = 120.0  # seconds a run may take at most
TEXT = ("x" * 76 + "\n") * 13  # about 1 KiB of body
BODY = TEXT.replace("\n", "\r\n")
MESSAGE = f"From: app@sender.test\r\nTo: user@a.test\r\nSubject: bench\r\n\r\n{BODY}".encode()
ORDER = {"from": "app@sender.test", "to": "user@a.test", "subject": "bench", "text": TEXT}


async def clients(count: int, messages: int, send: Callable[[], Awaitable[None]]) -> list[float]:
    """count clients sending messages in all, one at a time each; the latency of each."""
    latencies: list[float] = []
    left = iter(range(messages))
    stop = time.monotonic() + DEADLINE

    async def client() -> None:
        for _ in left:
            if time.monotonic() > stop:
                return
            started = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client() for _ in range(count)))
    return latencies


async def over_http(relay: Relay, token: str, concurrency: int, messages: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(relay.api_url, headers=headers) as session:

        async def send() -> None:
            async with session.post("/v1/messages", json=ORDER) as answer:
                assert answer.status == 202, await answer.text()

        return await clients(concurrency, messages, send)


async def over_smtp(relay: Relay, concurrency: int, messages: int) -> list[float]:
    async def send() -> None:
        await aiosmtplib.send(MESSAGE, sender="app@sender.test", recipients=["user@a.test"],
                              hostname="127.0.0.1", port=relay.port, start_tls=False)  # fmt: skip

    return await clients(concurrency, messages, send)


def measure(relay: Relay, token: str, way: str, concurrency: int, messages: int) -> dict[str, Any]:
    started = time.perf_counter()
    if way == "http":
        latencies = asyncio.run(over_http(relay, token, concurrency, messages))
    else:
        latencies = asyncio.run(over_smtp(relay, concurrency, messages))
    elapsed = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies)
    return {
        "way": way, "concurrency": concurrency, "messages": len(ms),
        "per_s": round(len(ms) / elapsed, 1), "p50_ms": round(ms[len(ms) // 2], 2),
        "p99_ms": round(ms[int(len(ms) * 0.99)], 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1000, help="per run (at most 20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="pairs per concurrency")
    parser.add_argument("--out", default="bench/results/api-submit.json")
    args = parser.parse_args()
    messages = min(args.messages, 20_000)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="relay-api-bench-") as root:
        sink = MxSink(SINK_IP, free_port(SINK_IP))
        route = {"host": SINK_IP, "port": sink.port, "tls": "none"}
        settings = {"routes": [{"domains": ["*"], "via": [route]}],
                    "api": {"listen": f"127.0.0.1:{free_port()}",
                            "tokens_file": str(Path(root) / "tokens")}}  # fmt: skip
        relay = Relay(Path(root), settings)
        relay.start()
        try:
            token = relay.cli("token", "add", "bench", "--scope", "send").stdout.strip()
            for concurrency in (1, 8):
                for n in range(args.rounds):
                    order = ("http", "smtp") if n % 2 == 0 else ("smtp", "http")
                    for way in order:
                        runs.append(measure(relay, token, way, concurrency, messages))
                        print(json.dumps(runs[-1]), flush=True)
        finally:
            relay.stop()
            relay.close()
            sink.close()
    summary = summarize(runs)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: the median rate and p50 of each way, and HTTP's rate over SMTP's."""
    out: dict[str, Any] = {}
    for concurrency in sorted({r["concurrency"] for r in runs}):
        row: dict[str, Any] = {}
        for way in ("http", "smtp"):
            mine = [r for r in runs if r["way"] == way and r["concurrency"] == concurrency]
            row[f"{way}_per_s"] = statistics.median(r["per_s"] for r in mine)
            row[f"{way}_p50_ms"] = statistics.median(r["p50_ms"] for r in mine)
        row["http_over_smtp"] = round(row["http_per_s"] / row["smtp_per_s"], 2)
        out[str(concurrency)] = row
    return out


if __name__ == "__main__":
    main()
