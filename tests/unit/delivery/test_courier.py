"""Courier tests: real SMTP transactions against scriptable MX sinks on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from relay.config.delivery import DeliveryConfig, DnsConfig, MtaStsConfig, OutboundTlsConfig
from relay.config.routes import Smarthost
from relay.delivery.courier import Courier, RecipientResult
from relay.delivery.resolver import Host, Route
from relay.delivery.transaction import CHUNK_SIZE, dot_stuff
from relay.mail.reply import Verdict, classify
from relay.observe import metrics
from tests.support.dns import DnsServer
from tests.support.mx import DROP, HANG, MxNet, MxSink
from tests.support.sts import Authority, PolicyServer, policy, policy_host

SENDER = "sender@origin.test"
ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "carol@example.test"
NO_SUCH_USER = "550 5.1.1 no such user"
TRY_LATER = "451 4.3.0 try again later"

MESSAGE = (
    b"From: sender@origin.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"a line with a dot . inside\r\n"
    b"\r\n"
    b"last line\r\n"
)


def config(
    net: MxNet,
    connect_timeout: float = 2.0,
    command_timeout: float = 5.0,
    data_timeout: float = 10.0,
    **options: Any,
) -> DeliveryConfig:
    return DeliveryConfig(
        port=net.port,
        helo_name="relay.test",
        connect_timeout=connect_timeout,
        command_timeout=command_timeout,
        data_timeout=data_timeout,
        **options,
    )


def route(*hosts: MxSink | str | tuple[str, ...]) -> Route:
    """MX hosts mx1.example.test, mx2.example.test, … in the order given, each with the
    addresses of a sink, an address, or a tuple of addresses."""
    return Route(
        "example.test",
        tuple(
            Host(f"mx{n}.example.test", n * 10, _addresses(host))
            for n, host in enumerate(hosts, start=1)
        ),
    )


def _addresses(host: MxSink | str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(host, MxSink):
        return (host.ip,)
    return (host,) if isinstance(host, str) else host


def deliver(
    net: MxNet,
    to: Route,
    recipients: list[str],
    body: Path,
    *,
    sender: str = SENDER,
    smtputf8: bool = False,
    **options: Any,
) -> list[RecipientResult]:
    """One delivery by a fresh courier, which then closes its idle connections."""

    async def run() -> list[RecipientResult]:
        courier = Courier(config(net, **options))
        size = body.stat().st_size
        try:
            return await courier.deliver(to, sender, recipients, body, size=size, smtputf8=smtputf8)
        finally:
            await courier.close()

    return asyncio.run(run())


def replies(results: list[RecipientResult]) -> dict[str, str]:
    return {result.recipient: str(result.reply) for result in results}


def verdicts(results: list[RecipientResult]) -> dict[str, Verdict]:
    return {result.recipient: classify(result.reply).verdict for result in results}


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body"
    path.write_bytes(MESSAGE)
    return path


@pytest.fixture
def silent(mx: MxNet) -> Iterator[str]:
    """An address whose port accepts connections but never greets."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.9", mx.port))
        listener.listen()
        yield "127.0.0.9"


# --- delivery and the bytes on the wire ----------------------------------------------------------


def test_delivers_to_two_recipients_byte_for_byte(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")

    results = deliver(mx, route(sink), [ALICE, BOB], body)

    assert [r.recipient for r in results] == [ALICE, BOB]
    assert all(r.reply.code == 250 for r in results)
    assert {(r.mx, r.ip, r.tls) for r in results} == {("mx1.example.test", "127.0.0.2", False)}
    [message] = sink.wait_for(1)
    assert message.data == MESSAGE
    assert message.rcpt_tos == [ALICE, BOB]
    assert message.mail_from == SENDER
    assert message.helo == "relay.test"
    assert f"SIZE={len(MESSAGE)}" in message.mail_options
    assert "BODY=8BITMIME" in message.mail_options
    assert sink.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]


def assert_round_trip(mx: MxNet, tmp_path: Path, data: bytes) -> None:
    """data, stored as a body file, arrives at a sink byte for byte."""
    path = tmp_path / "body"
    path.write_bytes(data)
    sink = mx.sink("127.0.0.2")

    results = deliver(mx, route(sink), [ALICE], path)

    assert results[0].reply.code == 250
    assert sink.wait_for(1)[0].data == data


