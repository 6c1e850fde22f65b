"""API, the shapes: the JSON schemas of the messages and batches endpoints' bodies and their
query parameters, as /v1/openapi.json describes them."""

from __future__ import annotations

from relay.api.spec import Schema, ref

TIME = {"type": "string", "format": "date-time", "description": "UTC, ISO 8601"}
NULLABLE_TIME = {**TIME, "type": ["string", "null"]}
NULLABLE_STRING = {"type": ["string", "null"]}
STATUSES = [
    "queued",
    "scheduled",
    "quota",
    "deferred",
    "throttled",
    "suspended",
    "held",
    "active",
    "delivered",
    "bounced",
    "expired",
    "cancelled",
    "partial",
]
RECIPIENT_STATUSES = ["pending", "delivered", "bounced", "expired", "cancelled"]
REPLY: Schema = {
    "type": ["object", "null"],
    "description": "the remote reply (code null: no SMTP reply, e.g. a connection refused)",
    "required": ["code", "enhanced", "text"],
    "properties": {
        "code": {"type": ["integer", "null"]},
        "enhanced": NULLABLE_STRING,
        "text": {"type": "string"},
    },
}
RECIPIENT: Schema = {
    "type": "object",
    "required": ["address", "status", "attempts", "reply", "mx", "updated_at"],
    "properties": {
        "address": {"type": "string"},
        "status": {"enum": RECIPIENT_STATUSES},
        "attempts": {"type": "integer", "minimum": 0},
        "reply": ref("Reply"),
        "mx": {**NULLABLE_STRING, "description": "the host that gave the reply"},
        "next_attempt": NULLABLE_TIME,
        "updated_at": TIME,
    },
}
MESSAGE: Schema = {
    "type": "object",
    "required": [
        "id",
        "tenant",
        "sender",
        "batch_id",
        "status",
        "reason",
        "reason_detail",
        "expected_attempt_at",
        "send_at",
        "queued_at",
        "finished_at",
        "lane",
        "size",
        "attempts",
        "recipients",
    ],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9a-f]{20}$"},
        "tenant": {"type": "string"},
        "sender": {"type": "string", "description": "the envelope sender; empty for <>"},
        "batch_id": NULLABLE_STRING,
        "status": {
            "enum": STATUSES,
            "description": "while a recipient is pending, why the message waits (as `relay "
            "queue list` says); then how its recipients ended (partial: not alike)",
        },
        "reason": {**NULLABLE_STRING, "description": "why it waits; null once it ended"},
        "reason_detail": {**NULLABLE_STRING, "description": "more on the reason, e.g. a reply"},
        "expected_attempt_at": {
            **NULLABLE_TIME,
            "description": "when the relay expects to try next; null when held or ended",
        },
        "send_at": NULLABLE_TIME,
        "queued_at": NULLABLE_TIME,
        "finished_at": NULLABLE_TIME,
        "lane": {"type": ["string", "null"]},
        "size": {"type": ["integer", "null"]},
        "attempts": {"type": "integer", "minimum": 0},
        "held": {"type": "boolean"},
        "recipients": {"type": "array", "items": ref("Recipient")},
    },
}
ATTEMPT: Schema = {
    "type": "object",
    "required": ["at", "recipient", "attempt", "outcome", "reply", "mx", "ip", "tls"],
    "properties": {
        "at": TIME,
        "recipient": {"type": "string"},
        "attempt": {"type": ["integer", "null"]},
        "outcome": {"enum": ["deferred", "delivered", "bounced"]},
        "reply": ref("Reply"),
        "mx": NULLABLE_STRING,
        "ip": NULLABLE_STRING,
        "tls": {"type": ["boolean", "string", "null"]},
    },
}
DETAIL: Schema = {
    "allOf": [
        ref("Message"),
        {
            "type": "object",
            "required": ["history", "events"],
            "properties": {
                "history": {
                    "type": "array",
                    "description": "every delivery attempt, oldest first",
                    "items": ref("Attempt"),
                },
                "events": {
                    "type": "array",
                    "description": "the message's events (docs/events.md), with `seq`",
                    "items": {"type": "object", "required": ["event", "event_id", "seq"]},
                },
            },
        },
    ]
}
PAGE: Schema = {
    "type": "object",
    "required": ["messages", "next_cursor"],
    "properties": {
        "messages": {"type": "array", "items": ref("Message")},
        "next_cursor": {
            **NULLABLE_STRING,
            "description": "pass as cursor= for the next page; null: last",
        },
    },
}
CANCELLED: Schema = {
    "type": "object",
    "required": ["id", "status", "cancelled", "ended"],
    "properties": {
        "id": {"type": "string"},
        "status": {"enum": ["cancelled", "partial"]},
        "cancelled": {"type": "array", "items": {"type": "string"}},
        "ended": {
            "type": "array",
            "description": "recipients that had ended before, and how",
            "items": {
                "type": "object",
                "required": ["address", "status"],
                "properties": {
                    "address": {"type": "string"},
                    "status": {"enum": RECIPIENT_STATUSES},
                },
            },
        },
    },
}
COUNTS = {
    "type": "object",
    "additionalProperties": {"type": "integer"},
    "description": "how many of its messages are in each status (Message.status)",
}
BATCH: Schema = {
    "type": "object",
    "required": ["batch_id", "total", "counts"],
    "properties": {"batch_id": {"type": "string"}, "total": {"type": "integer"}, "counts": COUNTS},
}
BATCH_CANCELLED: Schema = {
    "type": "object",
    "required": ["batch_id", "cancelled", "busy", "total", "counts"],
    "properties": {
        "batch_id": {"type": "string"},
        "cancelled": {
            "type": "integer",
            "description": "messages whose pending recipients were cancelled now",
        },
        "busy": {
            "type": "integer",
            "description": "messages still in a delivery attempt "
            "after 15 s, not cancelled: DELETE again",
        },
        "total": {"type": "integer"},
        "counts": COUNTS,
    },
}
ADDRESS_LIST = {
    "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    "description": "`addr` or `Name <addr>`, or a list of them",
}
NEW_MESSAGE: Schema = {
    "type": "object",
    "description": "A message from fields, or `raw` (with from and to, cc or bcc). At least one "
    "recipient; to, cc and bcc together at most smtp.max_recipients. No other field.",
    "required": ["from"],
    "additionalProperties": False,
    "properties": {
        "from": {"type": "string", "description": "`addr` or `Name <addr>`: the sender"},
        "to": ADDRESS_LIST,
        "cc": ADDRESS_LIST,
        "bcc": {**ADDRESS_LIST, "description": "envelope only: no header field"},
        "subject": {"type": "string"},
        "text": {"type": "string", "description": "the text/plain body"},
        "html": {"type": "string", "description": "the text/html body (an alternative to text)"},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "more header fields (Reply-To, List-Unsubscribe, Message-ID, …); "
            "not From, To, Cc, Bcc, Subject, MIME or X-Relay-*",
        },
        "attachments": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["filename", "content"],
                "additionalProperties": False,
                "properties": {
                    "filename": {"type": "string"},
                    "content_type": {"type": "string", "default": "application/octet-stream"},
                    "content": {"type": "string", "contentEncoding": "base64"},
                },
            },
        },
        "send_at": {
            "oneOf": [TIME, {"type": "number"}],
            "description": "send no earlier than this (RFC 3339 with a zone, or epoch seconds)",
        },
        "priority": {"enum": ["high", "normal", "low"]},
        "batch_id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        "raw": {
            "type": "string",
            "contentEncoding": "base64",
            "description": "a whole RFC 5322 message instead of subject, text, html, headers "
            "and attachments (Date and Message-ID added when missing)",
        },
    },
}
QUEUED: Schema = {
    "type": "object",
    "required": ["id", "status", "expected_attempt_at"],
    "properties": {
        "id": {"type": "string", "description": "the queue id, as SMTP's `queued as <id>`"},
        "status": {"enum": STATUSES, "description": "queued, scheduled (send_at) or quota"},
        "expected_attempt_at": {**NULLABLE_TIME, "description": "when the first attempt is due"},
    },
}
COMPONENTS = {
    "NewMessage": NEW_MESSAGE,
    "Queued": QUEUED,
    "Reply": REPLY,
    "Recipient": RECIPIENT,
    "Message": MESSAGE,
    "Attempt": ATTEMPT,
    "MessageDetail": DETAIL,
    "MessagePage": PAGE,
    "Cancelled": CANCELLED,
    "Batch": BATCH,
    "BatchCancelled": BATCH_CANCELLED,
}


