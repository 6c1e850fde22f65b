"""`relay webhook` as an operator runs it. secret: secrets added to the hook's secret file
(0600) for rotation, or replacing it, each one a Standard Webhooks receiver takes; one-line
errors for an unknown hook, a bad file and a bad webhooks entry in `relay check-config`.
list, enable and replay on outboxes filled in the spool: backlog, parked, lag, disabled and
last error shown, the flag cleared, parked and waiting events since a time due now, and no
outbox made for a hook that has none. test against a receiver that verifies signatures: one
`test` event, exit 0 on a 2xx, 1 with one line on a 500, a refused connection, a timeout, TLS
or an unreadable secret file."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from standardwebhooks import Webhook

from relay.config.webhooks import new_secret, read_secrets
from relay.hooks.outbox import Outbox
from tests.support.daemon import free_port
from tests.support.webhooks import Receiver

EX_CONFIG = 78


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def write_config(tmp_path: Path, hooks: list[dict[str, object]]) -> Path:
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump({"spool": {"path": str(tmp_path / "spool")}, "webhooks": hooks})
    )
    return config


@pytest.fixture
def app(tmp_path: Path) -> tuple[Path, Path]:
    """A config with the hook `app` (and `other`), and app's secret file, not made yet."""
    secret_file = tmp_path / "secrets" / "app.secret"
    secret_file.parent.mkdir()
    config = write_config(tmp_path, [
        {"name": "app", "url": "https://hooks.example.com/relay", "secret_file": str(secret_file)},
        {"name": "other", "url": "http://127.0.0.1:9/", "secret_file": str(tmp_path / "o")},
    ])  # fmt: skip
    return config, secret_file


def verifies(secret: str) -> bool:
    """A request signed with secret passes the standardwebhooks receiver's check."""
    hook = Webhook(secret)
    now = datetime.now(UTC)
    data = json.dumps({"id": "evt_1", "type": "message.delivered"})
    headers = {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": hook.sign("evt_1", now, data),
    }
    return hook.verify(data, headers) == json.loads(data)


def test_secrets_are_added_for_rotation_then_replaced(app: tuple[Path, Path]) -> None:
    config, secret_file = app
    first = relay_cli(config, "webhook", "secret", "app")
    assert first.returncode == 0, first.stderr
    assert (
        first.stderr
        == f"relay: webhook app: new secret written to {secret_file}, the only one in it\n"
    )
    second = relay_cli(config, "webhook", "secret", "app")
    assert second.returncode == 0, second.stderr
    assert "(2 in it, each signs every event until removed)" in second.stderr
    made = [first.stdout, second.stdout]
    assert all(out.count("\n") == 1 and out.startswith("whsec_") for out in made)
    assert secret_file.read_text() == "".join(made)
    assert read_secrets(secret_file) == [out.strip() for out in made]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert all(verifies(out.strip()) for out in made) and made[0] != made[1]

    third = relay_cli(config, "webhook", "secret", "app", "--replace")
    assert third.returncode == 0, third.stderr
    assert secret_file.read_text() == third.stdout
    assert read_secrets(secret_file) == [third.stdout.strip()] and verifies(third.stdout.strip())
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in secret_file.parent.iterdir()) == ["app.secret"]  # no temp file


def test_comments_stay_and_an_open_file_is_closed_to_others(app: tuple[Path, Path]) -> None:
    config, secret_file = app
    secret_file.write_text("# the app's receiver, rotated yearly")  # no final newline
    secret_file.chmod(0o644)
    made = relay_cli(config, "webhook", "secret", "app")
    assert made.returncode == 0, made.stderr
    assert secret_file.read_text() == f"# the app's receiver, rotated yearly\n{made.stdout}"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("webhook", "secret", "billing"), "relay: no such webhook: billing (webhooks: app, other)\n"),
        (("webhook", "secret"), "relay webhook secret: the following arguments are required: name (see --help)\n"),
    ],
)  # fmt: skip
def test_an_unknown_hook_is_one_line(
    app: tuple[Path, Path], args: tuple[str, ...], error: str
) -> None:
    config, secret_file = app
    proc = relay_cli(config, *args)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr == error
    assert not secret_file.exists()


def test_no_hooks_configured(tmp_path: Path) -> None:
    proc = relay_cli(write_config(tmp_path, []), "webhook", "secret", "app")
    assert (proc.returncode, proc.stderr) == (
        1,
        "relay: no such webhook: app (webhooks: none configured)\n",
    )