def test_dot_lines_straddling_chunk_boundaries(mx: MxNet, tmp_path: Path) -> None:
    # Line-starting dots at, around and just after each chunk boundary, so every way a
    # "CRLF ." can be split between two reads is exercised.
    offsets = {-3: b".\r\n", -2: b".\r\n", -1: b".x\r\n", 0: b"..y\r\n", 1: b".z\r\n"}
    data = _dots_at({k * CHUNK_SIZE + d: line for k, (d, line) in enumerate(offsets.items(), 1)})
    assert_round_trip(mx, tmp_path, data)


def test_multi_megabyte_body(mx: MxNet, tmp_path: Path) -> None:
    line = b"." + b"0123456789abcdef" * 60 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
    assert_round_trip(mx, tmp_path, data)


def test_body_without_final_line_break_gets_one(mx: MxNet, tmp_path: Path) -> None:
    path = tmp_path / "body"
    path.write_bytes(b"Subject: x\r\n\r\nno line break at the end")
    sink = mx.sink("127.0.0.2")

    deliver(mx, route(sink), [ALICE], path)

    assert sink.wait_for(1)[0].data == b"Subject: x\r\n\r\nno line break at the end\r\n"


@pytest.mark.parametrize(
    ("tail", "chunk", "wire"),
    [
        (b"\r\n", b".a\r\n", b"..a\r\n"),
        (b"x\r", b"\n.a", b"\n..a"),
        (b"\r\n", b"a\r\n.\r\n", b"a\r\n..\r\n"),
        (b"ab", b".a\r\n", b".a\r\n"),
        (b"\n.", b".\r\n", b".\r\n"),
    ],
)
def test_dot_stuff(tail: bytes, chunk: bytes, wire: bytes) -> None:
    assert dot_stuff(tail, chunk) == wire


