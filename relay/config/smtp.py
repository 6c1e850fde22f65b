"""Configuration, the smtp section: the intake's listeners, its name and message limits,
inbound TLS, AUTH and the limits per client."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.schema import option
from relay.config.values import (
    HostPort,
    Network,
    boolean,
    count,
    duration,
    host_ports,
    hostname,
    networks,
    optional_path,
    positive_int,
)

FQDN = socket.getfqdn()


@dataclass(frozen=True)
class InboundTlsConfig:
    # PEM certificate chain and key; both empty = no inbound TLS (no STARTTLS, no smtps).
    cert: Path | None = option(optional_path, None)
    key: Path | None = option(optional_path, None)


@dataclass(frozen=True)
class AuthConfig:
    # The users file (`relay user add`); empty = no SMTP AUTH.
    users_file: Path | None = option(optional_path, None)
    # RFC 4954 §4: AUTH PLAIN/LOGIN only over TLS; true also allows it in clear from loopback.
    plaintext_on_loopback: bool = option(boolean, False)
    # Failed AUTH: each failure is answered after a growing delay; this many within ban_time
    # and the client IP is refused for ban_time.
    max_failures: int = option(positive_int, 5)
    ban_time: float = option(duration, 900.0)


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = option(count, 1000)
    # Per client IP, like Postfix's anvil; clients in relay_networks are exempt (Postfix's
    # smtpd_client_event_limit_exceptions). 0 = no limit.
    max_connections_per_ip: int = option(count, 50)
    commands_per_minute_per_ip: int = option(count, 600)
    # A session is closed this long after it started, however busy.
    session_timeout: float = option(duration, 1800.0)


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[HostPort, ...] = option(host_ports, (("127.0.0.1", 2525),))
    hostname: str = option(hostname, FQDN)
    max_message_size: int = option(positive_int, 26_214_400)
    max_recipients: int = option(positive_int, 100)
    relay_networks: tuple[Network, ...] = option(
        networks, (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    )
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    idle_timeout: float = option(duration, 300.0)
    # Listeners that require AUTH (port 587 style; STARTTLS) and implicit TLS ones (port 465).
    submission: tuple[HostPort, ...] = option(host_ports, ())
    smtps: tuple[HostPort, ...] = option(host_ports, ())
    tls: InboundTlsConfig = field(default_factory=InboundTlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
