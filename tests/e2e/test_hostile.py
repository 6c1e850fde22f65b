"""Hostile clients against the real daemon: smuggling and bare line ends, over-long lines and
messages, bad bytes and addresses, floods of commands and connections. Each test checks the
precise reply, that nothing was queued that should not have been, and that the daemon still
serves a normal client afterwards (a message delivered, /healthz 200, no error logged)."""

from __future__ import annotations

import re
import resource
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.daemon import Relay, RelayFactory
from tests.support.mx import MxSink
from tests.support.smtp import REPLY_LINE, TIMEOUT, RawClient

MAIL = b"MAIL FROM:<app@sender.test>\r\n"
RCPT = b"RCPT TO:<user@a.test>\r\n"
DATA = b"DATA\r\n"
NOOP = b"NOOP\r\n"
OK = b"250 2.0.0 OK"
MAIL_OK = b"250 2.1.0 Ok"
RCPT_OK = b"250 2.1.5 Ok"
QUEUED = b"250 2.0.0 queued as "
BARE_LINE_END = b"550 5.6.0 Message contains bare CR or LF"
NUL_IN_DATA = b"550 5.6.0 Message contains NUL characters"
NEEDS_SMTPUTF8 = b"553 5.6.7 Non-ASCII address requires SMTPUTF8"
COMMAND_TOO_LONG = b"500 5.5.2 Command line too long"
LINE_TOO_LONG = b"500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
TOO_BIG = b"552 5.3.4 Message too big for system"
SIZE_TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size"
# relay_networks without 127.0.0.1: the per-IP limits apply to it; 127.0.0.8 may still relay.
UNTRUSTED_LOOPBACK = {"relay_networks": ["10.0.0.0/8", "127.0.0.8/32"]}
TRUSTED_SOURCE = "127.0.0.8"
MIB = 1 << 20


def session(daemon: Relay, source: str = "127.0.0.1") -> RawClient:
    """A client past the greeting and EHLO."""
    client = RawClient(daemon.port, source)
    try:
        assert client.reply().startswith(b"220 relay.test ")
        assert client.ask(b"EHLO client.test\r\n")[0].startswith(b"250 ")
    except BaseException:
        client.sock.close()
        raise
    return client


def submit(daemon: Relay, source: str = "127.0.0.1") -> str:
    """A well-behaved client's message to user@a.test; returns its queue id."""
    with session(daemon, source) as client:
        assert client.ask(MAIL, RCPT, DATA)[:2] == [MAIL_OK, RCPT_OK]
        [queued] = client.ask(b"Subject: still fine\r\n\r\nhello\r\n.\r\n")
    assert queued.startswith(QUEUED), queued
    return queued.rsplit(b" ", 1)[1].decode()


def assert_healthy(daemon: Relay, source: str = "127.0.0.1") -> None:
    """A normal message is accepted and delivered, /healthz says 200, no error was logged."""
    queue_id = submit(daemon, source)
    daemon.wait_event("delivered", id=queue_id)
    assert daemon.get("/healthz")[0] == 200
    assert daemon.events("error") == []


def assert_nothing_queued(daemon: Relay, sink: MxSink) -> None:
    for name in ("msg", "queue", "dead"):
        assert sorted((daemon.spool / name).iterdir()) == [], f"spool/{name} is not empty"
    assert daemon.events("received") == []
    assert sink.received == []


def intake_rss(daemon: Relay) -> int:
    """The intake worker's resident set size, in bytes."""
    status = Path(f"/proc/{daemon.worker_pid('intake')}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match[1]) * 1024


def start_data(client: RawClient) -> None:
    replies = client.ask(MAIL, RCPT, DATA)
    assert replies[:2] == [MAIL_OK, RCPT_OK] and replies[2].startswith(b"354 "), replies


# --- what the message may contain (RFC 5321 §2.3.8, §4.5.2) -----------------------------------


@pytest.mark.parametrize("line_end", [b"\n", b"\r"], ids=["bare-lf", "bare-cr"])
def test_bare_line_end_in_data_refused(relay: RelayFactory, sink: MxSink, line_end: bytes) -> None:
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        body = b"Subject: x\r\n\r\nbare" + line_end + b"line end\r\n.\r\n"
        refused, noop = client.ask(body, NOOP)
    assert refused.startswith(BARE_LINE_END) and noop == OK
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)
    # RFC 5321 §4.2: reply text is printable US-ASCII (so "section 2.3.8", not "§2.3.8").
    assert refused.isascii(), refused


