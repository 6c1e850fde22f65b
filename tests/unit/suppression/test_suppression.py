"""Suppression lists in-process: patterns, the on_hold count, the store's lookups and its
automatic entries fed from a real journal on disk (a crash repeats nothing)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config.suppression import SuppressionConfig
from relay.spool import cursor
from relay.spool.journal import Journal
from relay.suppression.check import Check
from relay.suppression.feed import Count, Feed, counted
from relay.suppression.patterns import Patterns, matches
from relay.suppression.store import Entry, Suppressions, path_of

HOUR, DAY = 3600.0, 86400.0


@pytest.mark.parametrize(
    ("pattern", "address", "expected"),
    [
        ("*@example.com", "bob@example.com", True),
        ("*@example.com", "BOB@Example.COM", True),
        ("*@example.com", "bob@example.com.evil", False),
        ("*@example.com", "bob@sub.example.com", False),
        ("*@*.example.com", "bob@sub.example.com", True),
        ("user+*@example.org", "user+news@example.org", True),
        ("user+*@example.org", "user+@example.org", True),
        ("user+*@example.org", "user@example.org", False),
        ("user+*@example.org", "xuser+a@example.org", False),
        ("a.b@example.org", "axb@example.org", False),  # `.` is literal, not a wildcard
        ("*", "anyone@anywhere", True),
    ],
)
def test_pattern_matching(pattern: str, address: str, expected: bool) -> None:
    assert matches(pattern, address) is expected
    assert bool(Patterns.of([(pattern, 1)]).find(address)) is expected


CFG = SuppressionConfig(on_hold=3, on_hold_window=30 * DAY, on_hold_spacing=HOUR)


@pytest.mark.parametrize(
    ("prior", "at", "expected", "hold"),
    [
        (None, 100.0, Count(1, 100.0, 100.0), False),  # the first
        (Count(1, 0.0, 0.0), HOUR - 1, Count(1, 0.0, 0.0), False),  # too soon: not counted
        (Count(1, 0.0, 0.0), HOUR, Count(2, 0.0, HOUR), False),  # an hour later: counted
        (Count(2, 0.0, HOUR), 2 * HOUR, None, True),  # the third: on hold, count starts again
        (Count(2, 0.0, HOUR), 31 * DAY, Count(1, 31 * DAY, 31 * DAY), False),  # window passed
    ],
)
def test_on_hold_counting(prior: Count | None, at: float, expected: Count, hold: bool) -> None:
    assert counted(prior, at, CFG) == (expected, hold)


def test_on_hold_zero_counts_nothing() -> None:
    assert counted(None, 0.0, replace(CFG, on_hold=0)) == (None, False)


def store(tmp_path: Path) -> Suppressions:
    return Suppressions(tmp_path / "history" / "suppressions.sqlite", durable=True)


def test_exact_and_pattern_lookups_by_tenant_with_expiry(tmp_path: Path) -> None:
    lists = store(tmp_path)
    now = time.time()
    lists.add(Entry("acme", "Bob@Example.com", "manual", "asked", now))
    lists.add(Entry("acme", "*@spam.test", "blocklist", "", now))
    lists.add(Entry("acme", "old@example.com", "hard_bounce", "550", now - 10, now - 1))
    reader = Suppressions(lists.path, reader=True)
    found = reader.find("acme", "bob@EXAMPLE.com", now)
    assert found is not None and found.kind == "manual"
    assert reader.find("other", "bob@example.com", now) is None  # another tenant's list
    assert reader.find("acme", "x@spam.test", now) is not None
    assert reader.find("acme", "old@example.com", now) is None  # expired
    assert lists.delete("acme", "*@SPAM.test")
    assert reader.find("acme", "x@spam.test", now) is None  # the reader saw the change
    page, _ = lists.entries("acme", now, address="bob@example.com")
    assert [e.address for e in page] == ["bob@example.com"]


def test_a_manual_entry_is_not_replaced_by_an_automatic_one(tmp_path: Path) -> None:
    journal, feed = _feed(tmp_path)
    lists = Suppressions(feed_path(tmp_path), durable=True)
    lists.add(Entry("default", "kept@example.com", "unsubscribe", "form", time.time()))
    journal.append([bounced("kept@example.com", "5.1.1"), bounced("gone@example.com", "5.1.1")])
    cursor.catch_up(feed, journal.directory, feed.take)
    kept = lists.find("default", "kept@example.com", time.time())
    gone = lists.find("default", "gone@example.com", time.time())
    assert kept is not None and kept.kind == "unsubscribe"
    assert gone is not None and gone.kind == "hard_bounce"
    assert gone.expires is not None and gone.expires - gone.created == pytest.approx(30 * DAY)


def feed_path(tmp_path: Path) -> Path:
    return path_of(tmp_path / "history" / "history.sqlite")


def _feed(tmp_path: Path, cfg: SuppressionConfig = CFG) -> tuple[Journal, Feed]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    journal = Journal(tmp_path / "events", "scheduler", tmp_path / "tmp")
    return journal, Feed(feed_path(tmp_path), lambda: cfg)


def bounced(rcpt: str, enhanced: str, tenant: str = "default") -> dict[str, Any]:
    return {"event": "bounced", "id": "1", "tenant": tenant, "rcpt": rcpt, "code": 550,
            "enhanced": enhanced, "reply": f"550 {enhanced} no"}  # fmt: skip


def test_policy_bounces_do_not_suppress(tmp_path: Path) -> None:
    journal, feed = _feed(tmp_path)
    journal.append([bounced("p@example.com", "5.7.1"), bounced("d@nowhere.test", "5.1.2")])
    cursor.catch_up(feed, journal.directory, feed.take)
    check = Check(feed_path(tmp_path))
    assert check.find(CFG, "default", "p@example.com") is None
    entry = check.find(CFG, "default", "d@nowhere.test")
    assert entry is not None and entry.kind == "hard_bounce"


def test_soft_bounces_counted_once_across_a_crash(tmp_path: Path) -> None:
    """Three deferrals an hour apart put the address on hold; reading the journal again from
    a fresh reader (what a restart does) neither loses nor counts one twice."""
    journal, feed = _feed(tmp_path)
    start = time.time() - 5 * HOUR
    stamps = [start, start + 10, start + HOUR, start + 2 * HOUR]  # the second is too soon
    for at in stamps[:2]:
        journal.append([deferred("soft@example.com", at)])
    cursor.catch_up(feed, journal.directory, feed.take)
    feed.close()  # "crash": a new reader picks up from the stored offsets
    _, feed = _feed(tmp_path)
    cursor.catch_up(feed, journal.directory, feed.take)
    check = Check(feed_path(tmp_path))
    assert check.find(CFG, "default", "soft@example.com") is None
    journal.append([deferred("soft@example.com", stamps[2])])
    cursor.catch_up(feed, journal.directory, feed.take)
    assert check.find(CFG, "default", "soft@example.com") is None  # two counted
    journal.append([deferred("soft@example.com", stamps[3])])
    cursor.catch_up(feed, journal.directory, feed.take)
    entry = check.find(CFG, "default", "soft@example.com")
    assert entry is not None and entry.kind == "on_hold"
    assert entry.expires == pytest.approx(stamps[3] + 72 * HOUR, abs=1e-3)


def test_a_delivery_clears_the_count(tmp_path: Path) -> None:
    journal, feed = _feed(tmp_path)
    start = time.time() - 5 * HOUR
    journal.append([deferred("x@example.com", start), deferred("x@example.com", start + HOUR)])
    journal.append([{**deferred("x@example.com", start + HOUR), "event": "delivered"}])
    journal.append([deferred("x@example.com", start + 2 * HOUR)])
    cursor.catch_up(feed, journal.directory, feed.take)
    assert Check(feed_path(tmp_path)).find(CFG, "default", "x@example.com") is None


def deferred(rcpt: str, at: float) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"
    return {"event": "deferred", "id": "2", "tenant": "default", "rcpt": rcpt, "code": 451,
            "enhanced": "4.2.1", "reply": "451 4.2.1 later", "timestamp": stamp}  # fmt: skip
