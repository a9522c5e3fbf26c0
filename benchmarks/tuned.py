"""Tuned dispatch on the GPU: FA4's JIT, fa4aot untuned (FA4's choices), fa4aot tuned (the
cache's tuning table for this device) and cuDNN through torch SDPA, over the same shapes, in one run.

    python benchmarks/tuned.py --cache CACHE [--shapes sweep24] [--json out.json] [--no-fa4]
    python benchmarks/tuned.py --from-json out.json [--plot out.png]

Every method is timed the same way: CUDA events around single calls, L2 flushed before each, the
calls of a round queued behind a busy kernel (host time never shows as GPU idle time), methods
interleaved in a shuffled order each round; medians over rounds x reps. FA4 compiles on first use
(outside the timing). cuDNN gets K/V repeated to the query heads (outside the timing) and has no
column for varlen shapes. The table reports TFLOP/s and the ratios; the summary the geometric
mean of tuned / FA4 and the best and worst shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

METHODS = ("FA4 JIT", "fa4aot untuned", "fa4aot tuned", "cuDNN SDPA")


def geomean(xs: list[float]) -> float:
    import math

    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def report(res: dict) -> str:
    lines = [
        f"tuned dispatch, GPU: {res['gpu']}; bf16; TFLOP/s from the median of {res['samples']} single-call "
        "CUDA-event timings (L2 flushed, queued behind a busy kernel)",
        f"{'shape':<40}" + "".join(f"{m:>16}" for m in METHODS) + f"{'tuned/FA4':>11}{'tuned/untuned':>15}  choice",
    ]
    ratios, vs_untuned = [], []
    for r in res["rows"]:
        cells = "".join(f"{r['tflops'][m]:>16.1f}" if r["tflops"].get(m) else f"{'-':>16}" for m in METHODS)
        fa4 = r["tflops"].get("FA4 JIT")
        ratio = r["tflops"]["fa4aot tuned"] / fa4 if fa4 else None
        vu = r["tflops"]["fa4aot tuned"] / r["tflops"]["fa4aot untuned"]
        if ratio:
            ratios.append((ratio, r["shape"]))
        vs_untuned.append(vu)
        rt = f"{ratio:>11.3f}" if ratio else f"{'-':>11}"
        lines.append(f"{r['shape']:<40}{cells}{rt}{vu:>15.3f}  {r['choice']}")
    if ratios:
        g = geomean([x for x, _ in ratios])
        best, worst = max(ratios), min(ratios)
        lines.append(
            f"geometric mean tuned/FA4 {g:.3f} over {len(ratios)} shapes; best {best[0]:.3f} ({best[1]}), "
            f"worst {worst[0]:.3f} ({worst[1]})"
        )
        ug = geomean(
            [r["tflops"]["fa4aot untuned"] / r["tflops"]["FA4 JIT"] for r in res["rows"] if r["tflops"].get("FA4 JIT")]
        )
        lines.append(f"geometric mean untuned/FA4 {ug:.3f}")
    lines.append(f"geometric mean tuned/untuned {geomean(vs_untuned):.3f}")
    eq = [r["untuned_bitwise_equal_fa4"] for r in res["rows"] if r.get("untuned_bitwise_equal_fa4") is not None]
    if eq:
        lines.append(f"fa4aot untuned output bitwise equal to FA4's: {sum(eq)} of {len(eq)} shapes")
    cud = [
        r["tflops"]["fa4aot tuned"] / r["tflops"]["cuDNN SDPA"] for r in res["rows"] if r["tflops"].get("cuDNN SDPA")
    ]
    if cud:
        lines.append(f"geometric mean tuned/cuDNN {geomean(cud):.3f} over {len(cud)} dense shapes")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(14, 5))
    w = 0.2
    for i, m in enumerate(METHODS):
        ys = [r["tflops"].get(m) or 0 for r in rows]
        ax.bar([j + (i - 1.5) * w for j in range(len(rows))], ys, w, label=m)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["shape"] for r in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"tuned dispatch vs FA4 and cuDNN, {res['gpu']}, bf16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure_shape(shape, untuned, tuned, fa4, flush, rng, args) -> dict:
    """Time one shape with every method (interleaved rounds); its row of the report."""
    import torch

    import fa4aot
    from fa4aot.tools import tune

    sr = tune.ShapeRun(untuned, shape, tune.default_variant(shape, untuned.target).variant_id)
    q, k, v = sr.q, sr.k, sr.v
    outs = {m: torch.empty_like(q) for m in METHODS}
    mx = shape.seqlen_q
    c = shape.causal

    def ours(rt, o):
        if shape.varlen:
            return lambda: fa4aot.flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens_q=sr.cu,
                cu_seqlens_k=sr.cu,
                max_seqlen_q=mx,
                max_seqlen_k=mx,
                causal=c,
                out=o,
                runtime=rt,
            )
        return lambda: fa4aot.flash_attn_func(q, k, v, causal=c, out=o, runtime=rt)

    fns = {
        "fa4aot untuned": ours(untuned, outs["fa4aot untuned"]),
        "fa4aot tuned": ours(tuned, outs["fa4aot tuned"]),
    }
    if fa4 is not None:
        if shape.varlen:
            fns["FA4 JIT"] = lambda: fa4._flash_attn_fwd(
                q,
                k,
                v,
                cu_seqlens_q=sr.cu,
                cu_seqlens_k=sr.cu,
                max_seqlen_q=mx,
                max_seqlen_k=mx,
                causal=c,
                out=outs["FA4 JIT"],
            )
        else:
            fns["FA4 JIT"] = lambda: fa4._flash_attn_fwd(q, k, v, causal=c, out=outs["FA4 JIT"])
    if not shape.varlen:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        g = shape.nheads // shape.nheads_kv
        qt = q.transpose(1, 2)
        kt = k.repeat_interleave(g, dim=2).transpose(1, 2)
        vt = v.repeat_interleave(g, dim=2).transpose(1, 2)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=c)

        fns["cuDNN SDPA"] = cudnn
    for fn in fns.values():  # compile (FA4), load, warm up
        fn()
    torch.cuda.synchronize()
    same = torch.equal(outs["fa4aot untuned"], outs["FA4 JIT"]) if "FA4 JIT" in fns else None
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(args.rounds):
        order = list(fns)
        rng.shuffle(order)
        for m in order:
            ev = []
            torch.cuda._sleep(tune.QUEUE_SLEEP_CYCLES)
            for _ in range(args.reps):
                flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fns[m]()
                b.record()
                ev.append((a, b))
            torch.cuda.synchronize()
            times[m].extend(a.elapsed_time(b) for a, b in ev)
    med = {m: statistics.median(t) for m, t in times.items()}
    lv = tuned._load_id(sr.default_id)
    choice = (lv.tuned or {}).get(sr.bucket)
    label = "FA4's"
    if choice:
        f = tuned.index.entry(choice).variant.fields
        label = f"{f['tile_m']}x{f['tile_n']}" + (
            "" if f["pack_gqa"] == lv.fields["pack_gqa"] else f" pack_gqa={f['pack_gqa']}"
        )
    row = {
        "shape": shape.label(),
        "spec": shape.spec(),
        "ms": med,
        "tflops": {m: shape.flops() / (t * 1e-3) / 1e12 for m, t in med.items()},
        "spread": {m: tune.spread(t) for m, t in times.items()},
        "choice": label,
        "untuned_bitwise_equal_fa4": same,
    }
    print(row["shape"], {m: round(x, 1) for m, x in row["tflops"].items()}, label, flush=True)
    return row


def run(args) -> dict:
    import torch

    from fa4aot.runtime.loader import Runtime
    from fa4aot.tools import tune

    shapes = tune.parse_shapes(args.shapes)
    untuned = Runtime(args.cache, tuned=False)
    tuned = Runtime(args.cache)
    if not tuned.tuning_table:
        sys.exit(f"no tuning table for this GPU in {args.cache}: run `fa4aot tune` first")
    fa4 = None
    if not args.no_fa4:
        from flash_attn.cute import interface as fa4

    flush = torch.empty(2 * (untuned.target.l2_bytes or 50 * 2**20) // 4, dtype=torch.int32, device="cuda")
    rng = random.Random(0)
    rows = []
    for shape in shapes:
        rows.append(measure_shape(shape, untuned, tuned, fa4, flush, rng, args))
        torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(), "samples": args.rounds * args.reps, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache")
    ap.add_argument("--shapes", default="sweep24")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-fa4", action="store_true", help="skip FA4's JIT (not installed)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    ap.add_argument("--from-json", help="print (and plot) a saved run")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
    else:
        if not args.cache:
            ap.error("--cache is required unless --from-json is given")
        res = run(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    print(report(res))
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
