"""Suppression lookups with a million entries: the RCPT check's latency (an exact hit, a miss
that tries the patterns) and the reader process's memory (docs/suppression.md "Cost").

    .venv/bin/python bench/suppression.py [ENTRIES]
"""

from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from relay.suppression.store import Suppressions, connect

TENANTS = 100
PATTERNS = 1000


def build(path: Path, entries: int) -> None:
    db = connect(path)
    now = time.time()
    rows = ((f"t{i % TENANTS}", f"user{i}@d{i % 5000}.test", 0, "hard_bounce", "550 5.1.1 no",
             now, now + 86400) for i in range(entries))  # fmt: skip
    db.execute("BEGIN")
    db.executemany("INSERT INTO entries (tenant, address, pattern, kind, reason, created,"
                   " expires) VALUES (?,?,?,?,?,?,?)", rows)  # fmt: skip
    db.executemany("INSERT INTO entries (tenant, address, pattern, kind, reason, created)"
                   " VALUES (?,?,1,'blocklist','',?)",
                   ((f"t{i % TENANTS}", f"*@p{i}.test", now) for i in range(PATTERNS)))  # fmt: skip
    db.execute("UPDATE meta SET value = value + 1 WHERE key='patterns'")
    db.execute("COMMIT")
    db.close()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(lists: Suppressions, keys: list[tuple[str, str]]) -> dict[str, float]:
    took = []
    now = time.time()
    for tenant, address in keys:
        started = time.perf_counter()
        lists.find(tenant, address, now)
        took.append(time.perf_counter() - started)
    took.sort()
    return {"median_us": round(took[len(took) // 2] * 1e6, 1),
            "p99_us": round(took[int(len(took) * 0.99)] * 1e6, 1)}  # fmt: skip


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "suppressions.sqlite"
        started = time.perf_counter()
        build(path, entries)
        built = time.perf_counter() - started
        before = rss_mib()
        lists = Suppressions(path, reader=True)
        rng = random.Random(1)
        hits = [(f"t{i % TENANTS}", f"user{i}@d{i % 5000}.test")
                for i in (rng.randrange(entries) for _ in range(20000))]  # fmt: skip
        misses = [(f"t{i % TENANTS}", f"nobody{i}@d{i % 5000}.test") for i in range(20000)]
        lists.find("t0", "warm@up.test", time.time())  # loads the patterns
        result = {
            "entries": entries, "patterns": PATTERNS, "build_s": round(built, 1),
            "file_mib": round(path.stat().st_size / 2**20, 1),
            "hit": timed(lists, hits), "miss": timed(lists, misses),
            "rss_before_open_mib": round(before, 1), "rss_after_mib": round(rss_mib(), 1),
            "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
