"""Independent oracle for launch plans: FA4 4.0.0b36's tile-scheduler grid formulas, re-derived by hand from
``flash_attn/cute/tile_scheduler.py`` and the forward kernels' ``__call__``. Tests compare what a
launch plan (FA4's real host code) records against these."""

from __future__ import annotations

from math import ceil


def _packed(total: int | None, batch: int, seqlen: int) -> int:
    """Packed varlen length; None means every sequence is full, as in ``core.layouts``."""
    return batch * seqlen if total is None else total


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    """Grid of FlashAttentionForwardSm100 for the variant fields ``f``.

    The scheduler class follows the kernel's own order: varlen queries first (dynamic persistent,
    static persistent or single-tile varlen), then causal/local/CLC (LPT), then static persistent,
    else single-tile.
    """
    pack = f["qhead_per_kvhead"] if f["pack_gqa"] else 1
    heads = nheads_kv if f["pack_gqa"] else nheads
    cm = 2 if f["two_cta"] else 1
    tile = f["q_stage"] * f["tile_m"]
    sched = f["scheduler"]
    varlen = f["varlen_q"] or f["seqused_q"]
    splits = num_splits if f["split_kv"] else 1
    persistent = sched in ("static", "dynamic", "clc")
    if varlen and sched in ("single", "dynamic", "clc"):
        tq = (_packed(total_q, batch, seqlen_q) if f["varlen_q"] else batch * seqlen_q) * pack
        blocks_max = (tq + batch * (cm * tile - 1)) // tile // cm * cm
        if sched == "dynamic":
            return (min(num_sms, blocks_max * heads * splits), 1, 1)
        return (blocks_max * heads, splits, 1)
    use_cluster_idx = not persistent and cm > 1
    num_block = _cdiv(seqlen_q * pack, tile * (cm if use_cluster_idx else 1))
    if not varlen and (f["causal"] or f["local"] or sched == "clc"):  # SingleTileLPTScheduler
        return (num_block * heads * batch * (cm if use_cluster_idx else 1), splits, 1)
    if persistent:  # StaticPersistentTileScheduler
        clusters = _cdiv(num_block, cm) * heads * batch
        return (min((num_sms // cm) * cm, clusters * cm), 1, 1)
    if use_cluster_idx:  # SingleTileScheduler
        return (num_block * cm, heads * splits, batch)
    return (ceil(num_block / cm) * cm, heads * splits, batch)


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


def prepare_grid(num_batch: int) -> tuple[int, int, int]:
    return (_cdiv(num_batch, 31 * 32), 1, 1)


def _varlen_tiles(total: int, batch: int, tile: int, cluster: int = 1) -> int:
    """SingleTileVarlenScheduler's block count: (total + batch * (cluster * tile - 1)) // tile,
    rounded down to whole clusters."""
    return (total + batch * (cluster * tile - 1)) // tile // cluster * cluster


def backward_grid(
    family: str, f: dict, *, batch: int, seqlen: int, nheads: int, total: int | None = None
) -> tuple[int, int, int]:
    """Grid of one of FA4's backward kernels for the variant fields ``f``.

    ``seqlen``/``total`` are the rows the kernel tiles: the keys for the main kernel (it runs
    one CTA per K block, query heads on y, batch on z: SingleTileScheduler, or
    SingleTileVarlenScheduler over all heads with cu_seqlens_k), the queries (or, for a dK/dV
    postprocess, the keys) for the preprocess and postprocess (tile_m rows per CTA). SM100's
    2-CTA main kernel rounds its K blocks up to whole clusters (``use_cluster_idx`` off). The
    deterministic main kernel without cu_seqlens_k runs SingleTileLPTBwdScheduler: one flat
    x dimension of (K blocks rounded to clusters) * heads * batch.
    """
    if family in ("bwd_sm90", "bwd_sm100"):
        tile, varlen = f["tile_n"], f["varlen_k"]
        cluster = 2 if f.get("two_cta") else 1
    else:
        tile = f["tile_m"] if family == "bwd_pre" else f["tile"]
        varlen = f["varlen_q"] if family == "bwd_pre" else f["varlen"]
        cluster = 1
    if varlen:
        return (_varlen_tiles(_packed(total, batch, seqlen), batch, tile, cluster) * nheads, 1, 1)
    blocks = _cdiv(_cdiv(seqlen, tile), cluster) * cluster
    if family in ("bwd_sm90", "bwd_sm100") and f["deterministic"]:
        return (blocks * nheads * batch, 1, 1)
    return (blocks, nheads, batch)
