"""Command line, suppression lists: `relay suppress list|add|delete`, written straight to the
store in the spool (the daemon running or not); an entry added is on disk before the command
says so (docs/suppression.md)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from relay import config
from relay.api import tokens
from relay.cli.fail import Fail
from relay.config.values import duration
from relay.mail.events import DEFAULT_TENANT, iso
from relay.spool.store import Spool
from relay.suppression.store import KINDS, MANUAL, SHARED, Entry, Suppressions, checked, path_of

PAGE = 1000


def add_commands(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    """`relay suppress list|add|delete` and their options."""
    cmds = sub.add_parser(
        "suppress", help="manage the suppression lists (docs/suppression.md)"
    ).add_subparsers(dest="action", required=True, parser_class=type(common))
    listing = cmds.add_parser("list", parents=[common], help="live entries, oldest first")
    listing.add_argument("--tenant", help="only this tenant's (default: every tenant's)")
    listing.add_argument("--kind", choices=KINDS)
    listing.add_argument("--address", help="its own entry and the patterns that match it")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    add = cmds.add_parser("add", parents=[common], help="suppress an address or a pattern")
    add.add_argument("address", help="an address, or a pattern like *@example.com (blocklist)")
    add.add_argument("--tenant", default=DEFAULT_TENANT, help="whose list (default: default)")
    add.add_argument("--kind", default=MANUAL, help="blocklist, manual (default), unsubscribe "
                     "or complaint")  # fmt: skip
    add.add_argument("--reason", default="", help="why (shown by list and the API)")
    add.add_argument("--expires", metavar="DURATION", help="lift it after e.g. 30d (default: "
                     "never)")  # fmt: skip
    delete = cmds.add_parser("delete", parents=[common], help="lift an address or a pattern")
    delete.add_argument("address")
    delete.add_argument("--tenant", default=DEFAULT_TENANT, help="whose list (default: default)")


def manage(cfg: config.Config, args: argparse.Namespace) -> int:
    spool = Spool(cfg.spool.path)
    if not spool.root.is_dir():
        raise Fail(f"spool {spool.root} does not exist (has the relay run with this config?)")
    tenant = _tenant(cfg, args.tenant)
    lists = Suppressions(path_of(spool.history_path), durable=True)
    try:
        if args.action == "list":
            return _list(lists, tenant, args)
        if tenant is None:
            raise Fail(f"suppress {args.action}: --tenant names one tenant")
        if args.action == "add":
            return _add(lists, tenant, args)
        if not lists.delete(tenant, args.address):
            raise Fail(f"{args.address} is not on tenant {tenant}'s list")
        print(f"relay: {args.address.lower()} lifted from tenant {tenant}'s list")
        return 0
    finally:
        lists.close()


def _tenant(cfg: config.Config, given: str | None) -> str | None:
    """The list a command works on: the shared one while suppression.shared is on."""
    if cfg.suppression.shared:
        return SHARED
    try:
        return None if given is None else tokens.parse_tenant(given)
    except tokens.TokensError as exc:
        raise Fail(str(exc)) from None


def _add(lists: Suppressions, tenant: str, args: argparse.Namespace) -> int:
    try:
        address = checked(args.address, args.kind)
        ttl = None if args.expires is None else duration(args.expires)
    except ValueError as exc:
        raise Fail(f"suppress add: {exc}") from None
    now = time.time()
    entry = Entry(tenant, address, args.kind, args.reason, now,
                  None if ttl is None else now + ttl)  # fmt: skip
    lists.add(entry)
    until = "never" if entry.expires is None else iso(entry.expires)
    print(f"relay: {address} suppressed for tenant {entry.tenant} ({entry.kind}, expires "
          f"{until})")  # fmt: skip
    return 0


def _list(lists: Suppressions, tenant: str | None, args: argparse.Namespace) -> int:
    found: list[Entry] = []
    after: int | None = 0
    while after is not None:
        page, after = lists.entries(tenant, time.time(), args.kind, args.address, PAGE, after)
        found += page
    if args.json:
        json.dump([e.as_dict() for e in found], sys.stdout)
        print()
        return 0
    for e in found:
        shown = e.as_dict()
        print(f"{e.tenant}\t{e.address}\t{e.kind}\t{shown['created']}\t"
              f"{shown['expires'] or 'never'}\t{e.reason}")  # fmt: skip
    return 0
