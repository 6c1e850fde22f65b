"""The control server in-process, over its real UNIX socket, in front of a running scheduler
with the fake delivery agent: the qshape summary and the waiting reasons come from the live
index and agree with what the files say."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from relay.ops import control, summary
from relay.schedule.scheduler import Scheduler
from relay.spool.layout import QUEUE
from relay.spool.run import DAEMON_LOCK, spool_lock
from relay.spool.store import Spool, iter_messages
from tests.unit.schedule.fake import FakeAgent, enqueue, new_spool, running, settings, until

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}


def settled(scheduler: Scheduler, count: int) -> bool:
    """count messages queued, each attempted once and waiting for its retry."""
    reasons = scheduler.reasons()
    return len(reasons) == count and all(r[0] == "deferred" for r in reasons.values())


async def ask(spool: Spool, op: str) -> Any:
    """What the CLI gets from the running daemon (its lock held as the supervisor holds it)."""
    with spool_lock(spool, DAEMON_LOCK, wait=0) as held:
        assert held
        return await asyncio.to_thread(control.inspect, spool, op)


def test_the_live_summary_is_the_one_read_from_the_files(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    enqueue(spool, "one@a.test", "two@b.test")
    enqueue(spool, "three@b.test")
    agent = FakeAgent({"a.test": ["451 4.3.0 later"], "b.test": ["451 4.3.0 later"]})

    async def scenario() -> tuple[Any, Any]:
        async with running(settings(HOUR), spool, agent) as scheduler:
            server = await control.serve(scheduler, spool)
            try:
                await until(lambda: settled(scheduler, 2))
                return await ask(spool, "summary"), await ask(spool, "reasons")
            finally:
                server.close()

    live, reasons = asyncio.run(scenario())
    assert live["indexed"] is True
    offline = summary.summarize(iter_messages(spool, QUEUE), time.time())
    assert summary.from_json(live["summary"]) == offline
    totals = {row.domain: row.total for row in offline.rows}
    assert totals == {"TOTAL": 2, "b.test": 2, "a.test": 1}
    assert {reason for reason, _, _ in reasons.values()} == {"deferred"}
