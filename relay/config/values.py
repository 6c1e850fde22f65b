"""Configuration, value parsers: each turns one raw YAML value into its typed form or
raises ValueError with a message that names the problem."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from relay.mail.address import HOSTNAME_RE

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HostPort = tuple[str, int]
T = TypeVar("T")

DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: Any) -> float:
    """`30s`, `5m`, `2h`, `3d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use 30s, 5m, 2h, 3d or seconds)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = DURATION_RE.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (use 30s, 5m, 2h, 3d or seconds)")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def durations(value: Any) -> tuple[float, ...]:
    items = as_list(value)
    if not items:
        raise ValueError("must list at least one duration")
    return tuple(indexed(duration, items))


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not an integer")
    if value < 1:
        raise ValueError(f"{value} must be at least 1")
    return value


def port(value: Any) -> int:
    number = positive_int(value)
    if number > 65535:
        raise ValueError(f"{number} is not a TCP port (1-65535)")
    return number


def fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not a number")
    if not 0 <= value < 1:
        raise ValueError(f"{value} must be at least 0 and below 1")
    return float(value)


def hostname(value: Any) -> str:
    if not isinstance(value, str) or not HOSTNAME_RE.match(value):
        raise ValueError(f"{value!r} is not a host name")
    return value.rstrip(".")


def host_port(value: Any) -> HostPort:
    """`host:port`, `[v6]:port` or `v6addr` is not accepted without brackets."""
    text = str(value).strip()
    match = re.match(r"^\[([^\]]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]+):(\d+)$", text)
    if match is None:
        raise ValueError(f"{value!r} is not host:port (write IPv6 as [::1]:25)")
    host = match.group(1)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        hostname(host)
    return host, port(int(match.group(2)))


def host_ports(value: Any) -> tuple[HostPort, ...]:
    return tuple(indexed(host_port, as_list(value)))


def ip_port(value: Any) -> HostPort:
    """Like host_port, but the host must be an IP address (a DNS server cannot be a name)."""
    host, number = host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    return host, number


def ip_ports(value: Any) -> tuple[HostPort, ...]:
    return tuple(indexed(ip_port, as_list(value)))


def networks(value: Any) -> tuple[Network, ...]:
    def network(item: Any) -> Network:
        try:
            return ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from None

    return tuple(indexed(network, as_list(value)))


def optional_path(value: Any) -> Path | None:
    """A path, or "" / null for "not configured"."""
    return None if value in ("", None) else path(value)


def count(value: Any) -> int:
    """An integer, 0 or more (0 switches a limit off)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not an integer of 0 or more")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    return parse


def path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a path")
    return Path(value).expanduser().absolute()


def as_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list")
    return value


def indexed(parse: Callable[[Any], T], items: list[Any]) -> list[T]:
    """Apply parse to each item, naming the failing index in the error."""
    out = []
    for index, item in enumerate(items):
        try:
            out.append(parse(item))
        except ValueError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    return out


def mapping(value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{value!r} is not a mapping of {what}")
    return value


def keyed(value: Any, what: str, key: Any, parse: Any) -> tuple[tuple[Any, Any], ...]:
    """{k: v} parsed pairwise in order, naming the failing key in the error."""
    out = []
    for raw_key, raw_value in mapping(value, what).items():
        try:
            out.append((key(raw_key), parse(raw_value)))
        except ValueError as exc:
            raise ValueError(f"{raw_key}: {exc}") from None
    return tuple(out)
