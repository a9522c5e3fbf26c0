"""Which tensors each family's kernels take, with their dtypes, shapes and FA4's layouts.

Pure functions of a variant and the problem sizes: the build's self-test, ``fa4aot verify``,
``fa4aot launch-plan`` and the tests make sample arguments from them (the runtime checks callers'
tensors itself, in :mod:`fa4aot.runtime.validate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fa4aot.core.fa4_interface import TENSORMAP_WORDS, mxfp8_scale_count, out_dtype, tensormap_workspace_ctas
from fa4aot.core.variant import FORWARD_FAMILIES, Variant


@dataclass(frozen=True)
class Dims:
    """Problem sizes of one call. ``total_q``/``total_k`` are the packed lengths for varlen."""

    batch: int = 2
    seqlen_q: int = 1024
    seqlen_k: int = 1024
    nheads: int = 16
    nheads_kv: int = 16
    head_dim: int = 128
    head_dim_v: int = 128
    num_splits: int = 1
    total_q: int | None = None
    total_k: int | None = None
    #: paged K/V: tokens per page, and pages in the pool (default: enough for every sequence)
    page_size: int | None = None
    num_pages: int | None = None


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's dtype, shape and strides (elements). ``strides`` is FA4's layout for it."""

    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


#: Page size of sample calls of cp.async paged variants (any size other than tile_n).
SAMPLE_CPASYNC_PAGE_SIZE = 16


def _c(dtype: str, *shape: int) -> TensorLayout:
    return TensorLayout(dtype, tuple(shape), contiguous_strides(tuple(shape)))


def _swap_last(layout: TensorLayout) -> TensorLayout:
    """View of a contiguous (..., a, b) tensor as (..., b, a): how FA4 hands LSE to combine."""
    s, st = list(layout.shape), list(layout.strides)
    s[-1], s[-2] = s[-2], s[-1]
    st[-1], st[-2] = st[-2], st[-1]
    return TensorLayout(layout.dtype, tuple(s), tuple(st))


