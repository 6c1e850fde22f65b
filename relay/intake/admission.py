"""Intake, admission: the lane a message travels in and the sending quotas it counts against,
counted in the shared ledger before the durable write (held for a later window, or refused)."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import Session

from relay.config import Config
from relay.intake import quota
from relay.intake.checks import reject
from relay.observe import logs, metrics
from relay.spool.message import Message

REPLY_QUOTA_ERROR = "451 4.3.0 Error: sending quota ledger unavailable, try again later"


def lane(cfg: Config, session: Session, listener: str) -> str:
    """The lane of the session's AUTH user, else of its listener, else normal (an
    X-Relay-Priority the message carries comes before both)."""
    lanes = cfg.lanes
    user = str(session.auth_data) if session.authenticated else None
    by_user = dict(lanes.users)
    if user in by_user:
        return by_user[user]
    return dict(lanes.listeners).get(listener, "normal")


def quotas(cfg: Config, session: Session, sender: str) -> dict[str, tuple[quota.Window, ...]]:
    """The quotas a message counts against: its AUTH user's and its sender domain's (the
    names in the configuration are lowercase)."""
    found: dict[str, tuple[quota.Window, ...]] = {}
    user = str(session.auth_data).lower() if session.authenticated else None
    users_quotas = dict(cfg.quotas.users)
    if user in users_quotas:
        found[f"user:{user}"] = users_quotas[user]
    domain = sender.rpartition("@")[2].lower() if sender else None
    domain_quotas = dict(cfg.quotas.sender_domains)
    if domain in domain_quotas:
        found[f"domain:{domain}"] = domain_quotas[domain]
    return found


async def reserve(
    ledger: quota.Ledger, cfg: Config, msg: Message, quotas: quota.Quotas, session: Session
) -> tuple[quota.Decision, str | None]:
    """Count the message in its quotas' windows at max(now, send_at), holding it until a
    window with room (hold) or refusing it with 452 (refuse); a refusal reply or None.

    It is counted before the durable write so that concurrent intake processes see it at
    once; a failed write takes the count back (best effort, release)."""
    t = max(msg.queued_at, msg.send_at or 0.0)
    if not quotas:
        return quota.Decision(t, False), None
    hold = cfg.quotas.action == "hold"
    try:
        decision = await asyncio.to_thread(ledger.reserve, quotas, t, hold=hold)
    except Exception as exc:  # the ledger file itself: 4xx, never 5xx (invariant 2)
        logs.failure("intake", exc, action="quota_ledger", id=msg.id)
        metrics.REJECTED.labels("local_error").inc()
        return quota.Decision(t, False), REPLY_QUOTA_ERROR
    if not decision.counted:
        metrics.QUOTA_HELD.labels("refused").inc()
        reply = quota.refusal(decision)
        return decision, reject("over_quota", reply, session, quota=quota.describe(decision))
    if decision.at > t:
        msg.quota_until = decision.at
        msg.next_attempt = max(msg.next_attempt, decision.at)
    return decision, None


async def release(ledger: quota.Ledger, quotas: quota.Quotas, place: quota.Decision) -> None:
    """Take back the count of a message that was not accepted after all (best effort: a
    failure leaves one message too many counted in its window)."""
    if not place.counted:
        return
    try:
        await asyncio.to_thread(ledger.release, quotas, place.at)
    except Exception as exc:
        logs.failure("intake", exc, action="quota_release")
