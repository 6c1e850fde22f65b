"""Group commit: concurrent submissions share flushes, and each caller gets its own result."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from relay.spool.groupcommit import GroupCommit


class Flusher:
    """Records each batch; fails the items named "bad", or the whole batch when asked to."""

    def __init__(self, fail_all: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.fail_all = fail_all
        self.release = threading.Event()

    def __call__(self, items: Sequence[str]) -> list[BaseException | None]:
        self.release.wait(5)
        self.batches.append(list(items))
        if self.fail_all:
            raise OSError(28, "No space left on device")
        return [OSError(5, f"cannot write {i}") if i == "bad" else None for i in items]


async def submit_all(commit: GroupCommit[str], items: list[str]) -> list[BaseException | None]:
    async def one(item: str) -> BaseException | None:
        try:
            await commit.submit(item)
        except OSError as exc:
            return exc
        return None

    return await asyncio.gather(*(one(i) for i in items))


def test_a_lone_item_is_flushed_at_once() -> None:
    flusher = Flusher()
    flusher.release.set()
    assert asyncio.run(submit_all(GroupCommit(flusher), ["a"])) == [None]
    assert flusher.batches == [["a"]]


def test_items_arriving_during_a_flush_share_the_next_one() -> None:
    flusher = Flusher()

    async def scenario() -> list[BaseException | None]:
        commit: GroupCommit[str] = GroupCommit(flusher)
        first = asyncio.ensure_future(submit_all(commit, ["first"]))
        await asyncio.sleep(0.05)  # "first" is being flushed (blocked) now
        rest = asyncio.ensure_future(submit_all(commit, [f"m{n}" for n in range(20)]))
        await asyncio.sleep(0.05)
        flusher.release.set()
        return [*(await first), *(await rest)]

    assert asyncio.run(scenario()) == [None] * 21
    assert flusher.batches == [["first"], [f"m{n}" for n in range(20)]]


def test_each_caller_gets_its_own_failure() -> None:
    flusher = Flusher()
    flusher.release.set()
    results = asyncio.run(submit_all(GroupCommit(flusher), ["a", "bad", "c"]))
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], OSError) and "cannot write bad" in str(results[1])


@pytest.mark.parametrize("count", [1, 7])
def test_a_failed_flush_fails_every_item_of_its_batch(count: int) -> None:
    flusher = Flusher(fail_all=True)
    flusher.release.set()
    results = asyncio.run(submit_all(GroupCommit(flusher), [f"m{n}" for n in range(count)]))
    assert all(isinstance(r, OSError) and r.errno == 28 for r in results)
