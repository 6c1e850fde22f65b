"""relay sendmail's flags and message preparation, as cron, PHP, git and scripts use them, and
the maildrop's files read back as untrusted input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.cli import sendmail
from relay.cli.fail import Fail
from relay.config.sendmail import SendmailConfig
from relay.daemon.supervisor import maildrop_mode
from relay.spool import maildrop

CFG = config.Config()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "-i"], {"from_headers": True, "dots": False}),
        (["-oi", "-f", "root", "a@x.test"], {"dots": False, "sender": "root", "recipients": ["a@x.test"]}),
        (["-froot@x.test", "--", "-odd@x.test"], {"sender": "root@x.test", "recipients": ["-odd@x.test"]}),
        (["-r", "<bounce@x.test>", "a@x.test"], {"sender": "bounce@x.test"}),
        (["-F", "Cron Daemon", "a@x.test"], {"full_name": "Cron Daemon"}),
        (["-N", "success,failure", "-V", "abc", "-R", "hdrs", "a@x.test"],
         {"notify": ["SUCCESS", "FAILURE"], "envid": "abc", "ret": "HDRS"}),
        (["-oem", "-odb", "-odi", "-om", "-B", "8BITMIME", "-U", "-v", "a@x.test"], {"recipients": ["a@x.test"]}),
        (["-bs"], {"mode": "bs"}), (["-bp"], {"mode": "bp"}), (["-q"], {"mode": "q"}),
        (["-q1h"], {"mode": "q"}), (["--config", "/etc/r.yaml"], {"config": "/etc/r.yaml"}),
        (["-C/etc/r.yaml"], {"config": "/etc/r.yaml"}),
    ],
)  # fmt: skip
def test_flags(argv: list[str], expected: dict[str, object]) -> None:
    opts = sendmail.parse(argv)
    assert {k: getattr(opts, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("argv", "error"),
    [(["-Q"], "unknown flag -Q"), (["-f"], "-f needs a value"), (["-N", "NEVER,DELAY"], "-N"),
     (["-R", "most"], "FULL or HDRS"), (["-V", "x" * 101], "-V")],
)  # fmt: skip
def test_bad_flags_are_usage_errors(argv: list[str], error: str) -> None:
    with pytest.raises(Fail, match=error) as raised:
        sendmail.parse(argv)
    assert raised.value.status == 64


PHP = (b"To: a@x.test, B <b@x.test>\nCc: c@x.test\nBcc: hidden@x.test,\n other@x.test\n"
       b"Subject: from php\n\nline\n.\nafter a lone dot\n")  # fmt: skip


def prepared(argv: list[str], raw: bytes, **settings: Any) -> sendmail.Prepared:
    cfg = dataclasses.replace(CFG, sendmail=SendmailConfig(**settings))
    return sendmail.prepare(sendmail.parse(argv), raw, cfg, "www-data")


def test_php_mail_recipients_from_the_header_bcc_removed() -> None:
    got = prepared(["-t", "-i"], PHP)
    assert got.recipients == ["a@x.test", "b@x.test", "c@x.test", "hidden@x.test", "other@x.test"]
    assert b"Bcc" not in got.data and b"other@x.test" not in got.data
    assert b"\r\nline\r\n.\r\nafter a lone dot\r\n" in got.data  # -i: the dot is text
    assert got.sender == f"www-data@{CFG.smtp.hostname}"
    assert b"\n" not in got.data.replace(b"\r\n", b"")  # every line end is CRLF
    for name in (b"From: www-data@", b"Date: ", b"Message-ID: <"):
        assert name in got.data


def test_without_i_a_lone_dot_ends_the_message_and_resent_fields_win() -> None:
    raw = b"To: a@x.test\nResent-To: r@x.test\nResent-Bcc: rb@x.test\n\nbody\n.\ncut\n"
    got = prepared(["-t"], raw)
    assert got.recipients == ["r@x.test", "rb@x.test"]
    assert got.data.endswith(b"\r\nbody\r\n") and b"Resent-Bcc" not in got.data


def test_cron_style_sender_qualified_and_headers_added() -> None:
    got = prepared(["-f", "root", "-F", "Cron Daemon", "user"], b"backup done\n",
                   default_domain="example.net")  # fmt: skip
    assert (got.sender, got.recipients) == ("root@example.net", ["user@example.net"])
    assert got.data.startswith(b"From: Cron Daemon <root@example.net>\r\nDate: ")
    assert got.data.endswith(b"\r\n\r\nbackup done\r\n")


def test_sender_from_the_header_when_configured() -> None:
    raw = b"From: App <app@shop.test>\nTo: a@x.test\n\nhi\n"
    assert prepared(["-t"], raw, sender_from_header=True).sender == "app@shop.test"
    assert prepared(["-t", "-f", ""], raw).sender == ""  # the null sender


@pytest.mark.parametrize(("argv", "raw"), [(["a@x.test"], b""), (["-t"], b"Subject: x\n\nhi\n")])
def test_no_message_or_no_recipients_are_data_errors(argv: list[str], raw: bytes) -> None:
    with pytest.raises(Fail) as raised:
        prepared(argv, raw)
    assert raised.value.status == 65


def test_a_dropped_file_reads_back_and_bad_ones_are_malformed(tmp_path: Path) -> None:
    envelope = maildrop.Envelope("a@x.test", ["b@x.test"], "HDRS", "id1", ["FAILURE"])
    name = maildrop.drop(tmp_path, envelope, b"Subject: x\r\n\r\nhi\r\n")
    assert [p.name for p in maildrop.waiting(tmp_path)] == [name]
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
    back = maildrop.read(tmp_path / name, 1000)
    assert (back.envelope, back.data) == (envelope, b"Subject: x\r\n\r\nhi\r\n")
    bad = {
        "garbage": b"not json\nhi\r\n",
        "no recipient": json.dumps(
            {"version": 1, "sender": "a@x.test", "recipients": [], "size": 4, "at": 1.0}
        ).encode()
        + b"\nhi\r\n",
        "short": json.dumps(
            {"version": 1, "sender": "", "recipients": ["b@x.test"], "size": 99, "at": 1.0}
        ).encode()
        + b"\nhi\r\n",
        "no line": b"x" * 50,
        "no time": json.dumps(
            {"version": 1, "sender": "", "recipients": ["b@x.test"], "size": 4}
        ).encode()
        + b"\nhi\r\n",
    }
    for label, content in bad.items():
        (tmp_path / label).write_bytes(content)
        with pytest.raises(maildrop.Malformed):
            maildrop.read(tmp_path / label, 1000)
    with pytest.raises(maildrop.Malformed, match="max_message_size"):
        maildrop.read(tmp_path / name, 5)
    moved = maildrop.reject(tmp_path / "garbage")
    assert moved == tmp_path / "rejected" / "garbage" and moved.exists()


def test_check_config_warns_about_the_maildrop_mode(tmp_path: Path) -> None:
    directory = tmp_path / "maildrop"
    assert maildrop_mode(directory) is None  # missing: the daemon makes it
    directory.mkdir()
    directory.chmod(0o3733)
    assert maildrop_mode(directory) is None
    directory.chmod(0o1777)  # readable by everyone: others could list the drops
    warning = maildrop_mode(directory)
    assert warning is not None and "mode 1777, expected 3733" in warning
