"""Configuration, the routes section: transport rules by recipient domain, to the
domain's MX hosts (the default) or through smarthosts, each with its TLS and AUTH."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config.values import as_list, boolean, choice, hostname, indexed, mapping, path, port

SMARTHOST_TLS = ("starttls", "smtps", "opportunistic", "none")


@dataclass(frozen=True)
class Smarthost:
    host: str  # a host name (A/AAAA looked up) or an IP address
    port: int
    tls: str  # starttls (required), smtps (implicit TLS), opportunistic, none
    verify: bool  # check the certificate against the host name (delivery.tls.ca_file trusted)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


SMARTHOST_KEYS = ("host", "port", "tls", "verify", "username", "password", "password_file")


def smarthost(item: Any) -> Smarthost:
    item = mapping(item, "smarthost settings")
    unknown = sorted(set(map(str, item)) - set(SMARTHOST_KEYS))
    if unknown or "host" not in item:
        raise ValueError(
            f"{unknown[0] if unknown else 'host'}: "
            + ("unknown key" if unknown else "missing")
            + f" (known: {', '.join(SMARTHOST_KEYS)})"
        )
    host = str(item["host"])
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = hostname(host)
    tls = choice(*SMARTHOST_TLS)(item.get("tls", "starttls"))
    password = _password(item)
    username = item.get("username")
    if (username is None) != (password is None):
        raise ValueError("username and password (or password_file) go together")
    if username is not None and tls == "opportunistic":
        raise ValueError("AUTH needs tls: starttls or smtps (or none, to allow plain text)")
    return Smarthost(
        host,
        port(item.get("port", 465 if tls == "smtps" else 25)),
        tls,
        boolean(item.get("verify", True)),
        None if username is None else str(username),
        password,
    )


def _password(item: Mapping[Any, Any]) -> str | None:
    if "password" in item and "password_file" in item:
        raise ValueError("give password or password_file, not both")
    if "password_file" not in item:
        return None if item.get("password") is None else str(item["password"])
    file: Path = path(item["password_file"])
    try:
        return file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"password_file {file}: cannot read: {exc}") from None


@dataclass(frozen=True)
class RouteRule:
    domains: tuple[str, ...]  # recipient domains; ".example.com" also subdomains; "*" all
    via: tuple[Smarthost, ...]  # smarthosts tried in order; empty = the domain's MX hosts


def route_domain(value: Any) -> str:
    name = str(value).lower().rstrip(".")
    if name != "*":
        hostname(name.lstrip("."))
    return name


def routes(value: Any) -> tuple[RouteRule, ...]:
    """[{domains: [...], via: mx | [smarthost, …]}, …]; the first rule that matches wins."""
    return tuple(indexed(_route, as_list(value)))


def _route(item: Any) -> RouteRule:
    item = mapping(item, "domains and via")
    if set(item) != {"domains", "via"}:
        raise ValueError("a route needs exactly domains and via")
    domains = item["domains"]
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, list) or not domains:
        raise ValueError('domains: give a list of recipient domains (or "*")')
    via = item["via"]
    if via == "mx":
        return RouteRule(tuple(route_domain(d) for d in domains), ())
    if not isinstance(via, list) or not via:
        raise ValueError("via: give mx or a list of smarthosts")
    try:
        hosts = indexed(smarthost, via)
    except ValueError as exc:
        raise ValueError(f"via{exc}") from None
    return RouteRule(tuple(route_domain(d) for d in domains), tuple(hosts))


def domain_matches(rule_domain: str, domain: str) -> bool:
    """ "*" matches all; ".example.com" matches its subdomains; a name matches itself."""
    if rule_domain == "*":
        return True
    if rule_domain.startswith("."):
        return domain.endswith(rule_domain)
    return domain == rule_domain