SMUGGLED = (
    b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<victim@a.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r\n.\r", b"\n.\r"],
    ids=["lf.crlf", "cr.crlf", "lf.lf", "crlf.lf", "crlf.cr", "lf.cr"],
)
def test_smuggled_commands_are_not_executed(
    relay: RelayFactory, sink: MxSink, fake_end: bytes
) -> None:
    """SMTP smuggling: an end of data that is not <CRLF>.<CRLF>, then a second transaction."""
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        client.send(b"Subject: x\r\n\r\nhello" + fake_end + SMUGGLED)
        assert client.silent(0.5), "a fake end of data ended DATA"
        refused, *replies = client.ask(b"\r\n.\r\n", NOOP, b"RCPT TO:<victim@a.test>\r\n")
        assert refused.startswith(BARE_LINE_END), refused
        assert replies == [OK, b"503 5.5.1 Error: need MAIL command"]
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_dot_lines_leave_byte_identical(relay: RelayFactory, sink: MxSink) -> None:
    """Lines ".foo" and "." (dot-stuffed by the client) reach the MX exactly as written: our
    own dot-stuffing outbound is unambiguous (RFC 5321 §4.5.2)."""
    body = b"Subject: dots\r\n\r\n.foo\r\n.\r\n..\r\n. \r\nmiddle\r\n.\r\n"
    stuffed = b"".join(
        b"." + line if line.startswith(b".") else line for line in body.splitlines(keepends=True)
    )
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        [queued] = client.ask(stuffed + b".\r\n")
    assert queued.startswith(QUEUED)
    [message] = sink.wait_for(1)
    assert message.data.endswith(body), message.data
    received = message.data[: -len(body)].split(b"\r\n")
    assert received[0].startswith(b"Received: ") and received[-1] == b""
    assert all(line.startswith(b"\t") for line in received[1:-1]), received


# --- line lengths (RFC 5321 §4.5.3.1.4, §4.5.3.1.6) ---------------------------------------------


@pytest.mark.parametrize(
    ("octets", "expected"),
    [(512, OK), (513, COMMAND_TOO_LONG), (100_000, COMMAND_TOO_LONG)],
)
def test_command_line_longer_than_512_octets(
    relay: RelayFactory, sink: MxSink, octets: int, expected: bytes
) -> None:
    """512 octets including the command word and CRLF is the limit; the session goes on."""
    line = b"NOOP " + b"x" * (octets - 7) + b"\r\n"
    assert len(line) == octets
    daemon = relay()
    with session(daemon) as client:
        assert client.ask(line, NOOP) == [expected, OK]
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


@pytest.mark.parametrize("octets", [1001, 100_000])
def test_data_line_longer_than_1000_octets_refused(
    relay: RelayFactory, sink: MxSink, octets: int
) -> None:
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        body = b"Subject: long\r\n\r\n" + b"x" * (octets - 2) + b"\r\nend\r\n.\r\n"
        assert client.ask(body, NOOP) == [LINE_TOO_LONG, OK]
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_data_line_of_1000_octets_accepted(relay: RelayFactory, sink: MxSink) -> None:
    body = b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n"
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        [queued] = client.ask(body + b".\r\n")
    assert queued.startswith(QUEUED)
    assert sink.wait_for(1)[0].data.endswith(body)


# --- bad bytes and bad addresses --------------------------------------------------------------


