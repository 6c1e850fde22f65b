"""Schedule, operator actions on the live queue: flush, delete, hold, release and requeue, each
applied to a message in flight only when its attempt ends, so it is delivered or deleted, never
both, and journaled before it is written (shared with the CLI on a stopped spool: change())."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from relay.mail import events
from relay.mail.target import expand
from relay.observe import logs
from relay.schedule.actions import PAST, apply, selects
from relay.schedule.dispatch import Dispatch
from relay.schedule.index import Index, pending_domains
from relay.spool.journal import SCHEDULER, Journal
from relay.spool.message import Message
from relay.spool.store import Spool, SpoolError

# An operator action on a message in flight waits this long for its attempt to end.
SETTLE_TIMEOUT = 15.0
Result = dict[str, list[str]]
# The event (and log line) of each action that changes a message; flush has none (it changes
# only when a message is tried).
EVENT_OF = {"delete": events.CANCELLED, "hold": events.HELD, "release": events.RELEASED}


def change(journal: Journal, op: str, msg: Message, domain: str | None, now: float) -> bool:
    """Apply op to msg (relay.schedule.actions.apply) and append its events to the journal,
    before the caller writes msg's state (or removes it: True). delete's event is `cancelled`,
    one per recipient it cancels; hold and release have one each; flush none."""
    cancelled = []
    if op == "delete":
        cancelled = [r for r in msg.pending() if domain is None or r.domain == domain]
        for rcpt in cancelled:
            rcpt.status = "deleted"
    gone = apply(op, msg, domain, now)
    if op == "delete":
        journal.append([events.record(events.CANCELLED, msg, now, r) for r in cancelled])
    elif op in EVENT_OF:
        journal.append([events.record(EVENT_OF[op], msg, now)])
    return gone


class Operations:
    """The control server's actions on the queue the scheduler owns."""

    def __init__(self, spool: Spool, dispatch: Dispatch) -> None:
        self.spool = spool
        self.dispatch = dispatch
        self.index: Index = dispatch.index
        self.journal = spool.open_journal(SCHEDULER)
        self.waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)

    async def operate(self, op: str, target: str, domain: str | None) -> Result:
        """flush, delete, hold or release target ("ALL" or an id), optionally only where a
        recipient domain still has pending recipients. A message in flight is acted on when
        its attempt ends, so it is delivered or deleted, never both. The messages not in flight
        go first, one by one; those in flight are waited for together, so ALL takes at most
        one attempt's time, not the sum of them."""
        ids = expand(target, lambda: sorted(self.index.entries))
        idle = [i for i in ids if not self._running(i)]
        outcome = {i: await self._operate_one(op, i, domain) for i in idle}
        flying = [i for i in ids if i not in outcome]
        ended = await asyncio.gather(*(self._operate_one(op, i, domain) for i in flying))
        outcome.update(zip(flying, ended, strict=True))
        result: Result = {"done": [], "busy": [], "missing": [], "gone": []}
        for msg_id in ids:
            if outcome[msg_id] in result:
                result[outcome[msg_id]].append(msg_id)
        return result

    def _running(self, msg_id: str) -> bool:
        entry = self.index.get(msg_id)
        return entry is not None and entry.running

    async def _operate_one(self, op: str, msg_id: str, domain: str | None) -> str:
        known = msg_id in self.index
        if not await self._settled(msg_id):
            return "busy"
        async with self._claim(msg_id):
            try:
                msg = await asyncio.to_thread(self.spool.load, msg_id)
            except SpoolError:  # finished (delivered or dead-lettered) meanwhile, or unknown
                self.dispatch.drop(msg_id)
                return "gone" if known else "missing"
            if not selects(msg, domain):
                self._update(msg)
                return "skipped"
            if change(self.journal, op, msg, domain, time.time()):
                await asyncio.to_thread(self.spool.remove, msg_id)
                self.dispatch.drop(msg_id)
            else:
                await asyncio.to_thread(self.spool.save, msg)
                self._update(msg)
        logs.event(EVENT_OF.get(op, PAST[op]), id=msg_id, domain=domain)
        return "done"

    async def cancel(self, msg_id: str, tenant: str | None) -> dict[str, Any]:
        """The API's DELETE: cancel every pending recipient of msg_id, after its attempt in
        flight, if any, ends. outcome: done (with the addresses cancelled and those that had
        ended, and how), busy (still in its attempt), missing (not queued: unknown, ended, or
        another tenant's)."""
        if not await self._settled(msg_id):
            return {"outcome": "busy"}
        async with self._claim(msg_id):
            try:
                msg = await asyncio.to_thread(self.spool.load, msg_id)
            except SpoolError:
                self.dispatch.drop(msg_id)
                return {"outcome": "missing"}
            if tenant is not None and msg.tenant != tenant:
                return {"outcome": "missing"}
            cancelled = [r.address for r in msg.pending()]
            ended = [{"address": r.address, "status": events.FINISHED.get(r.status, r.status)}
                     for r in msg.recipients if r.final]  # fmt: skip
            change(self.journal, "delete", msg, None, time.time())
            await asyncio.to_thread(self.spool.remove, msg_id)
            self.dispatch.drop(msg_id)
        logs.event(events.CANCELLED, id=msg_id, domain=None)
        return {"outcome": "done", "cancelled": cancelled, "ended": ended}

    async def requeue(self, msg_id: str) -> str:
        """Bring a dead-letter record back into the queue, due now: 'done', 'busy', 'missing'."""
        if not await self._settled(msg_id):
            return "busy"
        async with self._claim(msg_id):
            try:
                msg = await asyncio.to_thread(self.spool.requeue, msg_id, time.time())
            except SpoolError:
                return "missing"
            self.dispatch.drop(msg_id)
            self.index.add(msg)
        logs.event(events.REQUEUED, id=msg_id)
        return "done"

    def ended(self, msg_id: str) -> None:
        """msg_id's attempt ended: the actions waiting for it go on."""
        for waiter in self.waiters.pop(msg_id, []):
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def _claim(self, msg_id: str) -> AsyncIterator[None]:
        """Keep the dispatcher off msg_id while an operator action changes it on disk, so no
        attempt starts from (or overwrites) a state the action is rewriting."""
        entry = self.index.get(msg_id)
        if entry is not None:
            self.dispatch.unready(entry)
            self.index.change(entry, running=True)
        try:
            yield
        finally:
            if entry is not None and self.index.get(msg_id) is entry:
                self.index.change(entry, running=False)
                self.index.wake.set()

    def _update(self, msg: Message) -> None:
        """Index msg again after an operator changed it on disk."""
        entry = self.index.get(msg.id)
        if entry is None:
            self.index.add(msg)
            return
        self.index.change(entry, held=msg.held, quota=msg.over_quota(time.time()))
        entry.domains = pending_domains(msg)
        if not msg.held:
            self.index.schedule(entry, msg.next_attempt)

    async def _settled(self, msg_id: str) -> bool:
        """Wait for msg_id's attempt in flight, if any, to end; False if it is still running
        after SETTLE_TIMEOUT."""
        if not self._running(msg_id):
            return True
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[msg_id].append(waiter)
        try:
            await asyncio.wait_for(waiter, SETTLE_TIMEOUT)
        except TimeoutError:
            return False
        return True
