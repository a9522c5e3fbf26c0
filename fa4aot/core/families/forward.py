"""Home of the forward families (``fwd_sm90``, ``fwd_sm100`` with its SwapAB decode kernel,
``fwd_sm120``): their manifest axes and the call checks FA4's interface makes before it selects,
the tensors a forward kernel takes (FA4's ``_flash_attn_fwd`` layouts), sample sizes and
scalars, and the grid each kernel's tile scheduler gives (re-derived by hand from FA4 4.0.0b40's
``tile_scheduler.py`` and the kernels' ``__call__``, an oracle for the launch plans, which run
FA4's own host code). Which config FA4 selects is FA4's own selector's (:mod:`fa4aot.core.fwd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fa4aot.core import fwd
from fa4aot.core.fa4_interface import (
    TENSORMAP_WORDS,
    UNPREPARED,
    fp8_problem,
    head_dims_problem,
    mxfp8_scale_count,
    out_dtype,
    tensormap_workspace_ctas,
)
from fa4aot.core.families import axes as ax
from fa4aot.core.families.base import FORWARD, Family, cdiv, packed
from fa4aot.core.layouts import Dims, TensorLayout, contiguous
from fa4aot.core.targets import arches_running
from fa4aot.core.variant import Variant


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


_COMMON_FWD_AXES = (
    ax.Axis("dtype", ax.choice("dtype", ax.DTYPES), ("bf16",), "element type of q, k, v, out"),
    ax.HEAD_DIMS,
    ax.QHEAD_PER_KVHEAD,
    ax.Axis("pack_gqa", ax.request_bool("pack_gqa"), ("auto",), "FA4's pack_gqa argument (auto: FA4 decides)"),
    ax.CAUSAL,
    ax.flag("local", False, "sliding-window (local) attention (window sizes: the window axis)"),
    ax.VARLEN_Q,
    ax.VARLEN_K,
    ax.SEQUSED_Q,
    ax.SEQUSED_K,
    ax.flag("return_lse", False, "write the log-sum-exp", "has_lse"),
    ax.Axis(
        "paged_kv",
        ax.paged_kv,
        (False,),
        "page table with this page size (FA4 loads pages by TMA when the size equals tile_n, by cp.async "
        "otherwise); false: no page table",
    ),
    ax.LEARNABLE_SINK,
    ax.SOFTCAP,
    ax.Axis("num_splits", ax.num_splits, (1,), "FA4's num_splits argument: 1, a count, or auto (FA4's heuristic)"),
    ax.Axis(
        "scheduler_metadata",
        ax.bool_or("scheduler_metadata", UNPREPARED),
        (False,),
        "the call passes scheduler metadata (fa4aot.SchedulerMetadata, varlen queries); unprepared: from "
        "get_scheduler_metadata where FA4 runs no prepare kernel (no split, not causal)",
    ),
    ax.flag("requires_grad", False, "a training forward (FA4 selects for the backward)"),
    ax.Axis(
        "tiles", ax.request_pair("tiles"), ("auto",), "FA4's tile_mn argument (auto: FA4's choice); others: tuning"
    ),
    ax.Axis(
        "config",
        ax.config,
        ("auto",),
        "an explicit FwdConfig (FA4's config= argument), a mapping of its fields; auto: FA4 selects",
    ),
)

FWD_SM100_AXES = tuple(
    ax.Axis("dtype", ax.choice("dtype", ax.SM100_FWD_DTYPES), ("bf16",), "element type of q, k, v (FP8: out is bf16)")
    if a.name == "dtype"
    else a
    for a in _COMMON_FWD_AXES
) + (
    ax.Axis(
        "scales",
        ax.scales,
        ("none",),
        "FA4's scales=: none; tensorwise or per_head (FP8 descales, one fp32 per (batch, kv head) or per kv "
        "head), or a mapping {q, k, v} of those layouts; mxfp8_qk / mxfp8_pv (MXFP8 block scales)",
    ),
    ax.Axis(
        "sm100_backend",
        ax.backend,
        ("auto",),
        "FLASH_ATTENTION_SM100_BACKEND: auto (FA4 picks SwapAB for decode where it measured it faster), "
        "swapab (wherever it can run), standard (never)",
    ),
)

FWD_SM90_AXES = _COMMON_FWD_AXES + (
    ax.Axis(
        "mma_pv_is_rs",
        ax.request_bool("mma_pv_is_rs"),
        ("auto",),
        "FA4's mma_pv_is_rs argument: P from registers (true) or shared memory (false); auto: FA4's choice",
    ),
)

FWD_SM120_AXES = _COMMON_FWD_AXES

#: The shapes a forward group expects: the selector runs on every point of their product.
FWD_DOMAIN_AXES = (
    *ax.shape_axes(fwd.DEFAULT_BATCH, fwd.DEFAULT_SEQLEN_Q, fwd.DEFAULT_SEQLEN_K, fwd.DEFAULT_NHEADS_KV),
    ax.Axis("window", ax.window, fwd.DEFAULT_WINDOWS, "[left, right] window sizes to expect (with local)"),
    ax.Axis(
        "total_q",
        ax.ints(1, ax.MAX_SEQLEN),
        (),
        "packed query tokens to expect (varlen_q; default: full batches and an eighth of them)",
    ),
)

#: Filters on what FA4 selects: keep only configs with these values.
FWD_FILTER_AXES = (
    ax.Axis("q_stage", ax.filter_values((1, 2)), (), "Q tiles per CTA"),
    ax.Axis("two_cta", ax.filter_values((False, True)), (), "2-CTA MMA (cluster 2x1)"),
    ax.Axis("scheduler", ax.filter_values(ax.SCHEDULERS), (), "tile scheduler"),
    ax.Axis("s_ping_pong", ax.filter_values((False, True)), (), "S ping-pong"),
    ax.Axis("split_kv", ax.filter_values((False, True)), (), "split-KV (fp32 partials for the combine)"),
    ax.Axis("swapab", ax.filter_values((False, True)), (), "FA4's SM100 SwapAB decode kernel"),
)


#: A page size for cp.async paged variants, in samples and the manifest lines that name one (any
#: size other than tile_n builds the same kernel; 16 is vLLM's default block size).
EXAMPLE_CPASYNC_PAGE_SIZE = 16


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
        "q": contiguous(dt, *qrows, h, d.head_dim),
        "k": contiguous(dt, *krows, hk, d.head_dim),
        "v": contiguous("bf16" if mx == "qk" else dt, *krows, hk, d.head_dim_v),
    }
    out.update(scale_tensors(f, d))
    lse_shape = (h, tq) if f["varlen_q"] else (b, h, d.seqlen_q)
    if split:  # the kernel writes FA4's fp32 partials; combine reduces them into the real out
        out["out"] = contiguous("fp32", d.num_splits, *qrows, h, d.head_dim_v)
        out["lse"] = contiguous("fp32", d.num_splits, *lse_shape)
    else:
        out["out"] = contiguous(out_dtype(dt, mx), *qrows, h, d.head_dim_v)
        if f["has_lse"]:
            out["lse"] = contiguous("fp32", *lse_shape)
    if f["varlen_q"]:
        out["cu_seqlens_q"] = contiguous("int32", b + 1)
    if f["varlen_k"]:
        out["cu_seqlens_k"] = contiguous("int32", b + 1)
    if f["seqused_q"]:
        out["seqused_q"] = contiguous("int32", b)
    if f["seqused_k"]:
        out["seqused_k"] = contiguous("int32", b)
    if paged:
        out["page_table"] = contiguous("int32", b, max_pages)
    if f.get("learnable_sink", "none") != "none":
        out["learnable_sink"] = contiguous(f["learnable_sink"], h)
    if f.get("num_splits_dynamic"):
        out["num_splits_dynamic"] = contiguous("int32", b)
    if f.get("tile_count_semaphore"):
        out["tile_count_semaphore"] = contiguous("int32", 1)
    if f.get("num_nheads_in_l2"):
        out["num_nheads_in_l2"] = contiguous("int32", b)
    if needs_workspace(variant):
        slots = tensormap_workspace_ctas(
            f["pack_gqa"], f["tile_m"], h, hk, num_sms or variant.num_sms, qrows[0] if f["varlen_q"] else b * d.seqlen_q,
            b, max(d.num_splits, 1),
        )  # fmt: skip
        out["tensormap_workspace"] = contiguous("int64", slots, TENSORMAP_WORDS)
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
            out[name] = contiguous("fp32", b, hk)
        elif layout == "per_head":
            out[name] = TensorLayout("fp32", (b, hk), (0, 1))
    mx = f.get("mxfp8")
    if mx:
        out["sf_q"] = contiguous("e8m0", mxfp8_scale_count(b, h, d.seqlen_q, d.head_dim))
        out["sf_k"] = contiguous("e8m0", mxfp8_scale_count(b, hk, d.seqlen_k, d.head_dim))
        if mx == "pv":  # V is scaled along the keys
            out["sf_v"] = contiguous("e8m0", mxfp8_scale_count(b, hk, d.head_dim_v, d.seqlen_k))
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
    num_block = cdiv(seqlen_q * pack, tile * cm)  # clusters of work
    if f["varlen_q"] or f["seqused_q"]:
        tq = (packed(total_q, batch, seqlen_q) if f["varlen_q"] else batch * seqlen_q) * pack
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
        tq = (packed(total_q, batch, seqlen_q) if f["varlen_q"] else batch * seqlen_q) * pack
        return ((tq + batch * (tile - 1)) // tile * heads, 1, 1)
    num_block = cdiv(seqlen_q * pack, tile)
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
    return (cdiv(seqlen_q * pack, f["tile_m"]), nheads_kv if f["pack_gqa"] else nheads, batch)


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


def forward_group(variant: Variant, shapes: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The manifest group (axis -> [value]) that builds a forward variant, for error messages: what
    FA4 selects for a call, so its group names the call's features and, given ``shapes``
    (:func:`fa4aot.core.fwd.call_group`: the call's requests and shapes), those; without them,
    the config itself (the ``config`` axis)."""
    f = variant.fields
    out: dict[str, Any] = {}
    for name in ("dtype", "head_dims", "qhead_per_kvhead", "causal", "local", "varlen_q", "varlen_k",
                 "seqused_q", "seqused_k", "return_lse", "paged_kv", "learnable_sink", "softcap"):  # fmt: skip
        if name == "head_dims":
            out[name] = [[f["head_dim"], f["head_dim_v"]]]
        elif name == "paged_kv":
            out[name] = [_example_page(f)]
        elif name == "learnable_sink":
            out[name] = [ax.sink_value(f)]
        else:
            out[name] = [f[_FWD_AXIS_FIELDS.get(name, name)]]
    if "descales" in f or "mxfp8" in f:
        out["scales"] = [ax.scales_value(f)]
    if shapes is None:  # no call to select it again: pin FA4's config itself
        out["config"] = [fwd.config_of(f)]
    elif f["num_splits"] > 1:
        out["num_splits"] = ["auto"]
    out.update(shapes or {})
    return out


