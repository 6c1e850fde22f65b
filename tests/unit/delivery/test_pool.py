"""Connection reuse: idle sessions pooled by the courier, against real MX sinks on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY

from relay.config.delivery import ReuseConfig
from relay.delivery.courier import Courier, RecipientResult
from relay.delivery.resolver import Host, Route
from tests.support.mx import DROP, MxNet
from tests.unit.delivery.test_courier import ALICE, SENDER, config, route, tls

T = TypeVar("T")
Scenario = Callable[[Courier], Awaitable[T]]


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    path = tmp_path / "mail"
    path.write_bytes(b"Subject: reuse\r\n\r\nhello\r\n")
    return path


def run(net: MxNet, scenario: Scenario[T], **options: Any) -> T:
    """Run scenario with one courier, whose idle sessions are closed at the end."""

    async def main() -> T:
        courier = Courier(config(net, **options))
        try:
            return await scenario(courier)
        finally:
            await courier.close()

    return asyncio.run(main())


def send(
    courier: Courier, to: Route, mail: Path, **options: Any
) -> Awaitable[list[RecipientResult]]:
    return courier.deliver(to, SENDER, [ALICE], mail, size=mail.stat().st_size, **options)


def send_times(mail: Path, times: int, to: Route, **options: Any) -> Scenario[list[int | None]]:
    """A scenario: deliver times over, one after the other; the codes of the replies."""

    async def scenario(courier: Courier) -> list[int | None]:
        return [(await send(courier, to, mail, **options))[0].reply.code for _ in range(times)]

    return scenario


def connection_counts() -> dict[str, float]:
    return {
        kind: REGISTRY.get_sample_value("relay_delivery_connections_total", {"kind": kind}) or 0.0
        for kind in ("opened", "reused")
    }


def reuse(max_messages: int = 100, idle_timeout: float = 5.0) -> ReuseConfig:
    return ReuseConfig(max_messages=max_messages, idle_timeout=idle_timeout)


@pytest.mark.parametrize("pipelining", [True, False])
def test_one_connection_carries_several_messages_with_rset_between(
    mx: MxNet, mail: Path, pipelining: bool
) -> None:
    sink = mx.sink("127.0.0.2", pipelining=pipelining)
    before = connection_counts()

    codes = run(mx, send_times(mail, 4, route(sink)))

    assert codes == [250] * 4
    assert len(sink.wait_for(4)) == 4
    assert sink.connections == 1 < 4
    transaction = ["MAIL", "RCPT", "DATA"]
    assert sink.commands == ["EHLO", *transaction] + ["RSET", *transaction] * 3 + ["QUIT"]
    # Pipelined (RFC 2920), every command up to DATA arrived with the next ones behind it.
    ahead = ["MAIL", "RCPT"] + ["RSET", "MAIL", "RCPT"] * 3
    assert sink.pipelined == (ahead if pipelining else [])
    now = connection_counts()
    assert (now["opened"] - before["opened"], now["reused"] - before["reused"]) == (1, 3)


def test_max_messages_caps_a_connection(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")

    codes = run(mx, send_times(mail, 5, route(sink)), reuse=reuse(max_messages=2))

    assert codes == [250] * 5
    assert sink.connections == 3  # 2 + 2 + 1
    assert sink.commands.count("QUIT") == 3
    assert sink.commands.count("RSET") == 2


def test_max_messages_one_means_a_connection_per_message(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")

    run(mx, send_times(mail, 3, route(sink)), reuse=reuse(max_messages=1))

    assert sink.connections == 3
    assert "RSET" not in sink.commands


def test_sweep_closes_sessions_idle_past_the_timeout(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")

    async def scenario(courier: Courier) -> list[int]:
        await send(courier, route(sink), mail)
        await courier.sweep()  # not idle long enough yet
        kept = courier.idle("example.test")
        await asyncio.sleep(0.3)
        await courier.sweep()
        return [kept, courier.idle("example.test")]

    assert run(mx, scenario, reuse=reuse(idle_timeout=0.2)) == [1, 0]
    assert sink.commands[-1] == "QUIT"
    sink.wait_open(0)


def test_close_quits_every_idle_session(mx: MxNet, mail: Path) -> None:
    one, two = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")

    async def scenario(courier: Courier) -> list[int]:
        await send(courier, route(one), mail, destination="one")
        await send(courier, route(two), mail, destination="two")
        idle = [courier.idle("one"), courier.idle("two")]
        await courier.close()
        return [*idle, courier.idle("one"), courier.idle("two")]

    assert run(mx, scenario) == [1, 1, 0, 0]
    for sink in (one, two):
        assert sink.commands[-1] == "QUIT"
        sink.wait_open(0)


def test_a_session_the_server_closed_is_replaced_silently(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")
    before = connection_counts()

    async def scenario(courier: Courier) -> list[RecipientResult]:
        await send(courier, route(sink), mail)
        sink.disconnect()  # the server's idle timeout
        await asyncio.to_thread(sink.wait_open, 0)
        return await send(courier, route(sink), mail)

    [result] = run(mx, scenario)

    assert (result.reply.code, result.mx, result.ip) == (250, "mx1.example.test", "127.0.0.2")
    assert len(sink.wait_for(2)) == 2
    assert sink.connections == 2
    now = connection_counts()
    assert (now["opened"] - before["opened"], now["reused"] - before["reused"]) == (2, 0)


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("rset", ["451 4.3.0 not now", "421 4.3.2 closing", DROP])
def test_a_session_that_fails_rset_is_dropped_not_counted_as_a_try(
    mx: MxNet, mail: Path, rset: str, pipelining: bool
) -> None:
    primary = mx.sink("127.0.0.2", pipelining=pipelining)
    secondary = mx.sink("127.0.0.3")
    primary.script_rset(rset, "250 2.0.0 OK")
    before = connection_counts()

    codes = run(mx, send_times(mail, 3, route(primary, secondary)))

    assert codes == [250] * 3
    assert len(primary.wait_for(3)) == 3  # the primary was tried anew, not given up on
    assert primary.connections == 2
    assert secondary.connections == 0
    now = connection_counts()  # the session that failed RSET carried nothing: not counted
    assert (now["opened"] - before["opened"], now["reused"] - before["reused"]) == (2, 1)


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_refused_sender_leaves_a_reusable_session(
    mx: MxNet, mail: Path, pipelining: bool
) -> None:
    sink = mx.sink("127.0.0.2", pipelining=pipelining)
    sink.script_mail("550 5.7.1 sender rejected", "250 2.1.0 ok")

    codes = run(mx, send_times(mail, 2, route(sink)))

    assert codes == [550, 250]
    assert len(sink.wait_for(1)) == 1
    assert sink.connections == 1


def test_pipelined_replies_arriving_piecemeal_are_all_read(mx: MxNet, mail: Path) -> None:
    """The server answers each of 200 pipelined RCPTs in its own write: every reply is read,
    none lost between two reads (aiosmtplib alone drops what arrives in between)."""
    sink = mx.sink("127.0.0.2")
    recipients = [f"user{n}@example.test" for n in range(200)]
    for refused in recipients[1::2]:
        sink.script_rcpt(refused, "550 5.1.1 no such user")

    async def scenario(courier: Courier) -> list[RecipientResult]:
        size = mail.stat().st_size
        return await courier.deliver(route(sink), SENDER, recipients, mail, size=size)

    results = run(mx, scenario)

    assert [r.reply.code for r in results] == [250, 550] * 100
    assert sink.wait_for(1)[0].rcpt_tos == recipients[::2]
    assert "RCPT" in sink.pipelined


def test_a_421_after_data_is_not_pooled(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")
    sink.script_data("421 4.3.2 closing after this one")

    async def scenario(courier: Courier) -> int:
        await send(courier, route(sink), mail)
        return courier.idle("example.test")

    assert run(mx, scenario) == 0
    assert sink.commands[-1] == "QUIT"


def test_a_refused_recipient_leaves_a_reusable_session(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")
    sink.script_rcpt(ALICE, "550 5.1.1 no such user", "250 2.1.5 ok")

    codes = run(mx, send_times(mail, 2, route(sink)))

    assert codes == [550, 250]
    assert sink.connections == 1


def test_destinations_do_not_share_sessions(mx: MxNet, mail: Path) -> None:
    sink = mx.sink("127.0.0.2")

    async def scenario(courier: Courier) -> None:
        for destination in ("one", "two", "one", "two"):
            await send(courier, route(sink), mail, destination=destination)

    run(mx, scenario)
    assert sink.connections == 2
    assert len(sink.wait_for(4)) == 4


def test_an_idle_session_to_a_later_mx_is_preferred_to_a_new_connection(
    mx: MxNet, mail: Path
) -> None:
    primary, secondary = mx.sink("127.0.0.2"), mx.sink("127.0.0.3")

    async def scenario(courier: Courier) -> list[str | None]:
        first = await send(
            courier, Route("example.test", route(primary, secondary).hosts[1:]), mail
        )
        second = await send(courier, route(primary, secondary), mail)
        return [first[0].mx, second[0].mx]

    assert run(mx, scenario) == ["mx2.example.test", "mx2.example.test"]
    assert primary.connections == 0
    assert secondary.connections == 1


@pytest.mark.parametrize(("idle_room", "most"), [(1, 2), (None, 3)])
def test_idle_room_closes_idle_sessions_before_opening(
    mx: MxNet, mail: Path, idle_room: int | None, most: int
) -> None:
    """A destination limited to 2 connections: two deliveries at once leave two idle sessions;
    a third delivery that cannot use them (another MX name for the same address) closes the
    oldest first when told that only one may stay idle, so the host never sees three."""
    sink = mx.sink("127.0.0.2")
    other_name = Route("example.test", (Host("mx9.example.test", 10, ("127.0.0.2",)),))

    async def scenario(courier: Courier) -> int:
        await asyncio.gather(*(send(courier, route(sink), mail, idle_room=0) for _ in range(2)))
        assert courier.idle("example.test") == 2
        await send(courier, other_name, mail, idle_room=idle_room)
        return courier.idle("example.test")

    idle = run(mx, scenario)

    assert len(sink.wait_for(3)) == 3
    assert sink.connections == 3
    assert sink.max_open == most
    assert idle == most  # the evicted session is not counted any more


def test_a_session_without_the_tls_a_policy_demands_is_not_reused(mx: MxNet, mail: Path) -> None:
    """An opportunistic session (encrypted, not verified) serves opportunistic and required
    domains of the destination, but not one whose policy is verify."""
    sink = mx.sink("127.0.0.2", tls=True)  # a certificate no one can verify
    policies = (("required.test", "required"), ("verify.test", "verify"))

    async def scenario(courier: Courier) -> list[RecipientResult]:
        results = []
        for domain in ("example.test", "required.test", "verify.test", "example.test"):
            to = Route(domain, route(sink).hosts)
            results += await send(courier, to, mail, destination="shared")
        return results

    results = run(mx, scenario, tls=tls(policies=policies))

    assert [r.reply.code for r in results] == [250, 250, None, 250]
    assert results[2].reply.enhanced == "4.7.5"  # its own connection failed verification
    assert sink.connections == 2
    assert len(sink.wait_for(3)) == 3
