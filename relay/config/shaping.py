"""Configuration stage, traffic shaping: typed, frozen settings for priority lanes, destination
limits, adaptive throttling, sending quotas and smarthost routes, with their YAML parsers."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.config.values import (
    DURATION_RE,
    as_list,
    boolean,
    choice,
    duration,
    hostname,
    indexed,
    option,
    path,
    port,
    positive_int,
)

LANES = ("high", "normal", "low")
LISTENERS = ("relay", "submission", "smtps")
RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
RATE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SMARTHOST_TLS = ("starttls", "smtps", "opportunistic", "none")
QUOTA_WINDOWS = {"hourly": 3600.0, "daily": 86400.0}


def _mapping(value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping of {what}")
    return value


def _keyed(value: Any, what: str, key: Any, parse: Any) -> tuple[tuple[Any, Any], ...]:
    """{k: v} parsed pairwise in order, naming the failing key in the error."""
    out = []
    for raw_key, raw_value in _mapping(value, what).items():
        try:
            out.append((key(raw_key), parse(raw_value)))
        except ValueError as exc:
            raise ValueError(f"{raw_key}: {exc}") from None
    return tuple(out)


def lane(value: Any) -> str:
    return choice(*LANES)(value)


def share(value: Any) -> float:
    """A share of capacity above 0 (0 would starve the lane) and at most 0.5."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 0.5:
        raise ValueError(f"{value!r} is not a share above 0 and at most 0.5")
    return float(value)


def user_lanes(value: Any) -> tuple[tuple[str, str], ...]:
    return _keyed(value, "SMTP user to lane", str, lane)


def listener_lanes(value: Any) -> tuple[tuple[str, str], ...]:
    return _keyed(value, "listener to lane", choice(*LISTENERS), lane)


def rate(value: Any) -> float:
    """`10/s`, `600/min`, `5000/h`, `20000/d` as messages per second; 0 or null: no limit."""
    if value in (0, None):
        return 0.0
    match = RATE_RE.match(str(value)) if not isinstance(value, bool) else None
    if match is None:
        raise ValueError(f"{value!r} is not a rate (use 10/s, 600/min, 5000/h or 0)")
    per_second = float(match.group(1)) / RATE_UNITS[match.group(2)[0]]
    if per_second <= 0:
        raise ValueError(f"{value!r}: a rate above 0, or 0 for no limit")
    return per_second


@dataclass(frozen=True)
class Limits:
    """One destination's limits: open connections (idle reused ones count) and messages/s."""

    connections: int = option(positive_int, 20)
    rate: float = option(rate, 0.0)  # messages per second; 0 = no limit


# Starting points for the big providers (their published guidance is "keep it modest and
# back off on 421"); "default" applies to every other destination, domain by domain.
DEFAULT_LIMITS = (
    ("default", Limits(20, 0.0)),
    ("gmail", Limits(10, 0.0)),
    ("outlook", Limits(10, 0.0)),
    ("yahoo", Limits(5, 0.0)),
    ("icloud", Limits(5, 0.0)),
)
LIMIT_KEYS = ("connections", "rate")


def destination_name(value: Any) -> str:
    """`default`, a provider name (from `providers`), or a recipient domain."""
    name = str(value).lower().rstrip(".")
    if "." in name:
        hostname(name)
    elif not re.match(r"^[a-z][a-z0-9_]*$", name):
        raise ValueError("not a provider name or a domain")
    return name


def destinations(value: Any) -> tuple[tuple[str, Limits], ...]:
    """{name: {connections, rate}} merged over DEFAULT_LIMITS, key by key."""
    merged = dict(DEFAULT_LIMITS)

    def limits(item: Any) -> Any:
        item = _mapping(item, "connections and rate")
        unknown = sorted(set(map(str, item)) - set(LIMIT_KEYS))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(LIMIT_KEYS)})")
        return item

    for name, item in _keyed(value, "destination to limits", destination_name, limits):
        base = merged.get(name, merged["default"])
        try:
            merged[name] = Limits(
                positive_int(item.get("connections", base.connections)),
                rate(item.get("rate", base.rate if base.rate else 0)),
            )
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return tuple(merged.items())


