"""The event journal's writer and reader on real files: one file per writer run, rotation,
offsets, torn last lines, ids unique and ordered per writer (docs/events.md)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay.spool import journal
from relay.spool.journal import Journal, files, read, writer_of

ID_RE = re.compile(r"^(\d{16})-([a-z][a-z0-9-]*)\.(\d{16})-(\d+)$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def make(tmp_path: Path, writer: str = "scheduler", **limits: Any) -> Journal:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return Journal(tmp_path / "events", writer, tmp_path / "tmp", **limits)


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {"event": "delivered", "id": f"{n:020x}", "rcpt": f"u{n}@a.test", **fields}


def read_all(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in files(directory):
        out += read(path, 0)[0]
    return out


def test_events_are_lines_with_their_id_and_time(tmp_path: Path) -> None:
    log = make(tmp_path)
    ids = log.append([event(1), event(2, reply="250 ok")])
    assert log.path is not None and files(tmp_path / "events") == [log.path]
    [first, second] = read(log.path, 0)[0]
    assert [first["event_id"], second["event_id"]] == ids
    assert first == {
        "event_id": ids[0], "event": "delivered", "timestamp": first["timestamp"],
        "id": f"{1:020x}", "rcpt": "u1@a.test",
    }  # fmt: skip
    assert second["reply"] == "250 ok" and TIMESTAMP_RE.match(second["timestamp"])
    match = ID_RE.match(ids[0])
    assert match and match.group(2) == "scheduler"
    # The id's time is the event's timestamp, in µs.
    assert journal.micros(int(match.group(1))) == first["timestamp"]
    writer, started = writer_of(log.path)
    assert (writer, f"{started:016d}") == ("scheduler", match.group(3))
    assert os.stat(log.path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path / "tmp") == []  # the file was made ready there, then linked


def test_nothing_appended_makes_no_file(tmp_path: Path) -> None:
    log = make(tmp_path)
    assert log.append([]) == [] and log.path is None
    log.sync()
    assert files(tmp_path / "events") == []


def test_ids_are_unique_and_ordered_per_writer_across_rotations(tmp_path: Path) -> None:
    log = make(tmp_path, max_bytes=2_000)
    ids = [i for n in range(300) for i in log.append([event(n)])]
    many = files(tmp_path / "events")
    assert len(many) > 10  # rotated at about 2 kB each
    assert all(p.stat().st_size < 2_000 + 200 for p in many)
    assert len(set(ids)) == 300 and sorted(ids) == ids
    got = read_all(tmp_path / "events")
    assert [e["event_id"] for e in got] == ids  # files in order, lines in order
    assert [e["id"] for e in got] == [f"{n:020x}" for n in range(300)]


def test_a_file_is_rotated_after_max_age(tmp_path: Path) -> None:
    log = make(tmp_path, max_age=0.05)
    log.append([event(1)])
    first = log.path
    log.append([event(2)])
    assert log.path == first
    time.sleep(0.06)
    log.append([event(3)])
    assert log.path != first and files(tmp_path / "events") == [first, log.path]


def test_two_writers_of_one_name_never_share_a_file_or_an_id(tmp_path: Path) -> None:
    """As a restarted intake while its predecessor still drains: each has its own file."""
    one, two = make(tmp_path, "intake"), make(tmp_path, "intake")
    ids = [i for n in range(50) for log in (one, two) for i in log.append([event(n)])]
    assert one.path != two.path and len(set(ids)) == 100
    assert len(read_all(tmp_path / "events")) == 100


def test_reading_from_an_offset_returns_only_new_lines(tmp_path: Path) -> None:
    log = make(tmp_path)
    log.append([event(1), event(2)])
    assert log.path is not None
    got, offset = read(log.path, 0)
    assert [e["rcpt"] for e in got] == ["u1@a.test", "u2@a.test"]
    assert offset == log.path.stat().st_size
    assert read(log.path, offset) == ([], offset)
    log.append([event(3)])
    got, later = read(log.path, offset)
    assert [e["rcpt"] for e in got] == ["u3@a.test"] and later == log.path.stat().st_size


def test_a_small_limit_pages_through_whole_lines(tmp_path: Path) -> None:
    log = make(tmp_path)
    log.append([event(n, reply="x" * (n * 50)) for n in range(40)])
    assert log.path is not None
    offset, got, reads = 0, [], 0
    while offset < log.path.stat().st_size:
        page, offset = read(log.path, offset, limit=300)
        got += page
        reads += 1
    assert [e["id"] for e in got] == [f"{n:020x}" for n in range(40)]
    assert reads > 10  # a line longer than the limit is still read whole


def test_a_line_being_written_waits_while_its_writer_lives(tmp_path: Path) -> None:
    log = make(tmp_path)
    log.append([event(1)])
    assert log.path is not None
    half = json.dumps({"event_id": "x", "event": "delivered"}).encode()
    with open(log.path, "ab", buffering=0) as other:  # the rest of a line not yet written
        other.write(half[:10])
        got, offset = read(log.path, 0)
        assert len(got) == 1 and offset == log.path.stat().st_size - 10
        assert read(log.path, offset) == ([], offset)
        other.write(half[10:] + b"\n")
    got, offset = read(log.path, offset)
    assert got == [{"event_id": "x", "event": "delivered"}]


def test_a_torn_last_line_is_skipped_once_the_file_is_closed(tmp_path: Path) -> None:
    log = make(tmp_path)
    log.append([event(1)])
    path = log.path
    assert path is not None
    log.close()
    with open(path, "ab") as other:  # what a crash in the middle of a write(2) leaves
        other.write(b'{"event_id":"0000000000000001-x')
    got, offset = read(path, 0)
    assert [e["rcpt"] for e in got] == ["u1@a.test"] and offset == path.stat().st_size
    log.append([event(2)])  # the writer goes on in a new file
    assert log.path != path and [e["rcpt"] for e in read_all(path.parent)] == [
        "u1@a.test",
        "u2@a.test",
    ]


WRITER = """
import os, sys, time
from pathlib import Path
from relay.spool.journal import Journal
log = Journal(Path(sys.argv[1]), "scheduler", Path(sys.argv[2]))
log.append([{"event": "delivered", "id": "1"}])
with open(log.path, "ab", buffering=0) as torn:
    torn.write(b'{"event": "deliv')
