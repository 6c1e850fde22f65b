"""Traffic shaping as pure state: throttle signals, a destination's limits and levels, and the
ready queues' choice by lane, destination and fresh-or-retried turn."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, replace

import pytest

from relay.config.destinations import Limits
from relay.config.throttle import ThrottleConfig
from relay.mail.reply import Reply
from relay.schedule.shaping import (
    CLEAN,
    NEUTRAL,
    THROTTLE,
    Destination,
    Ready,
    Signal,
    combine,
    signal_of,
)

CFG = ThrottleConfig()
SUSPENDING = replace(CFG, suspend=((re.compile("TS03"), 600.0),))


def reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    return Reply.parse(int(code), rest)


@pytest.mark.parametrize(
    ("replies", "kind", "suspend_for"),
    [
        (["250 2.0.0 ok"], CLEAN, 0.0),
        (["250 2.0.0 ok", "550 5.1.1 no such user"], CLEAN, 0.0),
        (["550 5.1.1 no such user"], NEUTRAL, 0.0),
        (["451 4.3.0 disk full"], NEUTRAL, 0.0),
        (["421 4.7.0 come back later"], THROTTLE, 0.0),
        (["450 4.7.28 rate limited"], THROTTLE, 0.0),
        (["451 4.7.0 too many messages"], THROTTLE, 0.0),
        (["250 2.0.0 ok", "421 4.7.0 try later"], THROTTLE, 0.0),
        (["451 4.7.1 [TS01] messages temporarily deferred"], THROTTLE, 0.0),
        (["554 5.7.9 [TS03] permanently deferred"], THROTTLE, 0.0),
    ],
)
def test_signal(replies: list[str], kind: str, suspend_for: float) -> None:
    found = signal_of([reply(r) for r in replies], CFG)
    assert (found.kind, found.suspend_for) == (kind, suspend_for)


def test_a_suspend_pattern_suspends_and_names_the_reply() -> None:
    found = signal_of([reply("421 4.7.0 [TS03] deferred")], SUSPENDING)
    assert (found.kind, found.suspend_for) == (THROTTLE, 600.0)
    assert found.reply is not None and "TS03" in found.reply.text


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([], NEUTRAL),
        ([NEUTRAL, NEUTRAL], NEUTRAL),
        ([NEUTRAL, CLEAN], CLEAN),
        ([CLEAN, THROTTLE], THROTTLE),
    ],
)
def test_combine(kinds: list[str], expected: str) -> None:
    assert combine(Signal(k) for k in kinds).kind == expected


@pytest.mark.parametrize(
    ("connections", "rate", "level", "allowed", "interval"),
    [
        (20, 0.0, 0, 20, 0.0),
        (20, 0.0, 1, 10, 1.0),
        (20, 0.0, 2, 5, 2.0),
        (20, 0.0, 5, 1, 16.0),
        (20, 0.0, 4, 1, 8.0),
        (2, 10.0, 0, 2, 0.1),
        (2, 10.0, 1, 1, 0.2),
        (1, 0.5, 3, 1, 16.0),
    ],
)
def test_each_level_halves_connections_and_rate(
    connections: int, rate: float, level: int, allowed: int, interval: float
) -> None:
    dest = Destination("d.test", Limits(connections, rate), level=level)
    assert dest.connections() == allowed
    assert dest.interval(CFG) == pytest.approx(interval)


def test_connections_limit_and_rate_slots() -> None:
    dest = Destination("d.test", Limits(2, 2.0))  # 2 connections, a message every 0.5 s
    assert dest.opens_at(100.0) == 100.0
    dest.start(100.0, CFG)
    assert dest.opens_at(100.0) == 100.5  # the rate's next slot
    dest.start(100.5, CFG)
    assert dest.opens_at(100.6) == math.inf  # both connections busy
    dest.finish(Signal(CLEAN), 100.7, CFG)
    assert dest.opens_at(100.7) == 101.0


def test_throttle_raises_once_per_second_and_clean_runs_restore() -> None:
    dest = Destination("d.test", Limits(8, 0.0))
    for _ in range(3):  # three 421s from transactions in flight at the same moment
        dest.start(10.0, CFG)
    changes = [dest.finish(Signal(THROTTLE), 10.0, CFG) for _ in range(3)]
    assert changes == [True, False, False] and dest.level == 1
    assert dest.connections() == 4 and dest.opens_at(10.0) == 11.0
    dest.start(11.0, CFG)
    dest.finish(Signal(THROTTLE), 11.0, CFG)
    assert dest.level == 2 and dest.connections() == 2
    levels = []
    for n in range(2 * CFG.recover_after):
        dest.start(20.0 + n, CFG)
        dest.finish(Signal(CLEAN), 20.0 + n, CFG)
        levels.append(dest.level)
    assert levels[CFG.recover_after - 2 : CFG.recover_after] == [2, 1]
    assert levels[-1] == 0 and dest.connections() == 8 and dest.interval(CFG) == 0.0


def test_level_stops_at_max_level() -> None:
    dest = Destination("d.test", Limits(8, 0.0))
    for second in range(20):
        dest.start(float(second), CFG)
        dest.finish(Signal(THROTTLE), float(second), CFG)
    assert dest.level == CFG.max_level


def test_suspension_closes_the_destination_until_it_ends() -> None:
    dest = Destination("d.test", Limits(8, 0.0))
    dest.start(50.0, CFG)
    assert dest.finish(Signal(THROTTLE, 600.0, reply("421 [TS03]")), 50.0, CFG)
    assert dest.suspended(60.0) and dest.opens_at(60.0) == 650.0
    assert not dest.suspended(650.0) and not dest.idle(60.0)


@dataclass(eq=False)
class Item:
    name: str
    lane: str = "normal"
    attempts: int = 0
    dests: tuple[str, ...] = ("d.test",)


def drain(ready: Ready, blocked: frozenset[str] = frozenset()) -> list[str]:
    out = []
    while (found := ready.pick(lambda d: d not in blocked)) is not None:
        out.append(found[0].name)  # type: ignore[attr-defined]
    return out


def test_high_goes_first_then_normal_then_low() -> None:
    ready = Ready(low_share=0.1)
    for name, lane in [("l1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal")]:
        ready.push(Item(name, lane), "d.test")
    # low is owed nothing yet, so the first pick is high; after that low's credit grows.
    assert drain(ready)[:3] == ["h1", "n1", "n2"]


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5])
def test_low_gets_its_share_under_a_high_flood(share: float) -> None:
    ready = Ready(low_share=share)
    for n in range(400):
        ready.push(Item(f"h{n}", "high"), "d.test")
        ready.push(Item(f"l{n}", "low"), "d.test")
    first = drain(ready)[:200]
    lows = sum(name.startswith("l") for name in first)
    assert lows == pytest.approx(200 * share, abs=2)


def test_a_quiet_low_lane_builds_no_debt() -> None:
    ready = Ready(low_share=0.5)
    for n in range(50):
        ready.push(Item(f"n{n}", "normal"), "d.test")
    drain(ready)
    for n in range(10):
        ready.push(Item(f"l{n}", "low"), "d.test")
        ready.push(Item(f"h{n}", "high"), "d.test")
    assert drain(ready)[0] == "h0"


def test_fresh_and_retried_mail_alternate() -> None:
    ready = Ready(low_share=0.1)
    for n in range(4):
        ready.push(Item(f"r{n}", attempts=3), "d.test")
    for n in range(2):
        ready.push(Item(f"f{n}"), "d.test")
    assert drain(ready) == ["f0", "r0", "f1", "r1", "r2", "r3"]


def test_destinations_take_turns_and_blocked_ones_are_passed_over() -> None:
    ready = Ready(low_share=0.1)
    for n in range(3):
        ready.push(Item(f"a{n}"), "a.test")
        ready.push(Item(f"b{n}"), "b.test")
    ready.push(Item("c0"), "c.test")
    assert drain(ready, blocked=frozenset({"c.test"})) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert len(ready) == 1 and dict(ready.waiting()) == {"c.test": 1}
    assert drain(ready) == ["c0"] and len(ready) == 0


def test_remove_takes_an_item_out_wherever_it_waits() -> None:
    ready = Ready(low_share=0.1)
    items = [Item("a"), Item("b", "high"), Item("c", attempts=1)]
    for item in items:
        ready.push(item, "d.test")
    assert ready.remove(items[1], "d.test") and not ready.remove(items[1], "d.test")
    assert Counter(drain(ready)) == Counter(["a", "c"])
