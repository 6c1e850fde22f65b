"""What the API asks of the running scheduler over its real control socket: the reasons of one
page's ids only, and cancels of one message or of a batch, within a tenant, journaled as
`cancelled` and gone from the queue."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from relay.ops import control
from relay.spool import journal
from relay.spool.layout import QUEUE
from tests.unit.schedule.fake import FakeAgent, enqueue, new_spool, running, settings, until

HOUR = {"delivery": {"retry": {"schedule": ["1h"]}}}
UNKNOWN = "0" * 20


def test_page_reasons_and_cancels_within_a_tenant(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)
    deferred = enqueue(spool, "x@a.test", "y@b.test", tenant="acme", batch_id="b")
    held = enqueue(spool, "x@b.test", tenant="acme", batch_id="b", held=True)
    others = enqueue(spool, "z@a.test", tenant="other", batch_id="b")
    agent = FakeAgent({"a.test": ["451 4.3.0 later"], "b.test": ["250 2.0.0 ok"]})

    async def scenario() -> list[Any]:
        async with running(settings(HOUR), spool, agent) as scheduler:
            server = await control.serve(scheduler, spool)
            try:
                await until(lambda: scheduler.reasons().get(deferred, [""])[0] == "deferred")

                async def ask(**message: Any) -> Any:
                    return await control.ask(spool, message, 5.0)

                return [
                    await ask(op="reasons", ids=[deferred, held, UNKNOWN]),
                    await ask(op="cancel", target=deferred, tenant="other"),
                    await ask(op="cancel", target=deferred, tenant="acme"),
                    await ask(op="cancel", batch="b", tenant="acme"),
                    await ask(op="cancel", target=deferred, tenant=None),
                ]
            finally:
                server.close()

    reasons, foreign, one, batch, again = asyncio.run(scenario())
    assert set(reasons) == {deferred, held}
    assert reasons[deferred][0] == "deferred" and reasons[held][0] == "held"
    assert foreign == {"messages": {deferred: {"outcome": "missing"}}}
    assert one["messages"][deferred] == {
        "outcome": "done",
        "cancelled": ["x@a.test"],
        "ended": [{"address": "y@b.test", "status": "delivered"}],
    }
    assert batch == {
        "messages": {held: {"outcome": "done", "cancelled": ["x@b.test"], "ended": []}}
    }
    assert again == {"messages": {deferred: {"outcome": "missing"}}}
    assert spool.ids(QUEUE) == [others]
    written = [e for path in journal.files(spool.events_dir) for e in journal.read(path, 0)[0]]
    cancelled = [(e["id"], e["rcpt"]) for e in written if e["event"] == "cancelled"]
    assert cancelled == [(deferred, "x@a.test"), (held, "x@b.test")]


def test_a_scheduler_that_does_not_answer_is_a_control_error(tmp_path: Path) -> None:
    spool = new_spool(tmp_path)

    async def scenario() -> str:
        try:
            await control.ask(spool, {"op": "reasons"}, 0.5)
        except control.ControlError as exc:
            return str(exc)
        return "answered"

    assert "not answering" in asyncio.run(scenario())
