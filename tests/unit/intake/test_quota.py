"""Sending quotas: the earliest window slot with room (table-driven) and the shared ledger file."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from relay.intake.quota import (
    Counts,
    Decision,
    Ledger,
    Quotas,
    decide,
    refusal,
    slot,
    start_of,
    window_text,
)

T0 = 4102444800.0  # 2100-01-01T00:00:00Z: a day, hour and 10 s boundary (never pruned)
H, D = 3600.0, 86400.0
USER = {"user:alice": [(H, 2)]}
DOMAIN = {"domain:a.test": [(10.0, 1)]}
BOTH = {**USER, **DOMAIN}
HD = {"user:alice": [(H, 2), (D, 5)]}


def full(*buckets: tuple[str, float, float, int]) -> Counts:
    """Counts from (key, window, start, count) rows."""
    return {(key, seconds, start): n for key, seconds, start, n in buckets}


A, U = "user:alice", "domain:a.test"
SLOTS = [  # (id, quotas, counts, t, expected slot)
    ("empty-ledger-now", USER, {}, T0 + 5, T0 + 5),
    ("room-left", USER, full((A, H, T0, 1)), T0 + 5, T0 + 5),
    ("next-hour", USER, full((A, H, T0, 2)), T0 + 5, T0 + H),
    ("hour-after-next", USER, full((A, H, T0, 2), (A, H, T0 + H, 2)), T0 + 5, T0 + 2 * H),
    ("last-instant", USER, full((A, H, T0, 2)), T0 + H - 0.001, T0 + H),
    ("at-the-boundary", USER, full((A, H, T0, 2)), T0 + H, T0 + H),
    ("previous-window-full", USER, full((A, H, T0 - H, 2)), T0, T0),
    ("daily-room-hourly-not", HD, full((A, H, T0, 2), (A, D, T0, 4)), T0 + 60, T0 + H),
    ("daily-full-next-day", HD, full((A, H, T0, 1), (A, D, T0, 5)), T0 + 60, T0 + D),
    ("daily-room-next-hour", HD, full((A, D, T0, 4), (A, H, T0 + 7 * H, 2)),
     T0 + 7 * H + 1, T0 + 8 * H),
    ("10s", DOMAIN, full((U, 10.0, T0, 1)), T0 + 3, T0 + 10),
    ("1s-windows", {U: [(1.0, 1)]}, full(*((U, 1.0, T0 + s, 1) for s in range(3))),
     T0 + 0.5, T0 + 3),
    ("user-full-domain-free", BOTH, full((A, H, T0, 2)), T0 + 3, T0 + H),
    ("domain-full-user-free", BOTH, full((U, 10.0, T0, 1)), T0 + 3, T0 + 10),
    ("user-then-domain", BOTH, full((U, 10.0, T0 + H, 1), (A, H, T0, 2)),
     T0 + 3, T0 + H + 10),
    ("other-keys-do-not-count", BOTH, full(("user:bob", H, T0, 9)), T0 + 3, T0 + 3),
]  # fmt: skip


@pytest.mark.parametrize(
    ("quotas", "counts", "t", "expected"), [pytest.param(*row[1:], id=row[0]) for row in SLOTS]
)
def test_slot(quotas: Quotas, counts: Counts, t: float, expected: float) -> None:
    assert slot(quotas, counts, t) == expected


def test_slot_search_is_bounded() -> None:
    counts = {("domain:a.test", 10.0, T0 + 10 * n): 1 for n in range(5)}
    assert slot(DOMAIN, counts, T0, max_steps=5) == T0 + 50
    assert slot(DOMAIN, counts, T0, max_steps=4) is None


@pytest.mark.parametrize(
    ("hold", "counts", "expected"),
    [
        (True, {}, Decision(T0 + 3, True)),
        (False, {}, Decision(T0 + 3, True)),
        (True, full((A, H, T0, 2)), Decision(T0 + H, True, ("user:alice", H, 2))),
        (False, full((A, H, T0, 2)), Decision(T0 + H, False, ("user:alice", H, 2))),
        (  # held beyond the search bound: refused like the refuse action
            True,
            {("user:alice", H, T0 + n * H): 2 for n in range(10_001)},
            Decision(T0 + H, False, ("user:alice", H, 2)),
        ),
    ],
)
def test_decide(hold: bool, counts: Counts, expected: Decision) -> None:
    assert decide(USER, counts, T0 + 3, hold=hold) == expected


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(3600.0, "hour"), (86400.0, "day"), (10.0, "10s"), (300.0, "5m"), (7200.0, "2h"),
     (172800.0, "2d"), (1.5, "1.5s")],
)  # fmt: skip
def test_window_text(seconds: float, text: str) -> None:
    assert window_text(seconds) == text


def test_refusal_names_the_quota_and_the_time() -> None:
    reply = refusal(Decision(T0 + 10, False, ("domain:a.test", 10.0, 2)))
    assert reply == (
        "452 4.7.1 Sending quota exceeded for domain:a.test: 2 messages per 10s; "
        "try again after 2100-01-01T00:00:10Z"
    )


def test_start_of_aligns_to_utc_epoch_multiples() -> None:
    assert start_of(T0 + 5 * H + 7, D) == T0
    assert start_of(T0 + 5 * H + 7, H) == T0 + 5 * H
    assert start_of(T0 + 17, 10.0) == T0 + 10


# --- the ledger file -------------------------------------------------------------------------


def test_five_messages_at_two_per_hour(tmp_path: Path) -> None:
    """2 go now, 2 wait for the next hour, 1 for the hour after; each counted once."""
    ledger = Ledger(tmp_path / "quota.json")
    got = [ledger.reserve(USER, T0 + 100, hold=True).at for _ in range(5)]
    assert got == [T0 + 100, T0 + 100, T0 + H, T0 + H, T0 + 2 * H]
    assert ledger.counts() == {
        ("user:alice", H, T0): 2,
        ("user:alice", H, T0 + H): 2,
        ("user:alice", H, T0 + 2 * H): 1,
    }


def test_two_ledgers_share_the_counts(tmp_path: Path) -> None:
    """Two Ledger objects on one file are two intake processes."""
    first, second = Ledger(tmp_path / "quota.json"), Ledger(tmp_path / "quota.json")
    assert first.reserve(BOTH, T0 + 1, hold=True) == Decision(T0 + 1, True)
    assert second.reserve(BOTH, T0 + 2, hold=False).counted is False  # domain 1/10s is full
    assert second.reserve(BOTH, T0 + 2, hold=True).at == T0 + 10
    assert (
        first.counts()
        == second.counts()
        == {
            ("user:alice", H, T0): 2,
            ("domain:a.test", 10.0, T0): 1,
            ("domain:a.test", 10.0, T0 + 10): 1,
        }
    )


def _reserve_many(path: Path, count: int) -> None:
    ledger = Ledger(path)
    for _ in range(count):
        ledger.reserve({"domain:a.test": [(D, 1000)]}, T0, hold=True)


def test_concurrent_processes_lose_no_count(tmp_path: Path) -> None:
    path = tmp_path / "quota.json"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_reserve_many, args=(path, 25)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert Ledger(path).counts() == {("domain:a.test", D, T0): 75}


def test_release_takes_a_count_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "quota.json")
    place = ledger.reserve(BOTH, T0 + 1, hold=True)
    ledger.reserve(USER, T0 + 1, hold=True)
    ledger.release(BOTH, place.at)
    assert ledger.counts() == {("user:alice", H, T0): 1}


def test_ended_windows_are_pruned(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "quota.json")
    ledger.reserve(DOMAIN, time.time() - 60, hold=True)  # its 10 s window ended a minute ago
    ledger.reserve(USER, T0, hold=True)
    assert ledger.counts() == {("user:alice", H, T0): 1}


def test_unreadable_ledger_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "quota.json"
    path.write_text('{"version": 1, "cou')  # cut short (no fsync: a power loss)
    assert Ledger(path).reserve(USER, T0, hold=True) == Decision(T0, True)
    assert Ledger(path).counts() == {("user:alice", H, T0): 1}


def test_ledger_io_failure_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Ledger(tmp_path / "missing" / "quota.json").reserve(USER, T0, hold=True)