def test_null_sender(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")

    results = deliver(mx, route(sink), [ALICE], body, sender="")

    assert results[0].reply.code == 250
    assert sink.wait_for(1)[0].mail_from == ""


def test_helo_when_ehlo_is_refused(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", esmtp=False)

    results = deliver(mx, route(sink), [ALICE], body)

    assert results[0].reply.code == 250
    [message] = sink.wait_for(1)
    assert message.helo == "relay.test"
    assert message.mail_options == []  # no extensions without EHLO
    assert sink.commands[:2] == ["EHLO", "HELO"]


# --- refusals ------------------------------------------------------------------------------------


def test_partial_refusal_delivers_to_the_rest(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")
    sink.script_rcpt(BOB, NO_SUCH_USER)

    results = deliver(mx, route(sink), [ALICE, BOB], body)

    assert verdicts(results) == {ALICE: Verdict.DELIVERED, BOB: Verdict.PERMANENT}
    assert replies(results)[BOB] == NO_SUCH_USER
    assert results[1].reply.enhanced == "5.1.1"
    assert sink.wait_for(1)[0].rcpt_tos == [ALICE]


@pytest.mark.parametrize("pipelining", [False, True])
def test_all_refused_sends_no_data(mx: MxNet, body: Path, pipelining: bool) -> None:
    sink = mx.sink("127.0.0.2", pipelining=pipelining)
    sink.script_rcpt(ALICE, NO_SUCH_USER)
    sink.script_rcpt(BOB, "450 4.2.1 mailbox busy")
    secondary = mx.sink("127.0.0.3")

    results = deliver(mx, route(sink, secondary), [ALICE, BOB], body)

    assert replies(results) == {ALICE: NO_SUCH_USER, BOB: "450 4.2.1 mailbox busy"}
    # One by one, DATA is never sent; pipelined (RFC 2920) it goes out with the RCPTs, and the
    # server refuses it: either way, no message.
    assert ("DATA" in sink.commands) is pipelining
    assert sink.received == []
    assert sink.commands[-1] == "QUIT"
    assert secondary.connections == 0


def test_mail_550_is_permanent_for_all_and_secondary_is_not_tried(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_mail("550 5.7.1 sender rejected")

    results = deliver(mx, route(primary, secondary), [ALICE, BOB], body)

    assert verdicts(results) == {ALICE: Verdict.PERMANENT, BOB: Verdict.PERMANENT}
    assert {r.reply.enhanced for r in results} == {"5.7.1"}
    assert {r.mx for r in results} == {"mx1.example.test"}
    assert secondary.connections == 0


def test_data_451_is_temporary_for_every_accepted_recipient(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_rcpt(CAROL, NO_SUCH_USER)
    primary.script_data(TRY_LATER)

    results = deliver(mx, route(primary, secondary), [ALICE, BOB, CAROL], body)

    assert replies(results) == {ALICE: TRY_LATER, BOB: TRY_LATER, CAROL: NO_SUCH_USER}
    assert verdicts(results)[ALICE] is Verdict.TEMPORARY
    assert primary.received == []
    assert secondary.connections == 0


def test_smtputf8_message_to_server_without_it_is_permanent(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3", smtputf8=True)

    results = deliver(mx, route(primary, secondary), [ALICE], body, smtputf8=True)

    assert (results[0].reply.code, results[0].reply.enhanced) == (553, "5.6.7")
    assert "MAIL" not in primary.commands
    assert secondary.connections == 0


def test_smtputf8_message_to_server_with_it(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", smtputf8=True)

    results = deliver(mx, route(sink), ["jörg@example.test"], body, smtputf8=True)

    assert results[0].reply.code == 250
    [message] = sink.wait_for(1)
    assert message.rcpt_tos == ["jörg@example.test"]
    assert "SMTPUTF8" in message.mail_options


# --- moving on to the next address or host -------------------------------------------------------


def test_primary_down_secondary_delivers(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.stop()

    results = deliver(mx, route(primary, secondary), [ALICE, BOB], body)

    assert all(r.reply.code == 250 for r in results)
    assert {(r.mx, r.ip) for r in results} == {("mx2.example.test", "127.0.0.3")}
    assert secondary.wait_for(1)[0].rcpt_tos == [ALICE, BOB]


def test_addresses_of_a_host_are_tried_in_order(mx: MxNet, body: Path) -> None:
    mx.sink("127.0.0.3")  # nothing listens on 127.0.0.2

    results = deliver(mx, route(("127.0.0.2", "127.0.0.3")), [ALICE], body)

    assert (results[0].reply.code, results[0].ip) == (250, "127.0.0.3")


def test_host_back_up_is_used_again(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")
    sink.stop()
    assert deliver(mx, route(sink), [ALICE], body)[0].reply.code is None

    sink.start()

    assert deliver(mx, route(sink), [ALICE], body)[0].reply.code == 250


def test_silent_host_times_out_then_next_delivers(mx: MxNet, body: Path, silent: str) -> None:
    sink = mx.sink("127.0.0.2")

    results = deliver(mx, route(silent, sink), [ALICE], body, connect_timeout=0.5)

    assert (results[0].reply.code, results[0].mx) == (250, "mx2.example.test")


def test_mail_451_on_primary_secondary_delivers(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_mail(TRY_LATER)

    results = deliver(mx, route(primary, secondary), [ALICE], body)

    assert (results[0].reply.code, results[0].mx) == (250, "mx2.example.test")
    assert primary.connections == 1
    assert primary.received == []


@pytest.mark.parametrize("reply", ["421 4.3.2 shutting down", DROP])
def test_rcpt_421_or_drop_moves_on_to_secondary(mx: MxNet, body: Path, reply: str) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_rcpt(BOB, reply)

    results = deliver(mx, route(primary, secondary), [ALICE, BOB], body)

    assert all(r.reply.code == 250 and r.mx == "mx2.example.test" for r in results)
    assert primary.received == []
    assert secondary.wait_for(1)[0].rcpt_tos == [ALICE, BOB]


def test_all_hosts_down_is_temporary_without_code(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.stop()
    secondary.stop()

    results = deliver(mx, route(primary, secondary), [ALICE, BOB], body)

    assert [r.reply.code for r in results] == [None, None]
    assert verdicts(results) == {ALICE: Verdict.TEMPORARY, BOB: Verdict.TEMPORARY}
    assert {(r.mx, r.ip) for r in results} == {("mx2.example.test", "127.0.0.3")}
    assert "127.0.0.3" in results[0].reply.text


def test_all_hosts_temporary_reports_the_last_reply(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_mail(TRY_LATER)
    secondary.script_mail("452 4.3.1 insufficient system storage")

    results = deliver(mx, route(primary, secondary), [ALICE], body)

    assert replies(results) == {ALICE: "452 4.3.1 insufficient system storage"}
    assert results[0].mx == "mx2.example.test"


def test_connection_lost_after_end_of_data(mx: MxNet, body: Path) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")
    primary.script_data(DROP)

    results = deliver(mx, route(primary, secondary), [ALICE], body)

    assert results[0].reply.code is None
    assert results[0].reply.text.startswith("connection lost after end of data")
    assert results[0].mx == "mx1.example.test"
    assert secondary.connections == 0  # the message may have arrived: never send it twice


def test_final_reply_waits_data_timeout_not_command_timeout(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")
    sink.script_data(HANG)
    started = time.monotonic()

    results = deliver(mx, route(sink), [ALICE], body, command_timeout=60, data_timeout=0.5)

    assert time.monotonic() - started < 30
    assert results[0].reply.code is None
    assert results[0].reply.text.startswith("connection lost after end of data")


# --- TLS -----------------------------------------------------------------------------------------


def test_starttls_when_offered(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", tls=True)

    results = deliver(mx, route(sink), [ALICE], body)

    assert (results[0].reply.code, results[0].tls) == (250, True)
    [message] = sink.wait_for(1)
    assert message.tls
    assert message.data == MESSAGE
    assert sink.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]


def test_broken_tls_falls_back_to_plain_text(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", broken_tls=True)

    results = deliver(mx, route(sink), [ALICE], body)

    assert (results[0].reply.code, results[0].tls) == (250, False)
    assert not sink.wait_for(1)[0].tls
    assert sink.connections == 2
    assert sink.commands.count("STARTTLS") == 1


def tls_counts() -> dict[str, float]:
    return {
        result: REGISTRY.get_sample_value("relay_delivery_tls_total", {"result": result}) or 0.0
        for result in metrics.TLS_RESULTS
    }


def counted(before: dict[str, float]) -> dict[str, float]:
    """The TLS outcomes counted since before, by result."""
    now = tls_counts()
    return {result: now[result] - before[result] for result in now if now[result] != before[result]}


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path)


def tls(default: str = "opportunistic", **options: Any) -> OutboundTlsConfig:
    return OutboundTlsConfig(default=default, **options)


@pytest.mark.parametrize(
    ("options", "outcome", "connections"),
    [
        ({}, "plaintext", 1),
        ({"tls": True}, "encrypted", 1),
        ({"broken_tls": True}, "plaintext", 2),  # the failed handshake is not counted
    ],
)
def test_opportunistic_counts_each_session_once(
    mx: MxNet, body: Path, options: dict[str, bool], outcome: str, connections: int
) -> None:
    sink = mx.sink("127.0.0.2", **options)
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE], body)

    assert results[0].reply.code == 250
    assert not results[0].tls_verified
    assert counted(before) == {outcome: 1}
    assert sink.connections == connections


def test_required_without_starttls_is_temporary_and_sends_nothing(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE, BOB], body, tls=tls("required"))

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY, BOB: Verdict.TEMPORARY}
    assert {str(r.reply) for r in results} == {
        "4.7.4 TLS is required, but was not offered by mx1.example.test[127.0.0.2]"
    }
    assert {(r.mx, r.ip, r.tls) for r in results} == {("mx1.example.test", "127.0.0.2", False)}
    assert sink.commands == ["EHLO", "QUIT"]
    assert counted(before) == {"failed": 1}


def test_required_with_broken_tls_never_falls_back_to_plain_text(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", broken_tls=True)
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE], body, tls=tls("required"))

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY}
    assert results[0].reply.enhanced == "4.7.5"
    assert results[0].reply.text.startswith("TLS handshake with mx1.example.test[127.0.0.2] failed")
    assert "MAIL" not in sink.commands
    assert sink.connections == 1
    assert counted(before) == {"failed": 1}


def test_required_with_tls_delivers(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", tls=True)
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE], body, tls=tls("required"))

    assert (results[0].reply.code, results[0].tls, results[0].tls_verified) == (250, True, False)
    assert sink.wait_for(1)[0].tls
    assert counted(before) == {"encrypted": 1}


def test_required_moves_on_to_the_next_mx(mx: MxNet, body: Path) -> None:
    plain, secure = mx.sink("127.0.0.2"), mx.sink("127.0.0.3", tls=True)
    before = tls_counts()

    results = deliver(mx, route(plain, secure), [ALICE], body, tls=tls("required"))

    assert (results[0].reply.code, results[0].mx, results[0].tls) == (250, "mx2.example.test", True)
    assert "MAIL" not in plain.commands
    assert counted(before) == {"failed": 1, "encrypted": 1}


def test_verify_with_a_certificate_for_the_mx_name(
    mx: MxNet, body: Path, authority: Authority
) -> None:
    sink = mx.sink("127.0.0.2", tls_context=authority.server_tls("mx1.example.test"))
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE], body, tls=tls("verify", ca_file=authority.file))

    assert (results[0].reply.code, results[0].tls, results[0].tls_verified) == (250, True, True)
    assert sink.wait_for(1)[0].data == MESSAGE
    assert counted(before) == {"verified": 1}


@pytest.mark.parametrize("problem", ["other name", "unknown CA"])
def test_verify_failure_is_temporary_and_sends_nothing(
    mx: MxNet, body: Path, authority: Authority, tmp_path: Path, problem: str
) -> None:
    if problem == "other name":
        context = authority.server_tls("mx.test", "*.example.org")
    else:
        (tmp_path / "stranger").mkdir()
        context = Authority.create(tmp_path / "stranger").server_tls("mx1.example.test")
    sink = mx.sink("127.0.0.2", tls_context=context)
    before = tls_counts()

    results = deliver(mx, route(sink), [ALICE], body, tls=tls("verify", ca_file=authority.file))

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY}
    assert results[0].reply.enhanced == "4.7.5"
    assert results[0].reply.text.startswith(
        "certificate of mx1.example.test[127.0.0.2] not verified: "
    )
    assert "MAIL" not in sink.commands
    assert counted(before) == {"failed": 1}


@pytest.mark.parametrize(
    ("policies", "delivered"),
    [
        ((("example.test", "required"),), False),
        (((".test", "required"),), False),
        (((".test", "required"), ("example.test", "opportunistic")), True),
        (((".other.test", "required"),), True),
    ],
)
def test_configured_mode_for_the_recipient_domain(
    mx: MxNet, body: Path, policies: tuple[tuple[str, str], ...], delivered: bool
) -> None:
    sink = mx.sink("127.0.0.2")

    results = deliver(mx, route(sink), [ALICE], body, tls=tls(policies=policies))

    assert (results[0].reply.code == 250) is delivered
    assert ("MAIL" in sink.commands) is delivered


# --- MTA-STS -------------------------------------------------------------------------------------

STS_IP = "127.0.0.20"


@pytest.fixture
def sts(dns_server: DnsServer, authority: Authority) -> Iterator[PolicyServer]:
    with policy_host(dns_server, authority, "example.test", STS_IP) as server:
        yield server


def sts_config(
    mx: MxNet, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> DeliveryConfig:
    return config(
        mx,
        dns=DnsConfig(nameservers=((dns_server.host, dns_server.port),), timeout=2.0),
        tls=tls(ca_file=authority.file),
        mta_sts=MtaStsConfig(enabled=True, port=sts.port, fetch_timeout=5.0),
    )


def send(cfg: DeliveryConfig, to: Route, body: Path, times: int = 1) -> list[RecipientResult]:
    """Deliver to ALICE times over with one courier (one MTA-STS cache); the last results."""

    async def run() -> list[RecipientResult]:
        courier = Courier(cfg)
        for _ in range(times):
            results = await courier.deliver(to, SENDER, [ALICE], body, size=10)
        await courier.close()
        return results

    return asyncio.run(run())


def test_mta_sts_enforce_delivers_to_a_listed_mx_with_a_valid_certificate(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("enforce", "*.example.test"))
    sink = mx.sink("127.0.0.2", tls_context=authority.server_tls("mx1.example.test"))
    before = tls_counts()

    results = send(sts_config(mx, dns_server, authority, sts), route(sink), body, times=2)

    assert (results[0].reply.code, results[0].tls_verified) == (250, True)
    assert len(sink.wait_for(2)) == 2
    assert sts.count == 1  # the second delivery used the cached policy
    assert counted(before) == {"verified": 1}  # and the verified session, once more
    assert sink.connections == 1


def test_mta_sts_enforce_skips_unlisted_mx_hosts(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("enforce", "mx2.example.test"))
    unlisted = mx.sink("127.0.0.2", tls_context=authority.server_tls("mx1.example.test"))
    listed = mx.sink("127.0.0.3", tls_context=authority.server_tls("mx2.example.test"))

    results = send(sts_config(mx, dns_server, authority, sts), route(unlisted, listed), body)

    assert (results[0].reply.code, results[0].mx, results[0].tls_verified) == (
        250,
        "mx2.example.test",
        True,
    )
    assert unlisted.connections == 0


def test_mta_sts_enforce_without_any_listed_mx_is_temporary(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("enforce", "mx9.example.test", "*.mx.example.test"))
    primary, secondary = mx.sink("127.0.0.2", tls=True), mx.sink("127.0.0.3", tls=True)

    results = send(sts_config(mx, dns_server, authority, sts), route(primary, secondary), body)

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY}
    assert str(results[0].reply) == (
        "4.7.5 no MX host of example.test is listed in its MTA-STS policy "
        "(mx9.example.test, *.mx.example.test)"
    )
    assert (results[0].mx, results[0].ip) == (None, None)
    assert primary.connections == secondary.connections == 0


def test_mta_sts_enforce_refuses_an_unverified_certificate(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("enforce", "mx1.example.test"))
    sink = mx.sink("127.0.0.2", tls=True)  # a certificate for mx.test from an unknown CA

    results = send(sts_config(mx, dns_server, authority, sts), route(sink), body)

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY}
    assert results[0].reply.enhanced == "4.7.5"
    assert "MAIL" not in sink.commands


def test_mta_sts_testing_delivers_despite_failures_and_reports_them(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("testing", "mx9.example.test"))
    sink = mx.sink("127.0.0.2", tls=True)  # not listed, and its certificate does not verify
    before = tls_counts()

    results = send(sts_config(mx, dns_server, authority, sts), route(sink), body)

    assert (results[0].reply.code, results[0].tls, results[0].tls_verified) == (250, True, False)
    report = results[0].tls_report or ""
    assert "mx1.example.test is not an MX host the policy lists" in report
    assert "certificate of mx1.example.test[127.0.0.2] not verified" in report
    assert sink.commands.count("MAIL") == 1
    assert counted(before) == {"encrypted": 1}


def test_mta_sts_testing_without_failures_reports_nothing(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve(policy("testing", "mx1.example.test"))
    sink = mx.sink("127.0.0.2", tls_context=authority.server_tls("mx1.example.test"))

    results = send(sts_config(mx, dns_server, authority, sts), route(sink), body)

    assert (results[0].reply.code, results[0].tls_verified, results[0].tls_report) == (
        250,
        True,
        None,
    )
    assert sink.connections == 1


def test_mta_sts_fetch_failure_without_cache_delivers_as_opportunistic(
    mx: MxNet, body: Path, dns_server: DnsServer, authority: Authority, sts: PolicyServer
) -> None:
    sts.serve("", status=404)
    sink = mx.sink("127.0.0.2")  # no STARTTLS at all

    results = send(sts_config(mx, dns_server, authority, sts), route(sink), body)

    assert (results[0].reply.code, results[0].tls) == (250, False)
    assert sts.count == 1


def _dots_at(lines: dict[int, bytes]) -> bytes:
    """A body with each given line starting exactly at its offset, and short filler between."""
    data = b"Subject: dots\r\n\r\n"
    for offset, line in sorted(lines.items()):
        data += _filler(offset - len(data)) + line
    return data + b"end\r\n"


def _filler(size: int) -> bytes:
    """size bytes of lines of at most 80 bytes, each ending in CRLF (size >= 2)."""
    lines = []
    while size:
        length = min(size, 80)
        if size - length == 1:  # one byte left over could not make a line of its own
            length -= 1
        lines.append(b"f" * (length - 2) + b"\r\n")
        size -= length
    return b"".join(lines)


def test_session_refused_with_5xx_everywhere_is_deferred_not_bounced(mx: MxNet, body: Path) -> None:
    """A 554 greeting (like Postfix's smtp_skip_5xx_greeting) moves on and, if every host says
    so, is retried later: refusing a session says nothing about the recipient."""

    async def run() -> list[RecipientResult]:
        closed = asyncio.Event()

        async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"554 5.7.1 no SMTP service here\r\n")
            await reader.read()  # until the client hangs up
            writer.close()
            await writer.wait_closed()
            closed.set()

        server = await asyncio.start_server(refuse, "127.0.0.5", mx.port)
        async with server:
            courier = Courier(config(mx))
            results = await courier.deliver(route("127.0.0.5"), SENDER, [ALICE], body, size=10)
            await courier.close()
            await asyncio.wait_for(closed.wait(), 5)
        return results

    [result] = asyncio.run(run())
    assert classify(result.reply).verdict is Verdict.TEMPORARY
    assert "refused to talk to me: 554 5.7.1 no SMTP service here" in result.reply.text
    assert result.mx == "mx1.example.test"


# --- smarthosts: their own port, TLS and AUTH --------------------------------------------------

USERS = {"app": "secret", "other": "word"}


def smarthost(
    sink: MxSink | str, tls: str = "none", *, user: str | None = None, **options: Any
) -> Host:
    """A host of a smarthost route: the sink's address on the MX port, with its own settings."""
    ip = sink.ip if isinstance(sink, MxSink) else sink
    port = sink.port if isinstance(sink, MxSink) else options.pop("port")
    login = {} if user is None else {"username": user, "password": USERS.get(user, "wrong")}
    options.setdefault("verify", False)
    return Host(options.pop("name", ip), 0, (ip,), Smarthost(ip, port, tls, **login, **options))


def via(*hosts: Host) -> Route:
    return Route("example.test", hosts)


def closed_port(net: MxNet) -> DeliveryConfig:
    """delivery.port set to a port nothing listens on: only a smarthost's own port works."""
    return dataclasses.replace(config(net), port=1)


def run_deliver(cfg: DeliveryConfig, to: Route, body: Path) -> list[RecipientResult]:
    async def run() -> list[RecipientResult]:
        courier = Courier(cfg)
        try:
            return await courier.deliver(to, SENDER, [ALICE], body, size=10)
        finally:
            await courier.close()

    return asyncio.run(run())


def test_smarthost_auth_in_plain_text_when_its_tls_is_none(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", auth=USERS, auth_require_tls=False)

    [result] = run_deliver(closed_port(mx), via(smarthost(sink, user="app")), body)

    assert (result.reply.code, result.mx, result.tls) == (250, "127.0.0.2", False)
    assert sink.wait_for(1)[0].user == "app"
    assert sink.commands[:3] == ["EHLO", "AUTH", "MAIL"]


def test_smarthost_starttls_verified_then_auth(mx: MxNet, body: Path, authority: Authority) -> None:
    context = authority.server_tls("smart.example.test")
    sink = mx.sink("127.0.0.2", tls_context=context, auth=USERS)
    host = smarthost(sink, "starttls", user="app", verify=True, name="smart.example.test")
    cfg = dataclasses.replace(config(mx), tls=tls("opportunistic", ca_file=authority.file))
    before = tls_counts()

    [result] = run_deliver(cfg, via(host), body)

    assert (result.reply.code, result.tls, result.tls_verified) == (250, True, True)
    [message] = sink.wait_for(1)
    assert (message.user, message.tls) == ("app", True)
    assert sink.commands[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert counted(before) == {"verified": 1}


def test_smarthost_starttls_never_sends_credentials_in_clear(mx: MxNet, body: Path) -> None:
    plain = mx.sink("127.0.0.2", auth=USERS, auth_require_tls=False)  # no STARTTLS
    backup = mx.sink("127.0.0.3", tls=True, auth=USERS)

    [result] = run_deliver(
        config(mx),
        via(smarthost(plain, "starttls", user="app"), smarthost(backup, "starttls", user="app")),
        body,
    )

    assert (result.reply.code, result.mx, result.tls) == (250, "127.0.0.3", True)
    assert plain.commands == ["EHLO", "QUIT"]
    assert backup.wait_for(1)[0].user == "app"


def test_smarthost_smtps_implicit_tls_with_auth(
    mx: MxNet, body: Path, authority: Authority
) -> None:
    context = authority.server_tls("127.0.0.2")
    sink = mx.sink("127.0.0.2", smtps=context, auth=USERS)
    cfg = dataclasses.replace(closed_port(mx), tls=tls(ca_file=authority.file))

    [result] = run_deliver(cfg, via(smarthost(sink, "smtps", user="app", verify=True)), body)

    assert (result.reply.code, result.tls, result.tls_verified) == (250, True, True)
    assert sink.wait_for(1)[0].user == "app"
    assert sink.commands[:3] == ["EHLO", "AUTH", "MAIL"]


def test_smarthost_smtps_with_a_certificate_for_another_name_fails_over(
    mx: MxNet, body: Path, authority: Authority
) -> None:
    wrong = mx.sink("127.0.0.2", smtps=authority.server_tls("someone.else.test"))
    right = mx.sink("127.0.0.3", smtps=authority.server_tls("127.0.0.3"))
    cfg = dataclasses.replace(config(mx), tls=tls(ca_file=authority.file))
    before = tls_counts()

    [result] = run_deliver(
        cfg,
        via(smarthost(wrong, "smtps", verify=True), smarthost(right, "smtps", verify=True)),
        body,
    )

    assert (result.reply.code, result.mx, result.tls_verified) == (250, "127.0.0.3", True)
    assert wrong.commands == []
    assert counted(before) == {"failed": 1, "verified": 1}


def test_smarthost_smtps_verify_failure_everywhere_is_temporary(
    mx: MxNet, body: Path, authority: Authority
) -> None:
    sink = mx.sink("127.0.0.2", smtps=authority.server_tls("someone.else.test"))
    cfg = dataclasses.replace(config(mx), tls=tls(ca_file=authority.file))

    [result] = run_deliver(cfg, via(smarthost(sink, "smtps", verify=True)), body)

    assert verdicts([result]) == {ALICE: Verdict.TEMPORARY}
    assert result.reply.enhanced == "4.7.5"
    assert result.reply.text.startswith("certificate of 127.0.0.2[127.0.0.2] not verified")


def test_smarthost_wrong_password_fails_over_to_the_next(mx: MxNet, body: Path) -> None:
    first = mx.sink("127.0.0.2", auth=USERS, auth_require_tls=False)
    second = mx.sink("127.0.0.3", auth=USERS, auth_require_tls=False)

    [result] = run_deliver(
        config(mx), via(smarthost(first, user="nobody"), smarthost(second, user="other")), body
    )

    assert (result.reply.code, result.mx) == (250, "127.0.0.3")
    assert first.received == [] and "MAIL" not in first.commands
    assert second.wait_for(1)[0].user == "other"


def test_smarthost_auth_refused_everywhere_is_deferred_never_bounced(mx: MxNet, body: Path) -> None:
    first = mx.sink("127.0.0.2", auth=USERS, auth_require_tls=False)
    second = mx.sink("127.0.0.3")  # offers no AUTH at all

    results = run_deliver(
        config(mx), via(smarthost(first, user="nobody"), smarthost(second, user="app")), body
    )

    assert verdicts(results) == {ALICE: Verdict.TEMPORARY}
    assert results[0].reply.enhanced == "4.7.0"
    assert results[0].reply.text.startswith("authentication at 127.0.0.3[127.0.0.3] failed")
    assert "MAIL" not in first.commands + second.commands


def test_smarthost_down_fails_over_and_mta_sts_and_tls_policies_do_not_apply(
    mx: MxNet, body: Path
) -> None:
    down, up = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")  # no STARTTLS anywhere
    down.stop()
    cfg = dataclasses.replace(config(mx), tls=tls("verify"))

    [result] = run_deliver(cfg, via(smarthost(down), smarthost(up)), body)

    assert (result.reply.code, result.mx, result.tls) == (250, "127.0.0.3", False)


def test_smarthost_sessions_are_reused_only_with_the_same_credentials(
    mx: MxNet, body: Path
) -> None:
    sink = mx.sink("127.0.0.2", auth=USERS, auth_require_tls=False)

    async def run() -> None:
        courier = Courier(config(mx))
        for user in ("app", "other", "app", "other"):
            to = via(smarthost(sink, user=user))
            await courier.deliver(to, SENDER, [ALICE], body, size=10, destination="smart")
        await courier.close()

    asyncio.run(run())
    assert [m.user for m in sink.wait_for(4)] == ["app", "other", "app", "other"]
    assert sink.connections == 2
    assert sink.commands.count("AUTH") == 2
