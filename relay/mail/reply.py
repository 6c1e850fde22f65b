"""Mail, replies: one SMTP reply or transport error turned into delivered, temporary or
permanent (plus a throttle hint), as a pure function."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ENHANCED = r"[245]\.\d{1,3}\.\d{1,3}"  # RFC 3463 class.subject.detail
ENHANCED_RE = re.compile(rf"^({ENHANCED})\b")
# RFC 6647 / provider practice: rate-limit wording in a 4.7.0 (or any 4xx) reply.
THROTTLE_WORDS = re.compile(r"rate|too many|throttl|try again later|slow down", re.IGNORECASE)


class Verdict(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Reply:
    """One answer about a recipient: an SMTP reply, or a synthetic one for errors without one.

    code is None when no SMTP reply was received (connection refused, timeout, TLS failure);
    DNS outcomes that settle a recipient (NXDOMAIN, null MX) carry the RFC-mandated codes.
    """

    code: int | None
    enhanced: str | None
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Build from an SMTP reply, splitting off the RFC 3463 enhanced code if present."""
        text = " ".join(message.split())
        match = ENHANCED_RE.match(text)
        if match is None:
            return cls(code, None, text)
        return cls(code, match.group(0), text[match.end() :].strip())

    @classmethod
    def from_error(cls, error: BaseException, context: str = "") -> Reply:
        """Describe a transport error (no SMTP reply) as a reply without a code."""
        detail = str(error) or type(error).__name__
        return cls(None, None, f"{context}: {detail}" if context else detail)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reply:
        return cls(data.get("code"), data.get("enhanced"), str(data.get("text", "")))

    def __str__(self) -> str:
        parts = [str(self.code) if self.code is not None else "", self.enhanced or "", self.text]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class Classification:
    verdict: Verdict
    throttle: bool = False


def classify(outcome: Reply | BaseException) -> Classification:
    """Map a reply or an exception to an outcome; anything not understood is temporary."""
    if isinstance(outcome, BaseException) or outcome.code is None:
        return Classification(Verdict.TEMPORARY)
    code = outcome.code
    if 200 <= code < 300:
        return Classification(Verdict.DELIVERED)
    if 500 <= code < 600:
        return Classification(Verdict.PERMANENT)
    return Classification(Verdict.TEMPORARY, throttle=_is_throttle(outcome))


def _is_throttle(reply: Reply) -> bool:
    """421 (RFC 5321 §3.8), 4.7.28 (RFC 7372 rate limit) or rate wording in a 4xx reply."""
    if reply.code == 421 or reply.enhanced == "4.7.28":
        return True
    return (
        reply.code is not None
        and 400 <= reply.code < 500
        and bool(THROTTLE_WORDS.search(reply.text))
    )
