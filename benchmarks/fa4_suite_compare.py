"""FA4's own test suite (tests/fa4_suite/) without and with fa4aot's drop-in, side by side.

    python benchmarks/fa4_suite_compare.py RESULTS_DIR... [--json OUT.json]
    python benchmarks/fa4_suite_compare.py --fa4 fa4-junit.xml --fa4aot fa4aot-junit.xml [--counts-dir DIR]

The RESULTS_DIRs (one, or the $OUT of each of the two device calls) hold what
.devcarry/fa4suite_run.sh writes: ``fa4-junit.xml`` (FA4's JIT),
``fa4aot-junit.xml`` (FA4AOT_PATCH=1 with the suite's cache) and the per-process compile counts
``fa4-counts-*.json`` / ``fa4aot-counts-*.json`` (or ``fa4-counts.json``, a list of them). Prints the pass / skip / xfail / fail counts of
both runs, every test whose outcome differs (with each side's message), the tests only one run
reached, and the zero-JIT check: the FA4 compiles counted in the patched run (must be 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def read_junit(path: Path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome, message) from a pytest junit XML file (an xpassed test reads as
    passed there: pytest's junit report does not mark it)."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            msg = child.get("message") or ""
            if not msg and child.text:
                msg = child.text.strip().splitlines()[-1]
            if child.tag == "failure":
                outcome, message = "failed", msg
            elif child.tag == "error" and outcome != "failed":  # a teardown error after a failure: the failure
                outcome, message = "error", msg
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = msg
        out[case.get("name", "")] = (outcome, message)
    return out


def read_counts(directories: list[Path], mode: str) -> dict | None:
    """The compile counts of a run, summed over its pytest processes (None: none written)."""
    per_process: list[dict] = []
    for d in directories:  # one file per process, or the device script's one list of them
        for f in sorted(d.glob(f"{mode}-counts-*.json")):
            per_process.append(json.loads(f.read_text()))
        if (merged := d / f"{mode}-counts.json").exists():
            per_process += json.loads(merged.read_text())
    if not per_process:
        return None
    total: Counter[str] = Counter()
    stats: list[dict] = []
    for d in per_process:
        total.update(d.get("compiles", {}))
        if "fa4aot_stats" in d:
            stats.append(d["fa4aot_stats"])
    jit = sum(n for k, n in total.items() if k.startswith("setitem:"))
    misses = sum(s.get("misses", 0) for s in stats)
    fallbacks: Counter[str] = Counter()
    for s in stats:
        fallbacks.update(s.get("patch_fallbacks") or {})
    launches: Counter[str] = Counter()
    for s in stats:
        launches.update(s.get("launches") or {})
    return {
        "processes": len(per_process),
        "fa4_jit_compiles": jit,
        "cute_compile_calls": total.get("cute.compile", 0),
        "by_function": {k.removeprefix("setitem:"): n for k, n in sorted(total.items()) if k.startswith("setitem:")},
        "fa4aot_misses": misses if stats else None,
        "fa4aot_fallbacks": dict(fallbacks) if stats else None,
        "fa4aot_launches": dict(launches) if stats else None,
    }


def compare(fa4: dict[str, tuple[str, str]], ours: dict[str, tuple[str, str]]) -> dict:
    names = sorted(set(fa4) | set(ours))
    differ = [n for n in names if n in fa4 and n in ours and fa4[n][0] != ours[n][0]]
    return {
        "counts": {
            "fa4": dict(Counter(o for o, _ in fa4.values())),
            "fa4aot": dict(Counter(o for o, _ in ours.values())),
        },
        "differ": [
            {"test": n, "fa4": fa4[n][0], "fa4_message": fa4[n][1], "fa4aot": ours[n][0], "fa4aot_message": ours[n][1]}
            for n in differ
        ],
        "only_fa4": [n for n in names if n not in ours],
        "only_fa4aot": [n for n in names if n not in fa4],
    }


def _short(msg: str, width: int = 220) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= width else msg[: width - 3] + "..."


def report(result: dict, counts: dict[str, dict | None]) -> str:
    c = result["counts"]
    lines = [f"{'outcome':<10} {'FA4 (JIT)':>10} {'fa4aot':>10}"]
    for o in OUTCOMES:
        a, b = c["fa4"].get(o, 0), c["fa4aot"].get(o, 0)
        if a or b:
            lines.append(f"{o:<10} {a:>10} {b:>10}")
    lines.append(f"{'total':<10} {sum(c['fa4'].values()):>10} {sum(c['fa4aot'].values()):>10}")
    lines.append("")
    lines.append(f"{len(result['differ'])} tests with different outcomes:")
    by_pair = Counter((d["fa4"], d["fa4aot"]) for d in result["differ"])
    for (a, b), n in sorted(by_pair.items()):
        lines.append(f"  {a} -> {b}: {n}")
    for d in result["differ"]:
        lines.append(f"- {d['test']}")
        lines.append(f"    FA4:    {d['fa4']}  {_short(d['fa4_message'])}")
        lines.append(f"    fa4aot: {d['fa4aot']}  {_short(d['fa4aot_message'])}")
    reasons = Counter(_short(d["fa4aot_message"], 160) for d in result["differ"] if d["fa4aot"] in ("failed", "error"))
    if reasons:
        lines.append("")
        lines.append("fa4aot's failure messages, grouped:")
        lines += [f"  {n:>4}  {m}" for m, n in reasons.most_common()]
    for key, label in (("only_fa4", "only in FA4's run"), ("only_fa4aot", "only in fa4aot's run")):
        if result[key]:
            lines.append("")
            lines.append(f"{len(result[key])} tests {label} (the other run did not reach them):")
            lines += [f"  {n}" for n in result[key]]
    lines.append("")
    for mode, label in (("fa4", "FA4 (JIT)"), ("fa4aot", "fa4aot (FA4AOT_PATCH=1)")):
        k = counts.get(mode)
        if k is None:
            lines.append(f"{label}: no compile counts")
            continue
        lines.append(
            f"{label}: {k['fa4_jit_compiles']} FA4 JIT compiles ({k['cute_compile_calls']} cute.compile calls) "
            f"in {k['processes']} processes {k['by_function'] or ''}"
        )
        if k["fa4aot_misses"] is not None:
            lines.append(
                f"  fa4aot.stats(): misses {k['fa4aot_misses']}, fallbacks {k['fa4aot_fallbacks'] or 0}, "
                f"launches {k['fa4aot_launches']}"
            )
    ours = counts.get("fa4aot")
    if ours is not None:
        zero = ours["fa4_jit_compiles"] == 0 and ours["cute_compile_calls"] == 0 and not ours["fa4aot_fallbacks"]
        lines.append(f"zero JIT with the patch: {'yes' if zero else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="the $OUT directories fa4suite_run.sh wrote")
    ap.add_argument("--fa4", type=Path, help="junit XML of the run without the patch")
    ap.add_argument("--fa4aot", type=Path, help="junit XML of the run with FA4AOT_PATCH=1")
    ap.add_argument("--counts-dir", type=Path, action="append", help="where *-counts-*.json are (default: RESULTS)")
    ap.add_argument("--json", type=Path, help="also write the comparison as JSON")
    a = ap.parse_args(argv)

    def find(name: str) -> Path | None:
        return next((d / name for d in a.results if (d / name).is_file()), None)

    fa4_xml = a.fa4 or find("fa4-junit.xml")
    ours_xml = a.fa4aot or find("fa4aot-junit.xml")
    if fa4_xml is None or ours_xml is None:
        ap.error("no fa4-junit.xml and fa4aot-junit.xml: give the RESULTS dirs, or --fa4 and --fa4aot")
    result = compare(read_junit(fa4_xml), read_junit(ours_xml))
    dirs = a.counts_dir or a.results or [fa4_xml.parent, ours_xml.parent]
    counts = {m: read_counts(dirs, m) for m in ("fa4", "fa4aot")}
    print(report(result, counts))
    if a.json:
        a.json.write_text(json.dumps({**result, "compiles": counts}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
