"""Observation, metrics: every Prometheus metric of the relay, declared together, with bounded
label sets that exist (at zero) before the first event.

The intake and scheduler processes write their values to files in run/metrics/
(prometheus-client's multiprocess mode, switched on by PROMETHEUS_MULTIPROC_DIR, which the
supervisor sets for them); the supervisor aggregates those files at each scrape and adds
what it measures itself (dead letters, free spool space, build info).
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay import __version__
from relay.config.lanes import LANES
from relay.mail.category import CATEGORIES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REJECT_REASONS = (
    "relay_denied", "bad_address", "smtputf8_required", "too_many_recipients",
    "message_too_big", "bare_line_end", "nul_byte", "bad_syntax", "bad_directive", "local_error",
    "shutting_down",
    "too_many_connections", "rate_limited", "banned", "auth_failed", "sender_not_owned",
    "over_quota", "disk_reserve", "idempotency_conflict",
    "suppressed",
)  # fmt: skip
QUEUE_STATES = (
    "queued", "scheduled", "active", "deferred", "throttled", "quota", "held", "suspended",
)  # fmt: skip
CONNECTION_KINDS = ("opened", "reused")
ATTEMPT_OUTCOMES = ("delivered", "temporary", "permanent")
RECIPIENT_RESULTS = ("delivered", "bounced", "expired")
OTHER_PROVIDER = "other"

# --- intake ---------------------------------------------------------------------------------
RECEIVED = Counter("relay_messages_received", "Messages accepted with 250 after DATA.")
REJECTED = Counter(
    "relay_messages_rejected", "Commands or messages refused at intake, by reason.", ["reason"]
)
SESSIONS = Gauge(
    "relay_smtp_sessions_active", "Open SMTP client sessions.", multiprocess_mode="livesum"
)
INTAKE_SECONDS = Histogram(
    "relay_intake_seconds",
    "From the end of DATA to the 250 reply (durable write included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

REPLAYED = Counter(
    "relay_idempotent_replays",
    "Submissions answered with the id of the message their idempotency key made before "
    "(no second message).",
)
QUOTA_HELD = Counter(
    "relay_quota_exceeded",
    "Messages over a sending quota, by what happened to them (held until the window, refused).",
    ["action"],
)
# A failed inbound TLS handshake, by listener and a bounded reason: the common OpenSSL
# reasons by name, a client that refused our certificate, hung up or stalled, and `other`.
TLS_FAILURE_REASONS = (
    "unsupported_protocol", "wrong_version_number", "http_request", "no_shared_cipher",
    "certificate_refused", "eof", "timeout", "other",
)  # fmt: skip
LISTENERS = ("relay", "submission", "smtps")
TLS_FAILED = Counter(
    "relay_smtp_tls_failed",
    "Inbound TLS handshakes (STARTTLS or smtps) that failed on the client's side, by listener "
    "and reason.",
    ["listener", "reason"],
)

# --- suppression lists (docs/suppression.md) -------------------------------------------------
SUPPRESSION_STAGES = ("rcpt", "attempt")
SUPPRESSED = Counter(
    "relay_recipients_suppressed",
    "Recipients not sent to because their address is on the tenant's suppression list, by"
    " where it was found: refused at RCPT, or dropped before an attempt.",
    ["stage"],
)

# --- webhooks (the hooks worker) -------------------------------------------------------------
WEBHOOK_RESULTS = ("delivered", "retry", "failed", "gone")
WEBHOOK_DELIVERIES = Counter(
    "relay_webhook_deliveries",
    "Webhook requests by endpoint and result: delivered (2xx), retry (timeout, connection, 5xx, "
    "429), failed (another 4xx: the event is dropped), gone (410: the endpoint is disabled).",
    ["webhook", "result"],
)
WEBHOOK_PENDING = Gauge(
    "relay_webhook_pending_events",
    "Events owed to a webhook endpoint and not yet taken by it (parked ones excluded).",
    ["webhook"],
    multiprocess_mode="livemax",
)
WEBHOOK_LAG = Gauge(
    "relay_webhook_lag_seconds",
    "Age of the oldest event a webhook endpoint has not taken yet (0 when none).",
    ["webhook"],
    multiprocess_mode="livemax",
)
WEBHOOK_DISABLED = Gauge(
    "relay_webhook_disabled",
    "1 while a webhook endpoint is disabled (it answered 410; relay webhook enable NAME).",
    ["webhook"],
    multiprocess_mode="livemax",
)
WEBHOOK_PARKED = Gauge(
    "relay_webhook_parked_events",
    "Events a webhook endpoint never took within the retry schedule (relay webhook replay).",
    ["webhook"],
    multiprocess_mode="livemax",
)

# --- the API (its worker) --------------------------------------------------------------------
STREAMS = Gauge(
    "relay_api_event_streams",
    "Open GET /v1/events streams (Server-Sent Events).",
    multiprocess_mode="livesum",
)
STREAMS_DROPPED = Counter(
    "relay_api_event_streams_dropped",
    "Event streams the relay ended because their client stopped reading (a write waited "
    "10 s on a full buffer).",
)
STREAMS_REFUSED = Counter(
    "relay_api_event_streams_refused",
    "Event streams refused with 429: the token held api.max_streams_per_token already.",
)

# --- scheduler ------------------------------------------------------------------------------
QUEUE = Gauge(
    "relay_queue_messages", "Queued messages by state.", ["state"], multiprocess_mode="livesum"
)
QUEUE_LANES = Gauge(
    "relay_queue_lane_messages",
    "Queued messages by lane (high, normal, low).",
    ["lane"],
    multiprocess_mode="livesum",
)
OLDEST = Gauge(
    "relay_queue_oldest_message_age_seconds",
    "Age of the oldest message in the queue (0 when empty): the backlog signal.",
    multiprocess_mode="livemax",
)
ATTEMPTS = Counter(
    "relay_delivery_attempts",
    "Recipient delivery attempts by outcome and destination provider.",
    ["outcome", "provider"],
)
BOUNCES = Counter(
    "relay_bounces",
    "Recipients that failed for good (bounced or expired), by bounce category.",
    ["category"],
)
DEFERRALS = Counter(
    "relay_delivery_deferrals",
    "Recipients deferred (temporary failure) by destination provider.",
    ["provider"],
)
DURATION = Histogram(
    "relay_delivery_duration_seconds",
    "One SMTP transaction to one domain: DNS, connect, through the final reply.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
TLS_RESULTS = ("verified", "encrypted", "plaintext", "failed")
TLS = Counter(
    "relay_delivery_tls",
    "Outbound sessions by TLS outcome: verified certificate, encrypted without verification, "
    "plain text, or failed (TLS required but not achieved: deferred, nothing sent).",
    ["result"],
)
STS_TESTING_FAILURES = Counter(
    "relay_delivery_mta_sts_testing_failures",
    "Sessions an MTA-STS policy in testing mode would have refused (delivered anyway).",
)
RECIPIENTS = Counter("relay_recipients", "Recipients reaching a final result.", ["result"])
CONNECTIONS = Counter(
    "relay_delivery_connections",
    "Outbound SMTP transactions by connection: a new one opened, or an idle one reused.",
    ["kind"],
)
THROTTLE_LEVEL = Gauge(
    "relay_destination_throttle_level",
    "Adaptive throttling level of each throttled destination (0 = full speed; only "
    "destinations throttled since the start have a series).",
    ["destination"],
    multiprocess_mode="livemax",
)
SUSPENDED = Gauge(
    "relay_destination_suspended",
    "1 while a destination is suspended after a reply matching throttle.suspend.",
    ["destination"],
    multiprocess_mode="livemax",
)
THROTTLE_EVENTS = Counter(
    "relay_destination_throttle_events",
    "Throttle signals (421, 4.7.28, rate wording, configured patterns) by provider.",
    ["provider"],
)
# --- bounces (delivery status notifications, the scheduler) ---------------------------------
DSN_ACTIONS = ("failed", "delayed", "relayed")
DSNS = Counter(
    "relay_dsn_queued",
    "Delivery status notifications (RFC 3464) queued to senders, by action.",
    ["action"],
)


def prime(providers: Iterable[str]) -> None:
    """Create every label combination so that each series reports 0 before its first event."""
    for reason in REJECT_REASONS:
        REJECTED.labels(reason)
    for state in QUEUE_STATES:
        QUEUE.labels(state)
    for lane in LANES:
        QUEUE_LANES.labels(lane)
    for category in CATEGORIES:
        BOUNCES.labels(category)
    names = [*providers, OTHER_PROVIDER]
    for provider in names:
        DEFERRALS.labels(provider)
        THROTTLE_EVENTS.labels(provider)
        for outcome in ATTEMPT_OUTCOMES:
            ATTEMPTS.labels(outcome, provider)
    for result in RECIPIENT_RESULTS:
        RECIPIENTS.labels(result)
    for stage in SUPPRESSION_STAGES:
        SUPPRESSED.labels(stage)
    for action in DSN_ACTIONS:
        DSNS.labels(action)
    for result in TLS_RESULTS:
        TLS.labels(result)
    for kind in CONNECTION_KINDS:
        CONNECTIONS.labels(kind)
    for action in ("held", "refused"):
        QUOTA_HELD.labels(action)
    for listener in LISTENERS:
        for reason in TLS_FAILURE_REASONS:
            TLS_FAILED.labels(listener, reason)


# --- supervisor: aggregation and its own measurements ---------------------------------------

RESERVE_HELP = "Free {} below which new mail is refused with 452 4.3.1 ({}; 0 = no reserve)."


def reset_directory(path: Path) -> None:
    """Start each daemon run with no value files from a previous one."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)


