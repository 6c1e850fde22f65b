"""The streaming DATA reader: the same content, limits and replies as a line-by-line one,
nothing after the end of the data consumed (a pipelined next command stays for the session),
the header block in memory and a large body in a nameless spill file."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake.data import (
    HEAD_LIMIT,
    MEMORY_LIMIT,
    REPLY_DATA_LINE_TOO_LONG,
    REPLY_DATA_TOO_BIG,
    Draft,
    pieces,
    read_data,
)
from relay.spool.spill import Spill

LONG = b"x" * 998  # with its CRLF, exactly the 1000 octets RFC 5321 allows


def read(
    stream: bytes, size_limit: int | None, spool_tmp: Path, limit: int = 1000
) -> tuple[Draft, str | None, bytes]:
    """Feed stream to read_data through a real StreamReader (limit: its buffer limit, which
    decides where reads are cut); the draft, the refusal, and what is left unread."""

    async def go() -> tuple[Draft, str | None, bytes]:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(stream)
        reader.feed_eof()
        draft = Draft(lambda: Spill(spool_tmp))
        problem = await read_data(reader, draft, size_limit, 1000)
        return draft, problem, await reader.read()

    return asyncio.run(go())


def content_of(draft: Draft) -> bytes:
    return draft.head + b"".join(pieces(draft.parts))


def run(
    stream: bytes, size_limit: int | None = 10_000, *, tmp: Path
) -> tuple[bytes, str | None, bytes]:
    draft, problem, rest = read(stream, size_limit, tmp)
    try:
        return (b"" if problem else content_of(draft)), problem, rest
    finally:
        draft.discard()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


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
def test_content_is_unstuffed_and_ends_at_the_dot_line(
    stream: bytes, content: bytes, tmp: Path
) -> None:
    got, problem, rest = run(stream + b"QUIT\r\n", size_limit=None, tmp=tmp)
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
    stream: bytes, limit: int, problem: str | None, tmp: Path
) -> None:
    got, found, rest = run(stream + b"NOOP\r\n", limit, tmp=tmp)
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
        (b"a\r\n\nb\r\n", True),
        (b"a\n\r\n", True),
        (b"\r\n" * 1000, False),
        (b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r" + b"\r\n", True),  # across reads
    ],
)
def test_bare_line_ends_and_nul_are_found_on_the_stream(
    content: bytes, bare: bool, tmp: Path
) -> None:
    for limit in (4, 1000):
        draft, problem, _ = read(stuff(content) + b".\r\n", None, tmp, limit)
        assert (draft.bare_line_end, draft.nul, problem) == (bare, False, None)
    draft, _, _ = read(b"a\0b\r\n.\r\n", None, tmp)
    assert draft.nul


def stuff(content: bytes) -> bytes:
    """What a client sends for content (RFC 5321 §4.5.2)."""
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spool's tmp/ for a property test: hypothesis runs all its examples in one call of the
    test, with one value of each fixture, so a function-scoped tmp_path is refused."""
    return tmp_path_factory.mktemp("spill")


WORDS = st.sampled_from([b"a", b".", b"..", b"x" * 300, b" ", b"\r"])
LINES = st.lists(st.lists(WORDS, max_size=3).map(b"".join), max_size=40).map(b"\r\n".join)


@settings(max_examples=200, deadline=None)
@given(body=LINES, limit=st.sampled_from([4, 7, 64, 1000, 65536]))
def test_any_content_comes_back_whole_however_the_reads_fall(
    shared_tmp: Path, body: bytes, limit: int
) -> None:
    """Content cut into reads anywhere (the reader's limit decides where) is unstuffed and
    ends exactly as the whole would be."""
    content = body + b"\r\n" if body else body
    draft, problem, rest = read(stuff(content) + b".\r\nQUIT\r\n", None, shared_tmp, limit)
    assert (content_of(draft), problem, rest) == (content, None, b"QUIT\r\n")
    draft.discard()


def test_a_large_body_is_spilled_and_the_head_kept(tmp: Path) -> None:
    head = b"From: a@b.test\r\nSubject: big\r\n\r\n"
    body = (b"z" * 98 + b"\r\n") * (3 * MEMORY_LIMIT // 100)
    draft, problem, _ = read(stuff(head + body) + b".\r\n", None, tmp)
    assert problem is None and draft.head == head and draft.head_complete
    assert draft.spill is not None and draft.spill.size >= MEMORY_LIMIT
    assert b"".join(pieces(draft.parts)) == body and draft.body_size == len(body)
    assert os.listdir(tmp) == []  # the spill file has no name
    draft.discard()


def test_a_header_block_without_end_is_cut_at_a_line_end(tmp: Path) -> None:
    fields = b"".join(b"X-Field-%06d: value\r\n" % i for i in range(HEAD_LIMIT // 20))
    draft, problem, _ = read(fields + b".\r\n", None, tmp)
    assert problem is None and not draft.head_complete and not draft.whole_head
    assert draft.head.endswith(b"\r\n") and HEAD_LIMIT - 30 < len(draft.head) <= HEAD_LIMIT
    assert content_of(draft) == fields
    draft.discard()


def test_a_spill_that_cannot_be_written_is_kept_for_the_reply(tmp: Path) -> None:
    """As on a full disk: the data is still read to its end, then the error is known."""
    blocked = tmp / "tmp"
    blocked.write_bytes(b"")  # not a directory: no spill file can be made there
    body = (b"z" * 98 + b"\r\n") * (2 * MEMORY_LIMIT // 100)
    draft, problem, rest = read(b"S: x\r\n\r\n" + body + b".\r\nQUIT\r\n", None, blocked)
    assert problem is None and rest == b"QUIT\r\n"
    assert isinstance(draft.error, OSError) and draft.spill is None
