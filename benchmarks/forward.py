"""FA4's SM90 forward through fa4aot vs PyTorch SDPA (cuDNN and flash backends), on the GPU, and
the serving-engine calls through fa4aot vs FA4's own JIT, side by side on the same card.

    python benchmarks/forward.py --cache cache [--json out.json] [--plot out.png] [--sections dense,serving]

``dense`` prints three tables: TFLOP/s per (batch, seqlen, heads, head_dim) and causal flag
(median of CUDA event timings); host microseconds per call on a tiny shape (median of batches of
back-to-back calls, GPU not the bottleneck); and time from interpreter start to the first finished
output in a fresh process (fa4aot with torch, fa4aot with CuPy and no torch, torch SDPA).

``serving`` (needs FA4 importable: flash_attn.cute) times the same ``_flash_attn_fwd`` call
through fa4aot and through FA4: paged decode (batch 64, Llama-3-8B heads 32/8, head_dim 128,
page 128, context 4k-32k, pages in random order) and gpt-oss-style sink + sliding-window-128
prefill (heads 64/8, head_dim 64, paged, with and without the window). Device time per call is
timed on calls queued behind a sleep kernel (so host time does not show); host time per call is
measured on a tiny shape of each kind, next to fa4aot's dense path on a tiny shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys

from _common import median_us

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


def device_ms(fn, calls: int = 10, reps: int = 30) -> float:
    """Device milliseconds per call with the host out of the picture: a sleep kernel holds the
    stream while ``calls`` calls are queued behind it, so they run back to back and the events
    time only the GPU (FA4's ~70-90 us of host time per call would otherwise show up as idle
    gaps on short kernels). Median over ``reps``."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(HOLD_CYCLES)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


#: GPU clock cycles the stream is held while calls are queued (~3 ms at H100 clocks: more than
#: 10 calls of FA4's host time)
HOLD_CYCLES = 5_000_000


def host_us(fn, inner: int = 100, repeats: int = 30) -> float:
    import torch

    return median_us(fn, inner, repeats, warmup=20, sync=torch.cuda.synchronize)


