"""Command line, the queue: the postqueue/postsuper-like `queue` and `dlq` commands (list,
show, summary and the actions on messages) and their rendering."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relay.cli.fail import EX_USAGE, Fail
from relay.config.suppression import SuppressionConfig
from relay.mail.category import categorize
from relay.mail.target import ALL, expand
from relay.mail.waiting import waiting_state
from relay.ops import control, summary
from relay.schedule.actions import PAST
from relay.spool.layout import DEAD, QUEUE
from relay.spool.message import Message, Recipient, is_id
from relay.spool.store import Spool, SpoolError, iter_messages
from relay.suppression.check import Check, since
from relay.suppression.store import path_of

# --- listing ----------------------------------------------------------------------------------


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def item(msg: Message, where: str, why: list[Any] | None = None) -> dict[str, Any]:
    """The JSON shape of one queued or dead-lettered message; why is the running scheduler's
    [reason, expected attempt, detail] for it, if it runs."""
    recipients = [recipient_item(msg, rcpt) for rcpt in msg.recipients]
    out: dict[str, Any] = {
        "id": msg.id,
        "tenant": msg.tenant,
        "sender": msg.sender,
        "batch_id": msg.batch_id,
        "recipients": recipients,
        "attempts": max((r.attempts for r in msg.recipients), default=0),
        "queued_at": iso(msg.queued_at),
        "finished_at": None,  # the API's field: a queued message has not finished
        "size": msg.size,
        "lane": msg.lane,
    }
    if where == QUEUE:
        reason, expected, detail = why or waiting(msg, time.time())
        out["next_attempt"] = None if msg.held else iso(msg.next_attempt)
        out["held"] = msg.held
        out["send_at"] = iso(msg.send_at)
        out["quota_until"] = iso(msg.quota_until)
        out["status"] = out["reason"] = reason
        out["expected_attempt_at"] = iso(expected)
        out["reason_detail"] = detail or DETAILS.get(reason) or last_reply(msg)
    else:
        reasons = {r["reason"] for r in recipients if "reason" in r}
        out["reason"] = reasons.pop() if len(reasons) == 1 else "mixed"
        out["dead_lettered_at"] = iso(msg.dead_at)
    return out


def recipient_item(msg: Message, rcpt: Recipient) -> dict[str, Any]:
    """One recipient of item(): times in ISO 8601, its bounce category once it has one."""
    data = rcpt.as_dict()
    data["first_attempt"], data["last_attempt"] = iso(rcpt.first_attempt), iso(rcpt.last_attempt)
    data["history"] = [{**h, "at": iso(h.get("at"))} for h in rcpt.history]
    data["updated_at"] = iso(rcpt.last_attempt or msg.queued_at)
    data["next_attempt"] = None if rcpt.final or msg.held else iso(msg.next_attempt)
    if rcpt.status in CATEGORIZED:
        data["category"] = categorize(rcpt.reply)
    return data


DETAILS = control.REASON_DETAILS
CATEGORIZED = frozenset({"deferred", "failed", "expired"})  # statuses with a bounce category
BATCH_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # X-Relay-Batch-Id's grammar


def waiting(msg: Message, now: float) -> list[Any]:
    """Why a queued message waits, read from the spool alone (the daemon is stopped):
    [held | scheduled | quota | deferred | queued, expected attempt, detail]."""
    state = waiting_state(
        held=msg.held,
        scheduled=msg.scheduled(now),
        quota=msg.over_quota(now),
        attempted=bool(msg.attempts),
    )
    at = {"held": None, "scheduled": msg.send_at, "quota": msg.quota_until}
    return [state, at.get(state, max(now, msg.next_attempt)), None]


def last_reply(msg: Message) -> str | None:
    """The last reply a pending recipient got (what a deferred message waits out)."""
    replies = [r for r in msg.pending() if r.reply is not None]
    latest = max(replies, key=lambda r: r.last_attempt or 0.0, default=None)
    return None if latest is None else f"{latest.address}: {latest.reply}"


def list_entries(spool: Spool, args: argparse.Namespace) -> int:
    where = QUEUE if args.command == "queue" else DEAD
    messages = list(iter_messages(spool, where))
    reasons = control.inspect(spool, "reasons") if where == QUEUE and messages else None
    items = [item(m, where, (reasons or {}).get(m.id)) for m in messages]
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    print(render(messages, items, where))
    return 0


def render(messages: list[Message], items: list[dict[str, Any]], where: str) -> str:
    """A mailq-style listing: id, size, arrival, sender, why it waits, then each recipient."""
    if not messages:
        return "Mail queue is empty" if where == QUEUE else "Dead-letter spool is empty"
    lines = [f"{'-Queue ID-':<21}{'--Size--':>9} {'----Arrival Time----':<21}-Sender/Recipient-"]
    for msg, data in zip(messages, items, strict=True):
        arrival = datetime.fromtimestamp(msg.queued_at, UTC).strftime("%a %b %d %H:%M:%S")
        mark = "!" if msg.held else ""  # as in mailq: ! is on hold
        lines.append(f"{msg.id + mark:<21}{msg.size:>9} {arrival:<21}{msg.sender or '<>'}")
        if where == QUEUE:
            lines.append(f"{'':>52}{why_line(data)}")
        for rcpt in msg.recipients:
            if where == DEAD and not rcpt.final:
                continue
            if where == QUEUE and rcpt.final:
                continue  # mailq shows what still waits; `show` has the rest
            if rcpt.reply is not None:
                why = f"{rcpt.status}, {categorize(rcpt.reply)}" if where == DEAD else rcpt.status
                lines.append(f"{'':>52}({why}: {rcpt.reply})")
            lines.append(f"{'':>52}{rcpt.address}")
        lines.append("")
    total = sum(m.size for m in messages)
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {len(messages)} Requests.")
    return "\n".join(lines)


def why_line(data: dict[str, Any]) -> str:
    """(reason until when: detail), e.g. (throttled until 2026-11-22T10:00:00Z: gmail …) or
    (scheduled for 2026-11-22T10:00:00Z)."""
    text = data["reason"]
    if text == "active":
        text += ": in a delivery attempt now"
    elif data["expected_attempt_at"] is not None:
        text += f" {'for' if text == 'scheduled' else 'until'} {data['expected_attempt_at']}"
    if data["reason"] in ("throttled", "suspended", "quota", "held") and data["reason_detail"]:
        text += f": {data['reason_detail']}"
    if data["lane"] != "normal":
        text += f" [{data['lane']} priority]"
    return f"({text})"


def show(spool: Spool, args: argparse.Namespace) -> int:
    where = QUEUE if args.command == "queue" else DEAD
    msg_id = checked_id(args.id, allow_all=False)
    msg = spool.load(msg_id, where)
    live = control.inspect(spool, "reasons", [msg_id]) if where == QUEUE else None
    data = item(msg, where, (live or {}).get(msg_id))
    data["client"] = msg.client
    data["ret"], data["envid"] = msg.ret, msg.envid  # RFC 3461; NOTIFY, ORCPT per recipient
    data["content"] = str(spool.content_path(msg_id))
    data["headers"] = headers(spool.content_path(msg_id))
    print(json.dumps(data, indent=2))
    return 0


def headers(path: Path, limit: int = 200) -> list[str]:
    """The message's header lines (unfolded as stored), for `show`."""
    lines: list[str] = []
    with path.open("rb") as fh:
        for raw in fh:
            if raw in (b"\r\n", b"\n") or len(lines) >= limit:
                break
            lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    return lines


