"""Table-driven tests of the qshape-like queue summary: buckets, domains, ordering, output."""

from __future__ import annotations

import pytest

from relay.ops.summary import BUCKETS_MINUTES, Row, Summary, render, summarize
from relay.spool.message import Message, Recipient

NOW = 1_700_000_000.0
MIN = 60.0
ZERO = (0,) * (len(BUCKETS_MINUTES) + 1)


def msg(age: float, *rcpts: str, final: tuple[str, ...] = ()) -> Message:
    """A message queued `age` seconds before NOW; addresses in `final` are already delivered."""
    recipients = [Recipient(a, status="delivered" if a in final else "deferred") for a in rcpts]
    return Message(
        id="0" * 20, sender="s@x", recipients=recipients, queued_at=NOW - age, next_attempt=NOW
    )


def at(index: int, count: int = 1) -> tuple[int, ...]:
    return tuple(count if i == index else 0 for i in range(len(ZERO)))


@pytest.mark.parametrize(
    ("age", "index"),
    [
        (0, 0),
        (-3600, 0),  # clock skew: counts as 0
        (5 * MIN, 0),  # exactly 5 minutes is still <= 5
        (5 * MIN + 1, 1),
        (10 * MIN, 1),
        (10 * MIN + 0.001, 2),
        (640 * MIN + 1, 8),
        (1280 * MIN, 8),
        (1280 * MIN + 1, 9),
        (30 * 24 * 60 * MIN, 9),
    ],
)
def test_age_buckets(age: float, index: int) -> None:
    summary = summarize([msg(age, "a@example.com")], NOW)
    assert summary.rows == (Row("TOTAL", 1, at(index)), Row("example.com", 1, at(index)))


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], [("TOTAL", 0)]),
        # one message, two domains: once under each, once in TOTAL; same domain twice: once
        ([msg(0, "a@b.org", "c@a.org", "d@A.ORG")], [("TOTAL", 1), ("a.org", 1), ("b.org", 1)]),
        # a domain whose recipients are all final is left out; so is a fully final message
        (
            [msg(0, "a@done.org", "b@wait.org", final=("a@done.org",))],
            [("TOTAL", 1), ("wait.org", 1)],
        ),
        ([msg(0, "a@done.org", final=("a@done.org",))], [("TOTAL", 0)]),
        # a domain with one final and one pending recipient still counts
        ([msg(0, "a@x.org", "b@x.org", final=("a@x.org",))], [("TOTAL", 1), ("x.org", 1)]),
        # total descending, then name
        (
            [msg(0, "a@c.org"), msg(0, "a@b.org"), msg(0, "b@b.org"), msg(0, "a@a.org")],
            [("TOTAL", 4), ("b.org", 2), ("a.org", 1), ("c.org", 1)],
        ),
    ],
)
def test_rows(messages: list[Message], expected: list[tuple[str, int]]) -> None:
    assert [(r.domain, r.total) for r in summarize(messages, NOW).rows] == expected


@pytest.mark.parametrize(
    ("top", "domains"),
    [
        (None, ["b.org", "a.org", "c.org"]),
        (2, ["b.org", "a.org"]),  # the tie a.org/c.org is broken by name
        (1, ["b.org"]),
        (0, []),
    ],
)
def test_top_keeps_total(top: int | None, domains: list[str]) -> None:
    messages = [msg(0, "a@c.org"), msg(0, "a@b.org", "a@a.org"), msg(0, "b@b.org")]
    rows = summarize(messages, NOW, top=top).rows
    assert rows[0] == Row("TOTAL", 3, at(0, 3))
    assert [r.domain for r in rows[1:]] == domains


def test_negative_top_is_refused() -> None:
    with pytest.raises(ValueError, match="top"):
        summarize([], NOW, top=-1)


def test_rows_spread_over_buckets() -> None:
    messages = [msg(0, "a@x.org"), msg(7 * MIN, "a@x.org", "a@y.org"), msg(2000 * MIN, "a@y.org")]
    assert summarize(messages, NOW).rows == (
        Row("TOTAL", 3, (1, 1, 0, 0, 0, 0, 0, 0, 0, 1)),
        Row("x.org", 2, (1, 1, 0, 0, 0, 0, 0, 0, 0, 0)),
        Row("y.org", 2, (0, 1, 0, 0, 0, 0, 0, 0, 0, 1)),
    )


def test_as_json() -> None:
    data = summarize([msg(2000 * MIN, "a@x.org")], NOW).as_json()
    labels = ["5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    buckets = dict.fromkeys(labels, 0) | {"1280+": 1}
    assert data == {
        "buckets_minutes": [5, 10, 20, 40, 80, 160, 320, 640, 1280],
        "rows": [
            {"domain": "TOTAL", "total": 1, "buckets": buckets},
            {"domain": "x.org", "total": 1, "buckets": buckets},
        ],
    }
    assert list(data["rows"][0]["buckets"]) == labels


def test_render_empty() -> None:
    assert render(summarize([], NOW)).splitlines() == [
        "                         T     5    10    20    40    80   160   320   640  1280 1280+",
        "               TOTAL     0     0     0     0     0     0     0     0     0     0     0",
    ]


def test_render_rows() -> None:
    long = "mail.a-rather-long-domain.example"
    messages = [msg(0, f"a@{long}"), msg(0, "a@x.org"), msg(21 * MIN, "b@x.org")]
    assert render(summarize(messages, NOW)).splitlines() == [
        "                                      T     5    10    20    40    80   160   320   640  1280 1280+",
        "                            TOTAL     3     2     0     0     1     0     0     0     0     0     0",
        "                            x.org     2     1     0     0     1     0     0     0     0     0     0",
        "mail.a-rather-long-domain.example     1     1     0     0     0     0     0     0     0     0     0",
    ]


def test_render_widens_cells_for_large_counts() -> None:
    summary = Summary((Row("TOTAL", 123456, at(0, 123456)),))
    header, total = render(summary).splitlines()
    assert total.startswith("               TOTAL 123456 123456      0")
    assert len(header) == len(total)
