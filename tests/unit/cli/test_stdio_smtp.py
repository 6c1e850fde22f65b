"""Table-driven tests of `relay sendmail -bs`'s SMTP session, in process: what a program writing
SMTP to sendmail's stdin reads back on its stdout, and the messages handed to take()."""

from __future__ import annotations

import io

import pytest

from relay.cli.stdio_smtp import ERROR_LIMIT, EX_IOERR, Envelope, serve

REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"

GREETING = "220 mx.test ESMTP relay (sendmail -bs)"
EHLO = [
    "250-mx.test", "250-PIPELINING", "250-SIZE 26214400", "250-8BITMIME", "250-SMTPUTF8",
    "250-DSN", "250 ENHANCEDSTATUSCODES",
]  # fmt: skip


class Run:
    """One session over a script: the reply lines, the messages taken, the exit code."""

    def __init__(self, script: bytes, fail: Exception | None = None, **options: object) -> None:
        self.taken: list[Envelope] = []
        self.fail = fail
        out = io.BytesIO()
        self.code = serve(io.BytesIO(script), out, "mx.test", self.take, **options)  # type: ignore[arg-type]
        text = out.getvalue().decode()
        assert text.endswith("\r\n")
        self.lines = text.split("\r\n")[:-1]

    def take(self, envelope: Envelope) -> str:
        if self.fail is not None:
            raise self.fail
        self.taken.append(envelope)
        return f"250 2.0.0 Ok: queued as maildrop/m{len(self.taken)}"

    @property
    def replies(self) -> list[str]:
        """The last line of each reply (a multi-line one's "250-" lines left out)."""
        return [line for line in self.lines if line[3:4] != "-"]


def script(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


def test_a_whole_session_with_two_messages() -> None:
    commands = [
        "EHLO client.test", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>",
        "RCPT TO:<carol@example.com>", "DATA", "Subject: one", "", "first", ".",
        "MAIL FROM:<>", "RCPT TO:<dave@example.net>", "DATA", "Subject: two", "", "second",
        ".", "QUIT",
    ]  # fmt: skip
    run = Run(script(*commands))
    assert run.lines == [
        GREETING, *EHLO, "250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as maildrop/m1",
        "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as maildrop/m2", "221 2.0.0 Bye",
    ]  # fmt: skip
    first, second = run.taken
    assert first == Envelope(
        "alice@example.org", ["bob@example.net", "carol@example.com"],
        b"Subject: one\r\n\r\nfirst\r\n",
    )  # fmt: skip
    assert second == Envelope("", ["dave@example.net"], b"Subject: two\r\n\r\nsecond\r\n")
    assert run.code == 0


def test_pipelined_commands_get_one_reply_each_in_order() -> None:
    """The whole envelope in one write, a refused recipient in the middle (RFC 2920)."""
    raw = (
        b"EHLO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<bad@@x>\r\n"
        b"RCPT TO:<c@x.test>\r\nDATA\r\nhi\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    )
    run = Run(raw)
    assert run.replies == [
        GREETING, "250 ENHANCEDSTATUSCODES", "250 2.1.0 Ok", "250 2.1.5 Ok",
        "501 5.1.3 Bad recipient address syntax", "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as maildrop/m1",
        "250 2.0.0 Ok", "250 2.0.0 Ok", "221 2.0.0 Bye",
    ]  # fmt: skip
    assert run.taken[0].recipients == ["b@x.test", "c@x.test"]


def test_a_refused_mail_makes_the_pipelined_rest_fail_too() -> None:
    run = Run(script("MAIL FROM:<a@x.test> BODY=BINARYMIME", "RCPT TO:<b@x.test>", "DATA"))
    assert run.replies[1:] == [
        "501 5.5.4 Malformed BODY parameter",
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
    ]
    assert run.taken == []


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (["..leading dot", "a.b", ".."], b".leading dot\r\na.b\r\n.\r\n"),
        ([". space", "...three"], b" space\r\n..three\r\n"),
        (["x", "", "y"], b"x\r\n\r\ny\r\n"),
    ],
)
def test_dot_stuffing_is_undone(body: list[str], data: bytes) -> None:
    run = Run(script("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA", *body, "."))
    assert run.taken[0].data == data


def test_bare_lf_line_ends_become_crlf() -> None:
    raw = b"HELO c\nMAIL FROM:<a@x.test>\nRCPT TO:<b@x.test>\nDATA\nSubject: s\n\nbody\n.\nQUIT\n"
    run = Run(raw)
    assert run.taken[0].data == b"Subject: s\r\n\r\nbody\r\n"
    assert run.replies[-1] == "221 2.0.0 Bye"


