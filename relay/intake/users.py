"""Intake, credentials: the SMTP AUTH users file (scrypt password hashes and the sender
domains each user may use), read by the intake and managed by `relay user`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

# RFC 7914 scrypt; n=2**15, r=8, p=1 costs ~0.1 s and 32 MiB per check on this class of
# machine: slow for an attacker, affordable per AUTH (checked in a worker thread).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
# A sender domain as users files have always been read (lowercase): looser than
# relay.mail.address.HOSTNAME_RE (empty or over-long labels, a hyphen at a label's edge) and
# stricter (no trailing dot); kept as it is so that no existing file is refused.
SENDER_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
HASH_RE = re.compile(r"^\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


class UsersError(Exception):
    """The users file or a user command is wrong; str() is one line."""


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    domains: tuple[str, ...]  # sender domains this user may use; ("*",) = any

    def may_send_as(self, domain: str) -> bool:
        return "*" in self.domains or domain.lower() in self.domains

    def line(self) -> str:
        return f"{self.name}:{self.password_hash}:{','.join(self.domains)}"


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"$scrypt$n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}${encoded[0]}${encoded[1]}"


def check_password(password: str, password_hash: str) -> bool:
    """Constant-time comparison against a stored scrypt hash. Blocking: ~0.1 s of CPU."""
    match = HASH_RE.match(password_hash)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt, expected = (base64.b64decode(match.group(i)) for i in (4, 5))
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32
    )


def load(path: Path) -> dict[str, User]:
    """Parse the users file: one `name:hash:domain,domain` per line, # comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersError(f"{path}: cannot read: {exc.strerror}") from None
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        users_entry = _parse_line(line, f"{path}:{number}")
        users[users_entry.name] = users_entry
    return users


def _parse_line(line: str, where: str) -> User:
    name, sep, rest = line.partition(":")
    password_hash, sep2, domains = rest.rpartition(":")
    if not sep or not sep2 or not NAME_RE.match(name) or not HASH_RE.match(password_hash):
        raise UsersError(f"{where}: expected name:$scrypt$…:domain,domain")
    return User(name, password_hash, parse_domains(domains, where))


def parse_domains(text: str, where: str = "--domains") -> tuple[str, ...]:
    domains = tuple(d.strip().lower() for d in text.split(",") if d.strip())
    if not domains:
        raise UsersError(f"{where}: give at least one sender domain (or * for any)")
    for domain in domains:
        if domain != "*" and not SENDER_DOMAIN_RE.match(domain):
            raise UsersError(f"{where}: {domain!r} is not a domain")
    return domains


def save(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically, readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    body = "".join(f"{u.line()}\n" for u in sorted(users.values(), key=lambda u: u.name))
    header = "# relay SMTP AUTH users: name:scrypt-hash:allowed sender domains (`relay user`)\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(header + body)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsersError(f"{name!r} is not a user name (letters, digits and ._@+-, at most 128)")
    return name