def test_nul_in_data_refused(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    with session(daemon) as client:
        start_data(client)
        assert client.ask(b"Subject: x\r\n\r\nnul \0 byte\r\n.\r\n", NOOP) == [NUL_IN_DATA, OK]
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


NUL_COMMANDS = {
    "verb": [b"NO\0OP\r\n"],
    "ehlo": [b"EHLO client\0.test\r\n"],
    "helo": [b"HELO client\0.test\r\n"],
    "mail": [b"MAIL FROM:<app\0@sender.test>\r\n"],
    "rcpt": [MAIL, b"RCPT TO:<us\0er@a.test>\r\n"],
}


def test_nul_in_a_command_refused(relay: RelayFactory, sink: MxSink) -> None:
    """A NUL anywhere in a command line gets a 5xx; none of them may reach a Received: header
    or an envelope."""
    daemon = relay()
    accepted = {}
    for name, commands in NUL_COMMANDS.items():
        with session(daemon) as client:
            reply = client.ask(*commands)[-1]
            if not reply.startswith(b"5"):
                accepted[name] = reply
            assert client.ask(NOOP) == [OK]
    assert accepted == {}, f"NUL accepted in: {accepted}"
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


ECHOED = {
    "bare CR in an unknown verb": b"X\rY\r\n",
    "NUL in an unknown verb": b"NO\0OP\r\n",
    "escape sequence in an unknown verb": b"X\x1b[2J\r\n",
    "510-octet unknown verb": b"X" * 510 + b"\r\n",
    "bare CR in VRFY": b"VRFY <<\r>\r\n",
    "non-UTF-8 in VRFY": b"VRFY <<\x80>\r\n",
}
# RFC 5321 §4.2: reply text is HT, SP and printable US-ASCII; §4.5.3.1.5: 512 octets a line.
TEXTSTRING_REPLY = re.compile(rb"^\d{3} [\t\x20-\x7e]*\r\n\Z")


def test_replies_never_carry_the_clients_bad_bytes(relay: RelayFactory, sink: MxSink) -> None:
    """Replies that quote what the client sent (an unknown verb, an address that would not
    parse) quote it safely: no CR, NUL or escape reaches the client, no line is over 512
    octets, and no bytes make the reply fail (a 451 and a logged error)."""
    daemon = relay()
    bad = {}
    for name, command in ECHOED.items():
        with session(daemon) as client:
            client.send(command)
            line = client.line()
            if not (TEXTSTRING_REPLY.match(line) and len(line) <= 512 and line[:1] == b"5"):
                bad[name] = line
    assert bad == {}, f"unsafe replies: {bad}"
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


NON_ASCII = {
    "utf8 sender": ["MAIL FROM:<jörg@sender.test>\r\n".encode()],
    "latin-1 sender": [b"MAIL FROM:<j\xf6rg@sender.test>\r\n"],
    "utf8 recipient": [MAIL, "RCPT TO:<usér@a.test>\r\n".encode()],
    "idn recipient domain": [MAIL, "RCPT TO:<user@bücher.test>\r\n".encode()],
}


def test_non_ascii_address_without_smtputf8_refused(relay: RelayFactory, sink: MxSink) -> None:
    """RFC 6531 §3.2: no non-ASCII address unless MAIL FROM said SMTPUTF8."""
    daemon = relay()
    replies = {}
    for name, commands in NON_ASCII.items():
        with session(daemon) as client:
            replies[name] = client.ask(*commands)[-1]
    assert replies == dict.fromkeys(NON_ASCII, NEEDS_SMTPUTF8)
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


MALFORMED = {
    "no @": b"<user>",
    "empty local part": b"<@a.test>",
    "empty domain": b"<user@>",
    "domain starts with a hyphen": b"<user@-bad.test>",
    "empty domain label": b"<user@a..test>",
    "domain starts with a dot": b"<user@.a.test>",
    "underscore in domain": b"<user@a_b.test>",
    "bad address literal": b"<user@[300.1.1.1]>",
    "unbalanced < (no >)": b"<user@a.test",
    "unbalanced > (no <)": b"user@a.test>",
    "doubled <": b"<<user@a.test>",
    "unbalanced quote": b'<"user@a.test>',
    "quoted @, no domain outside": b'<"user@a.test">',
    "control character": b"<us\x01er@a.test>",
    "carriage return": b"<us\rer@a.test>",
}


@pytest.mark.parametrize("verb", [b"MAIL FROM:", b"RCPT TO:"])
def test_malformed_addresses_refused(relay: RelayFactory, sink: MxSink, verb: bytes) -> None:
    """Every unusable address gets 501 or 553, never 250 (RFC 5321 §4.1.2)."""
    daemon = relay()
    replies = {}
    for name, address in MALFORMED.items():
        with session(daemon) as client:
            before = [] if verb == b"MAIL FROM:" else [MAIL]
            replies[name] = client.ask(*before, verb + address + b"\r\n")[-1]
    wrong = {name: reply for name, reply in replies.items() if reply[:4] not in (b"501 ", b"553 ")}
    assert wrong == {}, f"{verb.decode()} accepted or misanswered: {wrong}"
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


BAD_RCPT = b"501 5.1.3 Bad recipient address syntax"
# The exact reply a recipient the relay cannot use gets.
RCPT_REPLIES = {
    b"<nodomain>": BAD_RCPT,
    b"<a@-bad-.test>": BAD_RCPT,
    b"<>": BAD_RCPT,
    b"<\xc3\xa9@a.test>": NEEDS_SMTPUTF8,
    b"<user@[300.1.1.1]>": BAD_RCPT,
    # RFC 5321 §4.1.3: an IPv6 literal needs its tag, and the tag an IPv6 address.
    b"<user@[::1]>": BAD_RCPT,
    b"<user@[IPv6:127.0.0.1]>": BAD_RCPT,
}


def test_bad_recipient_addresses_get_their_precise_reply(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    replies = {}
    for address in RCPT_REPLIES:
        with session(daemon) as client:
            replies[address] = client.ask(MAIL, b"RCPT TO:" + address + b"\r\n")[-1]
    assert replies == RCPT_REPLIES
    assert_nothing_queued(daemon, sink)


@pytest.mark.parametrize(
    ("smtputf8_command", "bad"),
    [
        (b"MAIL FROM:<j\xf6rg@sender.test> SMTPUTF8\r\n", "sender"),
        (b"MAIL FROM:<app@sender.test> SMTPUTF8\r\nRCPT TO:<us\xff@a.test>\r\n", "recipient"),
    ],
    ids=["sender", "recipient"],
)
def test_invalid_utf8_address_with_smtputf8_refused(
    relay: RelayFactory, sink: MxSink, smtputf8_command: bytes, bad: str
) -> None:
    """RFC 6531 §3.3: with SMTPUTF8, addresses are UTF-8; other bytes are a 5xx, not a message
    queued with an address no next hop can be sent (nor a 451 and a logged error)."""
    daemon = relay()
    with session(daemon) as client:
        lines = smtputf8_command.splitlines(keepends=True)
        replies = client.ask(*lines)
        assert replies[-1][:4] in (b"501 ", b"553 "), replies
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


@pytest.mark.parametrize(
    ("address", "delivered_to"),
    [
        (b"<@x.test,@y.test:user@a.test>", "user@a.test"),
        (b'<"odd@local"@a.test>', '"odd@local"@a.test'),
    ],
    ids=["source-route", "quoted-local-part-with-@"],
)
def test_odd_but_valid_addresses_refused_or_used_as_the_rfc_says(
    relay: RelayFactory, sink: MxSink, address: bytes, delivered_to: str
) -> None:
    """RFC 5321 §4.1.1.3 and Appendix C: a source route must be understood, and should be
    ignored; a quoted local part may hold "@". Either a 5xx, or 250 and the message goes to
    the address the RFC means, exactly (the route dropped, the quotes kept)."""
    daemon = relay()
    with session(daemon) as client:
        reply = client.ask(MAIL, b"RCPT TO:" + address + b"\r\n")[-1]
        if reply.startswith(b"250 "):
            assert reply == RCPT_OK
            [queued] = client.ask(DATA, b"Subject: odd\r\n\r\nhi\r\n.\r\n")[1:]
            assert queued.startswith(QUEUED)
    if reply.startswith(b"250 "):
        assert sink.wait_for(1)[0].rcpt_tos == [delivered_to]
    else:
        assert reply[:4] in (b"501 ", b"553 "), reply
        assert_nothing_queued(daemon, sink)


# --- limits -----------------------------------------------------------------------------------


def test_too_many_recipients(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_recipients": 3}})
    rcpts = [f"RCPT TO:<r{n}@a.test>\r\n".encode() for n in range(4)]
    with session(daemon) as client:
        replies = client.ask(MAIL, *rcpts)
        assert replies == [MAIL_OK, RCPT_OK, RCPT_OK, RCPT_OK, b"452 4.5.3 Too many recipients"]
        [_, queued] = client.ask(DATA, b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert queued.startswith(QUEUED)
    assert sorted(sink.wait_for(1)[0].rcpt_tos) == ["r0@a.test", "r1@a.test", "r2@a.test"]


def test_size_over_the_limit_refused_at_mail(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"max_message_size": 102_400}})
    with session(daemon) as client:
        assert client.ask(b"MAIL FROM:<app@sender.test> SIZE=102401\r\n") == [SIZE_TOO_BIG]
        assert client.ask(MAIL) == [MAIL_OK]  # the session goes on
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_data_over_the_limit_refused_after_the_dot_without_buffering(
    relay: RelayFactory, sink: MxSink
) -> None:
    """5 MiB against a 100 KiB limit: 552 after the final dot, and the excess is discarded as
    it arrives (RFC 1870 §6.3), not held in the intake's memory."""
    daemon = relay({"smtp": {"max_message_size": 102_400}})
    line = b"x" * 998 + b"\r\n"
    with session(daemon) as client:
        start_data(client)
        before = intake_rss(daemon)
        client.send(b"Subject: big\r\n\r\n")
        for _ in range(5 * MIB // (len(line) * 64)):
            client.send(line * 64)
        during = intake_rss(daemon)
        assert client.ask(b".\r\n", NOOP) == [TOO_BIG, OK]
        after = max(during, intake_rss(daemon))
    print(f"\nintake RSS across a 5 MiB DATA: {before / MIB:.1f} -> {after / MIB:.1f} MiB")
    assert after - before < 4 * MIB
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


@pytest.mark.parametrize(
    ("commands", "reply"),
    [
        ([RCPT], b"503 5.5.1 Error: need MAIL command"),
        ([MAIL, DATA], b"503 5.5.1 Error: need RCPT command"),
        ([MAIL, MAIL], b"503 5.5.1 Error: nested MAIL command"),
    ],
    ids=["rcpt-before-mail", "data-before-rcpt", "mail-twice"],
)
def test_commands_out_of_order(
    relay: RelayFactory, sink: MxSink, commands: list[bytes], reply: bytes
) -> None:
    daemon = relay()
    with session(daemon) as client:
        assert client.ask(*commands)[-1] == reply
        assert client.ask(NOOP) == [OK]
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_five_thousand_pipelined_commands_answered_in_order(
    relay: RelayFactory, sink: MxSink
) -> None:
    """A client writes 5,000 commands in one burst without reading; every reply comes back,
    well-formed, in order."""
    cycle = [(b"RSET\r\n", OK), (MAIL, MAIL_OK), (MAIL, b"503 5.5.1 Error: nested MAIL command")]
    cycle += [(RCPT, RCPT_OK), (NOOP, OK)]
    commands = [command for command, _ in cycle] * 1000
    expected = [reply for _, reply in cycle] * 1000
    daemon = relay()
    with session(daemon) as client:
        writer = threading.Thread(target=client.send, args=(b"".join(commands),))
        started = time.monotonic()
        writer.start()
        try:
            replies = [client.reply() for _ in commands]
        finally:
            writer.join(TIMEOUT)
        assert time.monotonic() - started < 30
        assert replies == expected
        assert client.silent(0.2)
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_unknown_commands_repeated_end_the_session(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay()
    with session(daemon) as client:
        replies = client.ask(*[b"XYZZY\r\n"] * 5)
        assert replies == [b'500 5.5.2 Error: command "XYZZY" not recognized'] * 4 + [
            b"502 5.5.1 Too many unrecognized commands, goodbye."
        ]
        client.expect_closed()
    assert_healthy(daemon)


def test_client_stalling_in_data_is_cut_after_the_idle_timeout(
    relay: RelayFactory, sink: MxSink
) -> None:
    daemon = relay({"smtp": {"idle_timeout": "2s"}})
    with session(daemon) as client:
        start_data(client)
        client.send(b"Subject: half\r\n\r\nthe first half of a mess")
        started = time.monotonic()
        while line := client.line():  # a 421 before closing is allowed (RFC 5321 §3.8)
            assert REPLY_LINE.match(line) and line.startswith(b"421 "), line
        waited = time.monotonic() - started
    assert 1.5 < waited < 4.0, waited
    assert_nothing_queued(daemon, sink)
    assert_healthy(daemon)


def test_session_time_limit_cuts_a_busy_client(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"limits": {"session_timeout": "2s"}}})
    started = time.monotonic()
    with session(daemon) as client:
        next_noop = started + 0.25  # between the limit's ticks, so no NOOP races the 421
        while client.silent(max(0.0, next_noop - time.monotonic())):
            assert client.ask(NOOP) == [OK]
            next_noop += 0.5
            assert time.monotonic() - started < 5, "the session was never cut"
        assert client.reply() == b"421 4.4.2 Session time limit exceeded, closing"
        client.expect_closed()
    assert 1.5 < time.monotonic() - started < 4.0
    assert_healthy(daemon)


def test_max_connections(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"limits": {"max_connections": 20}}})
    with ExitStack() as stack:
        idle = [stack.enter_context(session(daemon)) for _ in range(20)]
        with RawClient(daemon.port) as extra:
            assert extra.reply() == b"421 4.7.0 Too many connections, try again later"
            extra.expect_closed()
        idle.pop().sock.close()  # one leaves: its place is free again
        assert greeted_within(daemon, "127.0.0.1", 5.0)
    # The others leave too; the relay may take a moment to see them go before the next one.
    assert greeted_within(daemon, "127.0.0.1", 5.0)
    assert_healthy(daemon)


