"""X-Relay-* directives: parsed, validated and removed from the message (table-driven)."""

from __future__ import annotations

import pytest

from relay.intake.directives import DirectiveError, extract, parse_time


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


@pytest.mark.parametrize(
    ("message", "kept", "priority"),
    [
        (b"X-Relay-Priority: high\r\nSubject: a\r\n\r\nb\r\n", b"Subject: a\r\n\r\nb\r\n",
         "high"),
        (b"Subject: a\r\nx-relay-priority:  LOW \r\n\r\nb\r\n", b"Subject: a\r\n\r\nb\r\n", "low"),
        (b"X-Relay-Priority:\r\n\tNormal\r\n\r\nb\r\n", b"\r\nb\r\n", "normal"),
        (b"Subject: a\r\n\r\nX-Relay-Priority: high\r\n",  # in the body: stays
         b"Subject: a\r\n\r\nX-Relay-Priority: high\r\n", None),
    ],
)  # fmt: skip
def test_priority_is_read_and_removed(message: bytes, kept: bytes, priority: str | None) -> None:
    content, asked = extract(message)
    assert (content, asked.priority, asked.send_at) == (kept, priority, None)


def test_priority_and_send_time_together() -> None:
    content, asked = extract(
        b"X-Relay-Send-At: 1795338000\r\nX-Relay-Priority: low\r\nTo: b\r\n\r\nhi\r\n"
    )
    assert (content, asked.send_at, asked.priority) == (b"To: b\r\n\r\nhi\r\n", 1795338000.0, "low")


@pytest.mark.parametrize(
    ("message", "reply"),
    [
        (
            b"X-Relay-Priority: urgent\r\n\r\n",
            "550 5.6.0 X-Relay-Priority: 'urgent' is not a priority (use high, normal, low)",
        ),
        (
            b"X-Relay-Priority:\r\n\r\n",
            "550 5.6.0 X-Relay-Priority: '' is not a priority (use high, normal, low)",
        ),
        (
            b"X-Relay-Priority: high\r\nX-Relay-Priority: low\r\n\r\n",
            "550 5.6.0 More than one X-Relay-Priority header field",
        ),
    ],
)
def test_bad_priority_is_a_5xx_naming_the_header(message: bytes, reply: str) -> None:
    with pytest.raises(DirectiveError) as info:
        extract(message)
    assert str(info.value) == reply


@pytest.mark.parametrize(
    "message",
    [
        b"X-Relay-Priority: high\r\nSubject: a\r\n\r\nb\r\n",
        b"X-Relay-Priority: urgent\r\nSubject: a\r\n\r\nb\r\n",
        b"X-Relay-Priority: high\r\nX-Relay-Priority: low\r\nSubject: a\r\n\r\nb\r\n",
    ],
)
def test_priority_off_is_removed_and_ignored(message: bytes) -> None:
    content, asked = extract(message, priority=False)
    assert (content, asked.priority) == (b"Subject: a\r\n\r\nb\r\n", None)


@pytest.mark.parametrize(
    ("message", "kept", "batch_id"),
    [
        (b"X-Relay-Batch-Id: spring-sale_2026.v2\r\nSubject: a\r\n\r\nb\r\n",
         b"Subject: a\r\n\r\nb\r\n", "spring-sale_2026.v2"),
        (b"Subject: a\r\nx-relay-batch-id:\r\n\t" + b"B" * 64 + b"\r\n\r\nb\r\n",
         b"Subject: a\r\n\r\nb\r\n", "B" * 64),
        (b"Subject: a\r\n\r\nX-Relay-Batch-Id: in-the-body\r\n",
         b"Subject: a\r\n\r\nX-Relay-Batch-Id: in-the-body\r\n", None),
    ],
)  # fmt: skip
def test_batch_id_is_read_and_removed(message: bytes, kept: bytes, batch_id: str | None) -> None:
    content, asked = extract(message)
    assert (content, asked.batch_id) == (kept, batch_id)


@pytest.mark.parametrize(
    ("field", "reply"),
    [
        (b"X-Relay-Batch-Id: a b", "550 5.6.0 X-Relay-Batch-Id: 'a b' is not a batch id"),
        (b"X-Relay-Batch-Id: " + b"x" * 65, "550 5.6.0 X-Relay-Batch-Id: 'xxxx"),
        (b"X-Relay-Batch-Id:", "550 5.6.0 X-Relay-Batch-Id: '' is not a batch id"),
        ("X-Relay-Batch-Id: caf\u00e9".encode(), "550 5.6.0 X-Relay-Batch-Id: 'caf\u00e9'"),
        (b"X-Relay-Batch-Id: a\r\nX-Relay-Batch-Id: a",
         "550 5.6.0 More than one X-Relay-Batch-Id header field"),
    ],
)  # fmt: skip
def test_a_bad_batch_id_is_a_5xx_naming_the_field(field: bytes, reply: str) -> None:
    with pytest.raises(DirectiveError) as info:
        extract(field + b"\r\nSubject: a\r\n\r\nb\r\n")
    assert str(info.value).startswith(reply)
