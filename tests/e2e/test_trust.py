"""Trust at the intake, through the real daemon: no open relay, AUTH only over TLS with the right
password, submission and smtps listeners, sender ownership, AUTH bans, certificate reload, DKIM
signatures that verify, and the user and dkim commands."""

from __future__ import annotations

import base64
import hashlib
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

import dkim
import dns.resolver
import pytest
import trustme

from tests.support.daemon import Relay, RelayFactory, free_port
from tests.support.dns import DnsServer
from tests.support.mx import MxSink
from tests.support.smtp import RawClient
from tests.support.tls import PASSWORD, add_user, client_context, secured, tls_files

UNTRUSTED = {"relay_networks": ["10.0.0.0/8"]}  # 127.0.0.1 is an outsider


def starttls(daemon: Relay, ca: trustme.CA, port: int | None = None) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port or daemon.port, local_hostname="app.test", timeout=20)
    client.ehlo()
    assert client.has_extn("starttls")
    client.starttls(context=client_context(ca))
    client.ehlo()
    return client


def login_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@external.test",
        '"victim@external.test"@relay.test',
        "victim%external.test@relay.test",
        "external.test!victim@relay.test",
        "@relay.test:victim@external.test",
        "victim@external.test@relay.test",
        "postmaster@[127.0.0.1]",
        "victim@[192.0.2.1]",
    ],
)
def test_no_open_relay_for_outsiders(relay: RelayFactory, sink: MxSink, rcpt: str) -> None:
    """The patterns public open-relay checkers try: none is accepted from an outsider."""
    daemon = relay({"smtp": UNTRUSTED})
    with daemon.smtp() as client:
        client.mail("spammer@evil.test")
        code, text = client.rcpt(rcpt)
    assert code >= 500 and code != 250, (rcpt, code, text)
    assert list((daemon.spool / "queue").iterdir()) == []


