"""The status page in a real browser (headless chromium) on the real daemon: served at / with
its own files under a strict Content-Security-Policy, signed in by ?token= (then gone from the
address) or by its form (a wrong token shows why), showing the queue, destinations, dead
letters, webhooks and the chart from GET /v1/status, and a message sent during the test in
its live feed as delivered (GET /v1/events), again after the API worker is killed (the page
reconnects with Last-Event-ID). Set RELAY_SCREENSHOT=docs/status-page.png to keep a
screenshot of the page with traffic of each kind."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.support.api import add_token, assert_problem
from tests.support.browser import Tab
from tests.support.daemon import Relay, RelayFactory, api_on, eventually
from tests.support.dns import DnsServer
from tests.support.mx import MxNet, MxSink
from tests.support.webhooks import Receiver

pytestmark = pytest.mark.e2e
SHOT = "RELAY_SCREENSHOT"


def served(daemon: Relay, path: str) -> tuple[int, dict[str, str], bytes]:
    assert daemon.api_url is not None
    with urllib.request.urlopen(daemon.api_url + path, timeout=10) as answer:
        return answer.status, dict(answer.headers), answer.read()


def with_api(relay: RelayFactory, tmp_path: Path, **settings: Any) -> Relay:
    return relay({**api_on(tokens_file=str(tmp_path / "tokens")), **settings})


def feed_row(page: Page, msg_id: str, event: str) -> Any:
    return page.locator(f'#feed li[data-id="{msg_id}"][data-event="{event}"]')


def test_the_page_shows_the_relay_and_a_message_sent_meanwhile_live(
    relay: RelayFactory, sink: MxSink, tmp_path: Path, tab: Tab
) -> None:
    daemon = with_api(relay, tmp_path)
    token = add_token(daemon, "ops")
    before = daemon.send(["early@a.test"])
    sink.wait_for(1)
    # ended in the queue too (the sink has it a moment before the relay's state is removed)
    eventually(lambda: daemon.api("GET", f"/v1/messages/{before}", token)[2]["status"]
               == "delivered")  # fmt: skip
    page = tab.page
    page.goto(f"{daemon.api_url}/?token={token}")
    expect(page.locator("#scheduler")).to_have_text("Scheduler running")
    assert "token" not in page.url  # taken, kept in the tab, and gone from the address
    expect(page.locator("#t-delivered")).to_have_text("1")  # the chart's hour, from history
    expect(page.locator("#t-queued")).to_have_text("0", timeout=10_000)  # a refresh: 5 s
    expect(page.locator("#queue")).to_contain_text("The queue is empty.")
    expect(page.locator("#dead")).to_contain_text("No dead letters.")
    expect(page.locator("#webhooks")).to_contain_text("No webhooks configured.")
    assert page.locator("#chart svg g.minute").count() == 60
    expect(page.locator("#chart svg rect.delivered")).to_have_count(1)
    expect(page.locator("#legend")).to_contain_text("Delivered1")
    expect(page.locator("#feed-state")).to_have_text("live")

    msg_id = daemon.send(["live@a.test"])
    expect(feed_row(page, msg_id, "received")).to_be_visible()
    delivered = feed_row(page, msg_id, "delivered")
    expect(delivered).to_be_visible(timeout=20_000)
    expect(delivered).to_contain_text("live@a.test")
    expect(delivered).to_contain_text("250")
    assert feed_row(page, before, "delivered").count() == 0  # live only: no replay of the past
    expect(page.locator("#t-delivered")).to_have_text("2", timeout=10_000)  # the next refresh
    assert tab.errors == []

    page.route("**/v1/events*", lambda route: route.abort())  # no stream opens for now
    os.kill(daemon.worker_pid("api"), signal.SIGKILL)  # and the open one drops
    expect(page.locator("#feed-state")).to_contain_text("reconnecting")
    meanwhile = daemon.send(["meanwhile@a.test"])
    sink.wait_for(3)
    page.unroute("**/v1/events*")
    # Shown only if the page asks for what came after the last event it saw (Last-Event-ID):
    # a stream opened without it starts at the newest event.
    expect(feed_row(page, meanwhile, "received")).to_be_visible(timeout=30_000)
    expect(feed_row(page, meanwhile, "delivered")).to_be_visible()
    expect(page.locator("#feed-state")).to_have_text("live")
    assert feed_row(page, msg_id, "delivered").count() == 1  # and nothing twice


def test_a_wrong_token_shows_the_form_again_with_why(
    relay: RelayFactory, tmp_path: Path, tab: Tab
) -> None:
    daemon = with_api(relay, tmp_path)
    token = add_token(daemon, "ops")
    acme = add_token(daemon, "acme", "--tenant", "acme")
    page = tab.page
    page.goto(f"{daemon.api_url}/")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    for wrong, why in (("relay_forged", "not known to this relay"),
                       (acme, "needs a token of every tenant")):  # fmt: skip
        page.fill("#token", wrong)
        page.click("#login-form button")
        expect(page.locator("#login-error")).to_contain_text(why)
        expect(page.locator("#login-form")).to_be_visible()
    page.fill("#token", token)
    page.click("#login-form button")
    expect(page.locator("#scheduler")).to_have_text("Scheduler running")
    expect(page.locator("#login-error")).to_be_hidden()
    page.reload()  # the token stays for the tab
    expect(page.locator("#scheduler")).to_have_text("Scheduler running")
    page.click("#signout")
    expect(page.locator("#login-form")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    page.reload()
    expect(page.locator("#login-form")).to_be_visible()
    assert all("401" in e or "403" in e for e in tab.errors), tab.errors  # the refused fetches


def test_the_page_and_its_files_are_served_strictly(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = with_api(relay, tmp_path)
    acme = add_token(daemon, "acme", "--tenant", "acme")
    for path, kind in (("/", "text/html"), ("/static/page.css", "text/css"),
                       ("/static/page.js", "text/javascript")):  # fmt: skip
        status, headers, body = served(daemon, path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
        assert headers["Cache-Control"] == "no-cache"
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    _, _, html = served(daemon, "/")
    assert b'<script src="/static/page.js"' in html and b"<script>" not in html
    assert daemon.api("GET", "/static/index.html")[0] == 404
    assert daemon.api("GET", "/static/../app.py")[0] == 404
    assert "/" not in daemon.api("GET", "/v1/openapi.json")[2]["paths"]
    assert_problem(daemon.api("GET", "/v1/status", acme), 403, "needs a token of every tenant")
    assert_problem(daemon.api("GET", "/v1/status"), 401, "Authorization: Bearer")


def mail(*head: str) -> bytes:
    return "\r\n".join([*head, "Subject: status page", "", "hello", ""]).encode()


def traffic(daemon: Relay, a: MxSink, b: MxSink, waves: int) -> list[str]:
    """Mail of each kind, in waves some seconds apart: delivered, deferred then delivered (high
    priority), bounced (a dead letter), scheduled for tomorrow (low priority), and to b.test,
    whose MX asks the relay to slow down once (throttled)."""
    tomorrow = f"X-Relay-Send-At: {int(time.time()) + 86400}"
    ids = []
    for wave in range(waves):
        if wave:
            time.sleep(20)
        gone = f"{('nobody', 'left', 'ex-staff')[wave % 3]}{wave}@a.test"
        a.script_rcpt(gone, f"550 5.1.1 <{gone}>: no such user")
        a.script_rcpt(f"later{wave}@a.test", *["451 4.2.1 mailbox busy"] * 2, "250 2.1.5 ok")
        b.script_rcpt(f"bulk{wave}@b.test", "421 4.7.28 rate limited, slow down", "250 ok")
        ids += [daemon.send([f"user{wave}-{n}@a.test"]) for n in range(3 + 4 * (wave % 3))]
        ids.append(daemon.send([gone]))
        ids.append(daemon.send([f"later{wave}@a.test"], mail("X-Relay-Priority: high")))
        ids.append(daemon.send([f"news{wave}@a.test"], mail(tomorrow, "X-Relay-Priority: low")))
        ids.append(daemon.send([f"bulk{wave}@b.test"]))
    return ids


def test_the_page_with_traffic_of_each_kind(
    relay: RelayFactory, sink: MxSink, dns_server: DnsServer, mx: MxNet, tmp_path: Path, tab: Tab
) -> None:
    dns_server.mx("b.test", (10, "mx.b.test"))
    dns_server.a("mx.b.test", "127.0.0.3")
    b = mx.sink("127.0.0.3")
    receiver = Receiver("whsec_" + "A" * 43)
    try:
        hook = {"name": "crm", "url": receiver.url, "secret_file": str(tmp_path / "crm.secret")}
        daemon = with_api(relay, tmp_path, webhooks=[hook],
                          delivery={"retry": {"schedule": ["3s"], "jitter": 0}})  # fmt: skip
        token = add_token(daemon, "ops")
        daemon.cli("webhook", "secret", "crm")  # read by the hooks worker at each send
        receiver.secret = (tmp_path / "crm.secret").read_text().split()[0]
        page = tab.page
        page.goto(f"{daemon.api_url}/?token={token}")
        expect(page.locator("#feed-state")).to_have_text("live")
        shot = os.environ.get(SHOT)
        traffic(daemon, sink, b, waves=9 if shot else 1)
        expect(page.locator("#dead li").first).to_contain_text("no such user", timeout=15_000)
        expect(page.locator("#t-dead")).not_to_have_text("0")
        # first: a send tried before the secret was written adds a "last error" row below it
        expect(page.locator("#webhooks tbody tr").first).to_contain_text("crm")
        expect(page.locator("#chart svg rect.bounced").first).to_be_visible()
        expect(page.locator("#chart svg rect.deferred").first).to_be_visible()
        expect(page.locator("#feed li[data-event=deferred]").first).to_contain_text("4.")
        expect(page.locator("#feed")).to_contain_text("451 4.2.1 mailbox busy")
        expect(page.locator("#destinations")).to_contain_text("4.7.28 rate limited")
        expect(page.locator("#queue")).to_contain_text("scheduled")  # tomorrow's, in the low lane
        page.wait_for_timeout(5500)  # one more refresh: the latest figures in the picture
        page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)
        if shot:
            shutil.copy(tmp_path / "status-page.png", shot)
        for width in (1280, 1024, 800):  # nothing wider than the window: no sideways scrolling
            page.set_viewport_size({"width": width, "height": 900})
            page.wait_for_timeout(300)  # the chart is drawn again for the new width
            assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(tmp_path / "status-page-800.png"), full_page=True)
        assert tab.errors == []
    finally:
        receiver.close()
