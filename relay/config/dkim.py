"""Configuration, the dkim section: one signing key per sender domain and the header
fields signed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.schema import option
from relay.config.values import as_list, hostname, indexed, path


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path


def dkim_keys(value: Any) -> tuple[DkimKey, ...]:
    """[{domain, selector, key_file}, …]: one signing key per sender domain."""

    def key(item: Any) -> DkimKey:
        if not isinstance(item, Mapping) or set(item) != {"domain", "selector", "key_file"}:
            raise ValueError(f"{item!r} needs exactly domain, selector and key_file")
        selector = str(item["selector"])
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", selector):
            raise ValueError(f"{selector!r} is not a DKIM selector")
        return DkimKey(hostname(item["domain"]).lower(), selector, path(item["key_file"]))

    keys = indexed(key, as_list(value))
    domains = [k.domain for k in keys]
    if len(domains) != len(set(domains)):
        raise ValueError("one key per domain")
    return tuple(keys)


def header_names(value: Any) -> tuple[str, ...]:
    def name(item: Any) -> str:
        if not isinstance(item, str) or not re.match(r"^[!-9;-~]+$", item):
            raise ValueError(f"{item!r} is not a header field name")
        return item.lower()

    names = tuple(indexed(name, as_list(value)))
    if "from" not in names:
        raise ValueError("must include from (RFC 6376 §5.4)")
    return names


DEFAULT_DKIM_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip


@dataclass(frozen=True)
class DkimConfig:
    # Signing keys per sender domain (From: header domain); no key = not signed.
    keys: tuple[DkimKey, ...] = option(dkim_keys, ())
    headers: tuple[str, ...] = option(header_names, DEFAULT_DKIM_HEADERS)
