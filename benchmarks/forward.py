"""FA4's SM90 forward through fa4aot vs PyTorch SDPA (cuDNN and flash backends), on the GPU.

    python benchmarks/forward.py --cache cache [--json out.json] [--plot out.png]

Prints three tables: TFLOP/s per (batch, seqlen, heads, head_dim) and causal flag (median of CUDA
event timings); host microseconds per call on a tiny shape (median of batches of back-to-back
calls, GPU not the bottleneck); and time from interpreter start to the first finished output in a
fresh process (fa4aot with torch, fa4aot with CuPy and no torch, torch SDPA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SHAPES = [(8, 4096, 16, 128), (4, 8192, 16, 128), (16, 2048, 16, 64)]

FIRST_OUTPUT = {
    "fa4aot + torch": r"""
import time; t0 = time.perf_counter()
import torch, fa4aot, sys
fa4aot.open_runtime(sys.argv[1])
q = torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16)
out, _ = fa4aot.flash_attn_func(q, q, q, causal=True)
torch.cuda.synchronize(); print(time.perf_counter() - t0)
""",
    "fa4aot + cupy (no torch)": r"""
import time; t0 = time.perf_counter()
import cupy as cp, fa4aot, sys
from fa4aot import RawTensor
fa4aot.open_runtime(sys.argv[1])
a = cp.zeros((1, 128, 16, 128), dtype=cp.uint16); o = cp.empty_like(a)
r = lambda x: RawTensor(x.data.ptr, x.shape, "bf16")
fa4aot.flash_attn_func(r(a), r(a), r(a), causal=True, out=r(o))
cp.cuda.Device().synchronize(); print(time.perf_counter() - t0)
""",
    "torch SDPA": r"""
import time; t0 = time.perf_counter()
import torch, sys
q = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
torch.cuda.synchronize(); print(time.perf_counter() - t0)
""",
}


def gpu_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def host_us(fn, inner: int = 100, repeats: int = 30) -> float:
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        per.append((time.perf_counter() - t0) / inner * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--fresh", type=int, default=3)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa4aot

    fa4aot.open_runtime(args.cache)
    name = torch.cuda.get_device_name()
    rows = []
    for b, s, h, d in SHAPES:
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            out = torch.empty_like(q)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            res = {"shape": (b, s, h, d), "causal": causal}
            res["fa4aot"] = (
                flops
                / gpu_ms(lambda q=q, k=k, v=v, c=causal, o=out: fa4aot.flash_attn_func(q, k, v, causal=c, out=o))
                / 1e9
            )
            for label, backend in (
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ):
                try:
                    with sdpa_kernel(backend):
                        ms = gpu_ms(
                            lambda a=qt, b_=kt, c=vt, z=causal: F.scaled_dot_product_attention(a, b_, c, is_causal=z)
                        )
                    res[label] = flops / ms / 1e9
                except RuntimeError as e:  # backend not available for this shape
                    res[label] = None
                    print(f"{label} unavailable for {res['shape']}: {str(e)[:80]}", file=sys.stderr)
            rows.append(res)

    q = torch.randn(1, 128, 16, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qt = q.transpose(1, 2)
    host = {
        "fa4aot.flash_attn_func (out given)": host_us(lambda: fa4aot.flash_attn_func(q, q, q, causal=True, out=out)),
        "fa4aot.flash_attn_func (allocates out)": host_us(lambda: fa4aot.flash_attn_func(q, q, q, causal=True)),
    }
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        host["torch SDPA (flash backend)"] = host_us(lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        host["torch SDPA (cuDNN backend)"] = host_us(lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True))

    first = {}
    for label, code in FIRST_OUTPUT.items():
        ts = []
        for _ in range(args.fresh):
            r = subprocess.run([sys.executable, "-c", code, args.cache], capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{label}: failed: {r.stderr[-300:]}", file=sys.stderr)
                break
            ts.append(float(r.stdout.strip().splitlines()[-1]))
        first[label] = statistics.median(ts) if ts else None

    print(f"GPU: {name}; bf16; TFLOP/s (median of 20 CUDA-event timings)")
    print(f"{'b, s, h, d':<22} {'causal':<7} {'fa4aot':>8} {'sdpa-cudnn':>11} {'sdpa-flash':>11}")
    for r in rows:
        fmt = lambda x: f"{x:.0f}" if x else "n/a"  # noqa: E731
        print(
            f"{str(r['shape']):<22} {str(r['causal']):<7} {fmt(r['fa4aot']):>8} {fmt(r['sdpa-cudnn']):>11} {fmt(r['sdpa-flash']):>11}"
        )
    print("\nhost microseconds per call, b=1 s=128 h=16 d=128 causal (median)")
    for k, v in host.items():
        print(f"  {k:<42} {v:8.1f}")
    print(f"\ninterpreter start to first output, fresh process (median of {args.fresh})")
    for k, v in first.items():
        print(f"  {k:<42} {v * 1e3 if v else float('nan'):8.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "tflops": rows, "host_us": host, "first_output_s": first}, f, indent=1, default=str)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3.6))
        labels = [
            f"{r['shape'][0]}x{r['shape'][1]}x{r['shape'][2]}x{r['shape'][3]}{' c' if r['causal'] else ''}"
            for r in rows
        ]
        x = range(len(rows))
        for i, key in enumerate(("fa4aot", "sdpa-cudnn", "sdpa-flash")):
            ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] or 0 for r in rows], width=0.27, label=key)
        ax.set_xticks(list(x), labels, rotation=20, fontsize=8)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"Forward attention, bf16, {name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
