"""X-Relay-* directives: parsed, validated and removed from the message (table-driven)."""

from __future__ import annotations

import pytest

from relay.directives import DirectiveError, extract, parse_time


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2026-11-22T09:00:00Z", 1795338000.0),
        ("2026-11-22T09:00:00z", 1795338000.0),
        ("2026-11-22T10:00:00+01:00", 1795338000.0),
        ("2026-11-22T09:00:00.5Z", 1795338000.5),
        ("1795338000", 1795338000.0),
        ("1795338000.25", 1795338000.25),
    ],
)
def test_times(text: str, epoch: float) -> None:
    assert parse_time(text) == epoch


@pytest.mark.parametrize(
    "text", ["tomorrow", "", "2026-11-22T09:00:00", "2026-13-01T00:00:00Z", "-5", "1e10", "now"]
)
def test_nonsense_is_a_5xx_naming_the_value(text: str) -> None:
    with pytest.raises(DirectiveError) as info:
        parse_time(text)
    assert str(info.value).startswith("550 5.6.0 X-Relay-Send-At: ")


@pytest.mark.parametrize(
    ("message", "kept", "send_at"),
    [
        (b"Subject: a\r\n\r\nbody\r\n", b"Subject: a\r\n\r\nbody\r\n", None),
        (
            b"Subject: a\r\nX-Relay-Send-At: 1795338000\r\nTo: b\r\n\r\nbody\r\n",
            b"Subject: a\r\nTo: b\r\n\r\nbody\r\n",
            1795338000.0,
        ),
        (  # folded, other case, and a look-alike in the body that stays
            b"x-relay-send-at:\r\n 2026-11-22T09:00:00Z\r\nSubject: a\r\n\r\nX-Relay-Send-At: 5\r\n",
            b"Subject: a\r\n\r\nX-Relay-Send-At: 5\r\n",
            1795338000.0,
        ),
        (b"X-Relay-Send-At-Not: 1\r\n\r\n", b"X-Relay-Send-At-Not: 1\r\n\r\n", None),
    ],
)
def test_extract_removes_only_the_directive(
    message: bytes, kept: bytes, send_at: float | None
) -> None:
    content, asked = extract(message)
    assert (content, asked.send_at) == (kept, send_at)


def test_two_send_times_are_refused() -> None:
    with pytest.raises(DirectiveError, match="More than one X-Relay-Send-At"):
        extract(b"X-Relay-Send-At: 1\r\nX-Relay-Send-At: 2\r\n\r\n")