# --- actions ----------------------------------------------------------------------------------


def checked_id(text: str | None, *, allow_all: bool) -> str:
    if text is None or (allow_all and text == ALL):
        return ALL
    if not is_id(text):
        hint = " or ALL" if allow_all else ""
        raise Fail(f"{text!r} is not a queue id (20 hex digits{hint})", EX_USAGE)
    return text


STILL_SUPPRESSED = ("relay: suppressed, so dropped again before any attempt unless lifted with"
                    " `relay suppress delete ADDRESS`: ")  # fmt: skip


def act(spool: Spool, args: argparse.Namespace) -> int:
    """Queue and dead-letter actions, through the daemon (or the spool if it is stopped)."""
    domain, batch = getattr(args, "domain", None), getattr(args, "batch", None)
    if batch is not None:
        return act_on_batch(spool, args, batch, domain)
    if args.target is None and domain is None and args.action != "flush":
        raise Fail(f"{args.command} {args.action}: give ID, ALL or --domain", EX_USAGE)
    target = checked_id(args.target, allow_all=True)
    if domain is not None:
        domain = domain.lower().rstrip(".")
        if not domain:
            raise Fail("--domain: empty domain", EX_USAGE)
    if (args.command, args.action) == ("dlq", "delete"):
        result = delete_dead(spool, target)
    else:
        result = control.request(spool, args.action, target, domain)
    return report(args.action, target, result)


