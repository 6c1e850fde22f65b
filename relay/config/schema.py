"""Configuration, the schema: each setting is a dataclass field carrying its YAML parser and
default, and a section is built from its mapping with errors that name the key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import field, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; str() is the one line shown to the operator."""


def option(parse: Callable[[Any], Any], default: Any) -> Any:
    """A dataclass field with its YAML parser and default."""
    return field(default=default, metadata={"parse": parse})


def build(cls: type[T], data: Any, prefix: str) -> T:
    """Build dataclass cls from a mapping, parsing each known key and rejecting unknown ones."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(known)})")
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, value in data.items():
        spec = known[str(name)]
        key = f"{prefix}{name}"
        if is_dataclass(hints[spec.name]):
            values[spec.name] = build(hints[spec.name], value, key + ".")
            continue
        try:
            values[spec.name] = spec.metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return cls(**values)
