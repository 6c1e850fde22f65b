"""Table-driven tests of the RFC 3461 parameters: xtext, MAIL's RET and ENVID, RCPT's NOTIFY and
ORCPT, the split between aiosmtpd's parameters and ours, and what goes to the next hop."""

from __future__ import annotations

import pytest

from relay.mail.dsnparams import (
    DsnRequest,
    MailParams,
    ParamError,
    RcptParams,
    parse_mail_params,
    parse_rcpt_params,
    split_params,
    xtext_decode,
    xtext_encode,
)


@pytest.mark.parametrize(
    ("xtext", "text"),
    [
        ("abc", "abc"),
        ("abc+2Bd", "abc+d"),
        ("a+3Db", "a=b"),
        ("+20x+20", " x "),
        ("a+2bb", "a+b"),  # lower-case hex digits, read too
        ("", ""),
        ("!~", "!~"),
    ],
)
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize("xtext", ["a+", "a+2", "a+2G", "++2B", "a=b", "a b", "é", "a\x01"])
def test_xtext_decode_refuses(xtext: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(xtext)


@pytest.mark.parametrize(
    ("text", "xtext"),
    [("abc", "abc"), ("a+b", "a+2Bb"), ("a=b", "a+3Db"), ("a b", "a+20b"), ("<x@y>", "<x@y>")],
)
def test_xtext_encode_and_back(text: str, xtext: str) -> None:
    assert xtext_encode(text) == xtext
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize(
    ("params", "verb", "kept", "taken"),
    [
        ("SIZE=10 RET=HDRS", "MAIL", "SIZE=10", ["RET=HDRS"]),
        ("  BODY=8BITMIME   envid=aB  SMTPUTF8", "MAIL", "BODY=8BITMIME SMTPUTF8", ["envid=aB"]),
        ("FOO=bar", "MAIL", "", ["FOO=bar"]),
        ("NOTIFY=NEVER ORCPT=rfc822;Ab@x SIZE=1", "RCPT", "", ["NOTIFY=NEVER", "ORCPT=rfc822;Ab@x", "SIZE=1"]),
        ("RET=HDRS", "VRFY", "RET=HDRS", []),
        ("", "MAIL", "", []),
    ],
)  # fmt: skip
def test_split_params(params: str, verb: str, kept: str, taken: list[str]) -> None:
    assert split_params(params, verb) == (kept, taken)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([], MailParams()),
        (["RET=HDRS"], MailParams(ret="HDRS")),
        (["ret=full"], MailParams(ret="FULL")),
        (["ENVID=abc+2Bd"], MailParams(envid="abc+d")),
        (["RET=HDRS", "ENVID=QQ314159"], MailParams("HDRS", "QQ314159")),
        (["ENVID=" + "x" * 100], MailParams(envid="x" * 100)),
    ],
)
def test_parse_mail_params(tokens: list[str], expected: MailParams) -> None:
    assert parse_mail_params(tokens) == expected


@pytest.mark.parametrize(
    ("tokens", "reply"),
    [
        (["RET=BODY"], "501 5.5.4 Malformed RET parameter: must be FULL or HDRS"),
        (["RET="], "501 5.5.4 Malformed RET parameter: no value"),
        (["RET"], "501 5.5.4 Malformed RET parameter: no value"),
        (["RET=HDRS", "RET=FULL"], "501 5.5.4 RET parameter given twice"),
        (["ENVID=a", "envid=b"], "501 5.5.4 ENVID parameter given twice"),
        (["ENVID=" + "x" * 101], "501 5.5.4 Malformed ENVID parameter: longer than 100 characters"),
        (["ENVID=a+2"], '501 5.5.4 Malformed ENVID parameter: not xtext ("+" not followed by two hex digits)'),
        (["ENVID=a+0Ab"], "501 5.5.4 Malformed ENVID parameter: decodes to a non-printable character"),
        (["ENVID=é"], "501 5.5.4 Malformed ENVID parameter: not xtext (characters outside xtext)"),
        (["FOO=bar"], "555 5.5.4 MAIL FROM parameter FOO not recognized"),
        (["NOTIFY=NEVER"], "555 5.5.4 MAIL FROM parameter NOTIFY not recognized"),
        (["=x"], "501 5.5.4 Syntax error in parameter =x"),
    ],
)  # fmt: skip
def test_parse_mail_params_refuses(tokens: list[str], reply: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_mail_params(tokens)
    assert caught.value.reply == reply


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([], RcptParams()),
        (["NOTIFY=NEVER"], RcptParams(notify=("NEVER",))),
        (["notify=failure,Delay"], RcptParams(notify=("FAILURE", "DELAY"))),
        (["NOTIFY=SUCCESS,FAILURE,DELAY"], RcptParams(notify=("SUCCESS", "FAILURE", "DELAY"))),
        (["ORCPT=rfc822;b@a.test"], RcptParams(orcpt="rfc822;b@a.test")),
        (["ORCPT=rfc822;b+2Bx@a.test"], RcptParams(orcpt="rfc822;b+x@a.test")),
        (["NOTIFY=FAILURE", "ORCPT=x-local;a+20b"], RcptParams(("FAILURE",), "x-local;a b")),
    ],
)
def test_parse_rcpt_params(tokens: list[str], expected: RcptParams) -> None:
    assert parse_rcpt_params(tokens) == expected


