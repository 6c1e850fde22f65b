"""Intake, DKIM: each message signed for its From: domain (RFC 6376)."""

from __future__ import annotations

import base64
import email.policy
import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from relay.config import ConfigError
from relay.config.dkim import DkimConfig

MIN_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024-bit RSA keys (SHOULD 2048)
RELAXED = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# RFC 6376 §3.4.4, as dkimpy applies it: white space before a line end goes, other runs of it
# become one space.
WSP_EOL = re.compile(rb"[\t ]+\r\n")
WSP = re.compile(rb"[\t ]+")


class DkimError(Exception):
    """A key that cannot be loaded or made; str() is one line for the operator."""


class Signer:
    """Signs with the key configured for the From: domain, relaxed/relaxed, rsa-sha256."""

    def __init__(self, cfg: DkimConfig) -> None:
        self._keys = {k.domain: (k.selector.encode(), _load(k.key_file)) for k in cfg.keys}
        # RFC 6376 §5.4.1 lists fields that SHOULD NOT be signed (Received, Bcc, …): relays
        # on the way add or drop them, so dkimpy refuses them and so do we, quietly.
        names = dict.fromkeys(n.encode() for n in ("from", *cfg.headers))
        self._headers = [n for n in names if n not in dkim.DKIM.SHOULD_NOT]

    def sign(self, head: bytes, body: Iterable[bytes]) -> bytes | None:
        """The DKIM-Signature header line(s) to prepend to a message with this header block
        (through its empty line) and body (in pieces, read only when a key matches), or None
        when no key matches."""
        try:
            parsed = _HeaderBlock(head)
        except dkim.MessageFormatError:
            return None
        domain = _from_domain([v for n, v in parsed.headers if n.lower() == b"from"])
        if domain not in self._keys:
            return None
        selector, key = self._keys[domain]
        # RFC 6376 §5.4.2: list a field once per instance present, so each one is signed.
        counts = Counter(n.lower() for n, _ in parsed.headers)
        include = [n for n in self._headers for _ in range(counts[n])]
        return parsed.sign_with(selector, domain.encode(), key, include, body_hash(body))


def signer(cfg: DkimConfig) -> Signer | None:
    """The signer for the configured keys, or None; ConfigError if a key is unusable."""
    if not cfg.keys:
        return None
    try:
        return Signer(cfg)
    except DkimError as exc:
        raise ConfigError(f"dkim.keys: {exc}") from None


class _HeaderBlock(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer given the header block alone and the body's hash: its own sign() wants
    the whole message in memory, and bodies are streamed from disk here."""

    def sign_with(
        self, selector: bytes, domain: bytes, key: Any, include: list[bytes], digest: bytes
    ) -> bytes:
        """What dkimpy's sign() returns for relaxed/relaxed rsa-sha256, the same tags in the
        same order, with digest as the body hash (bh=)."""
        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        self.include_headers = tuple(include)
        fields = [
            (b"v", b"1"), (b"a", self.signature_algorithm), (b"c", RELAXED.to_c_value()),
            (b"d", domain), (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", selector),
            (b"t", str(int(time.time())).encode()), (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(digest)),
            (b"b", b"0" * 60),  # dkimpy's placeholder: b= folds onto its own line
        ]  # fmt: skip
        name = b"DKIM-Signature"
        value: bytes = self.gen_header(fields, self.include_headers, RELAXED, name, key)
        return name + b": " + value


def body_hash(body: Iterable[bytes]) -> bytes:
    """SHA-256 of the body in relaxed canonical form (RFC 6376 §3.4.4), fed in pieces of any
    size: white space compressed line by line, empty lines at the end ignored (held back
    until a line with text follows them), an empty body hashed as nothing (§3.4.3)."""
    digest = hashlib.sha256()
    carry, held = b"", 0
    for piece in body:
        data = carry + piece
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        held = _hash_lines(digest, data[:cut], held)
    if carry:  # a last line without its line end gets one (§3.4.4)
        _hash_lines(digest, carry + b"\r\n", held)
    return digest.digest()


def _hash_lines(digest: Any, lines: bytes, held: int) -> int:
    """Hash whole lines after the held-back empty ones; the empty lines now at the end."""
    canonical = WSP.sub(b" ", WSP_EOL.sub(b"\r\n", lines))
    text = canonical.rstrip(b"\r\n")
    if not text:
        return held + canonical.count(b"\n")
    digest.update(b"\r\n" * held + text + b"\r\n")
    return canonical[len(text) :].count(b"\n") - 1


def keygen(domain: str, selector: str, bits: int = 2048) -> tuple[bytes, str]:
    """A new RSA private key (PEM) and its DNS TXT record line (RFC 6376 §3.6.2.2)."""
    if bits < MIN_BITS:
        raise DkimError(f"{bits}-bit RSA key: RFC 8301 §3.2 requires at least {MIN_BITS}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption())
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"
    # RFC 1035 §3.3: one character-string holds at most 255 octets.
    chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return pem, f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {chunks}"


def _load(path: Path) -> Any:
    """A usable RSA private key as dkimpy parsed it (what it signs with), or DkimError naming
    path and the problem."""
    try:
        pem = path.read_bytes().replace(b"\r\n", b"\n")  # dkimpy's PEM pattern wants LF
    except OSError as e:
        raise DkimError(f"DKIM key {path}: {e.strerror or e}") from None
    try:
        key = dkim.crypto.parse_pem_private_key(pem)
    # dkimpy's base64 and ASN.1 readers raise all three on malformed keys.
    except (dkim.crypto.UnparsableKeyError, ValueError, AssertionError):
        problem = "not an unencrypted PEM RSA private key (PKCS#1 or PKCS#8)"
        raise DkimError(f"DKIM key {path}: {problem}") from None
    bits = key["modulus"].bit_length()
    if bits < MIN_BITS:
        raise DkimError(f"DKIM key {path}: {bits}-bit RSA key, RFC 8301 §3.2 requires {MIN_BITS}")
    # dkimpy signs with the CRT values unchecked: a damaged key would send bad signatures
    # (and faulty CRT signatures leak the primes), so it must verify its own signature once.
    digest = hashlib.sha256(b"relay dkim self-test")
    try:
        sound = dkim.crypto.RSASSA_PKCS1_v1_5_verify(
            digest, dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, key), key
        )
    except (ArithmeticError, ValueError):
        sound = False
    if not sound:
        raise DkimError(f"DKIM key {path}: damaged RSA key (fails its own signature check)")
    return key


def _from_domain(values: list[bytes]) -> str | None:
    """The lowercase domain of the one address in the one From: field (RFC 5322 §3.6.2)."""
    if len(values) != 1:
        return None
    try:
        text = values[0].decode().replace("\r\n", "").strip()
        header = email.policy.default.header_factory("from", text)
        addresses = header.addresses
    except Exception:  # the stdlib parser raises IndexError, TypeError, … on some garbage
        return None
    if len(addresses) != 1 or header.defects or not addresses[0].username:
        return None
    domain: str = addresses[0].domain.lower()
    return domain or None
