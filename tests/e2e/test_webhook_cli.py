"""`relay webhook secret` as an operator runs it: secrets added to the hook's secret file (0600)
for rotation, or replacing it, each one a Standard Webhooks receiver takes; one-line errors for
an unknown hook, a bad file and a bad webhooks entry in `relay check-config`."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from standardwebhooks import Webhook

from relay.config.webhooks import read_secrets

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
