"""Configuration, the delivery section: outbound SMTP (port, name, concurrency, timeouts),
DNS, the retry schedule, outbound TLS and MTA-STS, and connection reuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config.schema import option
from relay.config.smtp import FQDN
from relay.config.values import (
    HostPort,
    boolean,
    choice,
    duration,
    durations,
    fraction,
    hostname,
    ip_ports,
    mapping,
    optional_path,
    port,
    positive_int,
)

TLS_MODES = ("opportunistic", "required", "verify")


def tls_policies(value: Any) -> tuple[tuple[str, str], ...]:
    """{recipient domain: mode}; a leading dot also matches subdomains (".example.com")."""
    mode = choice(*TLS_MODES)
    out = []
    for domain, setting in mapping(value, "domain to TLS mode").items():
        name = str(domain).lower().rstrip(".")
        hostname(name.lstrip("."))
        try:
            out.append((name, mode(setting)))
        except ValueError as exc:
            raise ValueError(f"{domain}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[HostPort, ...] = option(ip_ports, ())
    timeout: float = option(duration, 5.0)
    max_queries: int = option(positive_int, 50)
    max_cache_ttl: float = option(duration, 3600.0)


@dataclass(frozen=True)
class RetryConfig:
    schedule: tuple[float, ...] = option(durations, (300.0, 1800.0, 7200.0, 21600.0, 43200.0))
    max_age: float = option(duration, 259_200.0)
    jitter: float = option(fraction, 0.1)


@dataclass(frozen=True)
class OutboundTlsConfig:
    # opportunistic: STARTTLS when offered, unverified, plain text if it fails (RFC 7435);
    # required: TLS or a temporary failure, never plain text; verify: required plus a valid
    # certificate for the MX host name.
    default: str = option(choice(*TLS_MODES), "opportunistic")
    policies: tuple[tuple[str, str], ...] = option(tls_policies, ())
    # Extra CA certificates (PEM) trusted for verify and MTA-STS; empty = the system's.
    ca_file: Path | None = option(optional_path, None)


@dataclass(frozen=True)
class MtaStsConfig:
    # RFC 8461: fetch and honour the recipient domain's MTA-STS policy.
    enabled: bool = option(boolean, False)
    # HTTPS port of https://mta-sts.<domain>/.well-known/mta-sts.txt (443; tests change it).
    port: int = option(port, 443)
    fetch_timeout: float = option(duration, 10.0)


@dataclass(frozen=True)
class ReuseConfig:
    # Messages one outbound connection may carry (1 = a connection per message), and how long
    # an idle connection waits for the next one (Postfix: smtp_connection_cache_time_limit).
    max_messages: int = option(positive_int, 100)
    idle_timeout: float = option(duration, 5.0)


@dataclass(frozen=True)
class DeliveryConfig:
    port: int = option(port, 25)
    helo_name: str = option(hostname, FQDN)
    concurrency: int = option(positive_int, 100)
    connect_timeout: float = option(duration, 30.0)
    # RFC 5321 §4.5.3.2: 5 minutes per command; §4.5.3.2.6: 10 minutes after the final dot.
    command_timeout: float = option(duration, 300.0)
    data_timeout: float = option(duration, 600.0)
    # Backstop for lost wake-ups: how often the scheduler rescans the queue directory.
    scan_interval: float = option(duration, 30.0)
    dns: DnsConfig = field(default_factory=DnsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    tls: OutboundTlsConfig = field(default_factory=OutboundTlsConfig)
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