def pattern(value: Any) -> re.Pattern[str]:
    try:
        return re.compile(str(value), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a regular expression: {exc}") from None


def patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    return tuple(indexed(pattern, as_list(value)))


def suspensions(value: Any) -> tuple[tuple[re.Pattern[str], float], ...]:
    """[{pattern: REGEX, for: DURATION}, …]: replies that suspend their destination."""

    def suspension(item: Any) -> tuple[re.Pattern[str], float]:
        if not isinstance(item, Mapping) or set(item) != {"pattern", "for"}:
            raise ValueError(f"{item!r} needs exactly pattern and for")
        return pattern(item["pattern"]), duration(item["for"])

    return tuple(indexed(suspension, as_list(value)))


def quota_windows(value: Any) -> tuple[tuple[float, int], ...]:
    """{hourly: N, daily: N, "10m": N, …}: at most N messages per window of that length."""

    def window(key: Any) -> float:
        text = str(key)
        if text in QUOTA_WINDOWS:
            return QUOTA_WINDOWS[text]
        if not DURATION_RE.match(text) or duration(text) < 1:
            raise ValueError("not hourly, daily or a duration of 1s or more")
        return duration(text)

    windows = _keyed(value, "window to message count", window, positive_int)
    if not windows:
        raise ValueError("give at least one window (hourly, daily, or a duration)")
    return tuple(sorted(windows))


def quota_table(value: Any) -> tuple[tuple[str, tuple[tuple[float, int], ...]], ...]:
    return _keyed(value, "name to quota windows", lambda k: str(k).lower(), quota_windows)


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
    item = _mapping(item, "smarthost settings")
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
    item = _mapping(item, "domains and via")
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


@dataclass(frozen=True)
class LanesConfig:
    # While low-priority mail waits, it gets at least this share of dispatches, however busy
    # the high and normal lanes are (high otherwise always goes first, then normal).
    low_share: float = option(share, 0.1)
    # Lane of mail from these SMTP users, and from these listeners (relay, submission, smtps);
    # X-Relay-Priority (high, normal, low) in the message overrides both when header is true.
    users: tuple[tuple[str, str], ...] = option(user_lanes, ())
    listeners: tuple[tuple[str, str], ...] = option(listener_lanes, ())
    header: bool = option(boolean, True)


@dataclass(frozen=True)
class ThrottleConfig:
    # Replies that count as throttling besides 421, 4.7.28 and 4xx rate wording (regexes,
    # case-insensitive, searched in "code enhanced text"); Yahoo's [TSnn] codes by default.
    patterns: tuple[re.Pattern[str], ...] = option(patterns, (pattern(r"\[?TSS?0\d\]?"),))
    # Each throttle signal halves the destination's connections (at least 1) and rate (or,
    # with no rate, spaces messages `interval`, doubling per level) up to max_level;
    # recover_after clean deliveries in a row undo one level.
    max_level: int = option(positive_int, 4)
    recover_after: int = option(positive_int, 3)
    interval: float = option(duration, 1.0)
    # Replies that suspend the destination (nothing sent to it) for a while.
    suspend: tuple[tuple[re.Pattern[str], float], ...] = option(suspensions, ())


@dataclass(frozen=True)
class QuotasConfig:
    # Over quota: hold (accept; wait with reason quota until the window has room) or refuse
    # (452 4.7.1 at DATA).
    action: str = option(choice("hold", "refuse"), "hold")
    users: tuple[tuple[str, tuple[tuple[float, int], ...]], ...] = option(quota_table, ())
    sender_domains: tuple[tuple[str, tuple[tuple[float, int], ...]], ...] = option(quota_table, ())


@dataclass(frozen=True)
class ReuseConfig:
    # Messages one outbound connection may carry (1 = a connection per message), and how long
    # an idle connection waits for the next one (Postfix: smtp_connection_cache_time_limit).
    max_messages: int = option(positive_int, 100)
    idle_timeout: float = option(duration, 5.0)
