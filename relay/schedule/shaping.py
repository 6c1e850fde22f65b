"""Schedule, traffic shaping: per-destination limits and adaptive throttling, and the ready
queues that pick the next message by lane, destination and fresh-or-retried turn; pure state
driven by the monotonic times the scheduler passes in."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from relay.config.destinations import Limits
from relay.config.lanes import LANES
from relay.config.throttle import ThrottleConfig
from relay.mail.reply import Reply, classify

# A destination's level goes up at most once per this many seconds: a burst of 421s from
# the transactions already in flight is one signal, not twenty.
RAISE_SPACING = 1.0
CLEAN, NEUTRAL, THROTTLE = "clean", "neutral", "throttle"


@dataclass(frozen=True)
class Signal:
    """What one transaction's replies say about its destination."""

    kind: str  # clean (something delivered, no throttling), throttle, or neutral
    suspend_for: float = 0.0  # seconds, when a reply matched throttle.suspend
    reply: Reply | None = None  # the reply that throttled or suspended


def signal_of(replies: Iterable[Reply], cfg: ThrottleConfig) -> Signal:
    """Throttle on 421, 4.7.28, rate wording or a configured pattern; suspend on a suspend
    pattern; clean when a reply delivered and none throttled."""
    delivered = False
    for reply in replies:
        text = str(reply)
        for pattern, seconds in cfg.suspend:
            if pattern.search(text):
                return Signal(THROTTLE, seconds, reply)
        if classify(reply).throttle or any(p.search(text) for p in cfg.patterns):
            return Signal(THROTTLE, 0.0, reply)
        delivered = delivered or (reply.code is not None and 200 <= reply.code < 300)
    return Signal(CLEAN if delivered else NEUTRAL)


def combine(signals: Iterable[Signal]) -> Signal:
    """One destination's signal from several transactions: a throttle (the longest
    suspension) wins, then clean, then neutral."""
    found = list(signals)
    throttles = [s for s in found if s.kind == THROTTLE]
    if throttles:
        return max(throttles, key=lambda s: s.suspend_for)
    return Signal(CLEAN) if any(s.kind == CLEAN for s in found) else Signal(NEUTRAL)


@dataclass
class Destination:
    """One destination's limits and live state: busy transactions, throttle level, the rate
    slot, and a suspension."""

    name: str
    limits: Limits
    busy: int = 0
    level: int = 0  # 0 = full speed; each level halves connections and rate
    clean: int = 0  # clean transactions since the level last changed
    next_slot: float = 0.0  # monotonic time the next message may start (rate spacing)
    suspended_until: float = 0.0  # monotonic
    raised_at: float = -math.inf
    last_reply: Reply | None = None  # the reply behind the current level or suspension

    def connections(self) -> int:
        """Connections allowed now: the limit halved per level, at least one."""
        return max(1, self.limits.connections >> self.level)

    def interval(self, cfg: ThrottleConfig) -> float:
        """Seconds between message starts: the rate's, doubled per level; with no rate, none
        at level 0, then cfg.interval doubling from level 1."""
        if self.limits.rate:
            return (1.0 / self.limits.rate) * (1 << self.level)
        return cfg.interval * (1 << (self.level - 1)) if self.level else 0.0

    def opens_at(self, now: float) -> float:
        """When a message may start here: now, a later rate slot or suspension end, or never
        (inf) until a busy transaction ends."""
        if self.busy >= self.connections():
            return math.inf
        return max(now, self.next_slot, self.suspended_until)

    def suspended(self, now: float) -> bool:
        return self.suspended_until > now

    def throttled(self, now: float) -> bool:
        """Held back by its own limits or throttling (not by the relay's overall capacity)."""
        return self.level > 0 or self.opens_at(now) > now

    def waits_for(self, now: float) -> str:
        """Why mail ready for it waits: its suspension, its limits or throttling, or only the
        relay's own capacity ("queued")."""
        if self.suspended(now):
            return "suspended"
        return "throttled" if self.throttled(now) else "queued"

    def idle(self, now: float) -> bool:
        """Nothing to remember: no transaction, no throttling, no suspension, no rate slot."""
        return not (self.busy or self.level or self.suspended(now) or self.next_slot > now)

    def start(self, now: float, cfg: ThrottleConfig) -> None:
        self.busy += 1
        self.next_slot = max(now, self.next_slot) + self.interval(cfg)

    def finish(self, outcome: Signal, now: float, cfg: ThrottleConfig) -> bool:
        """A transaction ended; True when the level or suspension changed."""
        self.busy -= 1
        if outcome.kind == THROTTLE:
            return self._throttle(outcome, now, cfg)
        if outcome.kind == CLEAN and self.level:
            self.clean += 1
            if self.clean >= cfg.recover_after:
                self.level, self.clean = self.level - 1, 0
                return True
        return False

    def _throttle(self, outcome: Signal, now: float, cfg: ThrottleConfig) -> bool:
        self.clean = 0
        self.last_reply = outcome.reply
        changed = False
        if outcome.suspend_for:
            self.suspended_until = max(self.suspended_until, now + outcome.suspend_for)
            changed = True
        if self.level < cfg.max_level and now - self.raised_at >= RAISE_SPACING:
            self.level += 1
            self.raised_at = now
            self.next_slot = max(self.next_slot, now + self.interval(cfg))
            changed = True
        return changed