def parameter(place: str, name: str, description: str, schema: Schema) -> Schema:
    """An OpenAPI parameter: in the query (optional) or the path (required)."""
    return {"name": name, "in": place, "required": place == "path", "description": description,
            "schema": schema}  # fmt: skip


def query(name: str, description: str, schema: Schema) -> Schema:
    return parameter("query", name, description, schema)


def path(name: str, description: str, schema: Schema) -> Schema:
    return parameter("path", name, description, schema)


LIST_PARAMETERS = (
    query("status", "only messages in this status (Message.status)", {"enum": STATUSES}),
    query("recipient", "only messages to this address (case-insensitive)", {"type": "string"}),
    query("batch_id", "only this batch's messages", {"type": "string"}),
    query(
        "tenant", "only this tenant's (a token with a tenant sees its own only)", {"type": "string"}
    ),
    query("since", "only messages queued at or after this time", TIME),
    query("until", "only messages queued before this time", TIME),
    query(
        "limit",
        "messages per page (default 100)",
        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    ),
    query("cursor", "the next_cursor of the page before", {"type": "string"}),
)
MESSAGE_ID = path("id", "the queue id (`250 2.0.0 queued as <id>`)", {"type": "string"})
BATCH_ID = path(
    "id",
    "the batch id (X-Relay-Batch-Id, or batch_id over HTTP)",
    {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
)
IDEMPOTENCY_KEY = parameter(
    "header",
    "Idempotency-Key",
    "1-256 printable ASCII: the same key (same tenant, within idempotency.window) with the same "
    "content makes no second message",
    {"type": "string", "minLength": 1, "maxLength": 256},
)
