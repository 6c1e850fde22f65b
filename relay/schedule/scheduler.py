"""Schedule, the scheduler: the loop that owns the queue while the daemon runs, adopting new
mail, dispatching due messages under the concurrency limit to the delivery agent it is given,
and answering the control server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from relay.config.lanes import LANES
from relay.config.model import Config
from relay.observe import metrics
from relay.schedule import reasons
from relay.schedule.agent import Agent
from relay.schedule.attempt import Attempts
from relay.schedule.destinations import Destinations
from relay.schedule.dispatch import Dispatch
from relay.schedule.index import Entry, Index
from relay.schedule.operate import Operations, Result
from relay.schedule.outcome import Outcomes
from relay.schedule.scan import Scanner
from relay.schedule.shaping import Ready
from relay.spool.store import Spool

# Gauges and the heartbeat are refreshed this often.
TICK = 1.0
CUT_AGAIN = 0.1  # seconds between cancels of the attempts a cut has not ended yet


class Scheduler:
    """Owns the queue while the daemon runs: who goes next, and what each outcome means."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        agent: Agent,
        rng: random.Random | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.agent = agent
        self.heartbeat = heartbeat
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.active = 0  # messages in flight; at most delivery.concurrency
        self.scanning: asyncio.Task[None] | None = None
        self.stopping = False
        self.index = Index(self.wake)
        self.destinations = Destinations(cfg)
        ready = Ready(cfg.lanes.low_share)
        self.dispatch = Dispatch(self.index, self.destinations, agent, ready, self._spawn)
        self.outcomes = Outcomes(cfg, spool, self.index, self.dispatch, rng or random.Random())
        self.attempts = Attempts(cfg, spool, agent, self.dispatch, self.outcomes)
        self.operations = Operations(spool, self.dispatch)
        self.scanner = Scanner(spool, self.dispatch, self.outcomes.settle)
        metrics.prime(cfg.provider_names())

    # --- what the control server and intake's wake-ups reach -------------------------------------

    @property
    def indexed(self) -> bool:
        """The first scan has adopted the whole queue."""
        return self.scanner.indexed

    def arrivals(self) -> list[tuple[float, tuple[str, ...]]]:
        """(arrival, pending recipient domains) of every queued message, from the index."""
        return [(entry.queued, entry.domains) for entry in self.index.entries.values()]

    def notice(self, msg_id: str) -> None:
        """A wake-up from intake: adopt msg_id on the next turn of the loop, with its peers."""
        self.scanner.notice(msg_id)

    def reasons(self, ids: list[str] | None = None) -> dict[str, list[Any]]:
        """Per queued message (or those of ids that are queued): [reason, expected attempt
        (UTC epoch) or None, detail or None]."""
        return reasons.reasons(self.index, self.destinations, ids)

    def destination_report(self) -> list[dict[str, Any]]:
        """Destinations that are busy, throttled, suspended or have mail waiting (summary)."""
        return reasons.destination_report(self.destinations, self.dispatch.ready, self.cfg.throttle)

    async def operate(self, op: str, target: str, domain: str | None) -> Result:
        """flush, delete, hold or release target ("ALL" or an id) (Operations.operate)."""
        return await self.operations.operate(op, target, domain)

    async def cancel(self, msg_id: str, tenant: str | None) -> dict[str, Any]:
        """Cancel every pending recipient of msg_id (Operations.cancel)."""
        return await self.operations.cancel(msg_id, tenant)

    async def requeue(self, msg_id: str) -> str:
        """Bring a dead-letter record back into the queue, due now: 'done', 'busy', 'missing'."""
        return await self.operations.requeue(msg_id)

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch due messages until stop(), indexing the queue meanwhile (the first scan) and
        rescanning it every scan_interval."""
        self.scanning = self._scan_task(self.scanner.first_scan())
        next_scan = time.monotonic() + self.cfg.delivery.scan_interval
        next_tick = time.monotonic()
        while not self.stopping:
            if self.scanner.incoming:
                await self.scanner.adopt_incoming()
            if not self.stopping:
                self.dispatch.due()
                self._start_ready()
            now = time.monotonic()
            if self.scanning.done():
                self.scanning.result()  # a failed scan ends the loop: the worker is restarted
                if now >= next_scan:
                    self.scanning = self._scan_task(self.scanner.scan())
                    next_scan = now + self.cfg.delivery.scan_interval
            if now >= next_tick:
                await self._tick()
                next_tick = now + TICK
            rescan = next_scan if self.scanning.done() else float("inf")  # it wakes us at its end
            full = self.active >= self.cfg.delivery.concurrency
            await self._sleep(min(rescan, next_tick, self.dispatch.next_wake(full)))

    def _scan_task(self, scan: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(scan)
        task.add_done_callback(lambda _: self.wake.set())
        return task

    async def _sleep(self, until: float) -> None:
        self.wake.clear()
        wait = until - time.monotonic()
        if wait <= 0 or self.scanner.incoming:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), wait)

    def _start_ready(self) -> None:
        """Start ready messages while the relay has capacity and their destinations allow."""
        for entry in self.dispatch.start(self.cfg.delivery.concurrency - self.active):
            self.active += 1
            self._spawn(self._attempt(entry))

    async def _attempt(self, entry: Entry) -> None:
        try:
            await self.attempts.run(entry)
        finally:
            self.active -= 1
            self.wake.set()
            self.operations.ended(entry.id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _tick(self) -> None:
        """Refresh the gauges, close idle connections past their time, tell the supervisor
        we are alive."""
        self._gauges(time.monotonic())
        self._spawn(self.agent.sweep())
        metrics.OLDEST.set(max(0.0, self.index.oldest()))
        if self.heartbeat is not None:
            self.heartbeat()

    def _gauges(self, now: float) -> None:
        """Queue states, with ready messages counted by why they wait: their destination's
        suspension, its limits or throttling, or only the relay's own capacity ("queued")."""
        counts = Counter(self.index.states)
        counts.pop("ready", 0)
        counts.update(self.dispatch.waiting(now))
        for state in metrics.QUEUE_STATES:
            metrics.QUEUE.labels(state).set(counts[state])
        for lane in LANES:
            metrics.QUEUE_LANES.labels(lane).set(self.index.lanes[lane])
        self.destinations.gauges(now)

    # --- stop and reload ---------------------------------------------------------------------

    async def stop(self, grace: float) -> int:
        """Stop dispatching, let attempts in flight finish for `grace` seconds, then cut the
        rest; returns how many were cut (their recipients are retried after a restart)."""
        self.stopping = True
        self.wake.set()
        if self.scanning is not None:
            self.scanning.cancel()
            await asyncio.gather(self.scanning, return_exceptions=True)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        cut = await self.cut()
        await self.agent.close()
        return cut

    async def cut(self) -> int:
        """Cancel every attempt in flight now (a second SIGTERM, or the grace period's end)."""
        self.stopping = True
        tasks = [t for t in self.tasks if not t.done()]
        left = tasks
        while left:
            # Again until they end: on Python 3.11 asyncio.wait_for drops a cancel that arrives
            # with the reply it waits for (aiosmtplib waits for each reply so), and the attempt
            # would go on to its next command.
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CUT_AGAIN)
            left = [t for t in left if not t.done()]
        await asyncio.gather(*tasks, return_exceptions=True)  # collected, never raised
        return len(tasks)

    async def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration to everything that is not in flight (SIGHUP)."""
        old = self.cfg
        self.cfg = self.attempts.cfg = self.outcomes.cfg = cfg
        retired = self.agent.reconfigure(cfg)
        if retired is not None:
            self._spawn(retired)  # its idle connections; busy ones end with their task
        await self.attempts.transactions.resize(cfg.delivery.concurrency)
        self.dispatch.ready.low_share = cfg.lanes.low_share
        self.destinations.reconfigure(cfg)
        if cfg.delivery.retry != old.delivery.retry:
            self.outcomes.reschedule()
        metrics.prime(cfg.provider_names())
        self.wake.set()
