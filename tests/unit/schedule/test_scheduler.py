"""The scheduler in-process, driven over a real spool with the fake delivery agent: retry
spacing, expiry and bounces, partial failure per recipient, operator actions racing an
attempt, lanes and destination limits, and reload."""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from relay.spool.layout import DEAD, QUEUE
from relay.spool.store import Spool, SpoolError
from tests.unit.schedule.fake import OK, FakeAgent, enqueue, new_spool, running, settings, until

LATER = "451 4.2.0 greylisted"  # temporary, and no throttling word
UNKNOWN = "550 5.1.1 no such user"
HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}


def queued(spool: Spool) -> list[str]:
    return spool.ids(QUEUE)


def statuses(spool: Spool, msg_id: str, where: str = QUEUE) -> dict[str, str] | None:
    """Each recipient's status in msg_id's state file, None when there is none."""
    try:
        msg = spool.load(msg_id, where)
    except SpoolError:
        return None
    return {r.address: r.status for r in msg.recipients}


def attempted(spool: Spool, msg_id: str) -> bool:
    """msg_id's first attempt has ended: its outcome saved, or nothing left in the queue."""
    try:
        return spool.load(msg_id).attempts > 0
    except SpoolError:
        return True


# --- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "replies", "gaps"),
    [
        (["0.1s"], [LATER, LATER, OK], [0.1, 0.1]),
        # The schedule gives the delay before attempt 2, 3, …; its last entry repeats.
        (["0.1s", "0.4s"], [LATER, LATER, LATER, OK], [0.1, 0.4, 0.4]),
    ],
)
def test_retries_are_spaced_by_the_schedule(
    tmp_path: Path, schedule: list[str], replies: list[str], gaps: list[float]
) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent({"a.test": replies})

    async def scenario() -> None:
        async with running(settings({"delivery": {"retry": {"schedule": schedule}}}), spool, agent):
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    starts = [call.at for call in agent.to("a.test")]
    assert len(starts) == len(replies)
    for (first, second), gap in zip(pairwise(starts), gaps, strict=True):
        assert gap - 0.005 <= second - first < gap + 0.2
    assert statuses(spool, msg_id, DEAD) is None


def test_a_deferral_is_saved_with_its_next_attempt(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent({"a.test": [LATER]})

    async def scenario() -> None:
        async with running(settings(HOUR), spool, agent):
            await until(lambda: attempted(spool, msg_id))
            await asyncio.sleep(0.2)

    asyncio.run(scenario())
    msg = spool.load(msg_id)
    [rcpt] = msg.recipients
    assert (rcpt.status, rcpt.attempts, msg.attempts) == ("deferred", 1, 1)
    assert [h["outcome"] for h in rcpt.history] == ["deferred"]
    assert rcpt.reply is not None and str(rcpt.reply) == LATER
    assert msg.next_attempt == pytest.approx(rcpt.history[0]["at"] + 3600, abs=1.0)
    assert len(agent.calls) == 1


# --- final outcomes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "script", "dns", "status", "reply"),
    [
        # A permanent reply bounces the recipient at once.
        ({}, {"a.test": [UNKNOWN]}, {}, "failed", UNKNOWN),
        # So does a domain that does not exist, without a connection.
        ({}, {}, {"a.test": "550 5.1.2 no such domain"}, "failed", "550 5.1.2 no such domain"),
        # Temporary failures until max_age: a last attempt at the deadline, then it expires.
        ({"schedule": ["0.2s"], "max_age": "1.5s"}, {"a.test": [LATER]}, {}, "expired", LATER),
    ],
)
def test_a_recipient_that_cannot_be_delivered_is_dead_lettered(
    tmp_path: Path,
    retry: dict[str, Any],
    script: dict[str, list[str]],
    dns: dict[str, str],
    status: str,
    reply: str,
) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent(script, dns=dns)
    cfg = settings({"delivery": {"retry": retry}})

    async def scenario() -> None:
        async with running(cfg, spool, agent):
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    dead = spool.load(msg_id, DEAD)
    [rcpt] = dead.recipients
    assert rcpt.status == status and str(rcpt.reply) == reply
    assert rcpt.as_dict()["reason"] == ("expired" if status == "expired" else "permanent")
    if status == "expired":
        assert len(rcpt.history) >= 2
        assert rcpt.history[-1]["at"] >= dead.queued_at + cfg.delivery.retry.max_age - 0.01
    else:
        assert len(rcpt.history) == 1


