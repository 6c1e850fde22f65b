"""Command line, webhooks: `relay webhook secret NAME [--replace]`, which makes a signing secret
and adds it to the hook's secret file (the old ones stay, so keys rotate without a gap)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from relay import config
from relay.cli.fail import Fail
from relay.config import webhooks
from relay.spool.durable import replace_private


def manage_webhooks(cfg: config.Config, args: argparse.Namespace) -> int:
    hooks = {hook.name: hook for hook in cfg.webhooks}
    hook = hooks.get(args.name)
    if hook is None:
        known = ", ".join(hooks) or "none configured"
        raise Fail(f"no such webhook: {args.name} (webhooks: {known})")
    return new_secret(hook.name, hook.secret_file, args.replace)


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
