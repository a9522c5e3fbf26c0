"""Kernel families: their compile-time fields, manifest axes and FA4's validity rules.

Pure Python (no DSL, no torch), so the manifest expander, the build, the runtime dispatcher and the
tests all share one definition of what a variant of each family is. A forward family's variants
are what FA4 4.0.0b40's own selector picks for a group's calls over its shapes
(:mod:`fa4aot.core.fwd`); the checks here are the call combinations FA4's interface refuses
before it selects (:mod:`fa4aot.core.fa4_interface` restates them, naming FA4's lines); each
rejection carries a reason, so ``fa4aot plan`` can say why a combination was skipped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fa4aot.core import backward as backward_core
from fa4aot.core import fwd
from fa4aot.core.fa4_interface import (
    COMBINE_MAX_LOG_SPLITS,
    COMBINE_MAX_SPLITS,
    DESCALE_LAYOUTS,
    FP8_DTYPES,
    PREPARE_WARPS,
    UNPREPARED,
    combine_geometry,
    fp8_problem,
    head_dims_problem,
    prepare_num_warps,
)
from fa4aot.core.targets import ARCHES, arches_running
from fa4aot.core.variant import Variant

DTYPES = ("bf16", "fp16")
#: The SM100-family forward also takes FP8 q, k, v (FA4 interface.py 746, 858).
SM100_FWD_DTYPES = DTYPES + FP8_DTYPES
#: The ``scales`` axis's shorthands: FA4's TensorwiseScales with every descale in one layout, or
#: its MXFP8 BlockScales (``mxfp8_qk``: Q and K; ``mxfp8_pv``: Q, K and V).
SCALES_SHORTHANDS = {
    "none": {},
    "tensorwise": {"descales": "full,full,full"},
    "per_head": {"descales": "per_head,per_head,per_head"},
    "mxfp8_qk": {"mxfp8": "qk"},
    "mxfp8_pv": {"mxfp8": "pv"},
}
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


def _check_forward_common(f: dict[str, Any]) -> str | None:
    if f["qhead_per_kvhead"] < 1:
        return "qhead_per_kvhead must be >= 1"
    if f["causal"] and f["local"]:
        return "causal and local are exclusive (FA4 resolves a causal window to causal)"
    if f["_page_size"] is not None and f["varlen_k"]:
        return "FA4 does not take page_table with cu_seqlens_k (paged KV is indexed per batch entry)"
    return None


def check_fwd_call(arch_major: int) -> Callable[[dict[str, Any]], str | None]:
    """The checks FA4's interface makes on a forward call before it selects a config (its
    head-dim limits, ``_validate_head_dims``) and the argument combinations it refuses; the
    rest is FA4's selector's to say."""

    def check(f: dict[str, Any]) -> str | None:
        descales, mxfp8 = f.get("descales"), f.get("mxfp8")
        v_dtype = "bf16" if mxfp8 == "qk" else f["dtype"]
        return (
            fp8_problem(arch_major, f["dtype"], f["requires_grad"], descales, mxfp8)
            or head_dims_problem(arch_major, f["head_dim"], f["head_dim_v"], v_dtype)
            or _check_forward_common(f)
        )

    return check


def is_tuning_candidate(family: str, f: dict[str, Any]) -> bool:
    """True for a variant FA4's own selection never picks (another tiling of its SM90 kernel),
    built only for ``fa4aot tune`` to measure."""
    if family != "fwd_sm90":
        return False
    from fa4aot.core import fwd, selector

    return fwd.is_tuning_candidate(selector.installed(), "sm_90a", 0, f)


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


def _bool_or(field: str, other: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if v != other and not isinstance(v, bool):
            raise ValueError(f"expected true, false or {other}, got {v!r}")
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


def _num_splits(v: Any) -> dict[str, Any]:
    if v == "auto":
        return {"num_splits": 0}
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SPLITS_REQUEST:
        raise ValueError(f"expected auto (FA4's heuristic) or a split count in 1..{MAX_SPLITS_REQUEST}, got {v!r}")
    return {"num_splits": v}


def _backend(v: Any) -> dict[str, Any]:
    choices = {"auto": None, "swapab": True, "standard": False}
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"expected one of {list(choices)} (FLASH_ATTENTION_SM100_BACKEND), got {v!r}")
    return {"sm100_backend": choices[v]}


def _scales(v: Any) -> dict[str, Any]:
    """FA4's ``scales=``: a shorthand of :data:`SCALES_SHORTHANDS`, or a mapping {q, k, v} of
    descale layouts (:data:`fa4aot.core.fa4_interface.DESCALE_LAYOUTS`; a missing one: none)."""
    if isinstance(v, str) and v in SCALES_SHORTHANDS:
        return {"descales": None, "mxfp8": None, **SCALES_SHORTHANDS[v]}
    if isinstance(v, Mapping) and v and set(v) <= {"q", "k", "v"}:
        layouts = [v.get(n, "none") for n in "qkv"]
        if all(x in DESCALE_LAYOUTS for x in layouts):
            return {"descales": ",".join(layouts), "mxfp8": None}
    raise ValueError(
        f"expected one of {list(SCALES_SHORTHANDS)} or a mapping {{q, k, v}} of descale layouts "
        f"{list(DESCALE_LAYOUTS)}, got {v!r}"
    )


def scales_value(f: dict[str, Any]) -> Any:
    """The ``scales`` axis value that builds a forward variant's scales (the inverse of :func:`_scales`)."""
    if f.get("mxfp8"):
        return f"mxfp8_{f['mxfp8']}"
    layouts = f.get("descales")
    if not layouts or layouts == "none,none,none":
        return "none"
    same = {x for x in layouts.split(",")}
    if len(same) == 1:
        return {"full": "tensorwise", "per_head": "per_head"}[same.pop()]
    return dict(zip("qkv", layouts.split(",")))


