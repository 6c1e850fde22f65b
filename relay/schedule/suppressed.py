"""Schedule, suppressed recipients: before every attempt, a pending recipient whose address
is now on its tenant's suppression list is ended, unsent, with a `suppressed` event (status
deleted, as a cancel; never a delivery status notification)."""

from __future__ import annotations

import time

from relay.config.model import Config
from relay.mail import events
from relay.observe import logs, metrics
from relay.spool.journal import Journal
from relay.spool.message import Message, Recipient
from relay.spool.store import Spool
from relay.suppression.check import Check, since
from relay.suppression.store import path_of


class Suppressed:
    """The scheduler's look at the lists before an attempt."""

    def __init__(self, spool: Spool, journal: Journal) -> None:
        self.check = Check(path_of(spool.history_path))
        self.journal = journal

    def drop(self, cfg: Config, msg: Message) -> list[Recipient]:
        """End msg's pending recipients that are suppressed, journaling each (made durable
        with the state or removal that follows); returns them."""
        now = time.time()
        dropped = []
        for rcpt in msg.pending():
            entry = self.check.find(cfg.suppression, msg.tenant, rcpt.address, now)
            if entry is None:
                continue
            rcpt.status = "deleted"
            dropped.append(rcpt)
            self.journal.append(
                [events.record(events.SUPPRESSED, msg, now, rcpt, kind=entry.kind,
                               since=since(entry))]
            )  # fmt: skip
            metrics.SUPPRESSED.labels("attempt").inc()
            logs.event(events.SUPPRESSED, id=msg.id, rcpt=rcpt.address, tenant=msg.tenant,
                       kind=entry.kind, since=since(entry))  # fmt: skip
        return dropped
