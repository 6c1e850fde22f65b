"""The courier and RFC 3461: a next hop that offers DSN gets RET, ENVID, NOTIFY and ORCPT
(xtext-encoded), pipelined or one by one, and each result says the DSN went with it; one that
does not gets none of them, and the results say so (what a `relayed` notice is decided on);
and the scheduler's request is made from the spool's fields."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.delivery.courier import Courier, RecipientResult
from relay.mail.dsnparams import DsnRequest, MailParams, RcptParams
from relay.schedule.attempt import dsn_request
from relay.spool.message import Message, Recipient
from tests.support.mx import MxNet
from tests.unit.delivery.test_courier import ALICE, BOB, MESSAGE, SENDER, config, route

REQUEST = DsnRequest(
    MailParams("FULL", "id 1+2"),
    (RcptParams(("SUCCESS",), "rfc822;alice+x@example.test"), RcptParams()),
)


@pytest.fixture
def body(tmp_path: Path) -> Path:
    path = tmp_path / "body"
    path.write_bytes(MESSAGE)
    return path


def deliver(net: MxNet, host: str, body: Path, dsn: DsnRequest | None) -> list[RecipientResult]:
    async def run() -> list[RecipientResult]:
        courier = Courier(config(net))
        size = body.stat().st_size
        try:
            return await courier.deliver(
                route(host), SENDER, [ALICE, BOB], body, size=size, dsn=dsn
            )
        finally:
            await courier.close()

    return asyncio.run(run())


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_a_next_hop_with_dsn_gets_the_parameters(mx: MxNet, body: Path, pipelining: bool) -> None:
    sink = mx.sink("127.0.0.2", dsn=True, pipelining=pipelining)
    results = deliver(mx, sink.ip, body, REQUEST)
    [got] = sink.wait_for(1)
    assert got.mail_options[-2:] == ["RET=FULL", "ENVID=id+201+2B2"]
    assert got.rcpt_options == {
        ALICE: ["NOTIFY=SUCCESS", "ORCPT=rfc822;alice+2Bx@example.test"],
        BOB: [],
    }
    assert [(r.reply.code, r.dsn_relayed) for r in results] == [(250, True), (250, True)]


def test_a_next_hop_with_dsn_is_relayed_to_even_without_parameters(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2", dsn=True)
    results = deliver(mx, sink.ip, body, None)
    assert sink.wait_for(1)[0].rcpt_options == {ALICE: [], BOB: []}
    assert [r.dsn_relayed for r in results] == [True, True]


def test_a_next_hop_without_dsn_gets_none_and_the_results_say_so(mx: MxNet, body: Path) -> None:
    sink = mx.sink("127.0.0.2")  # aiosmtpd would refuse any of them with 555
    results = deliver(mx, sink.ip, body, REQUEST)
    [got] = sink.wait_for(1)
    assert not any(o.startswith(("RET=", "ENVID=")) for o in got.mail_options)
    assert [(r.reply.code, r.dsn_relayed) for r in results] == [(250, False), (250, False)]


def message(**fields: object) -> Message:
    rcpts = [Recipient(ALICE), Recipient(BOB)]
    msg = Message("0" * 20, SENDER, rcpts, 0.0, 0.0)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


def test_the_schedulers_request_is_made_from_the_spool() -> None:
    assert dsn_request(message(), message().recipients) is None
    msg = message(envid="e")
    msg.recipients[1].notify, msg.recipients[1].orcpt = ["NEVER"], "rfc822;b@x"
    assert dsn_request(msg, msg.recipients) == DsnRequest(
        MailParams(None, "e"), (RcptParams(), RcptParams(("NEVER",), "rfc822;b@x"))
    )
    assert dsn_request(msg, msg.recipients[1:]) == DsnRequest(
        MailParams(None, "e"), (RcptParams(("NEVER",), "rfc822;b@x"),)
    )