def _request_pair(field: str) -> Callable[[Any], dict[str, Any]]:
    inner = _pair("tile_m", "tile_n", 1, 1024)

    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {field: None}
        d = inner(v)
        return {field: (d["tile_m"], d["tile_n"])}

    return parse


def _config(v: Any) -> dict[str, Any]:
    """An explicit FwdConfig (FA4's ``config=``): a mapping of its fields (``registers`` a mapping
    of the register roles or null; ``device_capacity`` may be left out), kept as sorted pairs.
    FA4's ``validate_fwd_config`` checks it when the group expands."""
    if v == "auto":
        return {"config": None}
    if not isinstance(v, Mapping) or not v or not all(isinstance(k, str) for k in v):
        raise ValueError(f"expected auto or a mapping of FwdConfig fields, got {v!r}")
    items = []
    for k, x in v.items():
        if k == "registers" and isinstance(x, Mapping):
            x = tuple(sorted(x.items()))
        elif not isinstance(x, (bool, int)) and not (k == "registers" and x is None):
            raise ValueError(f"config.{k}: expected an integer or true/false, got {x!r}")
        items.append((k, x))
    return {"config": tuple(sorted(items))}


def _request_bool(field: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {field: None}
        if not isinstance(v, bool):
            raise ValueError(f"expected true, false or auto, got {v!r}")
        return {field: v}

    return parse


def _ints(lo: int, hi: int) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v!r}")
        return {"value": v}

    return parse


def _window(v: Any) -> dict[str, Any]:
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEQLEN for x in v)
    ):
        raise ValueError(f"expected a pair [left, right] of window sizes in 0..{MAX_SEQLEN}, got {v!r}")
    return {"value": (v[0], v[1])}


def _filter(choices: Iterable[Any]) -> Callable[[Any], dict[str, Any]]:
    choices = tuple(choices)

    def parse(v: Any) -> dict[str, Any]:
        if v not in choices or isinstance(v, bool) != isinstance(choices[0], bool):
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return {"value": v}

    return parse


#: Largest split count a forward request may name (FA4's validate_fwd_config: 1..256).
MAX_SPLITS_REQUEST = 256
#: Largest sequence length a manifest's shape axes may name (FA4 counts positions in 32 bits).
MAX_SEQLEN = 2**31 - 1

