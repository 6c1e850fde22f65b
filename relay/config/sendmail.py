"""Configuration, the sendmail section: where `relay sendmail` drops mail for the daemon (the
maildrop), which envelope sender a script's mail gets, and the tenant it is submitted as."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.schema import option
from relay.config.values import boolean, hostname, path


def optional_hostname(value: Any) -> str:
    """A domain, or "" for smtp.hostname."""
    return "" if value in ("", None) else hostname(value)


def tenant_name(value: Any) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > 64:
        raise ValueError(f"{value!r} is not a tenant name (1-64 printable characters)")
    return value


@dataclass(frozen=True)
class SendmailConfig:
    # The drop directory `relay sendmail` writes to (mode 3733, owned by the relay's user and
    # group: local users may add files, nobody else may list or read them); the daemon picks
    # them up while it runs and when it starts (docs/sendmail.md).
    maildrop: Path = option(path, Path("/var/spool/relay-maildrop"))
    # A script's envelope sender without -f: the invoking user at this domain ("" =
    # smtp.hostname), or with sender_from_header the message's From address.
    default_domain: str = option(optional_hostname, "")
    sender_from_header: bool = option(boolean, False)
    # The tenant the maildrop's messages are submitted as (quotas, lanes, events, the API).
    tenant: str = option(tenant_name, "local")
