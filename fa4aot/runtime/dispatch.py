"""Which forward variant FA4 would run for a call: a pure re-statement of the decisions in
``flash_attn.cute.interface._flash_attn_fwd`` (4.0.0b36) for the features fa4aot builds.

Split in two so that nothing is cached on shapes:

* :class:`ForwardRule` holds what depends only on compile-time inputs (:class:`StaticCall`:
  dtype, head dims, GQA ratio, flags). The runtime caches one per static configuration, in a
  bounded dict.
* :meth:`ForwardRule.decide` does the per-call arithmetic FA4 does on batch, max_seqlen_q/k,
  the window and num_splits (q_stage, split heuristic, tile_n, 2-CTA, scheduler, S ping-pong): a
  few integer operations, computed every call. It returns a small tuple of the variant's
  shape-dependent fields, which the rule maps to the loaded variant.

The tests compare both halves with FA4 itself (FA4 run in fake-tensor mode, see
tests/test_dispatch.py).

Deviation from FA4, on purpose: above 256 varlen batches FA4's single-tile varlen scheduler gets
a precomputed batch-lookup table (two more helper kernels); fa4aot runs the same scheduler
without it (same results, slower batch lookup for very large batches).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from fa4aot.core.errors import ArgumentError
from fa4aot.core.rules import (
    S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT,
    num_splits_heuristic,
    paged_kv_class,
    resolve_window,
    sm90_head_dims_ok,
    sm90_tile,
    sm100_head_dims_ok,
    sm120_head_dims_ok,
    sm120_tile,
)
from fa4aot.core.variant import FORWARD_FAMILY, Variant

#: FA4's SM100 forward tiles (``_flash_attn_fwd``: m_block_size 128, n_block_size 128).
SM100_TILE_M = 128
SM100_TILE_N = 128
#: n_block_size FA4 switches to for split-KV with head_dim != head_dim_v (enough KV blocks).
SM100_SPLIT_TILE_N = 64
#: FA4's cap on heuristic split counts (``num_splits_heuristic(..., 128)`` in ``_flash_attn_fwd``).
MAX_HEURISTIC_SPLITS = 128
#: FA4 uses tile_n 64 for mixed head dims with split-KV only from this many KV blocks on.
SPLIT_TILE_N_MIN_BLOCKS = 64
#: FA4 runs 2-CTA with a page table only at this page size (``page_size in [None, 128]``).
PAGE_SIZE_2CTA = 128
#: head_dim_v of FA4's MLA path, which keeps tile_n 128 and is never split (fa4aot does not build it).
MLA_HEAD_DIM_V = 512


def clc_requested() -> bool:
    """FA4 turns on its CLC scheduler with FA_CLC=1; fa4aot reads the same variable (once, when a
    runtime is opened)."""
    return os.environ.get("FA_CLC", "0") == "1"


class StaticCall(NamedTuple):
    """The compile-time inputs of a forward call. ``causal``/``local`` are already resolved from
    the window (:func:`fa4aot.core.rules.resolve_window`); ``splits`` is how num_splits was asked
    for: 1 (num_splits == 1), 2 (an explicit count > 1) or 0 (< 1: FA4's heuristic); ``paged``:
    a page table is given (its page size is per call); ``learnable_sink``: its dtype or ``none``;
    ``softcap``: the value (0: off), which FA4 compiles in."""

    arch: str
    num_sms: int
    dtype: str
    head_dim: int
    head_dim_v: int
    qhead_per_kvhead: int
    causal: bool
    local: bool
    varlen_q: bool = False
    varlen_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False
    splits: int = 1
    pack_gqa: bool | None = None
    return_lse: bool = False
    has_scheduler_metadata: bool = False
    clc: bool = False
    paged: bool = False
    learnable_sink: str = "none"
    softcap: float = 0.0


def splits_mode(num_splits: int) -> int:
    """The :attr:`StaticCall.splits` class of a num_splits argument."""
    return 1 if num_splits == 1 else (2 if num_splits > 1 else 0)


class ForwardRule:
    """FA4's forward decisions for one :class:`StaticCall` (raises ArgumentError where FA4 would
    reject the configuration).

    ``loaded`` maps a :meth:`decide` key to the runtime's loaded variant; the runtime fills it.
    Its size is bounded by the handful of shape-dependent fields.
    """

    __slots__ = (
        "s",
        "qh",
        "pack",
        "family",
        "_base",
        "_one_key",
        "_static_two_cta",
        "_clc",
        "_hd256",
        "_vq",
        "_pp_ok",
        "loaded",
    )

    def __init__(self, s: StaticCall):
        self.s = s
        qh = self.qh = s.qhead_per_kvhead
        if qh < 1:
            raise ArgumentError(f"qhead_per_kvhead must be >= 1, got {qh}")
        self.pack = qh > 1 if s.pack_gqa is None else s.pack_gqa
        self.loaded: dict[tuple, Any] = {}
        self._vq = s.varlen_q or s.seqused_q
        if s.paged and s.varlen_k:
            raise ArgumentError("page_table cannot be used with cu_seqlens_k (FA4 indexes pages per batch entry)")
        # S ping-pong needs FA4's plain softmax epilogue: no score_mod (softcap), no sink
        self._pp_ok = not s.softcap and s.learnable_sink == "none"
        family = self.family = FORWARD_FAMILY.get(s.arch)
        if family is None:
            raise ArgumentError(f"fa4aot has no forward for {s.arch} (it builds {sorted(FORWARD_FAMILY)})")
        # SM90 and SM120 decide nothing per call but the page-table path: one key per rule
        self._one_key = family != "fwd_sm100"
        if family == "fwd_sm90":
            if reason := sm90_head_dims_ok(s.head_dim, s.head_dim_v):
                raise ArgumentError(reason)
            if s.splits == 2:
                raise ArgumentError("FA4 runs no split-KV forward on SM90 (num_splits must be 1)")
            tile_m, tile_n, rs, overlap = sm90_tile(s.head_dim, s.head_dim_v, s.causal, s.local)
            self._base = self._common(tile_m, tile_n)
            self._base.update(pack_gqa=self.pack, mma_pv_is_rs=rs, intra_wg_overlap=overlap)
            return
        if family == "fwd_sm120":
            # FA4's SM120 branch of _flash_attn_fwd: asserts on each of these
            if reason := sm120_head_dims_ok(s.head_dim, s.head_dim_v):
                raise ArgumentError(reason)
            if s.splits == 2:
                raise ArgumentError("FA4's SM120 forward only supports num_splits=1")
            if s.paged:
                raise ArgumentError("FA4 has no paged KV on SM120 (page_table must be None)")
            if s.learnable_sink != "none":
                raise ArgumentError("FA4's SM120 forward takes no learnable_sink")
            self._base = self._common(*sm120_tile(s.head_dim))
            self._base.update(pack_gqa=self.pack)
            return
        if reason := sm100_head_dims_ok(s.head_dim, s.head_dim_v, s.dtype):
            raise ArgumentError(reason)
        self._base = self._common(SM100_TILE_M, None)
        hd_pad = math.ceil(s.head_dim / 16) * 16
        hdv_pad = math.ceil(s.head_dim_v / 16) * 16
        self._hd256 = s.head_dim == s.head_dim_v == 256
        hd256_varlen_ok = not s.varlen_q or not s.has_scheduler_metadata
        self._static_two_cta = (
            (not s.varlen_q or (self._hd256 and hd256_varlen_ok))
            and not s.seqused_q
            and (self._hd256 or (not s.causal and not s.local and hd_pad in (128, 192) and hdv_pad == 128))
        )
        is_varlen = s.varlen_q or s.varlen_k or s.seqused_q or s.seqused_k
        self._clc = s.clc and not (is_varlen and qh == 1) and not (not is_varlen and not s.causal and not s.local)

    def _common(self, tile_m: int, tile_n: int | None) -> dict[str, Any]:
        s = self.s
        return dict(
            dtype=s.dtype,
            head_dim=s.head_dim,
            head_dim_v=s.head_dim_v,
            qhead_per_kvhead=self.qh,
            causal=s.causal,
            local=s.local,
            varlen_q=s.varlen_q,
            varlen_k=s.varlen_k,
            seqused_q=s.seqused_q,
            seqused_k=s.seqused_k,
            has_lse=s.return_lse,
            tile_m=tile_m,
            tile_n=tile_n,
            learnable_sink=s.learnable_sink,
            softcap=float(s.softcap),
        )

    def decide(
        self,
        batch: int,
        nheads_kv: int,
        max_seqlen_q: int,
        max_seqlen_k: int,
        num_splits: int,
        window_left: int | None,
        window_right: int | None,
        page_size: int | None = None,
    ) -> tuple[tuple, int]:
        """(key of the variant's shape-dependent fields, number of splits) for one call;
        ``page_size`` is K/V's page size when a page table is given."""
        if self._one_key:
            return (paged_kv_class(page_size, self._base["tile_n"]),), 1
        s = self.s
        qh = self.qh
        pack = self.pack
        if (
            s.pack_gqa is None
            and self._hd256
            and SM100_TILE_M % qh != 0
            and not s.seqused_q
            and not (s.varlen_q and s.has_scheduler_metadata)
            and (max_seqlen_q > 128 or (num_splits == 1 and 2 * batch * nheads_kv * qh <= s.num_sms))
        ):
            pack = False  # FA4 prefers 2CTA over cp.async-Q PackGQA for hd256
        seqlen_q_pack = max_seqlen_q * qh if pack else max_seqlen_q
        q_stage = 2 if seqlen_q_pack > SM100_TILE_M and s.head_dim_v != 256 else 1
        m_eff = q_stage * SM100_TILE_M
        if s.local:
            wr = max_seqlen_k if window_right is None else window_right
            wl = max_seqlen_k if window_left is None else window_left
            seqlen_k_loaded = max(0, min(max_seqlen_k, wr + wl + 1 + SM100_TILE_M))
        else:
            seqlen_k_loaded = max_seqlen_k
        num_m_blocks = -(-seqlen_q_pack // m_eff)
        total_mblocks = batch * nheads_kv * (1 if pack else qh) * num_m_blocks
        tile_n = SM100_TILE_N
        num_n_blocks = -(-seqlen_k_loaded // tile_n)
        splits = num_splits
        if splits < 1:
            splits = num_splits_heuristic(total_mblocks, s.num_sms, num_n_blocks, MAX_HEURISTIC_SPLITS)
        if s.head_dim != s.head_dim_v and splits > 1:
            if num_n_blocks >= SPLIT_TILE_N_MIN_BLOCKS and s.head_dim_v != MLA_HEAD_DIM_V:
                tile_n = SM100_SPLIT_TILE_N
                num_n_blocks = -(-seqlen_k_loaded // tile_n)
                if num_splits < 1:
                    splits = num_splits_heuristic(total_mblocks, s.num_sms, num_n_blocks, MAX_HEURISTIC_SPLITS)
            else:
                splits = 1
        split = splits > 1
        leq_one = seqlen_q_pack <= m_eff
        hd256_decode_2cta = self._hd256 and 2 * batch * (nheads_kv if pack else nheads_kv * qh) <= s.num_sms
        paged = paged_kv_class(page_size, tile_n)
        two_cta = (
            self._static_two_cta
            and not split
            and (page_size is None or page_size == PAGE_SIZE_2CTA)
            and (not leq_one or hd256_decode_2cta)
            and (SM100_TILE_M % qh == 0 or not pack)
        )
        use_clc = self._clc and not (self._hd256 and two_cta)
        has_semaphore = (s.has_scheduler_metadata or (split and self._vq)) and not use_clc
        if has_semaphore and self._vq:
            scheduler = "dynamic"
        elif use_clc:
            scheduler = "clc"
        elif (not s.causal and not s.local and not self._vq and not split) or (
            leq_one and not split and not (two_cta and not s.varlen_q and (s.causal or s.local))
        ):
            scheduler = "static"
        else:
            scheduler = "single"
        s_ping_pong = (
            self._pp_ok
            and paged != "cpasync"
            and q_stage == 1
            and s.head_dim in (64, 128, 256)
            and s.head_dim_v == s.head_dim
            and tile_n == SM100_TILE_N
            and (
                splits == 1
                # KV blocks per split (num_n_blocks is for the final tile_n)
                or -(-num_n_blocks // splits) >= S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT.get(s.head_dim, math.inf)
            )
        )
        return (pack, q_stage, tile_n, split, two_cta, scheduler, s_ping_pong, paged), splits

    def fields(self, key: tuple) -> dict[str, Any]:
        """The variant's fields for a :meth:`decide` key."""
        f = dict(self._base)
        if self._one_key:
            (f["paged_kv"],) = key
        else:
            pack, q_stage, tile_n, split, two_cta, scheduler, s_ping_pong, paged = key
            f.update(
                pack_gqa=pack,
                tile_n=tile_n,
                split_kv=split,
                q_stage=q_stage,
                two_cta=two_cta,
                scheduler=scheduler,
                s_ping_pong=s_ping_pong,
                paged_kv=paged,
            )
        return f

    def variant(self, key: tuple) -> Variant:
        return Variant.make(self.family, self.s.arch, self.s.num_sms, **self.fields(key))


class Call(NamedTuple):
    """A whole forward call as host-side numbers (what the tests hand FA4 and fa4aot alike)."""

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
    clc: bool = False
    page_size: int | None = None
    learnable_sink: str = "none"
    softcap: float = 0.0


class Decision(NamedTuple):
    """The forward variant's fields, the split count and the resolved window of one call."""

    fields: dict[str, Any]
    num_splits: int
    causal: bool
    local: bool
    window_left: int | None
    window_right: int | None


def static_call(c: Call) -> tuple[StaticCall, int | None, int | None]:
    """The compile-time half of ``c``, and its resolved window edges."""
    if c.nheads_kv < 1 or c.nheads % c.nheads_kv:
        raise ArgumentError(f"nheads ({c.nheads}) must be a multiple of the KV heads ({c.nheads_kv})")
    causal, local, wl, wr = resolve_window(c.causal, c.window_left, c.window_right)
    s = StaticCall(
        c.arch,
        c.num_sms,
        c.dtype,
        c.head_dim,
        c.head_dim_v,
        c.nheads // c.nheads_kv,
        causal,
        local,
        c.varlen_q,
        c.varlen_k,
        c.seqused_q,
        c.seqused_k,
        splits_mode(c.num_splits),
        c.pack_gqa,
        c.return_lse,
        c.has_scheduler_metadata,
        c.clc,
        c.page_size is not None,
        c.learnable_sink,
        float(c.softcap or 0.0),
    )
    return s, wl, wr


def decide(c: Call) -> Decision:
    """The decision for call ``c`` (both halves, uncached: for tests and tools)."""
    s, wl, wr = static_call(c)
    rule = ForwardRule(s)
    key, splits = rule.decide(c.batch, c.nheads_kv, c.max_seqlen_q, c.max_seqlen_k, c.num_splits, wl, wr, c.page_size)
    return Decision(rule.fields(key), splits, s.causal, s.local, wl, wr)
