"""Bounces, policy: who is told what about which recipients (bounces.enabled, the null sender
and the postmaster's copy of a double bounce, NOTIFY, the delay warning's age), and the
envelope of the DSN that tells them; pure functions (docs/bounces.md "When")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.bounces.compose import DELAYED, FAILED, RELAYED
from relay.config.bounces import BouncesConfig
from relay.spool.message import Message, Recipient, new_id

SUCCESS, FAILURE, DELAY = "SUCCESS", "FAILURE", "DELAY"


@dataclass(frozen=True)
class Notice:
    """One DSN to send: to whom, about which recipients, with which action."""

    to: str
    rcpts: tuple[Recipient, ...]
    action: str


def wants(rcpt: Recipient, what: str) -> bool:
    """Whether rcpt's NOTIFY asks for notices of `what` (no NOTIFY: failures and delays)."""
    if rcpt.notify is None:
        return what != SUCCESS
    return what in rcpt.notify


def on_failure(cfg: BouncesConfig, msg: Message, rcpts: Sequence[Recipient]) -> Notice | None:
    """The DSN for recipients of msg that failed together (permanently or expired): to the
    sender, for those whose NOTIFY has FAILURE; for mail from <> (a bounce never bounces)
    only the postmaster's copy, when one is configured and the mail was not to them."""
    if not cfg.enabled or not rcpts:
        return None
    if msg.sender == "":
        postmaster = cfg.postmaster.lower()
        if postmaster and any(r.address.lower() != postmaster for r in rcpts):
            return Notice(cfg.postmaster, tuple(rcpts), FAILED)
        return None
    wanted = tuple(r for r in rcpts if wants(r, FAILURE))
    return Notice(msg.sender, wanted, FAILED) if wanted else None


def on_delay(cfg: BouncesConfig, msg: Message, now: float) -> Notice | None:
    """The one delay warning of a deferred message that has waited bounces.delay_warning,
    for its pending recipients whose NOTIFY does not leave out DELAY."""
    limit = cfg.delay_warning
    if not cfg.enabled or limit is None or msg.delay_warned is not None or msg.sender == "":
        return None
    if now - msg.queued_at < limit:
        return None
    wanted = tuple(r for r in msg.pending() if wants(r, DELAY))
    return Notice(msg.sender, wanted, DELAYED) if wanted else None


def on_relayed(cfg: BouncesConfig, msg: Message, rcpts: Sequence[Recipient]) -> Notice | None:
    """The notice for recipients delivered to a next hop without DSN whose NOTIFY asked for
    SUCCESS (RFC 3461 §4.2.2): that hop will send none."""
    wanted = tuple(r for r in rcpts if wants(r, SUCCESS))
    if not cfg.enabled or msg.sender == "" or not wanted:
        return None
    return Notice(msg.sender, wanted, RELAYED)


def envelope(msg: Message, to: str, size: int, now: float) -> Message:
    """A new message from <> to `to`, reporting on msg: its tenant, lane normal, due now."""
    return Message(
        id=new_id(),
        sender="",
        recipients=[Recipient(to)],
        queued_at=now,
        next_attempt=now,
        size=size,
        smtputf8=msg.smtputf8 or not to.isascii(),
        lane="normal",
        tenant=msg.tenant,
        dsn_of=msg.id,
    )
