"""Schedule, adoption: state files taken into the index from intake's wake-ups, the first scan
at start and the rescans that back up lost wake-ups, repairing what a stop left half done."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

from relay.observe import logs
from relay.schedule.dispatch import Dispatch
from relay.schedule.index import Index
from relay.spool.layout import QUEUE
from relay.spool.message import Message, is_id
from relay.spool.store import CorruptEntry, Spool, SpoolError

# State files loaded per worker-thread call while scanning: dispatch goes on between batches, so
# a restart over a large queue delivers new mail long before the whole queue is indexed.
SCAN_BATCH = 2000


class Scanner:
    """Adopts queued messages into the index: those intake announces, and any a scan finds."""

    def __init__(
        self, spool: Spool, dispatch: Dispatch, settle: Callable[[Message], Awaitable[None]]
    ) -> None:
        """settle: reports and dead-letters a message's failures (Outcomes.settle)."""
        self.spool = spool
        self.settle = settle
        self.dispatch = dispatch
        self.index: Index = dispatch.index
        self.incoming: list[str] = []
        self.indexed = False  # the first scan has adopted the whole queue

    def notice(self, msg_id: str) -> None:
        """A wake-up from intake: adopt msg_id on the next turn of the loop, with its peers."""
        if is_id(msg_id) and msg_id not in self.index:
            self.incoming.append(msg_id)
            self.index.wake.set()

    async def adopt_incoming(self) -> None:
        """Load every noticed id in one worker-thread call and index them."""
        ids, self.incoming = self.incoming, []
        loaded = await asyncio.to_thread(self._load_many, ids)
        for msg_id, msg in loaded:
            await self._adopt_loaded(msg_id, msg)

    async def scan(self) -> None:
        """Adopt every state file not yet indexed, in batches; the backstop for lost wake-ups."""
        indexed = set(self.index.entries)  # before listing: a wake-up's adoptions are not gone
        on_disk = await asyncio.to_thread(self.spool.ids, QUEUE)
        fresh = [i for i in on_disk if i not in self.index]
        for start in range(0, len(fresh), SCAN_BATCH):
            batch = fresh[start : start + SCAN_BATCH]
            for msg_id, msg in await asyncio.to_thread(self._load_many, batch):
                await self._adopt_loaded(msg_id, msg)
        for msg_id in indexed - set(on_disk):
            entry = self.index.get(msg_id)
            if entry is not None and not entry.running:
                self.dispatch.drop(msg_id)

    async def first_scan(self) -> None:
        """The scan at start, after which the index holds the whole queue."""
        started = time.monotonic()
        await self.scan()
        self.indexed = True
        seconds = round(time.monotonic() - started, 3)
        logs.event("indexed", messages=len(self.index), seconds=seconds)

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
        if msg.failed():  # repairs a stop between saving an outcome and reporting it
            await self.settle(msg)
        if not msg.pending():
            await asyncio.to_thread(self.spool.remove, msg_id)
            return
        self.index.add(msg)
