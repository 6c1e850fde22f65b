"""Schedule, the index: an entry per queued message, ordered by next attempt and by age and
counted by state, that keeps no envelope and no body."""

from __future__ import annotations

import asyncio
import heapq
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from relay.config.lanes import LANES
from relay.mail.waiting import waiting_state
from relay.spool.message import Message


@dataclass(slots=True)
class Entry:
    """What the index keeps per queued message: no envelope, no body (docs/architecture.md
    invariant 4)."""

    id: str
    born: float  # UTC start of its max_age window
    queued: float  # UTC arrival (the summary's age)
    attempts: int = 0
    last_attempt: float = 0.0
    held: bool = False
    scheduled: bool = False  # waiting for its X-Relay-Send-At time, never attempted yet
    quota: bool = False  # waiting for room in its sending quota, never attempted yet
    running: bool = False
    ready: bool = False  # due, waiting in a destination's ready queue (or for its MX)
    due: float = 0.0  # time.monotonic() of the next attempt
    lane: str = "normal"
    domains: tuple[str, ...] = ()  # recipient domains still pending
    routes: tuple[tuple[str, str], ...] = ()  # (domain, destination) while ready or running

    @property
    def state(self) -> str:
        """The state counted in the queue gauge; "ready" is split by destination at each tick."""
        return waiting_state(
            running=self.running,
            held=self.held,
            ready=self.ready,
            scheduled=self.scheduled,
            quota=self.quota,
            attempted=bool(self.attempts),
        )

    @property
    def dests(self) -> tuple[str, ...]:
        """The distinct destinations this message's pending domains go to."""
        return tuple(dict.fromkeys(dest for _, dest in self.routes))


class Index:
    """The queued messages by id, by next attempt (a heap whose stale items are skipped), by
    age (the oldest on top) and counted by state and by lane (the queue gauges)."""

    def __init__(self, wake: asyncio.Event) -> None:
        self.entries: dict[str, Entry] = {}
        self.heap: list[tuple[float, str]] = []
        self.ages: list[tuple[float, str]] = []  # (born, id): the oldest is on top
        self.states: Counter[str] = Counter()
        self.lanes: Counter[str] = Counter()
        self.wake = wake

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, msg_id: str) -> Entry | None:
        return self.entries.get(msg_id)

    def schedule(self, entry: Entry, wall_time: float) -> None:
        """Make entry due at a persisted UTC time, converted to the monotonic clock."""
        entry.due = time.monotonic() + max(0.0, wall_time - time.time())
        heapq.heappush(self.heap, (entry.due, entry.id))
        self.wake.set()

    def add(self, msg: Message) -> Entry:
        """Index msg, due at its next attempt unless it is held."""
        last = max((r.last_attempt or 0.0 for r in msg.recipients), default=0.0)
        now = time.time()
        entry = Entry(
            msg.id, msg.born, msg.queued_at, msg.attempts, last, msg.held,
            scheduled=msg.scheduled(now), quota=msg.over_quota(now),
            lane=msg.lane if msg.lane in LANES else "normal",
            domains=pending_domains(msg),
        )  # fmt: skip
        self.entries[msg.id] = entry
        self.states[entry.state] += 1
        self.lanes[entry.lane] += 1
        heapq.heappush(self.ages, (entry.born, entry.id))
        if not entry.held:
            self.schedule(entry, msg.next_attempt)
        return entry

    def change(self, entry: Entry, **fields: Any) -> None:
        """Update an entry's fields, keeping the per-state counts (a gauge) right."""
        self.states[entry.state] -= 1
        for name, value in fields.items():
            setattr(entry, name, value)
        self.states[entry.state] += 1

    def remove(self, entry: Entry) -> None:
        """Forget entry, once it is out of the ready queues (Dispatch.drop)."""
        del self.entries[entry.id]
        self.states[entry.state] -= 1
        self.lanes[entry.lane] -= 1

    def due(self, now: float) -> Iterator[Entry]:
        """The entries whose time has come, skipping stale heap items: deleted, held, busy,
        ready or rescheduled since."""
        while self.heap and self.heap[0][0] <= now:
            due, msg_id = heapq.heappop(self.heap)
            entry = self.entries.get(msg_id)
            if entry is None or entry.running or entry.held or entry.ready or entry.due != due:
                continue
            yield entry

    def next_due(self) -> float:
        """The monotonic time the next entry is due, inf when none is."""
        return self.heap[0][0] if self.heap else float("inf")

    def oldest(self) -> float:
        """Seconds since the oldest queued message was born (0 for an empty queue)."""
        while self.ages and self.ages[0][1] not in self.entries:
            heapq.heappop(self.ages)  # lazily forget messages that left the queue
        return time.time() - self.ages[0][0] if self.ages else 0.0


def pending_domains(msg: Message) -> tuple[str, ...]:
    """Interned: a million queued messages to a few domains share their names' memory."""
    return tuple(dict.fromkeys(sys.intern(r.domain) for r in msg.pending()))
