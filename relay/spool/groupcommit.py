"""Spool, group commit: durable writes that many coroutines ask for at once are done as
one batch in a worker thread (one flush for all of them), each caller waiting for its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
# One batch's work: a result per item, None for done or the exception that item failed with.
BatchFn = Callable[[Sequence[T]], list[BaseException | None]]
MAX_BATCH = 256


class GroupCommit(Generic[T]):
    """submit() queues an item and waits for the batch that carries it; while one batch is
    being flushed, new items gather for the next, so a lone item waits for nothing and a
    busy moment shares each flush among everyone waiting."""

    def __init__(self, flush: BatchFn[T]) -> None:
        self._flush = flush
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        """Return once item is durable; raise what its part of the batch failed with."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                results = await asyncio.to_thread(self._flush, [item for item, _ in batch])
            except BaseException as exc:  # the whole batch failed (or we are cancelled)
                results = [exc] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    _settle(batch, results)
                    raise
            _settle(batch, results)


def _settle(
    batch: list[tuple[T, asyncio.Future[None]]], results: list[BaseException | None]
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if result is None:
            future.set_result(None)
        else:
            future.set_exception(result)
