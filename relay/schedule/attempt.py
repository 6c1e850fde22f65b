"""Schedule, one attempt: a due message's pending recipients offered through the delivery agent,
one transaction per recipient domain under the relay's transaction limit, each outcome saved
as soon as it is known."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from relay.config.model import Config
from relay.delivery.courier import RecipientResult
from relay.delivery.resolver import ResolveError
from relay.mail.dsnparams import DsnRequest, MailParams, RcptParams
from relay.observe import logs, metrics
from relay.schedule.agent import Agent
from relay.schedule.destinations import Destinations
from relay.schedule.dispatch import Dispatch
from relay.schedule.index import Entry, Index
from relay.schedule.outcome import Outcomes
from relay.schedule.shaping import THROTTLE, Signal, combine, signal_of
from relay.schedule.suppressed import Suppressed
from relay.spool.layout import QUEUE
from relay.spool.message import Message, Recipient
from relay.spool.store import CorruptEntry, Spool, SpoolError

# After an unexpected error in an attempt (disk full while saving, a bug), try again this late.
ERROR_RETRY = 60.0


class Limiter:
    """A counting limit that can be resized while tasks wait on it (SIGHUP)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.changed = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.used < self.limit)
            self.used += 1

    async def __aexit__(self, *exc: object) -> None:
        async with self.changed:
            self.used -= 1
            self.changed.notify()

    async def resize(self, limit: int) -> None:
        async with self.changed:
            self.limit = limit
            self.changed.notify_all()


class Attempts:
    """Runs the attempts that dispatch starts, one task each."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        agent: Agent,
        dispatch: Dispatch,
        outcomes: Outcomes,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.agent = agent
        self.dispatch = dispatch
        self.index: Index = dispatch.index
        self.destinations: Destinations = dispatch.destinations
        self.outcomes = outcomes
        self.transactions = Limiter(cfg.delivery.concurrency)
        self.suppressed = Suppressed(spool, outcomes.journal)

    async def run(self, entry: Entry) -> None:
        """Attempt entry's pending recipients, then give back its destinations' slots."""
        signals: dict[str, Signal] = {}
        try:
            msg = await self._load(entry)
            if msg is not None:
                self.suppressed.drop(self.cfg, msg)  # suppressed since it was queued
                await self._deliver_all(msg, dict(entry.routes), signals)
                await self.outcomes.conclude(entry, msg)
        except Exception as exc:  # an I/O failure or a bug must not stop the scheduler
            logs.failure("scheduler", exc, id=entry.id)
            if entry.id in self.index:
                self.index.schedule(entry, time.time() + ERROR_RETRY)
        finally:
            self.destinations.release(entry.dests, signals)
            entry.routes = ()
            if entry.running:
                self.index.change(entry, running=False)

    async def _load(self, entry: Entry) -> Message | None:
        """The message's state, read on the loop: a small file, most often in the page cache,
        read faster than a hop to a worker thread and back (docs/architecture.md invariant 5
        sends fsyncs and large file I/O there)."""
        try:
            return self.spool.load(entry.id)
        except CorruptEntry as exc:
            self.dispatch.drop(entry.id)
            await asyncio.to_thread(self.spool.quarantine, entry.id, QUEUE, str(exc))
        except SpoolError:
            self.dispatch.drop(entry.id)  # deleted behind our back
        return None

    async def _deliver_all(
        self, msg: Message, routes: dict[str, str], signals: dict[str, Signal]
    ) -> None:
        """One transaction per recipient domain with all of that domain's recipients; the
        domains of one destination one after another (the message holds one of its slots)."""
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for rcpt in msg.pending():
            by_domain[rcpt.domain].append(rcpt)
        by_dest: dict[str, list[str]] = defaultdict(list)
        for domain in by_domain:
            by_dest[routes.get(domain, domain)].append(domain)
        lock = asyncio.Lock()

        async def one_destination(dest: str, domains: list[str]) -> None:
            outcomes = [
                await self._transaction(msg, domain, by_domain[domain], lock, dest)
                for domain in domains
            ]
            signals[dest] = combine(outcomes)

        await asyncio.gather(*(one_destination(d, ds) for d, ds in by_dest.items()))

    async def _transaction(
        self, msg: Message, domain: str, rcpts: list[Recipient], lock: asyncio.Lock, dest: str
    ) -> Signal:
        async with self.transactions:
            logs.event("attempt", id=msg.id, domain=domain, rcpts=[r.address for r in rcpts])
            started = time.time()
            provider, results = await self._results(msg, domain, rcpts, dest)
            metrics.DURATION.observe(time.time() - started)
        async with lock:
            for rcpt, result in zip(rcpts, results, strict=True):
                self.outcomes.record(msg, rcpt, result, started, provider)
            # Persist each recipient's outcome as soon as it is known (docs/architecture.md
            # invariant 3); one with nothing left to do is removed instead (conclude), at once.
            # Failures are reported and dead-lettered when the round ends (Outcomes.settle).
            if msg.pending() or msg.failed():
                await asyncio.to_thread(self.spool.save, msg)
        outcome = signal_of((r.reply for r in results), self.cfg.throttle)
        if outcome.kind == THROTTLE:
            metrics.THROTTLE_EVENTS.labels(provider).inc()
        return outcome

    async def _results(
        self, msg: Message, domain: str, rcpts: list[Recipient], dest: str
    ) -> tuple[str, list[RecipientResult]]:
        """The provider of the domain's first MX (for metrics) and a result per recipient."""
        addresses = [r.address for r in rcpts]
        try:
            route = await self.agent.route(domain)
        except ResolveError as exc:
            return metrics.OTHER_PROVIDER, [
                RecipientResult(a, exc.reply, None, None, False) for a in addresses
            ]
        limit = self.destinations.get(dest)
        results = await self.agent.deliver(
            route,
            msg.sender,
            addresses,
            self.spool.content_path(msg.id),
            size=msg.size,
            smtputf8=msg.smtputf8,
            destination=dest,
            idle_room=max(0, limit.connections() - limit.busy),
            dsn=dsn_request(msg, rcpts),
        )
        return self.cfg.provider(route.hosts[0].name), results


def dsn_request(msg: Message, rcpts: list[Recipient]) -> DsnRequest | None:
    """The RFC 3461 parameters of msg and rcpts for the next hop; None when none was given."""
    params = tuple(
        RcptParams(None if r.notify is None else tuple(r.notify), r.orcpt) for r in rcpts
    )
    if msg.ret is None and msg.envid is None and params == (RcptParams(),) * len(rcpts):
        return None
    return DsnRequest(MailParams(msg.ret, msg.envid), params)
