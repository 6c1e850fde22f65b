"""Scheduler stage: the in-memory index ordered by next attempt, dispatch under the concurrency
limit, applying each recipient's outcome to the spool, and operator actions on the live queue."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from relay import logs, metrics
from relay.backoff import next_delay
from relay.classify import Verdict, classify
from relay.config import Config
from relay.courier import Courier, RecipientResult
from relay.queueops import PAST, apply, selects
from relay.resolver import ResolveError, Resolver, Router
from relay.spool import (
    QUEUE,
    CorruptEntry,
    Message,
    Recipient,
    Spool,
    SpoolError,
    is_id,
)

# After an unexpected error in an attempt (disk full while saving, a bug), try again this late.
ERROR_RETRY = 60.0
# An operator action on a message in flight waits this long for its attempt to end.
SETTLE_TIMEOUT = 15.0
# Gauges and the heartbeat are refreshed this often.
TICK = 1.0
STATUS_OF = {
    Verdict.DELIVERED: "delivered",
    Verdict.TEMPORARY: "deferred",
    Verdict.PERMANENT: "failed",
}
RESULT_OF = {"delivered": "delivered", "failed": "bounced", "expired": "expired"}
Result = dict[str, list[str]]


@dataclass(slots=True)
class Entry:
    """What the index keeps per queued message: no envelope, no body (DESIGN invariant 4)."""

    id: str
    born: float  # UTC start of its max_age window
    attempts: int = 0
    last_attempt: float = 0.0
    held: bool = False
    scheduled: bool = False  # waiting for its X-Relay-Send-At time, never attempted yet
    running: bool = False
    due: float = 0.0  # time.monotonic() of the next attempt

    @property
    def state(self) -> str:
        if self.running:
            return "active"
        if self.held:
            return "held"
        if self.attempts:
            return "deferred"
        return "scheduled" if self.scheduled else "queued"


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


class Scheduler:
    """Owns the queue while the daemon runs: who goes next, and what each outcome means."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        rng: random.Random | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.resolver = Resolver(cfg.delivery.dns)
        self.router = Router(cfg, self.resolver)
        self.courier = Courier(cfg.delivery)
        self.rng = rng or random.Random()
        self.heartbeat = heartbeat
        self.index: dict[str, Entry] = {}
        self.heap: list[tuple[float, str]] = []
        self.ages: list[tuple[float, str]] = []  # (born, id): the oldest is on top
        self.states: Counter[str] = Counter()
        self.wake = asyncio.Event()
        self.active = 0  # messages in flight; at most delivery.concurrency
        self.transactions = Limiter(cfg.delivery.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.incoming: list[str] = []
        self.stopping = False
        metrics.prime(cfg.provider_names())

    # --- the index ---------------------------------------------------------------------------

    def schedule(self, entry: Entry, wall_time: float) -> None:
        """Make entry due at a persisted UTC time, converted to the monotonic clock."""
        entry.due = time.monotonic() + max(0.0, wall_time - time.time())
        heapq.heappush(self.heap, (entry.due, entry.id))
        self.wake.set()

    def _index(self, msg: Message) -> Entry:
        last = max((r.last_attempt or 0.0 for r in msg.recipients), default=0.0)
        scheduled = msg.send_at is not None and msg.send_at > time.time()
        entry = Entry(msg.id, msg.born, msg.attempts, last, msg.held, scheduled)
        self.index[msg.id] = entry
        self.states[entry.state] += 1
        heapq.heappush(self.ages, (entry.born, entry.id))
        if not entry.held:
            self.schedule(entry, msg.next_attempt)
        return entry

    def _change(self, entry: Entry, **fields: Any) -> None:
        """Update an entry's fields, keeping the per-state counts (a gauge) right."""
        self.states[entry.state] -= 1
        for name, value in fields.items():
            setattr(entry, name, value)
        self.states[entry.state] += 1

    def _drop(self, msg_id: str) -> None:
        entry = self.index.pop(msg_id, None)
        if entry is not None:
            self.states[entry.state] -= 1

    async def scan(self) -> None:
        """Adopt every state file not yet indexed; the backstop for lost wake-ups."""
        indexed = set(self.index)  # before listing: what a wake-up adopts meanwhile is not gone
        on_disk = await asyncio.to_thread(self.spool.ids, QUEUE)
        fresh = [i for i in on_disk if i not in self.index]
        loaded = await asyncio.to_thread(self._load_many, fresh)
        for msg_id, msg in loaded:
            await self._adopt_loaded(msg_id, msg)
        for msg_id in indexed - set(on_disk):
            entry = self.index.get(msg_id)
            if entry is not None and not entry.running:
                self._drop(msg_id)

    def notice(self, msg_id: str) -> None:
        """A wake-up from intake: adopt msg_id on the next turn of the loop, with its peers."""
        if is_id(msg_id) and msg_id not in self.index:
            self.incoming.append(msg_id)
            self.wake.set()

    async def _adopt_incoming(self) -> None:
        """Load every noticed id in one worker-thread call and index them."""
        ids, self.incoming = self.incoming, []
        loaded = await asyncio.to_thread(self._load_many, ids)
        for msg_id, msg in loaded:
            await self._adopt_loaded(msg_id, msg)

    def _load_many(self, ids: Iterable[str]) -> list[tuple[str, Message | str | None]]:
        """Load state files in one worker thread: a Message, a corruption reason, or None."""
        out: list[tuple[str, Message | str | None]] = []
        for msg_id in ids:
            try:
                out.append((msg_id, self.spool.load(msg_id)))
            except CorruptEntry as exc:
                out.append((msg_id, str(exc)))
            except SpoolError:
                out.append((msg_id, None))
        return out

    async def _adopt_loaded(self, msg_id: str, msg: Message | str | None) -> None:
        if msg_id in self.index or msg is None:
            return
        if isinstance(msg, str):
            await asyncio.to_thread(self.spool.quarantine, msg_id, QUEUE, msg)
            return
        if msg.failed():  # repairs a stop between saving an outcome and dead-lettering it
            await asyncio.to_thread(self.spool.dead_letter, msg)
        if not msg.pending():
            await asyncio.to_thread(self.spool.remove, msg_id)
            return
        self._index(msg)

    # --- dispatch ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch due messages until stop(); rescan the queue every scan_interval."""
        await self.scan()
        next_scan = time.monotonic() + self.cfg.delivery.scan_interval
        next_tick = time.monotonic()
        while not self.stopping:
            if self.incoming:
                await self._adopt_incoming()
            self._dispatch_due()
            now = time.monotonic()
            if now >= next_scan:
                await self.scan()
                next_scan = now + self.cfg.delivery.scan_interval
            if now >= next_tick:
                self._tick()
                next_tick = now + TICK
            await self._sleep(min(next_scan, next_tick, self._next_due()))

    def _next_due(self) -> float:
        full = self.active >= self.cfg.delivery.concurrency
        return float("inf") if full or not self.heap else self.heap[0][0]

    async def _sleep(self, until: float) -> None:
        self.wake.clear()
        wait = until - time.monotonic()
        if wait <= 0 or self.incoming:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), wait)

    def _dispatch_due(self) -> None:
        while self.heap and self.heap[0][0] <= time.monotonic() and not self.stopping:
            if self.active >= self.cfg.delivery.concurrency:
                return  # an attempt ending sets wake, and dispatch resumes
            due, msg_id = heapq.heappop(self.heap)
            entry = self.index.get(msg_id)
            if entry is None or entry.running or entry.held or entry.due != due:
                continue  # a stale heap item: deleted, held, in flight, or rescheduled since
            self._change(entry, running=True, scheduled=False)
            self.active += 1
            task = asyncio.create_task(self._attempt(entry))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _tick(self) -> None:
        """Refresh the queue gauges and tell the supervisor we are alive."""
        for state in metrics.QUEUE_STATES:
            metrics.QUEUE.labels(state).set(self.states[state])
        while self.ages and self.ages[0][1] not in self.index:
            heapq.heappop(self.ages)  # lazily forget messages that left the queue
        oldest = time.time() - self.ages[0][0] if self.ages else 0.0
        metrics.OLDEST.set(max(0.0, oldest))
        if self.heartbeat is not None:
            self.heartbeat()

    async def stop(self, grace: float) -> int:
        """Stop dispatching, let attempts in flight finish for `grace` seconds, then cut the
        rest; returns how many were cut (their recipients are retried after a restart)."""
        self.stopping = True
        self.wake.set()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace)
        return await self.cut()

    async def cut(self) -> int:
        """Cancel every attempt in flight now (a second SIGTERM, or the grace period's end)."""
        self.stopping = True
        tasks = [t for t in self.tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration to everything that is not in flight (SIGHUP)."""
        old, self.cfg = self.cfg, cfg
        if cfg.delivery != old.delivery:
            self.courier = Courier(cfg.delivery)
        if cfg.delivery.dns != old.delivery.dns:
            self.resolver = Resolver(cfg.delivery.dns)
        self.router = Router(cfg, self.resolver)
        await self.transactions.resize(cfg.delivery.concurrency)
        if cfg.delivery.retry != old.delivery.retry:
            self._reschedule_waiting()
        metrics.prime(cfg.provider_names())
        self.wake.set()

    def _reschedule_waiting(self) -> None:
        """Deferred messages wait by the new retry schedule, counted from their last attempt."""
        for entry in self.index.values():
            if entry.running or entry.held or not entry.attempts:
                continue
            age = entry.last_attempt - entry.born
            delay = next_delay(entry.attempts, age, self.cfg.delivery.retry, self.rng)
            self.schedule(entry, entry.last_attempt + (delay or 0.0))

    # --- one attempt of one message ----------------------------------------------------------

    async def _attempt(self, entry: Entry) -> None:
        try:
            msg = await self._load_for_attempt(entry)
            if msg is not None:
                await self._deliver_all(msg)
                await self._conclude(entry, msg)
        except Exception as exc:  # an I/O failure or a bug must not stop the scheduler
            logs.failure("scheduler", exc, id=entry.id)
            if entry.id in self.index:
                self.schedule(entry, time.time() + ERROR_RETRY)
        finally:
            if entry.running:
                self._change(entry, running=False)
            self.active -= 1
            self.wake.set()
            for waiter in self.waiters.pop(entry.id, []):
                if not waiter.done():
                    waiter.set_result(None)

    async def _load_for_attempt(self, entry: Entry) -> Message | None:
        try:
            return await asyncio.to_thread(self.spool.load, entry.id)
        except CorruptEntry as exc:
            self._drop(entry.id)
            await asyncio.to_thread(self.spool.quarantine, entry.id, QUEUE, str(exc))
        except SpoolError:
            self._drop(entry.id)  # deleted behind our back
        return None

    async def _deliver_all(self, msg: Message) -> None:
        """One transaction per recipient domain, all of that domain's recipients in it."""
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for rcpt in msg.pending():
            by_domain[rcpt.domain].append(rcpt)
        lock = asyncio.Lock()
        await asyncio.gather(
            *(self._transaction(msg, domain, rcpts, lock) for domain, rcpts in by_domain.items())
        )

    async def _transaction(
        self, msg: Message, domain: str, rcpts: list[Recipient], lock: asyncio.Lock
    ) -> None:
        async with self.transactions:
            logs.event("attempt", id=msg.id, domain=domain, rcpts=[r.address for r in rcpts])
            started = time.time()
            provider, results = await self._results(msg, domain, rcpts)
            metrics.DURATION.observe(time.time() - started)
        async with lock:
            for rcpt, result in zip(rcpts, results, strict=True):
                self._apply(msg, rcpt, result, started, provider)
            # Persist each recipient's outcome as soon as it is known (DESIGN invariant 3).
            await asyncio.to_thread(self.spool.save, msg)
            failed = [r for r in rcpts if r.status == "failed"]
            if failed:
                await self._dead_letter(msg, failed, "permanent")

    async def _results(
        self, msg: Message, domain: str, rcpts: list[Recipient]
    ) -> tuple[str, list[RecipientResult]]:
        """The provider of the domain's first MX (for metrics) and a result per recipient."""
        addresses = [r.address for r in rcpts]
        try:
            route = await self.router.route(domain)
        except ResolveError as exc:
            return metrics.OTHER_PROVIDER, [
                RecipientResult(a, exc.reply, None, None, False) for a in addresses
            ]
        results = await self.courier.deliver(
            route,
            msg.sender,
            addresses,
            self.spool.content_path(msg.id),
            size=msg.size,
            smtputf8=msg.smtputf8,
        )
        return self.cfg.provider(route.hosts[0].name), results

    def _apply(
        self, msg: Message, rcpt: Recipient, result: RecipientResult, started: float, provider: str
    ) -> None:
        verdict = classify(result.reply).verdict
        rcpt.record(started, STATUS_OF[verdict], result.reply, result.mx, result.ip, result.tls)
        metrics.ATTEMPTS.labels(
            {"delivered": "delivered", "deferred": "temporary", "failed": "permanent"}[rcpt.status],
            provider,
        ).inc()
        if rcpt.status == "deferred":
            metrics.DEFERRALS.labels(provider).inc()
        elif rcpt.status == "delivered":
            metrics.RECIPIENTS.labels("delivered").inc()
        # One line per recipient and attempt: enough to answer "where is my message" by grep.
        logs.event(
            rcpt.status, id=msg.id, rcpt=rcpt.address, mx=result.mx, ip=result.ip,
            tls=result.tls, tls_verified=result.tls_verified, tls_report=result.tls_report,
            reply=result.reply, outcome=verdict.value, attempt=rcpt.attempts,
            delay=round(time.time() - msg.queued_at, 3),
        )  # fmt: skip

    async def _conclude(self, entry: Entry, msg: Message) -> None:
        """After every domain of this attempt: finish, expire, or schedule the next attempt."""
        pending = msg.pending()
        if not pending:
            await self._forget(entry)
            return
        now = time.time()
        msg.attempts += 1
        delay = next_delay(msg.attempts, now - msg.born, self.cfg.delivery.retry, self.rng)
        if delay is None:
            await self._expire(entry, msg, pending)
            return
        msg.next_attempt = now + delay
        await asyncio.to_thread(self.spool.save, msg)
        logs.event(
            "retry_scheduled", id=msg.id, attempts=msg.attempts,
            next_attempt=round(msg.next_attempt, 3), rcpts=[r.address for r in pending],
        )  # fmt: skip
        self._change(entry, attempts=msg.attempts, last_attempt=now)
        self.schedule(entry, msg.next_attempt)

    async def _expire(self, entry: Entry, msg: Message, pending: list[Recipient]) -> None:
        for rcpt in pending:
            rcpt.status = "expired"
            logs.event("expired", id=msg.id, rcpt=rcpt.address, reply=rcpt.reply, mx=rcpt.mx)
        await asyncio.to_thread(self.spool.save, msg)
        await self._dead_letter(msg, pending, "expired")
        await self._forget(entry)

    async def _dead_letter(self, msg: Message, rcpts: list[Recipient], reason: str) -> None:
        await asyncio.to_thread(self.spool.dead_letter, msg)
        metrics.RECIPIENTS.labels(RESULT_OF[rcpts[0].status]).inc(len(rcpts))
        logs.event("dead_lettered", id=msg.id, rcpts=[r.address for r in rcpts], reason=reason)

    async def _forget(self, entry: Entry) -> None:
        """Drop a finished message from the queue and the index."""
        await asyncio.to_thread(self.spool.remove, entry.id)
        self._drop(entry.id)

    # --- operator actions on the live queue (called by the control server) -------------------

    async def operate(self, op: str, target: str, domain: str | None) -> Result:
        """flush, delete, hold or release target ("ALL" or an id), optionally only where a
        recipient domain still has pending recipients. A message in flight is acted on when
        its attempt ends, so it is delivered or deleted, never both."""
        result: Result = {"done": [], "busy": [], "missing": [], "gone": []}
        for msg_id in sorted(self.index) if target == "ALL" else [target]:
            outcome = await self._operate_one(op, msg_id, domain)
            if outcome in result:
                result[outcome].append(msg_id)
        return result

    async def _operate_one(self, op: str, msg_id: str, domain: str | None) -> str:
        known = msg_id in self.index
        if known and self.index[msg_id].running and not await self._settle(msg_id):
            return "busy"
        async with self._claim(msg_id):
            try:
                msg = await asyncio.to_thread(self.spool.load, msg_id)
            except SpoolError:  # finished (delivered or dead-lettered) meanwhile, or unknown
                self._drop(msg_id)
                return "gone" if known else "missing"
            if not selects(msg, domain):
                self._update(msg)
                return "skipped"
            if apply(op, msg, domain, time.time()):
                await asyncio.to_thread(self.spool.remove, msg_id)
                self._drop(msg_id)
            else:
                await asyncio.to_thread(self.spool.save, msg)
                self._update(msg)
        logs.event(PAST[op], id=msg_id, domain=domain)
        return "done"

    @contextlib.asynccontextmanager
    async def _claim(self, msg_id: str) -> AsyncIterator[None]:
        """Keep the dispatcher off msg_id while an operator action changes it on disk, so no
        attempt starts from (or overwrites) a state the action is rewriting."""
        entry = self.index.get(msg_id)
        if entry is not None:
            self._change(entry, running=True)
        try:
            yield
        finally:
            if entry is not None and self.index.get(msg_id) is entry:
                self._change(entry, running=False)
                self.wake.set()

    def _update(self, msg: Message) -> None:
        """Index msg again after an operator changed it on disk."""
        entry = self.index.get(msg.id)
        if entry is None:
            self._index(msg)
            return
        self._change(entry, held=msg.held)
        if not msg.held:
            self.schedule(entry, msg.next_attempt)

    async def _settle(self, msg_id: str) -> bool:
        """Wait for msg_id's attempt in flight to end; False if it is still running."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[msg_id].append(waiter)
        try:
            await asyncio.wait_for(waiter, SETTLE_TIMEOUT)
        except TimeoutError:
            return False
        return True

    async def requeue(self, msg_id: str) -> str:
        """Bring a dead-letter record back into the queue, due now: 'done', 'busy', 'missing'."""
        entry = self.index.get(msg_id)
        if entry is not None and entry.running and not await self._settle(msg_id):
            return "busy"
        async with self._claim(msg_id):
            try:
                msg = await asyncio.to_thread(self.spool.requeue, msg_id, time.time())
            except SpoolError:
                return "missing"
            self._drop(msg_id)
            self._index(msg)
        logs.event("requeued", id=msg_id)
        return "done"