def forward_dims(variant: Variant) -> dict[str, Any]:
    """Representative sizes of a forward variant's calls: its head dims and GQA ratio, a decode
    length for its decode kernels, a page size for its K/V path."""
    f = variant.fields
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
        base["page_size"] = EXAMPLE_CPASYNC_PAGE_SIZE
    return base


#: The window of sample calls of local variants.
SAMPLE_WINDOW = (128, 0)


def forward_scalars(with_max_seqlen_q: bool) -> Callable[[Variant, Dims], dict[str, Any]]:
    """The scalars of a sample forward call (SM100's kernel also takes max_seqlen_q)."""

    def scalars(variant: Variant, d: Dims) -> dict[str, Any]:
        out: dict[str, Any] = {"softmax_scale": 1.0 / math.sqrt(d.head_dim)}
        if with_max_seqlen_q:
            out["max_seqlen_q"] = d.seqlen_q
        if variant.fields["local"]:
            out["window_size_left"], out["window_size_right"] = SAMPLE_WINDOW
        return out

    return scalars


def _shape(s: dict[str, int]) -> dict[str, Any]:
    return {k: s.get(k) for k in ("batch", "seqlen_q", "nheads", "nheads_kv", "total_q")}


def forward_pointers(shifted_varlen_out: bool) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, int]]:
    """The addresses a forward kernel's parameters hold as they are: Q, K, V, O's bases. SM90
    stores varlen O through a ragged TMA view whose base is shifted back by 2**30 rows (quack's
    ``create_ragged_tensor_for_tma(ptr_shift=True)``)."""

    def pointers(f: dict[str, Any], named: dict[str, Any]) -> dict[str, int]:
        out = {name: named[name].ptr for name in ("q", "k", "v", "out")}
        if shifted_varlen_out and f["varlen_q"]:
            o = named["out"]
            out["out"] = (o.ptr - (1 << 30) * o.strides[0] * 2) % (1 << 64)
        return out

    return pointers


