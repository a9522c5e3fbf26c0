"""The Python part of a call's host time, on a CPU (no GPU): the rows of ``host_overhead.py``
with real PyTorch tensors in host memory standing in for CUDA ones and a launch function that
returns at once, so every microsecond measured is fa4aot's own code and torch's accessors.

    python benchmarks/host_path_cpu.py --cache CACHE [--old-src DIR] [--json out.json]

``CACHE``: a cache built from ``manifests/h100.yaml`` (the runtime opens it as an H100 through
``tests/fake_driver.py``). ``--old-src``: another fa4aot checkout run the same way in a
subprocess - the baseline, measured in the same run on the same CPU. Medians of ``--repeats``
batches of ``--inner`` back-to-back calls. Not a GPU claim: ``host_overhead.py`` measures the
calls on a GPU, where the driver's launch adds its own few microseconds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import _common

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCHMARKS)

#: A launch function that returns CUDA_SUCCESS without doing anything, and a cuStreamIsCapturing
#: that says no stream is being captured (built with the system C compiler on first use).
NOOP_C = (
    "int noop(void *config, void *f, void **params, void **extra) { return 0; }\n"
    "int not_capturing(void *stream, int *status) { *status = 0; return 0; }\n"
)


def noop_launch() -> tuple[int, int]:
    """The addresses of :data:`NOOP_C`'s functions."""
    d = tempfile.mkdtemp(prefix="fa4aot-noop-")
    src, lib = os.path.join(d, "noop.c"), os.path.join(d, "noop.so")
    with open(src, "w") as f:
        f.write(NOOP_C)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
    so = ctypes.CDLL(lib)
    return ctypes.cast(so.noop, ctypes.c_void_p).value, ctypes.cast(so.not_capturing, ctypes.c_void_p).value