def _paged(b, ctx, hk, d, page_size, gen):
    """A paged KV pool holding ``b`` sequences of ``ctx`` tokens, pages in random order."""
    import torch

    per = -(-ctx // page_size)
    k = torch.randn(b * per, page_size, hk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    table = torch.randperm(b * per, device="cuda", generator=gen).to(torch.int32).view(b, per)
    used = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    return k, v, table, used


def serving(runtime) -> dict:
    """fa4aot vs FA4 (same card, same inputs) on the serving calls; see the module docstring."""
    import torch
    from flash_attn.cute import interface as fa4

    import fa4aot
    import fa4aot.interface as fi

    ours = functools.partial(fi._flash_attn_fwd, runtime=runtime)
    g = torch.Generator(device="cuda").manual_seed(0)
    # host time per call on tiny shapes (the GPU is not the bottleneck); fa4aot's first, before
    # FA4 has run anything in this process (its JIT leaves work behind that competes for the GIL)
    tk, tv, ttable, tused = _paged(1, 128, 8, 128, 128, g)
    tq = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    tout = torch.empty_like(tq)
    kd = torch.randn(1, 128, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    qs = torch.randn(16, 64, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    ks, vs, ts, us = _paged(1, 128, 8, 64, 128, g)
    kvs = torch.randn(1, 128, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu1 = torch.tensor([0, 16], dtype=torch.int32, device="cuda")
    so = torch.empty_like(qs)
    tsink = torch.randn(64, device="cuda", generator=g).to(torch.bfloat16)
    kinds = {
        "paged decode": lambda fn: fn(tq, tk, tv, seqused_k=tused, page_table=ttable, causal=True, out=tout),
        "sink + window": lambda fn: fn(qs, ks, vs, cu_seqlens_q=cu1, max_seqlen_q=16, seqused_k=us, page_table=ts,
                                       causal=True, window_size_left=127, window_size_right=0, learnable_sink=tsink,
                                       out=so),
    }  # fmt: skip
    host = {
        "fa4aot flash_attn_func, dense decode b1 k128 (out given)": host_us(
            lambda: fa4aot.flash_attn_func(tq, kd, kd, causal=True, out=tout, runtime=runtime)
        ),
        "fa4aot flash_attn_varlen_func, dense decode b1 k128 seqused_k": host_us(
            lambda: fa4aot.flash_attn_varlen_func(tq, kd, kd, seqused_k=tused, causal=True, out=tout, runtime=runtime)
        ),
        "fa4aot flash_attn_varlen_func, sink + window, K/V not paged": host_us(
            lambda: fa4aot.flash_attn_varlen_func(qs, kvs, kvs, cu_seqlens_q=cu1, max_seqlen_q=16, seqused_k=us,
                                                  causal=True, window_size=(127, 0), learnable_sink=tsink, out=so,
                                                  runtime=runtime)
        ),
    }  # fmt: skip
    for kind, call in kinds.items():
        host[f"fa4aot _flash_attn_fwd, {kind} (out given)"] = host_us(lambda call=call: call(ours))
    rows = []

    def row(kind, call, out, flops, bytes_):
        # warm-up (FA4 compiles) and a bitwise check, each writing its own output
        a, b = call(ours, None), call(fa4._flash_attn_fwd, None)
        torch.cuda.synchronize()
        same = a[0] is not b[0] and torch.equal(a[0], b[0])
        t_ours = device_ms(lambda: call(ours, out))
        t_fa4 = device_ms(lambda: call(fa4._flash_attn_fwd, out))
        rows.append(
            dict(kind=kind, fa4aot_ms=t_ours, fa4_ms=t_fa4, ratio=t_ours / t_fa4, bitwise_equal=same,
                 tflops=flops / t_ours / 1e9, gbps=bytes_ / t_ours / 1e6)
        )  # fmt: skip

    b, s, h, d = 8, 4096, 16, 128  # dense prefill
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    out = torch.empty_like(q)
    for causal in (False, True):

        def call(fn, out, causal=causal):
            return fn(q, k, v, causal=causal, out=out)

        row(f"dense b8 s4k h16 d128 {'causal' if causal else 'non-causal'}", call, out,
            4 * b * h * s * s * d / (2 if causal else 1), 0)  # fmt: skip
    b, s, h, hk, d = 8, 2048, 32, 8, 128  # packed varlen: cu_seqlens_k, FA4's tensor-map workspace
    q = torch.randn(b * s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b * s, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def call(fn, out):
        return fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, causal=True, out=out)

    row("varlen b8 s2k h32/8 d128 causal (workspace)", call, out, 4 * b * h * s * s * d / 2, 0)
    del q, k, v
    b, h, hk, d = 64, 32, 8, 128
    for ctx in (4096, 8192, 16384, 32768):
        k, v, table, used = _paged(b, ctx, hk, d, 128, g)
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        out = torch.empty_like(q)

        def call(fn, out, q=q, k=k, v=v, table=table, used=used):
            return fn(q, k, v, seqused_k=used, page_table=table, causal=True, out=out)

        row(f"paged decode b64 ctx{ctx // 1024}k p128", call, out, 4 * b * h * ctx * d, 2 * k.numel() * 2)
        del k, v
    b, s, h, hk, d = 4, 4096, 64, 8, 64
    k, v, table, used = _paged(b, s, hk, d, 128, g)
    q = torch.randn(b * s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device="cuda")
    sink = torch.randn(h, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    for wl in (127, None):

        def call(fn, out, wl=wl):
            return fn(q, k, v, cu_seqlens_q=cu, max_seqlen_q=s, seqused_k=used, page_table=table, causal=True,
                      window_size_left=wl, window_size_right=0 if wl is not None else None, learnable_sink=sink,
                      out=out)  # fmt: skip

        keys = min(s, (wl or s) + 1)
        label = f"sink prefill b4 s4k h64/8 d64 p128 {'window 128' if wl else 'full causal'}"
        row(label, call, out, 4 * b * h * s * keys * d / (1 if wl else 2), 0)

    for kind, call in kinds.items():
        host[f"FA4 _flash_attn_fwd, {kind} (out given)"] = host_us(lambda call=call: call(fa4._flash_attn_fwd))
    return {"rows": rows, "host_us": host}


def print_serving(res: dict, name: str) -> None:
    print(
        f"\nserving calls, fa4aot vs FA4's JIT, GPU: {name}; bf16; device ms per call (median of 30 timings of 10 queued calls)"
    )
    print(f"{'kind':<52} {'fa4aot ms':>10} {'FA4 ms':>10} {'ratio':>7} {'bitwise':>8}")
    for r in res["rows"]:
        print(
            f"{r['kind']:<52} {r['fa4aot_ms']:10.4f} {r['fa4_ms']:10.4f} {r['ratio']:7.3f} "
            f"{'equal' if r['bitwise_equal'] else 'DIFFER':>8}"
        )
    print("\nhost microseconds per call, tiny shapes (median)")
    for k, v in res["host_us"].items():
        print(f"  {k:<56} {v:8.1f}")


def plot_serving(res: dict, name: str, path: str) -> None:
    """Device time per call, fa4aot and FA4, and host time per call (two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    rows = res["rows"]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["fa4aot_ms"] for r in rows], width=0.4, label="fa4aot")
    ax.bar([i + 0.2 for i in x], [r["fa4_ms"] for r in rows], width=0.4, label="FA4 JIT")
    for i, r in enumerate(rows):
        ax.text(i, max(r["fa4aot_ms"], r["fa4_ms"]), f"{r['ratio']:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [r["kind"].replace(" p128", "") for r in rows], rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("device ms per call")
    ax.set_title(f"serving calls, bf16, {name} (label: fa4aot / FA4)", fontsize=9)
    ax.legend(fontsize=8)
    host = res["host_us"]
    hx.barh(list(range(len(host))), list(host.values()))
    hx.set_yticks(list(range(len(host))), list(host), fontsize=6)
    hx.set_xlabel("host us per call (median)")
    hx.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--fresh", type=int, default=3)
    ap.add_argument("--sections", default="dense,serving", help="comma-separated: dense, serving")
    ap.add_argument("--from-json", default=None, help="print and plot the serving section of a saved run")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print_serving(saved["serving"], saved["gpu"])
        if args.plot:
            plot_serving(saved["serving"], saved["gpu"], args.plot)
        return
    sections = set(args.sections.split(","))
    if sections - {"dense", "serving"}:
        ap.error(f"--sections: unknown {sorted(sections - {'dense', 'serving'})}")
    if "dense" not in sections:
        import torch

        import fa4aot

        rt = fa4aot.open_runtime(args.cache)
        name = torch.cuda.get_device_name()
        res = serving(rt)
        print_serving(res, name)
        if args.plot:
            plot_serving(res, name, args.plot)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"gpu": name, "serving": res}, f, indent=1, default=str)
        return

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fa4aot

    rt = fa4aot.open_runtime(args.cache)
    name = torch.cuda.get_device_name()
    serving_res = serving(rt) if "serving" in sections else None
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
    if serving_res is not None:
        print_serving(serving_res, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"gpu": name, "tflops": rows, "host_us": host, "first_output_s": first, "serving": serving_res},
                f,
                indent=1,
                default=str,
            )
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
