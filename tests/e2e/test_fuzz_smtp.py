"""Property test of the intake's SMTP dialogue: random sessions against one real daemon.

Each example opens a connection and writes 1-30 lines that mix real verbs (EHLO, HELO, MAIL,
RCPT, DATA, RSET, NOOP, VRFY, QUIT, STARTTLS, AUTH PLAIN, BDAT) and garbage with random
arguments (random bytes with NUL and non-ASCII, very long, empty, valid addresses with bytes
slipped in), random line ends (CRLF, LF, CR, none) and random cuts between writes. Then it
ends the session (the end of DATA if one is open, then QUIT) and reads to the end. Properties:

- every byte the server sends is part of a well-formed reply line, `^\\d{3}[ -].*\\r\\n`
  with no CR or LF inside (the greeting included), and the lines of a multi-line reply
  share one code;
- the connection stays usable until QUIT or is closed cleanly, after a 221, 421 or 502;
- the daemon logs no `error` event and no traceback, and `/healthz` answers 200;
- every `250 ... queued as <id>` is not lost: the message is in the spool or at the MX sink.

One daemon serves the whole module. The number of examples is 300 by default (well under
90 s on two cores); fuzz for minutes with, e.g.,

    RELAY_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/e2e/test_fuzz_smtp.py

(about 14 examples a second; the pytest timeout grows with the count).
With CI set in the environment the examples are derandomized, so a CI run is reproducible;
locally each run draws new ones. A failure prints the shrunk session and a
`@reproduce_failure` blob. No example database is written.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.daemon import Relay
from tests.support.dns import DnsServer
from tests.support.mx import MxNet, MxSink
from tests.support.smtp import RawClient

EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "300"))
QUEUED = re.compile(rb"^250 2\.0\.0 queued as ([0-9a-f]{20})$")
CLOSING_CODES = {b"221", b"421", b"502"}  # QUIT, a limit or shutdown, too many bad commands
READ_DEADLINE = 10.0
OUTCOMES = {"delivered", "deferred", "bounced", "error"}

VERBS = [
    b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY", b"QUIT",
    b"STARTTLS", b"AUTH PLAIN", b"BDAT", b"EXPN", b"HELP",
]  # fmt: skip
GOOD_ARGUMENTS = [
    b"client.test", b"<app@sender.test>", b"<user@a.test>", b"<other@a.test>", b"<>",
    b"<nobody@nx.test>", b"<app@sender.test> SIZE=100", b"<app@sender.test> SMTPUTF8",
    "<jörg@sender.test> SMTPUTF8".encode(), "<usér@a.test>".encode(), b"<app@sender.test> BODY=8BITMIME",
    b"AGFwcABzZWNyZXQ=", b"10 LAST", b"user",
]  # fmt: skip
DATA_LINES = [b"Subject: fuzz", b"", b".", b"..", b".x", b"hello", b"\n.", b"\r.", "é".encode()]
EHLO, MAIL, RCPT, DATA = (
    b"EHLO client.test\r\n", b"MAIL FROM:<app@sender.test>\r\n", b"RCPT TO:<user@a.test>\r\n",
    b"DATA\r\n",
)  # fmt: skip
MAIL_UTF8 = b"MAIL FROM:<app@sender.test> SMTPUTF8\r\n"
# Where the random lines start: before the greeting is answered, in a transaction, in DATA.
PREFIXES = [
    b"", EHLO, EHLO + MAIL, EHLO + MAIL_UTF8, EHLO + MAIL + RCPT, EHLO + MAIL_UTF8 + RCPT,
    EHLO + MAIL + RCPT + DATA,
]  # fmt: skip


def slipped(good: bytes, extra: bytes, at: int) -> bytes:
    """A good argument with a few bad bytes slipped in (an address that almost parses)."""
    at %= len(good) + 1
    return good[:at] + extra + good[at:]


almost_good = st.builds(
    slipped, st.sampled_from(GOOD_ARGUMENTS), st.binary(min_size=1, max_size=3), st.integers(0, 60)
)
very_long = st.builds(
    bytes.__mul__, st.sampled_from([b"x", b"\0", b"\xff", b".", b"<"]), st.integers(300, 3000)
)
arguments = st.one_of(
    st.sampled_from(GOOD_ARGUMENTS),
    almost_good,
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda text: text.encode("utf-8", "surrogatepass")),
    very_long,
    st.just(b""),
)
verbs = st.one_of(st.sampled_from(VERBS), st.binary(min_size=1, max_size=8))
line_ends = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])
command_lines = st.builds(
    lambda verb, space, argument, end: verb + space + argument + end,
    verbs, st.sampled_from([b"", b" "]), arguments, line_ends,
)  # fmt: skip
data_lines = st.builds(bytes.__add__, st.sampled_from(DATA_LINES), line_ends)
sessions = st.tuples(
    st.sampled_from(PREFIXES),
    st.lists(st.one_of(command_lines, data_lines), min_size=1, max_size=30),
)


@dataclass
class Fuzzed:
    """The module's one daemon, its MX sink, and what the examples got queued."""

    daemon: Relay
    sink: MxSink
    queued: list[str]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    dns, net = DnsServer(), MxNet()
    dns.start()
    daemon: Relay | None = None
    try:
        sink = net.sink("127.0.0.2", smtputf8=True)
        dns.mx("a.test", (10, "mx.a.test"))
        dns.a("mx.a.test", "127.0.0.2")
        wiring = {"port": net.port, "dns": {"nameservers": [dns.address]}}
        smtp = {"max_recipients": 5, "max_message_size": 65536}
        daemon = Relay(tmp_path_factory.mktemp("fuzz"), {"delivery": wiring, "smtp": smtp})
        daemon.start()
        run = Fuzzed(daemon, sink, [])
        yield run
        # After all examples (here, not in a test of its own: pytest-xdist could run that on
        # another worker, with another daemon): each queued message is delivered or in the spool.
        for queue_id in run.queued:
            assert_not_lost(run, queue_id)
        print(f"\n{len(run.queued)} message(s) queued by the fuzzer, none lost")
        assert daemon.stop() == 0, "relay serve did not exit 0 on SIGTERM"
    finally:
        if daemon is not None:
            daemon.close()
        net.close()
        dns.close()
    assert problems(daemon.lines) == []


