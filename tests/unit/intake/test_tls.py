"""The intake's TLS failures in process: OpenSSL's and asyncio's errors mapped to the bounded
set of reasons the metric counts, and only faults on our side reaching the handler as errors
(the daemon's side of it: tests/e2e/test_tls_failed.py)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from aiosmtpd.smtp import TLSSetupException

from relay.intake.session import RelaySMTP
from relay.intake.tls import tls_failure_reason
from relay.observe import metrics


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    error.reason = reason  # what OpenSSL sets on the errors it raises
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ssl_error("UNSUPPORTED_PROTOCOL"), "unsupported_protocol"),
        (ssl_error("WRONG_VERSION_NUMBER"), "wrong_version_number"),
        (ssl_error("HTTP_REQUEST"), "http_request"),
        (ssl_error("NO_SHARED_CIPHER"), "no_shared_cipher"),
        (ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "certificate_refused"),
        (ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "certificate_refused"),
        (ssl_error("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "certificate_refused"),
        (ssl_error("SSLV3_ALERT_CERTIFICATE_UNKNOWN"), "certificate_refused"),
        (ssl_error("SSLV3_ALERT_HANDSHAKE_FAILURE"), "other"),
        (ssl_error("SOMETHING_OPENSSL_ADDS_LATER"), "other"),
        (ssl.SSLError(1, "no reason given"), "other"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "eof"),
        (ConnectionResetError(), "eof"),  # asyncio: the client closed during the handshake
        (ConnectionResetError(104, "Connection reset by peer"), "eof"),
        (BrokenPipeError(32, "Broken pipe"), "eof"),
        (ConnectionAbortedError("SSL handshake is taking longer than 60.0 seconds"), "timeout"),
    ],
)  # fmt: skip
def test_failure_reasons_are_a_bounded_set(error: OSError, reason: str) -> None:
    assert tls_failure_reason(error) == reason
    assert reason in metrics.TLS_FAILURE_REASONS


class Handler:
    """Stands in for the intake's handler: what reaches its handle_exception is our failure."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    async def handle_exception(self, error: Exception) -> str:
        self.errors.append(error)
        return "451 4.3.0 Internal error, try again later"


def raised_from(cause: Exception) -> TLSSetupException:
    try:
        raise TLSSetupException() from cause
    except TLSSetupException as error:
        return error


@pytest.mark.parametrize(
    ("error", "ours"),
    [
        (raised_from(ssl_error("UNSUPPORTED_PROTOCOL")), False),
        (raised_from(ConnectionResetError()), False),
        (raised_from(ValueError("a bug in the handshake's code")), True),
        (RuntimeError("a bug in a command handler"), True),
    ],
)
def test_only_faults_on_our_side_reach_the_handler(error: Exception, ours: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        handler = Handler()
        session = RelaySMTP(handler, "submission", None, loop=loop)  # type: ignore[arg-type]
        loop.run_until_complete(session.handle_exception(error))
    finally:
        loop.close()
    assert handler.errors == ([error] if ours else [])
