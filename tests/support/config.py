"""Configuration errors as the tests read them: one line naming the key."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, parse


def error_of(text: str) -> str:
    """The error a YAML text gets, which must be one line."""
    with pytest.raises(ConfigError) as info:
        parse(text, "relay.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message
