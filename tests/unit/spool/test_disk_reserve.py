"""The disk reserve's pure parts: spool.min_free parsed and turned into bytes and inodes for a
given file system, the reason a new message is refused, and the spool's cached statvfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.config import Config, ConfigError, load, parse
from relay.spool import reserve
from relay.spool.reserve import Space
from relay.spool.store import Spool

ROOT = Path(__file__).resolve().parents[3]
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "value"),
    [("auto", None), ("0", 0), ("1048576", 1_048_576), ("5368709120", 5 * GiB)],
)
def test_min_free_takes_bytes_or_auto(text: str, value: int | None) -> None:
    assert parse(f"spool: {{min_free: {text}}}").spool.min_free == value


@pytest.mark.parametrize("text", ["-1", "1G", "512MiB", "true", "1.5", "null", "[]"])
def test_bad_min_free_names_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^spool\.min_free: .* is not a number of bytes"):
        parse(f"spool: {{min_free: {text}}}")


def test_the_example_and_the_defaults_say_auto() -> None:
    assert Config().spool.min_free is None
    assert load(ROOT / "conf" / "relay.yaml").spool.min_free is None


def space(free: int, total: int, free_inodes: int = 10**6, inodes: int = 10**7) -> Space:
    return Space(free_bytes=free, total_bytes=total, free_inodes=free_inodes, total_inodes=inodes)


@pytest.mark.parametrize(
    ("min_free", "fs", "kept"),
    [
        # auto: the smaller of 512 MiB and 5% of the file system
        (None, space(100 * GiB, TiB), (512 * MiB, 1000)),
        (None, space(GiB, 2 * GiB), (int(2 * GiB * 0.05), 1000)),
        (None, space(0, 0, 0, 0), (0, 0)),
        # inodes: the smaller of 1000 and 1% of them; none on a file system without a count
        (None, space(GiB, TiB, 100, 10_000), (512 * MiB, 100)),
        (None, space(GiB, TiB, 0, 0), (512 * MiB, 0)),
        # an explicit reserve, whatever the file system's size
        (5 * GiB, space(GiB, 2 * GiB), (5 * GiB, 1000)),
        (1, space(GiB, TiB), (1, 1000)),
        # 0: no reserve at all
        (0, space(0, TiB, 0, 10**7), (0, 0)),
    ],
)
def test_reserve(min_free: int | None, fs: Space, kept: tuple[int, int]) -> None:
    assert reserve.reserve(fs, min_free) == kept


@pytest.mark.parametrize(
    ("min_free", "fs", "size", "shortage"),
    [
        (None, space(10 * GiB, TiB), 0, None),
        (None, space(512 * MiB, TiB), 0, None),  # at the reserve is not below it
        (
            None,
            space(512 * MiB - 1, TiB),
            0,
            f"spool: below min_free: {512 * MiB - 1} bytes free, reserve {512 * MiB}",
        ),
        (
            None,
            space(10 * GiB, TiB, 999, 10**7),
            0,
            "spool: below the inode reserve: 999 inodes free, reserve 1000",
        ),
        # SIZE (RFC 1870) against what is left above the reserve
        (GiB, space(GiB + 1000, TiB), 1000, None),
        (
            GiB,
            space(GiB + 1000, TiB),
            1001,
            "spool: SIZE=1001 is more than the 1000 bytes free above min_free",
        ),
        # no reserve: nothing is refused, not even a SIZE larger than the disk
        (0, space(0, TiB, 0, 10**7), 10 * TiB, None),
    ],
)
def test_shortage(min_free: int | None, fs: Space, size: int, shortage: str | None) -> None:
    assert reserve.shortage(fs, min_free, size) == shortage


def test_space_is_statvfs_for_an_unprivileged_process_and_cached(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.space()
    st = os.statvfs(tmp_path)
    assert first.total_bytes == st.f_blocks * st.f_frsize
    assert first.total_inodes == st.f_files
    assert 0 < first.free_bytes <= st.f_bfree * st.f_frsize  # root's reserved blocks excluded
    assert spool.space(max_age=60) is first  # MAIL FROM reuses a fresh reading
    assert spool.space(max_age=0) is not first  # and reads again once it is old
