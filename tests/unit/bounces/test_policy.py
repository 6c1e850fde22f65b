"""Who is told what: the DSN a failure, a long wait or a delivery without DSN at the next hop
calls for, by bounces settings, the sender and each recipient's NOTIFY."""

from __future__ import annotations

from typing import Any

import pytest

from relay.bounces.policy import envelope, on_delay, on_failure, on_relayed
from relay.config.bounces import BouncesConfig
from relay.spool.message import Message, Recipient

ON = BouncesConfig()
OFF = BouncesConfig(enabled=False)
PM = BouncesConfig(postmaster="pm@relay.test")
WARN = BouncesConfig(delay_warning=3600.0)


def msg(sender: str, *notify: list[str] | None, **fields: Any) -> Message:
    rcpts = [Recipient(f"r{n}@y.test", notify=n_) for n, n_ in enumerate(notify)]
    return Message("0190aa00bb11cc22dd33", sender, rcpts, 1000.0, 1000.0, **fields)


@pytest.mark.parametrize(
    ("cfg", "message", "to", "told"),
    [
        (ON, msg("a@x.test", None, ["FAILURE"], ["NEVER"], ["SUCCESS", "DELAY"]), "a@x.test", [0, 1]),
        (OFF, msg("a@x.test", None), None, []),
        (ON, msg("a@x.test", ["NEVER"]), None, []),
        (ON, msg("", None), None, []),  # a bounce never bounces
        (PM, msg("", ["NEVER"]), "pm@relay.test", [0]),  # the postmaster's copy, NOTIFY aside
    ],
)  # fmt: skip
def test_on_failure(cfg: BouncesConfig, message: Message, to: str | None, told: list[int]) -> None:
    notice = on_failure(cfg, message, message.recipients)
    if to is None:
        assert notice is None
    else:
        assert notice is not None and notice.to == to and notice.action == "failed"
        assert [message.recipients.index(r) for r in notice.rcpts] == told


def test_the_postmaster_copy_is_not_made_for_mail_to_the_postmaster() -> None:
    message = Message("0190aa00bb11cc22dd33", "", [Recipient("PM@relay.test")], 1000.0, 1000.0)
    assert on_failure(PM, message, message.recipients) is None


@pytest.mark.parametrize(
    ("cfg", "message", "now", "told"),
    [
        (WARN, msg("a@x.test", None, ["DELAY"], ["FAILURE"]), 4600.0, [0, 1]),
        (WARN, msg("a@x.test", None), 4599.0, None),  # not old enough
        (WARN, msg("a@x.test", None, delay_warned=4000.0), 9000.0, None),  # once
        (WARN, msg("", None), 9000.0, None),
        (ON, msg("a@x.test", None), 9000.0, None),  # off by default
        (WARN, msg("a@x.test", ["NEVER"]), 9000.0, None),
    ],
)  # fmt: skip
def test_on_delay(cfg: BouncesConfig, message: Message, now: float, told: list[int] | None) -> None:
    notice = on_delay(cfg, message, now)
    if told is None:
        assert notice is None
    else:
        assert notice is not None and notice.action == "delayed"
        assert [message.recipients.index(r) for r in notice.rcpts] == told


def test_on_relayed_only_for_notify_success() -> None:
    message = msg("a@x.test", None, ["SUCCESS"], ["FAILURE"])
    notice = on_relayed(ON, message, message.recipients)
    assert notice is not None and [r.address for r in notice.rcpts] == ["r1@y.test"]
    assert on_relayed(OFF, message, message.recipients) is None


def test_the_dsn_envelope() -> None:
    original = msg("jörg@x.test", None, tenant="shop", lane="high")
    dsn = envelope(original, original.sender, 1234, 5000.0)
    assert (dsn.sender, [r.address for r in dsn.recipients]) == ("", ["jörg@x.test"])
    assert (dsn.tenant, dsn.lane, dsn.dsn_of, dsn.size) == ("shop", "normal", original.id, 1234)
    assert dsn.smtputf8 and dsn.next_attempt == 5000.0 and dsn.id != original.id