# Each case: the commands after EHLO, and the reply to the last of them.
ERRORS = [
    (["FOO"], "500 5.5.2 Error: command not recognized"),
    ([""], "500 5.5.2 Error: bad syntax"),
    (["EXPN staff"], "502 5.5.1 Error: command not implemented"),
    (["STARTTLS"], "502 5.5.1 Error: command not implemented"),
    (["HELO"], "501 5.5.4 Syntax: HELO hostname"),
    (["EHLO"], "501 5.5.4 Syntax: EHLO hostname"),
    (["MAIL TO:<a@x.test>"], "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (["MAIL FROM:"], "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (["MAIL FROM:<a@x.test"], "501 5.5.4 Syntax error in parameters: unbalanced < >"),
    (["MAIL FROM:<a@x.test>junk"], "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (["MAIL FROM:<a@-x.test>"], "501 5.1.7 Bad sender address syntax"),
    (["MAIL FROM:<a b@x.test>"], "501 5.1.7 Bad sender address syntax"),
    (["MAIL FROM:<é@x.test>"], "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
    (["MAIL FROM:<a@x.test> SIZE=big"], "501 5.5.4 Malformed SIZE parameter"),
    (["MAIL FROM:<a@x.test> SIZE=99999999"], REPLY_TOO_BIG),
    (["MAIL FROM:<a@x.test> SMTPUTF8=yes"], "501 5.5.4 Malformed SMTPUTF8 parameter"),
    (["MAIL FROM:<a@x.test> RET=ALL"], "501 5.5.4 Malformed RET parameter: must be FULL or HDRS"),
    (["MAIL FROM:<a@x.test> AUTH=<>"], "555 5.5.4 MAIL FROM parameter AUTH not recognized"),
    (["MAIL FROM:<a@x.test>", "MAIL FROM:<a@x.test>"], "503 5.5.1 Error: nested MAIL command"),
    (["RCPT TO:<b@x.test>"], "503 5.5.1 Error: need MAIL command"),
    (["MAIL FROM:<a@x.test>", "RCPT TO:<>"], "501 5.1.3 Bad recipient address syntax"),
    (["MAIL FROM:<a@x.test>", "RCPT FROM:<b@x.test>"], "501 5.5.4 Syntax: RCPT TO:<address>"),
    (
        ["MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test> NOTIFY=NEVER,DELAY"],
        "501 5.5.4 Malformed NOTIFY parameter: NEVER must stand alone",
    ),
    (["DATA"], "503 5.5.1 Error: need MAIL command"),
    (["MAIL FROM:<a@x.test>", "DATA"], "503 5.5.1 Error: need RCPT command"),
    (["MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA now"], "501 5.5.4 Syntax: DATA"),
    (["RSET all"], "501 5.5.4 Syntax: RSET"),
    (["QUIT now"], "501 5.5.4 Syntax: QUIT"),
    (["VRFY"], "501 5.5.4 Syntax: VRFY address"),
    (["VRFY root"], "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
    (["HELP"], "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT"),
    (["NOOP \x01"], "500 5.5.2 Syntax error: control character in command"),
    (["MAIL FROM:<a@x.test>", "RSET", "RCPT TO:<b@x.test>"], "503 5.5.1 Error: need MAIL command"),
    (["MAIL FROM:<a@x.test>", "EHLO again", "DATA"], "503 5.5.1 Error: need MAIL command"),
]


@pytest.mark.parametrize(("commands", "reply"), ERRORS, ids=lambda v: str(v)[:50])
def test_each_reply(commands: list[str], reply: str) -> None:
    run = Run(script("EHLO c.test", *commands))
    assert run.replies[-1] == reply
    assert run.code == 0


def test_a_command_line_not_utf8_is_refused() -> None:
    run = Run(b"HELO c\r\nNOOP \xff\xfe\r\nNOOP\r\n")
    assert run.replies[2:] == ["500 5.5.2 Syntax error: command is not valid UTF-8", "250 2.0.0 Ok"]


def test_a_command_line_too_long_is_refused_and_the_session_goes_on() -> None:
    run = Run(b"HELO c\r\nNOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert run.replies[2:] == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


# Each case: the message lines, and the reply after the final dot (the size limit is 1900).
DATA_REFUSALS = [
    ([""], "250 2.0.0 Ok: queued as maildrop/m1"),
    ([], "554 5.6.0 Error: message is empty"),
    (["x" * 998], "250 2.0.0 Ok: queued as maildrop/m1"),
    (["x" * 999], "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"),
    (["y" * 1500], "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"),
    (["a\rb"], "550 5.6.0 Message contains bare CR or LF (RFC 5321 section 2.3.8)"),
    (["a\0b"], "550 5.6.0 Message contains NUL characters"),
    (["z" * 990, "z" * 990], REPLY_TOO_BIG),
    (["y" * 5000], REPLY_TOO_BIG),  # the size first, as the intake answers
]


@pytest.mark.parametrize(("body", "reply"), DATA_REFUSALS, ids=lambda v: str(v)[:40])
def test_the_data_is_judged_as_the_intake_will(body: list[str], reply: str) -> None:
    commands = ("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA", *body, ".")
    run = Run(script(*commands, "NOOP"), max_size=1900)
    assert run.replies[-2:] == [reply, "250 2.0.0 Ok"]
    assert len(run.taken) == reply.startswith("250")


def test_dsn_and_smtputf8_parameters_reach_the_envelope() -> None:
    commands = [
        "EHLO c", "MAIL FROM:<a@x.test> RET=HDRS ENVID=QQ+2Bx SMTPUTF8 BODY=8BITMIME SIZE=9",
        "RCPT TO:<b@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40x.test",
        "RCPT TO:<ü@bücher.test>", "RCPT TO:<c@x.test> NOTIFY=NEVER", "DATA", "hi", ".",
    ]  # fmt: skip
    run = Run(script(*commands))
    assert run.taken == [
        Envelope(
            "a@x.test", ["b@x.test", "ü@bücher.test", "c@x.test"], b"hi\r\n", "HDRS", "QQ+x",
            {"b@x.test": ["SUCCESS", "FAILURE"], "c@x.test": ["NEVER"]},
            {"b@x.test": "rfc822;b@x.test"}, smtputf8=True,
        )
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ("<root>", "root@local.test"),
        ("postmaster", "postmaster@local.test"),
        ("b@x.test", "b@x.test"),
        ("<@relay.test:b@x.test>", "b@x.test"),
        ('<"b c"@x.test>', '"b c"@x.test'),
        ("<b@[192.0.2.1]>", "b@[192.0.2.1]"),
        ("<B@X.Test>", "B@X.Test"),
    ],
)
def test_recipient_paths(path: str, address: str) -> None:
    run = Run(
        script("HELO c", "MAIL FROM:<a@x.test>", f"RCPT TO:{path}", "DATA", "hi", "."),
        default_domain="local.test",
    )
    assert run.taken[0].recipients == [address]


def test_a_bare_local_part_gets_the_hostname_without_a_default_domain() -> None:
    run = Run(script("HELO c", "MAIL FROM:root", "RCPT TO:<b@x.test>", "DATA", "hi", "."))
    assert run.taken[0].sender == "root@mx.test"


def test_a_recipient_twice_is_kept_once_and_the_limit_holds() -> None:
    rcpts = [f"RCPT TO:<r{n}@x.test>" for n in (1, 1, 2, 3)]
    run = Run(script("HELO c", "MAIL FROM:<a@x.test>", *rcpts, "DATA", "hi", "."), max_recipients=2)
    assert run.replies[2:7] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                "452 4.5.3 Error: too many recipients"]  # fmt: skip
    assert run.taken[0].recipients == ["r1@x.test", "r2@x.test"]


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
        (PermissionError(13, "Permission denied"), "[Errno 13] Permission denied"),
        (RuntimeError("two\nlines"), "two"),
        (ValueError(), "ValueError"),
    ],
)
def test_take_raising_is_a_451_and_the_session_goes_on(error: Exception, reply: str) -> None:
    run = Run(
        script("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA", "hi", ".", "QUIT"),
        fail=error,
    )
    assert run.replies[-2:] == [f"451 4.3.0 Message not stored, try again later: {reply}",
                                "221 2.0.0 Bye"]  # fmt: skip
    assert not any("Traceback" in line for line in run.lines)


def test_the_end_of_input_in_data_takes_no_message() -> None:
    run = Run(script("HELO c", "MAIL FROM:<a@x.test>", "RCPT TO:<b@x.test>", "DATA", "partial"))
    assert run.replies[-1] == "421 4.4.2 mx.test Error: end of input in DATA, message not taken"
    assert run.taken == []
    assert run.code == 0


def test_the_end_of_input_ends_the_session() -> None:
    run = Run(b"HELO c\r\nNOOP")  # the last line without its line end is still read
    assert run.replies == [GREETING, "250 mx.test", "250 2.0.0 Ok"]
    assert Run(b"").replies == [GREETING]


def test_too_many_errors_end_the_session() -> None:
    run = Run(script(*["BOGUS"] * (ERROR_LIMIT + 5), "NOOP"))
    assert run.replies[1:] == [
        *["500 5.5.2 Error: command not recognized"] * ERROR_LIMIT,
        "421 4.7.0 mx.test Error: too many errors",
    ]


def test_a_closed_stdout_is_an_io_error() -> None:
    class Closed(io.BytesIO):
        def write(self, data: object) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    code = serve(io.BytesIO(b"QUIT\r\n"), Closed(), "mx.test", lambda envelope: "250 Ok")
    assert code == EX_IOERR
