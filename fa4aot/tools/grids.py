"""Independent oracle for launch plans: FA4 4.0.0b40's tile-scheduler grid formulas, re-derived by hand from
``flash_attn/cute/tile_scheduler.py`` and the forward kernels' ``__call__``. Tests compare what a
launch plan (FA4's real host code) records against these."""

from __future__ import annotations


def _packed(total: int | None, batch: int, seqlen: int) -> int:
    """Packed varlen length; None means every sequence is full, as in ``core.layouts``."""
    return batch * seqlen if total is None else total


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: tile_scheduler.py 1509-1511: the dynamic persistent scheduler's CTA count fits the
#: semaphore's finished-CTA bits.
SEMAPHORE_MAX_CTAS = (1 << 8) - 1


def sm100_forward_grid(
    f: dict,
    *,
    batch: int,
    seqlen_q: int,
    nheads: int,
    nheads_kv: int,
    num_sms: int,
    total_q: int | None = None,
    num_splits: int = 1,
) -> tuple[int, int, int]:
    """Grid of FlashAttentionForwardSm100 (or its SwapAB decode kernel) for the variant fields ``f``.

    The scheduler class follows the kernel's own order (flash_fwd_sm100.py 354-369): varlen
    queries first (dynamic persistent, static persistent, else single-tile varlen), then
    causal/local/CLC (LPT; its CLC grid is the problem shape), then static persistent, else
    single-tile. A 2-CTA cluster counts its work in clusters (``use_cluster_idx``).
    """
    pack = f["qhead_per_kvhead"] if f["pack_gqa"] else 1
    heads = nheads_kv if f["pack_gqa"] else nheads
    splits = num_splits if f["num_splits"] > 1 else 1
    if f["use_swapab"]:  # SingleTileScheduler over (1 block, KV heads, batch); split-major with per-batch splits
        if f["num_splits_dynamic"]:
            return (nheads_kv, batch, splits)
        return (1, nheads_kv * splits, batch)
    cm = 2 if f["use_2cta_instrs"] else 1
    tile = f["q_stage"] * f["tile_m"]
    clc, dynamic, static = f["use_clc_scheduler"], f["tile_count_semaphore"], f["is_static_persistent"]
    num_block = _cdiv(seqlen_q * pack, tile * cm)  # clusters of work
    if f["varlen_q"] or f["seqused_q"]:
        tq = (_packed(total_q, batch, seqlen_q) if f["varlen_q"] else batch * seqlen_q) * pack
        if dynamic and not clc:  # DynamicPersistentVarlenScheduler
            blocks = (tq + batch * (tile - 1)) // tile
            return (min(num_sms, SEMAPHORE_MAX_CTAS, blocks * heads * splits), 1, 1)
        if not (static and not clc):  # SingleTileVarlenScheduler
            blocks = (tq + batch * (cm * tile - 1)) // tile // cm * cm
            return (blocks * heads, splits, 1)
    elif f["causal"] or f["local"] or clc:  # SingleTileLPTScheduler
        if clc:
            return (num_block * cm, heads, batch * splits)
        return (num_block * heads * batch * cm, splits, 1)
    elif not static:  # SingleTileScheduler
        return (num_block * cm, heads * splits, batch)
    # StaticPersistentTileScheduler
    return (min((num_sms // cm) * cm, num_block * heads * batch * cm), 1, 1)


def sm90_forward_grid(
    f: dict, *, batch: int, seqlen_q: int, nheads: int, nheads_kv: int, total_q: int | None = None
) -> tuple[int, int, int]:
    """Grid of FlashAttentionForwardSm90 (no clusters, no splits, never persistent)."""
    pack = f["qhead_per_kvhead"] if f["pack_gqa"] else 1
    heads = nheads_kv if f["pack_gqa"] else nheads
    tile = f["tile_m"]
    if f["varlen_q"] or f["seqused_q"]:
        tq = (_packed(total_q, batch, seqlen_q) if f["varlen_q"] else batch * seqlen_q) * pack
        return ((tq + batch * (tile - 1)) // tile * heads, 1, 1)
    num_block = _cdiv(seqlen_q * pack, tile)
    if f["causal"] and not f["local"]:
        return (num_block * heads * batch, 1, 1)
    return (num_block, heads, batch)


def sm120_forward_grid(
    f: dict, *, batch: int, seqlen_q: int, nheads: int, nheads_kv: int, total_q: int | None = None
) -> tuple[int, int, int]:
    """Grid of FlashAttentionForwardSm120 (FA4's SM80 kernel): the single-tile scheduler, or its
    varlen form; unlike SM90 no LPT order for causal attention."""
    if f["varlen_q"] or f["seqused_q"]:
        return sm90_forward_grid(f, batch=batch, seqlen_q=seqlen_q, nheads=nheads, nheads_kv=nheads_kv, total_q=total_q)
    pack = f["qhead_per_kvhead"] if f["pack_gqa"] else 1
    return (_cdiv(seqlen_q * pack, f["tile_m"]), nheads_kv if f["pack_gqa"] else nheads, batch)


def combine_grid(f: dict, *, batch: int, seqlen: int, nheads: int, total_q: int | None = None) -> tuple[int, int, int]:
    """Grid of FlashAttentionForwardCombine: m blocks over seqlen*heads, head_dim blocks, batch."""
    k_block = 64 if f["head_dim"] <= 64 else 128
    tile_m = 8 if k_block % 128 == 0 else 16
    kblocks = _cdiv(f["head_dim"], k_block)
    if f["varlen"]:
        return (((_packed(total_q, batch, seqlen) * nheads) + batch * (tile_m - 1)) // tile_m * kblocks, 1, 1)
    return (_cdiv(seqlen * nheads, tile_m), kblocks, batch)


def _varlen_tiles(total: int, batch: int, tile: int, cluster: int = 1) -> int:
    """SingleTileVarlenScheduler's block count: (total + batch * (cluster * tile - 1)) // tile,
    rounded down to whole clusters."""
    return (total + batch * (cluster * tile - 1)) // tile // cluster * cluster


def backward_grid(
    family: str, f: dict, *, batch: int, seqlen: int, nheads: int, total: int | None = None
) -> tuple[int, int, int]:
    """Grid of one of FA4's backward kernels for the variant fields ``f``.

    ``seqlen``/``total`` are the rows the kernel tiles: the keys for the main kernel (one CTA per
    K block - a cluster's worth of blocks per work tile with 2-CTA MMA - scheduler heads on y,
    batch on z: SingleTileScheduler, SingleTileVarlenScheduler with cu_seqlens_k, and
    SingleTileLPTBwdScheduler's flat x when deterministic; flash_bwd_sm100.py 1125-1160), the
    queries for the preprocess and the dQ postprocess, the keys for a dK/dV postprocess (tile_m
    rows per CTA). A query-head fold (``pack_factor``) stacks pack_factor heads' rows in one
    scheduler head (pack_gqa_layout); the SM100 head loop runs a KV head's sub-groups in one CTA.
    """
    pack = f.get("pack_factor", 1)
    if family in ("bwd_sm90", "bwd_sm100"):
        cm = 2 if f.get("use_2cta_instrs") else 1
        tile, varlen = f["tile_n"], f["varlen_k"]
        groups = f["qhead_per_kvhead"] // pack if f.get("head_loop") else 1
        heads = nheads // pack // groups
        if varlen:
            return (_varlen_tiles(_packed(total, batch, seqlen), batch, tile, cm) * heads, 1, 1)
        blocks = _cdiv(seqlen, tile * cm) * cm
        if f["deterministic"]:
            return (blocks * heads * batch, 1, 1)
        return (blocks, heads, batch)
    tile = f["tile_m"] if family == "bwd_pre" else f["tile"]
    varlen = f["varlen_q"] if family == "bwd_pre" else f["varlen"]
    heads = nheads // pack
    if varlen:
        return (((_packed(total, batch, seqlen) * pack) + batch * (tile - 1)) // tile * heads, 1, 1)
    return (_cdiv(seqlen * pack, tile), heads, batch)