def two_cta_cluster(f: dict[str, Any]) -> tuple[int, ...] | None:
    """FA4 launches a 2-CTA MMA variant in (2, 1, 1) clusters."""
    return (2, 1, 1) if f.get("use_2cta_instrs") else None


#: What FA4's forward kernels are called in a cubin (a prefix: FlashAttentionForwardSm90, ...),
#: and its SwapAB decode kernel (``flash_fwd_decode_sm100._SwapABCore``).
FORWARD_KERNEL = "FlashAttentionForwardSm"
SWAPAB_KERNEL = "SwapABCore"


def _family(name: str, axes: tuple, arch_major: int, doc: str, **kw: Any) -> Family:
    return Family(
        name, arches_running(name), axes, check_fwd_call(arch_major), doc, FORWARD,
        tensors=forward_tensors, dims=forward_dims, fa4_kernel=kw.pop("fa4_kernel"),
        domain_axes=FWD_DOMAIN_AXES, filter_axes=FWD_FILTER_AXES, group=forward_group, **kw,
    )  # fmt: skip


FAMILIES = (
    _family(
        "fwd_sm100", FWD_SM100_AXES, 10,
        "FA4 SM100 forward (FlashAttentionForwardSm100, and FlashAttentionForwardSm100SwapAB for decode; "
        "sm_103a is its B300 build)",
        fa4_kernel=lambda f: SWAPAB_KERNEL if f.get("use_swapab") else FORWARD_KERNEL,
        scalars=forward_scalars(True),
        grid=lambda f, s, n: sm100_forward_grid(f, **_shape(s), num_sms=n, num_splits=s.get("num_splits", 1)),
        cluster=two_cta_cluster, pointers=forward_pointers(False),
    ),
    _family(
        "fwd_sm90", FWD_SM90_AXES, 9, "FA4 SM90 forward (FlashAttentionForwardSm90)",
        fa4_kernel=lambda f: FORWARD_KERNEL, scalars=forward_scalars(False),
        grid=lambda f, s, n: sm90_forward_grid(f, **_shape(s)), pointers=forward_pointers(True),
    ),
    _family(
        "fwd_sm120", FWD_SM120_AXES, 12,
        "FA4 SM120 forward (FlashAttentionForwardSm120: the SM80 kernel within SM120's 99 KiB)",
        fa4_kernel=lambda f: FORWARD_KERNEL, scalars=forward_scalars(False),
        grid=lambda f, s, n: sm120_forward_grid(f, **_shape(s)), pointers=forward_pointers(False),
    ),
)  # fmt: skip
