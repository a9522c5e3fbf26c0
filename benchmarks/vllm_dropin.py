"""vLLM-style calls through a patched vendored FA4 copy: outputs bitwise equal to FA4's JIT, eager
and inside a CUDA graph, with zero FA4 compiles once patched (GPU; FA4 and a cache for it).

    FA4AOT_GPU_CACHE=CACHE python benchmarks/vllm_dropin.py [--json out.json]

vLLM vendors FA4's ``cute`` sources as ``vllm.vllm_flash_attn.cute`` and its FA4 path imports
``_flash_attn_fwd`` from ``vllm.vllm_flash_attn.cute.interface`` at call time. vLLM itself is not
needed here: the vendored package is FA4's own ``interface.py`` loaded under vLLM's module name (a
distinct module with its own functions and JIT caches, as vLLM's copy is). Each call is vLLM's
decode / chunked-prefill shape: paged KV (a TMA page size and a cp.async one), ``cu_seqlens_q``,
``seqused_k``, ``out=``, ``return_lse=True``, causal.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types

import torch

VENDORED = "vllm.vllm_flash_attn.cute"


def vendor_fa4() -> types.ModuleType:
    """FA4's interface.py loaded as ``vllm.vllm_flash_attn.cute.interface`` (and its parents)."""
    import flash_attn.cute.interface as fa4

    for name in ("vllm", "vllm.vllm_flash_attn", VENDORED):
        mod = types.ModuleType(name)
        mod.__path__ = []
        sys.modules[name] = mod
    spec = importlib.util.spec_from_file_location(f"{VENDORED}.interface", fa4.__file__)
    iface = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = iface
    spec.loader.exec_module(iface)
    pkg = sys.modules[VENDORED]
    pkg.interface = iface
    pkg.flash_attn_varlen_func = iface.flash_attn_varlen_func
    return iface


def count_fa4_compiles() -> list[int]:
    """A counter of the kernels FA4 compiles in this process (every JIT cache store: FA4's
    ``JITCache.__setitem__``), in any copy of its interface."""
    from flash_attn.cute.cache_utils import JITCache

    count = [0]
    store = JITCache.__setitem__

    def counted(self, key, fn):
        count[0] += 1
        return store(self, key, fn)

    JITCache.__setitem__ = counted
    return count


def make_call(b: int, sq: int, sk: int, hk: int, qh: int, d: int, page: int, seed: int) -> dict:
    """Tensors of one vLLM-style paged call (queries packed with cu_seqlens_q)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = hk * qh
    pages = -(-sk // page)
    n_pages = b * pages + 3
    dt = torch.bfloat16
    q = torch.randn(b * sq, h, d, device="cuda", dtype=dt, generator=g)
    k = torch.randn(n_pages, page, hk, d, device="cuda", dtype=dt, generator=g)
    v = torch.randn(n_pages, page, hk, d, device="cuda", dtype=dt, generator=g)
    table = torch.randperm(n_pages, device="cuda", generator=g)[: b * pages].view(b, pages).to(torch.int32)
    cu_q = torch.arange(0, (b + 1) * sq, sq, device="cuda", dtype=torch.int32)
    used = torch.randint(sq, sk + 1, (b,), device="cuda", dtype=torch.int32, generator=g)
    return dict(q=q, k=k, v=v, page_table=table, cu_seqlens_q=cu_q, seqused_k=used, max_seqlen_q=sq, max_seqlen_k=sk)


def vllm_forward(c: dict, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The call as vLLM's FA4 path makes it (the import at call time)."""
    from vllm.vllm_flash_attn.cute.interface import _flash_attn_fwd

    res = _flash_attn_fwd(
        c["q"], c["k"], c["v"], cu_seqlens_q=c["cu_seqlens_q"], seqused_k=c["seqused_k"],
        max_seqlen_q=c["max_seqlen_q"], max_seqlen_k=c["max_seqlen_k"], page_table=c["page_table"],
        softmax_scale=c["q"].shape[-1] ** -0.5, causal=True, out=out, return_lse=True,
    )  # fmt: skip
    return res[0], res[1]


CASES = [  # (batch, max_seqlen_q, max_seqlen_k, nheads_kv, qhead_per_kvhead, head_dim, page size)
    (16, 1, 4096, 8, 4, 128, 128),  # decode, TMA pages
    (16, 1, 4096, 8, 4, 128, 16),  # decode, cp.async pages
    (4, 128, 4096, 8, 8, 128, 128),  # chunked prefill
    (4, 128, 4096, 8, 4, 128, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import os

    import fa4aot

    fa4aot.open_runtime(os.environ.get("FA4AOT_GPU_CACHE", "cache"))
    vendor_fa4()
    compiles = count_fa4_compiles()
    rows = []
    for i, (b, sq, sk, hk, qh, d, page) in enumerate(CASES):
        c = make_call(b, sq, sk, hk, qh, d, page, seed=i)
        ref_out = torch.empty_like(c["q"])
        ref, ref_lse = vllm_forward(c, ref_out)  # FA4's JIT through the vendored copy
        fa4aot.patch(policy="error", modules=[VENDORED])
        try:
            compiled_before = compiles[0]
            out = torch.empty_like(c["q"])
            got, got_lse = vllm_forward(c, out)
            eager_equal = torch.equal(got, ref) and torch.equal(got_lse, ref_lse)
            # a CUDA graph of the patched call, replayed with other queries and used lengths
            static_out = torch.empty_like(c["q"])
            vllm_forward(c, static_out)  # warm (metadata, workspaces)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _, g_lse = vllm_forward(c, static_out)
            c2 = make_call(b, sq, sk, hk, qh, d, page, seed=100 + i)
            c["q"].copy_(c2["q"])
            c["seqused_k"].copy_(c2["seqused_k"])
            graph.replay()
            torch.cuda.synchronize()
            compiled_after = compiles[0]
            fa4aot.unpatch()
            want, want_lse = vllm_forward(c, torch.empty_like(c["q"]))  # FA4's JIT on the new inputs
            graph_equal = torch.equal(static_out, want) and torch.equal(g_lse, want_lse)
        finally:
            fa4aot.unpatch()
        rows.append(
            dict(
                case=dict(batch=b, seqlen_q=sq, seqlen_k=sk, nheads_kv=hk, qhead_per_kvhead=qh, head_dim=d, page=page),
                eager_bitwise=eager_equal,
                graph_replay_bitwise=graph_equal,
                fa4_compiles_while_patched=compiled_after - compiled_before,
            )  # fmt: skip
        )
        print(json.dumps(rows[-1]))
    stats = fa4aot.stats()
    print(f"fa4aot stats: {stats}")
    ok = all(r["eager_bitwise"] and r["graph_replay_bitwise"] and r["fa4_compiles_while_patched"] == 0 for r in rows)
    print(f"{torch.cuda.get_device_name(0)}: {len(rows)} vLLM-style calls, all bitwise equal and zero JIT: {ok}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows, "ok": ok}, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
