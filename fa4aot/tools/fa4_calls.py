"""One call description ("case", a JSON-able dict) turned into FA4's own forward call on fake
tensors (for the oracle subprocesses, which import this module) and into fa4aot's
:class:`~fa4aot.runtime.dispatch.Call` (for the test side).

Keys: batch, seqlen_q, seqlen_k, nheads, nheads_kv, head_dim, head_dim_v (required); causal, wl,
wr, num_splits, pack_gqa, return_lse; varlen (cu_seqlens_q and cu_seqlens_k, with total_q and
total_k), varlen_q (cu_seqlens_q only, with total_q), seqused_k; page_size (K/V as a page pool
(num_pages, page_size, h_kv, d) with a (batch, ceil(seqlen_k / page_size)) page table; num_pages
defaults to batch * pages per sequence); learnable_sink (its dtype name); softcap (a float); dtype
(bf16, fp16, e4m3 or e5m2, default bf16); descales ("q,k,v" layouts of FP8 TensorwiseScales: none,
full or per_head); mxfp8 (qk or pv: MXFP8 BlockScales).
"""

from __future__ import annotations

import math

TORCH_DTYPES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "e4m3": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "e8m0": "float8_e8m0fnu",
}


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
    if case.get("mxfp8") == "qk":  # V stays bf16 (interface.py 564)
        v = torch.empty(v.shape, dtype=torch.bfloat16, device="cuda")
    kw.update(_scales(interface, torch, case, q, k, v))
    if case.get("seqused_k"):
        kw["seqused_k"] = empty(b, dtype=torch.int32)
    if case.get("learnable_sink"):
        kw["learnable_sink"] = empty(h, dtype=getattr(torch, TORCH_DTYPES[case["learnable_sink"]]))
    if case.get("config"):  # an explicit FwdConfig (FA4's config=), given as its fields
        from flash_attn.cute import config as fa4_config

        from fa4aot.core.fa4_interface import as_fwd_config

        kw["config"] = as_fwd_config(fa4_config, case["config"])
    if case.get("tile_mn"):
        kw["tile_mn"] = tuple(case["tile_mn"])
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


def _scales(interface, torch, case: dict, q, k, v) -> dict:
    """FA4's ``scales=`` for ``case``: TensorwiseScales of fp32 (batch, nheads_kv) descales (a
    ``per_head`` one broadcast over the batch) or MXFP8 BlockScales of interleave_sf buffers."""
    from fa4aot.core.fa4_interface import mxfp8_scale_count

    b, hk = case["batch"], case["nheads_kv"]
    if case.get("mxfp8"):
        e8m0 = torch.float8_e8m0fnu
        sq, sk, h = case["seqlen_q"], case["seqlen_k"], case["nheads"]
        sf_q = torch.empty(mxfp8_scale_count(b, h, sq, case["head_dim"]), dtype=e8m0, device="cuda")
        sf_k = torch.empty(mxfp8_scale_count(b, hk, sk, case["head_dim"]), dtype=e8m0, device="cuda")
        sf_v = None
        if case["mxfp8"] == "pv":
            sf_v = torch.empty(mxfp8_scale_count(b, hk, case["head_dim_v"], sk), dtype=e8m0, device="cuda")
        return {"scales": interface.BlockScales(sf_q, sf_k, sf_v)}
    if not case.get("descales"):
        return {}
    made = []
    for layout in case["descales"].split(","):
        if layout == "full":
            made.append(torch.empty(b, hk, dtype=torch.float32, device="cuda"))
        elif layout == "per_head":
            made.append(torch.empty(1, hk, dtype=torch.float32, device="cuda").expand(b, hk))
        else:
            made.append(None)
    return {"scales": interface.TensorwiseScales(*made)}


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


def fa4_prepare(interface, torch, case: dict) -> None:
    """Run FA4's ``_get_scheduler_metadata`` (what its varlen split-KV forward calls) for a
    prepare case: keys num_warps, tile_m, tile_n, nheads, nheads_kv, headdim, headdim_v, causal,
    pack_gqa, varlen_q, varlen_k, seqused_q, seqused_k, has_semaphore (call it under FakeTensorMode)."""
    from fa4aot.core.fa4_interface import PrepareOptions

    b = 31 * case["num_warps"]  # FA4 sizes the CTA at 31 batches a warp, rounded up to a power of two

    def vec(on: bool, n: int):
        return torch.empty(n, dtype=torch.int32, device="cuda") if on else None

    interface._get_scheduler_metadata(
        num_batch=b,
        max_seqlen_q=1024,
        max_seqlen_k=4096,
        nheads=case["nheads"],
        nheads_kv=case["nheads_kv"],
        headdim=case["headdim"],
        num_splits=4,  # > 1: FA4 runs the prepare kernel
        tile_m=case["tile_m"],
        tile_n=case["tile_n"],
        headdim_v=case["headdim_v"],
        pack_gqa=case["pack_gqa"],
        causal=case["causal"],
        cu_seqlens_q=vec(case["varlen_q"], b + 1),
        cu_seqlens_k=vec(case["varlen_k"], b + 1),
        seqused_q=vec(case["seqused_q"], b),
        seqused_k=vec(case["seqused_k"], b),
        use_clc_scheduler=not case["has_semaphore"],
        **PrepareOptions.of_fields(case).kwargs(),
    )