# --- partial failure -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "dns", "left", "dead"),
    [
        # Delivered and bounced: nothing is left to do, the bounce is dead-lettered.
        (
            {"ok@a.test": [OK], "no@a.test": [UNKNOWN]}, {},
            None, {"no@a.test": "failed"},
        ),
        # Delivered and deferred: only the deferred recipient waits.
        (
            {"ok@a.test": [OK], "later@b.test": [LATER]}, {},
            {"ok@a.test": "delivered", "later@b.test": "deferred"}, None,
        ),
        # Bounced and deferred: the bounce is dead-lettered at once, the rest waits.
        (
            {"no@a.test": [UNKNOWN], "later@b.test": [LATER]}, {},
            {"no@a.test": "failed", "later@b.test": "deferred"}, {"no@a.test": "failed"},
        ),
        # A domain whose DNS fails for now defers only its own recipients.
        (
            {"ok@a.test": [OK]}, {"c.test": "451 4.4.3 DNS timeout"},
            {"ok@a.test": "delivered", "x@c.test": "deferred"}, None,
        ),
    ],
)  # fmt: skip
def test_each_recipient_keeps_its_own_outcome(
    tmp_path: Path,
    script: dict[str, list[str]],
    dns: dict[str, str],
    left: dict[str, str] | None,
    dead: dict[str, str] | None,
) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, *script, *(f"x@{domain}" for domain in dns))
    agent = FakeAgent(script, dns=dns)

    async def scenario() -> None:
        async with running(settings(HOUR), spool, agent):
            await until(lambda: attempted(spool, msg_id))

    asyncio.run(scenario())
    assert statuses(spool, msg_id) == left
    assert statuses(spool, msg_id, DEAD) == dead


def test_a_retry_offers_only_the_pending_recipients_one_transaction_per_domain(
    tmp_path: Path,
) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "ok@a.test", "no@a.test", "one@b.test", "two@b.test")
    agent = FakeAgent({"ok@a.test": [OK], "no@a.test": [UNKNOWN], "b.test": [LATER, OK]})

    async def scenario() -> None:
        async with running(settings(), spool, agent):
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    assert [c.recipients for c in agent.to("a.test")] == [("ok@a.test", "no@a.test")]
    assert [c.recipients for c in agent.to("b.test")] == [("one@b.test", "two@b.test")] * 2
    assert statuses(spool, msg_id, DEAD) == {"no@a.test": "failed"}


# --- operator actions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "answer", "outcome", "held"),
    [
        # Deleted once the attempt ends, and never retried.
        ("delete", LATER, "done", None),
        # Delivered meanwhile: nothing is left to delete.
        ("delete", OK, "gone", None),
        # Held once the attempt ends: it stays queued and is not retried.
        ("hold", LATER, "done", True),
    ],
)
def test_an_operator_action_waits_for_the_attempt_in_flight(
    tmp_path: Path, op: str, answer: str, outcome: str, held: bool | None
) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent({"a.test": [answer]})
    agent.gate.clear()

    async def scenario() -> dict[str, list[str]]:
        async with running(
            settings({"delivery": {"retry": {"schedule": ["0.1s"]}}}), spool, agent
        ) as scheduler:
            await until(lambda: bool(agent.calls))
            action = asyncio.create_task(scheduler.operate(op, msg_id, None))
            await asyncio.sleep(0.2)
            assert not action.done(), "the action did not wait for the attempt"
            agent.gate.set()
            result = await action
            await asyncio.sleep(0.3)  # a retry 0.1 s later would have started by now
        return result

    result = asyncio.run(scenario())
    assert result[outcome] == [msg_id]
    assert len(agent.calls) == 1
    if held is None:
        assert queued(spool) == []
    else:
        assert spool.load(msg_id).held is held


def test_a_requeued_dead_letter_is_attempted_again(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent({"a.test": [UNKNOWN, OK]})

    async def scenario() -> str:
        async with running(settings(), spool, agent) as scheduler:
            await until(lambda: not queued(spool))
            outcome = await scheduler.requeue(msg_id)
            await until(lambda: len(agent.calls) == 2 and not queued(spool))
        return outcome

    assert asyncio.run(scenario()) == "done"
    assert statuses(spool, msg_id, DEAD) is None


# --- lanes and destinations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "messages", "order"),
    [
        # High before normal before low.
        ({}, [("low", 0), ("normal", 0), ("high", 0)], [2, 1, 0]),
        # Low mail waiting gets its share of the picks however busy normal is.
        ({"lanes": {"low_share": 0.5}}, [("normal", 0)] * 3 + [("low", 0)], [0, 3, 1, 2]),
        # Within a lane, fresh and retried mail take turns, fresh first.
        ({}, [("normal", 1), ("normal", 1), ("normal", 0), ("normal", 0)], [2, 0, 3, 1]),
    ],
)
def test_lanes_decide_who_goes_next(
    tmp_path: Path,
    overrides: dict[str, Any],
    messages: list[tuple[str, int]],
    order: list[int],
) -> None:
    spool = new_spool(tmp_path)
    for n, (lane, attempts) in enumerate(messages):
        enqueue(spool, f"{n}@a.test", lane=lane, attempts=attempts)
    agent = FakeAgent(hold=0.01)
    cfg = settings({"delivery": {"concurrency": 1}, **overrides})

    async def scenario() -> None:
        async with running(cfg, spool, agent):
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    assert [call.recipients for call in agent.calls] == [(f"{n}@a.test",) for n in order]


