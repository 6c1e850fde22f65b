"""make bench's pure parts: which Postfix configuration a system name means, master.cf without
chroot, the rotation within rounds, per-round ratios, and when a case gets another round."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import compare
import systems

MASTER = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
#               (yes)   (yes)   (no)    (never) (100)
127.0.0.1:2525 inet n - y - - smtpd
pickup    unix  n       -       y       60      1       pickup
relay     unix  -       -       y       -       -       smtp
        -o syslog_name=postfix/$service_name
local     unix  -       n       n       -       -       local
"""


def test_unchrooted_sets_only_the_chroot_column_of_service_lines() -> None:
    before, after = MASTER.splitlines(), systems.unchrooted(MASTER).splitlines()
    assert len(after) == len(before)
    for old, new in zip(before, after, strict=True):
        if old[:1] in ("#", " "):  # comments and continuation lines stay as they were
            assert new == old
            continue
        fields = old.split()
        assert new.split() == [*fields[:4], "n", *fields[5:]]


ALL = tuple(systems.TUNING.values())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("postfix-old", ()),
        ("postfix", ALL),
        ("postfix-without-no_chroot", tuple(s for s in ALL if not s.chroot_off)),
        ("postfix-with-dns_disabled", (*ALL, systems.CANDIDATES["dns_disabled"])),
        (
            "postfix-without-no_chroot+no_peername_lookup",
            tuple(s for s in ALL if not s.chroot_off and s != systems.TUNING["no_peername_lookup"]),
        ),
    ],
)
def test_postfix_settings_by_system_name(name: str, expected: tuple[systems.Setting, ...]) -> None:
    assert systems.postfix_settings(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "postfix-without-nothing",
        "postfix-without-no_chroot+nothing",
        "postfix-with-no_chroot",
        "postfix-tuned",
        "exim",
    ],
)
def test_unknown_system_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unknown system"):
        systems.postfix_settings(name)


@pytest.mark.parametrize(
    ("round_", "order"),
    [
        (0, ["relay", "postfix", "postfix-old"]),
        (1, ["postfix", "postfix-old", "relay"]),
        (2, ["postfix-old", "relay", "postfix"]),
        (3, ["relay", "postfix", "postfix-old"]),
    ],
)
def test_each_round_starts_one_system_further_on(round_: int, order: list[str]) -> None:
    assert compare.rotation(compare.SYSTEMS, round_) == order


def rows(system: str, values: list[float | None], key: str = "end_to_end_per_s") -> list[Any]:
    return [{"system": system, "run": run, key: value} for run, value in enumerate(values)]


def test_ratios_pair_the_systems_round_by_round_and_skip_incomplete_rounds() -> None:
    raw = rows("relay", [300, 200, None, 100]) + rows("postfix", [200, 250, 100])
    assert compare.round_ratios(raw, "end_to_end_per_s", "relay", "postfix") == [1.5, 0.8]
    assert compare.ratios_text([1.5, 0.8]) == "1.15x (0.80-1.50)"
    assert compare.ratios_text([1.0]) == "1.00x"
    assert compare.ratios_text([]) == "-"


@pytest.mark.parametrize(
    ("relay", "postfix", "done", "seconds_left", "expected"),
    [
        ([300, 200], [300, 200], 2, 60, True),  # fewer than --runs rounds
        ([300, 300, 300], [300, 300, 300], 3, 60, False),  # ratios agree
        ([300, 200, 300], [300, 300, 300], 3, 60, True),  # 1.0, 0.67, 1.0: wide
        ([300, 290, 300], [300, 300, 300], 3, 60, False),  # within 15%
        ([300, 200, 300], [300, 300, 300], 3, -1, False),  # the case's share is spent
    ],
)
def test_a_case_gets_more_rounds_only_while_its_ratios_spread_wide(
    relay: list[float], postfix: list[float], done: int, seconds_left: float, expected: bool
) -> None:
    args = SimpleNamespace(runs=3, spread=0.15)
    raw = rows("relay", list(relay)) + rows("postfix", list(postfix))
    until = compare.time.monotonic() + seconds_left
    assert compare.more_rounds(raw, done, ("relay", "postfix"), args, until) is expected


def test_results_from_before_the_tuned_postfix_show_it_as_the_old_one() -> None:
    old = {"runs": [{"system": "relay"}, {"system": "postfix"}]}
    assert [r["system"] for r in compare.legacy(old)] == ["relay", "postfix-old"]
    new = {"systems": list(compare.SYSTEMS), "runs": [{"system": "postfix"}]}
    assert [r["system"] for r in compare.legacy(new)] == ["postfix"]
