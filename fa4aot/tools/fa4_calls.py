"""One call description ("case", a JSON-able dict) turned into FA4's own forward call on fake
tensors (for the oracle subprocesses, which import this module) and into fa4aot's
:class:`~fa4aot.runtime.dispatch.Call` (for the test side).

Keys: batch, seqlen_q, seqlen_k, nheads, nheads_kv, head_dim, head_dim_v (required); causal, wl,
wr, num_splits, pack_gqa, return_lse; varlen (cu_seqlens_q and cu_seqlens_k, with total_q and
total_k), varlen_q (cu_seqlens_q only, with total_q), seqused_k; page_size (K/V as a page pool
(num_pages, page_size, h_kv, d) with a (batch, ceil(seqlen_k / page_size)) page table; num_pages
defaults to batch * pages per sequence); learnable_sink (its dtype name); softcap (a float); dtype
(bf16 or fp16, default bf16).
"""

from __future__ import annotations

import math

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def fa4_forward(interface, torch, case: dict) -> None:
    """Run FA4's ``_flash_attn_fwd`` for ``case`` (call it under FakeTensorMode)."""
    dt = getattr(torch, TORCH_DTYPES[case.get("dtype", "bf16")])
    b, sq, sk, h, hk, d, dv = (
        case[k] for k in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "head_dim", "head_dim_v")
    )
    kw: dict = {}

    def empty(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    if case.get("varlen") or case.get("varlen_q"):
        q = empty(case["total_q"], h, d)
        kw.update(cu_seqlens_q=empty(b + 1, dtype=torch.int32), max_seqlen_q=sq)
    else:
        q = empty(b, sq, h, d)
    if case.get("page_size"):
        ps = case["page_size"]
        pages = math.ceil(sk / ps)
        n = case.get("num_pages", b * pages)
        k, v = empty(n, ps, hk, d), empty(n, ps, hk, dv)
        kw.update(page_table=empty(b, pages, dtype=torch.int32), max_seqlen_k=sk)
    elif case.get("varlen"):
        k, v = empty(case["total_k"], hk, d), empty(case["total_k"], hk, dv)
        kw.update(cu_seqlens_k=empty(b + 1, dtype=torch.int32), max_seqlen_k=sk)
    else:
        k, v = empty(b, sk, hk, d), empty(b, sk, hk, dv)
    if case.get("seqused_k"):
        kw["seqused_k"] = empty(b, dtype=torch.int32)
    if case.get("learnable_sink"):
        kw["learnable_sink"] = empty(h, dtype=getattr(torch, TORCH_DTYPES[case["learnable_sink"]]))
    interface._flash_attn_fwd(
        q,
        k,
        v,
        causal=case.get("causal", False),
        window_size_left=case.get("wl"),
        window_size_right=case.get("wr"),
        num_splits=case.get("num_splits", 1),
        pack_gqa=case.get("pack_gqa"),
        return_lse=case.get("return_lse", False),
        softcap=case.get("softcap"),
        **kw,
    )


def fa4_combine(interface, torch, case: dict) -> None:
    """Run FA4's ``_flash_attn_fwd_combine`` (what its split-KV forward calls) for a combine
    case: keys dtype, head_dim, num_head, num_splits, varlen, seqused, has_lse,
    num_splits_dynamic, arch (call it under FakeTensorMode)."""
    dt = getattr(torch, TORCH_DTYPES[case["dtype"]])
    b, s, h, d, n = 2, 64, case["num_head"], case["head_dim"], case["num_splits"]

    def empty(*shape, dtype=torch.float32):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    rows = (b * s,) if case["varlen"] else (b, s)
    lse = empty(*rows[:-1], h, rows[-1]).transpose(-1, -2) if case["has_lse"] else None
    interface._flash_attn_fwd_combine(
        empty(n, *rows, h, d),
        empty(n, *rows[:-1], h, rows[-1]).transpose(-1, -2),
        empty(*rows, h, d, dtype=dt),
        lse,
        empty(b + 1, dtype=torch.int32) if case["varlen"] else None,
        empty(b, dtype=torch.int32) if case["seqused"] else None,
        num_splits_dynamic_ptr=empty(b, dtype=torch.int32) if case["num_splits_dynamic"] else None,
        _arch=interface._parse_arch_str(case["arch"]),
    )


def fa4aot_call(arch: str, num_sms: int, case: dict):
    """fa4aot's dispatch input for ``case``."""
    from fa4aot.runtime.dispatch import Call

    varlen = case.get("varlen", False)
    return Call(
        arch,
        num_sms,
        case.get("dtype", "bf16"),
        case["batch"],
        case["seqlen_q"],
        case["seqlen_k"],
        case["nheads"],
        case["nheads_kv"],
        case["head_dim"],
        case["head_dim_v"],
        case.get("causal", False),
        case.get("wl"),
        case.get("wr"),
        varlen or case.get("varlen_q", False),
        varlen,
        False,
        case.get("seqused_k", False),
        case.get("num_splits", 1),
        case.get("pack_gqa"),
        case.get("return_lse", False),
        False,
        page_size=case.get("page_size"),
        learnable_sink=case.get("learnable_sink") or "none",
        softcap=float(case.get("softcap") or 0.0),
    )
