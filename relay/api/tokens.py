"""API, tokens: the bearer tokens file (SHA-256 of each token, its tenant, scopes and creation
time), read by the API worker (again whenever it changes) and managed by `relay token`."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.observe import logs
from relay.spool.durable import replace_private

SCOPES = ("read", "send", "cancel")
ALL_TENANTS = "*"  # in the file: a token that sees every tenant
PREFIX = "relay_"  # marks a relay token for secret scanners and in logs pasted by mistake
TOKEN_BYTES = 32
# Token names and tenants share the SMTP AUTH user names' grammar (a tenant is such a user).
NAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
CREATED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
HEADER = "# relay API tokens: name:sha256:tenant (* = all):scopes:created (`relay token`)\n"


class TokensError(Exception):
    """The tokens file or a token command is wrong; str() is one line."""


@dataclass(frozen=True)
class Token:
    name: str
    digest: str  # SHA-256 of the token, hex; the token itself is never stored
    tenant: str | None  # None: every tenant
    scopes: tuple[str, ...]
    created: str  # UTC, ISO 8601 to the second

    def line(self) -> str:
        tenant = ALL_TENANTS if self.tenant is None else self.tenant
        return f"{self.name}:{self.digest}:{tenant}:{','.join(self.scopes)}:{self.created}"


def digest(token: str) -> str:
    """A token is 32 random bytes, so a plain SHA-256 is as hard to invert as the token is to
    guess: no salt or slow hash (scrypt is for passwords people choose) is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def new(name: str, tenant: str | None, scopes: tuple[str, ...]) -> tuple[Token, str]:
    """A new token: its record for the file, and the token itself (shown once)."""
    secret = PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Token(name, digest(secret), tenant, scopes, created), secret


def load(path: Path) -> dict[str, Token]:
    """Parse the tokens file, by name; a missing file has no tokens."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    table: dict[str, Token] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            token = parse_line(line, f"{path}:{number}")
            table[token.name] = token
    return table


def parse_line(line: str, where: str) -> Token:
    parts = line.split(":", 4)
    if len(parts) != 5:
        raise TokensError(f"{where}: expected name:sha256:tenant:scopes:created")
    name, hexdigest, tenant, scopes, created = parts
    if not NAME_RE.match(name) or not DIGEST_RE.match(hexdigest):
        raise TokensError(f"{where}: expected name:sha256:tenant:scopes:created")
    if not CREATED_RE.match(created):
        raise TokensError(f"{where}: {created!r} is not a UTC time (2026-12-01T15:00:00Z)")
    try:
        return Token(name, hexdigest, parse_tenant(tenant), parse_scopes(scopes), created)
    except TokensError as exc:
        raise TokensError(f"{where}: {exc}") from None


def parse_tenant(text: str) -> str | None:
    if text == ALL_TENANTS:
        return None
    if not NAME_RE.match(text):
        raise TokensError(f"{text!r} is not a tenant (letters, digits and ._@+-, at most 128)")
    return text


def parse_scopes(text: str) -> tuple[str, ...]:
    """`read,send`: known scopes, in SCOPES order, at least one."""
    given = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(given - set(SCOPES))
    if unknown:
        raise TokensError(f"{unknown[0]!r} is not a scope (known: {', '.join(SCOPES)})")
    if not given:
        raise TokensError(f"give at least one scope ({', '.join(SCOPES)})")
    return tuple(s for s in SCOPES if s in given)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise TokensError(f"{name!r} is not a token name (letters, digits and ._@+-, at most 128)")
    return name


def save(path: Path, table: dict[str, Token]) -> None:
    """Replace the file atomically and durably, 0600 (durable.replace_private)."""
    body = "".join(f"{t.line()}\n" for t in sorted(table.values(), key=lambda t: t.name))
    replace_private(path, HEADER + body)


class Tokens:
    """The tokens file as the API sees it: read again when it changes, so `relay token add`
    and `delete` take effect on a running daemon at the next request."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.by_digest: dict[str, Token] = {}
        self.stamp: tuple[int, int, int] | None = None

    def find(self, token: str) -> Token | None:
        """The token's record, if the token is known. A dict lookup by digest: its timing
        tells an attacker about a SHA-256 of their guess, never about a stored token."""
        return self.table().get(digest(token))

    def table(self) -> dict[str, Token]:
        if self.path is None:
            return {}
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = (0, 0, 0)
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                self.by_digest = {t.digest: t for t in load(self.path).values()}
            except TokensError as exc:
                logs.failure("api", exc, action="load_tokens")  # keep the previous table
        return self.by_digest