@pytest.mark.parametrize(
    ("tokens", "reply"),
    [
        (["NOTIFY=NEVER,FAILURE"], "501 5.5.4 Malformed NOTIFY parameter: NEVER must stand alone"),
        (["NOTIFY=FAILURE,FAILURE"], "501 5.5.4 Malformed NOTIFY parameter: a value is repeated"),
        (["NOTIFY=SOMETIMES"], "501 5.5.4 Malformed NOTIFY parameter: 'SOMETIMES' is not NEVER, SUCCESS, FAILURE or DELAY"),
        (["NOTIFY=FAILURE,"], "501 5.5.4 Malformed NOTIFY parameter: '' is not NEVER, SUCCESS, FAILURE or DELAY"),
        (["NOTIFY=DELAY", "NOTIFY=DELAY"], "501 5.5.4 NOTIFY parameter given twice"),
        (["ORCPT=b@a.test"], "501 5.5.4 Malformed ORCPT parameter: must be addr-type;address"),
        (["ORCPT=rfc822;"], "501 5.5.4 Malformed ORCPT parameter: must be addr-type;address"),
        (["ORCPT=;b@a.test"], "501 5.5.4 Malformed ORCPT parameter: must be addr-type;address"),
        (["ORCPT=rfc822;b+zz@a.test"], '501 5.5.4 Malformed ORCPT parameter: not xtext ("+" not followed by two hex digits)'),
        (["ORCPT=rfc822;" + "b" * 500], "501 5.5.4 Malformed ORCPT parameter: longer than 500 characters"),
        (["RET=HDRS"], "555 5.5.4 RCPT TO parameter RET not recognized"),
        (["SIZE=10"], "555 5.5.4 RCPT TO parameter SIZE not recognized"),
    ],
)  # fmt: skip
def test_parse_rcpt_params_refuses(tokens: list[str], reply: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_rcpt_params(tokens)
    assert caught.value.reply == reply


@pytest.mark.parametrize(
    ("params", "options"),
    [
        (MailParams(), []),
        (MailParams(ret="HDRS"), ["RET=HDRS"]),
        (MailParams("FULL", "a+b c"), ["RET=FULL", "ENVID=a+2Bb+20c"]),
        (RcptParams(), []),
        (RcptParams(notify=("NEVER",)), ["NOTIFY=NEVER"]),
        (RcptParams(("FAILURE", "DELAY"), "rfc822;b+x@a.test"), ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b+2Bx@a.test"]),
    ],
)  # fmt: skip
def test_options_for_the_next_hop(params: MailParams | RcptParams, options: list[str]) -> None:
    assert params.options() == options


def test_options_read_back_as_they_were_given() -> None:
    mail = MailParams("HDRS", "id=1+2 x")
    rcpt = RcptParams(("SUCCESS",), "rfc822;a+b=c@x.test")
    assert parse_mail_params(mail.options()) == mail
    assert parse_rcpt_params(rcpt.options()) == rcpt


def test_a_request_has_plain_params_for_recipients_it_lacks() -> None:
    request = DsnRequest(MailParams(), (RcptParams(("NEVER",)),))
    assert request.rcpt(0) == RcptParams(("NEVER",))
    assert request.rcpt(1) == RcptParams()
