"""DKIM signing stage: the intake signs each message for its From: domain (RFC 6376)."""

from __future__ import annotations

import base64
import email.policy
import hashlib
from collections import Counter
from pathlib import Path

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from relay.config import DkimConfig

MIN_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024-bit RSA keys (SHOULD 2048)


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

    def sign(self, message: bytes) -> bytes | None:
        """The DKIM-Signature header line(s) to prepend, or None when no key matches."""
        try:
            parsed = dkim.DKIM(message)
        except dkim.MessageFormatError:
            return None
        domain = _from_domain([v for n, v in parsed.headers if n.lower() == b"from"])
        if domain not in self._keys:
            return None
        selector, pem = self._keys[domain]
        # RFC 6376 §5.4.2: list a field once per instance present, so each one is signed.
        counts = Counter(n.lower() for n, _ in parsed.headers)
        include = [n for n in self._headers for _ in range(counts[n])]
        signature: bytes = parsed.sign(
            selector, domain.encode(), pem, canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        )  # fmt: skip
        return signature


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


def _load(path: Path) -> bytes:
    """The PEM of a usable RSA private key, or DkimError naming path and the problem."""
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
    return pem


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