def forget_process(path: Path, pid: int) -> None:
    """Drop the live gauges of a worker that exited (its counters stay counted)."""
    multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


class Room(NamedTuple):
    """The spool's file system at a scrape: free bytes and inodes, and the reserve kept of each
    (relay.spool.reserve.room)."""

    free_bytes: int
    free_inodes: int
    reserve_bytes: int
    reserve_inodes: int


ROOM_HELP = {
    "free_bytes": "Free bytes on the spool's file system.",
    "free_inodes": "Free inodes on the spool's file system.",
    "reserve_bytes": RESERVE_HELP.format("bytes", "spool.min_free"),
    "reserve_inodes": RESERVE_HELP.format("inodes", "1% or 1000"),
}


class SpoolCollector(Collector):
    """Measured at scrape time: dead letters, free spool space against the reserve (with the
    settings of the last reload), and what this build is; whoever builds it says how to
    measure them."""

    def __init__(self, dead_letters: Callable[[], int], room: Callable[[], Room]) -> None:
        self.dead_letters = dead_letters
        self.room = room

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "relay_dead_letter_messages",
            "Messages in the dead-letter spool.",
            value=self.dead_letters(),
        )
        for name, value in self.room()._asdict().items():
            yield GaugeMetricFamily(f"relay_spool_{name}", ROOM_HELP[name], value=value)
        info = GaugeMetricFamily(
            "relay_build_info", "Version of relay and Python.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


def registry(
    multiproc_dir: Path, dead_letters: Callable[[], int], room: Callable[[], Room]
) -> CollectorRegistry:
    """The supervisor's registry: all workers' values plus the spool collector."""
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    reg.register(SpoolCollector(dead_letters, room))
    return reg
