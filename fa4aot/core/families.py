"""Kernel families: their compile-time fields, manifest axes and FA4's validity rules.

Pure Python (no DSL, no torch), so the manifest expander, the build, the runtime dispatcher and the
tests all share one definition of what a variant of each family is. The rules mirror what
``flash_attn.cute`` 4.0.0b36 itself enforces or decides (``interface._flash_attn_fwd``,
``_validate_head_dims``, the kernel constructors); each rejection carries a reason that names the
rule, so ``fa4aot plan`` can say why a combination was skipped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fa4aot.core.rules import (
    COMBINE_MAX_LOG_SPLITS,
    COMBINE_MAX_SPLITS,
    PREPARE_WARPS,
    combine_tiling,
    paged_kv_class,
    prepare_num_warps,
    sm90_candidate_tile_problem,
    sm90_head_dims_ok,
    sm90_tile,
    sm100_head_dims_ok,
    sm120_head_dims_ok,
    sm120_tile,
)
from fa4aot.core.variant import SMEM_OPTIN_227_KIB, Variant

DTYPES = ("bf16", "fp16")
#: Out dtypes of the combine kernel (FA4: fp16, bf16 or fp32).
COMBINE_DTYPES = ("bf16", "fp16", "fp32")
SCHEDULERS = ("static", "single", "dynamic", "clc")
#: How a forward reads K/V: no page table, pages by TMA (page size == tile_n), pages by cp.async.
PAGED_KV = ("none", "tma", "cpasync")
#: learnable_sink dtypes FA4 takes (``_LEARNABLE_SINK_DTYPES``).
SINK_DTYPES = ("bf16", "fp16", "fp32")
#: Bounds for the page-size and softcap axes (far above any engine's: vLLM pages are 16-128 tokens,
#: Gemma-2's softcap is 50).
MAX_PAGE_SIZE = 1 << 16
MAX_SOFTCAP = 1e6

# --------------------------------------------------------------------------------------------
# Family rules. Each takes the full field dict and returns None (valid) or the reason it is not.
# --------------------------------------------------------------------------------------------


def _pad16(x: int) -> int:
    return int(math.ceil(x / 16) * 16)


def _check_forward_common(f: dict[str, Any]) -> str | None:
    if f["qhead_per_kvhead"] < 1:
        return "qhead_per_kvhead must be >= 1"
    if f["pack_gqa"] and f["qhead_per_kvhead"] == 1:
        return "pack_gqa needs qhead_per_kvhead > 1"
    if f["causal"] and f["local"]:
        return "causal and local are exclusive (FA4 resolves a causal window to causal)"
    if f["paged_kv"] != "none" and f["varlen_k"]:
        return "FA4 does not take page_table with cu_seqlens_k (paged KV is indexed per batch entry)"
    if f["paged_kv"] not in PAGED_KV:
        return f"paged_kv must be one of {PAGED_KV}"
    if f["learnable_sink"] not in ("none",) + SINK_DTYPES:
        return f"learnable_sink must be one of {('none',) + SINK_DTYPES}"
    return None


def check_fwd_sm100(f: dict[str, Any]) -> str | None:
    hd, hdv = f["head_dim"], f["head_dim_v"]
    if reason := sm100_head_dims_ok(hd, hdv, f["dtype"]) or _check_forward_common(f):
        return reason
    qh = f["qhead_per_kvhead"]
    if f["tile_m"] != 128:
        return "FA4's SM100 forward uses tile_m 128"
    if f["tile_n"] not in (64, 128):
        return "FA4's SM100 forward uses tile_n 128 (64 for split-KV with head_dim != head_dim_v)"
    split = f["split_kv"]
    if split and hd != hdv and f["tile_n"] != 64:
        return "split-KV with head_dim != head_dim_v uses tile_n 64 in FA4"
    if not (split and hd != hdv) and f["tile_n"] != 128:
        return "tile_n 64 is only used by FA4 for split-KV with head_dim != head_dim_v"
    if f["q_stage"] == 2 and hdv == 256:
        return "q_stage 2 exceeds TMEM at head_dim_v 256"
    if split:
        if _pad16(hdv) >= 192 and hdv != 256:
            return "FA4 SplitKV is not supported for head_dim_v >= 192 except 256"
    two_cta = f["two_cta"]
    if two_cta:
        if split:
            return "FA4 never uses 2CTA with split-KV"
        if f["seqused_q"]:
            return "FA4 uses 2CTA only without seqused_q"
        if f["pack_gqa"] and f["tile_m"] % qh != 0:
            return "2CTA with pack_gqa needs tile_m divisible by qhead_per_kvhead"
        if f["paged_kv"] == "cpasync":
            return "FA4 uses 2CTA only without a page table or with page size 128 (TMA)"
        if f["scheduler"] not in ("static", "single"):
            return "FA4 runs 2CTA with the static persistent or the single-tile scheduler"
        if not (hd == 256 and hdv == 256):
            # hd256 takes 2CTA in more cases (causal, local, varlen_q, one M block): FA4's
            # use_2cta_instrs rule; the per-call half is in the runtime's dispatch
            if f["causal"] or f["local"]:
                return "FA4 uses 2CTA only for non-causal, non-local attention (or head_dim 256)"
            if f["varlen_q"]:
                return "FA4 uses 2CTA only without cu_seqlens_q (or head_dim 256)"
            if _pad16(hd) not in (128, 192) or _pad16(hdv) != 128:
                return "FA4 uses 2CTA only for head_dim in (128, 192) with head_dim_v 128, or (256, 256)"
            if f["q_stage"] != 2:
                return "2CTA only runs with more than one M block, where FA4 picks q_stage 2"
            if f["scheduler"] != "static":
                return "FA4's dense non-causal 2CTA forward runs the static persistent scheduler"
    sched = f["scheduler"]
    varlen_q = f["varlen_q"] or f["seqused_q"]
    dense_noncausal = not (f["causal"] or f["local"] or varlen_q)
    if sched == "static":
        if split:
            return "FA4 never runs split-KV with the static persistent scheduler"
    elif sched == "single":
        if dense_noncausal and not split:
            return "FA4 runs dense non-causal attention with the static persistent scheduler, never single-tile"
        if split and varlen_q:
            return "FA4 runs varlen split-KV with prepared scheduler metadata (scheduler dynamic)"
        if f["q_stage"] == 1 and not split and hdv != 256:  # hdv 256 always has q_stage 1
            return "with one M block (q_stage 1) FA4 uses the static persistent scheduler"
    elif sched == "dynamic":
        if not varlen_q:
            return "the dynamic persistent scheduler is FA4's varlen scheduler (needs varlen_q)"
    elif sched == "clc":
        if varlen_q and qh == 1:
            return "FA4 disables CLC for varlen MHA"
        if dense_noncausal:
            return "FA4 disables CLC for dense non-causal attention"
        if two_cta:
            return "CLC is not used with 2CTA"
    else:
        return f"unknown scheduler {sched!r}"
    want_pp = sm100_s_ping_pong_possible(f)
    if f["s_ping_pong"] and not want_pp:
        return (
            "FA4 enables S ping-pong only for q_stage 1, head_dim in (64, 128, 256), hdim == hdim_v, 128x128 "
            "tiles, no cp.async page table, no softcap and no learnable sink"
        )
    if not f["s_ping_pong"] and want_pp and not split:
        return "FA4 always enables S ping-pong for this shape without split-KV"
    return None


def sm100_s_ping_pong_possible(f: dict[str, Any]) -> bool:
    """FA4's S ping-pong condition, minus the split-KV block-count part (a run-time property).
    A softcap is a score_mod and a learnable sink changes the softmax epilogue: both turn it off."""
    return (
        f["q_stage"] == 1
        and f["head_dim"] in (64, 128, 256)
        and f["head_dim_v"] == f["head_dim"]
        and f["tile_m"] == 128
        and f["tile_n"] == 128
        and f["paged_kv"] != "cpasync"
        and not f["softcap"]
        and f["learnable_sink"] == "none"
    )


def check_fwd_sm90(f: dict[str, Any]) -> str | None:
    hd, hdv = f["head_dim"], f["head_dim_v"]
    if reason := sm90_head_dims_ok(hd, hdv) or _check_forward_common(f):
        return reason
    tile_m, tile_n, rs, overlap = sm90_tile(hd, hdv, f["causal"], f["local"])
    if f["intra_wg_overlap"] != overlap:
        return "intra_wg_overlap must follow FA4's SM90 config"
    if (f["tile_m"], f["tile_n"], f["mma_pv_is_rs"]) != (tile_m, tile_n, rs):
        # a tuning candidate: another tiling of FA4's kernel, for `fa4aot tune` to measure
        if f["paged_kv"] != "none":
            return f"a paged K/V cache needs FA4's SM90 config for this head dim ({tile_m}x{tile_n}, mma_pv_is_rs={rs})"
        if reason := sm90_candidate_tile_problem(
            f["tile_m"], f["tile_n"], hd, hdv, SMEM_OPTIN_227_KIB, f["mma_pv_is_rs"]
        ):
            return f"tiles {f['tile_m']}x{f['tile_n']} (FA4's is {tile_m}x{tile_n}): {reason}"
    return None


def check_fwd_sm120(f: dict[str, Any]) -> str | None:
    hd, hdv = f["head_dim"], f["head_dim_v"]
    if reason := sm120_head_dims_ok(hd, hdv) or _check_forward_common(f):
        return reason
    if f["paged_kv"] != "none":
        return "FA4 4.0.0b36 has no paged KV on SM120 ('Paged KV not supported on SM 12.0')"
    if f["learnable_sink"] != "none":
        return "FA4's SM120 forward (its SM80 kernel) takes no learnable sink"
    tile_m, tile_n = sm120_tile(hd)
    if (f["tile_m"], f["tile_n"]) != (tile_m, tile_n):
        return f"FA4's SM120 forward uses {tile_m}x{tile_n} tiles at head_dim {hd}"
    return None


def is_tuning_candidate(family: str, f: dict[str, Any]) -> bool:
    """True for a variant FA4's own dispatch never picks, built only for `fa4aot tune` to
    measure (its tiles or P operand source are not FA4's for the head dim)."""
    if family != "fwd_sm90":
        return False
    tm, tn, rs, _ = sm90_tile(f["head_dim"], f["head_dim_v"], f["causal"], f["local"])
    return (f["tile_m"], f["tile_n"], f["mma_pv_is_rs"]) != (tm, tn, rs)


def check_combine(f: dict[str, Any]) -> str | None:
    hd = f["head_dim"]
    if hd % 8 or not 8 <= hd <= 512:
        return "combine needs head_dim a multiple of 8 in 8..512"
    _, tile_m, min_log = combine_tiling(hd)
    log = f["log_max_splits"]
    if log < min_log or log > COMBINE_MAX_LOG_SPLITS:
        return f"log_max_splits must be in {min_log}..{COMBINE_MAX_LOG_SPLITS} at head_dim {hd} (FA4 tile_m {tile_m})"
    if f["num_head"] < 1:
        return "num_head must be >= 1"
    if f["seqused"] and not f["varlen"]:
        return "fa4aot builds seqused only together with cu_seqlens (varlen)"
    return None


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


# --------------------------------------------------------------------------------------------
# Manifest axes: how a YAML key expands into field values.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One manifest key of a family group.

    ``parse`` turns one YAML item into a dict of field values (or raises ValueError with a
    reason); ``default`` is the list used when the group omits the key. The value ``"auto"``
    (where allowed) means "derive from the other fields the way FA4 does".
    """

    name: str
    parse: Callable[[Any], dict[str, Any]]
    default: tuple[Any, ...]
    doc: str


def _bool(field: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if not isinstance(v, bool):
            raise ValueError(f"expected true/false, got {v!r}")
        return {field: v}

    return parse


def _bool_or_auto(field: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {field: "auto"}
        if not isinstance(v, bool):
            raise ValueError(f"expected true, false or auto, got {v!r}")
        return {field: v}

    return parse


def _choice(field: str, choices: Iterable[Any]) -> Callable[[Any], dict[str, Any]]:
    choices = tuple(choices)

    def parse(v: Any) -> dict[str, Any]:
        if v not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return {field: v}

    return parse


def _posint(field: str, lo: int = 1, hi: int = 1 << 20) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v!r}")
        return {field: v}

    return parse


def _pair(f1: str, f2: str, lo: int = 1, hi: int = 1024) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v)
        ):
            raise ValueError(f"expected an integer or a pair [{f1}, {f2}] in {lo}..{hi}, got {v!r}")
        return {f1: v[0], f2: v[1]}

    return parse


def _pair_or_auto(f1: str, f2: str) -> Callable[[Any], dict[str, Any]]:
    inner = _pair(f1, f2)

    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {f1: "auto", f2: "auto"}
        return inner(v)

    return parse


def _max_splits(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= COMBINE_MAX_SPLITS:
        raise ValueError(f"expected the largest split count to support, 1..{COMBINE_MAX_SPLITS}, got {v!r}")
    return {"log_max_splits": max(math.ceil(math.log2(v)), 0), "_min_log": True}


#: The prepare kernel takes the batch size as an int32.
MAX_BATCH = 2**31 - 1


def _max_batch(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BATCH:
        raise ValueError(f"expected the largest batch size to support, 1..{MAX_BATCH}, got {v!r}")
    return {"_max_batch": v}


def _paged_kv(v: Any) -> dict[str, Any]:
    if v is False:
        return {"_page_size": None}
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PAGE_SIZE:
        raise ValueError(f"expected false or a page size in 1..{MAX_PAGE_SIZE}, got {v!r}")
    return {"_page_size": v}


def _sink(v: Any) -> dict[str, Any]:
    if v is False:
        return {"learnable_sink": "none"}
    if v not in SINK_DTYPES:
        raise ValueError(f"expected false or one of {list(SINK_DTYPES)}, got {v!r}")
    return {"learnable_sink": v}


def _softcap(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SOFTCAP:
        raise ValueError(f"expected a softcap value in 0..{MAX_SOFTCAP} (0: off), got {v!r}")
    return {"softcap": float(v)}


_COMMON_FWD_AXES = (
    Axis("dtype", _choice("dtype", DTYPES), ("bf16",), "element type of q, k, v, out"),
    Axis("head_dims", _pair("head_dim", "head_dim_v"), ((128, 128),), "(head_dim, head_dim_v) pairs"),
    Axis("qhead_per_kvhead", _posint("qhead_per_kvhead", 1, 256), (1,), "query heads per KV head (GQA ratio)"),
    Axis(
        "pack_gqa",
        _bool_or_auto("pack_gqa"),
        ("auto",),
        "pack query heads of one KV head into M (auto: qhead_per_kvhead > 1)",
    ),
    Axis("causal", _bool("causal"), (False,), "causal mask"),
    Axis("local", _bool("local"), (False,), "sliding-window (local) attention"),
    Axis("varlen_q", _bool("varlen_q"), (False,), "cu_seqlens_q (packed variable-length queries)"),
    Axis("varlen_k", _bool("varlen_k"), (False,), "cu_seqlens_k (packed variable-length keys)"),
    Axis("seqused_q", _bool("seqused_q"), (False,), "seqused_q (per-batch used query length)"),
    Axis("seqused_k", _bool("seqused_k"), (False,), "seqused_k (per-batch used key length, e.g. a KV cache)"),
    Axis("return_lse", _bool("has_lse"), (False,), "write the log-sum-exp"),
    Axis(
        "paged_kv",
        _paged_kv,
        (False,),
        "page table with this page size (FA4 loads pages by TMA when the size equals tile_n, by cp.async "
        "otherwise: two variants); false: no page table",
    ),
    Axis("learnable_sink", _sink, (False,), "learnable sink logits (nheads,) in this dtype; false: none"),
    Axis("softcap", _softcap, (0,), "softcap value, baked into the kernel: one variant per value (0: off)"),
)

FWD_SM100_AXES = _COMMON_FWD_AXES + (
    Axis("split_kv", _bool("split_kv"), (False,), "split-KV (writes fp32 partials for combine)"),
    Axis("tiles", _pair_or_auto("tile_m", "tile_n"), ("auto",), "(tile_m, tile_n); auto: FA4's choice"),
    Axis("q_stage", _choice("q_stage", (1, 2)), (1, 2), "Q tiles per CTA (FA4: 2 when seqlen_q*pack > tile_m)"),
    Axis("two_cta", _bool("two_cta"), (False, True), "2-CTA MMA (cluster 2x1)"),
    Axis("scheduler", _choice("scheduler", SCHEDULERS), ("static", "single", "dynamic"), "tile scheduler"),
    Axis("s_ping_pong", _bool_or_auto("s_ping_pong"), ("auto",), "S ping-pong (auto: FA4's rule)"),
)

FWD_SM90_AXES = _COMMON_FWD_AXES + (
    Axis("tiles", _pair_or_auto("tile_m", "tile_n"), ("auto",), "(tile_m, tile_n); auto: FA4's choice"),
    Axis(
        "mma_pv_is_rs",
        _bool_or_auto("mma_pv_is_rs"),
        ("auto",),
        "P from registers (true) or shared memory (false) in the PV MMA; auto: FA4's choice for the head dim",
    ),
)

#: SM120 has no split-KV, paged KV or sinks in FA4 (the rule rejects them with FA4's reason).
FWD_SM120_AXES = _COMMON_FWD_AXES + (
    Axis("tiles", _pair_or_auto("tile_m", "tile_n"), ("auto",), "(tile_m, tile_n); auto: FA4's choice"),
)

COMBINE_AXES = (
    Axis("dtype", _choice("dtype", COMBINE_DTYPES), ("bf16",), "output dtype (partials are fp32)"),
    Axis("head_dim", _posint("head_dim", 8, 512), (128,), "head dimension of the partials"),
    Axis("num_head", _posint("num_head", 1, 1024), (16,), "query heads (FA4 specializes varlen combine on it)"),
    Axis("max_splits", _max_splits, (128,), "largest split count to support"),
    Axis("varlen", _bool("varlen"), (False,), "cu_seqlens (packed variable-length)"),
    Axis("seqused", _bool("seqused"), (False,), "seqused (with varlen)"),
    Axis("return_lse", _bool("has_lse"), (False,), "write the combined log-sum-exp"),
    Axis("num_splits_dynamic", _bool("num_splits_dynamic"), (False,), "per-batch split counts from the prepare kernel"),
)

PREPARE_AXES = (
    Axis("heads", _pair("nheads", "nheads_kv", 1, 1024), ((16, 16),), "(nheads, nheads_kv)"),
    Axis("head_dims", _pair("headdim", "headdim_v"), ((128, 128),), "(head_dim, head_dim_v)"),
    Axis("tiles", _pair("tile_m", "tile_n"), ((128, 128),), "(tile_m, tile_n) of the forward it serves"),
    Axis("causal", _bool("causal"), (False,), "causal (adds num_nheads_in_l2)"),
    Axis("pack_gqa", _bool_or_auto("pack_gqa"), ("auto",), "pack_gqa (auto: nheads > nheads_kv)"),
    Axis("varlen_q", _bool("varlen_q"), (True,), "cu_seqlens_q"),
    Axis("seqused_q", _bool("seqused_q"), (False,), "seqused_q"),
    Axis("varlen_k", _bool("varlen_k"), (True,), "cu_seqlens_k"),
    Axis("seqused_k", _bool("seqused_k"), (False,), "seqused_k"),
    Axis("semaphore", _bool("has_semaphore"), (True,), "reset the tile_count_semaphore (FA4: unless CLC)"),
    Axis("max_batch", _max_batch, (992,), "largest batch to support (picks the warp-count buckets)"),
)


BWD_AXES = (
    Axis("dtype", _choice("dtype", DTYPES), ("bf16",), "element type of q, k, v, out, dout"),
    Axis("head_dims", _pair("head_dim", "head_dim_v"), ((128, 128),), "(head_dim, head_dim_v) pairs"),
    Axis("qhead_per_kvhead", _posint("qhead_per_kvhead", 1, 256), (1,), "query heads per KV head (GQA ratio)"),
    Axis("causal", _bool("causal"), (False,), "causal mask"),
    Axis("local", _bool("local"), (False,), "sliding-window (local) attention"),
    Axis("varlen_q", _bool("varlen_q"), (False,), "cu_seqlens_q (packed variable-length queries)"),
    Axis("varlen_k", _bool("varlen_k"), (False,), "cu_seqlens_k (packed variable-length keys)"),
    Axis("seqused_q", _bool("seqused_q"), (False,), "seqused_q (with cu_seqlens_q)"),
    Axis("seqused_k", _bool("seqused_k"), (False,), "seqused_k (with cu_seqlens_k)"),
    Axis(
        "deterministic",
        _bool("deterministic"),
        (False,),
        "FA4's deterministic backward (semaphore-ordered: bitwise reproducible gradients)",
    ),
    Axis("softcap", _softcap, (0,), "softcap value, baked into the kernels: one variant per value (0: off)"),
    Axis("dlse", _bool("has_dlse"), (False,), "a gradient flows into the returned LSE (FA4: return_lse=True)"),
    Axis("learnable_sink", _sink, (False,), "learnable sink logits (nheads,) in this dtype (dsink); false: none"),
)


def check_bwd(family: str) -> Callable[[dict[str, Any]], str | None]:
    from fa4aot.core.backward import check_call

    def check(f: dict[str, Any]) -> str | None:
        return check_call(family, f)

    return check


def _helper_check(f: dict[str, Any]) -> str | None:
    return "built as part of a bwd_sm90 / bwd_sm100 group, not listed on its own"


@dataclass(frozen=True)
class Family:
    """A kernel family: name, the arches it builds for, its axes and its validity rule.

    ``parts`` (backward groups): the kernel variants one valid field set stands for; a family
    without it is one kernel per field set."""

    name: str
    arches: tuple[str, ...]
    axes: tuple[Axis, ...]
    check: Callable[[dict[str, Any]], str | None]
    doc: str
    parts: Callable[[dict[str, Any]], list[tuple[str, dict[str, Any]]]] | None = None

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "fwd_sm100",
            ("sm_100a", "sm_103a"),
            FWD_SM100_AXES,
            check_fwd_sm100,
            "FA4 SM100 forward (FlashAttentionForwardSm100; sm_103a is its B300 build)",
        ),
        Family("fwd_sm90", ("sm_90a",), FWD_SM90_AXES, check_fwd_sm90, "FA4 SM90 forward (FlashAttentionForwardSm90)"),
        Family(
            "fwd_sm120",
            ("sm_120a",),
            FWD_SM120_AXES,
            check_fwd_sm120,
            "FA4 SM120 forward (FlashAttentionForwardSm120: the SM80 kernel within SM120's 99 KiB)",
        ),
        Family(
            "combine",
            # arch-neutral (cp.async); on SM120 it serves FA4's standalone flash_attn_combine
            ("sm_90a", "sm_100a", "sm_103a", "sm_120a"),
            COMBINE_AXES,
            check_combine,
            "FA4 split-KV combine (FlashAttentionForwardCombine)",
        ),
        Family(
            "prepare",
            # FA4's SM120 forward takes no scheduler metadata (and has no split-KV)
            ("sm_90a", "sm_100a", "sm_103a"),
            PREPARE_AXES,
            check_prepare,
            "FA4 scheduler-metadata prepare (FlashPrepareScheduler)",
        ),
        Family(
            "bwd_sm90",
            ("sm_90a",),
            BWD_AXES,
            check_bwd("bwd_sm90"),
            "FA4 SM90 backward: preprocess, FlashAttentionBackwardSm90, dQ (and GQA dK/dV) postprocess",
            parts=lambda f: _bwd_parts("bwd_sm90", f),
        ),
        Family(
            "bwd_sm100",
            ("sm_100a", "sm_103a"),
            BWD_AXES,
            check_bwd("bwd_sm100"),
            "FA4 SM100 backward: preprocess, FlashAttentionBackwardSm100, dQ (and GQA dK/dV) postprocess",
            parts=lambda f: _bwd_parts("bwd_sm100", f),
        ),
        Family(
            "bwd_pre",
            ("sm_90a", "sm_100a", "sm_103a"),
            (),
            _helper_check,
            "FA4 backward preprocess (FlashAttentionBackwardPreprocess), built by bwd_sm90 / bwd_sm100 groups",
        ),
        Family(
            "bwd_post",
            ("sm_90a", "sm_100a", "sm_103a"),
            (),
            _helper_check,
            "FA4 backward postprocess (FlashAttentionBackwardPostprocess), built by bwd_sm90 / bwd_sm100 groups",
        ),
    )
}


def _bwd_parts(family: str, f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    from fa4aot.core.backward import parts

    return [(p.family, p.field_dict) for p in parts(family, f)]


def resolve_fields(family: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn one product point of axis values into the concrete field dicts it stands for.

    Resolves ``auto`` the way FA4 does; for axes that stand for several concrete variants (the
    prepare kernel's batch buckets) returns one dict per variant.
    """
    f = dict(raw)
    if family in ("fwd_sm100", "fwd_sm90", "fwd_sm120"):
        if f["pack_gqa"] == "auto":
            f["pack_gqa"] = f["qhead_per_kvhead"] > 1
        page_size = f.pop("_page_size")
        if family == "fwd_sm120":
            if f["tile_m"] == "auto":
                f["tile_m"], f["tile_n"] = sm120_tile(f["head_dim"])
            f["paged_kv"] = paged_kv_class(page_size, f["tile_n"])
            return [f]
        if family == "fwd_sm90":
            tm, tn, rs, ov = sm90_tile(f["head_dim"], f["head_dim_v"], f["causal"], f["local"])
            if f["tile_m"] == "auto":
                f["tile_m"], f["tile_n"] = tm, tn
            if f["mma_pv_is_rs"] == "auto":
                f["mma_pv_is_rs"] = rs
            f["intra_wg_overlap"] = ov
            f["paged_kv"] = paged_kv_class(page_size, f["tile_n"])
            return [f]
        if f["tile_m"] == "auto":
            f["tile_m"] = 128
            f["tile_n"] = 64 if (f["split_kv"] and f["head_dim"] != f["head_dim_v"]) else 128
        f["paged_kv"] = paged_kv_class(page_size, f["tile_n"])
        if f["s_ping_pong"] == "auto":
            possible = sm100_s_ping_pong_possible(f)
            if f["split_kv"] and possible:
                return [dict(f, s_ping_pong=False), dict(f, s_ping_pong=True)]
            f["s_ping_pong"] = possible
        return [f]
    if family == "combine":
        _, _, min_log = combine_tiling(f["head_dim"])
        if f.pop("_min_log", False):
            f["log_max_splits"] = max(f["log_max_splits"], min_log)
        return [f]
    if family in ("bwd_sm90", "bwd_sm100", "bwd_pre", "bwd_post"):
        return [f]  # the helpers' check refuses them in a manifest
    if family == "prepare":
        if f["pack_gqa"] == "auto":
            f["pack_gqa"] = f["nheads"] > f["nheads_kv"]
        max_batch = f.pop("_max_batch")
        top = prepare_num_warps(max_batch)
        return [dict(f, num_warps=w) for w in PREPARE_WARPS if w <= top]
    raise KeyError(family)


def product(axes: tuple[Axis, ...], values: dict[str, list[Any]]) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (raw field dict, {axis name: item}) for every point of the axes' product."""
    names = [a.name for a in axes]
    lists = [values[n] for n in names]
    for combo in itertools.product(*lists):
        raw: dict[str, Any] = {}
        picked = {}
        for axis, item in zip(axes, combo):
            raw.update(axis.parse(item))
            picked[axis.name] = item
        yield raw, picked


#: A page size the manifest line for a cp.async variant names (any size other than tile_n builds
#: the same kernel; 16 is vLLM's default block size).
EXAMPLE_CPASYNC_PAGE_SIZE = 16


def group_for(variant: Variant) -> dict[str, Any]:
    """The manifest group (axis -> [value]) that builds exactly ``variant``; for error messages."""
    f = variant.fields
    out: dict[str, Any] = {}
    for axis in FAMILIES[variant.family].axes:
        if axis.name == "max_splits":
            out[axis.name] = [1 << f["log_max_splits"]]
        elif axis.name == "max_batch":
            out[axis.name] = [31 * f["num_warps"]]
        elif axis.name == "paged_kv":
            pages = {"none": False, "tma": f["tile_n"], "cpasync": EXAMPLE_CPASYNC_PAGE_SIZE}
            out[axis.name] = [pages[f["paged_kv"]]]
        elif axis.name == "learnable_sink":
            out[axis.name] = [False if f["learnable_sink"] == "none" else f["learnable_sink"]]
        else:
            try:
                probe = axis.parse([11, 22])  # a pair axis: learn which field is first
                out[axis.name] = [[f[k] for k, _ in sorted(probe.items(), key=lambda kv: kv[1])]]
            except ValueError:
                (key,) = axis.parse(axis.default[0]).keys()
                out[axis.name] = [f[key]]
    return out


def describe_missing(variant: Variant) -> str:
    """One-line YAML the user can add under ``families:`` to build ``variant``."""
    items = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in group_for(variant).items())
    note = ""
    if variant.fields.get("paged_kv") == "cpasync":
        note = f"; any page size but {variant.fields['tile_n']} builds this cp.async variant"
    return f"families.{variant.family}: - {{{items}}}  (target arch {variant.arch}, num_sms {variant.num_sms}{note})"


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    return str(v)
