"""Scale benchmark: a spool of N deferred messages (1,000,000 by default), then the relay
started on it: time to its first delivery, the scheduler's RSS once the whole queue is indexed,
and `relay queue summary` with the daemon running and stopped; writes bench/results/scale.json
(loopback only; every wait bounded)."""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import RCPT, SENDER, message  # noqa: E402
from systems import SINK_IP, Sink  # noqa: E402

from relay.mail.reply import Reply  # noqa: E402
from relay.spool.message import Message, Recipient  # noqa: E402
from relay.spool.store import Spool  # noqa: E402
from tests.support.daemon import Relay  # noqa: E402

DOMAINS = 1000  # the deferred mail is spread over this many recipient domains
BODY = message(1024)
STATUS_RE = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.M)


def generate(spool: Path, start: int, stop: int, now: float) -> None:
    """Messages start..stop-1: queued up to a day ago, one deferred attempt each (451), next
    attempt 1-3 h from now, so none is due while we measure. Written without fsync."""
    store = Spool(spool)
    for i in range(start, stop):
        msg_id = f"{int((now - 86_400) * 1000) + i:012x}{secrets.token_hex(4)}"
        rcpt = Recipient(f"user{i}@d{i % DOMAINS}.scale.test")
        reply = Reply(451, "4.7.1", "try again later")
        rcpt.record(now - 600, "deferred", reply, f"mx.d{i % DOMAINS}.scale.test", None, False)
        msg = Message(msg_id, SENDER, [rcpt], now - 600 - i % 86_000, now + 3600 + i % 7200,
                      size=len(BODY), attempts=1)  # fmt: skip
        store.content_path(msg_id).write_bytes(BODY)
        state = json.dumps(msg.as_dict(), separators=(",", ":")).encode()
        store.state_path(msg_id).write_bytes(state)


def fill(spool: Path, count: int) -> float:
    """The whole spool, one share per CPU; seconds taken."""
    Spool(spool).prepare()
    started, now = time.monotonic(), time.time()
    workers = max(1, os.cpu_count() or 1)
    bounds = [count * k // workers for k in range(workers + 1)]
    with multiprocessing.Pool(workers) as pool:
        pool.starmap(generate, [(spool, a, b, now) for a, b in itertools.pairwise(bounds)])
    return time.monotonic() - started


def memory_mib(pid: int) -> dict[str, float]:
    """Current and peak resident set of one process."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = {key: int(kib) / 1024 for key, kib in STATUS_RE.findall(status)}
    return {"rss": round(found["VmRSS"], 1), "peak": round(found["VmHWM"], 1)}


def timed_summary(relay: Relay, limit: float) -> tuple[float, int]:
    """Seconds for `relay queue summary --json`, and the TOTAL it counted."""
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "summary", "--json", "--top", "5",
         "--config", str(relay.config)],
        capture_output=True, text=True, timeout=limit, check=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)["rows"]
    return time.monotonic() - started, int(rows[0]["total"])


def measure(root: Path, count: int, limit: float) -> dict[str, Any]:
    sink = Sink()
    route = {"host": SINK_IP, "port": sink.port, "tls": "none"}
    relay = Relay(root, {"routes": [{"domains": ["*"], "via": [route]}]})
    try:
        generated = fill(relay.spool, count)
        print(f"scale: {count} deferred messages written in {generated:.1f} s", flush=True)
        started = time.monotonic()
        relay.start(timeout=limit)
        ready = time.monotonic() - started
        relay.send([RCPT], BODY)
        if not sink.wait_for(1, time.monotonic() + limit):
            raise SystemExit("scale: the fresh message was not delivered in time")
        first = time.monotonic() - started
        [indexed] = relay.wait_event("indexed", limit)
        memory = memory_mib(relay.worker_pid("scheduler"))
        live, live_total = timed_summary(relay, limit)
        relay.stop()
        offline, offline_total = timed_summary(relay, limit)
    finally:
        relay.close()
        sink.close()
    return {
        "messages": count,
        "generate_s": round(generated, 1),
        "restart_to_ready_s": round(ready, 2),
        "restart_to_first_delivery_s": round(first, 2),
        "index_s": indexed["seconds"],
        "indexed_messages": indexed["messages"],
        "scheduler_rss_mib": memory["rss"],
        "scheduler_peak_rss_mib": memory["peak"],
        "summary_s": round(live, 2),
        "summary_total": live_total,
        "summary_offline_s": round(offline, 2),
        "summary_offline_total": offline_total,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per wait")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        result = measure(Path(tmp), args.messages, args.max_seconds)
        print(json.dumps(result), flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
        print("scale: removing the spool", flush=True)
    if (out / "latest.json").exists():  # refresh the table's scale rows
        subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--render-only",
                        "--out", str(out)], check=False)  # fmt: skip


if __name__ == "__main__":
    main()
