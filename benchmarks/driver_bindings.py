"""The runtime's driver binding, old (ctypes, the default) vs new (cuda-python's cuda.bindings),
in one run on one GPU (issue: driver access through cuda.bindings).

    python benchmarks/driver_bindings.py --cache CACHE [--runs 7] [--calls 3000] [--json out.json]

Per binding (``FA4AOT_DRIVER=ctypes`` / ``cuda-bindings``), in fresh processes (medians over
``--runs``): a torch process with CUDA initialised times ``import fa4aot`` + ``open_runtime`` + the
first forward call (load and launch, synchronised); then per-call host time of a warm forward
through torch tensors (``out`` given) and through ``RawTensor``s (each call asks the driver which
device holds each pointer: the binding's per-call cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = ("ctypes", "cuda-bindings")

CHILD = r"""
import json, sys, time
import torch
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
cache, calls = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
import fa4aot
rt = fa4aot.open_runtime(cache)
t1 = time.perf_counter()
q = torch.randn(2, 512, 16, 128, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(q)
t2 = time.perf_counter()
fa4aot.flash_attn_func(q, q, q, causal=True, out=out)
torch.cuda.synchronize()
t3 = time.perf_counter()
res = {"import + open_runtime (ms)": (t1 - t0) * 1e3, "first call, synchronised (ms)": (t3 - t2) * 1e3,
       "open + first call (ms)": (t1 - t0 + t3 - t2) * 1e3, "driver": type(rt.driver).__name__}

def per_call(fn, n):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return sorted(samples)[len(samples) // 2]

small = torch.randn(1, 1, 16, 128, device="cuda", dtype=torch.bfloat16)
small_out = torch.empty_like(small)
res["per call, torch tensors (us)"] = per_call(lambda: fa4aot.flash_attn_func(small, small, small, out=small_out), calls)
r = lambda x: fa4aot.RawTensor(x.data_ptr(), tuple(x.shape), "bf16", device=0)
rq, ro = r(small), r(small_out)
res["per call, RawTensor (us)"] = per_call(lambda: fa4aot.flash_attn_func(rq, rq, rq, out=ro), calls)
print(json.dumps(res))
"""


def run(cache: str, driver: str, calls: int) -> dict:
    env = dict(os.environ, FA4AOT_DRIVER=driver, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, cache, str(calls)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{driver}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    samples: dict[str, list[dict]] = {d: [] for d in DRIVERS}
    for _ in range(a.runs):  # interleaved, so drift hits both alike
        for d in DRIVERS:
            samples[d].append(run(a.cache, d, a.calls))
    metrics = [k for k in samples[DRIVERS[0]][0] if k != "driver"]
    table = {d: {m: statistics.median(s[m] for s in samples[d]) for m in metrics} for d in DRIVERS}
    import torch  # noqa: F401 - only for the device name

    gpu = torch.cuda.get_device_name(0)
    print(f"{gpu}, medians of {a.runs} fresh processes")
    print(f"| figure | {' | '.join(DRIVERS)} | new - old |")
    print("| --- | --- | --- | --- |")
    for m in metrics:
        old, new = table["ctypes"][m], table["cuda-bindings"][m]
        print(f"| {m} | {old:.2f} | {new:.2f} | {new - old:+.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": gpu, "runs": a.runs, "medians": table, "samples": samples}, f, indent=1)


if __name__ == "__main__":
    main()