def rows(cache: str, inner: int, repeats: int) -> dict[str, float]:
    """Host microseconds per call of each row, through the fa4aot on ``sys.path``."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from fake_driver import FakeDriver

    import fa4aot
    from fa4aot.interface import _flash_attn_fwd
    from fa4aot.runtime import fastpath, frameworks, tensors
    from fa4aot.runtime.loader import Runtime
    from fa4aot.runtime.tensors import DeviceTensor

    launch, not_capturing = noop_launch()

    class Driver(FakeDriver):
        def launch_function(self) -> int:
            return launch

        def capture_status_function(self) -> int:
            return not_capturing

    if hasattr(fastpath, "_torch_memory"):  # the workspace as CUDA builds of torch serve it (CPU tensors: device -1)
        fastpath._torch_memory = lambda: (lambda n, s: 1 << 40, lambda p: None, lambda: False, lambda: -1)

    # torch's CPU tensors read as device 0's, torch's current stream as stream 0
    dtypes = {torch.bfloat16: "bf16", torch.int32: "int32", torch.int64: "int64", torch.float32: "fp32"}
    tensors._CONVERTERS[torch.Tensor] = lambda t, name: DeviceTensor(
        t.data_ptr(), t.shape, t.stride(), dtypes[t.dtype], 0, "torch"
    )
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        torch._C._cuda_getCurrentRawStream = lambda device: 0
    fastpath._API[:] = [(torch.Tensor, torch._C._cuda_getCurrentRawStream)]
    frameworks._TORCH_STREAM[:] = [torch._C._cuda_getCurrentRawStream]
    rt = Runtime(cache, driver=Driver(cc=(9, 0), num_sms=132))

    bf = torch.bfloat16
    q = torch.randn(1, 128, 16, 128, dtype=bf)
    o = torch.empty_like(q)
    qv, kv = torch.randn(512, 32, 128, dtype=bf), torch.randn(512, 8, 128, dtype=bf)
    ov = torch.empty_like(qv)
    cu = torch.arange(0, 513, 64, dtype=torch.int32)
    cus = [torch.arange(0, 513, 512 // b, dtype=torch.int32) for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    changing = [(cus[i % 8], 512 // (cus[i % 8].numel() - 1) + i % 997, i % 13) for i in range(8 * 997)]
    it = iter(range(10**12))
    qd = torch.randn(8, 1, 32, 128, dtype=bf)
    od = torch.empty_like(qd)
    pool = torch.randn(64, 16, 8, 128, dtype=bf)
    pt = torch.arange(64, dtype=torch.int32).reshape(8, 8)
    used = torch.full((8,), 100, dtype=torch.int32)

    def varlen_batch_changing() -> None:
        c, m, dk = changing[next(it) % len(changing)]
        fa4aot.flash_attn_varlen_func(
            qv, kv, kv, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=m, max_seqlen_k=m + dk, causal=True, out=ov,
            runtime=rt,
        )  # fmt: skip

    calls = {
        "batched forward, same shapes": lambda: fa4aot.flash_attn_func(q, q, q, causal=True, out=o, runtime=rt),
        "varlen forward, max_seqlen and batch changing": varlen_batch_changing,
        "paged decode, _flash_attn_fwd": lambda: _flash_attn_fwd(
            qd,
            pool,
            pool,
            seqused_k=used,
            max_seqlen_q=1,
            max_seqlen_k=128,
            page_table=pt,
            causal=True,
            out=od,
            runtime=rt,
        ),  # fmt: skip
        "varlen forward, same shapes": lambda: fa4aot.flash_attn_varlen_func(
            qv,
            kv,
            kv,
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_seqlen_q=64,
            max_seqlen_k=64,
            causal=True,
            out=ov,
            runtime=rt,
        ),  # fmt: skip
    }
    if hasattr(fa4aot, "prepare_forward"):
        pb = fa4aot.prepare_forward(q, q, q, o, causal=True, runtime=rt)
        pv = fa4aot.prepare_forward(qv, kv, kv, ov, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64,
                                    causal=True, runtime=rt)  # fmt: skip
        pp = fa4aot.prepare_forward(qd, pool, pool, od, seqused_k=used, page_table=pt, max_seqlen_k=128, causal=True,
                                    runtime=rt)  # fmt: skip
        try:  # (a baseline checkout may have no varying prepared forward)
            pc = fa4aot.prepare_forward(qv, kv, kv, ov, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64,
                                        max_seqlen_k=64, causal=True, varying=True, runtime=rt)  # fmt: skip
        except (TypeError, ValueError):
            pc = None
        if pc is not None:

            def varying() -> None:
                c, m, dk = changing[next(it) % len(changing)]
                pc(qv, kv, kv, ov, c, c, max_seqlen_q=m, max_seqlen_k=m + dk)

            calls["prepared call, varying=True, batch and max_seqlen changing"] = varying
            raw = varying_raw(rt, qv, kv, ov, changing, it)
            if raw is not None:
                calls["prepared call, varying=True, raw pointers, batch and max_seqlen changing"] = raw
        ptrs = [t.data_ptr() for t in (q, q, q, o)]
        calls.update({
            "prepared call, batched": lambda: pb(q, q, q, o),
            "prepared call, varlen": lambda: pv(qv, kv, kv, ov, cu, cu),
            "prepared call, paged decode": lambda: pp(qd, pool, pool, od, used, pt),
            "prepared call, batched, launch_ptrs (unchecked)": lambda: pb.launch_ptrs(*ptrs, stream=0),
        })  # fmt: skip
    got = {name: _common.median_us(fn, inner, repeats, warmup=200) for name, fn in calls.items()}
    return dict(got, fa4aot=os.path.dirname(os.path.dirname(fa4aot.__file__)))


def varying_raw(rt, qv, kv, ov, changing, it):
    """The varying row's calls on raw pointers to the same tensors (another framework's call, on
    stream 0), or None where this checkout serves no such call from a prepared form."""
    import fa4aot
    from fa4aot.runtime.tensors import RawTensor

    def raw(t, dtype):
        return RawTensor(t.data_ptr(), tuple(t.shape), dtype)

    rq, rk, ro = raw(qv, "bf16"), raw(kv, "bf16"), raw(ov, "bf16")
    steps = [(raw(c, "int32"), m, dk) for c, m, dk in changing]
    run = fa4aot.prepare_forward(rq, rk, rk, ro, cu_seqlens_q=steps[3][0], cu_seqlens_k=steps[3][0], max_seqlen_q=64,
                                 max_seqlen_k=64, causal=True, varying=True, runtime=rt)  # fmt: skip
    if getattr(run, "other", None) is None:
        return None

    def call() -> None:
        c, m, dk = steps[next(it) % len(steps)]
        run(rq, rk, rk, ro, c, c, max_seqlen_q=m, max_seqlen_k=m + dk, stream=0)

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--old-src", default=None, help="another fa4aot checkout to measure as the baseline")
    ap.add_argument("--inner", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # (the baseline's subprocess)
    args = ap.parse_args()
    got = rows(args.cache, args.inner, args.repeats)
    if args.rows_only:
        print(json.dumps(got))
        return
    old: dict[str, float] = {}
    if args.old_src:
        cmd = [sys.executable, os.path.abspath(__file__), "--cache", args.cache, "--inner", str(args.inner),
               "--repeats", str(args.repeats), "--rows-only"]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.path.abspath(args.old_src))
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=args.old_src, env=env, check=True)
        old = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"host microseconds per call (Python only: CPU tensors, a launch that returns at once), "
          f"median of {args.repeats} x {args.inner} calls")  # fmt: skip
    print(f"{'call':<62} {'this tree':>10} {'baseline':>10}")
    print(f"this tree: {got.pop('fa4aot')}; baseline: {old.pop('fa4aot', None)}")
    for name, us in got.items():
        base = f"{old[name]:>10.2f}" if name in old else f"{'':>10}"
        print(f"{name:<62} {us:>10.2f} {base}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": got, "baseline": old, "old_src": args.old_src}, f, indent=1)


if __name__ == "__main__":
    main()
