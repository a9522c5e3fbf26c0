"""Host overhead of launching FA4's combine kernel through fa4aot, vs the floor (GPU).

    python benchmarks/launch_overhead.py --cache cache [--json out.json] [--plot out.png]

Measures, on the current GPU, with no torch in the process (buffers from cuMemAlloc):
* host microseconds per ``fa4aot.combine`` call (validate, plan, cuLaunchKernelEx),
* the same for a raw ``cuLaunchKernelEx`` on a prepacked parameter buffer and a prebuilt config
  (the floor: what any Python launcher pays to the driver),
* the plan call alone, and plan + launch on already packed arguments (one foreign call),
* in fresh processes: ``import fa4aot`` time and time from interpreter start to the first
  combine finished on the GPU (runtime open, artifact verification, cubin + plan load, launch).
Medians over repeated batches; the GPU is named in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import median_us, plot_host_us

#: The combine call's arguments (b=1 s=1 h=16 d=128, 4 splits) on cuMemAlloc buffers, with ``d``
#: (cuda.bindings.driver) and ``RawTensor`` in scope: run by main() and by FIRST_LAUNCH alike.
COMBINE_ARGS = r"""
b, s, h, dim, splits = 1, 1, 16, 128, 4
nbytes = [splits * b * s * h * dim * 4, splits * b * s * h * 4, b * s * h * dim * 2]
ptrs = [int(d.cuMemAlloc(n)[1]) for n in nbytes]
op = RawTensor(ptrs[0], (splits, b, s, h, dim), "fp32")
lp = RawTensor(ptrs[1], (splits, b, s, h), "fp32", (b * h * s, h * s, 1, s))
out = RawTensor(ptrs[2], (b, s, h, dim), "bf16")
"""

FIRST_LAUNCH = (
    r"""
import time, sys
t0 = time.perf_counter()
import fa4aot
t_import = time.perf_counter()
from cuda.bindings import driver as d
from fa4aot.runtime.tensors import RawTensor
rt = fa4aot.open_runtime(sys.argv[1])
"""
    + COMBINE_ARGS
    + r"""
fa4aot.combine(op, lp, out)
d.cuCtxSynchronize()
t_first = time.perf_counter()
print(t_import - t0, t_first - t0)
"""
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default=os.environ.get("FA4AOT_CACHE", "cache"))
    ap.add_argument("--inner", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--fresh", type=int, default=5, help="fresh processes for import / first-launch time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    from cuda.bindings import driver as d

    import fa4aot
    from fa4aot.runtime.tensors import RawTensor

    rt = fa4aot.open_runtime(args.cache)
    combine_args = {"d": d, "RawTensor": RawTensor}
    exec(COMBINE_ARGS, combine_args)  # the buffers FIRST_LAUNCH makes in its fresh processes
    b, s, h, dim, op, lp, out = (combine_args[k] for k in ("b", "s", "h", "dim", "op", "lp", "out"))
    err, stream = d.cuStreamCreate(0)
    sh = int(stream)

    def sync():
        d.cuStreamSynchronize(stream)

    fa4aot.combine(op, lp, out, stream=sh)
    sync()
    (lv,) = rt._loaded.values()
    plan = lv.plan
    from fa4aot.core.signature import TensorDesc

    named = {
        "out_partial": TensorDesc(op.ptr, op.shape, (b * s * h * dim, s * h * dim, h * dim, dim, 1)),
        "lse_partial": TensorDesc(lp.ptr, lp.shape, lp.strides),
        "out": TensorDesc(out.ptr, out.shape, (s * h * dim, h * dim, dim, 1)),
        "stream": sh,
    }
    flat = plan.flatten(plan.order(named))

    # the floor: prepacked parameters, prebuilt config, one cuLaunchKernelEx per call
    st = plan.call(flat)
    rec = st.launches[0]
    import ctypes

    params = (ctypes.c_uint8 * rec.param_bytes).from_buffer_copy(bytes(rec.params[: rec.param_bytes]))
    offsets = [off for _, off, _ in sorted(lv.entry.meta["kernels"][0]["params"])]
    argv = (ctypes.c_void_p * len(offsets))(*(ctypes.addressof(params) + o for o in offsets))
    cfg = d.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = tuple(rec.grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = tuple(rec.block)
    cfg.sharedMemBytes = rec.smem
    cfg.hStream = stream
    fn = d.CUfunction(int(lv.kernels[0]))
    argv_addr = ctypes.addressof(argv)

    def raw_launch():
        d.cuLaunchKernelEx(cfg, fn, argv_addr, 0)

    def timed(fn) -> float:
        return median_us(fn, args.inner, args.repeats, warmup=100, sync=sync)

    rows = {
        "raw cuLaunchKernelEx (prepacked)": timed(raw_launch),
        "plan call only": timed(lambda: plan.call(flat)),
        "plan + launch, packed args": timed(lambda: plan.call_launch(flat)),
        "fa4aot.combine (RawTensor args)": timed(lambda: fa4aot.combine(op, lp, out, stream=sh)),
    }
    imports, firsts = [], []
    for _ in range(args.fresh):
        r = subprocess.run([sys.executable, "-c", FIRST_LAUNCH, args.cache], capture_output=True, text=True, check=True)
        i, f = map(float, r.stdout.split())
        imports.append(i * 1e3)
        firsts.append(f * 1e3)
    name = d.cuDeviceGetName(256, d.cuDeviceGet(rt.device)[1])[1].split(b"\0")[0].decode()
    print(f"GPU: {name}; combine bf16 d=128 h=16, 4 splits, b=1 s=1; medians of {args.repeats} x {args.inner} calls")
    print(f"{'path':<36} {'host us/call':>12}")
    for k, v in rows.items():
        print(f"{k:<36} {v:>12.2f}")
    print(
        f"{'overhead over the floor':<36} {rows['fa4aot.combine (RawTensor args)'] - rows['raw cuLaunchKernelEx (prepacked)']:>12.2f}"
    )
    print(
        f"fresh process: import fa4aot {statistics.median(imports):.1f} ms; "
        f"interpreter start to first combine done {statistics.median(firsts):.1f} ms (median of {args.fresh})"
    )
    result = {
        "gpu": name,
        "host_us": rows,
        "import_ms": statistics.median(imports),
        "first_launch_ms": statistics.median(firsts),
        "import_ms_all": imports,
        "first_launch_ms_all": firsts,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot_host_us(args.plot, rows, ["#888", "#5a9", "#36c"], f"fa4aot combine launch overhead, {name}", (7, 2.8))


if __name__ == "__main__":
    main()
