"""Failed inbound TLS handshakes, through the real daemon: a TLS 1.0 client (STARTTLS and
smtps), plain text and HTTP on the smtps port, a client that hangs up mid-handshake or refuses
our certificate. Each is one `tls_failed` line with the client, listener and reason, and a
count in relay_smtp_tls_failed_total; none is an `error` line, and the listeners go on. The
smtps handshake, now the relay's own, also takes a reloaded certificate."""

from __future__ import annotations

import collections
import signal
import smtplib
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.support.daemon import Relay, RelayFactory, free_port
from tests.support.mx import MxSink
from tests.support.tls import client_context, secured, tls_files

CLIENT = "127.0.0.9"  # the probes' source address: the log must name it, not the listener's
Probe = Callable[[int], None]


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))


def tls10() -> ssl.SSLContext:
    """A client that speaks TLS 1.0 only (OpenSSL's security level 0 lets it try)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # the client side of this check is deprecated on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def read_to_end(sock: socket.socket) -> None:
    """Wait for the relay to close the connection (bounded by the socket's timeout)."""
    for _ in range(100):
        if not sock.recv(4096):
            return


def handshake(port: int, context: ssl.SSLContext) -> None:
    with connect(port) as sock, pytest.raises(ssl.SSLError):
        context.wrap_socket(sock, server_hostname="relay.test")


def tls10_on_smtps(port: int) -> None:
    handshake(port, tls10())


def untrusting_client_on_smtps(port: int) -> None:
    handshake(port, ssl.create_default_context())  # our test CA is not among its roots


def sender(data: bytes) -> Probe:
    def send(port: int) -> None:
        with connect(port) as sock:
            sock.sendall(data)
            read_to_end(sock)

    return send


def client_hello() -> bytes:
    """The first bytes a real TLS client sends."""
    ours = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="relay.test"
    )
    with pytest.raises(ssl.SSLWantReadError):
        ours.do_handshake()
    return outgoing.read()


def hang_up_mid_handshake(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(client_hello()[:50])


def starttls_client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP(
        "127.0.0.1", port, local_hostname="app.test", timeout=10, source_address=(CLIENT, 0)
    )
    client.ehlo()
    return client


def tls10_starttls(port: int) -> None:
    with starttls_client(port) as client, pytest.raises(ssl.SSLError):
        client.starttls(context=tls10())


def starttls_then_hang_up(port: int) -> None:
    client = starttls_client(port)
    assert client.docmd("STARTTLS")[0] == 220
    client.close()


CASES: list[tuple[str, str, Probe, str]] = [
    ("TLS 1.0 client, STARTTLS", "submission", tls10_starttls, "unsupported_protocol"),
    ("TLS 1.0 client", "smtps", tls10_on_smtps, "unsupported_protocol"),
    ("HTTP request", "smtps", sender(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n"), "http_request"),
    ("plain SMTP", "smtps", sender(b"EHLO scanner.test\r\n"), "wrong_version_number"),
    ("hang-up mid-handshake", "smtps", hang_up_mid_handshake, "eof"),
    ("hang-up after STARTTLS", "relay", starttls_then_hang_up, "eof"),
    ("client refusing our certificate", "smtps", untrusting_client_on_smtps, "certificate_refused"),
]  # fmt: skip


def test_failed_handshakes_are_logged_and_counted_never_as_errors(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    ports = {"submission": free_port(), "smtps": free_port()}
    daemon = secured(relay, ca, tmp_path, **{k: [f"127.0.0.1:{p}"] for k, p in ports.items()})
    ports["relay"] = daemon.port
    for name, listener, probe, reason in CASES:
        mark = len(daemon.lines)
        probe(ports[listener])
        [line] = daemon.wait_event(
            "tls_failed", since=mark, client=CLIENT, listener=listener, reason=reason
        )
        assert line["level"] == "info" and line["detail"], (name, line)
    counted = collections.Counter((listener, reason) for _, listener, _, reason in CASES)
    for (listener, reason), expected in counted.items():
        got = daemon.metric("relay_smtp_tls_failed_total", listener=listener, reason=reason)
        assert got == expected, (listener, reason)
    assert daemon.metric("relay_smtp_tls_failed_total", listener="relay", reason="other") == 0
    assert smtps_certificate(ports["smtps"], ca)  # and it still serves a proper client
    assert no_sessions_within(daemon, timeout=10)
    errors = [line for line in daemon.lines if line.get("level") == "error"]
    assert not errors, errors


def test_a_reloaded_certificate_serves_the_next_smtps_connection(
    relay: RelayFactory, sink: MxSink, ca: trustme.CA, tmp_path: Path
) -> None:
    smtps = free_port()
    daemon = secured(relay, ca, tmp_path, smtps=[f"127.0.0.1:{smtps}"])
    before = smtps_certificate(smtps, ca)
    tls_files(ca, tmp_path / "tls")  # a renewed certificate in the same files
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("reloaded", process="intake")
    assert smtps_certificate(smtps, ca) != before


def smtps_certificate(port: int, ca: trustme.CA) -> bytes:
    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(ca), timeout=10) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        return client.sock.getpeercert(binary_form=True) or b""


def no_sessions_within(daemon: Relay, timeout: float) -> bool:
    """relay_smtp_sessions_active falls back to 0: no failed handshake leaves a session
    counted (or counted twice)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.metric("relay_smtp_sessions_active") == 0:
            return True
        time.sleep(0.05)
    return False
