"""Control stage, command line: `relay serve`, `check-config`, and the postqueue/postsuper-like
`queue` and `dlq` commands, each failing with one line that names the problem."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from relay import config
from relay.config import values
from relay.daemon import supervisor as daemon
from relay.intake import dkim, users
from relay.mail.target import ALL, expand
from relay.mail.waiting import waiting_state
from relay.ops import control, summary
from relay.schedule.actions import PAST
from relay.spool.layout import DEAD, QUEUE
from relay.spool.message import Message, is_id
from relay.spool.store import Spool, SpoolError, iter_messages

DEFAULT_CONFIG = "/etc/relay/relay.yaml"
ACTIONS = {"queue": ("flush", "delete", "hold", "release"), "dlq": ("requeue", "delete")}
HELP = {
    "flush": "attempt now (default ALL); held messages stay held",
    "delete": "delete ID, ALL, or with --domain that domain's recipients",
    "hold": "keep from delivery until released",
    "release": "release held messages, due now",
    "requeue": "put dead letters back into the queue, due now",
    "summary": "messages by recipient domain and age, like Postfix's qshape",
    "dkim keygen": "write a new signing key and print its DNS TXT record",
    "user add": "add a user (prompts for the password)",
    "user passwd": "change a user's password",
    "user delete": "remove a user",
}
EX_USAGE, EX_CONFIG = 2, 78  # sysexits.h; systemd can use RestartPreventExitStatus=78


class Fail(Exception):
    """A one-line error for the operator, with the exit status to use."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line."""

    def error(self, message: str) -> NoReturn:
        raise Fail(f"{self.prog}: {message} (see --help)", EX_USAGE)


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE",
        help=f"YAML configuration (default: $RELAY_CONFIG, else {DEFAULT_CONFIG} if it exists, "
        "else the built-in defaults)",
    )  # fmt: skip
    parser = Parser(prog="relay", description="Self-hosted SMTP relay daemon.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("serve", parents=[common], help="run the relay (supervisor, intake, scheduler)")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    sub.add_parser("worker", parents=[common]).add_argument("role", choices=daemon.ROLES)
    user = sub.add_parser("user", help="manage SMTP AUTH users").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    user.add_parser("list", parents=[common], help="list users and their sender domains")
    for action in ("add", "passwd", "delete"):
        cmd = user.add_parser(action, parents=[common], help=HELP[f"user {action}"])
        cmd.add_argument("name")
        if action == "add":
            cmd.add_argument("--domains", required=True, help="allowed sender domains: a,b or *")
        if action != "delete":
            cmd.add_argument("--password-stdin", action="store_true", help="read it from stdin")
    dkim_cmd = sub.add_parser("dkim", help="DKIM keys").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    keygen = dkim_cmd.add_parser("keygen", parents=[common], help=HELP["dkim keygen"])
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", metavar="FILE", help="key file (default DOMAIN.SELECTOR.key)")
    for name, where in (("queue", "queued messages"), ("dlq", "the dead-letter spool")):
        group = sub.add_parser(name, help=f"inspect and steer {where}").add_subparsers(
            dest="action", required=True, parser_class=Parser
        )
        listing = group.add_parser("list", parents=[common], help=f"list {where}")
        listing.add_argument("--json", action="store_true", help="print one JSON array")
        group.add_parser("show", parents=[common], help="show one message").add_argument("id")
        if name == "queue":
            shape = group.add_parser("summary", parents=[common], help=HELP["summary"])
            shape.add_argument("--json", action="store_true", help="print one JSON object")
            shape.add_argument("--top", type=int, metavar="N", help="only the N busiest domains")
        for action in ACTIONS[name]:
            cmd = group.add_parser(action, parents=[common], help=HELP[action])
            cmd.add_argument("target", metavar="ID|ALL", nargs="?")
            if name == "queue":
                cmd.add_argument("--domain", help="only this recipient domain")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except Fail as exc:
        print(f"relay: {exc}" if not str(exc).startswith("relay") else str(exc), file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def run(args: argparse.Namespace) -> int:
    config_file = args.config or os.environ.get("RELAY_CONFIG")
    if config_file is None and Path(DEFAULT_CONFIG).exists():
        config_file = DEFAULT_CONFIG
    try:
        cfg = config.load(config_file)
    except config.ConfigError as exc:
        raise Fail(f"configuration error: {exc}", EX_CONFIG) from None
    if args.command == "check-config":
        return check_config(config_file, cfg)
    if args.command == "serve":
        try:
            return daemon.serve(config_file, cfg)
        except daemon.StartupError as exc:
            raise Fail(str(exc)) from None
        except config.ConfigError as exc:
            raise Fail(f"configuration error: {exc}", EX_CONFIG) from None
    if args.command == "worker":
        return daemon.worker(args.role, config_file, cfg)
    if args.command == "user":
        return manage_users(cfg, args)
    if args.command == "dkim":
        return dkim_keygen(args)
    spool = Spool(cfg.spool.path)
    if not spool.root.is_dir():
        raise Fail(f"spool {spool.root} does not exist (has the relay run with this config?)")
    try:
        return COMMANDS[(args.command, args.action)](spool, args)
    except (OSError, SpoolError, control.ControlError) as exc:
        raise Fail(str(exc)) from None


def check_config(config_file: str | None, cfg: config.Config) -> int:
    """Validate the file and load what it points at (certificate, users); warn about secrets
    other users can read."""
    try:
        warnings = daemon.preflight(config_file, cfg)
    except config.ConfigError as exc:
        raise Fail(f"configuration error: {exc}", EX_CONFIG) from None
    for warning in warnings:
        print(f"relay: warning: {warning}", file=sys.stderr)
    print(f"relay: configuration OK ({config_file or 'built-in defaults'})")
    return 0


def dkim_keygen(args: argparse.Namespace) -> int:
    """Write DOMAIN.SELECTOR.key (0600, never over an existing file); print the TXT record."""
    try:
        domain = values.hostname(args.domain).lower()
    except ValueError as exc:
        raise Fail(f"dkim keygen: {exc}", EX_USAGE) from None
    out = Path(args.out or f"{domain}.{args.selector}.key")
    try:
        pem, record = dkim.keygen(domain, args.selector, args.bits)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except dkim.DkimError as exc:
        raise Fail(f"dkim keygen: {exc}", EX_USAGE) from None
    except FileExistsError:
        raise Fail(f"{out} exists: not overwriting a key") from None
    except OSError as exc:
        raise Fail(f"{out}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    print(record)
    print(f"# key written to {out}; configure it with:", file=sys.stderr)
    print(f"#   dkim: {{keys: [{{domain: {domain}, selector: {args.selector}, "
          f"key_file: {out.absolute()}}}]}}", file=sys.stderr)  # fmt: skip
    return 0


def manage_users(cfg: config.Config, args: argparse.Namespace) -> int:
    """`relay user`: edit the users file; a running daemon notices the change by itself."""
    path = cfg.smtp.auth.users_file
    if path is None:
        raise Fail("smtp.auth.users_file is not set in the configuration")
    try:
        table = users.load(path)
        if args.action == "list":
            for user in sorted(table.values(), key=lambda u: u.name):
                print(f"{user.name}\t{','.join(user.domains)}")
            return 0
        name = users.check_name(args.name)
        if args.action != "add" and name not in table:
            raise Fail(f"no such user: {name}")
        if args.action == "add" and name in table:
            raise Fail(f"user {name} exists (use relay user passwd)")
        if args.action == "delete":
            del table[name]
        else:
            domains = (
                users.parse_domains(args.domains) if args.action == "add" else table[name].domains
            )
            table[name] = users.User(name, users.hash_password(read_password(args)), domains)
        users.save(path, table)
    except users.UsersError as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"{path}: {exc.strerror}") from None
    print(f"relay: user {name} {PAST_USER[args.action]}")
    return 0


PAST_USER = {"add": "added", "passwd": "updated", "delete": "deleted"}


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise Fail("the passwords differ")
    if len(password) < 8:
        raise Fail("the password must have at least 8 characters")
    return password


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
    recipients = []
    for rcpt in msg.recipients:
        data = rcpt.as_dict()
        data["first_attempt"], data["last_attempt"] = (
            iso(rcpt.first_attempt),
            iso(rcpt.last_attempt),
        )
        data["history"] = [{**h, "at": iso(h.get("at"))} for h in rcpt.history]
        recipients.append(data)
    out: dict[str, Any] = {
        "id": msg.id,
        "sender": msg.sender,
        "recipients": recipients,
        "attempts": max((r.attempts for r in msg.recipients), default=0),
        "queued_at": iso(msg.queued_at),
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


DETAILS = {
    "held": "on hold: relay queue release lets it go",
    "quota": "over its sending quota until a window with room opens",
}


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
                lines.append(f"{'':>52}({rcpt.status}: {rcpt.reply})")
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
    data = item(msg, where)
    data["client"] = msg.client
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


def act(spool: Spool, args: argparse.Namespace) -> int:
    """Queue and dead-letter actions, through the daemon (or the spool if it is stopped)."""
    domain = getattr(args, "domain", None)
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


COMMANDS: dict[tuple[str, str], Callable[[Spool, argparse.Namespace], int]] = {
    ("queue", "list"): list_entries,
    ("queue", "show"): show,
    ("queue", "summary"): queue_summary,
    ("queue", "flush"): act,
    ("queue", "delete"): act,
    ("queue", "hold"): act,
    ("queue", "release"): act,
    ("dlq", "list"): list_entries,
    ("dlq", "show"): show,
    ("dlq", "requeue"): act,
    ("dlq", "delete"): act,
}