print(log.path, flush=True)
time.sleep(60)
"""


def test_the_torn_line_of_a_writer_killed_with_9_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "events"), str(tmp_path / "tmp")],
        stdout=subprocess.PIPE, text=True,
    ) as child:  # fmt: skip
        try:
            assert child.stdout is not None
            path = Path(child.stdout.readline().strip())
            got, offset = read(path, 0)
            assert [e["id"] for e in got] == ["1"] and offset < path.stat().st_size  # written
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
    got, offset = read(path, offset)
    assert got == [] and offset == path.stat().st_size  # its writer died: torn for good


def test_a_line_that_is_not_an_event_is_skipped(tmp_path: Path) -> None:
    log = make(tmp_path)
    log.append([event(1)])
    assert log.path is not None
    with open(log.path, "ab") as other:
        other.write(b"\x00\x00\x00 not json\n[1, 2]\n")
    log.append([event(2)])
    assert [e["rcpt"] for e in read(log.path, 0)[0]] == ["u1@a.test", "u2@a.test"]


def test_syncs_from_many_threads_share_and_cover_every_event(tmp_path: Path) -> None:
    log = make(tmp_path)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                log.append([event(n * 100 + i)])
                log.sync()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    got = read_all(tmp_path / "events")
    assert len(got) == 400 and len({e["event_id"] for e in got}) == 400


@pytest.mark.parametrize("writer", ["", "Intake", "a.b", "cli/1", "x" * 40])
def test_a_writer_name_must_fit_a_file_name(tmp_path: Path, writer: str) -> None:
    with pytest.raises(ValueError, match="journal writer"):
        make(tmp_path, writer)
