"""Home of the split-KV combine family (FA4's ``FlashAttentionForwardCombine``): its manifest axes and
checks, the tensors it takes as FA4's forward hands them over, sample sizes, the grid FA4 gives it,
and the call that makes FA4's JIT compile it."""

from __future__ import annotations

from typing import Any

from fa4aot.core.fa4_interface import COMBINE_MAX_LOG_SPLITS, combine_geometry
from fa4aot.core.families import axes as ax
from fa4aot.core.families.base import COMPANION, Family, cdiv, packed
from fa4aot.core.layouts import Dims, TensorLayout, contiguous, int32_vectors, swap_last
from fa4aot.core.targets import ARCHES
from fa4aot.core.variant import Variant


def check_combine(f: dict[str, Any]) -> str | None:
    hd = f["head_dim"]
    if hd % 8 or not 8 <= hd <= 512:
        return "combine needs head_dim a multiple of 8 in 8..512"
    tile_m, _, min_log = combine_geometry(hd, 1)
    log = f["log_max_splits"]
    if log < min_log or log > COMBINE_MAX_LOG_SPLITS:
        return f"log_max_splits must be in {min_log}..{COMBINE_MAX_LOG_SPLITS} at head_dim {hd} (FA4 tile_m {tile_m})"
    if f["num_head"] < 1:
        return "num_head must be >= 1"
    return None


COMBINE_AXES = (
    ax.Axis("dtype", ax.choice("dtype", ax.COMBINE_DTYPES), ("bf16",), "output dtype (partials are fp32)"),
    ax.Axis("head_dim", ax.posint("head_dim", 8, 512), (128,), "head dimension of the partials"),
    ax.Axis("num_head", ax.posint("num_head", 1, 1024), (16,), "query heads (FA4 specializes varlen combine on it)"),
    ax.Axis("max_splits", ax.max_splits, (128,), "largest split count to support", lambda f: 1 << f["log_max_splits"]),
    ax.flag("varlen", False, "cu_seqlens (packed variable-length)"),
    ax.flag("seqused", False, "seqused (with varlen)"),
    ax.flag("return_lse", False, "write the combined log-sum-exp", "has_lse"),
    ax.flag("num_splits_dynamic", False, "per-batch split counts from the prepare kernel"),
)


def resolve(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """A manifest's max_splits names the splits to support: at least the head dim's minimum."""
    f = dict(raw)
    min_log = combine_geometry(f["head_dim"], 1)[2]
    if f.pop("_min_log", False):
        f["log_max_splits"] = max(f["log_max_splits"], min_log)
    return [f]


def combine_tensors(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """Tensors of a combine call, as FA4's forward hands them over (LSE seqlen-contiguous).
    ``num_sms`` (every family's tensors take it) changes none of them."""
    f = variant.fields
    b, h, hd, s = d.batch, d.nheads, f["head_dim"], d.num_splits
    tq = d.total_q if d.total_q is not None else b * d.seqlen_q
    if f["varlen"]:
        out = {
            "out_partial": contiguous("fp32", s, tq, h, hd),
            "lse_partial": swap_last(contiguous("fp32", s, h, tq)),
            "out": contiguous(f["dtype"], tq, h, hd),
            "cu_seqlens": contiguous("int32", b + 1),
        }
        if f["has_lse"]:
            out["lse"] = swap_last(contiguous("fp32", h, tq))
    else:
        out = {
            "out_partial": contiguous("fp32", s, b, d.seqlen_q, h, hd),
            "lse_partial": swap_last(contiguous("fp32", s, b, h, d.seqlen_q)),
            "out": contiguous(f["dtype"], b, d.seqlen_q, h, hd),
        }
        if f["has_lse"]:
            out["lse"] = swap_last(contiguous("fp32", b, h, d.seqlen_q))
    return out | int32_vectors(f, (("seqused", "seqused", b), ("num_splits_dynamic", "num_splits_dynamic", b)))


def dims(variant: Variant) -> dict[str, Any]:
    f = variant.fields
    return {"head_dim": f["head_dim"], "head_dim_v": f["head_dim"], "nheads": f["num_head"], "num_splits": 4}


def combine_grid(f: dict, *, batch: int, seqlen: int, nheads: int, total_q: int | None = None) -> tuple[int, int, int]:
    """Grid of FlashAttentionForwardCombine: m blocks over seqlen*heads, head_dim blocks, batch."""
    k_block = 64 if f["head_dim"] <= 64 else 128
    tile_m = 8 if k_block % 128 == 0 else 16
    kblocks = cdiv(f["head_dim"], k_block)
    if f["varlen"]:
        return (((packed(total_q, batch, seqlen) * nheads) + batch * (tile_m - 1)) // tile_m * kblocks, 1, 1)
    return (cdiv(seqlen * nheads, tile_m), kblocks, batch)


#: The fields FA4's combine compile key holds: all a call needs to make FA4 compile the kernel.
FA4_KEY_FIELDS = ("dtype", "head_dim", "num_head", "varlen", "seqused", "has_lse", "num_splits_dynamic")


def fa4_case(v: Variant) -> dict[str, Any]:
    """A call for which FA4 compiles exactly this combine kernel (``fa4aot verify --against-fa4``)."""
    f = v.fields
    return dict({k: f[k] for k in FA4_KEY_FIELDS}, kind="combine", arch=v.arch, num_splits=1 << f["log_max_splits"])


FAMILY = Family(
    "combine",
    tuple(ARCHES),  # arch-neutral (cp.async); on SM120 it serves FA4's standalone flash_attn_combine
    COMBINE_AXES,
    check_combine,
    "FA4 split-KV combine (FlashAttentionForwardCombine)",
    COMPANION,
    tensors=combine_tensors,
    dims=dims,
    scalars=lambda v, d: {},
    fa4_kernel=lambda f: "FlashAttentionForwardCombine",
    grid=lambda f, s, n: combine_grid(
        f, batch=s["batch"], seqlen=s["seqlen_q"], nheads=s["nheads"], total_q=s.get("total_q")
    ),
    resolve=resolve,
    fa4_case=fa4_case,
)