_COMMON_FWD_AXES = (
    Axis("dtype", _choice("dtype", DTYPES), ("bf16",), "element type of q, k, v, out"),
    Axis("head_dims", _pair("head_dim", "head_dim_v"), ((128, 128),), "(head_dim, head_dim_v) pairs"),
    Axis("qhead_per_kvhead", _posint("qhead_per_kvhead", 1, 256), (1,), "query heads per KV head (GQA ratio)"),
    Axis("pack_gqa", _request_bool("pack_gqa"), ("auto",), "FA4's pack_gqa argument (auto: FA4 decides)"),
    Axis("causal", _bool("causal"), (False,), "causal mask"),
    Axis("local", _bool("local"), (False,), "sliding-window (local) attention (window sizes: the window axis)"),
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
        "otherwise); false: no page table",
    ),
    Axis("learnable_sink", _sink, (False,), "learnable sink logits (nheads,) in this dtype; false: none"),
    Axis("softcap", _softcap, (0,), "softcap value, baked into the kernel: one variant per value (0: off)"),
    Axis("num_splits", _num_splits, (1,), "FA4's num_splits argument: 1, a count, or auto (FA4's heuristic)"),
    Axis(
        "scheduler_metadata",
        _bool_or("scheduler_metadata", UNPREPARED),
        (False,),
        "the call passes scheduler metadata (fa4aot.SchedulerMetadata, varlen queries); unprepared: from "
        "get_scheduler_metadata where FA4 runs no prepare kernel (no split, not causal)",
    ),
    Axis("requires_grad", _bool("requires_grad"), (False,), "a training forward (FA4 selects for the backward)"),
    Axis("tiles", _request_pair("tiles"), ("auto",), "FA4's tile_mn argument (auto: FA4's choice); others: tuning"),
    Axis(
        "config",
        _config,
        ("auto",),
        "an explicit FwdConfig (FA4's config= argument), a mapping of its fields; auto: FA4 selects",
    ),
)

FWD_SM100_AXES = tuple(
    Axis("dtype", _choice("dtype", SM100_FWD_DTYPES), ("bf16",), "element type of q, k, v (FP8: out is bf16)")
    if a.name == "dtype"
    else a
    for a in _COMMON_FWD_AXES
) + (
    Axis(
        "scales",
        _scales,
        ("none",),
        "FA4's scales=: none; tensorwise or per_head (FP8 descales, one fp32 per (batch, kv head) or per kv "
        "head), or a mapping {q, k, v} of those layouts; mxfp8_qk / mxfp8_pv (MXFP8 block scales)",
    ),
    Axis(
        "sm100_backend",
        _backend,
        ("auto",),
        "FLASH_ATTENTION_SM100_BACKEND: auto (FA4 picks SwapAB for decode where it measured it faster), "
        "swapab (wherever it can run), standard (never)",
    ),
)

FWD_SM90_AXES = _COMMON_FWD_AXES + (
    Axis(
        "mma_pv_is_rs",
        _request_bool("mma_pv_is_rs"),
        ("auto",),
        "FA4's mma_pv_is_rs argument: P from registers (true) or shared memory (false); auto: FA4's choice",
    ),
)

FWD_SM120_AXES = _COMMON_FWD_AXES

#: The shapes a forward group expects: the selector runs on every point of their product.
FWD_DOMAIN_AXES = (
    Axis("batch", _ints(1, 1 << 20), fwd.DEFAULT_BATCH, "batch sizes to expect"),
    Axis("seqlen_q", _ints(1, MAX_SEQLEN), fwd.DEFAULT_SEQLEN_Q, "query lengths (max_seqlen_q) to expect"),
    Axis("seqlen_k", _ints(1, MAX_SEQLEN), fwd.DEFAULT_SEQLEN_K, "key lengths (max_seqlen_k) to expect"),
    Axis("nheads_kv", _ints(1, 1 << 16), fwd.DEFAULT_NHEADS_KV, "KV head counts to expect"),
    Axis("window", _window, fwd.DEFAULT_WINDOWS, "[left, right] window sizes to expect (with local)"),
    Axis(
        "total_q",
        _ints(1, MAX_SEQLEN),
        (),
        "packed query tokens to expect (varlen_q; default: full batches and an eighth of them)",
    ),
)