def test_high_priority_overtakes_a_queue_of_low(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    for n in range(6):
        enqueue(spool, f"bulk{n}@a.test", lane="low")
    agent = FakeAgent(hold=0.05)
    urgent = ("urgent@a.test",)

    async def scenario() -> int:
        async with running(settings({"delivery": {"concurrency": 1}}), spool, agent) as scheduler:
            await until(lambda: len(agent.calls) == 2)
            scheduler.notice(enqueue(spool, *urgent, lane="high"))
            before = len(agent.calls)
            await until(lambda: not queued(spool))
        return before

    before = asyncio.run(scenario())
    assert [call.recipients for call in agent.calls].index(urgent) == before


@pytest.mark.parametrize(
    ("overrides", "mx", "domains", "most", "peak"),
    [
        # A destination limited to two connections never sees a third.
        ({"destinations": {"a.test": {"connections": 2}}}, {}, ["a.test"] * 8, {"a.test": 2}, 2),
        # Domains whose MX hosts match one provider share that provider's limit.
        (
            {"destinations": {"gmail": {"connections": 3}}},
            {"a.test": "alt1.aspmx.l.google.com", "b.test": "aspmx.l.google.com"},
            ["a.test", "b.test"] * 5, {"gmail": 3}, 3,
        ),
        # The relay's concurrency bounds every destination together.
        ({"delivery": {"concurrency": 3}}, {}, ["a.test", "b.test"] * 5, {}, 3),
    ],
)  # fmt: skip
def test_destination_limits_bound_connections_at_once(
    tmp_path: Path,
    overrides: dict[str, Any],
    mx: dict[str, str],
    domains: list[str],
    most: dict[str, int],
    peak: int,
) -> None:
    spool = new_spool(tmp_path)
    for n, domain in enumerate(domains):
        enqueue(spool, f"u{n}@{domain}")
    agent = FakeAgent(mx=mx, hold=0.05)

    async def scenario() -> None:
        async with running(settings(overrides), spool, agent):
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    assert len(agent.calls) == len(domains)
    assert {dest: agent.most[dest] for dest in most} == most
    assert agent.peak == peak


# --- reload ----------------------------------------------------------------------------------


def test_a_reload_applies_a_shorter_retry_schedule_to_deferred_mail(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    msg_id = enqueue(spool, "user@a.test")
    agent = FakeAgent({"a.test": [LATER, OK]})
    shorter = settings({"delivery": {"retry": {"schedule": ["0.1s"]}}})

    async def scenario() -> float:
        async with running(settings(HOUR), spool, agent) as scheduler:
            await until(lambda: scheduler.reasons().get(msg_id, [""])[0] == "deferred")
            await scheduler.reconfigure(shorter)
            reloaded = time.time()
            await until(lambda: not queued(spool))
        return reloaded

    reloaded = asyncio.run(scenario())
    first, second = agent.to("a.test")
    assert second.at - first.at < 1.0 and second.at - reloaded < 0.5
    assert agent.reconfigured == [shorter]
    assert agent.retired == 1  # the closing the agent handed back was run


def test_a_reload_raises_a_destination_limit_for_mail_already_waiting(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    for n in range(6):
        enqueue(spool, f"u{n}@a.test")
    agent = FakeAgent()
    agent.gate.clear()
    one = {"destinations": {"a.test": {"connections": 1}}}
    three = settings({"destinations": {"a.test": {"connections": 3}}})

    async def scenario() -> None:
        async with running(settings(one), spool, agent) as scheduler:
            await until(lambda: agent.open["a.test"] == 1)
            await asyncio.sleep(0.2)
            assert agent.open["a.test"] == 1
            await scheduler.reconfigure(three)
            await until(lambda: agent.open["a.test"] == 3)
            agent.gate.set()
            await until(lambda: not queued(spool))

    asyncio.run(scenario())
    assert agent.most["a.test"] == 3
