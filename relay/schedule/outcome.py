"""Schedule, applying an outcome: each recipient's result recorded, counted, logged and
journaled, then the message finished, scheduled for its next attempt by the backoff, or expired
into the dead letters."""

from __future__ import annotations

import asyncio
import random
import time

from relay.config.model import Config
from relay.delivery.courier import RecipientResult
from relay.mail import events
from relay.mail.category import categorize
from relay.mail.reply import Verdict, classify
from relay.observe import logs, metrics
from relay.schedule.backoff import next_delay
from relay.schedule.dispatch import Dispatch
from relay.schedule.index import Entry, Index, pending_domains
from relay.schedule.notices import Notices
from relay.spool.groupcommit import GroupCommit
from relay.spool.journal import SCHEDULER
from relay.spool.message import Message, Recipient
from relay.spool.store import Spool

STATUS_OF = {
    Verdict.DELIVERED: "delivered",
    Verdict.TEMPORARY: "deferred",
    Verdict.PERMANENT: "failed",
}
OUTCOME_OF = {"delivered": "delivered", "deferred": "temporary", "failed": "permanent"}
RESULT_OF = {"delivered": "delivered", "failed": "bounced", "expired": "expired"}


class Outcomes:
    """What each result means for its recipient, and each attempt's end for its message."""

    def __init__(
        self, cfg: Config, spool: Spool, index: Index, dispatch: Dispatch, rng: random.Random
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.index = index
        self.dispatch = dispatch
        self.rng = rng
        self.removals: GroupCommit[str] = GroupCommit(spool.remove_batch)
        # Every change's event is appended before its state is written; the spool makes the
        # events durable first (docs/events.md "Durability").
        self.journal = spool.open_journal(SCHEDULER)
        # The next attempt of a message's current round, drawn at its first deferral so that
        # the `deferred` events and the state agree: id -> (the round's message, due or None).
        self.planned: dict[str, tuple[Message, float | None]] = {}
        self.notices = Notices(spool, index)  # delivery status notifications (docs/bounces.md)

    def record(
        self, msg: Message, rcpt: Recipient, result: RecipientResult, started: float, provider: str
    ) -> None:
        """rcpt's result for the attempt started at `started`: its status and history, the
        counters, a log line and its event (made durable with the state that follows)."""
        verdict = classify(result.reply).verdict
        rcpt.record(started, STATUS_OF[verdict], result.reply, result.mx, result.ip, result.tls)
        metrics.ATTEMPTS.labels(OUTCOME_OF[rcpt.status], provider).inc()
        if rcpt.status == "deferred":
            metrics.DEFERRALS.labels(provider).inc()
        elif rcpt.status == "delivered":
            metrics.RECIPIENTS.labels("delivered").inc()
            self.notices.delivered(msg, rcpt, result.dsn_relayed)
        name = events.OF_ATTEMPT[rcpt.status]
        extra = {"next_attempt": events.iso(self._plan(msg))} if name == events.DEFERRED else {}
        self.journal.append([events.record(name, msg, started, rcpt, result, **extra)])
        # One line per recipient and attempt: enough to answer "where is my message" by grep.
        logs.event(
            name, id=msg.id, rcpt=rcpt.address, mx=result.mx, ip=result.ip,
            tls=result.tls, tls_verified=result.tls_verified, tls_report=result.tls_report,
            reply=result.reply, outcome=verdict.value, attempt=rcpt.attempts,
            delay=round(time.time() - msg.queued_at, 3),
            category=None if verdict == Verdict.DELIVERED else categorize(result.reply),
        )  # fmt: skip

    async def conclude(self, entry: Entry, msg: Message) -> None:
        """After every domain of this attempt: finish, expire, or schedule the next attempt."""
        pending = msg.pending()
        plan = self.planned.pop(msg.id, None)
        await self.notices.relayed(self.cfg, msg)
        if not pending:
            await self.settle(msg)
            await self._forget(entry, msg)
            return
        now = time.time()
        due = plan[1] if plan is not None and plan[0] is msg else self._due(msg, now)
        msg.attempts += 1
        if due is None:
            await self._expire(entry, msg, pending)
            return
        await self.settle(msg)
        await self.notices.delay(self.cfg, msg, now)  # before the save that records it
        msg.next_attempt = due
        await asyncio.to_thread(self.spool.save, msg)
        logs.event(
            "retry_scheduled", id=msg.id, attempts=msg.attempts,
            next_attempt=round(msg.next_attempt, 3), rcpts=[r.address for r in pending],
        )  # fmt: skip
        self.index.change(entry, attempts=msg.attempts, last_attempt=now)
        entry.domains = pending_domains(msg)
        self.index.schedule(entry, msg.next_attempt)

    def _plan(self, msg: Message) -> float | None:
        """When the next attempt of msg's current round is due, None if it expires instead:
        drawn once a round (the backoff's jitter), at its first deferral."""
        plan = self.planned.get(msg.id)
        if plan is None or plan[0] is not msg:
            plan = self.planned[msg.id] = (msg, self._due(msg, time.time()))
        return plan[1]

    def _due(self, msg: Message, now: float) -> float | None:
        """The next attempt after this round's, by the retry schedule; None once expired."""
        retry = self.cfg.delivery.retry
        delay = next_delay(msg.attempts + 1, now - msg.born, retry, self.rng)
        return None if delay is None else now + delay

    async def _expire(self, entry: Entry, msg: Message, pending: list[Recipient]) -> None:
        now = time.time()
        for rcpt in pending:
            rcpt.status = "expired"
            logs.event(events.EXPIRED, id=msg.id, rcpt=rcpt.address, reply=rcpt.reply, mx=rcpt.mx,
                       category=categorize(rcpt.reply))  # fmt: skip
        self.journal.append([events.record(events.EXPIRED, msg, now, r) for r in pending])
        await asyncio.to_thread(self.spool.save, msg)
        await self.settle(msg)
        await self._forget(entry)

    async def settle(self, msg: Message) -> None:
        """msg's failed and expired recipients not yet reported: one DSN for them all, made
        durable first, then their merge into its dead letters, the record that they were
        reported (docs/bounces.md "Crash safety"; a crash in between sends the DSN again)."""
        rcpts = await asyncio.to_thread(self.notices.unreported, msg)
        if not rcpts:
            return
        await self.notices.failures(self.cfg, msg, rcpts)
        for status, reason in (("failed", "permanent"), ("expired", "expired")):
            group = [r for r in rcpts if r.status == status]
            if group:
                await self.dead_letter(msg, group, reason)

    async def dead_letter(self, msg: Message, rcpts: list[Recipient], reason: str) -> None:
        """Merge msg's failed recipients into its dead-letter record, counted, logged and
        journaled."""
        addresses = [r.address for r in rcpts]
        self.journal.append(
            [events.record(events.DEAD_LETTERED, msg, time.time(), rcpts=addresses, reason=reason)]
        )
        await asyncio.to_thread(self.spool.dead_letter, msg)
        metrics.RECIPIENTS.labels(RESULT_OF[rcpts[0].status]).inc(len(rcpts))
        for rcpt in rcpts:
            metrics.BOUNCES.labels(categorize(rcpt.reply)).inc()
        logs.event(events.DEAD_LETTERED, id=msg.id, rcpts=addresses, reason=reason)

    async def _forget(self, entry: Entry, msg: Message | None = None) -> None:
        """Drop a finished message from the queue and the index; removals finishing together
        share one directory fsync. If the removal fails, msg's outcome is saved instead, so
        that what was delivered is never attempted again."""
        try:
            await self.removals.submit(entry.id)
        except OSError:
            if msg is not None:
                await asyncio.to_thread(self.spool.save, msg)
            raise
        self.dispatch.drop(entry.id)

    def reschedule(self) -> None:
        """Deferred messages wait by the (reloaded) retry schedule, counted from their last
        attempt."""
        for entry in self.index.entries.values():
            if entry.running or entry.held or entry.ready or not entry.attempts:
                continue
            age = entry.last_attempt - entry.born
            delay = next_delay(entry.attempts, age, self.cfg.delivery.retry, self.rng)
            self.index.schedule(entry, entry.last_attempt + (delay or 0.0))