#: The shapes a backward group expects (SM100's query-head fold depends on them).
BWD_DOMAIN_AXES = (
    Axis("batch", _ints(1, 1 << 20), backward_core.DEFAULT_BATCH, "batch sizes to expect"),
    Axis("seqlen_q", _ints(1, MAX_SEQLEN), backward_core.DEFAULT_SEQLEN, "query lengths to expect"),
    Axis("seqlen_k", _ints(1, MAX_SEQLEN), backward_core.DEFAULT_SEQLEN, "key lengths to expect"),
    Axis("nheads_kv", _ints(1, 1 << 16), backward_core.DEFAULT_NHEADS_KV, "KV head counts to expect"),
)

#: Filters on what FA4 selects: keep only configs with these values.
FWD_FILTER_AXES = (
    Axis("q_stage", _filter((1, 2)), (), "Q tiles per CTA"),
    Axis("two_cta", _filter((False, True)), (), "2-CTA MMA (cluster 2x1)"),
    Axis("scheduler", _filter(("static", "single", "dynamic", "clc")), (), "tile scheduler"),
    Axis("s_ping_pong", _filter((False, True)), (), "S ping-pong"),
    Axis("split_kv", _filter((False, True)), (), "split-KV (fp32 partials for the combine)"),
    Axis("swapab", _filter((False, True)), (), "FA4's SM100 SwapAB decode kernel"),
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
    Axis(
        "swapab",
        _bool("_swapab"),
        (False,),
        "the split rule of FA4's SwapAB decode kernel (SWAPAB.split_policy for the head dim)",
    ),
)


