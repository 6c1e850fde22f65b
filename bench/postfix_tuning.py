"""Postfix-only ablation of the bench's tuning: the tuned Postfix against, in turn, the old bench
Postfix, the tuned one without each of its settings and with each candidate that was left out,
in alternating pairs (A B, B A, ...) on the same smtp-source load and smtp-sink; writes
bench/results/postfix-tuning.json and prints a Markdown table per case (every loop bounded in
count and time)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from compare import (
    ROOT,
    make_cases,
    ratios_text,
    rounds_arguments,
    run_rounds,
    select,
    spread_cell,
)
from compare import round_ratios as ratios_to
from systems import CANDIDATES, TUNING, postfix_settings

REFERENCE = "postfix"
CHALLENGERS = (
    "postfix-old",
    *(f"postfix-without-{name}" for name in TUNING),
    *(f"postfix-with-{name}" for name in CANDIDATES),
)
NOISE = 0.03  # a median ratio within 3% of 1 is "neutral"
KEYS = (("end_to_end_per_s", "end to end/s"), ("cpu_ms_per_message", "CPU ms/message"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    rounds_arguments(parser, runs=4, max_runs=4, sessions="20", systems=CHALLENGERS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "postfix-tuning.json"))
    parser.add_argument("--render-only", action="store_true", help="print OUT's tables")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.render_only:
        systems = args.systems.split(",")
        for name in systems:
            postfix_settings(name)  # an unknown name fails here, before any run
        started, raw = time.monotonic(), []
        for name in systems:
            pair = run_rounds(make_cases(args), (REFERENCE, name), args)
            raw += [{**row, "against": name} for row in pair]
        minutes = round((time.monotonic() - started) / 60, 1)
        out.write_text(json.dumps({"systems": systems, "minutes": minutes, "runs": raw}) + "\n")
    print(render(json.loads(out.read_text())))


def render(results: dict[str, Any]) -> str:
    """Per case: each challenger's figures and its per-round ratios to the tuned Postfix it
    alternated with, and what the end-to-end ratio says."""
    raw, lines = results["runs"], []
    for size, sessions in dict.fromkeys((r["size"], r["sessions"]) for r in raw):
        plural = "" if sessions == 1 else "s"
        lines += [f"### {size // 1024} KiB, {sessions} session{plural}", "",
                  "| system | " + " | ".join(f"{title} | tuned | ratio" for _, title in KEYS)
                  + " | verdict |", "|---|" + "---|---|---|" * len(KEYS) + "---|"]  # fmt: skip
        for name in results["systems"]:
            match = {"size": size, "sessions": sessions, "against": name}
            if not select(raw, "max_rate", name, **match):
                continue  # not measured in this case
            cells = [name]
            for key, _ in KEYS:
                cells += [spread_cell(select(raw, "max_rate", system, **match), key)
                          for system in (name, REFERENCE)]  # fmt: skip
                cells.append(ratios_text(ratios_to(raw, key, name, REFERENCE, **match)))
            cells.append(verdict(ratios_to(raw, "end_to_end_per_s", name, REFERENCE, **match)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    head = f"{results['minutes']:g} min of runs. {results.get('note', '')}".strip()
    return "\n".join([head, "", *lines])


def verdict(ratios: list[float]) -> str:
    """What taking the setting out (or adding the candidate) did to the end-to-end rate."""
    if not ratios:
        return "-"
    median = statistics.median(ratios)
    if abs(median - 1) <= NOISE:
        return "neutral"
    direction = "slower" if median < 1 else "faster"
    if len(ratios) == 1:
        return direction
    every = max(ratios) < 1 if median < 1 else min(ratios) > 1
    return f"{direction} in {'every round' if every else 'most rounds'}"


if __name__ == "__main__":
    main()
