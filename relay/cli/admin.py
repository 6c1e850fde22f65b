"""Command line, administration: `check-config`, `dkim keygen` and the `user` commands, which
edit the users file."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from relay import config
from relay.cli.fail import EX_CONFIG, EX_USAGE, Fail
from relay.config import values
from relay.daemon import supervisor as daemon
from relay.intake import dkim, users


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
