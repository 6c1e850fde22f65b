"""Intake, sending quotas: the earliest window slot with room (pure) and the ledger of
counts per window that every intake process shares through a locked file in the spool's run/."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.observe import logs

Window = tuple[float, int]  # (window length in seconds, messages allowed in one window)
Quotas = Mapping[str, Sequence[Window]]  # "user:alice" / "domain:example.com" → its windows
Bucket = tuple[str, float, float]  # (key, window length, window start): one window's count
Counts = Mapping[Bucket, int]
MAX_STEPS = 10_000  # windows skipped while looking for room; beyond that the message is refused
FORMAT_VERSION = 1


def start_of(t: float, seconds: float) -> float:
    """Start of the window of this length containing t (aligned to UTC epoch multiples)."""
    return math.floor(t / seconds) * seconds


def full_at(quotas: Quotas, counts: Counts, t: float) -> tuple[str, float, int] | None:
    """The first quota (key, window, limit) whose window containing t is full, or None."""
    for key, windows in quotas.items():
        for seconds, limit in windows:
            if counts.get((key, seconds, start_of(t, seconds)), 0) >= limit:
                return key, seconds, limit
    return None


def slot(quotas: Quotas, counts: Counts, t: float, max_steps: int = MAX_STEPS) -> float | None:
    """The earliest time at or after t (t itself, or a window start) at which every window of
    every quota has room; None if that takes more than max_steps full windows to find."""
    for _ in range(max_steps + 1):
        full = full_at(quotas, counts, t)
        if full is None:
            return t
        t = start_of(t, full[1]) + full[1]  # every moment before the full window's end is full
    return None


def buckets(quotas: Quotas, at: float) -> list[Bucket]:
    """The windows a message sent at `at` counts in."""
    return [(k, s, start_of(at, s)) for k, windows in quotas.items() for s, _ in windows]


@dataclass(frozen=True)
class Decision:
    """A message's place in its quotas: when it may go, or (not counted) why it is refused."""

    at: float  # counted: when it may go (t or a later window start); refused: try again after
    counted: bool  # True: counted in the windows of `at`; False: refused, nothing counted
    full: tuple[str, float, int] | None = None  # the quota full at t (key, window, limit)


def decide(quotas: Quotas, counts: Counts, t: float, *, hold: bool) -> Decision:
    """Pure: where a message arriving for time t goes; hold waits for a later window (within
    MAX_STEPS), refuse (hold False) takes only the window containing t."""
    full = full_at(quotas, counts, t)
    if full is None:
        return Decision(t, True)
    at = slot(quotas, counts, t)
    if at is None:
        return Decision(start_of(t, full[1]) + full[1], False, full)
    return Decision(at, hold, full)


def window_text(seconds: float) -> str:
    """3600 → hour, 86400 → day, others as a duration (10s, 5m, 2h, 3d)."""
    names = {3600.0: "hour", 86400.0: "day"}
    if seconds in names:
        return names[seconds]
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def utc_text(t: float) -> str:
    return datetime.fromtimestamp(math.ceil(t), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(decision: Decision) -> str:
    """The quota that was full, as `<key>: <limit> messages per <window>`."""
    key, seconds, limit = decision.full or ("quota", 0.0, 0)
    return f"{key}: {limit} messages per {window_text(seconds)}"


def refusal(decision: Decision) -> str:
    """The 452 reply for a refused decision (4xx: the client may retry later)."""
    return (
        f"452 4.7.1 Sending quota exceeded for {describe(decision)}; "
        f"try again after {utc_text(decision.at)}"
    )


class Ledger:
    """Counts per (key, window, start) in a small JSON file shared by every intake process:
    each change is a read-modify-write under flock on a lock file beside it, written to a temp
    file and renamed over. There is no fsync: after a power loss the counts of the last seconds
    may be lost (a few messages more than the quota may then go). Windows that ended are
    pruned on each write. Blocking: call it from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")

    def reserve(self, quotas: Quotas, t: float, *, hold: bool) -> Decision:
        """Decide for a message due at t and, unless refused, count it in its windows."""
        with self._locked() as counts:
            decision = decide(quotas, counts, t, hold=hold)
            if decision.counted:
                for bucket in buckets(quotas, decision.at):
                    counts[bucket] = counts.get(bucket, 0) + 1
        return decision

    def release(self, quotas: Quotas, at: float) -> None:
        """Take back a count made by reserve (the message was not accepted after all)."""
        with self._locked() as counts:
            for bucket in buckets(quotas, at):
                if counts.get(bucket, 0) > 0:
                    counts[bucket] -= 1

    def counts(self) -> dict[Bucket, int]:
        """The current counts (under the lock; for tests and inspection)."""
        with self._locked() as counts:
            return dict(counts)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[Bucket, int]]:
        """The counts, read under an exclusive lock and written back when the block ends
        without an exception; windows that ended are dropped."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            counts = self._read()
            yield counts
            self._write({b: n for b, n in counts.items() if b[2] + b[1] > time.time() and n > 0})
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read(self) -> dict[Bucket, int]:
        try:
            data = json.loads(self.path.read_bytes())
            return {(str(k), float(s), float(b)): int(n) for k, s, b, n in data["counts"]}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError) as exc:  # e.g. cut short by a power loss
            logs.failure("quota", exc, action="read_ledger", path=str(self.path))
            return {}

    def _write(self, counts: Counts) -> None:
        data = {"version": FORMAT_VERSION, "counts": [[*b, n] for b, n in sorted(counts.items())]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, self.path)
