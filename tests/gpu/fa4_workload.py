"""A small real workload for `fa4aot record` on the GPU: the same calls through FA4's own
interface (``fa4``) or fa4aot's (``fa4aot``), on seeded inputs; prints (and writes) the sha256
of every output, so two runs compare bitwise.

    fa4aot record -o recorded.yaml --target h100 -- python tests/gpu/fa4_workload.py fa4 out.json
    python tests/gpu/fa4_workload.py fa4aot ours.json CACHE
"""

from __future__ import annotations

import hashlib
import json
import sys


def run(api: str, cache: str | None = None) -> dict[str, str]:
    import torch

    if api == "fa4":
        from flash_attn.cute import interface as F
    else:
        import fa4aot
        from fa4aot import interface as F

        fa4aot.open_runtime(cache)
    g = torch.Generator(device="cuda").manual_seed(1234)
    bf = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=bf, generator=g)

    outs = {}
    # varlen GQA-8 causal prefill, head dim 128
    lens = [700, 300, 1000]
    cu = torch.tensor([0, 700, 1000, 2000], dtype=torch.int32, device="cuda")
    q, k, v = rnd(2000, 32, 128), rnd(2000, 4, 128), rnd(2000, 4, 128)
    outs["prefill"] = F._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lens), max_seqlen_k=max(lens), causal=True
    )[0]
    # decode over a KV cache with seqused_k, returning the LSE, head dim 128, GQA 8
    q, k, v = rnd(8, 1, 32, 128), rnd(8, 4096, 4, 128), rnd(8, 4096, 4, 128)
    used = torch.tensor([4096, 100, 2000, 4095, 1, 3000, 512, 2048], dtype=torch.int32, device="cuda")
    res = F._flash_attn_fwd(q, k, v, seqused_k=used, causal=True, return_lse=True)  # FA4: (out, lse, ...)
    outs["decode"], outs["decode_lse"] = res[0], res[1]
    # batched non-causal GQA-4, head dim 64
    q, k, v = rnd(2, 1000, 16, 64), rnd(2, 1100, 4, 64), rnd(2, 1100, 4, 64)
    outs["batched_d64"] = F._flash_attn_fwd(q, k, v)[0]
    torch.cuda.synchronize()
    return {
        name: hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()
        for name, t in outs.items()
    }


if __name__ == "__main__":
    res = run(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else None)
    print(json.dumps(res, indent=1))
    with open(sys.argv[2], "w") as f:
        json.dump(res, f, indent=1)
