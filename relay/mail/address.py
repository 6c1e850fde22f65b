"""Mail, addresses: the RFC 5321 grammar of domains and address literals, written once."""

from __future__ import annotations

import ipaddress
import re


def _label(chars: str) -> str:
    """A label of chars and inner hyphens, at most 63 (RFC 1035 §2.3.1, RFC 5321 §4.1.2)."""
    return rf"[{chars}](?:[{chars}-]{{0,61}}[{chars}])?"


LABEL = _label("A-Za-z0-9")
DOMAIN = rf"{LABEL}(?:\.{LABEL})*"
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext
# A plain mailbox: a dot-atom local part, @, a host name (no quoting, no address literal).
MAILBOX = rf"{ATOM}(?:\.{ATOM})*@{DOMAIN}"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){DOMAIN}\.?$")
# A domain as RFC 6531 §3.3 allows it after SMTPUTF8: the same labels with UTF-8 letters too.
UTF8_LABEL = _label(r"A-Za-z0-9\u0080-\U0010ffff")
UTF8_DOMAIN_RE = re.compile(rf"^(?:{UTF8_LABEL}\.)*{UTF8_LABEL}$")


def address_literal(literal: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """RFC 5321 §4.1.3: the address in `[192.0.2.1]` or `[IPv6:2001:db8::1]`, else None."""
    inner = literal[1:-1] if literal.startswith("[") and literal.endswith("]") else ""
    version, text = (6, inner[5:]) if inner.lower().startswith("ipv6:") else (4, inner)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if address.version == version else None
