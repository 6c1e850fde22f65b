"""Scheduler stage: the in-memory index ordered by next attempt, dispatch under the concurrency
limit, and applying each recipient's outcome to the spool."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from relay import logs
from relay.backoff import next_delay
from relay.classify import Verdict, classify
from relay.config import Config
from relay.courier import Courier, RecipientResult
from relay.resolver import ResolveError, Resolver
from relay.spool import QUEUE, CorruptEntry, Message, Recipient, Spool, SpoolError, is_id

# After an unexpected error in an attempt (disk full while saving, a bug), try again this late.
ERROR_RETRY = 60.0
STATUS_OF = {
    Verdict.DELIVERED: "delivered",
    Verdict.TEMPORARY: "deferred",
    Verdict.PERMANENT: "failed",
}


@dataclass(slots=True)
class Entry:
    """What the index keeps per queued message: no envelope, no body (DESIGN invariant 4)."""

    id: str
    due: float = 0.0  # time.monotonic() of the next attempt
    running: bool = False
    deleted: bool = False


class Scheduler:
    """Owns the queue while the daemon runs: who goes next, and what each outcome means."""

    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        resolver: Resolver,
        courier: Courier,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.resolver = resolver
        self.courier = courier
        self.rng = rng or random.Random()
        self.index: dict[str, Entry] = {}
        self.heap: list[tuple[float, str]] = []
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(cfg.delivery.concurrency)
        self.transactions = asyncio.Semaphore(cfg.delivery.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.incoming: list[str] = []
        self.stopping = False

    # --- the index ---------------------------------------------------------------------------

    def schedule(self, entry: Entry, wall_time: float) -> None:
        """Make entry due at a persisted UTC time, converted to the monotonic clock."""
        entry.due = time.monotonic() + max(0.0, wall_time - time.time())
        heapq.heappush(self.heap, (entry.due, entry.id))
        self.wake.set()

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
                del self.index[msg_id]

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
        entry = self.index[msg_id] = Entry(msg_id)
        self.schedule(entry, msg.next_attempt)

    # --- dispatch ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch due messages until stop(); rescan the queue every scan_interval."""
        await self.scan()
        next_scan = time.monotonic() + self.cfg.delivery.scan_interval
        while not self.stopping:
            if self.incoming:
                await self._adopt_incoming()
            await self._dispatch_due()
            now = time.monotonic()
            if now >= next_scan:
                await self.scan()
                next_scan = now + self.cfg.delivery.scan_interval
            wait = min(next_scan, self.heap[0][0] if self.heap else next_scan) - time.monotonic()
            self.wake.clear()
            if wait > 0 and not self.incoming:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)

    async def _dispatch_due(self) -> None:
        while self.heap and self.heap[0][0] <= time.monotonic() and not self.stopping:
            due, msg_id = heapq.heappop(self.heap)
            entry = self.index.get(msg_id)
            if entry is None or entry.running or entry.due != due:
                continue  # a stale heap item: deleted, in flight, or rescheduled since
            await self.slots.acquire()
            if self.stopping:  # SIGTERM came while we waited for a slot
                self.slots.release()
                heapq.heappush(self.heap, (due, msg_id))
                return
            entry.running = True
            task = asyncio.create_task(self._attempt(entry))
            self.tasks.add(task)
            task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def stop(self, grace: float) -> int:
        """Stop dispatching, let attempts in flight finish for `grace` seconds, cancel the rest;
        returns how many were cancelled."""
        self.stopping = True
        self.wake.set()
        if not self.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    # --- one attempt of one message ----------------------------------------------------------

    async def _attempt(self, entry: Entry) -> None:
        try:
            msg = await asyncio.to_thread(self.spool.load, entry.id)
        except CorruptEntry as exc:
            del self.index[entry.id]
            await asyncio.to_thread(self.spool.quarantine, entry.id, QUEUE, str(exc))
            return
        except SpoolError:
            self.index.pop(entry.id, None)  # deleted behind our back
            return
        try:
            await self._deliver_all(entry, msg)
            await self._conclude(entry, msg)
        except Exception as exc:  # an I/O failure or a bug must not stop the scheduler
            logs.failure("scheduler", exc, id=msg.id)
            entry.running = False
            self.schedule(entry, time.time() + ERROR_RETRY)

    async def _deliver_all(self, entry: Entry, msg: Message) -> None:
        """One transaction per recipient domain, all of that domain's recipients in it."""
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for rcpt in msg.pending():
            by_domain[rcpt.domain].append(rcpt)
        lock = asyncio.Lock()
        await asyncio.gather(
            *(
                self._transaction(entry, msg, domain, rcpts, lock)
                for domain, rcpts in by_domain.items()
            )
        )

    async def _transaction(
        self, entry: Entry, msg: Message, domain: str, rcpts: list[Recipient], lock: asyncio.Lock
    ) -> None:
        async with self.transactions:
            logs.event("attempt", id=msg.id, domain=domain, rcpts=[r.address for r in rcpts])
            started = time.time()
            results = await self._results(msg, domain, rcpts)
        async with lock:
            for rcpt, result in zip(rcpts, results, strict=True):
                self._apply(msg, rcpt, result, started)
            if entry.deleted:
                return
            # Persist each recipient's outcome as soon as it is known (DESIGN invariant 3).
            await asyncio.to_thread(self.spool.save, msg)
            failed = [r for r in rcpts if r.status == "failed"]
            if failed:
                await self._dead_letter(msg, failed, "permanent")

    async def _results(
        self, msg: Message, domain: str, rcpts: list[Recipient]
    ) -> list[RecipientResult]:
        addresses = [r.address for r in rcpts]
        try:
            route = await self.resolver.route(domain)
        except ResolveError as exc:
            return [RecipientResult(a, exc.reply, None, None, False) for a in addresses]
        return await self.courier.deliver(
            route,
            msg.sender,
            addresses,
            self.spool.content_path(msg.id),
            size=msg.size,
            smtputf8=msg.smtputf8,
        )

    def _apply(
        self, msg: Message, rcpt: Recipient, result: RecipientResult, started: float
    ) -> None:
        rcpt.status = STATUS_OF[classify(result.reply).verdict]
        rcpt.attempts += 1
        rcpt.first_attempt = rcpt.first_attempt or started
        rcpt.last_attempt = started
        rcpt.reply, rcpt.mx, rcpt.ip = result.reply, result.mx, result.ip
        fields = {
            "id": msg.id, "rcpt": rcpt.address, "mx": result.mx, "ip": result.ip,
            "tls": result.tls, "reply": result.reply,
        }  # fmt: skip
        if rcpt.status == "delivered":
            logs.event("delivered", delay=round(time.time() - msg.queued_at, 3), **fields)
        elif rcpt.status == "failed":
            logs.event("failed", **fields)

    async def _conclude(self, entry: Entry, msg: Message) -> None:
        """After every domain of this attempt: finish, expire, or schedule the next attempt."""
        if entry.deleted:
            await self._forget(entry)
            return
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
        for rcpt in pending:
            logs.event(
                "deferred", id=msg.id, rcpt=rcpt.address, reply=rcpt.reply, mx=rcpt.mx,
                attempts=rcpt.attempts, next_attempt=round(msg.next_attempt, 3),
            )  # fmt: skip
        entry.running = False
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
        logs.event("dead_lettered", id=msg.id, rcpts=[r.address for r in rcpts], reason=reason)

    async def _forget(self, entry: Entry) -> None:
        """Drop a finished or deleted message from the queue and the index."""
        await asyncio.to_thread(self.spool.remove, entry.id)
        self.index.pop(entry.id, None)
        if entry.deleted:
            logs.event("deleted", id=entry.id, after_attempt=True)

    # --- operator actions on the live queue (called by the control server) -------------------

    def targets(self, target: str) -> list[str]:
        return sorted(self.index) if target == "ALL" else [target]

    def flush(self, target: str) -> dict[str, list[str]]:
        done, missing = [], []
        for msg_id in self.targets(target):
            entry = self.index.get(msg_id)
            if entry is None:
                missing.append(msg_id)
                continue
            if not entry.running:
                self.schedule(entry, time.time())
            done.append(msg_id)
            logs.event("flushed", id=msg_id)
        return {"done": done, "missing": missing}

    async def delete(self, target: str) -> dict[str, list[str]]:
        """Delete now, or, for a message in flight, as soon as its current attempt ends."""
        done, busy, missing = [], [], []
        for msg_id in self.targets(target):
            entry = self.index.get(msg_id)
            if entry is not None and entry.running:
                entry.deleted = True
                busy.append(msg_id)
                continue
            if entry is None and not self.spool.state_path(msg_id).exists():
                missing.append(msg_id)
                continue
            self.index.pop(msg_id, None)
            await asyncio.to_thread(self.spool.remove, msg_id)
            logs.event("deleted", id=msg_id)
            done.append(msg_id)
        return {"done": done, "busy": busy, "missing": missing}

    async def requeue(self, msg_id: str) -> str:
        """Bring a dead-letter record back into the queue, due now: 'done', 'busy' or 'missing'."""
        entry = self.index.get(msg_id)
        if entry is not None and entry.running:
            return "busy"  # its live recipients are being delivered; requeue after this attempt
        try:
            msg = await asyncio.to_thread(self.spool.requeue, msg_id, time.time())
        except SpoolError:
            return "missing"
        entry = self.index.setdefault(msg_id, Entry(msg_id))
        self.schedule(entry, msg.next_attempt)
        logs.event("requeued", id=msg_id)
        return "done"