BWD_AXES = (
    Axis("dtype", _choice("dtype", DTYPES), ("bf16",), "element type of q, k, v, out, dout"),
    Axis("head_dims", _pair("head_dim", "head_dim_v"), ((128, 128),), "(head_dim, head_dim_v) pairs"),
    Axis("qhead_per_kvhead", _posint("qhead_per_kvhead", 1, 256), (1,), "query heads per KV head (GQA ratio)"),
    Axis("causal", _bool("causal"), (False,), "causal mask"),
    Axis("local", _bool("local"), (False,), "sliding-window (local) attention"),
    Axis("varlen_q", _bool("varlen_q"), (False,), "cu_seqlens_q (packed variable-length queries)"),
    Axis("varlen_k", _bool("varlen_k"), (False,), "cu_seqlens_k (packed variable-length keys)"),
    Axis("seqused_q", _bool("seqused_q"), (False,), "seqused_q (per-batch used query length)"),
    Axis("seqused_k", _bool("seqused_k"), (False,), "seqused_k (per-batch used key length)"),
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


def check_bwd(family: str, arch: str = "") -> Callable[[dict[str, Any]], str | None]:
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
    #: selector families: the shape axes (not a product: the domain FA4's selector runs over)
    #: and the filter axes (keep what FA4 selects with these values)
    domain_axes: tuple[Axis, ...] = ()
    filter_axes: tuple[Axis, ...] = ()

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def domain_axis(self, name: str) -> Axis | None:
        return next((a for a in self.domain_axes if a.name == name), None)

    def filter_axis(self, name: str) -> Axis | None:
        return next((a for a in self.filter_axes if a.name == name), None)

    @property
    def selected(self) -> bool:
        """Its variants come from FA4's selector one per config (forward families; the backward
        ones select too, but a config stands for several kernels: ``parts``)."""
        return bool(self.domain_axes) and self.parts is None


#: The arches fa4aot builds a backward for (their helper kernels with it).
BACKWARD_ARCHES = tuple(a.name for a in ARCHES.values() if a.backward)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "fwd_sm100",
            arches_running("fwd_sm100"),
            FWD_SM100_AXES,
            check_fwd_call(10),
            "FA4 SM100 forward (FlashAttentionForwardSm100, and FlashAttentionForwardSm100SwapAB for decode; "
            "sm_103a is its B300 build)",
            domain_axes=FWD_DOMAIN_AXES,
            filter_axes=FWD_FILTER_AXES,
        ),
        Family(
            "fwd_sm90",
            arches_running("fwd_sm90"),
            FWD_SM90_AXES,
            check_fwd_call(9),
            "FA4 SM90 forward (FlashAttentionForwardSm90)",
            domain_axes=FWD_DOMAIN_AXES,
            filter_axes=FWD_FILTER_AXES,
        ),
        Family(
            "fwd_sm120",
            arches_running("fwd_sm120"),
            FWD_SM120_AXES,
            check_fwd_call(12),
            "FA4 SM120 forward (FlashAttentionForwardSm120: the SM80 kernel within SM120's 99 KiB)",
            domain_axes=FWD_DOMAIN_AXES,
            filter_axes=FWD_FILTER_AXES,
        ),
        Family(
            "combine",
            # arch-neutral (cp.async); on SM120 it serves FA4's standalone flash_attn_combine
            tuple(ARCHES),
            COMBINE_AXES,
            check_combine,
            "FA4 split-KV combine (FlashAttentionForwardCombine)",
        ),
        Family(
            "prepare",
            tuple(a.name for a in ARCHES.values() if a.scheduler_metadata),
            PREPARE_AXES,
            check_prepare,
            "FA4 scheduler-metadata prepare (FlashPrepareScheduler)",
        ),
        Family(
            "bwd_sm90",
            arches_running("bwd_sm90"),
            BWD_AXES,
            check_bwd("bwd_sm90"),
            "FA4 SM90 backward: preprocess, FlashAttentionBackwardSm90, dQ (and GQA dK/dV) postprocess",
            parts=lambda f: _bwd_parts("bwd_sm90", f),
            domain_axes=BWD_DOMAIN_AXES,
        ),
        Family(
            "bwd_sm100",
            arches_running("bwd_sm100"),
            BWD_AXES,
            check_bwd("bwd_sm100"),
            "FA4 SM100 backward: preprocess, FlashAttentionBackwardSm100, dQ (and GQA dK/dV) postprocess",
            parts=lambda f: _bwd_parts("bwd_sm100", f),
            domain_axes=BWD_DOMAIN_AXES,
        ),
        Family(
            "bwd_pre",
            BACKWARD_ARCHES,
            (),
            _helper_check,
            "FA4 backward preprocess (FlashAttentionBackwardPreprocess), built by bwd_sm90 / bwd_sm100 groups",
        ),
        Family(
            "bwd_post",
            BACKWARD_ARCHES,
            (),
            _helper_check,
            "FA4 backward postprocess (FlashAttentionBackwardPostprocess), built by bwd_sm90 / bwd_sm100 groups",
        ),
    )
}


def _bwd_parts(family: str, f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every kernel FA4's backward launches for a call of this group, for each config FA4's
    selector picks over the group's shapes (``_arch`` / ``_num_sms``: the target's)."""
    from fa4aot.core import backward, selector

    call = {k: f[k] for k in backward.CALL_FIELDS}
    found, why = backward.expand(selector.installed(), family, f["_arch"], f["_num_sms"], call, f.get("_domain"))
    if not found:
        raise ValueError(why or "FA4 selects no backward configuration for this group")
    out: list[tuple[str, dict[str, Any]]] = []
    for ps in found:
        out += [(p.family, p.field_dict) for p in ps]
    return out


def resolve_fields(family: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn one product point of axis values into the concrete field dicts it stands for.

    Resolves ``auto`` the way FA4 does; for axes that stand for several concrete variants (the
    prepare kernel's batch buckets) returns one dict per variant.
    """
    f = dict(raw)
    if family == "combine":
        min_log = combine_geometry(f["head_dim"], 1)[2]
        if f.pop("_min_log", False):
            f["log_max_splits"] = max(f["log_max_splits"], min_log)
        return [f]
    if family in ("bwd_sm90", "bwd_sm100", "bwd_pre", "bwd_post"):
        return [f]  # the helpers' check refuses them in a manifest
    if family == "prepare":
        if f["pack_gqa"] == "auto":
            f["pack_gqa"] = f["nheads"] > f["nheads_kv"]
        f["ctas_per_sm"], f["floor_ctas"], f["floor_blocks"] = (1, 0, 0)
        if f.pop("_swapab"):
            from fa4aot.core import selector

            policy = selector.installed().SWAPAB.split_policy(f["headdim"])
            f["ctas_per_sm"] = policy["ctas_per_sm"]
            f["floor_ctas"], f["floor_blocks"] = policy["min_blocks_floor"] or (0, 0)
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