def requeue(spool: Spool, args: argparse.Namespace, suppression: SuppressionConfig) -> int:
    """`relay dlq requeue` (act), naming on stderr the recipients a suppression list will drop
    again."""
    target = args.target and checked_id(args.target, allow_all=True)  # None: act() says so
    still = suppressed_dead(spool, suppression, target) if target else []
    status = act(spool, args)
    if still:
        print(STILL_SUPPRESSED + ", ".join(still), file=sys.stderr)
    return status


def suppressed_dead(spool: Spool, cfg: SuppressionConfig, target: str) -> list[str]:
    """'address (kind since day)' for each failed recipient of the dead letters target names
    that a suppression list would drop again once requeued."""
    path = path_of(spool.history_path)
    if not path.exists():
        return []
    check, found = Check(path), []
    try:
        for msg_id in expand(target, lambda: spool.ids(DEAD)):
            with contextlib.suppress(SpoolError):
                msg = spool.load(msg_id, DEAD)
                for rcpt in msg.failed():
                    entry = check.find(cfg, msg.tenant, rcpt.address)
                    if entry is not None:
                        found.append(f"{rcpt.address} ({entry.kind} since {since(entry)})")
    finally:
        check.close()
    return found


def act_on_batch(spool: Spool, args: argparse.Namespace, batch: str, domain: str | None) -> int:
    """`relay queue delete --batch ID`: every queued message of the batch (scheduled ones
    too), through the daemon or on the stopped spool."""
    if args.target is not None:
        raise Fail(f"{args.command} {args.action}: give ID|ALL or --batch, not both", EX_USAGE)
    if not BATCH_RE.fullmatch(batch):
        raise Fail(f"--batch: {batch!r} is not a batch id (1-64 of A-Z a-z 0-9 . _ -)", EX_USAGE)
    if domain is not None:
        domain = domain.lower().rstrip(".")
    result = control.request(spool, args.action, ALL, domain, batch=batch)
    return report(args.action, ALL, result)


def delete_dead(spool: Spool, target: str) -> dict[str, list[str]]:
    """Dead-letter records are not the scheduler's: deleting one is a spool operation."""
    result: dict[str, list[str]] = {"done": [], "missing": []}
    for msg_id in expand(target, lambda: spool.ids(DEAD)):
        if not spool.state_path(msg_id, DEAD).exists():
            result["missing"].append(msg_id)
            continue
        spool.remove(msg_id, DEAD)
        result["done"].append(msg_id)
    return result


def report(action: str, target: str, result: dict[str, list[str]]) -> int:
    """What happened, one line per kind; exit 1 when the one message asked for is not there."""
    done, busy = result.get("done", []), result.get("busy", [])
    gone, missing = result.get("gone", []), result.get("missing", [])
    print(f"relay: {PAST[action]} {len(done)} message{'s' * (len(done) != 1)}")
    if gone:
        print(f"relay: finished during its delivery attempt, nothing to do: {' '.join(gone)}")
    if busy:
        print(f"relay: still in a delivery attempt, try again shortly: {' '.join(busy)}")
    if missing and target != ALL:
        raise Fail(f"no such message: {' '.join(missing)}")
    return 1 if busy else 0


def queue_summary(spool: Spool, args: argparse.Namespace) -> int:
    """qshape: queued messages by recipient domain and age, then (daemon running) the
    destinations that are busy, throttled or suspended."""
    if args.top is not None and args.top < 0:
        raise Fail("--top: must be 0 or more", EX_USAGE)
    indexed = control.inspect(spool, "summary")
    if indexed is not None and indexed["indexed"]:  # the running scheduler's index: no file read
        shape = summary.from_json(indexed["summary"], args.top)
    else:
        shape = summary.summarize(iter_messages(spool, QUEUE), time.time(), top=args.top)
    live = control.inspect(spool, "destinations")
    dests = [] if live is None else live["destinations"]
    if args.json:
        print(json.dumps({**shape.as_json(), "destinations": dests, "daemon": live is not None},
                         indent=2))  # fmt: skip
        return 0
    print(summary.render(shape))
    if dests:
        print()
        print(summary.render_destinations(dests))
    return 0
