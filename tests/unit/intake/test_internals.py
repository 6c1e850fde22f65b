"""aiosmtpd's internals the session relies on are still there and still as they were when the
relay was written against them: an upgrade that changes one fails here, naming it and what to
re-check in relay/intake/internals.py, rather than somewhere in the middle of a session."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.intake.internals import ATTRIBUTES, METHODS, WRITTEN_FOR, BaseSession, fingerprint

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"
INSTALLED = aiosmtpd.__version__


def recheck(name: str, use: str) -> str:
    return (
        f"the relay relies on it: {use}. Re-check that in relay/intake/internals.py against "
        f"aiosmtpd {INSTALLED}'s SMTP.{name}, then record what it is now there."
    )


def test_the_installed_aiosmtpd_is_the_minor_version_written_for() -> None:
    minor = ".".join(WRITTEN_FOR.split(".")[:2])
    assert INSTALLED.startswith(minor + "."), (
        f"aiosmtpd {INSTALLED} is installed, relay/intake/internals.py was written against "
        f"{WRITTEN_FOR}: re-check every part it records, then update WRITTEN_FOR and the pin"
    )


def test_pyproject_pins_that_minor_version() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("aiosmtpd")]
    major, minor, _ = WRITTEN_FOR.split(".")
    assert pins == [f"aiosmtpd>={WRITTEN_FOR},<{major}.{int(minor) + 1}"]


@pytest.mark.parametrize("name", METHODS)
def test_each_method_relied_on_is_as_recorded(name: str) -> None:
    recorded = METHODS[name]
    method = getattr(SMTP, name, None)
    assert callable(method), f"SMTP.{name} is gone or not a method; " + recheck(name, recorded.use)
    parameters = tuple(inspect.signature(method).parameters)
    assert parameters == recorded.parameters, (
        f"SMTP.{name} now takes {parameters}, not {recorded.parameters}; "
        + recheck(name, recorded.use)
    )
    if recorded.source:
        now = fingerprint(method)
        assert now == recorded.source, (
            f"SMTP.{name}'s source changed (fingerprint {now}, recorded {recorded.source}); "
            + recheck(name, recorded.use)
        )


def test_the_overrides_are_where_the_record_says() -> None:
    for name in ("_getaddr", "_authenticate"):
        assert BaseSession.__dict__.get(name) is not None, name
        assert f"BaseSession.{name}" in METHODS[name].use


async def session_attributes() -> dict[str, object]:
    """The attributes recorded, read on a plain aiosmtpd session over loopback."""
    sessions: list[SMTP] = []

    def factory() -> SMTP:
        sessions.append(SMTP(object(), hostname="relay.test"))
        return sessions[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readline()).startswith(b"220 relay.test")
        missing = object()
        return {name: getattr(sessions[0], name, missing) for name in ATTRIBUTES}
    finally:
        writer.write(b"QUIT\r\n")
        await reader.read()  # the session closes after its 221
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


@pytest.fixture(scope="module")
def attributes() -> dict[str, object]:
    return asyncio.run(session_attributes())


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_each_attribute_relied_on_is_there_with_its_type(
    attributes: dict[str, object], name: str
) -> None:
    kind, use = ATTRIBUTES[name]
    assert isinstance(attributes[name], kind), (
        f"a session's {name} is now {type(attributes[name]).__name__}, not {kind.__name__}; "
        + recheck("__init__", use)
    )


def test_the_dispatch_table_holds_the_verbs_as_bound_methods(attributes: dict[str, object]) -> None:
    table = attributes["_smtp_methods"]
    assert isinstance(table, dict)
    assert {"EHLO", "MAIL", "RCPT", "DATA", "AUTH", "STARTTLS"} <= set(table), sorted(table)
    assert all(inspect.ismethod(m) and m.__name__ == f"smtp_{v}" for v, m in table.items()), (
        "SMTP._smtp_methods no longer maps verbs to bound smtp_ methods; "
        + recheck("__init__", METHODS["__init__"].use)
    )