#: A forward variant's field for each call axis whose parsed field name differs.
_FWD_AXIS_FIELDS = {"return_lse": "has_lse"}


def _example_page(f: dict[str, Any]) -> int | bool:
    """A page size that takes this forward variant's K/V path: tile_n for TMA; for cp.async
    another size the kernel takes (FA4's SwapAB kernel pages in multiples of 128)."""
    if f["paged_kv"] == "none":
        return False
    if f["paged_kv"] == "tma":
        return f["tile_n"]
    if f.get("use_swapab"):
        return 128 if f["tile_n"] != 128 else 256
    return EXAMPLE_CPASYNC_PAGE_SIZE


def group_for(variant: Variant, shapes: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The manifest group (axis -> [value]) that builds ``variant``; for error messages. A forward
    variant is what FA4 selects for a call: its group names the call's features and, given
    ``shapes`` (:func:`fa4aot.core.fwd.call_group`: the call's requests and shapes), those;
    without them, the config itself (the ``config`` axis)."""
    f = variant.fields
    fam = FAMILIES[variant.family]
    if fam.selected:
        out: dict[str, Any] = {}
        for name in ("dtype", "head_dims", "qhead_per_kvhead", "causal", "local", "varlen_q", "varlen_k",
                     "seqused_q", "seqused_k", "return_lse", "paged_kv", "learnable_sink", "softcap"):  # fmt: skip
            if name == "head_dims":
                out[name] = [[f["head_dim"], f["head_dim_v"]]]
            elif name == "paged_kv":
                out[name] = [_example_page(f)]
            elif name == "learnable_sink":
                out[name] = [False if f["learnable_sink"] == "none" else f["learnable_sink"]]
            else:
                out[name] = [f[_FWD_AXIS_FIELDS.get(name, name)]]
        if "descales" in f or "mxfp8" in f:
            out["scales"] = [scales_value(f)]
        if shapes is None:  # no call to select it again: pin FA4's config itself
            out["config"] = [fwd.config_of(f)]
        elif f["num_splits"] > 1:
            out["num_splits"] = ["auto"]
        out.update(shapes or {})
        return out
    out = {}
    for axis in fam.axes:
        if axis.name == "max_splits":
            out[axis.name] = [1 << f["log_max_splits"]]
        elif axis.name == "max_batch":
            out[axis.name] = [31 * f["num_warps"]]
        elif axis.name == "paged_kv":
            pages = {"none": False, "tma": f["tile_n"], "cpasync": EXAMPLE_CPASYNC_PAGE_SIZE}
            out[axis.name] = [pages[f["paged_kv"]]]
        elif axis.name == "learnable_sink":
            out[axis.name] = [False if f["learnable_sink"] == "none" else f["learnable_sink"]]
        elif axis.name == "swapab" and variant.family == "prepare":
            out[axis.name] = [bool(f.get("floor_ctas"))]
        else:
            try:
                probe = axis.parse([11, 22])  # a pair axis: learn which field is first
                out[axis.name] = [[f[k] for k, _ in sorted(probe.items(), key=lambda kv: kv[1])]]
            except ValueError:
                (key,) = axis.parse(axis.default[0]).keys()
                out[axis.name] = [f[key]]
    return out
