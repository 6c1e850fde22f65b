"""Suppression lists on the real daemon (issue 16): a hard bounce suppresses its address (the
next RCPT is refused, or with action accept the recipient is dropped with a `suppressed`
event) and a policy bounce does not; spaced soft bounces put an address on hold until it
expires; a pattern blocks its matches; tenants neither see nor change each other's lists; an
entry acknowledged by the CLI or the API survives a kill -9."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import add_token
from tests.support.daemon import Relay, RelayFactory, api_on, eventually, merge
from tests.support.mx import MxSink

pytestmark = pytest.mark.e2e


def settings(tmp_path: Path, **suppression: Any) -> dict[str, Any]:
    return merge(api_on(tokens_file=str(tmp_path / "tokens")), {"suppression": suppression})


def rcpt_reply(daemon: Relay, address: str) -> tuple[int, str]:
    with daemon.smtp() as client:
        client.mail("app@sender.test")
        code, text = client.rcpt(address)
        client.rset()
    return code, text.decode()


def listed(daemon: Relay, *args: str) -> list[dict[str, Any]]:
    return daemon.cli_json("suppress", "list", *args)


def test_a_hard_bounce_is_refused_at_rcpt_and_a_policy_bounce_is_not(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("gone@a.test", "550 5.1.1 <gone@a.test>: no such user")
    sink.script_rcpt("policy@a.test", "550 5.7.1 rejected by local policy")
    daemon = relay(settings(tmp_path))
    daemon.send(["gone@a.test", "policy@a.test", "ok@a.test"])
    sink.wait_for(1)
    eventually(lambda: bool(listed(daemon, "--kind", "hard_bounce")), timeout=10)
    # the policy bounce put nothing on the list (a DSN to app@sender.test, a domain that does
    # not exist, may bounce: its own hard bounce)
    [entry] = [e for e in listed(daemon) if e["address"] != "app@sender.test"]
    assert (entry["tenant"], entry["address"], entry["kind"]) == ("default", "gone@a.test",
                                                                  "hard_bounce")  # fmt: skip
    assert "5.1.1" in entry["reason"] and entry["expires"] is not None
    code, text = rcpt_reply(daemon, "Gone@a.test")
    assert code == 550
    day = entry["created"][:10]  # the UTC day it was made (a run may cross midnight)
    assert text == f"5.7.1 <Gone@a.test>: recipient suppressed (hard_bounce since {day})"
    assert rcpt_reply(daemon, "policy@a.test")[0] == 250
    assert daemon.metric("relay_recipients_suppressed_total", stage="rcpt") == 1
    daemon.cli("suppress", "delete", "gone@a.test")  # lifted: taken again
    assert rcpt_reply(daemon, "gone@a.test")[0] == 250


def test_with_accept_a_suppressed_recipient_is_dropped_with_an_event_and_patterns_block(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path, action="accept"))
    daemon.cli("suppress", "add", "news+*@a.test", "--kind", "blocklist", "--reason", "test")
    daemon.cli("suppress", "add", "manual@a.test")
    msg_id = daemon.send(["news+x@a.test", "manual@a.test", "news@a.test"])
    [message] = sink.wait_for(1)
    assert message.rcpt_tos == ["news@a.test"]  # the pattern's match and the manual entry dropped
    dropped = daemon.wait_event("suppressed", count=2, id=msg_id)
    assert sorted((e["rcpt"], e["kind"]) for e in dropped) == [
        ("manual@a.test", "manual"), ("news+x@a.test", "blocklist")]  # fmt: skip
    token = add_token(daemon, "ops")
    eventually(lambda: daemon.api("GET", f"/v1/messages/{msg_id}", token)[2]["status"]
               == "partial")  # fmt: skip
    _, _, body = daemon.api("GET", f"/v1/messages/{msg_id}", token)
    status = {r["address"]: r["status"] for r in body["recipients"]}
    assert status == {"news+x@a.test": "cancelled", "manual@a.test": "cancelled",
                      "news@a.test": "delivered"}  # fmt: skip
    assert [e["event"] for e in body["events"]].count("suppressed") == 2


def test_mail_queued_before_a_suppression_is_not_sent(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("late@a.test", "451 4.3.0 try later")
    daemon = relay(settings(tmp_path))
    msg_id = daemon.send(["late@a.test"])
    daemon.wait_event("deferred", id=msg_id)
    daemon.cli("suppress", "add", "late@a.test", "--kind", "unsubscribe")
    [event] = daemon.wait_event("suppressed", id=msg_id, timeout=15)
    assert event["kind"] == "unsubscribe"
    assert sink.received == []
    assert not daemon.events("dead_lettered", id=msg_id)  # ended, not failed: no bounce


def test_spaced_soft_bounces_put_an_address_on_hold_until_it_expires(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    sink.script_rcpt("soft@a.test", *["451 4.2.1 mailbox busy"] * 3, "250 2.1.5 ok")
    config = settings(tmp_path, on_hold=3, on_hold_spacing="1s", on_hold_for="6s")
    daemon = relay(merge(config, {"delivery": {"retry": {"schedule": ["1.5s"], "jitter": 0}}}))
    first = daemon.send(["soft@a.test"])
    daemon.wait_event("deferred", id=first, count=3, timeout=20)
    eventually(lambda: bool(listed(daemon, "--kind", "on_hold")), timeout=5)
    [held] = listed(daemon, "--kind", "on_hold")
    code, text = rcpt_reply(daemon, "soft@a.test")
    assert code == 550 and f"(on_hold since {held['created'][:10]})" in text
    # the queued message is not tried a fourth time while the address is on hold
    daemon.wait_event("suppressed", id=first, timeout=10)
    [entry] = listed(daemon, "--kind", "on_hold")
    left = time.time() - time.mktime(time.strptime(entry["expires"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert -7 < left + time.timezone < 0  # about 6 s after the third deferral
    eventually(lambda: rcpt_reply(daemon, "soft@a.test")[0] == 250, timeout=10)
    daemon.send(["soft@a.test"])
    assert sink.wait_for(1)[0].rcpt_tos == ["soft@a.test"]


def test_tenants_neither_see_nor_change_each_others_lists(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    acme = add_token(daemon, "acme", "--tenant", "acme")
    beta = add_token(daemon, "beta", "--tenant", "beta")
    status, _, entry = daemon.api("POST", "/v1/suppressions", acme,
                                  {"address": "X@a.test", "reason": "asked"})  # fmt: skip
    assert status == 201 and (entry["tenant"], entry["address"]) == ("acme", "x@a.test")
    assert daemon.api("GET", "/v1/suppressions", beta)[2]["suppressions"] == []
    assert daemon.api("GET", "/v1/suppressions?tenant=acme", beta)[0] == 403
    assert daemon.api("DELETE", "/v1/suppressions?address=x@a.test", beta)[0] == 404
    [mine] = daemon.api("GET", "/v1/suppressions?address=x@a.test", acme)[2]["suppressions"]
    assert mine["kind"] == "manual"
    message = {"from": "app@sender.test", "to": ["x@a.test"], "subject": "s", "text": "t"}
    assert daemon.api("POST", "/v1/messages", beta, message)[0] == 202
    assert sink.wait_for(1)[0].rcpt_tos == ["x@a.test"]  # beta's mail goes
    status, _, problem = daemon.api("POST", "/v1/messages", acme, message)
    assert status >= 400 and "recipient suppressed (manual since" in problem["detail"]
    assert rcpt_reply(daemon, "x@a.test")[0] == 250  # tenant default: not on its list
    bad = daemon.api("POST", "/v1/suppressions", acme, {"address": "*@a.test"})
    assert bad[0] == 400 and "blocklist" in bad[2]["detail"]
    assert daemon.api("DELETE", "/v1/suppressions?address=x@a.test", acme)[0] == 204


def test_acknowledged_entries_survive_a_kill_9(
    relay: RelayFactory, sink: MxSink, tmp_path: Path
) -> None:
    daemon = relay(settings(tmp_path))
    token = add_token(daemon, "ops")
    daemon.cli("suppress", "add", "cli@a.test", "--kind", "complaint")
    status, _, _ = daemon.api("POST", "/v1/suppressions", token,
                              {"address": "*@blocked.test", "kind": "blocklist"})  # fmt: skip
    assert status == 201
    daemon.kill9()  # at once after the acknowledgements
    daemon.start()
    for address, kind in (("cli@a.test", "complaint"), ("any@blocked.test", "blocklist")):
        code, text = rcpt_reply(daemon, address)
        assert code == 550 and f"({kind} since" in text
    assert rcpt_reply(daemon, "ok@a.test")[0] == 250
