"""TLS for end-to-end tests: a test CA (fixture), certificate files for the relay, a relay with
TLS and a user, and a client context that trusts the CA."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.daemon import Relay, RelayFactory

PASSWORD = "correct horse battery"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, root: Path, name: str = "relay.test") -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(name, "127.0.0.1")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    return {"cert": str(root / "cert.pem"), "key": str(root / "key.pem")}


def secured(relay: RelayFactory, ca: trustme.CA, tmp_path: Path, **smtp: Any) -> Relay:
    """A relay with TLS, a users file holding alice (sender domain sender.test), and extra
    smtp settings; started after alice is added."""
    users_file = tmp_path / "users"
    settings = {
        "smtp": {
            "tls": tls_files(ca, tmp_path / "tls"),
            "auth": {"users_file": str(users_file)},
            **smtp,
        }
    }
    daemon = relay(settings, start=False)
    add_user(daemon, "alice", "sender.test")
    daemon.start()
    return daemon


def add_user(daemon: Relay, name: str, domains: str, password: str = PASSWORD) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "user", "add", name, "--domains", domains,
         "--password-stdin", "--config", str(daemon.config)],
        input=password + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context
