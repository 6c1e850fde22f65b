"""Benchmark: what the message history costs per message. A journal as the daemon writes it (a
`received` and a `delivered` event per message, bench/idempotency.py's generator) taken into a
fresh history (relay.history: SQLite, WAL) as the API worker does; prints the CPU and wall time
per message, the journal's and the history's bytes per message, as one JSON object, and writes
bench/results/history.json (a temporary spool; nothing on the network)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from idempotency import journal  # noqa: E402

from relay.history import ingest  # noqa: E402
from relay.history.store import History  # noqa: E402
from relay.spool.store import Spool  # noqa: E402

MAX_MESSAGES = 2_000_000


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(messages: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="relay-history-bench-") as tmp:
        spool = Spool(Path(tmp))
        written = journal(spool, messages)
        path = spool.history_path
        history = History(path)
        started, cpu_before = time.perf_counter(), cpu()
        taken = ingest.catch_up(history, spool.events_dir)
        wall, used = time.perf_counter() - started, cpu() - cpu_before
        history.close()
        stored = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    assert taken == 2 * messages, (taken, messages)
    return {
        "messages": messages,
        "cpu_us_per_message": round(used / messages * 1e6, 1),
        "wall_us_per_message": round(wall / messages * 1e6, 1),
        "journal_bytes_per_message": round(written / messages),
        "history_bytes_per_message": round(stored / messages),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    result = measure(min(args.messages, MAX_MESSAGES))
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / "history.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
