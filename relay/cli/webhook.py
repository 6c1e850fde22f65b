"""Command line, webhooks: `relay webhook list|test|replay|enable|secret`. list, replay and
enable read and write each hook's outbox in the spool (hooks/NAME.sqlite), which a running
hooks worker reads at every step, so they act on it at once, and work with the relay stopped
too; test posts one signed `test` event straight to the hook and never touches the outbox;
secret makes a signing secret and adds it to the hook's secret file (the old ones stay, so
keys rotate without a gap)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import ssl
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from relay import config
from relay.cli.fail import EX_USAGE, Fail
from relay.cli.queue import iso
from relay.config import webhooks
from relay.config.values import DURATION_RE, duration
from relay.config.webhooks import WebhookConfig
from relay.hooks import payload, status
from relay.hooks.outbox import Outbox
from relay.hooks.sender import tls_context
from relay.spool.durable import replace_private
from relay.spool.layout import Layout

PREVIEW = 500  # bytes of a test reply's body printed
TEST_TYPE = "test"
LIST_COLUMNS = (
    ("name", "Name"), ("url", "URL"), ("state", "State"), ("pending", "Pending"),
    ("parked", "Parked"), ("lag_seconds", "Lag"), ("last_error", "Last error"),
)  # fmt: skip
SINCE_FORMS = (
    "an RFC 3339 time with a zone (2026-11-22T09:00:00Z) or a duration back from now "
    "(30s, 5m, 2h, 3d)"
)


def manage_webhooks(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "list":
        return list_hooks(cfg, args.json)
    hooks = {hook.name: hook for hook in cfg.webhooks}
    hook = hooks.get(args.name)
    if hook is None:
        known = ", ".join(hooks) or "none configured"
        raise Fail(f"no such webhook: {args.name} (webhooks: {known})")
    if args.action == "test":
        return send_test(hook)
    if args.action == "replay":
        return replay(cfg, hook.name, parse_since(args.since, time.time()))
    if args.action == "enable":
        return enable(cfg, hook.name)
    return new_secret(hook.name, hook.secret_file, args.replace)


# --- the outbox: list, replay, enable ---------------------------------------------------------


@contextlib.contextmanager
def outbox_of(cfg: config.Config, name: str) -> Iterator[Outbox | None]:
    """The hook's outbox, or None while it has none (status.opened: the CLI never makes one)."""
    try:
        with status.opened(Layout(cfg.spool.path).hooks_dir, name) as outbox:
            yield outbox
    except status.Unreadable as exc:
        raise Fail(str(exc)) from None


def describe(cfg: config.Config, hook: WebhookConfig) -> dict[str, Any]:
    """One hook as `relay webhook list --json` shows it."""
    try:
        return status.describe(Layout(cfg.spool.path).hooks_dir, hook)
    except status.Unreadable as exc:
        raise Fail(str(exc)) from None


def list_hooks(cfg: config.Config, as_json: bool) -> int:
    """Every configured hook: its state, events pending and parked, lag and last error."""
    items = [describe(cfg, hook) for hook in cfg.webhooks]
    if as_json:
        print(json.dumps(items, indent=2))
    elif not items:
        print("No webhooks configured")
    else:
        print(render(items))
    return 0


