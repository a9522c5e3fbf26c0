"""Tokens/s of Hugging Face ``generate()`` with the "fa4aot" attention backend and with transformers'
own (sdpa, or eager where the model needs it), on the small random-weight models of
tests/gpu/transformers_models.py (GPU; needs transformers and a cache holding
manifests/transformers-h100.yaml).

    python benchmarks/transformers_generate.py --cache CACHE [--models llama-gqa qwen2 gemma2 gpt-oss] \\
        [--batch 2] [--prompt 300] [--new-tokens 128] [--runs 5] [--json benchmarks/results/h100-transformers/x.json]

Greedy decoding of ``--new-tokens`` tokens after a ``--prompt``-token prompt per sequence; the
median of ``--runs`` timed runs after one warm-up (which also loads fa4aot's kernels: the first
call's cost is reported apart, as "first generate"). Prints one line per model and backend and
writes the numbers as JSON (default under benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))


def timed_generate(model, ids, new_tokens: int) -> float:
    """Seconds of one greedy generate() of ``new_tokens`` tokens, synchronised."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    mask = torch.ones_like(ids)  # no padding (and no warning about an unset mask)
    model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(name: str, backend: str, args: argparse.Namespace, state: dict | None) -> tuple[dict, dict]:
    """One model on one backend: (result row, the model's state dict for the next backend)."""
    import torch
    from transformers_models import build

    model = build(name, backend, state=state)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), device="cuda")
    first = timed_generate(model, ids, args.new_tokens)
    times = [timed_generate(model, ids, args.new_tokens) for _ in range(args.runs)]
    med = statistics.median(times)
    tokens = args.batch * args.new_tokens
    row = {
        "model": name,
        "backend": backend,
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "first_generate_s": first,
        "median_s": med,
        "tokens_per_s": tokens / med,
        "runs_s": times,
    }
    return row, model.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="an fa4aot cache holding manifests/transformers-h100.yaml")
    ap.add_argument("--models", nargs="+", default=None, help="models (default: all)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--json", default=None, help="output (default: benchmarks/results/transformers-generate/<device>.json)"
    )
    args = ap.parse_args()

    import torch
    import transformers
    from transformers_models import MODELS

    import fa4aot

    torch.cuda.init()
    torch.empty(1, device="cuda")  # torch's context current before fa4aot opens the device
    rt = fa4aot.open_runtime(args.cache)
    rows = []
    for name in args.models or sorted(MODELS):
        ref_backend = MODELS[name][2]
        ref, state = bench(name, ref_backend, args, None)
        ours, _ = bench(name, "fa4aot", args, state)
        for row in (ref, ours):
            rows.append(row)
            print(
                f"{name:10s} {row['backend']:7s} batch {args.batch} prompt {args.prompt} +{args.new_tokens}: "
                f"{row['tokens_per_s']:9.1f} tokens/s (median {row['median_s'] * 1e3:.1f} ms, "
                f"first {row['first_generate_s'] * 1e3:.1f} ms)"
            )
        print(f"{name:10s} fa4aot / {ref_backend}: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    stats = rt.stats()
    doc = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fa4aot_stats": stats.as_dict(),
        "results": rows,
    }
    device = torch.cuda.get_device_name().replace(" ", "-")
    out = args.json or os.path.join(ROOT, "benchmarks", "results", "transformers-generate", f"{device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out} (fa4aot misses: {stats.misses}, launches: {dict(stats.launches)})")


if __name__ == "__main__":
    main()
