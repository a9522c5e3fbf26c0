"""The forward families (``fwd_sm90``, ``fwd_sm100`` with its SwapAB decode kernel, ``fwd_sm120``):
what a variant is, how a manifest group expands, and the decision for one call - all through FA4's
own selector (:mod:`fa4aot.core.selector`) and the interface glue fa4aot restates
(:mod:`fa4aot.core.fa4_interface`).

A forward variant is FA4's compile key: the selected ``FwdConfig`` (field for field, FA4's names;
the split count only as split or not) plus the call's compile-time features (dtype, head dims, GQA
ratio, masks, varlen, paging, sink, softcap, which scheduler-metadata tensors the kernel reads).
The call's shapes reach a variant only through the config FA4 selects for them.

A manifest group names call features and, optionally, the shapes to expect (``batch``,
``seqlen_q``, ``seqlen_k``, ``nheads_kv``, ``window``; default: a grid from decode to long
prefill). Expanding it runs FA4's selector on every shape of that grid and keeps each distinct
config FA4 picks, narrowed by the filter axes (``q_stage``, ``two_cta``, ``scheduler``,
``s_ping_pong``, ``split_kv``, ``swapab``). Requests FA4's interface takes (``tiles``,
``mma_pv_is_rs``, ``pack_gqa``, ``num_splits``, ``sm100_backend``) are passed to the selector,
which validates them: a tiling FA4's default never picks is a *tuning candidate*.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

from fa4aot.core import fa4_interface as fi

#: The call features of a forward variant (fa4aot's names).
CALL_FIELDS = (
    *fi.ATTENTION_CALL_FIELDS,
    "has_lse",
    "paged_kv",
    "learnable_sink",
    "softcap",
    "descales",
    "mxfp8",
)
#: Which scheduler-metadata tensors the kernel reads (FA4's compile key: ``... is not None``).
METADATA_FIELDS = ("num_splits_dynamic", "tile_count_semaphore", "num_nheads_in_l2")

#: The default shape grid a group expands over (FA4's choices change at tile multiples, at
#: one-wave grid sizes and at the SwapAB / split thresholds; powers of two cross each).
DEFAULT_BATCH = (1, 4, 16, 64, 256)
DEFAULT_SEQLEN_Q = (1, 2, 4, 8, 16, 128, 1024, 4096, 16384)
DEFAULT_SEQLEN_K = (128, 1024, 4096, 16384, 65536, 131072)
DEFAULT_NHEADS_KV = (1, 4, 8, 32)
DEFAULT_WINDOWS = ((128, 0), (1024, 0), (4096, 4096))
#: Queries per sequence of a varlen grid point, as a fraction of max_seqlen_q: full batches and
#: padded ones (CUDA-graph slots, where FA4 routes to its dynamic varlen scheduler).
VARLEN_FILLS = (1.0, 0.125)


def scheduler_of(f: dict[str, Any]) -> str:
    """The tile scheduler a forward variant runs: ``clc``, ``dynamic`` (a tile semaphore:
    FA4's dynamic persistent scheduler), ``static`` (persistent) or ``single`` (one tile per CTA)."""
    if f.get("use_clc_scheduler"):
        return "clc"
    if f.get("tile_count_semaphore"):
        return "dynamic"
    if f.get("is_static_persistent"):
        return "static"
    return "single"


def paged_kind(page_size: int | None, config: Any) -> str:
    """``none``, ``tma`` (page size == tile_n, FA4's ``paged_kv_tma``) or ``cpasync``."""
    if page_size is None:
        return "none"
    return "tma" if page_size == config.tile_n else "cpasync"


def variant_fields(config: Any, f: fi.FwdFacts, plan: fi.FwdPlan, softcap: float, sink: str) -> dict[str, Any]:
    """The fields of the variant FA4 compiles for a call (its compile key, interface.py 1275-1330)."""
    causal, local, _, _ = fi.resolve_window(f.causal, f.window_left, f.window_right)
    out = fi.codegen_fields(config)
    out.update(
        dtype=f.dtype,
        head_dim=f.head_dim,
        head_dim_v=f.head_dim_v,
        qhead_per_kvhead=f.num_heads // f.num_heads_kv,
        causal=causal,
        local=local,
        varlen_q=f.varlen_q,
        varlen_k=f.varlen_k,
        seqused_q=f.seqused_q,
        seqused_k=f.seqused_k,
        has_lse=f.has_lse,
        paged_kv=paged_kind(f.page_size, config),
        learnable_sink=sink,
        softcap=float(softcap),
        num_splits_dynamic=plan.num_splits_dynamic,
        tile_count_semaphore=plan.tile_count_semaphore,
        num_nheads_in_l2=plan.num_nheads_in_l2,
    )
    # FP8's descale layouts and MXFP8's path exist only on those calls, so every other variant
    # keeps its id (interface.py 1267 and 1295-1296: both are part of FA4's compile key)
    if f.dtype in fi.FP8_DTYPES and f.mxfp8 is None:
        out["descales"] = f.descales or "none,none,none"
    if f.mxfp8 is not None:
        out["mxfp8"] = f.mxfp8
    return out


def companions(sel: Any, f: fi.FwdFacts, d: Decision) -> list[tuple[str, dict[str, Any]]]:
    """The kernels FA4 runs around a call's forward, as (family, fields): the prepare kernel
    when it prepares the scheduler metadata (interface.py 1073-1097, its compile key 4410-4436)
    and the split-KV combine (1717-1737, key 4200-4215)."""
    out: list[tuple[str, dict[str, Any]]] = []
    plan, c = d.plan, d.config
    if plan.num_splits > 1:
        combine = dict(
            dtype=fi.out_dtype(f.dtype, f.mxfp8),
            head_dim=f.head_dim_v,
            num_head=f.num_heads,
            log_max_splits=fi.combine_geometry(f.head_dim_v, plan.num_splits)[2],
            varlen=f.varlen_q,
            seqused=f.seqused_q,
            has_lse=f.has_lse,
            num_splits_dynamic=plan.num_splits_dynamic,
        )
        out.append(("combine", combine))
    if plan.prepare:
        options = fi.forward_prepare_options(sel, c, f.head_dim)
        prepare = fi.prepare_fields(
            f.batch, (f.num_heads, f.num_heads_kv), (f.head_dim, f.head_dim_v), (c.tile_m, c.tile_n),
            plan.num_nheads_in_l2, c.pack_gqa, plan.prepare_semaphore, options,
        )  # fmt: skip
        prepare.update(varlen_q=f.varlen_q, seqused_q=f.seqused_q, varlen_k=f.varlen_k, seqused_k=f.seqused_k)
        out.append(("prepare", prepare))
    return out


def call_problem(f: fi.FwdFacts) -> str | None:
    """Why FA4's interface refuses a call before it selects (None: it selects): its head-dim limits
    (alignment by V's element size, interface.py 790), FP8 and MXFP8 rules."""
    v_dtype = "bf16" if f.mxfp8 == "qk" else f.dtype
    why = fi.fp8_problem(f.arch // 10, f.dtype, f.requires_grad, f.descales, f.mxfp8)
    if why is None and f.mxfp8 is not None:
        why = fi.mxfp8_problem(f)
    return why or fi.head_dims_problem(f.arch // 10, f.head_dim, f.head_dim_v, v_dtype)


class Decision(NamedTuple):
    """The selector's answer for one call: the variant's fields and what the call does around
    the kernel."""

    fields: dict[str, Any]
    config: Any
    inputs: Any
    plan: fi.FwdPlan


def decide(sel: Any, f: fi.FwdFacts, knobs: fi.Knobs, softcap: float, sink: str, config: Any = None) -> Decision:
    """FA4's decision for a call: ``select_fwd_config`` on the call's inputs (or, for an explicit
    ``config``, FA4's ``validate_fwd_config``), then the interface's plan. Raises ValueError
    where FA4 rejects the call."""
    if (why := call_problem(f)) is not None:
        raise ValueError(why)
    inputs = fi.fwd_inputs(sel, f, knobs)
    if config is None:
        config = sel.select_fwd_config(inputs)
    else:
        if f.caller_metadata:
            raise ValueError("An explicit config cannot reuse caller-built scheduler_metadata")
        sel.validate_fwd_config(config, inputs)
    plan = fi.fwd_plan(sel, config, inputs, f)
    return finish(f, config, inputs, plan, softcap, sink)


def select_and_plan(sel: Any, f: fi.FwdFacts, knobs: fi.Knobs, select: Any) -> tuple[Any, fi.FwdPlan]:
    """The shape-dependent half of :func:`decide` (FA4's selection through ``select``, then the
    interface's plan), for :mod:`fa4aot.runtime.regions` to trace."""
    inputs = fi.fwd_inputs(sel, f, knobs)
    config = select(inputs)
    return config, fi.fwd_plan(sel, config, inputs, f)


def finish(f: fi.FwdFacts, config: Any, inputs: Any, plan: fi.FwdPlan, softcap: float, sink: str) -> Decision:
    """The rest of :func:`decide` once FA4 has chosen: the variant's fields (and SM120's limits)."""
    fields = variant_fields(config, f, plan, softcap, sink)
    if f.arch // 10 == 12 and (why := fi.sm120_problem(fields)) is not None:
        raise ValueError(why)
    return Decision(fields, config, inputs, plan)


# --------------------------------------------------------------------------------------------
# Manifest expansion
# --------------------------------------------------------------------------------------------


class Domain(NamedTuple):
    """The shapes a group expects (each a tuple of values)."""

    batch: tuple[int, ...] = DEFAULT_BATCH
    seqlen_q: tuple[int, ...] = DEFAULT_SEQLEN_Q
    seqlen_k: tuple[int, ...] = DEFAULT_SEQLEN_K
    nheads_kv: tuple[int, ...] = DEFAULT_NHEADS_KV
    window: tuple[tuple[int, int], ...] = DEFAULT_WINDOWS
    #: packed query tokens of varlen-Q calls (empty: full and padded batches, VARLEN_FILLS)
    total_q: tuple[int, ...] = ()


#: The filter axes: fa4aot's name -> how a variant's fields answer it.
FILTERS = {
    "q_stage": lambda f: f["q_stage"],
    "two_cta": lambda f: f["use_2cta_instrs"],
    "scheduler": scheduler_of,
    "s_ping_pong": lambda f: f["use_s_ping_pong"],
    "split_kv": lambda f: f["num_splits"] > 1,
    "swapab": lambda f: f["use_swapab"],
}


def _facts(arch: int, num_sms: int, p: dict[str, Any], b: int, sq: int, sk: int, hk: int, window, fill: float | int):
    """The facts of one grid point; ``fill``: the share of ``b * sq`` query tokens a varlen-Q call
    packs (a float), or their number (an int, the ``total_q`` axis)."""
    qh = p["qhead_per_kvhead"]
    varlen_q, varlen_k = p["varlen_q"], p["varlen_k"]
    page = p.get("_page_size")
    if not varlen_q:
        total_q = b * sq
    elif isinstance(fill, int):
        total_q = fill
    else:
        total_q = max(b, int(b * sq * fill))
    if page is not None:
        pages = -(-sk // page)
        k_capacity, total_k = pages * page, b * pages * page
    else:
        k_capacity = b * sk if varlen_k else sk
        total_k = b * sk
    wl, wr = window if p["local"] else (None, None)
    splits = p["num_splits"]
    return fi.FwdFacts(
        arch=arch,
        num_sms=num_sms,
        dtype=p["dtype"],
        head_dim=p["head_dim"],
        head_dim_v=p["head_dim_v"],
        num_heads=hk * qh,
        num_heads_kv=hk,
        batch=b,
        total_q=total_q,
        total_k=total_k,
        q_capacity=total_q if varlen_q else sq,
        k_capacity=k_capacity,
        max_seqlen_q=sq if (varlen_q or p["seqused_q"]) else None,
        max_seqlen_k=sk if (varlen_k or p["seqused_k"] or page is not None) else None,
        causal=p["causal"],
        window_left=wl,
        window_right=wr,
        varlen_q=varlen_q,
        varlen_k=varlen_k,
        seqused_q=p["seqused_q"],
        seqused_k=p["seqused_k"],
        page_size=page,
        caller_metadata=bool(p["scheduler_metadata"]),
        caller_semaphore=p["scheduler_metadata"] is True,
        caller_prepared=p["scheduler_metadata"] is True,
        softcap=bool(p["softcap"]),
        learnable_sink=p["learnable_sink"] != "none",
        has_lse=p["has_lse"],
        pack_gqa=p["pack_gqa"],
        num_splits=splits,
        requires_grad=p["requires_grad"],
        requested_tile=p.get("tiles"),
        requested_mma_pv_is_rs=p.get("mma_pv_is_rs"),
        descales=p.get("descales"),
        mxfp8=p.get("mxfp8"),
    )


class Expansion(NamedTuple):
    """What a forward group builds: the forward variants FA4 selects over its shapes, the
    kernels FA4 runs around them (combine, prepare: :func:`companions`), or why nothing."""

    forward: list[dict[str, Any]]
    around: list[tuple[str, dict[str, Any]]]
    reason: str | None


def expand(sel: Any, arch: str, num_sms: int, p: dict[str, Any], domain: Domain) -> Expansion:
    """Every variant FA4 selects for the call class ``p`` (parsed axis values) over ``domain``
    that passes ``p``'s filters, and the kernels it runs around them; with none, the reason
    (FA4's rejection, or the filter that leaves nothing). Memoised per process (expansion runs
    FA4's selector thousands of times)."""
    key = (id(sel), arch, num_sms, tuple(sorted((k, _hashable(v)) for k, v in p.items())), domain)
    return _expand_cached(key, sel, arch, num_sms, p, domain)


def _hashable(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return tuple(v) if isinstance(v, list) else v


_EXPANDED: dict[tuple, Expansion] = {}
#: Expansions kept per process (a manifest of 20,000 variants has far fewer group points).
MAX_EXPANDED = 4096


def _expand_cached(key, sel, arch, num_sms, p, domain) -> Expansion:
    hit = _EXPANDED.get(key)
    if hit is None:
        hit = _expand(sel, arch, num_sms, p, domain)
        if len(_EXPANDED) >= MAX_EXPANDED:
            _EXPANDED.pop(next(iter(_EXPANDED)))
        _EXPANDED[key] = hit
    return Expansion([dict(x) for x in hit.forward], [(n, dict(x)) for n, x in hit.around], hit.reason)


def _expand(sel: Any, arch: str, num_sms: int, p: dict[str, Any], domain: Domain) -> Expansion:
    a = fi.arch_number(arch)
    knobs = fi.Knobs(use_swapab=p["sm100_backend"])
    explicit = None
    if p.get("config") is not None:
        try:
            explicit = fi.as_fwd_config(sel, explicit_config(p["config"], a))
        except (TypeError, ValueError) as e:
            return Expansion([], [], f"config: {e}")
    found: dict[tuple, dict] = {}
    around: dict[tuple, tuple[str, dict]] = {}
    seen: set[tuple] = set()
    rejected: str | None = None
    filtered: str | None = None
    fills = (domain.total_q or VARLEN_FILLS) if p["varlen_q"] else (1.0,)
    windows = domain.window if p["local"] else ((None, None),)
    for b, sq, sk, hk, window, fill in itertools.product(
        domain.batch, domain.seqlen_q, domain.seqlen_k, domain.nheads_kv, windows, fills
    ):
        if p["varlen_q"] is False and p["seqused_q"] is False and fill != 1.0:
            continue
        facts = _facts(a, num_sms, p, b, sq, sk, hk, window, fill)
        if (why := call_problem(facts)) is not None:
            rejected = rejected or f"FA4 rejects it: {why}"
            continue
        try:
            inputs = fi.fwd_inputs(sel, facts, knobs)
            if explicit is None:
                config = sel.select_fwd_config(inputs)
            else:
                config = explicit
                sel.validate_fwd_config(config, inputs)
        except (ValueError, AssertionError, ZeroDivisionError) as e:
            rejected = rejected or f"FA4 rejects it: {e}"
            continue
        plan = fi.fwd_plan(sel, config, inputs, facts)
        # most points repeat a config: only a new (config, plan, mask, kernels around) is new
        mask = fi.resolve_window(facts.causal, facts.window_left, facts.window_right)[:2]
        seen_key = (config, plan, mask, hk, fi.prepare_num_warps(b) if plan.prepare else 0)
        if seen_key in seen:
            continue
        seen.add(seen_key)
        fields = variant_fields(config, facts, plan, p["softcap"], p["learnable_sink"])
        if (reason := candidate_problem(sel, arch, fields)) is not None:
            rejected = rejected or reason
            continue
        miss = next((n for n, want in p["_filters"].items() if FILTERS[n](fields) not in want), None)
        if miss is not None:
            filtered = filtered or miss
            continue
        found.setdefault(_key(fields), fields)
        for family, kfields in companions(sel, facts, Decision(fields, config, inputs, plan)):
            for extra in _covering(family, kfields):
                around.setdefault((family, _key(extra)), (family, extra))
    if found:
        return Expansion(list(found.values()), list(around.values()), None)
    if filtered is not None:
        wanted = {n: sorted(map(str, v)) for n, v in p["_filters"].items()}
        why = f"FA4 picks no config with {filtered} in {wanted[filtered]} for any shape of the group (filters {wanted})"
        return Expansion([], [], why)
    return Expansion([], [], rejected or "the group's shapes are empty")


def explicit_config(pairs: tuple[tuple[str, Any], ...], arch_number: int) -> dict[str, Any]:
    """The FwdConfig fields of a manifest's ``config`` axis value (sorted pairs, registers as
    pairs too), ``device_capacity`` defaulting to the target's."""
    fields = {k: (dict(v) if isinstance(v, tuple) else v) for k, v in pairs}
    fields.setdefault("device_capacity", arch_number // 10)
    return fields


def config_of(fields: dict[str, Any]) -> dict[str, Any]:
    """The FwdConfig fields a forward variant was compiled with, as a manifest's ``config`` axis
    value (``registers`` a mapping; ``device_capacity`` is the target's): every field that is
    neither a call feature nor a metadata flag."""
    out: dict[str, Any] = {}
    regs = {}
    for k, v in fields.items():
        if k.startswith("regs_"):
            regs[k[5:]] = v
        elif k not in CALL_FIELDS and k not in METADATA_FIELDS:
            out[k] = v
    out["registers"] = regs or None
    # FA4 keys its dynamic-varlen route out; the variant shows it as a semaphore without prepared
    # split counts (fa4_interface.fwd_plan)
    if fields.get("tile_count_semaphore") and not fields.get("num_splits_dynamic"):
        out["use_dynamic_varlen"] = True
    return out


def _key(fields: dict[str, Any]) -> tuple:
    return tuple(sorted(fields.items(), key=lambda kv: kv[0]))


def _covering(family: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    """A prepare kernel for every warp count up to the point's, so that every batch up to the
    domain's serves (the runtime picks the count by batch: ``prepare_num_warps``)."""
    if family != "prepare":
        return [fields]
    return [dict(fields, num_warps=w) for w in fi.PREPARE_WARPS if w <= fields["num_warps"]]


def is_tuning_candidate(sel: Any, arch: str, num_sms: int, fields: dict[str, Any]) -> bool:
    """True for a variant FA4's own selection never picks: its tiles or P operand source differ
    from what ``select_initial_fwd_tile`` gives its head dims and masks (fa4aot builds it only for
    ``fa4aot tune``)."""
    if fi.arch_number(arch) // 10 != 9:
        return False
    tm, tn, rs, _ = sel.select_sm90_tile(
        fields["head_dim"], fields["head_dim_v"], fields["causal"], fields["local"], None
    )
    return (fields["tile_m"], fields["tile_n"], fields["mma_pv_is_rs"]) != (tm, tn, rs)


#: FA4's SM90 forward double-buffers K and V and reserves 1 KiB for its mbarriers (checked against
#: the smem FA4's host code records in SM90 launch plans, tests/test_tuning.py).
SM90_KV_STAGES = 2
SM90_SMEM_RESERVED = 1024
#: tile_m values of FA4's SM90 forward (one MMA warp group per 64 rows, at most 3 of them), and
#: the tile_n step and range of its warpgroup MMA.
SM90_TILE_MS = (128, 192)
SM90_TILE_N_STEP = 16
SM90_TILE_N_RANGE = (64, 256)
#: Registers FA4's SM90 forward gives each MMA thread by warp-group count (``setmaxregister``,
#: flash_fwd_sm90.py), and what the rest of the kernel needs beyond the accumulators (ptxas
#: rejects 192x256 at head_dim 64: 160 accumulator registers of 160).
SM90_MMA_REGS = {1: 256, 2: 240, 3: 160}
SM90_REG_HEADROOM = 32


def sm90_smem_bytes(tile_m: int, tile_n: int, head_dim: int, head_dim_v: int, mma_pv_is_rs: bool = True) -> int:
    """Dynamic shared memory FA4's SM90 forward asks for with these tiles (2-byte elements);
    without ``mma_pv_is_rs`` P goes through a (tile_m, tile_n) shared buffer."""
    p = 0 if mma_pv_is_rs else tile_m * tile_n
    return 2 * (tile_m * head_dim + SM90_KV_STAGES * tile_n * (head_dim + head_dim_v) + p) + SM90_SMEM_RESERVED


def sm90_tile_problem(f: dict[str, Any], smem_limit: int) -> str | None:
    """Why a tiling cannot be a tuning candidate of FA4's SM90 forward (None: it can). tile_m 192
    (three MMA warp groups) is FA4's only up to head dim 96: above, the accumulators do not fit."""
    tile_m, tile_n, hd, hdv = f["tile_m"], f["tile_n"], f["head_dim"], f["head_dim_v"]
    if tile_m not in SM90_TILE_MS:
        return f"tile_m must be one of {SM90_TILE_MS}"
    if tile_m == 192 and hd > 96:
        return "tile_m 192 is FA4's SM90 tile only up to head_dim 96"
    lo, hi = SM90_TILE_N_RANGE
    if tile_n % SM90_TILE_N_STEP or not lo <= tile_n <= hi:
        return f"tile_n must be a multiple of {SM90_TILE_N_STEP} in {lo}..{hi}"
    wgs = tile_m // 64
    regs = tile_n // 2 + hdv // 2  # fp32 S and O accumulators per MMA thread
    if regs > SM90_MMA_REGS[wgs] - SM90_REG_HEADROOM:
        return (
            f"the S and O accumulators ({regs} registers a thread) leave too few of the "
            f"{SM90_MMA_REGS[wgs]} FA4 gives each of {wgs} MMA warp groups"
        )
    smem = sm90_smem_bytes(tile_m, tile_n, hd, hdv, f["mma_pv_is_rs"])
    if smem > smem_limit:
        return f"needs {smem} bytes of shared memory, more than the {smem_limit} an SM90 block can have"
    return None


def candidate_problem(sel: Any, arch: str, fields: dict[str, Any]) -> str | None:
    """Why a selected config cannot be built (None: it can): on SM120 what its kernel cannot
    compile (:func:`fa4aot.core.fa4_interface.sm120_problem`); on SM90 a requested tiling FA4
    never picks itself (a tuning candidate) that its kernel cannot run - ``validate_fwd_config``
    checks no shared memory or registers on SM90, so fa4aot's own rule checks them."""
    major = fi.arch_number(arch) // 10
    if major == 12:
        return fi.sm120_problem(fields)
    if major != 9 or not is_tuning_candidate(sel, arch, 0, fields):
        return None
    from fa4aot.core.targets import SMEM_OPTIN_227_KIB

    why = sm90_tile_problem(fields, SMEM_OPTIN_227_KIB)
    return None if why is None else f"tiles {fields['tile_m']}x{fields['tile_n']}: {why}"


def call_group(f: fi.FwdFacts, knobs: fi.Knobs = fi.NO_KNOBS, config: Any = None) -> dict[str, list[Any]]:
    """The manifest axes that pin one call beyond its variant's fields: its requests to FA4's
    selector (split count, pack_gqa, page size, training, tiles, the SM100 backend knob, an
    explicit ``config``) and its shapes - so that the manifest line a miss names builds this
    call's kernel again."""
    auto = "auto"
    out: dict[str, list[Any]] = {
        "num_splits": [auto if f.num_splits < 1 else f.num_splits],
        "pack_gqa": [auto if f.pack_gqa is None else f.pack_gqa],
        "requires_grad": [f.requires_grad],
        "batch": [f.batch],
        "seqlen_q": [f.max_seqlen_q if f.max_seqlen_q is not None else f.q_capacity],
        "seqlen_k": [f.max_seqlen_k if f.max_seqlen_k is not None else f.k_capacity],
        "nheads_kv": [f.num_heads_kv],
    }
    if f.varlen_q:  # FA4 routes padded varlen batches differently (its dynamic varlen scheduler)
        out["total_q"] = [f.total_q]
    if f.caller_metadata:
        out["scheduler_metadata"] = [True if f.caller_prepared else fi.UNPREPARED]
    if f.page_size is not None:
        out["paged_kv"] = [f.page_size]
    if f.requested_tile is not None:
        out["tiles"] = [list(f.requested_tile)]
    if f.requested_mma_pv_is_rs is not None:
        out["mma_pv_is_rs"] = [f.requested_mma_pv_is_rs]
    if knobs.use_swapab is not None:
        out["sm100_backend"] = ["swapab" if knobs.use_swapab else "standard"]
    if config is not None:
        out["config"] = [{k: v for k, v in fi.config_fields(config).items() if k not in fi.NOT_CODEGEN}]
    if f.window_left is not None or f.window_right is not None:
        big = max(f.q_capacity, f.k_capacity)
        # FA4 takes a negative side (a window short of the diagonal); the window axis (sizes for
        # FA4's selection, the kernel being the local one either way) takes 0 for it
        out["window"] = [
            [
                big if f.window_left is None else max(0, f.window_left),
                big if f.window_right is None else max(0, f.window_right),
            ]
        ]
    return out


def round_pow2(x: int) -> int:
    """The power of two at or above ``x`` (x >= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, x))))