def problems(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    """Log lines that mean something went wrong inside the daemon."""
    return [
        line
        for line in lines
        if line.get("event") == "error"
        or line.get("level") in ("error", "critical")
        or "Traceback" in str(line.get("text", ""))
    ]


def cut(payload: bytes, cuts: list[int]) -> list[bytes]:
    """payload split at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    return [payload[a:b] for a, b in itertools.pairwise(points) if b > a]


def first_outcome(daemon: Relay, queue_id: str, since: int) -> None:
    """Wait for the first delivery attempt of a queued message to end, one way or another."""
    deadline = time.monotonic() + READ_DEADLINE
    while time.monotonic() < deadline:
        if any(
            line.get("id") == queue_id and line.get("event") in OUTCOMES
            for line in daemon.lines[since:]
        ):
            return
        time.sleep(0.01)
    raise AssertionError(f"{queue_id}: no delivery outcome within {READ_DEADLINE}s")


def assert_not_lost(fuzzed: Fuzzed, queue_id: str) -> None:
    """A queued message is in the spool (queued or dead-lettered) or was delivered. The spool
    is looked at first: a message leaves it only after the sink has it."""
    spool = fuzzed.daemon.spool
    states = [spool / "queue" / f"{queue_id}.json", spool / "dead" / f"{queue_id}.json"]
    if (spool / "msg" / queue_id).exists() and any(path.exists() for path in states):
        return
    marker = f" id {queue_id}".encode()
    assert any(marker in message.data for message in fuzzed.sink.wait_for(0)), queue_id


@pytest.mark.timeout(max(120, EXAMPLES))  # pytest-timeout counts the whole run as one test
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    session=sessions,
    cuts=st.lists(st.integers(0, 100_000), max_size=8),
    pause=st.booleans(),
)
def test_any_session_gets_well_formed_replies(
    fuzzed: Fuzzed, session: tuple[bytes, list[bytes]], cuts: list[int], pause: bool
) -> None:
    prefix, lines = session
    payload = prefix + b"".join(lines)
    mark = len(fuzzed.daemon.lines)
    conversation = RawClient(fuzzed.daemon.port, timeout=READ_DEADLINE, background=True)
    try:
        for chunk in cut(payload, cuts):
            conversation.write(chunk)
            if pause:
                time.sleep(0.002)
        conversation.finish()
    finally:
        conversation.close()
    replies = conversation.replies()
    if conversation.ended == "eof":  # after a reset, what was in flight may be lost
        assert replies and replies[0][:4] in (b"220 ", b"421 "), "no greeting"
        assert replies[-1][:3] in CLOSING_CODES, f"closed after {replies[-1]!r}"
    for reply in replies:
        if match := QUEUED.match(reply):
            queue_id = match[1].decode()
            fuzzed.queued.append(queue_id)
            first_outcome(fuzzed.daemon, queue_id, since=mark)  # its errors are this example's
            assert_not_lost(fuzzed, queue_id)
    assert fuzzed.daemon.get("/healthz")[0] == 200
    time.sleep(0.01)  # the log reader thread catches up with the last lines
    assert problems(fuzzed.daemon.lines[mark:]) == []
