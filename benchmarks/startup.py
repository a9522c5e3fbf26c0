"""Start-up of the fa4aot runtime, phase by phase, in fresh processes (GPU).

    python benchmarks/startup.py --cache CACHE [--big-cache CACHE] [--old-src DIR --old-cache DIR] \\
        [--runs 7] [--json out.json] [--plot out.png]

* ``import cuda.bindings.driver`` alone (what fa4aot no longer pays);
* a PyTorch process that has already initialised CUDA: ``import fa4aot`` and the runtime modules,
  ``open_runtime`` (driver set-up, device queries, packed index) on ``--big-cache`` (e.g. 1,000
  entries, see benchmarks/synth_cache.py), then the first use of a variant (read and hash the plan,
  load the cubin, dlopen the plan, module load, launcher) and the first forward call;
* a CuPy process with no torch: from spawning it to its first forward output (synchronised), and
  its phases (import cupy, CUDA context via CuPy, import fa4aot, open_runtime, first forward);
* with ``--old-src``/``--old-cache``: the same through another fa4aot checkout (the baseline).

Medians over ``--runs`` fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BINDINGS = r"""
import time; t0 = time.perf_counter()
import cuda.bindings.driver
print('{"import cuda.bindings.driver": %f}' % ((time.perf_counter() - t0) * 1e3))
"""

TORCH_OPEN = r"""
import json, sys, time
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
t0 = time.perf_counter()
import fa4aot
import fa4aot.runtime.forward
t1 = time.perf_counter()
rt = fa4aot.open_runtime(sys.argv[1])
t2 = time.perf_counter()
q = torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t3 = time.perf_counter()
out, _ = fa4aot.flash_attn_func(q, q, q, causal=True)
t4 = time.perf_counter()
torch.cuda.synchronize()
res = {"import fa4aot (runtime modules)": t1 - t0, "open_runtime": t2 - t1, "first forward call (load + launch)": t4 - t3}
res.update({f"open: {k}": v for k, v in getattr(rt, "open_seconds", {}).items()})
lv = [x for x in getattr(rt, "_loaded", {}).values() if getattr(x, "load_seconds", None)]
if lv:
    res.update({f"first use: {k}": v for k, v in lv[0].load_seconds.items()})
    res["first use (all phases)"] = sum(lv[0].load_seconds.values())
res["entries in the index"] = len(rt.index) if hasattr(rt, "index") else len(rt._by_id)
print(json.dumps({k: (v * 1e3 if not k.startswith("entries") else v) for k, v in res.items()}))
"""

CUPY_FIRST = r"""
import time; t0 = time.perf_counter()
import json, sys
import cupy as cp
t1 = time.perf_counter()
a = cp.zeros((1, 128, 16, 128), dtype=cp.float16); o = cp.empty_like(a)
cp.cuda.Device().synchronize()
t2 = time.perf_counter()
import fa4aot
from fa4aot import RawTensor
t3 = time.perf_counter()
fa4aot.open_runtime(sys.argv[1])
t4 = time.perf_counter()
r = lambda x: RawTensor(x.data.ptr, x.shape, "fp16")
fa4aot.flash_attn_func(r(a), r(a), r(a), causal=True, out=r(o), stream=cp.cuda.get_current_stream())
cp.cuda.Device().synchronize()
t5 = time.perf_counter()
print(json.dumps({"import cupy": t1 - t0, "CUDA context and first CuPy array": t2 - t1, "import fa4aot": t3 - t2,
                  "open_runtime": t4 - t3, "first forward and synchronise": t5 - t4, "in-process total": t5 - t0,
                  "wall clock at first output": time.time()}))
"""


def fresh(code: str, args: list[str], src: str, runs: int) -> tuple[dict[str, float], float]:
    """Median of each reported phase over ``runs`` fresh processes, and the median time from
    spawning the process to its first output (its report of ``wall clock at first output``, when
    it makes one) or else to its exit."""
    samples: list[dict[str, float]] = []
    spans = []
    for _ in range(runs):
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            cwd=src,  # `python -c` puts the working directory first on sys.path
            env=dict(os.environ, PYTHONPATH=src),
        )
        t_exit = time.time()
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        sample = json.loads(proc.stdout.strip().splitlines()[-1])
        spans.append((sample.pop("wall clock at first output", t_exit) - t0) * 1e3)
        samples.append(sample)
    keys = samples[0].keys()
    return {k: statistics.median(s[k] for s in samples) for k in keys}, statistics.median(spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("FA4AOT_CACHE", "cache"))
    ap.add_argument("--big-cache", default=None, help="a cache with many entries (default: --cache)")
    ap.add_argument("--old-src", default=None)
    ap.add_argument("--old-cache", default=None)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    big = args.big_cache or args.cache

    result: dict[str, dict] = {}
    result["import cuda.bindings.driver (ms)"], _ = fresh(BINDINGS, [], ROOT, args.runs)
    result["torch process, fa4aot (ms)"], _ = fresh(TORCH_OPEN, [big], ROOT, args.runs)
    cupy, wall = fresh(CUPY_FIRST, [args.cache], ROOT, args.runs)
    result["cupy-only process, fa4aot (ms)"] = {k: v * 1e3 for k, v in cupy.items()} | {"spawn to first output": wall}
    _, interp = fresh("print('{}')", [], ROOT, args.runs)
    result["bare interpreter (ms)"] = {"spawn to exit": interp}
    if args.old_src and args.old_cache:
        result["torch process, baseline (ms)"], _ = fresh(TORCH_OPEN, [args.old_cache], args.old_src, args.runs)
        old, wall = fresh(CUPY_FIRST, [args.old_cache], args.old_src, args.runs)
        result["cupy-only process, baseline (ms)"] = {k: v * 1e3 for k, v in old.items()} | {
            "spawn to first output": wall
        }

    from cuda.bindings import driver as d

    d.cuInit(0)
    gpu = d.cuDeviceGetName(256, d.cuDeviceGet(0)[1])[1].split(b"\0")[0].decode()
    print(f"GPU: {gpu}; medians of {args.runs} fresh processes")
    for section, rows in result.items():
        print(section)
        for k, v in rows.items():
            print(f"  {k:<48} {v:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu, "runs": args.runs, **result}, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, key in zip(axes, ("torch process, fa4aot (ms)", "cupy-only process, fa4aot (ms)")):
            rows = {k: v for k, v in result[key].items() if not k.startswith(("entries", "in-process", "spawn"))}
            ax.barh(list(rows)[::-1], list(rows.values())[::-1], color="#36c")
            ax.set_xlabel("milliseconds (median)")
            ax.set_title(key.replace(" (ms)", ""))
        fig.suptitle(f"fa4aot start-up, {gpu}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
