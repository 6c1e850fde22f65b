"""Schedule, notices: the delivery status notifications an attempt's end calls for (relay.bounces
decides and composes), each queued as a new message made durable by the spool and indexed at
once, before the original's state says it was reported (docs/bounces.md "Crash safety")."""

from __future__ import annotations

import asyncio
import time

from relay.bounces.compose import Report, Returned, compose
from relay.bounces.policy import Notice, envelope, on_delay, on_failure, on_relayed
from relay.bounces.returned import read_returned
from relay.config.model import Config
from relay.observe import logs, metrics
from relay.schedule.index import Index
from relay.spool.layout import DEAD
from relay.spool.message import Message, Recipient
from relay.spool.store import Spool, SpoolError


class Notices:
    """Queues DSNs from the scheduler's process: failures (before they are dead-lettered, the
    record that they were reported) and delay warnings (before delay_warned is saved)."""

    def __init__(self, spool: Spool, index: Index) -> None:
        self.spool = spool
        self.index = index
        # Recipients of this round delivered to a next hop without DSN: id -> (msg, them).
        self.handed: dict[str, tuple[Message, list[Recipient]]] = {}

    def delivered(self, msg: Message, rcpt: Recipient, dsn_relayed: bool) -> None:
        """rcpt was delivered; unless its DSN parameters went on with it, it may be owed a
        relayed notice at the round's end (relayed())."""
        if not dsn_relayed and rcpt.notify is not None:
            held = self.handed.get(msg.id)
            if held is None or held[0] is not msg:
                held = self.handed[msg.id] = (msg, [])
            held[1].append(rcpt)

    async def relayed(self, cfg: Config, msg: Message) -> None:
        """The round's relayed notice for msg, if one is owed. Queued after the deliveries
        were saved: a crash in between loses it (docs/bounces.md "Crash safety")."""
        held = self.handed.pop(msg.id, None)
        if held is None or held[0] is not msg:
            return
        notice = on_relayed(cfg.bounces, msg, held[1])
        if notice is not None:
            await self._queue(cfg, msg, notice, None)

    def unreported(self, msg: Message) -> list[Recipient]:
        """msg's failed or expired recipients not yet in its dead-letter record: their DSN is
        still to be queued (a crash in between repeats it). Blocking: a worker thread's."""
        failed = msg.failed()
        if not failed:
            return []
        try:
            record = self.spool.load(msg.id, DEAD)
        except SpoolError:  # none yet, or unreadable (the merge quarantines it)
            return failed
        known = {r.address: r for r in record.recipients}
        return [r for r in failed if known.get(r.address) != r]

    async def failures(self, cfg: Config, msg: Message, rcpts: list[Recipient]) -> None:
        """The one DSN for msg's recipients that failed together, if any is due."""
        notice = on_failure(cfg.bounces, msg, rcpts)
        if notice is not None:
            await self._queue(cfg, msg, notice, None)

    async def delay(self, cfg: Config, msg: Message, now: float) -> None:
        """msg's delay warning once it is due; sets msg.delay_warned (the caller saves it)."""
        notice = on_delay(cfg.bounces, msg, now)
        if notice is not None:
            await self._queue(cfg, msg, notice, msg.born + cfg.delivery.retry.max_age)
            msg.delay_warned = now

    async def _queue(self, cfg: Config, msg: Message, notice: Notice, until: float | None) -> None:
        """Compose the DSN, make it durable as a new message (its `received` event with it)
        and index it, due now."""
        now = time.time()
        returned = await asyncio.to_thread(self._returned, cfg, msg)
        report = Report(msg, notice.rcpts, notice.action, notice.to, cfg.smtp.hostname, now, until)
        content = compose(report, returned)
        dsn = envelope(msg, notice.to, len(content), now)
        await asyncio.to_thread(self.spool.accept, dsn, [content])
        self.index.add(dsn)
        metrics.DSNS.labels(notice.action).inc()
        logs.event(
            "dsn_queued", id=dsn.id, dsn_of=msg.id, action=notice.action, to=notice.to,
            rcpts=[r.address for r in notice.rcpts],
        )  # fmt: skip

    def _returned(self, cfg: Config, msg: Message) -> Returned:
        """What of msg goes back; its header block is lost only with its content file."""
        path = self.spool.content_path(msg.id)
        try:
            return read_returned(path, msg.size, msg.ret, cfg.bounces.max_returned)
        except OSError:
            return Returned(b"")
