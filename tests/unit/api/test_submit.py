"""Submitting over HTTP, in process: the body made into an envelope and a message (MIME built
by email, directives in the header, the same bytes for the same request but for Date and
Message-ID, so the idempotency hash holds), and each refusal of the intake as its HTTP status."""

from __future__ import annotations

import base64
import email
import email.policy
from typing import Any

import pytest

from relay.api import compose
from relay.api.problems import Problem
from relay.api.submit import refusal
from relay.intake import directives
from relay.intake.idempotency import content_hash, smtp_data

HOST = "relay.test"


def submit(body: Any, key: str | None = None, max_recipients: int = 100) -> compose.Submission:
    return compose.submission(body, hostname=HOST, max_recipients=max_recipients, key=key)


def test_fields_make_a_mime_message_and_an_envelope() -> None:
    sub = submit(
        {"from": "Ann <ann@s.test>", "to": ["b@a.test", "Cé <c@a.test>"], "bcc": "d@a.test",
         "subject": "Hi", "text": "plain", "html": "<p>rich</p>", "send_at": 1893456000,
         "priority": "high", "batch_id": "b.1",
         "attachments": [{"filename": "x.bin", "content": base64.b64encode(b"\0\1").decode()}]},
        key="k 1",
    )  # fmt: skip
    assert sub.sender == "ann@s.test" and not sub.smtputf8
    assert sub.recipients == ["b@a.test", "c@a.test", "d@a.test"]
    head, asked = directives.extract(sub.data)
    assert asked == directives.Directives(1893456000.0, "high", "b.1", "k 1")
    msg = email.message_from_bytes(head, policy=email.policy.default)
    assert msg["To"] == "b@a.test, Cé <c@a.test>" and msg["Bcc"] is None
    assert msg.get_content_type() == "multipart/mixed" and b"\r\n" in sub.data
    assert msg["Message-ID"].endswith(f"@{HOST}>") and msg["Date"]
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_content() == b"\0\1"


def test_the_same_request_hashes_the_same() -> None:
    body = {"from": "a@s.test", "to": "b@a.test", "text": "t", "html": "<p>h</p>",
            "attachments": [{"filename": "f", "content": "AAAA"}]}  # fmt: skip
    one, two = submit(body, key="k"), submit(body, key="k")
    assert one.data != two.data  # Date or Message-ID
    hashes = {hashed(s) for s in (one, two)}
    assert len(hashes) == 1
    assert hashed(submit({**body, "text": "u"}, key="k")) not in hashes


def hashed(sub: compose.Submission) -> str:
    """The content hash the intake takes of it (relay/intake/handler.py _claim)."""
    head, _, body = sub.data.partition(b"\r\n\r\n")
    return content_hash(sub.sender, sub.recipients, smtp_data(head + b"\r\n\r\n", [body]))


def test_raw_gets_crlf_date_and_message_id_unless_it_has_them() -> None:
    raw = base64.b64encode(b"Subject: s\n\nbody\n").decode()
    sub = submit({"from": "a@s.test", "to": "b@a.test", "raw": raw})
    assert sub.data.endswith(b"Subject: s\r\n\r\nbody\r\n")
    assert sub.data.startswith(b"Date: ") and b"\r\nMessage-ID: <" in sub.data
    own = base64.b64encode(b"Date: x\r\nMessage-ID: <m@x>\r\n\r\nb").decode()
    assert submit({"from": "a@s.test", "to": "b@a.test", "raw": own}).data.startswith(b"Date: x")


def test_a_non_ascii_address_asks_for_smtputf8() -> None:
    sub = submit({"from": "a@s.test", "to": "josé@a.test", "text": "x"})
    assert sub.smtputf8 and "josé@a.test" in sub.data.decode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("text", None),
        ({"from": "a@s.test", "to": "b@a.test", "cc": 5}, "cc"),
        ({"from": "a@s.test", "to": "b@a.test", "headers": {"X-Relay-Priority": "high"}},
         "headers.X-Relay-Priority"),
        ({"from": "a@s.test", "to": "b@a.test", "headers": {"Reply-To": "a\nb"}},
         "headers.Reply-To"),
        ({"from": "a@s.test", "to": "b@a.test", "headers": {"Bad Name": "x"}}, "headers.Bad Name"),
        ({"from": "a@s.test", "to": "b@a.test", "attachments": {}}, "attachments"),
        ({"from": "a@s.test", "to": "b@a.test",
          "attachments": [{"filename": "f", "content": "AA==", "content_type": "pdf"}]},
         "attachments[0].content_type"),
        ({"from": "a@s.test", "to": "b@a.test", "attachments": [{"filename": "f", "x": 1}]},
         "attachments[0].x"),
        ({"from": "a@s.test", "to": "b@a.test", "raw": ""}, "raw"),
        ({"from": "a@s.test, b@s.test", "to": "b@a.test"}, "from"),
        ({"from": "a@s.test", "to": ["b@a.test", "c@a.test"]}, "to"),  # over max_recipients
        ({"from": "a@s.test", "to": "b@a.test", "send_at": True}, "send_at"),
    ],
)  # fmt: skip
def test_bad_bodies_name_their_field(body: Any, field: str | None) -> None:
    with pytest.raises(Problem) as caught:
        submit(body, max_recipients=1)
    assert caught.value.status == 400 and caught.value.body.get("field") == field


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("code", "text", "status", "retry_after"),
    [
        (550, "5.7.0 X-Relay-Idempotency-Key 'k' was used for a different message", 409, None),
        (553, "5.7.1 <a@x.test>: Sender address not owned by user alice", 403, None),
        (550, "5.7.1 From: header address a@x.test not owned by user alice", 403, None),
        (552, "5.3.4 Message too big for system", 413, None),
        (452, "4.7.1 Sending quota exceeded for user:alice: 1 messages per 1h; "
              "try again after 2027-01-15T08:01:40Z", 429, "100"),
        (452, "4.3.1 Insufficient system storage", 503, "5"),
        (451, "4.3.0 Error: queue file write error, try again later", 503, "5"),
        (421, "4.3.2 Service shutting down, try again later", 503, "5"),
        (550, "5.6.0 Message contains NUL characters", 400, None),
        (553, "5.6.7 Non-ASCII address requires SMTPUTF8", 400, None),
    ],
)  # fmt: skip
def test_refusals_become_statuses(
    code: int, text: str, status: int, retry_after: str | None
) -> None:
    problem = refusal(code, text, NOW)
    assert problem.status == status and text in problem.body["detail"]
    assert problem.headers.get("Retry-After") == retry_after
