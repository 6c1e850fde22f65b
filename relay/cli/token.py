"""Command line, tokens: `relay token add|list|delete`, which edit the HTTP API's tokens file
(a running daemon notices the change by itself)."""

from __future__ import annotations

import argparse
import json
import sys

from relay import config
from relay.api import tokens
from relay.cli.fail import Fail

# A token sees and acts on every message of its tenant unless narrowed: an application's
# token reads, sends and cancels; a dashboard's is given --scope read.
DEFAULT_SCOPES = ",".join(tokens.SCOPES)


def manage_tokens(cfg: config.Config, args: argparse.Namespace) -> int:
    path = cfg.api.tokens_file
    if path is None:
        raise Fail("api.tokens_file is not set in the configuration")
    try:
        table = tokens.load(path)
        if args.action == "list":
            return list_tokens(table, args.json)
        name = tokens.check_name(args.name)
        if args.action == "add":
            if name in table:
                raise Fail(f"token {name} exists (delete it first to replace it)")
            tenant = None if args.tenant is None else tokens.parse_tenant(args.tenant)
            record, secret = tokens.new(name, tenant, tokens.parse_scopes(args.scope))
            table[name] = record
        elif table.pop(name, None) is None:
            raise Fail(f"no such token: {name}")
        tokens.save(path, table)
    except tokens.TokensError as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"{path}: {exc.strerror}") from None
    if args.action == "add":
        print(secret)  # alone on stdout, so that TOKEN=$(relay token add NAME) works
        print(f"relay: token {name} added ({describe(record)}); it is shown only this once",
              file=sys.stderr)  # fmt: skip
    else:
        print(f"relay: token {name} deleted")
    return 0


def describe(token: tokens.Token) -> str:
    tenant = "every tenant" if token.tenant is None else f"tenant {token.tenant}"
    return f"{tenant}, scopes {','.join(token.scopes)}"


def list_tokens(table: dict[str, tokens.Token], as_json: bool) -> int:
    """Name, tenant, scopes and creation time of each token; never the token (nor its hash)."""
    ordered = sorted(table.values(), key=lambda t: t.name)
    if as_json:
        print(json.dumps([
            {"name": t.name, "tenant": t.tenant, "scopes": list(t.scopes), "created": t.created}
            for t in ordered
        ]))  # fmt: skip
        return 0
    for t in ordered:
        tenant = tokens.ALL_TENANTS if t.tenant is None else t.tenant
        print(f"{t.name}\t{tenant}\t{','.join(t.scopes)}\t{t.created}")
    return 0
