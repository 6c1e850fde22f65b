"""Shared fixtures: the DNS server and MX sinks are plugins so each lives beside its server."""

pytest_plugins = ["tests.support.dns", "tests.support.mx", "tests.support.daemon"]
