"""The block-wise DATA reader: the same content, limits and replies as a line-by-line one, and
nothing after the end of the data consumed (a pipelined next command stays for the session)."""

from __future__ import annotations

import asyncio

import pytest

from relay.intake import has_bare_line_end
from relay.session import REPLY_DATA_LINE_TOO_LONG, REPLY_DATA_TOO_BIG, read_data

LONG = b"x" * 998  # with its CRLF, exactly the 1000 octets RFC 5321 allows


def run(stream: bytes, size_limit: int | None = 10_000) -> tuple[bytes, str | None, bytes]:
    async def go() -> tuple[bytes, str | None, bytes]:
        reader = asyncio.StreamReader(limit=1000)
        reader.feed_data(stream)
        reader.feed_eof()
        content, problem = await read_data(reader, size_limit, 1000)
        return content, problem, await reader.read()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("stream", "content"),
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"Subject: x\r\n\r\nEnd.\r\nMore.\r\n.\r\n", b"Subject: x\r\n\r\nEnd.\r\nMore.\r\n"),
        (b"..dot\r\n.\r\n", b".dot\r\n"),
        (b"a\r\n..\r\n...\r\n.\r\n", b"a\r\n.\r\n..\r\n"),
        (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n"),
        (LONG + b"\r\n.\r\n", LONG + b"\r\n"),
        ((b"y" * 76 + b".\r\n") * 300 + b".\r\n", (b"y" * 76 + b".\r\n") * 300),
    ],
)
def test_content_is_unstuffed_and_ends_at_the_dot_line(stream: bytes, content: bytes) -> None:
    got, problem, rest = run(stream + b"QUIT\r\n", size_limit=None)
    assert (got, problem, rest) == (content, None, b"QUIT\r\n")


@pytest.mark.parametrize(
    ("stream", "limit", "problem"),
    [
        (LONG + b"x\r\n.\r\n", 10_000, REPLY_DATA_LINE_TOO_LONG),
        (b"a" * 5000 + b"\r\n.\r\n", 10_000, REPLY_DATA_LINE_TOO_LONG),
        ((b"z" * 98 + b"\r\n") * 101 + b".\r\n", 10_000, REPLY_DATA_TOO_BIG),
        ((b"z" * 98 + b"\r\n") * 100 + b".\r\n", 10_000, None),
    ],
)
def test_limits_are_answered_after_the_whole_data(
    stream: bytes, limit: int, problem: str | None
) -> None:
    got, found, rest = run(stream + b"NOOP\r\n", limit)
    assert found == problem and rest == b"NOOP\r\n"
    if problem is not None:
        assert got == b""


@pytest.mark.parametrize(
    ("content", "bare"),
    [
        (b"", False),
        (b"a\r\nb\r\n", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"a\r\n\n", True),
        (b"a\n\r", True),
        (b"\r\n" * 1000, False),
    ],
)
def test_bare_line_ends_are_found(content: bytes, bare: bool) -> None:
    assert has_bare_line_end(content) is bare