def greeted_within(daemon: Relay, source: str, seconds: float) -> bool:
    """A new connection from source gets 220 within seconds (retrying while refused)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with RawClient(daemon.port, source) as client:
            if client.reply().startswith(b"220 "):
                return True
        time.sleep(0.05)
    return False


def test_max_connections_per_ip_for_untrusted_clients(relay: RelayFactory, sink: MxSink) -> None:
    settings = {**UNTRUSTED_LOOPBACK, "limits": {"max_connections_per_ip": 5}}
    daemon = relay({"smtp": settings})
    with ExitStack() as stack:
        for _ in range(5):
            stack.enter_context(session(daemon))
        with RawClient(daemon.port) as sixth:
            reply = sixth.reply()
            assert reply == b"421 4.7.0 Too many connections from your IP address, try again later"
            sixth.expect_closed()
        with session(daemon, "127.0.0.9"):  # another address is counted apart
            pass
    assert_healthy(daemon, TRUSTED_SOURCE)


def test_relay_networks_are_exempt_from_the_per_ip_limit(relay: RelayFactory, sink: MxSink) -> None:
    daemon = relay({"smtp": {"limits": {"max_connections_per_ip": 5}}})
    with ExitStack() as stack:
        for _ in range(30):
            stack.enter_context(session(daemon))
        assert_healthy(daemon)


def test_command_rate_per_ip(relay: RelayFactory, sink: MxSink) -> None:
    settings = {**UNTRUSTED_LOOPBACK, "limits": {"commands_per_minute_per_ip": 20}}
    daemon = relay({"smtp": settings})
    with session(daemon) as client:  # EHLO was the first command
        assert client.ask(*[NOOP] * 19) == [OK] * 19
        reply = client.ask(NOOP)[0]
        assert reply == b"421 4.7.0 Too many commands from your IP address, slow down"
        client.expect_closed()
    assert_healthy(daemon, TRUSTED_SOURCE)


def test_two_thousand_idle_connections(relay: RelayFactory, sink: MxSink) -> None:
    """2,000 idle sessions from 20 addresses: a fresh client is still served at once and the
    intake's memory stays bounded."""
    sources = [f"127.0.0.{n}" for n in range(10, 30)]
    needed = len(sources) * 100 + 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    daemon = relay({"smtp": {"limits": {"max_connections": 5000}}})
    started = time.monotonic()
    before = intake_rss(daemon)
    with ExitStack() as stack:
        for source in sources:
            for _ in range(100):
                client = stack.enter_context(RawClient(daemon.port, source))
                assert client.reply().startswith(b"220 ")
        opened = time.monotonic() - started
        held = intake_rss(daemon)
        t0 = time.monotonic()
        assert_healthy(daemon)
        served = time.monotonic() - t0
    print(
        f"\n2000 idle connections: opened in {opened:.1f} s; intake RSS {before / MIB:.1f} -> "
        f"{held / MIB:.1f} MiB ({(held - before) / 2000 / 1024:.1f} KiB each); "
        f"a fresh client served in {served:.2f} s"
    )
    assert held < 150 * MIB
    assert served < 5
    assert time.monotonic() - started < 60
