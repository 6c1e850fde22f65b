"""Benchmark: the idempotency key index (relay.spool.keys) at scale. The memory a million keys
take in the intake (the process's RSS before and after, and the index's own count), the time to
add and look up a key, and the start-up rebuild of a million keys from a journal of a million
`received` events with keys and a million `delivered` ones (the window's messages all finished
and removed from the queue: the rebuild's worst case). Prints the figures and writes them to
bench/results/idempotency.json (in a temporary spool; loopback and local disk only)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.mail import events  # noqa: E402
from relay.spool.journal import micros  # noqa: E402
from relay.spool.keys import Entry, KeyIndex, rebuild  # noqa: E402
from relay.spool.message import Message, Recipient  # noqa: E402
from relay.spool.store import Spool, keyed  # noqa: E402

MIB = 1024 * 1024
PER_FILE = 170_000  # events a journal file holds before the writer rotates it (64 MiB)


def rss() -> int:
    """This process's resident set, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def msg_id(n: int) -> str:
    return f"{n:020x}"


def memory(keys: int) -> dict[str, Any]:
    """Fill an index with `keys` keys like an application's (order-<n>/<uuid-ish>)."""
    before, now = rss(), time.time()
    index = KeyIndex(window=86400)
    started = time.perf_counter()
    for n in range(keys):
        index.put("default", f"order-{n}/{n * 7919:016x}", Entry(msg_id(n), f"{n:020x}", now))
    put = time.perf_counter() - started
    started = time.perf_counter()
    for n in range(0, keys, 10):
        assert index.get("default", f"order-{n}/{n * 7919:016x}", now) is not None
    hit = (time.perf_counter() - started) / (keys // 10)
    started = time.perf_counter()
    for n in range(0, keys, 10):
        assert index.get("default", f"unknown-{n}", now) is None
    miss = (time.perf_counter() - started) / (keys // 10)
    return {
        "keys": keys,
        "rss_mib": round((rss() - before) / MIB, 1),
        "index_mib": round(index.nbytes() / MIB, 1),
        "put_us": round(put / keys * 1e6, 2),
        "get_hit_us": round(hit * 1e6, 2),
        "get_miss_us": round(miss * 1e6, 2),
    }


def journal(spool: Spool, keys: int) -> int:
    """A journal as the daemon writes it: a `received` event with a key for each message in
    intake files, a `delivered` one for each in scheduler files (about 64 MiB each); its bytes."""
    spool.prepare()
    base_us = int((time.time() - 3600) * 1e6)
    total = 0
    for writer, name in (("intake", events.RECEIVED), ("scheduler", events.DELIVERED)):
        for part, first in enumerate(range(0, keys, PER_FILE)):
            path = spool.events_dir / f"{writer}.{base_us + part:016d}.jsonl"
            with open(path, "wb") as out:
                for seq, n in enumerate(range(first, min(first + PER_FILE, keys))):
                    at_us = base_us + n * 2 + (name == events.DELIVERED)
                    total += out.write(event(writer, name, n, at_us, part, seq))
    return total


def event(writer: str, name: str, n: int, at_us: int, part: int, seq: int) -> bytes:
    msg = Message(msg_id(n), "app@example.com", [Recipient(f"user{n}@example.org")], 0.0, 0.0)
    msg.idempotency_key, msg.content_hash = f"order-{n}/{n * 7919:016x}", f"{n:020x}"
    if name == events.DELIVERED:
        msg.recipients[0].status = "delivered"
        record = events.record(name, msg, at_us / 1e6, msg.recipients[0])
    else:
        record = events.record(name, msg, at_us / 1e6, **keyed(msg))
    head = {"event_id": f"{at_us:016d}-{writer}.{part:016d}-{seq + 1}", "event": name,
            "timestamp": micros(at_us)}  # fmt: skip
    return (json.dumps({**head, **record}, separators=(",", ":")) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    result: dict[str, Any] = {"memory": memory(args.keys)}
    print(json.dumps(result["memory"]))
    with tempfile.TemporaryDirectory(prefix="relay-idem-") as tmp:
        spool = Spool(Path(tmp))
        written = journal(spool, args.keys)
        os.sync()
        before = rss()
        started = time.perf_counter()
        index = rebuild(spool, window=86400)
        seconds = time.perf_counter() - started
        assert len(index) == args.keys
        result["rebuild"] = {
            "keys": args.keys,
            "journal_mib": round(written / MIB),
            "seconds": round(seconds, 2),
            "rss_mib": round((rss() - before) / MIB, 1),
        }
    print(json.dumps(result["rebuild"]))
    out = ROOT / "bench" / "results" / "idempotency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
