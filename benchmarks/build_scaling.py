"""Build throughput (CPU): variants per minute compiling one manifest into an empty cache with the
local process pool at 1 and 2 workers and with Ray tasks on a local cluster, plus an estimate
for a larger Ray cluster from the measured per-variant cost.

    python benchmarks/build_scaling.py [--manifest manifests/ci.yaml] [--family fwd_sm90] [--json out.json]
        [--cluster-cores 256] [--cluster-variants 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def run(manifest: str, families: tuple[str, ...], jobs: int, executor: str) -> dict:
    from fa4aot.compile.executors import executor_factory
    from fa4aot.compile.orchestrate import build

    with tempfile.TemporaryDirectory(prefix="fa4aot-scaling-") as cache:
        t0 = time.perf_counter()
        report = build(manifest, cache, jobs, families=families, pool_factory=executor_factory(executor))
        wall = time.perf_counter() - t0
    built = [r for r in report.rows if r.status == "built"]
    return {
        "executor": executor,
        "jobs": jobs,
        "variants": len(built),
        "failed": report.count("failed"),
        "wall_s": wall,
        "variants_per_min": 60 * len(built) / wall,
        "compile_s_median": statistics.median(r.seconds for r in built),
        "compile_s_sum": sum(r.seconds for r in built),
        "peak_rss_mb": report.peak_rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default="manifests/ci.yaml")
    ap.add_argument("--family", action="append", default=[])
    ap.add_argument("--json")
    ap.add_argument("--cluster-cores", type=int, default=256, help="cores of the cluster the estimate is for")
    ap.add_argument("--cluster-variants", type=int, default=1000)
    args = ap.parse_args()
    fams = tuple(args.family)
    rows = [
        run(args.manifest, fams, 1, "local"),
        run(args.manifest, fams, 2, "local"),
        run(args.manifest, fams, 2, "ray"),
    ]
    print(f"{args.manifest} {','.join(fams) or 'all families'}, this machine: {os.cpu_count()} CPUs")
    print(
        f"{'executor':<8}{'jobs':>5}{'variants':>10}{'wall s':>9}{'variants/min':>14}{'median compile s':>18}{'peak RSS MiB':>14}"
    )
    for r in rows:
        print(
            f"{r['executor']:<8}{r['jobs']:>5}{r['variants']:>10}{r['wall_s']:>9.1f}{r['variants_per_min']:>14.1f}"
            f"{r['compile_s_median']:>18.2f}{r['peak_rss_mb']:>14.0f}"
        )
    one = rows[0]
    per_variant = one["wall_s"] / one["variants"]  # one worker: compile plus the driver's store
    ray2 = rows[2]
    overhead = max(0.0, ray2["wall_s"] - rows[1]["wall_s"])  # cluster start and task scheduling, here
    est = args.cluster_variants * per_variant / args.cluster_cores + overhead
    est_text = (
        f"estimate: {args.cluster_variants} variants on {args.cluster_cores} cores (e.g. 4 nodes x 64, each with "
        f">= 64 GiB for 1 GiB per task): {args.cluster_variants} x {per_variant:.2f} s / {args.cluster_cores} + "
        f"{overhead:.0f} s start-up = {est:.0f} s ({est / 60:.1f} min), assuming per-variant cost as measured here "
        f"at 1 worker and compiles that scale per core (2 local workers gave "
        f"{rows[1]['variants_per_min'] / one['variants_per_min']:.2f}x of 1); the driver stores ~1 MB per variant"
    )
    print(est_text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"manifest": args.manifest, "families": fams, "rows": rows, "estimate": est_text}, f, indent=1)


if __name__ == "__main__":
    main()
