"""Which forward variant FA4 would run for a call: a pure re-statement of the decisions in
``flash_attn.cute.interface._flash_attn_fwd`` (4.0.0b36) for the features fa4aot builds.

Pure Python on plain numbers, so it runs per call signature (and is cached by the caller), and the
tests can compare it with FA4's own decisions (FA4 run in fake-tensor mode, see
tests/test_dispatch.py).

Deviation from FA4, on purpose: above 256 varlen batches FA4's single-tile varlen scheduler gets
a precomputed batch-lookup table (two more helper kernels); fa4aot runs the same scheduler
without it (same results, slower batch lookup for very large batches).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.core.rules import (
    S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT,
    num_splits_heuristic,
    resolve_window,
    sm90_head_dims_ok,
    sm90_tile,
    sm100_head_dims_ok,
)


@dataclass(frozen=True)
class Call:
    """What dispatch needs to know about a forward call (host-side numbers only)."""

    arch: str
    num_sms: int
    dtype: str
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    nheads: int
    nheads_kv: int
    head_dim: int
    head_dim_v: int
    causal: bool = False
    window_left: int | None = None
    window_right: int | None = None
    varlen_q: bool = False
    varlen_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False
    num_splits: int = 1
    pack_gqa: bool | None = None
    return_lse: bool = False
    has_scheduler_metadata: bool = False


@dataclass(frozen=True)
class Decision:
    """The forward variant's fields, plus what the call must do around it."""

    fields: dict[str, Any]
    num_splits: int
    needs_metadata: bool  # split-KV varlen: run prepare (or use the caller's metadata)
    causal: bool
    local: bool
    window_left: int | None
    window_right: int | None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def clc_requested() -> bool:
    """FA4 turns on its CLC scheduler with FA_CLC=1; fa4aot reads the same variable."""
    return os.environ.get("FA_CLC", "0") == "1"


