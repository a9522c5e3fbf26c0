"""Backward TFLOP/s: fa4aot's AOT backward against FA4's own JIT backward, same card, same run (GPU).

    python benchmarks/backward.py --cache CACHE [--iters 30] [--json out.json] [--md out.md]
    python benchmarks/backward.py --plot out.json --png out.png      # render a saved run

Both get the same q, k, v, out, lse and dout (out and lse from fa4aot's forward). A sample is 10
back-to-back calls (all kernels of the backward: preprocess, main kernel, postprocess) between two
CUDA events, per call: the GPU time once the host keeps ahead, as in a training step; the host
time of issuing a call is reported beside it, also for fa4aot's prepared backward
(``fa4aot.prepare_backward``, bound to the same tensors). Samples interleave fa4aot / FA4, after warm-up
(FA4's compiles excluded). FLOPs: FA's convention, 2.5 x the forward's 4 * b * h * sq * sk
* d, halved for causal. Reports medians. FA4 must be importable (../shared/device-fa4-on-h100.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

#: back-to-back calls per timed sample
CALLS = 10
#: (batch, seqlen, nheads, nheads_kv, head_dim, causal): Llama-style training shapes
SHAPES = [
    (4, 4096, 16, 16, 128, False),
    (4, 4096, 16, 16, 128, True),
    (2, 8192, 32, 8, 128, True),
    (4, 4096, 32, 4, 128, True),
    (8, 2048, 32, 8, 128, False),
    (16, 1024, 16, 16, 128, True),
]


def run(cache: str, iters: int) -> dict:
    import torch
    from flash_attn.cute import interface as fa4

    import fa4aot

    rt = fa4aot.open_runtime(cache)
    rows = []
    for b, s, h, hk, d, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", generator=g).bfloat16()
        k = torch.randn(b, s, hk, d, device="cuda", generator=g).bfloat16()
        v = torch.randn(b, s, hk, d, device="cuda", generator=g).bfloat16()
        dout = torch.randn(b, s, h, d, device="cuda", generator=g).bfloat16()
        out, lse = fa4aot.flash_attn_func(q, k, v, causal=causal, return_lse=True, runtime=rt)

        a = (q, k, v, out, dout, lse, causal)

        def mine(a=a):
            q, k, v, out, dout, lse, causal = a
            return fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=causal, runtime=rt)

        def theirs(a=a):
            q, k, v, out, dout, lse, causal = a
            return fa4._flash_attn_bwd(q, k, v, out, dout, lse, causal=causal)

        # the prepared backward (fa4aot.prepare_backward), gradients written into buffers it was bound to
        grads = [torch.empty_like(t) for t in (q, k, v)]
        bound = (dout, q, k, v, out, lse, *grads)
        prepared_run = fa4aot.prepare_backward(*bound, causal=causal, runtime=rt)

        def prepared(bound=bound, run=prepared_run):
            run(*bound)

        calls = (("fa4aot", mine), ("fa4", theirs), ("prepared", prepared))
        times: dict[str, list[float]] = {name: [] for name, _ in calls}
        host: dict[str, list[float]] = {name: [] for name, _ in calls}
        for _, f in calls:
            for _ in range(3):
                f()  # warm-up: loads (fa4aot) or compiles (FA4)
        torch.cuda.synchronize()
        for _ in range(iters):
            for name, f in calls:
                # CALLS back-to-back calls between two events: the GPU time per call once the
                # host keeps ahead (as in training), and the host time of issuing them
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    f()
                host[name].append((time.perf_counter() - t0) / CALLS)
                e1.record()
                e1.synchronize()
                times[name].append(e0.elapsed_time(e1) * 1e-3 / CALLS)
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        row = dict(batch=b, seqlen=s, nheads=h, nheads_kv=hk, head_dim=d, causal=causal)
        for name, ts in times.items():
            med = statistics.median(ts)
            row[f"{name}_ms"] = med * 1e3
            row[f"{name}_tflops"] = flops / med / 1e12
            row[f"{name}_host_us"] = statistics.median(host[name]) * 1e6
        row["ratio"] = row["fa4aot_tflops"] / row["fa4_tflops"]
        row["prepared_host_vs_fa4"] = row["prepared_host_us"] / row["fa4_host_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name()
    ratios = [r["ratio"] for r in rows]
    geo = statistics.geometric_mean(ratios)
    return {"gpu": gpu, "iters": iters, "rows": rows, "geomean_ratio": geo}


def markdown(res: dict) -> str:
    lines = [
        f"# Backward TFLOP/s on {res['gpu']}: fa4aot vs FA4's JIT (medians of {res['iters']} samples of "
        f"{CALLS} back-to-back calls, same run)",
        "",
        "| batch | seqlen | heads | kv heads | d | causal | fa4aot ms | FA4 ms | fa4aot TFLOP/s | FA4 TFLOP/s "
        "| ratio | fa4aot host us | FA4 host us | prepared host us | prepared / FA4 host |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['batch']} | {r['seqlen']} | {r['nheads']} | {r['nheads_kv']} | {r['head_dim']} | {r['causal']} "
            f"| {r['fa4aot_ms']:.3f} | {r['fa4_ms']:.3f} | {r['fa4aot_tflops']:.0f} | {r['fa4_tflops']:.0f} "
            f"| {r['ratio']:.3f} | {r.get('fa4aot_host_us', float('nan')):.0f} | {r.get('fa4_host_us', float('nan')):.0f} "
            f"| {r.get('prepared_host_us', float('nan')):.0f} | {r.get('prepared_host_vs_fa4', float('nan')):.2f} |"
        )
    lines += ["", f"Geometric mean of fa4aot/FA4: {res['geomean_ratio']:.3f}", ""]
    return "\n".join(lines)


def plot(res: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"b{r['batch']} s{r['seqlen']}\nh{r['nheads']}/{r['nheads_kv']}{' causal' if r['causal'] else ''}"
        for r in res["rows"]
    ]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([i - 0.2 for i in x], [r["fa4aot_tflops"] for r in res["rows"]], 0.4, label="fa4aot (AOT)")
    ax.bar([i + 0.2 for i in x], [r["fa4_tflops"] for r in res["rows"]], 0.4, label="FA4 (JIT)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("backward TFLOP/s (median)")
    ax.set_title(f"FA4 backward, d128 bf16, {res['gpu']}: geomean fa4aot/FA4 = {res['geomean_ratio']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--plot", help="render a saved JSON instead of running")
    ap.add_argument("--png")
    a = ap.parse_args()
    if a.plot:
        with open(a.plot) as f:
            res = json.load(f)
    else:
        res = run(a.cache, a.iters)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    text = markdown(res)
    print(text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)
    if a.png:
        plot(res, a.png)


if __name__ == "__main__":
    main()
