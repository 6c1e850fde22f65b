"""Observation, logs: structlog JSON lines on stdout and the fixed vocabulary of log events."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from relay.mail import events
from relay.mail.reply import Reply

# The whole vocabulary; every event the relay logs is one of these words. A change of a message
# or recipient is logged under its event's name (relay.mail.events, docs/events.md).
EVENTS = events.NAMES | frozenset(
    {
        # mail flow
        "rejected", "replayed", "attempt", "retry_scheduled", "quota_held", "throttle_changed",
        "dns_query_failed", "webhook_failed", "stream_dropped", "picked_up", "maildrop_rejected",
        # bounces: a delivery status notification queued (relay.schedule.notices)
        "dsn_queued",
        # suppression lists (docs/suppression.md)
        "suppression_added", "suppression_removed",
        # operator actions
        "flushed", "reloaded", "reload_failed",
        # access
        "authenticated", "auth_failed", "insecure_permissions", "tls_failed",
        # what a library logs through Python's logging (aiosmtpd, asyncio), as JSON too
        "library",
        # spool and lifecycle
        "quarantined", "recovered", "indexed", "started", "ready", "stopping", "stopped",
        "child_exited", "child_restarting", "error",
    }
)  # fmt: skip


def configure(process: str) -> None:
    """JSON lines on stdout, one per event, tagged with the process role."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)
    # Libraries log through the stdlib: their records become JSON events as well (never raw
    # text with a client's bytes in it). aiosmtpd's per-command chatter is left out: the
    # intake logs and counts every refusal itself.
    logging.basicConfig(handlers=[_LibraryHandler()], level=logging.WARNING, force=True)
    logging.getLogger("mail.log").setLevel(logging.ERROR)


class _LibraryHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        fields = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = repr(record.exc_info[1])
        event("library", level=level, **fields)


def event(name: str, **fields: Any) -> None:
    """Log one event from the vocabulary (level= info unless given); a reply is flattened to
    its code, enhanced code and text."""
    level = fields.pop("level", "info")
    if name not in EVENTS:
        raise ValueError(f"log event {name!r} is not in the vocabulary")
    reply = fields.pop("reply", None)
    if isinstance(reply, Reply):
        fields.update(reply=str(reply), code=reply.code, enhanced=reply.enhanced)
    elif reply is not None:  # a reply of ours, already its text (rejected)
        fields["reply"] = reply
    getattr(structlog.get_logger(), level)(name, **fields)


def failure(stage: str, error: BaseException, **fields: Any) -> None:
    """An error on our side (I/O, a bug) that the relay survived: logged with its stage."""
    event("error", level="error", stage=stage, error=f"{type(error).__name__}: {error}", **fields)
