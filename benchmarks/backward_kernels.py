"""Per-kernel GPU time of one backward through fa4aot and through FA4's JIT (GPU, torch.profiler).

    python benchmarks/backward_kernels.py --cache CACHE

Same process, same inputs (out and lse from fa4aot's forward), 3 warm-up calls each, then 10
profiled calls; prints microseconds per call for every CUDA kernel and memset. Needs FA4
importable (../shared/device-fa4-on-h100.md). Results: benchmarks/results/h100-backward/kernel-times.txt.
"""

from __future__ import annotations

import argparse

#: (batch, seqlen, nheads, nheads_kv, causal), head dim 128, bf16
SHAPES = ((2, 8192, 32, 8, True), (4, 4096, 16, 16, True))
CALLS = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    a = ap.parse_args()
    import torch
    from flash_attn.cute import interface as fa4
    from torch.profiler import ProfilerActivity, profile

    import fa4aot

    fa4aot.open_runtime(a.cache)
    for b, s, h, hk, causal in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, 128, device="cuda", generator=g).bfloat16()
        k = torch.randn(b, s, hk, 128, device="cuda", generator=g).bfloat16()
        v = torch.randn(b, s, hk, 128, device="cuda", generator=g).bfloat16()
        dout = torch.randn(b, s, h, 128, device="cuda", generator=g).bfloat16()
        out, lse = fa4aot.flash_attn_func(q, k, v, causal=causal, return_lse=True)
        calls = {
            "fa4aot": lambda q=q, k=k, v=v, out=out, lse=lse, dout=dout, causal=causal: fa4aot.flash_attn_backward(
                dout, q, k, v, out, lse, causal=causal
            ),
            "fa4": lambda q=q, k=k, v=v, out=out, lse=lse, dout=dout, causal=causal: fa4._flash_attn_bwd(
                q, k, v, out, dout, lse, causal=causal
            ),
        }
        for f in calls.values():
            for _ in range(3):
                f()
        torch.cuda.synchronize()
        for name, f in calls.items():
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(CALLS):
                    f()
                torch.cuda.synchronize()
            rows: dict[str, list[float]] = {}
            for e in p.events():
                if e.device_type.name == "CUDA":
                    rows.setdefault(e.name[:60], []).append(getattr(e, "device_time", None) or e.cuda_time)
            print(f"== b{b} s{s} h{h}/{hk} {name}")
            for key, ts in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
                print(f"  {sum(ts) / CALLS:9.1f} us/call  x{len(ts) // CALLS}  {key}")


if __name__ == "__main__":
    main()
