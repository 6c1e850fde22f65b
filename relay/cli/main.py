"""Command line, the entry point: the `relay` argument parser, main() and the dispatch of each
command to its module, failing with one line that names the problem."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from relay import config
from relay.cli import sendmail, suppress, token
from relay.cli.fail import EX_CONFIG, EX_USAGE, Fail

if TYPE_CHECKING:
    from relay.spool.store import Spool

# Each command imports the modules it runs when it runs (run()): `relay queue list` does not
# load the daemon, the API or the delivery stage, so an operator's command answers in a
# fraction of a second.

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
    "webhook secret": "add a new signing secret to the webhook's secret_file and print it",
    "webhook list": "every webhook: state, events pending and parked, lag, last error",
    "webhook test": "POST a signed `test` event to the webhook and print the reply",
    "webhook replay": "make the events its outbox still owes since TIME, parked ones too, due "
    "now (delivered events are not kept, so not sent again)",
    "webhook enable": "send again to a webhook disabled by a 410 Gone",
}


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
    sub.add_parser("serve", parents=[common], help="run the relay (supervisor and its workers)")
    sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    sub.add_parser(  # main() hands it sendmail's own flags before argparse sees them
        "sendmail", help="sendmail(8): a message on stdin into the maildrop (-t -i -f ...)"
    )
    sub.add_parser("worker", parents=[common]).add_argument("role")  # checked by run()
    add_user_commands(sub, common)
    add_token_commands(sub, common)
    add_webhook_commands(sub, common)
    suppress.add_commands(sub, common)
    sub.add_parser("history", help="the message history (docs/events.md)").add_subparsers(
        dest="action", required=True, parser_class=Parser
    ).add_parser(
        "rebuild", parents=[common], help="derive it again from the event journal (relay stopped)"
    )
    add_dkim_commands(sub, common)
    for name, where in (("queue", "queued messages"), ("dlq", "the dead-letter spool")):
        add_spool_commands(sub, common, name, where)
    return parser


def add_user_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
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


def add_token_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    cmds = sub.add_parser("token", help="manage the HTTP API's bearer tokens").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    listing = cmds.add_parser("list", parents=[common], help="list tokens (never the tokens)")
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    add = cmds.add_parser("add", parents=[common], help="add a token and print it, once")
    add.add_argument("name")
    add.add_argument("--tenant", help="the one tenant it sees and acts for (default: every one)")
    add.add_argument(
        "--scope", default=token.DEFAULT_SCOPES, metavar="SCOPES",
        help="comma-separated: read, send, cancel (default: all three)",
    )  # fmt: skip
    cmds.add_parser("delete", parents=[common], help="delete a token").add_argument("name")


def add_webhook_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    cmds = sub.add_parser("webhook", help="manage webhooks").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    listing = cmds.add_parser("list", parents=[common], help=HELP["webhook list"])
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    for action in ("test", "replay", "enable"):
        said = HELP[f"webhook {action}"]
        cmd = cmds.add_parser(action, parents=[common], help=said, description=said)
        cmd.add_argument("name", help="the webhook's name in the configuration")
        if action == "replay":
            cmd.add_argument(
                "--since", required=True, metavar="TIME",
                help="RFC 3339 with a zone (2026-11-22T09:00:00Z) or a duration back from now "
                "(30s, 5m, 2h, 3d)",
            )  # fmt: skip
    secret = cmds.add_parser("secret", parents=[common], help=HELP["webhook secret"])
    secret.add_argument("name", help="the webhook's name in the configuration")
    secret.add_argument(
        "--replace", action="store_true", help="make it the only secret (default: add it)"
    )


def add_dkim_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    dkim_cmd = sub.add_parser("dkim", help="DKIM keys").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    keygen = dkim_cmd.add_parser("keygen", parents=[common], help=HELP["dkim keygen"])
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", metavar="FILE", help="key file (default DOMAIN.SELECTOR.key)")


def add_spool_commands(
    sub: argparse._SubParsersAction[Parser], common: Parser, name: str, where: str
) -> None:
    """`relay queue` or `relay dlq`: list, show (queue: summary) and the actions."""
    group = sub.add_parser(name, help=f"inspect and steer {where}").add_subparsers(
        dest="action", required=True, parser_class=Parser
    )
    listing = group.add_parser("list", parents=[common], help=f"list {where}")
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    show = group.add_parser("show", parents=[common], help="show one message (JSON)")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="JSON (what show always prints)")
    if name == "queue":
        shape = group.add_parser("summary", parents=[common], help=HELP["summary"])
        shape.add_argument("--json", action="store_true", help="print one JSON object")
        shape.add_argument("--top", type=int, metavar="N", help="only the N busiest domains")
    for action in ACTIONS[name]:
        cmd = group.add_parser(action, parents=[common], help=HELP[action])
        cmd.add_argument("target", metavar="ID|ALL", nargs="?")
        if name == "queue":
            cmd.add_argument("--domain", help="only this recipient domain")
        if (name, action) == ("queue", "delete"):
            cmd.add_argument("--batch", metavar="ID", help="every queued message of this batch")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sendmail"]:  # sendmail's own flags (-t -i -fme@x), not argparse's
        return sendmail.main(argv[1:])
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
    if args.command in ("serve", "worker", "check-config", "user", "dkim"):
        return run_admin(args, config_file, cfg)
    if args.command == "token":
        return token.manage_tokens(cfg, args)
    if args.command == "webhook":
        from relay.cli import webhook

        return webhook.manage_webhooks(cfg, args)
    if args.command == "suppress":
        return suppress.manage(cfg, args)
    return run_on_spool(args, cfg)


def run_admin(args: argparse.Namespace, config_file: str | None, cfg: config.Config) -> int:
    """The daemon's own commands (serve, worker) and those of relay.cli.admin."""
    from relay.cli import admin
    from relay.daemon import supervisor as daemon

    if args.command == "check-config":
        return admin.check_config(config_file, cfg)
    if args.command == "user":
        return admin.manage_users(cfg, args)
    if args.command == "dkim":
        return admin.dkim_keygen(args)
    if args.command == "worker":
        if args.role not in daemon.ROLES:
            raise Fail(f"worker: unknown role {args.role!r} (one of {', '.join(daemon.ROLES)})",
                       EX_USAGE)  # fmt: skip
        return daemon.worker(args.role, config_file, cfg)
    try:
        return daemon.serve(config_file, cfg)
    except daemon.StartupError as exc:
        raise Fail(str(exc)) from None
    except config.ConfigError as exc:
        raise Fail(f"configuration error: {exc}", EX_CONFIG) from None


def run_on_spool(args: argparse.Namespace, cfg: config.Config) -> int:
    """The queue, dlq and history commands, on the spool of cfg."""
    from relay.cli import history, queue
    from relay.ops import control
    from relay.spool.store import Spool, SpoolError

    spool = Spool(cfg.spool.path)
    if not spool.root.is_dir():
        raise Fail(f"spool {spool.root} does not exist (has the relay run with this config?)")
    commands: dict[tuple[str, str], Callable[[Spool, argparse.Namespace], int]] = {
        ("history", "rebuild"): history.rebuild,
        ("queue", "list"): queue.list_entries,
        ("queue", "show"): queue.show,
        ("queue", "summary"): queue.queue_summary,
        ("dlq", "list"): queue.list_entries,
        ("dlq", "show"): queue.show,
        ("dlq", "requeue"): functools.partial(queue.requeue, suppression=cfg.suppression),
    }
    try:
        return commands.get((args.command, args.action), queue.act)(spool, args)
    except (OSError, SpoolError, control.ControlError) as exc:
        raise Fail(str(exc)) from None
