"""Schedule, the operator's actions: what flush, delete, hold and release do to one queued
message, shared by the running scheduler and the offline CLI so both behave the same."""

from __future__ import annotations

from relay.spool.message import Message

OPS = ("flush", "delete", "hold", "release")
PAST = {
    "flush": "flushed", "delete": "deleted", "hold": "held", "release": "released",
    "requeue": "requeued",
}  # fmt: skip


def selects(msg: Message, domain: str | None) -> bool:
    """Whether an action filtered by recipient domain applies to msg (pending recipients only)."""
    return domain is None or any(r.domain == domain for r in msg.pending())


def apply(op: str, msg: Message, domain: str | None, now: float) -> bool:
    """Change msg for op; True when nothing is left to deliver and the message must go.

    delete with --domain removes only that domain's pending recipients; the message goes when
    none is left. flush makes a message due now but leaves a held one held (as postqueue -f
    does), and a scheduled one or one over its quota waiting for its time; release makes it
    due now, the operator's word overriding a quota wait too.
    """
    if op == "delete":
        if domain is None:
            return True
        for rcpt in msg.pending():
            if rcpt.domain == domain:
                rcpt.status = "deleted"
        return not msg.pending()
    if op == "hold":
        msg.held = True
    elif op == "release":
        msg.held, msg.quota_until, msg.next_attempt = False, None, now
    elif op == "flush" and not (msg.held or msg.scheduled(now) or msg.over_quota(now)):
        msg.next_attempt = now
    return False