class Waiting(Protocol):
    """What the ready queues need to know of a queued message."""

    @property
    def lane(self) -> str: ...

    @property
    def attempts(self) -> int: ...

    @property
    def dests(self) -> tuple[str, ...]: ...


# Within a lane, fresh mail (never attempted) and retried mail take turns.
TURNS = ("fresh", "retried")


class Ready:
    """Due messages waiting to start, by lane, fresh or retried, and destination.

    pick() takes high before normal before low, except that low gets `low_share` of the picks
    while it waits. Within a lane, fresh and retried mail take turns (as Postfix alternates
    its incoming and deferred queues), so a deferred backlog, however many destinations it
    spans, never stands in front of new mail; within each, destinations take turns (round
    robin) and one that cannot start now (limit, rate slot, suspension) is passed over.
    """

    def __init__(self, low_share: float) -> None:
        self.low_share = low_share
        self.queues: dict[str, dict[str, dict[str, deque[Waiting]]]] = {
            lane: {turn: {} for turn in TURNS} for lane in LANES
        }
        self.retry_turn = dict.fromkeys(LANES, False)
        self.low_credit = 0.0
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def push(self, item: Waiting, dest: str, front: bool = False) -> None:
        queue = self.queues[item.lane][_turn(item)].setdefault(dest, deque())
        if front:
            queue.appendleft(item)
        else:
            queue.append(item)
        self.count += 1

    def waiting(self) -> Iterator[tuple[str, int]]:
        """(destination, messages waiting for it) for every destination with any."""
        totals: dict[str, int] = {}
        for by_turn in self.queues.values():
            for by_dest in by_turn.values():
                for dest, queue in by_dest.items():
                    totals[dest] = totals.get(dest, 0) + len(queue)
        return iter(totals.items())

    def remove(self, item: Waiting, dest: str) -> bool:
        by_dest = self.queues[item.lane][_turn(item)]
        queue = by_dest.get(dest)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        self.count -= 1
        if not queue:
            del by_dest[dest]
        return True

    def pick(self, can_start: Callable[[str], bool]) -> tuple[Waiting, str] | None:
        """The next message and the destination queue it came from, among destinations that
        can start now; None when none can."""
        low_waits = self._has("low")
        order = ("low", "high", "normal") if low_waits and self.low_credit >= 1 - 1e-9 else LANES
        for lane in order:
            found = self._pick_lane(lane, can_start)
            if found is None:
                continue
            if lane == "low":
                self.low_credit = max(0.0, self.low_credit - 1)
            elif low_waits:
                # Each pick that passes waiting low mail over earns low a share of a pick; at
                # one whole pick, low goes first. Credit is capped, so a quiet low lane builds
                # up no debt that would later push high mail back.
                self.low_credit = min(1.0, self.low_credit + self.low_share / (1 - self.low_share))
            return found
        return None

    def _has(self, lane: str) -> bool:
        return any(self.queues[lane][turn] for turn in TURNS)

    def _pick_lane(self, lane: str, can_start: Callable[[str], bool]) -> tuple[Waiting, str] | None:
        turns = ("retried", "fresh") if self.retry_turn[lane] else TURNS
        for turn in turns:
            found = self._pick_queue(self.queues[lane][turn], can_start)
            if found is not None:
                self.retry_turn[lane] = turn == "fresh"
                return found
        return None

    def _pick_queue(
        self, by_dest: dict[str, deque[Waiting]], can_start: Callable[[str], bool]
    ) -> tuple[Waiting, str] | None:
        for dest in by_dest:
            if not can_start(dest):
                continue
            # Round robin: this destination goes to the back of the order.
            queue = by_dest.pop(dest)
            item = queue.popleft()
            self.count -= 1
            if queue:
                by_dest[dest] = queue
            return item, dest
        return None


def _turn(item: Waiting) -> str:
    return "retried" if item.attempts else "fresh"