def test_auth_only_over_tls_with_the_right_password(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(relay, ca, tmp_path, **UNTRUSTED)
    with daemon.smtp() as plain:
        assert not plain.has_extn("auth")  # not offered in clear (RFC 4954 §4)
        assert plain.docmd("AUTH", "PLAIN AGFsaWNlAHg=")[0] == 538
    with starttls(daemon, ca) as client:
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        started = time.monotonic()
        assert login_plain(client, "alice", "wrong password")[0] == 535
        assert time.monotonic() - started >= 0.9  # a failure is answered slowly
        assert login_plain(client, "nobody", PASSWORD)[0] == 535
    with starttls(daemon, ca) as client:
        code, text = login_plain(client, "alice", PASSWORD)
        assert (code, text[:5]) == (235, b"2.7.0")
        client.mail("app@sender.test")
        assert client.rcpt("user@a.test")[0] == 250  # an authenticated outsider may relay
        code, text = client.data(b"From: app@sender.test\r\nSubject: hi\r\n\r\nhello\r\n")
        assert code == 250
    [got] = sink.wait_for(1)
    assert b"with ESMTPSA id" in got.data
    with starttls(daemon, ca) as client:  # AUTH LOGIN too
        client.user, client.password = "alice", PASSWORD
        assert client.auth("LOGIN", client.auth_login)[0] == 235


def test_plaintext_auth_on_loopback_when_configured(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(relay, ca, tmp_path, auth={"users_file": str(tmp_path / "users"),
                                                "plaintext_on_loopback": True})  # fmt: skip
    with daemon.smtp() as client:
        assert client.has_extn("auth")
        assert login_plain(client, "alice", PASSWORD)[0] == 235


def test_sender_ownership(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(relay, ca, tmp_path)
    with starttls(daemon, ca) as client:
        login_plain(client, "alice", PASSWORD)
        code, text = client.mail("app@other.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        client.mail("app@sender.test")
        client.rcpt("user@a.test")
        code, text = client.data(b"From: ceo@other.test\r\nSubject: x\r\n\r\nhi\r\n")
        assert (code, text[:5]) == (550, b"5.7.1")
    assert sink.received == [] and list((daemon.spool / "queue").iterdir()) == []


def test_failed_auth_bans_the_ip(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(
        relay, ca, tmp_path,
        auth={"users_file": str(tmp_path / "users"), "max_failures": 2, "ban_time": "1h"},
    )  # fmt: skip
    with starttls(daemon, ca) as client:
        assert login_plain(client, "alice", "nope-nope-1")[0] == 535
        assert login_plain(client, "alice", "nope-nope-2")[0] == 535
    with RawClient(daemon.port) as banned:
        assert banned.reply().startswith(b"421 4.7.0 Too many failed authentications")
    daemon.wait_event("auth_failed", count=2)


def test_submission_and_smtps_listeners(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    submission, smtps = free_port(), free_port()
    daemon = secured(
        relay, ca, tmp_path,
        submission=[f"127.0.0.1:{submission}"], smtps=[f"127.0.0.1:{smtps}"],
    )  # fmt: skip
    with smtplib.SMTP("127.0.0.1", submission, timeout=20) as client:
        client.ehlo()
        assert client.mail("app@sender.test")[0] == 530  # STARTTLS first
    with starttls(daemon, ca, port=submission) as client:
        assert client.mail("app@sender.test")[0] == 530  # then AUTH
        client.rset()
        assert login_plain(client, "alice", PASSWORD)[0] == 235
        assert client.mail("app@sender.test")[0] == 250
    with smtplib.SMTP_SSL("127.0.0.1", smtps, context=client_context(ca), timeout=20) as client:
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        assert login_plain(client, "alice", PASSWORD)[0] == 235
        client.sendmail("app@sender.test", ["user@a.test"], b"From: app@sender.test\r\n\r\nhi\r\n")
    assert b"with ESMTPSA id" in sink.wait_for(1)[0].data


def test_modern_tls_only_and_certificate_reload_on_sighup(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(relay, ca, tmp_path)
    with starttls(daemon, ca) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        before = hashlib.sha256(client.sock.getpeercert(binary_form=True) or b"").hexdigest()
    old = client_context(ca)
    with warnings.catch_warnings():  # the client side of this check is deprecated on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
        client.ehlo()
        with pytest.raises((ssl.SSLError, smtplib.SMTPException, OSError)):
            client.starttls(context=old)
    tls_files(ca, tmp_path / "tls")  # a new certificate in the same files
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reloaded", process="intake")
    with starttls(daemon, ca) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        after = hashlib.sha256(client.sock.getpeercert(binary_form=True) or b"").hexdigest()
    assert after != before


def test_user_added_to_a_running_daemon_can_log_in(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    daemon = secured(relay, ca, tmp_path)
    add_user(daemon, "bob", "b.test,sender.test", password="bobs password")
    listed = daemon.cli("user", "list").stdout.splitlines()
    assert listed == ["alice\tsender.test", "bob\tb.test,sender.test"]
    with starttls(daemon, ca) as client:
        assert login_plain(client, "bob", "bobs password")[0] == 235
    mode = (tmp_path / "users").stat().st_mode & 0o777
    assert mode == 0o600
    assert "bob" not in (tmp_path / "users").read_text().split("bobs password")[0][-20:]
    assert "bobs password" not in (tmp_path / "users").read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["user", "add", "bad name", "--domains", "x.test", "--password-stdin"],
            "'bad name' is not a user name",
        ),
        (
            ["user", "add", "carol", "--domains", "not a domain", "--password-stdin"],
            "is not a domain",
        ),
        (["user", "passwd", "nobody", "--password-stdin"], "no such user: nobody"),
        (["user", "add", "alice", "--domains", "x.test", "--password-stdin"], "user alice exists"),
        (["dkim", "keygen", "bad_domain!", "s1"], "is not a host name"),
    ],
)
def test_user_and_dkim_commands_fail_in_one_line(
    relay: RelayFactory, ca: trustme.CA, tmp_path: Path, args: list[str], fragment: str
) -> None:
    daemon = relay({"smtp": {"auth": {"users_file": str(tmp_path / "users")}}}, start=False)
    add_user(daemon, "alice", "sender.test")
    proc = subprocess.run(
        [sys.executable, "-m", "relay", *args, "--config", str(daemon.config)],
        input="short\n" if "passwd" not in args else "long enough pw\n",
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr


def test_check_config_warns_about_readable_secrets(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay({"smtp": {"auth": {"users_file": str(tmp_path / "users")}}}, start=False)
    add_user(daemon, "alice", "sender.test")
    (tmp_path / "users").chmod(0o644)
    daemon.config.chmod(0o666)
    proc = daemon.cli("check-config")
    assert f"{tmp_path / 'users'} is open to other users (mode 644); chmod o-rwx" in proc.stderr
    assert f"{daemon.config} is open to other users (mode 666); chmod go-w" in proc.stderr
    daemon.config.chmod(0o644)
    (tmp_path / "users").chmod(0o600)
    assert daemon.cli("check-config").stderr == ""  # a readable config holds no secret


def test_bad_certificate_stops_the_start_in_one_line(relay: RelayFactory, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    daemon = relay(
        {"smtp": {"tls": {"cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}}},
        start=False,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(daemon.config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 78
    assert proc.stderr.startswith("relay: configuration error: smtp.tls: cannot load")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("lines", [1, 40_000], ids=["small", "spilled"])
def test_dkim_signatures_verify_against_dns(
    relay: RelayFactory, sink: MxSink, dns_server: DnsServer, tmp_path: Path, lines: int
) -> None:
    key = tmp_path / "sender.test.s1.key"
    daemon = relay({"dkim": {"keys": [{"domain": "sender.test", "selector": "s1", "key_file": str(key)}]}},
                   start=False)  # fmt: skip
    proc = daemon.cli("dkim", "keygen", "sender.test", "s1", "--out", str(key))
    name, klass, rdtype, *strings = proc.stdout.split()
    assert (name, klass, rdtype) == ("s1._domainkey.sender.test.", "IN", "TXT")
    dns_server.record("s1._domainkey.sender.test", "TXT", " ".join(strings))
    daemon.start()
    head = b"From: App <app@sender.test>\r\nTo: user@a.test\r\nSubject: signed\r\n\r\n"
    body = head + b"hello  \t there\r\n" * lines + b"\r\n\r\n"  # relaxed: spaces, empty lines
    daemon.send(["user@a.test"], body)
    [got] = sink.wait_for(1)
    assert got.data.startswith(b"DKIM-Signature: ")

    def lookup(qname: bytes, timeout: int = 5) -> bytes:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns_server.host]
        resolver.port = dns_server.port
        answer = resolver.resolve(qname.decode(), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    assert dkim.verify(got.data, dnsfunc=lookup)
    assert not dkim.verify(got.data.replace(b"hello", b"jello"), dnsfunc=lookup)


def test_required_tls_destination_without_starttls_is_deferred_not_sent_in_clear(
    relay: RelayFactory, sink: MxSink
) -> None:
    # A retry an hour away: the counts below are of the first attempt alone, however slowly
    # the CLI starts on a busy machine.
    daemon = relay(
        {"delivery": {"tls": {"policies": {"a.test": "required"}}, "retry": {"schedule": ["1h"]}}}
    )
    queue_id = daemon.send(["user@a.test"])
    [deferred] = daemon.wait_event("deferred", id=queue_id)
    assert (deferred["code"], deferred["enhanced"]) == (None, "4.7.4")
    assert "TLS is required" in deferred["reply"]
    assert "MAIL" not in sink.commands and sink.received == []
    [entry] = daemon.cli_json("queue", "list")
    assert entry["recipients"][0]["status"] == "deferred"
    assert daemon.metric("relay_delivery_tls_total", result="failed") == 1.0
