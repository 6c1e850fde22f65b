"""Configuration, the webhooks section: the endpoints the journal's events are sent to, and
their secret files (`whsec_` secrets, one a line, made by `relay webhook secret`)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.config.schema import build, option
from relay.config.values import (
    as_list,
    boolean,
    duration,
    indexed,
    mapping,
    optional_path,
    path,
    positive_int,
)
from relay.mail import events

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
# Tenants share the SMTP AUTH user names' grammar (relay/api/tokens.py NAME_RE).
TENANT_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
ALL_TENANTS = "*"
EVENTS = tuple(sorted(events.NAMES))
REQUIRED = ("name", "url", "secret_file")
LOOPBACK = "127.0.0.0/8, ::1, localhost"
# Standard Webhooks: `whsec_` and the base64 of the key, which should be 24 to 64 bytes.
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
SECRET_SIZES = range(24, 65)


def hook_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a webhook name (a-z, 0-9, _ and -)")
    return value


def url(value: Any) -> str:
    """An http or https URL with a host (and a valid port, if one is given)."""
    text = value if isinstance(value, str) else ""
    try:
        parts = urlsplit(text)
        _ = parts.port  # a port out of range raises ValueError
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http or https URL with a host")
    return text


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def event_names(value: Any) -> tuple[str, ...]:
    """Names from the journal's vocabulary, at least one, in EVENTS order."""

    def name(item: Any) -> str:
        if item not in events.NAMES:
            raise ValueError(f"{item!r} is not an event (known: {', '.join(EVENTS)})")
        return str(item)

    given = set(indexed(name, as_list(value)))
    if not given:
        raise ValueError("give at least one event, or leave events out for all of them")
    return tuple(n for n in EVENTS if n in given)


def tenants(value: Any) -> tuple[str, ...]:
    """Tenant names, or ["*"] for every tenant."""

    def tenant(item: Any) -> str:
        if item == ALL_TENANTS:
            return ALL_TENANTS
        if not isinstance(item, str) or not TENANT_RE.match(item):
            raise ValueError(f"{item!r} is not a tenant (letters, digits and ._@+-, or *)")
        return item

    given = tuple(dict.fromkeys(indexed(tenant, as_list(value))))
    if not given:
        raise ValueError('give at least one tenant, or ["*"] for every tenant')
    if ALL_TENANTS in given and len(given) > 1:
        raise ValueError('"*" is every tenant: give it alone or list the tenants')
    return given


def timeout(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be above 0")
    return seconds


@dataclass(frozen=True)
class WebhookConfig:
    """One endpoint the journal's events are sent to, signed with its secret file's secrets."""

    name: str = option(hook_name, "")  # [a-z0-9_-]+: metrics label and CLI argument
    url: str = option(url, "")
    secret_file: Path = option(path, Path())  # read when used, not at config load
    events: tuple[str, ...] = option(event_names, EVENTS)
    tenants: tuple[str, ...] = option(tenants, (ALL_TENANTS,))  # "*": every tenant
    final_only: bool = option(boolean, False)  # no deferred: one event per recipient's end
    timeout: float = option(timeout, 10.0)
    max_in_flight: int = option(positive_int, 4)
    ca_file: Path | None = option(optional_path, None)  # extra CA for https
    allow_http: bool = option(boolean, False)  # plain http beyond loopback


def webhooks(value: Any) -> tuple[WebhookConfig, ...]:
    """[{name, url, secret_file, …}, …], names unique."""
    hooks = indexed(webhook, as_list(value))
    seen: set[str] = set()
    for index, hook in enumerate(hooks):
        if hook.name in seen:
            raise ValueError(f"[{index}] name: {hook.name!r} is taken by an earlier webhook")
        seen.add(hook.name)
    return tuple(hooks)


def webhook(item: Any) -> WebhookConfig:
    item = mapping(item, "webhook settings")
    missing = [key for key in REQUIRED if key not in item]
    if missing:
        raise ValueError(f"{missing[0]}: missing (required: {', '.join(REQUIRED)})")
    hook = build(WebhookConfig, item, "")
    scheme, host = urlsplit(hook.url).scheme, urlsplit(hook.url).hostname or ""
    if scheme == "http" and not hook.allow_http and not is_loopback(host):
        raise ValueError(
            f"url: plain http only to a loopback host ({LOOPBACK}): use https, "
            "or set allow_http: true"
        )
    if hook.final_only and "events" in item and events.DEFERRED in hook.events:
        raise ValueError("events: deferred is never sent with final_only: true")
    return hook


class SecretFileError(Exception):
    """A secret file cannot be read or has a line that is not a secret; str() is one line."""


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def parse_secrets(text: str, where: str) -> list[str]:
    """The `whsec_` lines of a secret file's text, in order; blank lines and # comments are
    skipped, anything else is an error naming the line (never showing it: it may be a key)."""
    found = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not is_secret(line):
            raise SecretFileError(
                f"{where}:{number}: not a secret (whsec_ and the base64 of 24 to 64 bytes)"
            )
        found.append(line)
    return found


def is_secret(line: str) -> bool:
    if not line.startswith(SECRET_PREFIX):
        return False
    encoded = line[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(key) in SECRET_SIZES


def read_secrets(file: Path) -> list[str]:
    """The secrets a hook signs with, at least one; SecretFileError when the file cannot be
    read, has a malformed line or no secret."""
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretFileError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{file}: not UTF-8 text") from None
    found = parse_secrets(text, str(file))
    if not found:
        raise SecretFileError(f"{file}: no secret in it (make one: relay webhook secret NAME)")
    return found
