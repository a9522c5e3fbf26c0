"""Host microseconds per launch-plan call (FA4's host code through the shim), no GPU needed.

    python benchmarks/plan_overhead.py --cache cache [--json out.json]

For each family's first cached variant: median over repeats of (a) the bare shim call with
prepacked arguments (``Plan.call``) and (b) validate + pack + call (``Plan.plan`` on descriptors).
"""

from __future__ import annotations

import argparse
import json
import platform

from _common import median_us

from fa4aot.core import samples
from fa4aot.core.index import Cache
from fa4aot.plan.library import open_plan, target_answers


def bench(fn, inner: int = 2000, repeats: int = 15) -> float:
    """Median microseconds per call over ``repeats`` batches of ``inner`` calls."""
    return median_us(fn, inner, repeats, warmup=200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cache = Cache(args.cache)
    picked = {}
    for e in cache.entries():
        key = (e.variant.family, e.target.arch)
        picked.setdefault(key, e)
    rows = []
    for (fam, arch), e in sorted(picked.items()):
        plan = open_plan(cache.read_blob(e, "plan"), e.meta)
        plan.load(list(range(1, len(plan.kernels) + 1)), *target_answers(e.target.optin_smem()))
        ordered = plan.order(samples.named_args(e.variant))
        flat = plan.flatten(ordered)
        rows.append((fam, arch, bench(lambda p=plan, a=flat: p.call(a)), bench(lambda p=plan, a=ordered: p.plan(a))))
    print(f"launch-plan host cost on {platform.processor() or platform.machine()} ({platform.python_version()})")
    print(f"{'family':<10} {'arch':<8} {'call us':>8} {'plan() us':>10}")
    for fam, arch, call_us, plan_us in rows:
        print(f"{fam:<10} {arch:<8} {call_us:>8.2f} {plan_us:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(family=r[0], arch=r[1], call_us=r[2], plan_us=r[3]) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
