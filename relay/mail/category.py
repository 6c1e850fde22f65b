"""Mail, bounce categories: why a recipient failed or was deferred, in one of a few words an
application can act on, from the reply alone (its enhanced code first, then its text), as a
pure function (docs/bounces.md "Categories")."""

from __future__ import annotations

import re

from relay.mail.reply import Reply

INVALID_RECIPIENT = "invalid_recipient"
BAD_DOMAIN = "bad_domain"
MAILBOX_FULL = "mailbox_full"
POLICY = "policy"
SPAM_BLOCK = "spam_block"
RATE_LIMITED = "rate_limited"
AUTH_FAILURE = "auth_failure"
TLS_FAILURE = "tls_failure"
DNS_FAILURE = "dns_failure"
TIMEOUT = "timeout"
UNKNOWN = "unknown"
CATEGORIES = (
    INVALID_RECIPIENT, BAD_DOMAIN, MAILBOX_FULL, POLICY, SPAM_BLOCK, RATE_LIMITED, AUTH_FAILURE,
    TLS_FAILURE, DNS_FAILURE, TIMEOUT, UNKNOWN,
)  # fmt: skip

# RFC 3463 / the IANA registry of enhanced status codes: subject.detail → category, where the
# code alone says it. Generic codes (x.0.0, x.7.0, x.7.1, ...) are left to the text.
BY_CODE = {
    "1.1": INVALID_RECIPIENT, "1.6": INVALID_RECIPIENT, "2.1": INVALID_RECIPIENT,
    "1.2": BAD_DOMAIN, "1.10": BAD_DOMAIN,
    "2.2": MAILBOX_FULL, "3.1": MAILBOX_FULL,
    "2.3": POLICY, "3.4": POLICY, "6.7": POLICY, "7.12": POLICY,
    "4.3": DNS_FAILURE, "4.4": DNS_FAILURE,
    "4.2": TIMEOUT, "4.7": TIMEOUT,
    "4.5": RATE_LIMITED, "7.28": RATE_LIMITED,
    "7.4": TLS_FAILURE, "7.5": TLS_FAILURE, "7.10": TLS_FAILURE,
    "7.8": AUTH_FAILURE, "7.9": AUTH_FAILURE, "7.11": AUTH_FAILURE, "7.20": AUTH_FAILURE,
    "7.21": AUTH_FAILURE, "7.22": AUTH_FAILURE, "7.23": AUTH_FAILURE, "7.24": AUTH_FAILURE,
    "7.25": AUTH_FAILURE, "7.26": AUTH_FAILURE, "7.27": AUTH_FAILURE,
}  # fmt: skip


def _words(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(patterns), re.IGNORECASE)


# Text patterns, tried in this order (the first that matches wins): a reply that names spam or
# a blocklist is a spam block even when it also says "rejected".
BY_TEXT: tuple[tuple[str, re.Pattern[str]], ...] = (
    (SPAM_BLOCK, _words(r"spam", r"block ?list", r"black ?list", r"\bdnsbl\b", r"\brbl\b",
                        r"spamhaus", r"reputation", r"\blisted\b", r"junk", r"blocked")),
    (RATE_LIMITED, _words(r"rate.?limit", r"too many", r"throttl", r"too quickly",
                          r"slow down", r"try again later", r"\brate\b")),
    (AUTH_FAILURE, _words(r"\bspf\b", r"\bdkim\b", r"\bdmarc\b", r"authenticat",
                          r"credentials")),
    (TLS_FAILURE, _words(r"\btls\b", r"starttls", r"\bssl\b", r"certificate", r"handshake",
                         r"encrypt")),
    (MAILBOX_FULL, _words(r"quota", r"mailbox (is )?full", r"over ?quota", r"storage",
                          r"out of space", r"insufficient")),
    (BAD_DOMAIN, _words(r"nxdomain", r"domain (does not exist|not found|unknown)",
                        r"no mx", r"null mx", r"host (not found|unknown)")),
    (DNS_FAILURE, _words(r"\bdns\b", r"servfail", r"lookup", r"resolv",
                         r"name or service not known")),
    (INVALID_RECIPIENT, _words(r"user unknown", r"unknown user", r"no such (user|mailbox|"
                               r"recipient)", r"does not exist", r"invalid (recipient|mailbox|"
                               r"address)", r"recipient (rejected|unknown|not found)",
                               r"mailbox (unavailable|not found|disabled)", r"address rejected",
                               r"not a valid", r"unrouteable")),
    (TIMEOUT, _words(r"timed? ?out", r"timeout")),
    (POLICY, _words(r"policy", r"not (allowed|permitted|authorized)", r"denied",
                    r"prohibited", r"relay", r"(message|delivery|mail) refused")),
)  # fmt: skip


def categorize(reply: Reply | None) -> str:
    """The category of a failed or deferred recipient's last reply (None: no reply yet)."""
    if reply is None:
        return UNKNOWN
    by_code = BY_CODE.get(_subject(reply.enhanced)) if reply.enhanced else None
    if by_code is not None:
        return by_code
    for category, pattern in BY_TEXT:
        if pattern.search(reply.text):
            return category
    if reply.enhanced is not None and _subject(reply.enhanced).startswith("7."):
        return POLICY  # x.7.x: security or policy status, nothing more specific said
    return UNKNOWN


def _subject(enhanced: str) -> str:
    """subject.detail of class.subject.detail."""
    return enhanced.partition(".")[2]
