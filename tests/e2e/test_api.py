"""The HTTP API's foundation on the real daemon: its own process on api.listen (or none with
""), tokens made with `relay token` and their scopes and tenants, the tokens file followed
without a restart, problem details for every error, and the API worker supervised like the
others (restarted after kill -9, its heartbeat in /readyz, never in the way of mail)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.support.api import add_token, assert_problem
from tests.support.daemon import RelayFactory, api_on, eventually
from tests.support.mx import MxSink

pytestmark = pytest.mark.e2e


def with_tokens(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    return api_on(tokens_file=str(tmp_path / "tokens"), **settings)


def nice(pid: int) -> int:  # field 19 of /proc/PID/stat, counted after the ") "
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_the_api_listens_in_a_process_of_its_own(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path))
    assert daemon.api_url is not None
    [ready] = daemon.events("ready", process="supervisor")
    assert ready["api"] == daemon.api_url.removeprefix("http://")
    daemon.wait_event("ready", process="api")
    status, headers, doc = daemon.api("GET", "/v1/openapi.json")  # no token needed
    assert (status, headers["Content-Type"]) == (200, "application/json; charset=utf-8")
    validate(doc)
    assert "/v1/ping" in doc["paths"]
    api, intake = daemon.worker_pid("api"), daemon.worker_pid("intake")
    assert len({api, intake, daemon.worker_pid("scheduler")}) == 3
    assert nice(api) - nice(intake) == 10  # the API yields the CPU to mail


def test_an_empty_api_listen_turns_the_api_off(relay: RelayFactory, sink: MxSink) -> None:
    sink.script_rcpt("gone@a.test", "550 5.1.1 <gone@a.test>: no such user")
    daemon = relay({"api": {"listen": ""}})
    assert daemon.api_url is None
    [ready] = daemon.events("ready", process="supervisor")
    assert ready["api"] is None
    [worker] = daemon.events("ready", process="api")  # the journal's readers, no HTTP
    assert worker["listen"] is None
    assert daemon.get("/readyz") == (200, "ready\n")
    daemon.send(["user@a.test", "gone@a.test"])
    sink.wait_for(1)

    # without the API, a hard bounce still puts its address on the suppression list
    def hard_bounced() -> list[str]:
        return [e["address"] for e in daemon.cli_json("suppress", "list", "--kind", "hard_bounce")]

    eventually(lambda: "gone@a.test" in hard_bounced(), timeout=10)


def test_tokens_made_with_the_cli_scopes_and_tenants(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path))
    reader = add_token(daemon, "dashboard", "--tenant", "acme", "--scope", "read")
    admin = add_token(daemon, "admin")
    sender = add_token(daemon, "mailer", "--scope", "send,cancel")
    assert reader.startswith("relay_") and len({reader, admin, sender}) == 3

    assert daemon.api("GET", "/v1/ping", reader)[::2] == (200, {"tenant": "acme"})
    assert daemon.api("GET", "/v1/ping", admin)[::2] == (200, {"tenant": None})
    assert_problem(daemon.api("GET", "/v1/ping", sender), 403, "lacks the scope read")

    listing = daemon.cli("token", "list").stdout
    assert listing.splitlines()[0].split("\t")[:3] == ["admin", "*", "read,send,cancel"]
    rows = {row["name"]: row for row in daemon.cli_json("token", "list")}
    assert rows["dashboard"]["tenant"] == "acme" and rows["dashboard"]["scopes"] == ["read"]
    assert rows["mailer"]["scopes"] == ["send", "cancel"]
    assert set(rows["admin"]) == {"name", "tenant", "scopes", "created"}
    file = tmp_path / "tokens"
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for token in (reader, admin, sender):
        assert token not in listing and token not in file.read_text()


def test_errors_are_problem_details(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path))
    token = add_token(daemon, "app")
    missing = daemon.api("GET", "/v1/ping")
    assert_problem(missing, 401, "Authorization: Bearer")
    assert missing[1]["WWW-Authenticate"] == "Bearer" and missing[2]["field"] == "Authorization"
    wrong = daemon.api("GET", "/v1/ping", "relay_forged")
    assert_problem(wrong, 401, "not known")
    assert wrong[1]["WWW-Authenticate"].startswith("Bearer")
    assert_problem(daemon.api("GET", "/v1/messages/nope", "relay_forged"), 401, "not known")
    assert_problem(daemon.api("GET", "/v1/nothing", token), 404, "no such resource")
    assert_problem(daemon.api("GET", "/index.php", None), 404, "no such resource")
    not_allowed = daemon.api("POST", "/v1/ping", token, body={})
    assert_problem(not_allowed, 405, "POST is not allowed here")
    assert not_allowed[1]["Allow"] == "GET"


def test_the_tokens_file_is_followed_without_a_restart(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path))
    first = add_token(daemon, "app")  # the file did not exist when the daemon started
    assert daemon.api("GET", "/v1/ping", first)[0] == 200
    assert "token app deleted" in daemon.cli("token", "delete", "app").stdout
    assert_problem(daemon.api("GET", "/v1/ping", first), 401, "not known")
    second = add_token(daemon, "app", "--tenant", "beta")
    assert daemon.api("GET", "/v1/ping", second)[::2] == (200, {"tenant": "beta"})
    assert daemon.api("GET", "/v1/ping", first)[0] == 401
    assert not daemon.events("started", role="api")[1:]  # the same worker throughout
    daemon.kill9()
    daemon.start()  # the file is the tokens' only state
    assert daemon.api("GET", "/v1/ping", second)[::2] == (200, {"tenant": "beta"})
    assert daemon.api("GET", "/v1/ping", first)[0] == 401


def test_the_api_worker_is_supervised(relay: RelayFactory, sink: MxSink, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path))
    token = add_token(daemon, "app")
    old = daemon.worker_pid("api")
    os.kill(old, signal.SIGKILL)
    daemon.wait_event("child_exited", role="api")
    daemon.wait_event("ready", process="api", count=2, timeout=20)
    assert daemon.worker_pid("api") != old
    assert daemon.api("GET", "/v1/ping", token)[::2] == (200, {"tenant": None})

    api = daemon.worker_pid("api")
    os.kill(api, signal.SIGSTOP)  # alive but silent: not ready, and mail goes on
    try:
        daemon.send(["while-stopped@a.test"])
        sink.wait_for(1)
        deadline = time.monotonic() + 20
        while daemon.get("/readyz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        status, body = daemon.get("/readyz")
        assert status == 503 and "api: no heartbeat" in body
    finally:
        os.kill(api, signal.SIGCONT)
    eventually(lambda: daemon.get("/readyz") == (200, "ready\n"), timeout=10)


def test_token_commands_fail_with_one_line(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path), start=False)
    add_token(daemon, "app")
    for args, error in [
        (("add", "app"), "relay: token app exists"),
        (("add", "other", "--scope", "write"), "relay: 'write' is not a scope (known: read, send, cancel)"),
        (("add", "other", "--scope", ""), "relay: give at least one scope"),
        (("add", "bad name"), "relay: 'bad name' is not a token name"),
        (("add", "other", "--tenant", "a:b"), "relay: 'a:b' is not a tenant"),
        (("delete", "nobody"), "relay: no such token: nobody"),
    ]:  # fmt: skip
        done = daemon.cli("token", *args, check=False)
        assert (done.returncode, done.stdout) == (1, ""), args
        assert done.stderr.startswith(error) and len(done.stderr.splitlines()) == 1, done.stderr
    off = relay(start=False)
    done = off.cli("token", "add", "app", check=False)
    assert done.stderr == "relay: api.tokens_file is not set in the configuration\n"


def test_a_broken_tokens_file_stops_the_start(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path), start=False)
    (tmp_path / "tokens").write_text("app:secret\n")
    done = daemon.cli("check-config", check=False)
    assert done.returncode == 78
    assert f"api.tokens_file: {tmp_path / 'tokens'}:1: expected name:sha256" in done.stderr
    with pytest.raises(AssertionError):
        daemon.start(timeout=10)
    assert daemon.proc is not None and daemon.proc.wait(10) == 78


def test_a_tokens_file_others_can_read_is_warned_about(relay: RelayFactory, tmp_path: Path) -> None:
    daemon = relay(with_tokens(tmp_path), start=False)
    add_token(daemon, "app")
    assert daemon.cli("check-config").stderr == ""
    (tmp_path / "tokens").chmod(0o644)
    warning = daemon.cli("check-config").stderr
    assert (
        f"warning: {tmp_path / 'tokens'} is open to other users (mode 644); chmod o-rwx" in warning
    )


def test_an_api_port_in_use_fails_the_start_with_one_error(
    relay: RelayFactory, tmp_path: Path
) -> None:
    daemon = relay(with_tokens(tmp_path), start=False)
    assert daemon.api_url is not None
    host, port = daemon.api_url.removeprefix("http://").split(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        with pytest.raises(AssertionError):
            daemon.start(timeout=15)
        assert daemon.proc is not None and daemon.proc.wait(20) == 1
    [error] = daemon.events("error", stage="api")
    assert "address already in use" in error["error"].lower() and error["action"] == "listen"
