"""aarch64 launch plans on an x86_64 build box (CPU): what each way of producing them costs.

(a) the CuTe DSL exports FA4's host code for aarch64 (``--host-target linux-aarch64``) and the cross
    gcc links it; the build's self-test runs the plan once under qemu-aarch64. Measured: the build
    time per variant of one manifest for x86_64 plans and for aarch64 plans (same manifest, same
    machine, one worker, into empty caches; the difference is the cross link and the emulated
    self-test).
(b) running the whole DSL compile as aarch64 under qemu-user (arm64 Python and aarch64 wheels).
    Not built; its cost is estimated from qemu-user's slowdown on compiler-like integer work
    (hash-table inserts, string compares, sorting: ``benchmarks/qemu_workload.c``), measured on
    the same machine, times (a)'s native compile time.

    python benchmarks/aarch64_plans.py [--manifest manifests/ci.yaml] [--family combine ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_per_variant(manifest: str, families: tuple[str, ...], host: str) -> dict:
    from fa4aot.compile.orchestrate import build

    text = Path(manifest).read_text()
    with tempfile.TemporaryDirectory(prefix="fa4aot-a64-") as tmp:
        m = Path(tmp) / "m.yaml"
        m.write_text(re.sub(r"num_sms: (\d+)([,}])", rf"num_sms: \1, host_arch: {host}\2", text))
        t0 = time.perf_counter()
        report = build(m, Path(tmp) / "cache", 1, families=families)
        wall = time.perf_counter() - t0
    built = [r for r in report.rows if r.status == "built"]
    secs = [r.seconds for r in built]
    return {
        "host_arch": host,
        "variants": len(built),
        "failed": report.count("failed"),
        "wall_s": round(wall, 2),
        "per_variant_s_median": round(statistics.median(secs), 3),
        "per_variant_s_mean": round(statistics.mean(secs), 3),
    }


def qemu_slowdown(runs: int = 5) -> dict:
    """Median wall time of the same C workload natively and under qemu-aarch64."""
    src = HERE / "qemu_workload.c"
    with tempfile.TemporaryDirectory() as tmp:
        native, cross = Path(tmp) / "w-native", Path(tmp) / "w-aarch64"
        subprocess.run(["gcc", "-O2", "-o", native, src], check=True)
        subprocess.run(["aarch64-linux-gnu-gcc", "-O2", "-o", cross, src], check=True)
        times: dict[str, list[float]] = {"native": [], "qemu": []}
        for _ in range(runs):
            for name, cmd in (("native", [native]), ("qemu", ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", cross])):
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "native_s": round(med["native"], 3),
        "qemu_s": round(med["qemu"], 3),
        "slowdown": round(med["qemu"] / med["native"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(HERE.parent / "manifests" / "ci.yaml"))
    ap.add_argument("--family", action="append", default=[])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    fams = tuple(args.family)
    rows = [build_per_variant(args.manifest, fams, h) for h in (platform.machine(), "aarch64")]
    q = qemu_slowdown()
    native = rows[0]["per_variant_s_median"]
    est_b = round(native * q["slowdown"], 1)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; manifest {args.manifest} {fams or ''}")
    print("| plans for | variants | failed | wall s (1 worker) | s / variant (median) | s / variant (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['host_arch']} | {r['variants']} | {r['failed']} | {r['wall_s']} | {r['per_variant_s_median']} | {r['per_variant_s_mean']} |"
        )
    print(
        f"qemu-aarch64 on compiler-like work: {q['qemu_s']} s vs {q['native_s']} s native (x{q['slowdown']}); "
        f"(b), the whole compile emulated, would take about {est_b} s per variant (median native {native} s x {q['slowdown']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"builds": rows, "qemu": q, "estimate_b_s_per_variant": est_b}, indent=1))


if __name__ == "__main__":
    main()
