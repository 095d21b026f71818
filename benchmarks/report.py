"""Every benchmark goal in one table: the ``goals`` list of each ``benchmarks/results/bench_*.json``.

Each benchmark writes ``{"goal", "measured", "target", "met"}`` entries next to its own tables; ``make
bench`` runs them all and then this script, which prints one markdown table (goal / measured / target /
met, with the file's date) and writes ``benchmarks/results/goals.json``. ``met`` is None for a goal that
was not measured here (the GPU section on a machine without CUDA). Files that predate the ``goals`` key
are listed as such rather than skipped silently.

Usage:
  python benchmarks/report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path
from typing import Any


def collect(results: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    without: list[str] = []
    for path in sorted(results.glob("bench_*.json")):
        data = json.loads(path.read_text())
        goals = data.get("goals")
        if not goals:
            without.append(path.name)
            continue
        date = data.get("date") or data.get("machine", {}).get("date", "")
        for g in goals:
            rows.append({"bench": path.stem, "date": date, **g})
    return rows, without


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows, without = collect(args.results)
    print(f"\n## Goals ({datetime.date.today()}, {platform.machine()} {platform.system()})\n")
    print("| benchmark | goal | measured | target | met |")
    print("|---|---|---:|---|---|")
    for r in rows:
        met = "not measured" if r["met"] is None else ("yes" if r["met"] else "**no**")
        goal = str(r["goal"]).replace("|", "\\|")  # a |x| in the text would split the markdown cell
        print(f"| {r['bench']} ({r['date']}) | {goal} | {cell(r['measured'])} | {r['target']} | {met} |")
    measured = [r for r in rows if r["met"] is not None]
    print(
        f"\n{sum(r['met'] for r in measured)} of {len(measured)} measured goals met; {len(rows) - len(measured)} not measured here."
    )
    if without:
        print(f"Without a goals list (older runs): {', '.join(without)}")
    (args.results / "goals.json").write_text(json.dumps({"goals": rows, "without_goals": without}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
