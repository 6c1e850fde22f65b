"""Configuration, the providers section: MX host patterns that name a destination's
provider (for metrics labels and destination limits)."""

from __future__ import annotations

import re
from typing import Any

from relay.config.values import as_list, mapping

DEFAULT_PROVIDERS = (
    ("gmail", ("*.google.com", "*.googlemail.com")),
    ("outlook", ("*.outlook.com", "*.hotmail.com")),
    ("yahoo", ("*.yahoodns.net", "*.yahoo.com")),
    ("icloud", ("*.icloud.com", "*.me.com")),
)


def providers(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{name: [MX host glob, …]} in order; the first matching pattern names the provider."""
    out = []
    for name, patterns in mapping(value, "provider name to MX host patterns").items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_]*$", name):
            raise ValueError(f"{name!r} is not a provider name (lowercase letters, digits, _)")
        if name == "other":
            raise ValueError("'other' is implicit (everything that matches no pattern)")
        try:
            globs = tuple(str(p).lower() for p in as_list(patterns))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        out.append((name, globs))
    return tuple(out)
