"""Configuration: YAML read once into typed, frozen objects with one-line errors; it never
acts on what it reads."""

from relay.config.model import Config, load, parse, restart_only_changes, why
from relay.config.schema import ConfigError

__all__ = ["Config", "ConfigError", "load", "parse", "restart_only_changes", "why"]
