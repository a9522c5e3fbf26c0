"""Home of the scheduler-metadata prepare family (FA4's ``FlashPrepareScheduler``): its manifest
axes and checks, the batch buckets a manifest's max_batch stands for, the tensors it reads and
fills, sample sizes and scalars, and the call that makes FA4's JIT compile it."""

from __future__ import annotations

from typing import Any

from fa4aot.core.fa4_interface import DEFAULT_PREPARE_OPTIONS, PREPARE_WARPS, PrepareOptions, prepare_num_warps
from fa4aot.core.families import axes as ax
from fa4aot.core.families.base import COMPANION, Family
from fa4aot.core.layouts import Dims, TensorLayout, int32_vectors
from fa4aot.core.targets import ARCHES
from fa4aot.core.variant import Variant

#: Batch entries per prepare warp (FA4's ``get_scheduler_metadata``:
#: ``num_warps = min((num_batch + 30) // 31, 32)``).
PREPARE_BATCH_PER_WARP = 31


def check_prepare(f: dict[str, Any]) -> str | None:
    if f["num_warps"] not in PREPARE_WARPS:
        return f"num_warps must be one of {PREPARE_WARPS}"
    if f["nheads"] % f["nheads_kv"]:
        return "nheads must be a multiple of nheads_kv"
    if f["pack_gqa"] and f["nheads"] == f["nheads_kv"]:
        return "pack_gqa needs nheads > nheads_kv"
    if not (f["varlen_q"] or f["seqused_q"] or f["varlen_k"] or f["seqused_k"]):
        return "the prepare kernel needs at least one of cu_seqlens_q/k, seqused_q/k"
    if f["varlen_q"] and f["seqused_q"]:
        return "give cu_seqlens_q or seqused_q, not both (FA4 reads seqused first)"
    if f["varlen_k"] and f["seqused_k"]:
        return "give cu_seqlens_k or seqused_k, not both (FA4 reads seqused first)"
    return None


PREPARE_AXES = (
    ax.Axis("heads", ax.pair("nheads", "nheads_kv", 1, 1024), ((16, 16),), "(nheads, nheads_kv)"),
    ax.Axis("head_dims", ax.pair("headdim", "headdim_v"), ((128, 128),), "(head_dim, head_dim_v)"),
    ax.Axis("tiles", ax.pair("tile_m", "tile_n"), ((128, 128),), "(tile_m, tile_n) of the forward it serves"),
    ax.flag("causal", False, "causal (adds num_nheads_in_l2)"),
    ax.Axis("pack_gqa", ax.bool_or_auto("pack_gqa"), ("auto",), "pack_gqa (auto: nheads > nheads_kv)"),
    ax.flag("varlen_q", True, "cu_seqlens_q"),
    ax.flag("seqused_q", False, "seqused_q"),
    ax.flag("varlen_k", True, "cu_seqlens_k"),
    ax.flag("seqused_k", False, "seqused_k"),
    ax.flag("semaphore", True, "reset the tile_count_semaphore (FA4: unless CLC)", "has_semaphore"),
    ax.flag(
        "zfill_padded_output",
        True,
        "FA4's zfill_padded_output: an empty sequence gets one split (false: none, its output rows untouched)",
    ),
    ax.Axis(
        "max_batch",
        ax.max_batch,
        (992,),
        "largest batch to support (picks the warp-count buckets)",
        lambda f: PREPARE_BATCH_PER_WARP * f["num_warps"],
    ),
    ax.Axis(
        "swapab",
        ax.boolean("_swapab"),
        (False,),
        "the split rule of FA4's SwapAB decode kernel (SWAPAB.split_policy for the head dim)",
        lambda f: bool(f.get("floor_ctas")),
    ),
)


def resolve(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """``auto`` as FA4 resolves it, the SwapAB split rule from FA4's own policy, and one variant
    per warp-count bucket up to the manifest's max_batch."""
    f = dict(raw)
    if f["pack_gqa"] == "auto":
        f["pack_gqa"] = f["nheads"] > f["nheads_kv"]
    options = DEFAULT_PREPARE_OPTIONS
    if f.pop("_swapab"):
        from fa4aot.core import selector

        options = PrepareOptions(**selector.installed().SWAPAB.split_policy(f["headdim"]))
    # an option the manifest names (an axis called as FA4's argument) overrides the policy's
    options = options._replace(**{n: f.pop(n) for n in PrepareOptions._fields if n in f})
    f.update(options.fields())
    top = prepare_num_warps(f.pop("_max_batch"))
    return [dict(f, num_warps=w) for w in PREPARE_WARPS if w <= top]


def prepare_tensors(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """Tensors of a prepare call: the varlen inputs and the metadata buffers it fills, in FA4's
    argument order. ``num_sms`` (every family's tensors take it) changes none of them."""
    b = d.batch
    return int32_vectors(
        variant.fields,
        (
            ("varlen_q", "cu_seqlens_q", b + 1),
            ("seqused_q", "seqused_q", b),
            ("varlen_k", "cu_seqlens_k", b + 1),
            ("seqused_k", "seqused_k", b),
            ("has_semaphore", "tile_count_semaphore", 1),
            (None, "num_m_blocks", b),
            (None, "num_splits_dynamic", b),
            ("causal", "num_nheads_in_l2", b),
        ),
    )


def dims(variant: Variant) -> dict[str, Any]:
    """Sizes of a sample call: the variant's heads and a batch in its warp-count bucket."""
    f = variant.fields
    return {
        "head_dim": f["headdim"],
        "head_dim_v": f["headdim_v"],
        "nheads": f["nheads"],
        "nheads_kv": f["nheads_kv"],
        "batch": max(1, PREPARE_BATCH_PER_WARP * f["num_warps"] // 2),
    }


def scalars(variant: Variant, d: Dims) -> dict[str, Any]:
    return {
        "max_seqlen_q": d.seqlen_q,
        "max_seqlen_k": d.seqlen_k,
        "seqlen_k_new": 0,
        "num_batch": d.batch,
        "num_splits": max(d.num_splits, 1),
    }


FAMILY = Family(
    "prepare",
    tuple(a.name for a in ARCHES.values() if a.scheduler_metadata),
    PREPARE_AXES,
    check_prepare,
    "FA4 scheduler-metadata prepare (FlashPrepareScheduler)",
    COMPANION,
    tensors=prepare_tensors,
    dims=dims,
    scalars=scalars,
    fa4_kernel=lambda f: "FlashPrepareScheduler",
    resolve=resolve,
    # FA4's prepare kernel is compiled from these fields (its compile key), the batch size only
    # through the warp count
    fa4_case=lambda v: dict(v.fields, kind="prepare"),
)
