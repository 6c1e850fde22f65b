"""The intake's fast reading of plain MAIL/RCPT paths gives what aiosmtpd's own RFC 5322
parser gives, and leaves everything else to it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.intake.syntax import plain_path


@pytest.fixture(scope="module")
def aiosmtpd() -> Iterator[SMTP]:
    loop = asyncio.new_event_loop()
    yield SMTP(object(), loop=loop)
    loop.close()


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<user@example.com>", ("user@example.com", "")),
        ("<user@example.com> SIZE=1000 BODY=8BITMIME", ("user@example.com", "SIZE=1000 BODY=8BITMIME")),
        ("<First.Last+tag@Sub.Example.COM>", ("First.Last+tag@Sub.Example.COM", "")),
        ("<o'brien!#$%&*/=?^_`{|}~-@a-b.c0>", ("o'brien!#$%&*/=?^_`{|}~-@a-b.c0", "")),
        ("<a@b>   SIZE=1", ("a@b", "SIZE=1")),
        ("<a@b> SIZE=1 ", ("a@b", "SIZE=1 ")),
        ("<a@b> )x", ("a@b", ")x")),
    ],
)  # fmt: skip
def test_plain_paths_read_as_aiosmtpd_reads_them(
    aiosmtpd: SMTP, arg: str, expected: tuple[str, str]
) -> None:
    assert plain_path(arg) == expected == aiosmtpd._getaddr(arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<>", "", " <a@b>", "<a@b>\tSIZE=1", "<a@b>SIZE=1", "<a@b> (comment) SIZE=1",
        "<a@b>   ", '<"quoted local"@b>', "<a@[127.0.0.1]>", "<.a@b>", "<a.@b>", "<a..b@c>",
        "<a@-b>", "<a@b->", "<a@b..c>", "<a@b.>", "<ü@b>", "<a@bü>", "<@relay:a@b>", "a@b",
        "<a@b", "<a(x)@b>", "<a@b(x)>", "<a b@c>", "<a@b c>",
    ],
)  # fmt: skip
def test_anything_else_goes_to_aiosmtpd(arg: str) -> None:
    assert plain_path(arg) is None


PIECES = st.sampled_from(
    ["a", "Z", "0", ".", "@", "<", ">", " ", "  ", "\t", "(", ")", '"', "[", "]", "\\", "-",
     "+", "'", "=", ":", ",", "ü", "SIZE=1", "x.y", "b.c"]
)  # fmt: skip


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.lists(PIECES, max_size=14).map("".join))
def test_whenever_the_fast_path_answers_it_agrees_with_aiosmtpd(aiosmtpd: SMTP, arg: str) -> None:
    fast = plain_path(arg)
    if fast is not None:
        assert fast == aiosmtpd._getaddr(arg)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.from_regex(r"[A-Za-z0-9+_-]{1,8}(\.[A-Za-z0-9+_-]{1,8}){0,2}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9]{1,8}(\.[A-Za-z0-9]{1,8}){0,2}", fullmatch=True),
    st.sampled_from(["", " SIZE=10", " BODY=8BITMIME SMTPUTF8"]),
)
def test_typical_paths_take_the_fast_path(aiosmtpd: SMTP, local: str, host: str, rest: str) -> None:
    arg = f"<{local}@{host}>{rest}"
    assert plain_path(arg) == aiosmtpd._getaddr(arg) == (f"{local}@{host}", rest.strip())
