"""Per-row medians over several ``host_overhead.py --json`` runs on one machine (a noisy host's
rows move by tens of percent from run to run; each run's own medians are in its JSON).

    python benchmarks/runs_median.py RUN.json [RUN.json ...] [--md out.md]

For each row: its value in every run, the median of them, and the median of its ratio to the
cuda.bindings floor of the same run (an interleaved row: of the same interleaved pass).
"""

from __future__ import annotations

import argparse
import json
import statistics

FLOOR = "floor: cuLaunchKernelEx via cuda.bindings, prepacked"


def table(paths: list[str]) -> list[str]:
    """Markdown rows: call, each run's value, median, median ratio to its run's floor (for the
    interleaved rows, the floor timed in the same interleaved pass)."""
    runs = [json.load(open(p)) for p in paths]
    rows: dict[str, list[tuple[float, float] | None]] = {}
    for i, run in enumerate(runs):
        values = {
            n: (us, run["host_us"][FLOOR]) for n, us in dict(run["host_us"], **run.get("baseline_us", {})).items()
        }
        inter = run.get("interleaved_us", {})
        values.update({f"interleaved: {n}": (us, inter[FLOOR]) for n, us in inter.items()})
        for name, got in values.items():
            rows.setdefault(name, [None] * len(runs))[i] = got
    head = ["call", *(f"run {i + 1}" for i in range(len(runs))), "median", "median x floor"]
    out = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, values in rows.items():
        got = [v[0] for v in values if v is not None]
        ratios = [v[0] / v[1] for v in values if v is not None]
        cells = [f"{v[0]:.2f}" if v is not None else "" for v in values]
        out.append(f"| {name} | {' | '.join(cells)} | {statistics.median(got):.2f} | {statistics.median(ratios):.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    text = "\n".join(table(args.runs)) + "\n"
    print(text, end="")
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