def render(items: list[dict[str, Any]]) -> str:
    """A table, one hook a line; a disabled hook's state says why."""
    cells = [[title for _, title in LIST_COLUMNS]]
    for item in items:
        shown = {**item, "lag_seconds": age(item["lag_seconds"])}
        if item["disabled"] is not None:
            shown["state"] = f"disabled: {item['disabled']}"
        cells.append(["-" if shown[key] is None else str(shown[key]) for key, _ in LIST_COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(LIST_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def age(seconds: float) -> str:
    """42s, 17m, 5h12m, 2d03h."""
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m"
    if whole < 172800:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def parse_since(text: str, now: float) -> float:
    """--since: RFC 3339 with a zone, or a duration back from now (30s, 5m, 2h, 3d; a plain
    number is seconds), as UTC epoch seconds."""
    if DURATION_RE.match(text):
        return now - duration(text)
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise Fail(f"--since: {text[:64]!r} is not {SINCE_FORMS}", EX_USAGE)
    return moment.timestamp()


def replay(cfg: config.Config, name: str, since: float) -> int:
    """Every event the outbox still owes the hook since `since`, parked ones too, due now."""
    with outbox_of(cfg, name) as outbox:
        count = 0 if outbox is None else outbox.requeue(since)
        disabled = None if outbox is None else outbox.flag("disabled")
    when = iso(since)
    print(f"relay: webhook {name}: {count} event{'s' * (count != 1)} owed since {when} due now")
    if disabled is not None and count:
        print(f"relay: webhook {name} is disabled ({disabled}): "
              f"relay webhook enable {name} to send them")  # fmt: skip
    return 0


def enable(cfg: config.Config, name: str) -> int:
    """Clear the hook's disabled flag (set by a 410 Gone); the hooks worker sends again."""
    with outbox_of(cfg, name) as outbox:
        was = None if outbox is None else outbox.flag("disabled")
        if outbox is not None and was is not None:
            outbox.set_flag("disabled", None)
    if was is None:
        print(f"relay: webhook {name} was not disabled, nothing to do")
    else:
        print(f"relay: webhook {name} enabled (it was disabled: {was})")
    return 0


# --- test -------------------------------------------------------------------------------------


def make_test_event(name: str, now: float) -> tuple[str, bytes]:
    """A `test` event's id and body, in the JSON form of the real ones (payload.body)."""
    event_id = f"test-{secrets.token_hex(8)}"
    document = {
        "id": event_id,
        "type": TEST_TYPE,
        "created_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": {"webhook": name},
    }
    return event_id, json.dumps(document, separators=(",", ":")).encode()


def send_test(hook: WebhookConfig) -> int:
    """POST one signed `test` event to the hook and print the reply: 0 for a 2xx, else 1 with
    one line on stderr naming what failed."""
    try:
        signing = webhooks.read_secrets(hook.secret_file)  # never sent unsigned
    except webhooks.SecretFileError as exc:
        raise Fail(f"webhook {hook.name}: {exc}") from None
    try:
        context = tls_context(hook.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise Fail(f"webhook {hook.name}: ca_file {hook.ca_file}: cannot load: {exc}") from None
    now = time.time()
    event_id, data = make_test_event(hook.name, now)
    head = payload.headers(event_id, now, data, signing)
    try:
        status, line, start = asyncio.run(post(hook, data, head, context))
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise Fail(f"webhook {hook.name}: POST {hook.url}: {failure(exc, hook.timeout)}") from None
    print(line)
    if start:
        text = start[:PREVIEW].decode("utf-8", "replace")
        text = text if len(start) <= PREVIEW else f"{text}… (cut at {PREVIEW} bytes)"
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if 200 <= status < 300:
        return 0
    print(f"relay: webhook {hook.name}: POST {hook.url}: answered {line.partition(' ')[2]}",
          file=sys.stderr)  # fmt: skip
    return 1


async def post(
    hook: WebhookConfig, data: bytes, head: dict[str, str], context: ssl.SSLContext
) -> tuple[int, str, bytes]:
    """(status, status line, the body's first PREVIEW + 1 bytes); redirects are not followed,
    as the sender does not follow them."""
    timeout = aiohttp.ClientTimeout(total=hook.timeout)
    connector = aiohttp.TCPConnector(ssl=context)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.post(hook.url, data=data, headers=head, allow_redirects=False) as answer,
    ):
        start = b""
        while len(start) <= PREVIEW:
            chunk = await answer.content.read(PREVIEW + 1 - len(start))
            if not chunk:
                break
            start += chunk
        version = answer.version or aiohttp.HttpVersion11
        line = f"HTTP/{version.major}.{version.minor} {answer.status} {answer.reason or ''}"
        return answer.status, line.rstrip(), start


def failure(exc: BaseException, timeout: float) -> str:
    """What failed, in a few words: connection refused, no answer in time, TLS, …"""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS: {exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


# --- secret -----------------------------------------------------------------------------------


def new_secret(name: str, file: Path, replace: bool) -> int:
    """Append a new secret to file (or, replacing, make it the only one); print it on stdout."""
    try:
        kept = "" if replace else existing(file)
        count = len(webhooks.parse_secrets(kept, str(file))) + 1  # a bad line: left alone
        secret = webhooks.new_secret()
        if kept and not kept.endswith("\n"):
            kept += "\n"
        save(file, kept + secret + "\n")
    except webhooks.SecretFileError as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"{file}: cannot write: {exc.strerror}") from None
    print(secret)  # alone on stdout, so that SECRET=$(relay webhook secret NAME) works
    if count == 1:
        said = f"new secret written to {file}, the only one in it"
    else:
        said = f"new secret added to {file} ({count} in it, each signs every event until removed)"
    print(f"relay: webhook {name}: {said}", file=sys.stderr)
    return 0


def existing(file: Path) -> str:
    """The file's text, "" if it does not exist yet."""
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise webhooks.SecretFileError(f"{file}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise webhooks.SecretFileError(f"{file}: not UTF-8 text") from None


def save(file: Path, text: str) -> None:
    """Replace the secret file atomically and durably, 0600 (durable.replace_private)."""
    replace_private(file, text)
