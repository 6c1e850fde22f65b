"""Scheduler stage: the in-memory index ordered by next attempt, dispatch under the concurrency
limit, applying each recipient's outcome to the spool, and operator actions on the live queue."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

from relay.config.model import Config
from relay.config.shaping import LANES
from relay.delivery.courier import Courier, RecipientResult
from relay.delivery.resolver import ResolveError, Resolver, Router
from relay.mail.reply import Verdict, classify
from relay.mail.target import expand
from relay.mail.waiting import waiting_state
from relay.observe import logs, metrics
from relay.ops import summary
from relay.ops.queueops import PAST, apply, selects
from relay.schedule.backoff import next_delay
from relay.schedule.shaping import NEUTRAL, THROTTLE, Destination, Ready, Signal, combine, signal
from relay.spool.groupcommit import GroupCommit
from relay.spool.store import (
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
# How long a recipient domain's destination (its limits' owner, learnt from its MX) is kept.
DESTINATION_TTL = 300.0
DESTINATION_CACHE = 100_000
# State files loaded per worker-thread call while scanning: dispatch goes on between batches, so
# a restart over a large queue delivers new mail long before the whole queue is indexed.
SCAN_BATCH = 2000
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
    queued: float  # UTC arrival (the summary's age)
    attempts: int = 0
    last_attempt: float = 0.0
    held: bool = False
    scheduled: bool = False  # waiting for its X-Relay-Send-At time, never attempted yet
    quota: bool = False  # waiting for room in its sending quota, never attempted yet
    running: bool = False
    ready: bool = False  # due, waiting in a destination's ready queue (or for its MX)
    due: float = 0.0  # time.monotonic() of the next attempt
    lane: str = "normal"
    domains: tuple[str, ...] = ()  # recipient domains still pending
    routes: tuple[tuple[str, str], ...] = ()  # (domain, destination) while ready or running

    @property
    def state(self) -> str:
        """The state counted in the queue gauge; "ready" is split by destination at each tick."""
        return waiting_state(
            running=self.running,
            held=self.held,
            ready=self.ready,
            scheduled=self.scheduled,
            quota=self.quota,
            attempted=bool(self.attempts),
        )

    @property
    def dests(self) -> tuple[str, ...]:
        """The distinct destinations this message's pending domains go to."""
        return tuple(dict.fromkeys(dest for _, dest in self.routes))


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
        self.removals: GroupCommit[str] = GroupCommit(spool.remove_batch)
        self.ready = Ready(cfg.lanes.low_share)
        self.destinations: dict[str, Destination] = {}
        self.dest_cache: dict[str, tuple[str, float]] = {}  # domain: (destination, expiry)
        self.resolving: dict[str, list[Entry]] = {}  # domain: entries waiting for its MX
        self.shown: set[str] = set()  # destinations with throttle gauges
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiters: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self.incoming: list[str] = []
        self.scanning: asyncio.Task[None] | None = None
        self.indexed = False  # the first scan has adopted the whole queue
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
        now = time.time()
        entry = Entry(
            msg.id, msg.born, msg.queued_at, msg.attempts, last, msg.held,
            scheduled=msg.scheduled(now), quota=msg.over_quota(now),
            lane=msg.lane if msg.lane in LANES else "normal",
            domains=pending_domains(msg),
        )  # fmt: skip
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
            self._unready(entry)
            self.states[entry.state] -= 1

    async def scan(self) -> None:
        """Adopt every state file not yet indexed, in batches; the backstop for lost wake-ups."""
        indexed = set(self.index)  # before listing: what a wake-up adopts meanwhile is not gone
        on_disk = await asyncio.to_thread(self.spool.ids, QUEUE)
        fresh = [i for i in on_disk if i not in self.index]
        for start in range(0, len(fresh), SCAN_BATCH):
            batch = fresh[start : start + SCAN_BATCH]
            for msg_id, msg in await asyncio.to_thread(self._load_many, batch):
                await self._adopt_loaded(msg_id, msg)
        for msg_id in indexed - set(on_disk):
            entry = self.index.get(msg_id)
            if entry is not None and not entry.running:
                self._drop(msg_id)

    async def _first_scan(self) -> None:
        started = time.monotonic()
        await self.scan()
        self.indexed = True
        seconds = round(time.monotonic() - started, 3)
        logs.event("indexed", messages=len(self.index), seconds=seconds)

    async def shape(self) -> dict[str, Any]:
        """The qshape summary from the index, reading no file, once the first scan is done."""
        if not self.indexed:
            return {"indexed": False}
        shapes = [(entry.queued, entry.domains) for entry in self.index.values()]
        counted = await asyncio.to_thread(summary.count, shapes, time.time())
        return {"indexed": True, "summary": counted.as_json()}

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
        """Dispatch due messages until stop(), indexing the queue meanwhile (the first scan) and
        rescanning it every scan_interval."""
        self.scanning = self._scan_task(self._first_scan())
        next_scan = time.monotonic() + self.cfg.delivery.scan_interval
        next_tick = time.monotonic()
        while not self.stopping:
            if self.incoming:
                await self._adopt_incoming()
            self._dispatch_due()
            self._start_ready()
            now = time.monotonic()
            if self.scanning.done():
                self.scanning.result()  # a failed scan ends the loop: the worker is restarted
                if now >= next_scan:
                    self.scanning = self._scan_task(self.scan())
                    next_scan = now + self.cfg.delivery.scan_interval
            if now >= next_tick:
                await self._tick()
                next_tick = now + TICK
            rescan = next_scan if self.scanning.done() else float("inf")  # it wakes us at its end
            await self._sleep(min(rescan, next_tick, self._next_wake()))

    def _scan_task(self, scan: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(scan)
        task.add_done_callback(lambda _: self.wake.set())
        return task

    def _next_wake(self) -> float:
        """The heap's next due time, or when a waiting destination opens (rate slot or end of a
        suspension); a busy destination or a full relay wakes us when an attempt ends."""
        due = self.heap[0][0] if self.heap else float("inf")
        if self.active >= self.cfg.delivery.concurrency or not self.ready:
            return due
        now = time.monotonic()
        opens = (self._destination(dest).opens_at(now) for dest, _ in self.ready.waiting())
        return min(due, *opens)

    async def _sleep(self, until: float) -> None:
        self.wake.clear()
        wait = until - time.monotonic()
        if wait <= 0 or self.incoming:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), wait)

    def _dispatch_due(self) -> None:
        """Move every message whose time has come into the ready queues."""
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now and not self.stopping:
            due, msg_id = heapq.heappop(self.heap)
            entry = self.index.get(msg_id)
            if entry is None or entry.running or entry.held or entry.ready or entry.due != due:
                continue  # a stale heap item: deleted, held, busy, or rescheduled since
            self._change(entry, ready=True, scheduled=False, quota=False)
            self._route_or_resolve(entry)

    def _route_or_resolve(self, entry: Entry) -> None:
        """Queue entry at its first destination, or wait for the MX of a domain whose
        destination is not known yet (one lookup per domain, however many wait for it)."""
        now = time.monotonic()
        routes = [(domain, self._cached_destination(domain, now)) for domain in entry.domains]
        missing = [domain for domain, dest in routes if dest is None]
        if not missing:
            entry.routes = tuple((domain, dest or domain) for domain, dest in routes)
            self.ready.push(entry, (entry.dests or ("",))[0])
            return
        for domain in missing:
            waiting = self.resolving.setdefault(domain, [])
            if not waiting:
                self._spawn(self._learn_destination(domain))
            if entry not in waiting:
                waiting.append(entry)

    def _cached_destination(self, domain: str, now: float) -> str | None:
        cached = self.dest_cache.get(domain)
        return cached[0] if cached is not None and cached[1] > now else None

    async def _learn_destination(self, domain: str) -> None:
        """Resolve domain's first MX (or smarthost) to find whose limits it shares."""
        try:
            route = await self.router.route(domain)
            host: str | None = route.hosts[0].name
        except Exception as exc:  # the attempt itself reports DNS trouble to the recipients
            if not isinstance(exc, ResolveError):
                logs.failure("scheduler", exc, domain=domain)
            host = None
        if len(self.dest_cache) >= DESTINATION_CACHE:
            self.dest_cache.pop(next(iter(self.dest_cache)))
        expiry = time.monotonic() + DESTINATION_TTL
        self.dest_cache[domain] = (self.cfg.destination(domain, host), expiry)
        for entry in self.resolving.pop(domain, []):
            current = self.index.get(entry.id) is entry and entry.ready and not entry.routes
            if current and not any(entry in self.resolving.get(d, ()) for d in entry.domains):
                self._route_or_resolve(entry)
        self.wake.set()

    def _destination(self, name: str) -> Destination:
        dest = self.destinations.get(name)
        if dest is None:
            dest = self.destinations[name] = Destination(name, self.cfg.limits(name))
        return dest

    def _start_ready(self) -> None:
        """Start ready messages while the relay has capacity and their destinations allow."""
        now = time.monotonic()

        def opens(name: str) -> bool:
            return self._destination(name).opens_at(now) <= now

        while self.active < self.cfg.delivery.concurrency and not self.stopping:
            found = self.ready.pick(opens)
            if found is None:
                return
            entry = cast(Entry, found[0])
            if self.index.get(entry.id) is not entry or not entry.ready:
                continue  # left the queue while it waited
            blocked = next((dest for dest in entry.dests if not opens(dest)), None)
            if blocked is not None:  # a message to several destinations waits for each
                self.ready.push(entry, blocked, front=True)
                continue
            self._start(entry, now)

    def _start(self, entry: Entry, now: float) -> None:
        for dest in entry.dests:
            self._destination(dest).start(now, self.cfg.throttle)
        self._change(entry, running=True, ready=False)
        self.active += 1
        self._spawn(self._attempt(entry))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _unready(self, entry: Entry) -> None:
        """Take entry out of the ready queues and MX waits (deleted, held, operated on)."""
        if not entry.ready:
            return
        for dest in entry.dests:
            if self.ready.remove(entry, dest):
                break
        for domain in entry.domains:
            waiting = self.resolving.get(domain)
            if waiting is not None and entry in waiting:
                waiting.remove(entry)
        self._change(entry, ready=False)
        entry.routes = ()

    async def _tick(self) -> None:
        """Refresh the gauges, close idle connections past their time, tell the supervisor
        we are alive."""
        self._gauges(time.monotonic())
        self._spawn(self.courier.sweep())
        while self.ages and self.ages[0][1] not in self.index:
            heapq.heappop(self.ages)  # lazily forget messages that left the queue
        oldest = time.time() - self.ages[0][0] if self.ages else 0.0
        metrics.OLDEST.set(max(0.0, oldest))
        if self.heartbeat is not None:
            self.heartbeat()

    def _gauges(self, now: float) -> None:
        """Queue states, with ready messages counted by why they wait: their destination's
        suspension, its limits or throttling, or only the relay's own capacity ("queued")."""
        counts = Counter(self.states)
        ready = counts.pop("ready", 0)
        for name, waiting in self.ready.waiting():
            counts[self._waits_for(self._destination(name), now)] += waiting
            ready -= waiting
        counts["queued"] += ready  # waiting for their MX to be looked up
        for state in metrics.QUEUE_STATES:
            metrics.QUEUE.labels(state).set(counts[state])
        for name, dest in list(self.destinations.items()):
            if name in self.shown:
                metrics.THROTTLE_LEVEL.labels(name).set(dest.level)
                metrics.SUSPENDED.labels(name).set(dest.suspended(now))
            if dest.idle(now) and name not in self.shown:
                del self.destinations[name]  # nothing to remember about it

    @staticmethod
    def _waits_for(dest: Destination, now: float) -> str:
        if dest.suspended(now):
            return "suspended"
        return "throttled" if dest.throttled(now) else "queued"

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
        await self.courier.close()
        return cut

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
            retired, self.courier = self.courier, Courier(cfg.delivery)
            self._spawn(retired.close())  # its idle connections; busy ones end with their task
        if cfg.delivery.dns != old.delivery.dns:
            self.resolver = Resolver(cfg.delivery.dns)
        self.router = Router(cfg, self.resolver)
        await self.transactions.resize(cfg.delivery.concurrency)
        self.ready.low_share = cfg.lanes.low_share
        for name, dest in self.destinations.items():
            dest.limits = cfg.limits(name)
        if (cfg.destinations, cfg.providers, cfg.routes) != (
            old.destinations,
            old.providers,
            old.routes,
        ):
            self.dest_cache.clear()
        if cfg.delivery.retry != old.delivery.retry:
            self._reschedule_waiting()
        metrics.prime(cfg.provider_names())
        self.wake.set()

    def _reschedule_waiting(self) -> None:
        """Deferred messages wait by the new retry schedule, counted from their last attempt."""
        for entry in self.index.values():
            if entry.running or entry.held or entry.ready or not entry.attempts:
                continue
            age = entry.last_attempt - entry.born
            delay = next_delay(entry.attempts, age, self.cfg.delivery.retry, self.rng)
            self.schedule(entry, entry.last_attempt + (delay or 0.0))

    # --- one attempt of one message ----------------------------------------------------------

    async def _attempt(self, entry: Entry) -> None:
        signals: dict[str, Signal] = {}
        try:
            msg = await self._load_for_attempt(entry)
            if msg is not None:
                await self._deliver_all(msg, dict(entry.routes), signals)
                await self._conclude(entry, msg)
        except Exception as exc:  # an I/O failure or a bug must not stop the scheduler
            logs.failure("scheduler", exc, id=entry.id)
            if entry.id in self.index:
                self.schedule(entry, time.time() + ERROR_RETRY)
        finally:
            self._release(entry, signals)
            if entry.running:
                self._change(entry, running=False)
            self.active -= 1
            self.wake.set()
            for waiter in self.waiters.pop(entry.id, []):
                if not waiter.done():
                    waiter.set_result(None)

    def _release(self, entry: Entry, signals: dict[str, Signal]) -> None:
        """Give back the destinations' slots, each learning from its transactions' replies."""
        now = time.monotonic()
        for name in entry.dests:
            dest = self._destination(name)
            if dest.finish(signals.get(name, Signal(NEUTRAL)), now, self.cfg.throttle):
                self.shown.add(name)  # its gauges from now on, back to 0 included
                logs.event(
                    "throttle_changed", destination=name, throttle_level=dest.level,
                    connections=dest.connections(),
                    interval=round(dest.interval(self.cfg.throttle), 3),
                    suspended_for=round(max(0.0, dest.suspended_until - now), 3),
                    reply=dest.last_reply,
                )  # fmt: skip
        entry.routes = ()

    async def _load_for_attempt(self, entry: Entry) -> Message | None:
        """The message's state, read on the loop: a small file, most often in the page cache,
        read faster than a hop to a worker thread and back (invariant 5 sends fsyncs and large
        file I/O there)."""
        try:
            return self.spool.load(entry.id)
        except CorruptEntry as exc:
            self._drop(entry.id)
            await asyncio.to_thread(self.spool.quarantine, entry.id, QUEUE, str(exc))
        except SpoolError:
            self._drop(entry.id)  # deleted behind our back
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
                self._apply(msg, rcpt, result, started, provider)
            # Persist each recipient's outcome as soon as it is known (DESIGN invariant 3);
            # a message with nothing left to do is removed instead (_forget), at once.
            if msg.pending() or msg.failed():
                await asyncio.to_thread(self.spool.save, msg)
            failed = [r for r in rcpts if r.status == "failed"]
            if failed:
                await self._dead_letter(msg, failed, "permanent")
        outcome = signal((r.reply for r in results), self.cfg.throttle)
        if outcome.kind == THROTTLE:
            metrics.THROTTLE_EVENTS.labels(provider).inc()
        return outcome

    async def _results(
        self, msg: Message, domain: str, rcpts: list[Recipient], dest: str
    ) -> tuple[str, list[RecipientResult]]:
        """The provider of the domain's first MX (for metrics) and a result per recipient."""
        addresses = [r.address for r in rcpts]
        try:
            route = await self.router.route(domain)
        except ResolveError as exc:
            return metrics.OTHER_PROVIDER, [
                RecipientResult(a, exc.reply, None, None, False) for a in addresses
            ]
        limit = self._destination(dest)
        results = await self.courier.deliver(
            route,
            msg.sender,
            addresses,
            self.spool.content_path(msg.id),
            size=msg.size,
            smtputf8=msg.smtputf8,
            destination=dest,
            idle_room=max(0, limit.connections() - limit.busy),
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
            await self._forget(entry, msg)
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
        entry.domains = pending_domains(msg)
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
        self._drop(entry.id)

    # --- what the queue waits for (called by the control server) --------------------------------

    def reasons(self) -> dict[str, list[Any]]:
        """Per queued message: [reason, expected attempt (UTC epoch) or None, detail or None];
        reasons are active, held, queued, scheduled, quota, deferred, throttled, suspended."""
        now, wall_now = time.monotonic(), time.time()
        out: dict[str, list[Any]] = {}
        for msg_id, entry in self.index.items():
            reason, at, detail = self._reason(entry, now)
            out[msg_id] = [reason, None if at is None else round(wall_now + at - now, 3), detail]
        return out

    def _reason(self, entry: Entry, now: float) -> tuple[str, float | None, str | None]:
        if entry.running:
            return "active", now, None
        if entry.held:
            return "held", None, None
        if not entry.ready:
            return entry.state, entry.due, None
        dests = [self._destination(name) for name in entry.dests]
        if not dests:
            return "queued", now, None  # its MX is being looked up
        dest = max(dests, key=lambda d: (d.suspended_until, d.opens_at(now), d.level))
        reason = self._waits_for(dest, now)
        opens = dest.opens_at(now)
        at = opens if opens != float("inf") else max(now, dest.next_slot)
        return reason, at, None if reason == "queued" else describe(dest, self.cfg, now)

    def destination_report(self) -> list[dict[str, Any]]:
        """Destinations that are busy, throttled, suspended or have mail waiting (summary)."""
        now, wall_now = time.monotonic(), time.time()
        waiting = dict(self.ready.waiting())
        rows = []
        for name, dest in sorted(self.destinations.items()):
            if dest.idle(now) and not waiting.get(name):
                continue
            interval = dest.interval(self.cfg.throttle)
            rows.append({
                "destination": name, "state": self._waits_for(dest, now), "busy": dest.busy,
                "connections": dest.connections(), "limit": dest.limits.connections,
                "rate": round(1 / interval, 3) if interval else None, "level": dest.level,
                "waiting": waiting.get(name, 0),
                "suspended_until": (
                    round(wall_now + dest.suspended_until - now, 3) if dest.suspended(now) else None
                ),
                "last_reply": None if dest.last_reply is None else str(dest.last_reply),
            })  # fmt: skip
        return rows

    # --- operator actions on the live queue (called by the control server) -------------------

    async def operate(self, op: str, target: str, domain: str | None) -> Result:
        """flush, delete, hold or release target ("ALL" or an id), optionally only where a
        recipient domain still has pending recipients. A message in flight is acted on when
        its attempt ends, so it is delivered or deleted, never both."""
        result: Result = {"done": [], "busy": [], "missing": [], "gone": []}
        for msg_id in expand(target, lambda: sorted(self.index)):
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
            self._unready(entry)
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
        self._change(entry, held=msg.held, quota=msg.over_quota(time.time()))
        entry.domains = pending_domains(msg)
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


def pending_domains(msg: Message) -> tuple[str, ...]:
    """Interned: a million queued messages to a few domains share their names' memory."""
    return tuple(dict.fromkeys(sys.intern(r.domain) for r in msg.pending()))


def describe(dest: Destination, cfg: Config, now: float) -> str:
    """One line on why a destination holds mail back."""
    if dest.suspended(now):
        what = f"{dest.name} suspended for {dest.suspended_until - now:.0f}s"
    elif dest.level:
        what = f"{dest.name} throttled (level {dest.level}, {connections(dest.connections())})"
    else:
        what = f"{dest.name} at its limit ({connections(dest.limits.connections)})"
    return what if dest.last_reply is None else f"{what} after: {dest.last_reply}"


def connections(count: int) -> str:
    return f"{count} connection{'s' * (count != 1)}"
