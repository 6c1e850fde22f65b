"""The relay against an earlier revision of itself (`--base`, a git revision of this checkout),
in alternating pairs (A B, B A, ...) on the same smtp-source load and smtp-sink: whether a change
moved throughput or CPU per message beyond the machine's noise. Writes
bench/results/versions-<base>.json and prints a Markdown table per case (every loop bounded in
count and time)."""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from compare import ROOT, make_cases, ratios_text, rounds_arguments, run_rounds, select, spread_cell
from compare import round_ratios as ratios_to
from postfix_tuning import verdict

CURRENT = "relay"
KEYS = (("end_to_end_per_s", "end to end/s"), ("cpu_ms_per_message", "CPU ms/message"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    rounds_arguments(parser, runs=6, max_runs=6, sessions="1,20", systems=(CURRENT,))
    parser.add_argument("--base", default="main", help="the git revision to compare against")
    parser.add_argument("--out", help="default bench/results/versions-<base>.json")
    args = parser.parse_args()
    revision = git("rev-parse", "--short", args.base)
    out = Path(args.out or ROOT / "bench" / "results" / f"versions-{revision}.json")
    with tempfile.TemporaryDirectory(prefix=f"relay-{revision}-") as base:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "relay"],
                                 capture_output=True, check=True, timeout=60).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", base], input=archive, check=True, timeout=60)
        started = time.monotonic()
        raw = run_rounds(make_cases(args), (CURRENT, f"relay@{base}"), args)
        raw = [{**row, "system": "base" if row["system"] != CURRENT else CURRENT} for row in raw]
    results = {"base": revision, "head": git("rev-parse", "--short", "HEAD"), "runs": raw,
               "minutes": round((time.monotonic() - started) / 60, 1)}  # fmt: skip
    out.write_text(json.dumps(results) + "\n")
    print(render(results))


def git(*args: str) -> str:
    found = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                           check=True, timeout=60)  # fmt: skip
    return found.stdout.strip()


def render(results: dict[str, Any]) -> str:
    """Per case: the current checkout's figures, the base's, and their per-round ratios."""
    raw = results["runs"]
    lines = [f"{results['minutes']:g} min of runs: this checkout ({results['head']}, with its "
             f"uncommitted changes) against {results['base']}.", "",
             "| case | " + " | ".join(f"{title} | base | ratio" for _, title in KEYS)
             + " | verdict |", "|---|" + "---|---|---|" * len(KEYS) + "---|"]  # fmt: skip
    for size, sessions in dict.fromkeys((r["size"], r["sessions"]) for r in raw):
        match = {"size": size, "sessions": sessions}
        cells = [f"{size // 1024} KiB, {sessions} session{'' if sessions == 1 else 's'}"]
        for key, _ in KEYS:
            cells += [spread_cell(select(raw, "max_rate", name, **match), key)
                      for name in (CURRENT, "base")]  # fmt: skip
            cells.append(ratios_text(ratios_to(raw, key, CURRENT, "base", **match)))
        cells.append(verdict(ratios_to(raw, "end_to_end_per_s", CURRENT, "base", **match)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