def facts(arch: str, num_sms: int, case: dict):
    """The host facts FA4's ``_flash_attn_fwd`` derives from :func:`fa4_forward`'s tensors for
    ``case`` (what fa4aot's decision reads)."""
    from fa4aot.core.fa4_interface import FwdFacts, arch_number

    sq, sk = case["seqlen_q"], case["seqlen_k"]
    varlen = case.get("varlen", False)
    varlen_q = varlen or case.get("varlen_q", False)
    page = case.get("page_size")
    return FwdFacts(
        arch=arch_number(arch),
        num_sms=num_sms,
        dtype=case.get("dtype", "bf16"),
        head_dim=case["head_dim"],
        head_dim_v=case["head_dim_v"],
        num_heads=case["nheads"],
        num_heads_kv=case["nheads_kv"],
        **_token_counts(case, varlen_q, varlen, page),
        max_seqlen_q=sq if varlen_q else None,
        max_seqlen_k=sk if (varlen or page) else None,
        causal=case.get("causal", False),
        window_left=case.get("wl"),
        window_right=case.get("wr"),
        varlen_q=varlen_q,
        varlen_k=varlen,
        seqused_k=case.get("seqused_k", False),
        page_size=page,
        softcap=bool(case.get("softcap")),
        learnable_sink=bool(case.get("learnable_sink")),
        has_lse=case.get("return_lse", False),
        pack_gqa=case.get("pack_gqa"),
        num_splits=case.get("num_splits", 1),
        requested_tile=tuple(case["tile_mn"]) if case.get("tile_mn") else None,
        requested_mma_pv_is_rs=case.get("mma_pv_is_rs"),
        descales=case.get("descales"),
        mxfp8=case.get("mxfp8"),
    )


def _token_counts(case: dict, varlen_q: bool, varlen_k: bool, page: int | None) -> dict[str, int]:
    """The batch, token totals and capacities FA4 reads off ``case``'s q and k/v tensors (packed
    with varlen, a pool of num_pages pages with a page size): :func:`facts`' FwdFacts fields."""
    b, sq, sk = case["batch"], case["seqlen_q"], case["seqlen_k"]
    total_q = case["total_q"] if varlen_q else b * sq
    if page:
        pages = math.ceil(sk / page)
        k_capacity, total_k = pages * page, case.get("num_pages", b * pages) * page
    elif varlen_k:
        k_capacity = total_k = case["total_k"]
    else:
        k_capacity, total_k = sk, b * sk
    q_capacity = total_q if varlen_q else sq
    return {"batch": b, "total_q": total_q, "total_k": total_k, "q_capacity": q_capacity, "k_capacity": k_capacity}


def decide(arch: str, num_sms: int, case: dict, sel=None, knobs=None):
    """fa4aot's decision (:func:`fa4aot.core.fwd.decide`, FA4's selector) for ``case``."""
    from fa4aot.core import fa4_interface, fwd, selector

    sel = sel or selector.installed()
    config = fa4_interface.as_fwd_config(sel, case["config"]) if case.get("config") else None
    return fwd.decide(
        sel,
        facts(arch, num_sms, case),
        knobs or fa4_interface.NO_KNOBS,
        float(case.get("softcap") or 0.0),
        case.get("learnable_sink") or "none",
        config,
    )


def fa4_backward(interface, torch, case: dict) -> None:
    """Run FA4's ``_flash_attn_bwd`` (preprocess, main kernel, postprocess) for a backward case:
    keys of a forward case (batch, seqlen_q, seqlen_k, nheads, nheads_kv, head_dim, head_dim_v,
    causal, wl, wr, softcap, learnable_sink, dtype), varlen_q / varlen_k (with total_q /
    total_k), seqused_q / seqused_k, and dlse (call it under FakeTensorMode)."""
    dt = getattr(torch, TORCH_DTYPES[case.get("dtype", "bf16")])
    b, sq, sk, h, hk, d, dv = (
        case[k] for k in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "head_dim", "head_dim_v")
    )

    def empty(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    kw: dict = {}
    tq, tk = case.get("total_q"), case.get("total_k")
    qrows = (tq,) if case.get("varlen_q") else (b, sq)
    krows = (tk,) if case.get("varlen_k") else (b, sk)
    q, k, v = empty(*qrows, h, d), empty(*krows, hk, d), empty(*krows, hk, dv)
    out, dout = empty(*qrows, h, dv), empty(*qrows, h, dv)
    lse = empty(h, tq, dtype=torch.float32) if case.get("varlen_q") else empty(b, h, sq, dtype=torch.float32)
    for side, n in (("q", sq), ("k", sk)):
        if case.get(f"varlen_{side}"):
            kw.update({f"cu_seqlens_{side}": empty(b + 1, dtype=torch.int32), f"max_seqlen_{side}": n})
        if case.get(f"seqused_{side}"):
            kw[f"seqused_{side}"] = empty(b, dtype=torch.int32)
    if case.get("dlse"):
        kw["dlse"] = torch.empty_like(lse)
    if case.get("learnable_sink"):
        kw["learnable_sink"] = empty(h, dtype=getattr(torch, TORCH_DTYPES[case["learnable_sink"]]))
    interface._flash_attn_bwd(
        q,
        k,
        v,
        out,
        dout,
        lse,
        causal=case.get("causal", False),
        softcap=case.get("softcap") or 0.0,
        window_size_left=case.get("wl"),
        window_size_right=case.get("wr"),
        deterministic=case.get("deterministic", False),
        **kw,
    )