def forward_tensors(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """Tensors of an SM90/SM100/SM120 forward call (FA4's ``_flash_attn_fwd`` layouts, with the
    tensor-map workspace FA4 sizes for the grid's CTAs on ``num_sms`` SMs)."""
    f = variant.fields
    dt = f["dtype"]
    split = f.get("num_splits", 1) > 1
    b, h, hk = d.batch, d.nheads, d.nheads_kv
    tq = d.total_q if d.total_q is not None else b * d.seqlen_q
    tk = d.total_k if d.total_k is not None else b * d.seqlen_k
    qrows = (tq,) if f["varlen_q"] else (b, d.seqlen_q)
    krows = (tk,) if f["varlen_k"] else (b, d.seqlen_k)
    paged = f.get("paged_kv", "none") != "none"
    if paged:
        page = d.page_size or 1
        max_pages = max(1, -(-d.seqlen_k // page))
        krows = (d.num_pages or b * max_pages, page)
    mx = f.get("mxfp8")
    out: dict[str, TensorLayout] = {
        "q": _c(dt, *qrows, h, d.head_dim),
        "k": _c(dt, *krows, hk, d.head_dim),
        "v": _c("bf16" if mx == "qk" else dt, *krows, hk, d.head_dim_v),
    }
    out.update(scale_tensors(f, d))
    lse_shape = (h, tq) if f["varlen_q"] else (b, h, d.seqlen_q)
    if split:  # the kernel writes FA4's fp32 partials; combine reduces them into the real out
        out["out"] = _c("fp32", d.num_splits, *qrows, h, d.head_dim_v)
        out["lse"] = _c("fp32", d.num_splits, *lse_shape)
    else:
        out["out"] = _c(out_dtype(dt, mx), *qrows, h, d.head_dim_v)
        if f["has_lse"]:
            out["lse"] = _c("fp32", *lse_shape)
    if f["varlen_q"]:
        out["cu_seqlens_q"] = _c("int32", b + 1)
    if f["varlen_k"]:
        out["cu_seqlens_k"] = _c("int32", b + 1)
    if f["seqused_q"]:
        out["seqused_q"] = _c("int32", b)
    if f["seqused_k"]:
        out["seqused_k"] = _c("int32", b)
    if paged:
        out["page_table"] = _c("int32", b, max_pages)
    if f.get("learnable_sink", "none") != "none":
        out["learnable_sink"] = _c(f["learnable_sink"], h)
    if f.get("num_splits_dynamic"):
        out["num_splits_dynamic"] = _c("int32", b)
    if f.get("tile_count_semaphore"):
        out["tile_count_semaphore"] = _c("int32", 1)
    if f.get("num_nheads_in_l2"):
        out["num_nheads_in_l2"] = _c("int32", b)
    if needs_workspace(variant):
        slots = tensormap_workspace_ctas(
            f["pack_gqa"], f["tile_m"], h, hk, num_sms or variant.num_sms, qrows[0] if f["varlen_q"] else b * d.seqlen_q,
            b, max(d.num_splits, 1),
        )  # fmt: skip
        out["tensormap_workspace"] = _c("int64", slots, TENSORMAP_WORDS)
    return out


def scale_tensors(f: dict, d: Dims) -> dict[str, TensorLayout]:
    """FA4's ``scales=`` tensors of a forward: FP8 descales (fp32 (batch, nheads_kv); ``per_head``
    broadcast over the batch) and MXFP8 interleave_sf buffers (flat UE8M0, interface.py 572-590)."""
    out: dict[str, TensorLayout] = {}
    b, h, hk = d.batch, d.nheads, d.nheads_kv
    for name, layout in zip(
        ("q_descale", "k_descale", "v_descale"), (f.get("descales") or "none,none,none").split(",")
    ):
        if layout == "full":
            out[name] = _c("fp32", b, hk)
        elif layout == "per_head":
            out[name] = TensorLayout("fp32", (b, hk), (0, 1))
    mx = f.get("mxfp8")
    if mx:
        out["sf_q"] = _c("e8m0", mxfp8_scale_count(b, h, d.seqlen_q, d.head_dim))
        out["sf_k"] = _c("e8m0", mxfp8_scale_count(b, hk, d.seqlen_k, d.head_dim))
        if mx == "pv":  # V is scaled along the keys
            out["sf_v"] = _c("e8m0", mxfp8_scale_count(b, hk, d.head_dim_v, d.seqlen_k))
    return out


def needs_workspace(variant: Variant) -> bool:
    """FA4 passes its tensor-map workspace to this forward (SM90 / SM100, varlen K or seqused_k,
    no page table: interface.py 1258-1263)."""
    f = variant.fields
    return (
        variant.family in ("fwd_sm90", "fwd_sm100")
        and f.get("paged_kv", "none") == "none"
        and (f["varlen_k"] or f["seqused_k"])
    )


def combine_tensors(variant: Variant, d: Dims) -> dict[str, TensorLayout]:
    """Tensors of a combine call, as FA4's forward hands them over (LSE seqlen-contiguous)."""
    f = variant.fields
    b, h, hd, s = d.batch, d.nheads, f["head_dim"], d.num_splits
    tq = d.total_q if d.total_q is not None else b * d.seqlen_q
    if f["varlen"]:
        out = {
            "out_partial": _c("fp32", s, tq, h, hd),
            "lse_partial": _swap_last(_c("fp32", s, h, tq)),
            "out": _c(f["dtype"], tq, h, hd),
            "cu_seqlens": _c("int32", b + 1),
        }
        if f["has_lse"]:
            out["lse"] = _swap_last(_c("fp32", h, tq))
    else:
        out = {
            "out_partial": _c("fp32", s, b, d.seqlen_q, h, hd),
            "lse_partial": _swap_last(_c("fp32", s, b, h, d.seqlen_q)),
            "out": _c(f["dtype"], b, d.seqlen_q, h, hd),
        }
        if f["has_lse"]:
            out["lse"] = _swap_last(_c("fp32", b, h, d.seqlen_q))
    if f["seqused"]:
        out["seqused"] = _c("int32", b)
    if f["num_splits_dynamic"]:
        out["num_splits_dynamic"] = _c("int32", b)
    return out


def prepare_tensors(variant: Variant, d: Dims) -> dict[str, TensorLayout]:
    """Tensors of a prepare call: the varlen inputs and the metadata buffers it fills."""
    f = variant.fields
    b = d.batch
    out: dict[str, TensorLayout] = {}
    if f["varlen_q"]:
        out["cu_seqlens_q"] = _c("int32", b + 1)
    if f["seqused_q"]:
        out["seqused_q"] = _c("int32", b)
    if f["varlen_k"]:
        out["cu_seqlens_k"] = _c("int32", b + 1)
    if f["seqused_k"]:
        out["seqused_k"] = _c("int32", b)
    if f["has_semaphore"]:
        out["tile_count_semaphore"] = _c("int32", 1)
    out["num_m_blocks"] = _c("int32", b)
    out["num_splits_dynamic"] = _c("int32", b)
    if f["causal"]:
        out["num_nheads_in_l2"] = _c("int32", b)
    return out


def _bwd_rows(f: dict[str, Any], d: Dims, which: str) -> tuple[tuple[int, ...], int]:
    """(row dims of q or k, the sequence extent of the per-head fp32 buffers before padding)."""
    b = d.batch
    if which == "q":
        total = d.total_q if d.total_q is not None else b * d.seqlen_q
        return ((total,) if f["varlen_q"] else (b, d.seqlen_q)), (total if f["varlen_q"] else d.seqlen_q)
    total = d.total_k if d.total_k is not None else b * d.seqlen_k
    return ((total,) if f["varlen_k"] else (b, d.seqlen_k)), (total if f["varlen_k"] else d.seqlen_k)


def backward_tensors(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """Tensors of a backward kernel (FA4's ``_flash_attn_bwd`` layouts and padded buffers,
    :func:`fa4aot.core.backward.scratch`); a ``bwd_post`` sample converts the dQ accumulator (the
    dK / dV ones have the same layout)."""
    from fa4aot.core.backward import round_up, scratch

    f = variant.fields
    b, h, hk = d.batch, d.nheads, d.nheads_kv
    if variant.family == "bwd_post":
        tile, mult, varlen, pack = f["tile"], f["hdim_multiple_of"], f["varlen"], f["pack_factor"]
        total = d.total_q if d.total_q is not None else b * d.seqlen_q
        rows = (total,) if varlen else (b, d.seqlen_q)
        heads = h // pack
        if varlen:
            s_r = (total * pack + (b + 1) * tile - 1) // tile * tile
        else:
            s_r = round_up(d.seqlen_q * pack, tile)
        per_head = (lambda n, hh=h: (hh, n)) if varlen else (lambda n, hh=h: (b, hh, n))
        out = {
            "accum": _c("fp32", *per_head(s_r * round_up(f["head_dim"], mult), heads)),
            "out": _c(f["dtype"], *rows, h, f["head_dim"]),
        }
        if varlen:
            out["cu_seqlens"] = _c("int32", b + 1)
        if f["seqused"]:
            out["seqused"] = _c("int32", b)
        if f["learnable_sink"] != "none":
            out["dpsum"] = _c("fp32", *per_head(s_r, heads))
            out["lse"] = _c("fp32", *per_head(total if varlen else d.seqlen_q))
            out["learnable_sink"] = _c(f["learnable_sink"], h)
            out["dsink"] = _c(f["learnable_sink"], h)
        return out
    qrows, sq = _bwd_rows(f, d, "q")
    q_per_head = (lambda n, hh=h: (hh, n)) if f["varlen_q"] else (lambda n, hh=h: (b, hh, n))
    dt = f["dtype"]
    if variant.family == "bwd_pre":
        tm, mult, pack = f["tile_m"], f["hdim_multiple_of"], f["pack_factor"]
        heads = h // pack
        if f["varlen_q"]:
            sq_r = (sq * pack + (b + 1) * tm - 1) // tm * tm
        else:
            sq_r = round_up(sq * pack, tm)
        out = {
            "out": _c(dt, *qrows, h, d.head_dim_v),
            "dout": _c(dt, *qrows, h, d.head_dim_v),
            "dpsum": _c("fp32", *q_per_head(sq_r, heads)),
            "lse": _c("fp32", *q_per_head(sq)),
            "lse_log2": _c("fp32", *q_per_head(sq_r, heads)),
            "dq_accum": _c("fp32", *q_per_head(sq_r * round_up(f["head_dim"], mult), heads)),
        }
        if f["has_dlse"]:
            out["dlse"] = _c("fp32", *q_per_head(sq))
    else:  # the main kernel
        krows, sk = _bwd_rows(f, d, "k")
        sc = scratch(
            variant.family, f, b, h, hk, d.seqlen_q, d.seqlen_k, sq if f["varlen_q"] else None,
            sk if f["varlen_k"] else None, num_sms or variant.num_sms,
        )  # fmt: skip
        out = {}
        if sc.dq_semaphore is not None:  # FA4's semaphores (zeroed before each call)
            out["dq_semaphore"] = _c("int32", *sc.dq_semaphore)
            if sc.dk_semaphore is not None:
                out["dk_semaphore"] = _c("int32", *sc.dk_semaphore)
                out["dv_semaphore"] = _c("int32", *sc.dk_semaphore)
        out.update(
            {
                "q": _c(dt, *qrows, h, d.head_dim),
                "k": _c(dt, *krows, hk, d.head_dim),
                "v": _c(dt, *krows, hk, d.head_dim_v),
                "dout": _c(dt, *qrows, h, d.head_dim_v),
                "lse_log2": _c("fp32", *sc.scratch),
                "dpsum": _c("fp32", *sc.scratch),
                "dq_accum": _c("fp32", *sc.dq_accum),
            }
        )
        if sc.dk_accum is not None:
            # the kernel's dk / dv are FA4's fp32 accumulators (the postprocess converts them)
            out["dk"] = _c("fp32", *sc.dk_accum)
            out["dv"] = _c("fp32", *sc.dv_accum)
        else:
            out["dk"] = _c(dt, *krows, hk, d.head_dim)
            out["dv"] = _c(dt, *krows, hk, d.head_dim_v)
        if f["varlen_k"]:
            out["cu_seqlens_k"] = _c("int32", b + 1)
        if f["seqused_k"]:
            out["seqused_k"] = _c("int32", b)
        if sc.workspace is not None:
            out["tensormap_workspace"] = _c("int64", *sc.workspace)
    if f["varlen_q"]:
        out["cu_seqlens_q"] = _c("int32", b + 1)
    if f["seqused_q"]:
        out["seqused_q"] = _c("int32", b)
    return out


BACKWARD_KERNEL_FAMILIES = ("bwd_sm90", "bwd_sm100", "bwd_pre", "bwd_post")


def tensors_for(variant: Variant, d: Dims) -> dict[str, TensorLayout]:
    """Dispatch on the family."""
    if variant.family in BACKWARD_KERNEL_FAMILIES:
        return backward_tensors(variant, d)
    if variant.family in FORWARD_FAMILIES:
        return forward_tensors(variant, d)
    if variant.family == "combine":
        return combine_tensors(variant, d)
    if variant.family == "prepare":
        return prepare_tensors(variant, d)
    raise KeyError(variant.family)


def dims_for(variant: Variant, **overrides: Any) -> Dims:
    """Representative dims for a variant (its head dims and head counts), with overrides."""
    f = variant.fields
    base: dict[str, Any] = {}
    if variant.family in FORWARD_FAMILIES:
        qh = f["qhead_per_kvhead"]
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim_v"], "nheads_kv": 4, "nheads": 4 * qh}
        if f.get("num_splits", 1) > 1:
            base["num_splits"] = 4
        if f.get("use_swapab"):
            base["seqlen_q"] = 1  # FA4's SwapAB decode kernel: one query per sequence
        elif f.get("q_stage") == 1:
            base["seqlen_q"] = 1 if qh == 1 else max(1, 128 // qh)
        if f.get("paged_kv") == "tma":
            base["page_size"] = f["tile_n"]
        elif f.get("paged_kv") == "cpasync":
            base["page_size"] = SAMPLE_CPASYNC_PAGE_SIZE
    elif variant.family == "combine":
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim"], "nheads": f["num_head"], "num_splits": 4}
    elif variant.family in ("bwd_sm90", "bwd_sm100"):
        qh = f["qhead_per_kvhead"]
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim_v"], "nheads_kv": 4, "nheads": 4 * qh}
    elif variant.family == "bwd_pre":
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim_v"]}
        if f["pack_factor"] > 1:  # the preprocess of a fold is built for its scratch heads
            base.update(nheads=f["scratch_heads"] * f["pack_factor"], nheads_kv=f["scratch_heads"])
    elif variant.family == "bwd_post":
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim"]}
        if f["pack_factor"] > 1:
            base.update(nheads=4 * f["pack_factor"], nheads_kv=4)
    elif variant.family == "prepare":
        base = {
            "head_dim": f["headdim"],
            "head_dim_v": f["headdim_v"],
            "nheads": f["nheads"],
            "nheads_kv": f["nheads_kv"],
            "batch": max(1, 31 * f["num_warps"] // 2),
        }
    base.update(overrides)
    return Dims(**base)