def test_a_bad_file_is_left_alone(app: tuple[Path, Path]) -> None:
    config, secret_file = app
    kept = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nhunter2\n"
    secret_file.write_text(kept)
    proc = relay_cli(config, "webhook", "secret", "app")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert (
        proc.stderr
        == f"relay: {secret_file}:2: not a secret (whsec_ and the base64 of 24 to 64 bytes)\n"
    )
    assert "hunter2" not in proc.stderr  # the line may be a key: named, never shown
    assert secret_file.read_text() == kept
    replaced = relay_cli(config, "webhook", "secret", "app", "--replace")  # the way out
    assert replaced.returncode == 0 and secret_file.read_text() == replaced.stdout


def test_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, [
        {"name": "app", "url": "https://a.test/", "secret_file": str(tmp_path / "no" / "dir" / "s")},
    ])  # fmt: skip
    proc = relay_cli(config, "webhook", "secret", "app")
    assert proc.returncode == 1 and proc.stdout == ""
    assert (
        proc.stderr
        == f"relay: {tmp_path / 'no' / 'dir' / 's'}: cannot write: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("hook", "error"),
    [
        ({"name": "app", "url": "http://hooks.example.com/", "secret_file": "/s"}, "webhooks: [0] url: plain http only to a loopback host"),
        ({"name": "app", "url": "https://a.test/", "secret_file": "/s", "events": ["sent"]}, "webhooks: [0] events: [0] 'sent' is not an event (known: bounced,"),
        ({"name": "App", "url": "https://a.test/", "secret_file": "/s"}, "webhooks: [0] name: 'App' is not a webhook name"),
        ({"url": "https://a.test/", "secret_file": "/s"}, "webhooks: [0] name: missing"),
    ],
)  # fmt: skip
def test_check_config_names_a_bad_entry(
    tmp_path: Path, hook: dict[str, object], error: str
) -> None:
    proc = relay_cli(write_config(tmp_path, [hook]), "check-config")
    assert (proc.returncode, proc.stdout) == (EX_CONFIG, "")
    assert proc.stderr.startswith(f"relay: configuration error: {error}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_check_config_takes_a_good_entry_without_its_secret_file(app: tuple[Path, Path]) -> None:
    config, secret_file = app
    proc = relay_cli(config, "check-config")
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout and not secret_file.exists()


# --- list, enable, replay: the outbox in the spool ---------------------------------------------


def stamp(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def outbox_at(config: Path, name: str) -> Path:
    return config.parent / "spool" / "hooks" / f"{name}.sqlite"


def fill(path: Path, ages: dict[str, float]) -> Outbox:
    """An outbox owing one delivered event per id (each of its own message), each that many
    seconds old."""
    now = time.time()
    events = [
        {"event_id": event_id, "timestamp": stamp(now - age), "event": "delivered", "id": f"m{i}"}
        for i, (event_id, age) in enumerate(ages.items())
    ]
    outbox = Outbox(path)
    assert outbox.take("00000001.jsonl", events, 1000, lambda _: True) == len(events)
    return outbox


def listed(config: Path) -> dict[str, dict[str, Any]]:
    proc = relay_cli(config, "webhook", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return {item["name"]: item for item in json.loads(proc.stdout)}


def test_list_shows_each_hooks_backlog_and_state(app: tuple[Path, Path]) -> None:
    config, _ = app
    outbox = fill(outbox_at(config, "app"), {"e1": 600.0, "e2": 150.0, "e3": 60.0})
    outbox.again("e1", None, "HTTP 503")  # the schedule spent: parked
    outbox.again("e3", time.time() + 3600, "no answer within 10 s")
    outbox.set_flag("disabled", "HTTP 410 (410 Gone) at 1795000000")
    outbox.close()

    hooks = listed(config)
    assert list(hooks) == ["app", "other"]
    shown = hooks["app"]
    assert 150 <= shown.pop("lag_seconds") < 210  # the oldest ready one, e2 (not parked e1)
    assert shown == {
        "name": "app", "url": "https://hooks.example.com/relay", "state": "disabled",
        "disabled": "HTTP 410 (410 Gone) at 1795000000", "pending": 2, "parked": 1,
        "last_error": "no answer within 10 s",
    }  # fmt: skip
    assert hooks["other"] == {
        "name": "other", "url": "http://127.0.0.1:9/", "state": "active", "disabled": None,
        "pending": 0, "parked": 0, "lag_seconds": 0.0, "last_error": None,
    }  # fmt: skip
    assert not outbox_at(config, "other").exists()  # a hook the worker never ran with: no outbox

    table = relay_cli(config, "webhook", "list")
    assert table.returncode == 0, table.stderr
    head, first, second = table.stdout.splitlines()
    assert head.split() == ["Name", "URL", "State", "Pending", "Parked", "Lag", "Last", "error"]
    assert first.startswith("app ") and "disabled: HTTP 410 (410 Gone) at 1795000000" in first
    assert first.split()[-8:] == ["2", "1", "2m", "no", "answer", "within", "10", "s"]
    assert second.split() == ["other", "http://127.0.0.1:9/", "active", "0", "0", "0s", "-"]
    assert not outbox_at(config, "other").exists()


def test_list_without_hooks(tmp_path: Path) -> None:
    config = write_config(tmp_path, [])
    assert relay_cli(config, "webhook", "list").stdout == "No webhooks configured\n"
    assert relay_cli(config, "webhook", "list", "--json").stdout == "[]\n"
    assert not (tmp_path / "spool").exists()


def test_enable_clears_the_disabled_flag(app: tuple[Path, Path]) -> None:
    config, _ = app
    outbox = fill(outbox_at(config, "app"), {"e1": 10.0})
    outbox.set_flag("disabled", "HTTP 410 (410 Gone) at 1795000000")
    outbox.set_flag("last_error", "HTTP 410")
    outbox.close()

    proc = relay_cli(config, "webhook", "enable", "app")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        "relay: webhook app enabled (it was disabled: HTTP 410 (410 Gone) at 1795000000)\n"
    )
    outbox = Outbox(outbox_at(config, "app"))
    assert outbox.flag("disabled") is None and outbox.flag("last_error") == "HTTP 410"
    assert outbox.backlog().ready == 1  # what it owed is still owed
    outbox.close()
    assert listed(config)["app"]["state"] == "active"

    again = relay_cli(config, "webhook", "enable", "app")
    assert again.stdout == "relay: webhook app was not disabled, nothing to do\n"
    never = relay_cli(config, "webhook", "enable", "other")
    assert (never.returncode, never.stdout) == (
        0, "relay: webhook other was not disabled, nothing to do\n"
    )  # fmt: skip
    assert not outbox_at(config, "other").exists()


def due_now(config: Path, name: str) -> list[str]:
    outbox = Outbox(outbox_at(config, name))
    try:
        return [owed.event_id for owed in outbox.due(time.time(), 100)]
    finally:
        outbox.close()


def test_replay_makes_owed_events_since_a_time_due_now(app: tuple[Path, Path]) -> None:
    config, _ = app
    outbox = fill(outbox_at(config, "app"), {"e1": 3 * 3600.0, "e2": 1800.0, "e3": 600.0})
    outbox.again("e1", None, "HTTP 503")
    outbox.again("e2", None, "HTTP 503")
    outbox.again("e3", time.time() + 3600, "HTTP 503")  # not due for an hour
    outbox.close()
    assert due_now(config, "app") == []

    proc = relay_cli(config, "webhook", "replay", "app", "--since", "1h")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("relay: webhook app: 2 events owed since ")
    assert proc.stdout.endswith(" due now\n")
    assert due_now(config, "app") == ["e2", "e3"]  # parked e2 too; e1 is older than an hour
    assert listed(config)["app"]["parked"] == 1

    since = stamp(time.time() - 4 * 3600).replace("Z", "+00:00")
    everything = relay_cli(config, "webhook", "replay", "app", "--since", since)
    assert everything.stdout.startswith("relay: webhook app: 3 events owed since ")
    assert due_now(config, "app") == ["e1", "e2", "e3"]
    assert (listed(config)["app"]["pending"], listed(config)["app"]["parked"]) == (3, 0)


def test_replay_on_a_disabled_hook_says_how_to_enable_it(app: tuple[Path, Path]) -> None:
    config, _ = app
    outbox = fill(outbox_at(config, "app"), {"e1": 60.0})
    outbox.set_flag("disabled", "HTTP 410 (410 Gone) at 1795000000")
    outbox.close()
    proc = relay_cli(config, "webhook", "replay", "app", "--since", "2h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == (
        "relay: webhook app is disabled (HTTP 410 (410 Gone) at 1795000000): "
        "relay webhook enable app to send them"
    )
    none = relay_cli(config, "webhook", "replay", "other", "--since", "2h")
    assert none.stdout.startswith("relay: webhook other: 0 events owed since ")
    assert not outbox_at(config, "other").exists()


@pytest.mark.parametrize(
    ("args", "status", "error"),
    [
        (("replay", "app", "--since", "yesterday"), 2, "relay: --since: 'yesterday' is not an RFC 3339 time with a zone (2026-11-22T09:00:00Z) or a duration back from now (30s, 5m, 2h, 3d)\n"),
        (("replay", "app", "--since", "2026-11-22T09:00:00"), 2, "relay: --since: '2026-11-22T09:00:00' is not an RFC 3339 time with a zone"),
        (("replay", "app"), 2, "relay webhook replay: the following arguments are required: --since (see --help)\n"),
        (("replay", "billing", "--since", "2h"), 1, "relay: no such webhook: billing (webhooks: app, other)\n"),
        (("enable", "billing"), 1, "relay: no such webhook: billing (webhooks: app, other)\n"),
        (("test", "billing"), 1, "relay: no such webhook: billing (webhooks: app, other)\n"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    app: tuple[Path, Path], args: tuple[str, ...], status: int, error: str
) -> None:
    config, _ = app
    outbox = fill(outbox_at(config, "app"), {"e1": 60.0})
    outbox.again("e1", None, "HTTP 503")
    outbox.close()
    proc = relay_cli(config, "webhook", *args)
    assert (proc.returncode, proc.stdout) == (status, "")
    assert proc.stderr.startswith(error) and proc.stderr.count("\n") == 1
    assert due_now(config, "app") == []  # the parked event stays parked


# --- test: one signed event to the hook itself -------------------------------------------------


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[tuple[Path, Receiver, str]]:
    """A receiver that knows only the newer of the two secrets in the hook's file, and the
    config of the hook `app` that points at it."""
    old, new = new_secret(), new_secret()
    secret_file = tmp_path / "app.secret"
    secret_file.write_text(f"{old}\n{new}\n")
    receiver = Receiver(new, answer=lambda document, _: 500 if "fail" in document["id"] else 204)
    config = write_config(tmp_path, [
        {"name": "app", "url": receiver.url, "secret_file": str(secret_file), "timeout": "2s"},
    ])  # fmt: skip
    try:
        yield config, receiver, receiver.url
    finally:
        receiver.close()


def test_a_test_event_reaches_a_verifying_receiver(
    receiving: tuple[Path, Receiver, str],
) -> None:
    config, receiver, _ = receiving
    before = time.time()
    proc = relay_cli(config, "webhook", "test", "app")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "HTTP/1.1 204 No Content\n", "")
    assert receiver.unverified == 0 and len(receiver.got) == 1
    document = receiver.got[0]
    assert (document["type"], document["data"]) == ("test", {"webhook": "app"})
    assert document["id"].startswith("test-") and len(document["id"]) > len("test-")
    sent = datetime.fromisoformat(document["created_at"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= sent <= time.time()
    assert not (config.parent / "spool").exists()  # the outbox is not touched (nor made)


def test_a_refusing_receiver_exits_1(receiving: tuple[Path, Receiver, str]) -> None:
    config, receiver, _ = receiving
    receiver.answer = lambda _, __: 500
    proc = relay_cli(config, "webhook", "test", "app")
    assert (proc.returncode, proc.stdout) == (1, "HTTP/1.1 500 Internal Server Error\n")
    assert proc.stderr == (
        f"relay: webhook app: POST {receiver.url}: answered 500 Internal Server Error\n"
    )
    assert receiver.got == [] and sum(receiver.tries.values()) == 1  # one try, no retry


class Chatty(BaseHTTPRequestHandler):
    """Answers every POST 200 with 400 a's and 200 b's."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        data = b"a" * 400 + b"b" * 200
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_the_reply_is_printed_up_to_500_bytes(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Chatty)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (tmp_path / "s").write_text(new_secret() + "\n")
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        config = write_config(
            tmp_path, [{"name": "app", "url": url, "secret_file": str(tmp_path / "s")}]
        )
        proc = relay_cli(config, "webhook", "test", "app")
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == "HTTP/1.0 200 OK\n" + "a" * 400 + "b" * 100 + "… (cut at 500 bytes)\n"


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that takes connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("case", ["refused", "timeout", "tls", "secret"])
def test_a_failed_test_is_one_line(
    receiving: tuple[Path, Receiver, str], silent: int, case: str
) -> None:
    config, receiver, _ = receiving
    secret_file = config.parent / "app.secret"
    url, failed = {
        "refused": (f"http://127.0.0.1:{free_port()}/hook", "connection refused"),
        "timeout": (f"http://127.0.0.1:{silent}/hook", "no answer within 0.5 s (timeout)"),
        "tls": (f"https://127.0.0.1:{receiver.port}/hook", "TLS: "),
        "secret": (receiver.url, "cannot read: No such file or directory"),
    }[case]
    if case == "secret":
        secret_file.unlink()
    hook = {"name": "app", "url": url, "secret_file": str(secret_file), "timeout": "0.5s"}
    started = time.monotonic()
    proc = relay_cli(write_config(config.parent, [hook]), "webhook", "test", "app")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    where = f"{secret_file}: " if case == "secret" else f"POST {url}: "
    assert proc.stderr.startswith(f"relay: webhook app: {where}{failed}")
    assert receiver.got == [] and receiver.unverified == 0
    assert time.monotonic() - started < 30
