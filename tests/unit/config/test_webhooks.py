"""The webhooks section: an endpoint's defaults, the values it takes, one-line errors naming the
key, and the secret file the sender reads (whsec_ lines, comments and blanks skipped)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme
from standardwebhooks import Webhook

from relay.config import Config, load, parse
from relay.config.webhooks import (
    SecretFileError,
    WebhookConfig,
    new_secret,
    parse_secrets,
    read_secrets,
)
from relay.mail import events
from tests.support.config import error_of

ROOT = Path(__file__).resolve().parents[3]
HOOK = "{name: app, url: 'https://hooks.example.com/relay', secret_file: /etc/relay/app.secret"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks test vector's
OTHER = "whsec_KCkqKywtLi8wMTIzNDU2Nzg5Ojs8PT4/QEFCQ0RFRkc="  # bytes 40-71


def one(extra: str = "") -> WebhookConfig:
    (hook,) = parse(f"webhooks: [{HOOK}{extra}}}]").webhooks
    return hook


def test_defaults() -> None:
    assert Config().webhooks == ()
    assert load(ROOT / "conf" / "relay.yaml").webhooks == ()
    hook = one()
    assert (hook.name, hook.url) == ("app", "https://hooks.example.com/relay")
    assert hook.secret_file == Path("/etc/relay/app.secret")
    assert set(hook.events) == events.NAMES
    assert hook.tenants == ("*",)
    assert (hook.final_only, hook.timeout, hook.max_in_flight) == (False, 10.0, 4)
    assert (hook.ca_file, hook.allow_http) == (None, False)


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        (", events: [delivered, bounced, delivered]", "events", ("bounced", "delivered")),
        (", tenants: [shop, billing@example.com]", "tenants", ("shop", "billing@example.com")),
        (", final_only: true", "final_only", True),
        (", final_only: true, events: [delivered, expired]", "events", ("delivered", "expired")),
        (", timeout: 2.5", "timeout", 2.5),
        (", timeout: 1m", "timeout", 60.0),
        (", max_in_flight: 1", "max_in_flight", 1),
        (", ca_file: ''", "ca_file", None),
        (", url: 'http://127.0.0.9:8080/h'", "url", "http://127.0.0.9:8080/h"),
        (", url: 'http://[::1]/h'", "url", "http://[::1]/h"),
        (", url: 'http://LocalHost:81/h'", "url", "http://LocalHost:81/h"),
        (", url: 'http://hooks.internal/h', allow_http: true", "url", "http://hooks.internal/h"),
    ],
)  # fmt: skip
def test_values(extra: str, field: str, value: object) -> None:
    assert getattr(one(extra), field) == value


def test_a_ca_file_that_loads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    assert one(f", ca_file: {ca}").ca_file == ca


def test_several_hooks_keep_their_order() -> None:
    cfg = parse(
        "webhooks:\n"
        "  - {name: b, url: 'https://b.test/', secret_file: /s/b}\n"
        "  - {name: a-1, url: 'https://a.test/', secret_file: /s/a, tenants: [shop]}\n"
    )
    assert [(h.name, h.tenants) for h in cfg.webhooks] == [("b", ("*",)), ("a-1", ("shop",))]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("webhooks: {app: {}}", "webhooks: {'app': {}} is not a list"),
        ("webhooks: [5]", "webhooks: [0] 5 is not a mapping of webhook settings"),
        ("webhooks: [{url: 'https://a.test/', secret_file: /s}]", "webhooks: [0] name: missing (required: name, url, secret_file)"),
        ("webhooks: [{name: app, secret_file: /s}]", "webhooks: [0] url: missing"),
        ("webhooks: [{name: app, url: 'https://a.test/'}]", "webhooks: [0] secret_file: missing"),
        (f"webhooks: [{HOOK}, colour: blue}}]", "webhooks: [0] colour: unknown key (known: name, url, secret_file, events, tenants, final_only, timeout, max_in_flight, ca_file, allow_http)"),
        (f"webhooks: [{HOOK}, name: App}}]", "webhooks: [0] name: 'App' is not a webhook name (a-z, 0-9, _ and -)"),
        (f"webhooks: [{HOOK}, name: 'a b'}}]", "webhooks: [0] name: 'a b' is not a webhook name"),
        (f"webhooks: [{HOOK}}}, {HOOK}}}]", "webhooks: [1] name: 'app' is taken by an earlier webhook"),
        (f"webhooks: [{HOOK}, url: 'ftp://a.test/'}}]", "webhooks: [0] url: 'ftp://a.test/' is not an http or https URL with a host"),
        (f"webhooks: [{HOOK}, url: 'https:///path'}}]", "webhooks: [0] url: 'https:///path' is not an http or https URL with a host"),
        (f"webhooks: [{HOOK}, url: 'hooks.example.com'}}]", "is not an http or https URL with a host"),
        (f"webhooks: [{HOOK}, url: 'https://a.test:99999/'}}]", "webhooks: [0] url: 'https://a.test:99999/' is not an http or https URL"),
        (f"webhooks: [{HOOK}, url: 'http://hooks.example.com/'}}]", "webhooks: [0] url: plain http only to a loopback host (127.0.0.0/8, ::1, localhost): use https, or set allow_http: true"),
        (f"webhooks: [{HOOK}, url: 'http://10.0.0.1/'}}]", "webhooks: [0] url: plain http only to a loopback host"),
        (f"webhooks: [{HOOK}, url: 'http://localhost.example.com/'}}]", "webhooks: [0] url: plain http only to a loopback host"),
        (f"webhooks: [{HOOK}, secret_file: ''}}]", "webhooks: [0] secret_file: '' is not a path"),
        (f"webhooks: [{HOOK}, events: [delivered, sent]}}]", "webhooks: [0] events: [1] 'sent' is not an event (known: bounced, cancelled, dead_lettered, deferred, delivered, expired, held, received, released, requeued, suppressed)"),
        (f"webhooks: [{HOOK}, events: []}}]", "webhooks: [0] events: give at least one event, or leave events out for all of them"),
        (f"webhooks: [{HOOK}, events: delivered}}]", "webhooks: [0] events: 'delivered' is not a list"),
        (f"webhooks: [{HOOK}, final_only: true, events: [delivered, deferred]}}]", "webhooks: [0] events: deferred is never sent with final_only: true"),
        (f"webhooks: [{HOOK}, tenants: []}}]", 'webhooks: [0] tenants: give at least one tenant, or ["*"] for every tenant'),
        (f"webhooks: [{HOOK}, tenants: ['*', shop]}}]", 'webhooks: [0] tenants: "*" is every tenant: give it alone or list the tenants'),
        (f"webhooks: [{HOOK}, tenants: ['a shop']}}]", "webhooks: [0] tenants: [0] 'a shop' is not a tenant (letters, digits and ._@+-, or *)"),
        (f"webhooks: [{HOOK}, final_only: yes please}}]", "webhooks: [0] final_only: 'yes please' is not true or false"),
        (f"webhooks: [{HOOK}, timeout: 0}}]", "webhooks: [0] timeout: 0 must be above 0"),
        (f"webhooks: [{HOOK}, timeout: soon}}]", "webhooks: [0] timeout: 'soon' is not a duration"),
        (f"webhooks: [{HOOK}, max_in_flight: 0}}]", "webhooks: [0] max_in_flight: 0 must be at least 1"),
        (f"webhooks: [{HOOK}, allow_http: 1}}]", "webhooks: [0] allow_http: 1 is not true or false"),
        (f"webhooks: [{HOOK}, ca_file: /nonexistent/ca.pem}}]", "webhooks: [0] ca_file: cannot load /nonexistent/ca.pem: No such file or directory"),
    ],
)  # fmt: skip
def test_errors_name_the_key(text: str, error: str) -> None:
    assert error in error_of(text)


def test_a_new_secret_is_32_random_bytes_standard_webhooks_accepts() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith("whsec_") and len(first) == len("whsec_") + 44
    assert parse_secrets(first, "x") == [first]
    signature = Webhook(first).sign("msg_1", datetime.now(UTC), "{}")
    assert signature.startswith("v1,")


@pytest.mark.parametrize(
    ("text", "secrets"),
    [
        ("", []),
        (f"{SECRET}\n", [SECRET]),
        (f"# rotated 2026-12-01\n\n  {SECRET}  \r\n{OTHER}\n", [SECRET, OTHER]),
        (OTHER.rstrip("="), [OTHER.rstrip("=")]),  # padded or not, as the library takes it
    ],
)  # fmt: skip
def test_parse_secrets(text: str, secrets: list[str]) -> None:
    assert parse_secrets(text, "app.secret") == secrets


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", 1),  # no whsec_
        (f"{SECRET}\nwhsec_\n", 2),  # empty
        (f"# a\n{SECRET}\nwhsec_not*base64!\n", 3),
        ("whsec_c2hvcnQ=", 1),  # 5 bytes: under the 24 the standard asks for
        (f"whsec_{'A' * 88}", 1),  # 66 bytes: over 64
        (f"{SECRET} # the new one", 1),
        (f"{SECRET}A", 1),  # 33 base64 characters: a byte cut short
    ],
)  # fmt: skip
def test_a_malformed_line_is_named_not_shown(text: str, line: int) -> None:
    with pytest.raises(SecretFileError) as info:
        parse_secrets(text, "/etc/relay/app.secret")
    message = str(info.value)
    assert message == (
        f"/etc/relay/app.secret:{line}: not a secret (whsec_ and the base64 of 24 to 64 bytes)"
    )


def test_read_secrets(tmp_path: Path) -> None:
    file = tmp_path / "app.secret"
    file.write_text(f"# app\n{SECRET}\n")
    assert read_secrets(file) == [SECRET]
    file.write_text("# nothing yet\n")
    with pytest.raises(
        SecretFileError,
        match=r"app.secret: no secret in it \(make one: relay webhook secret NAME\)",
    ):
        read_secrets(file)
    file.write_bytes(b"\xff\xfe")
    with pytest.raises(SecretFileError, match=r"app.secret: not UTF-8 text$"):
        read_secrets(file)
    with pytest.raises(SecretFileError, match=r"missing: cannot read: No such file or directory$"):
        read_secrets(tmp_path / "missing")