def decide(c: Call) -> Decision:
    """The decision for call ``c`` (raises ArgumentError where FA4 would reject it)."""
    if c.nheads % c.nheads_kv:
        raise ArgumentError(f"nheads ({c.nheads}) must be a multiple of the KV heads ({c.nheads_kv})")
    causal, local, wl, wr = resolve_window(c.causal, c.window_left, c.window_right)
    qh = c.nheads // c.nheads_kv
    pack_gqa = qh > 1 if c.pack_gqa is None else c.pack_gqa
    if (
        c.pack_gqa is None
        and c.arch == "sm_100a"
        and c.head_dim == c.head_dim_v == 256
        and 128 % qh != 0
        and not c.seqused_q
        and not (c.varlen_q and c.has_scheduler_metadata)
        and (c.max_seqlen_q > 128 or (c.num_splits == 1 and 2 * c.batch * c.nheads <= c.num_sms))
    ):
        pack_gqa = False  # FA4 prefers 2CTA over cp.async-Q PackGQA for hd256
    if c.arch == "sm_90a":
        return _decide_sm90(c, causal, local, wl, wr, qh, pack_gqa)
    if c.arch != "sm_100a":
        raise ArgumentError(f"no forward for {c.arch}")
    if reason := sm100_head_dims_ok(c.head_dim, c.head_dim_v, c.dtype):
        raise ArgumentError(reason)
    tile_m, tile_n = 128, 128
    seqlen_q_pack = c.max_seqlen_q * (qh if pack_gqa else 1)
    q_stage = 2 if seqlen_q_pack > tile_m and c.head_dim_v != 256 else 1
    m_eff = q_stage * tile_m
    wr_loaded = c.max_seqlen_k if wr is None else wr
    wl_loaded = c.max_seqlen_k if wl is None else wl
    seqlen_k_loaded = c.max_seqlen_k if not local else max(0, min(c.max_seqlen_k, wr_loaded + wl_loaded + 1 + tile_m))
    num_m_blocks = (seqlen_q_pack + m_eff - 1) // m_eff
    total_mblocks = c.batch * c.nheads_kv * (1 if pack_gqa else qh) * num_m_blocks
    num_n_blocks = (seqlen_k_loaded + tile_n - 1) // tile_n
    num_splits = c.num_splits
    if num_splits < 1:
        num_splits = num_splits_heuristic(total_mblocks, c.num_sms, num_n_blocks, 128)
    if c.head_dim != c.head_dim_v and num_splits > 1:
        if num_n_blocks >= 64 and c.head_dim_v != 512:
            tile_n = 64
            num_n_blocks = (seqlen_k_loaded + tile_n - 1) // tile_n
            if c.num_splits < 1:
                num_splits = num_splits_heuristic(total_mblocks, c.num_sms, num_n_blocks, 128)
        else:
            num_splits = 1
    split = num_splits > 1
    leq_one = seqlen_q_pack <= q_stage * tile_m
    varlen_q = c.varlen_q or c.seqused_q
    hd_pad = int(math.ceil(c.head_dim / 16) * 16)
    hdv_pad = int(math.ceil(c.head_dim_v / 16) * 16)
    is_hd256 = c.head_dim == 256 and c.head_dim_v == 256
    hd256_decode_2cta = is_hd256 and 2 * c.batch * (c.nheads_kv if pack_gqa else c.nheads) <= c.num_sms
    hd256_varlen_ok = not c.varlen_q or not c.has_scheduler_metadata
    two_cta = (
        not split
        and (not c.varlen_q or (is_hd256 and hd256_varlen_ok))
        and not c.seqused_q
        and (not leq_one or hd256_decode_2cta)
        and (tile_m % qh == 0 or not pack_gqa)
        and (is_hd256 or (not causal and not local and hd_pad in (128, 192) and hdv_pad == 128))
    )
    is_varlen = c.varlen_q or c.varlen_k or c.seqused_q or c.seqused_k
    use_clc = (
        clc_requested()
        and not (is_varlen and qh == 1)
        and not (not is_varlen and not causal and not local)
        and not (is_hd256 and two_cta)
    )
    needs_metadata = split and varlen_q
    has_semaphore = (c.has_scheduler_metadata or needs_metadata) and not use_clc
    static = (not causal and not local and not c.varlen_q and not c.seqused_q and not split) or (
        leq_one and not split and not (two_cta and not c.varlen_q and (causal or local))
    )
    n_per_split = _cdiv(_cdiv(seqlen_k_loaded, tile_n), num_splits)
    s_ping_pong = (
        q_stage == 1
        and c.head_dim in (64, 128, 256)
        and c.head_dim_v == c.head_dim
        and tile_m == 128
        and tile_n == 128
        and (num_splits == 1 or n_per_split >= S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT.get(c.head_dim, math.inf))
    )
    if has_semaphore and varlen_q:
        scheduler = "dynamic"
    elif use_clc:
        scheduler = "clc"
    elif static:
        scheduler = "static"
    else:
        scheduler = "single"
    fields = _common_fields(c, qh, pack_gqa, causal, local, tile_m, tile_n)
    fields.update(split_kv=split, q_stage=q_stage, two_cta=two_cta, scheduler=scheduler, s_ping_pong=s_ping_pong)
    return Decision(fields, num_splits, needs_metadata, causal, local, wl, wr)


def _common_fields(
    c: Call, qh: int, pack_gqa: bool, causal: bool, local: bool, tile_m: int, tile_n: int
) -> dict[str, Any]:
    """The variant fields both forward families share."""
    return dict(
        dtype=c.dtype,
        head_dim=c.head_dim,
        head_dim_v=c.head_dim_v,
        qhead_per_kvhead=qh,
        pack_gqa=pack_gqa,
        causal=causal,
        local=local,
        varlen_q=c.varlen_q,
        varlen_k=c.varlen_k,
        seqused_q=c.seqused_q,
        seqused_k=c.seqused_k,
        has_lse=c.return_lse,
        tile_m=tile_m,
        tile_n=tile_n,
    )


def _decide_sm90(
    c: Call, causal: bool, local: bool, wl: int | None, wr: int | None, qh: int, pack_gqa: bool
) -> Decision:
    if reason := sm90_head_dims_ok(c.head_dim, c.head_dim_v):
        raise ArgumentError(reason)
    if c.num_splits > 1:
        raise ArgumentError("FA4 runs no split-KV forward on SM90 (num_splits must be 1)")
    tile_m, tile_n, rs, overlap = sm90_tile(c.head_dim, c.head_dim_v, causal, local)
    fields = _common_fields(c, qh, pack_gqa, causal, local, tile_m, tile_n)
    fields.update(mma_pv_is_rs=rs, intra_wg_overlap=overlap)
    return Decision(fields, 1, False, causal, local, wl, wr)
