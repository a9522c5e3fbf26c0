"""Home of the backward families: ``bwd_sm90`` / ``bwd_sm100`` / ``bwd_sm120`` (a manifest group names the call;
FA4's selector picks its configs and :func:`fa4aot.core.backward.parts` turns each into the kernels
FA4 launches) and their helper kernels ``bwd_pre`` / ``bwd_post``: manifest axes and checks, the
tensors each kernel takes (FA4's ``_flash_attn_bwd`` layouts and padded scratch), sample sizes and
scalars, and the grids FA4's schedulers give them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fa4aot.core import backward as backward_core
from fa4aot.core.families import axes as ax
from fa4aot.core.families.base import BACKWARD, Family, Grid, cdiv, packed
from fa4aot.core.layouts import Dims, TensorLayout, contiguous
from fa4aot.core.targets import ARCHES, arches_running
from fa4aot.core.variant import Variant

#: The arches fa4aot builds a backward for (their helper kernels with it).
BACKWARD_ARCHES = tuple(a.name for a in ARCHES.values() if a.backward)
#: The shapes a backward group expects (SM100's query-head fold depends on them).
BWD_DOMAIN_AXES = ax.shape_axes(
    backward_core.DEFAULT_BATCH,
    backward_core.DEFAULT_SEQLEN,
    backward_core.DEFAULT_SEQLEN,
    backward_core.DEFAULT_NHEADS_KV,
)

BWD_AXES = (
    ax.Axis("dtype", ax.choice("dtype", ax.DTYPES), ("bf16",), "element type of q, k, v, out, dout"),
    ax.HEAD_DIMS,
    ax.QHEAD_PER_KVHEAD,
    ax.CAUSAL,
    ax.flag("local", False, "sliding-window (local) attention"),
    ax.VARLEN_Q,
    ax.VARLEN_K,
    ax.SEQUSED_Q,
    ax.SEQUSED_K,
    ax.flag("deterministic", False, "FA4's deterministic backward (semaphore-ordered: bitwise reproducible gradients)"),
    ax.SOFTCAP,
    ax.flag("dlse", False, "a gradient flows into the returned LSE (FA4: return_lse=True)", "has_dlse"),
    ax.LEARNABLE_SINK,
)


def check_bwd(family: str) -> Callable[[dict[str, Any]], str | None]:
    """FA4's checks on a backward call of this family (:func:`fa4aot.core.backward.check_call`)."""
    return lambda f: backward_core.check_call(family, f)


def _helper_check(f: dict[str, Any]) -> str | None:
    return "built as part of a backward group (bwd_sm90, bwd_sm100, bwd_sm120), not listed on its own"


def _bwd_parts(family: str, f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every kernel FA4's backward launches for a call of this group, for each config FA4's
    selector picks over the group's shapes (``_arch`` / ``_num_sms``: the target's)."""
    from fa4aot.core import selector

    call = {k: f[k] for k in backward_core.CALL_FIELDS}
    found, why = backward_core.expand(selector.installed(), family, f["_arch"], f["_num_sms"], call, f.get("_domain"))
    if not found:
        raise ValueError(why or "FA4 selects no backward configuration for this group")
    out: list[tuple[str, dict[str, Any]]] = []
    for ps in found:
        out += [(p.family, p.field_dict) for p in ps]
    return out


def _bwd_rows(f: dict[str, Any], d: Dims, which: str) -> tuple[tuple[int, ...], int]:
    """(row dims of q or k, the sequence extent of the per-head fp32 buffers before padding)."""
    b = d.batch
    if which == "q":
        total = d.total_q if d.total_q is not None else b * d.seqlen_q
        return ((total,) if f["varlen_q"] else (b, d.seqlen_q)), (total if f["varlen_q"] else d.seqlen_q)
    total = d.total_k if d.total_k is not None else b * d.seqlen_k
    return ((total,) if f["varlen_k"] else (b, d.seqlen_k)), (total if f["varlen_k"] else d.seqlen_k)


def backward_tensors(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """Tensors of a backward kernel (FA4's ``_flash_attn_bwd`` layouts and padded buffers,
    :func:`fa4aot.core.backward.scratch`); a ``bwd_post`` sample converts the dQ accumulator (the
    dK / dV ones have the same layout)."""
    f = variant.fields
    b, h, hk = d.batch, d.nheads, d.nheads_kv
    if variant.family == "bwd_post":
        tile, mult, varlen, pack = f["tile"], f["hdim_multiple_of"], f["varlen"], f["pack_factor"]
        total = d.total_q if d.total_q is not None else b * d.seqlen_q
        rows = (total,) if varlen else (b, d.seqlen_q)
        heads = h // pack
        if varlen:
            s_r = (total * pack + (b + 1) * tile - 1) // tile * tile
        else:
            s_r = backward_core.round_up(d.seqlen_q * pack, tile)
        per_head = (lambda n, hh=h: (hh, n)) if varlen else (lambda n, hh=h: (b, hh, n))
        out = {
            "accum": contiguous("fp32", *per_head(s_r * backward_core.round_up(f["head_dim"], mult), heads)),
            "out": contiguous(f["dtype"], *rows, h, f["head_dim"]),
        }
        if varlen:
            out["cu_seqlens"] = contiguous("int32", b + 1)
        if f["seqused"]:
            out["seqused"] = contiguous("int32", b)
        if f["learnable_sink"] != "none":
            out["dpsum"] = contiguous("fp32", *per_head(s_r, heads))
            out["lse"] = contiguous("fp32", *per_head(total if varlen else d.seqlen_q))
            out["learnable_sink"] = contiguous(f["learnable_sink"], h)
            out["dsink"] = contiguous(f["learnable_sink"], h)
        return out
    qrows, sq = _bwd_rows(f, d, "q")
    q_per_head = (lambda n, hh=h: (hh, n)) if f["varlen_q"] else (lambda n, hh=h: (b, hh, n))
    dt = f["dtype"]
    if variant.family == "bwd_pre":
        tm, mult, pack = f["tile_m"], f["hdim_multiple_of"], f["pack_factor"]
        heads = h // pack
        if f["varlen_q"]:
            sq_r = (sq * pack + (b + 1) * tm - 1) // tm * tm
        else:
            sq_r = backward_core.round_up(sq * pack, tm)
        out = {
            "out": contiguous(dt, *qrows, h, d.head_dim_v),
            "dout": contiguous(dt, *qrows, h, d.head_dim_v),
            "dpsum": contiguous("fp32", *q_per_head(sq_r, heads)),
            "lse": contiguous("fp32", *q_per_head(sq)),
            "lse_log2": contiguous("fp32", *q_per_head(sq_r, heads)),
            "dq_accum": contiguous("fp32", *q_per_head(sq_r * backward_core.round_up(f["head_dim"], mult), heads)),
        }
        if f["has_dlse"]:
            out["dlse"] = contiguous("fp32", *q_per_head(sq))
    else:  # the main kernel
        krows, sk = _bwd_rows(f, d, "k")
        sc = backward_core.scratch(
            variant.family, f, b, h, hk, d.seqlen_q, d.seqlen_k, sq if f["varlen_q"] else None,
            sk if f["varlen_k"] else None, num_sms or variant.num_sms,
        )  # fmt: skip
        out = {}
        if sc.dq_semaphore is not None:  # FA4's semaphores (zeroed before each call)
            out["dq_semaphore"] = contiguous("int32", *sc.dq_semaphore)
            if sc.dk_semaphore is not None:
                out["dk_semaphore"] = contiguous("int32", *sc.dk_semaphore)
                out["dv_semaphore"] = contiguous("int32", *sc.dk_semaphore)
        out.update(
            {
                "q": contiguous(dt, *qrows, h, d.head_dim),
                "k": contiguous(dt, *krows, hk, d.head_dim),
                "v": contiguous(dt, *krows, hk, d.head_dim_v),
                "dout": contiguous(dt, *qrows, h, d.head_dim_v),
                "lse_log2": contiguous("fp32", *sc.scratch),
                "dpsum": contiguous("fp32", *sc.scratch),
                "dq_accum": contiguous("fp32", *sc.dq_accum),
            }
        )
        if sc.dk_accum is not None:
            # the kernel's dk / dv are FA4's fp32 accumulators (the postprocess converts them)
            out["dk"] = contiguous("fp32", *sc.dk_accum)
            out["dv"] = contiguous("fp32", *sc.dv_accum)
        else:
            out["dk"] = contiguous(dt, *krows, hk, d.head_dim)
            out["dv"] = contiguous(dt, *krows, hk, d.head_dim_v)
        if f["varlen_k"]:
            out["cu_seqlens_k"] = contiguous("int32", b + 1)
        if f["seqused_k"]:
            out["seqused_k"] = contiguous("int32", b)
        if sc.workspace is not None:
            out["tensormap_workspace"] = contiguous("int64", *sc.workspace)
    if f["varlen_q"]:
        out["cu_seqlens_q"] = contiguous("int32", b + 1)
    if f["seqused_q"]:
        out["seqused_q"] = contiguous("int32", b)
    return out


def dims(variant: Variant) -> dict[str, Any]:
    """Representative sizes: the variant's head dims; a fold's heads where the kernel is built
    for its scratch heads."""
    f = variant.fields
    if variant.family == "bwd_pre":
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim_v"]}
        if f["pack_factor"] > 1:  # the preprocess of a fold is built for its scratch heads
            base.update(nheads=f["scratch_heads"] * f["pack_factor"], nheads_kv=f["scratch_heads"])
        return base
    if variant.family == "bwd_post":
        base = {"head_dim": f["head_dim"], "head_dim_v": f["head_dim"]}
        if f["pack_factor"] > 1:
            base.update(nheads=4 * f["pack_factor"], nheads_kv=4)
        return base
    qh = f["qhead_per_kvhead"]
    return {"head_dim": f["head_dim"], "head_dim_v": f["head_dim_v"], "nheads_kv": 4, "nheads": 4 * qh}


def scalars(variant: Variant, d: Dims) -> dict[str, Any]:
    """The softmax scale (the postprocess's ``scale``) and, for local attention, a window."""
    if variant.family == "bwd_post":
        return {"scale": 1.0 / math.sqrt(d.head_dim)}
    out: dict[str, Any] = {"softmax_scale": 1.0 / math.sqrt(d.head_dim)}
    if variant.fields.get("local"):
        out["window_size_left"], out["window_size_right"] = SAMPLE_WINDOW
    return out


#: The window of sample calls of local variants.
SAMPLE_WINDOW = (128, 0)


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
    if family in backward_core.BACKWARD_FAMILIES:
        cm = 2 if f.get("use_2cta_instrs") else 1
        tile, varlen = f["tile_n"], f["varlen_k"]
        groups = f["qhead_per_kvhead"] // pack if f.get("head_loop") else 1
        heads = nheads // pack // groups
        if varlen:
            return (_varlen_tiles(packed(total, batch, seqlen), batch, tile, cm) * heads, 1, 1)
        blocks = cdiv(seqlen, tile * cm) * cm
        if f["deterministic"]:
            return (blocks * heads * batch, 1, 1)
        return (blocks, heads, batch)
    tile = f["tile_m"] if family == "bwd_pre" else f["tile"]
    varlen = f["varlen_q"] if family == "bwd_pre" else f["varlen"]
    heads = nheads // pack
    if varlen:
        return (((packed(total, batch, seqlen) * pack) + batch * (tile - 1)) // tile * heads, 1, 1)
    return (cdiv(seqlen * pack, tile), heads, batch)


def _grid(family: str, f: dict[str, Any], s: dict[str, Any]) -> Grid:
    """:func:`backward_grid` for a call's sizes: the main kernel tiles the keys, the others the queries."""
    main = family in backward_core.BACKWARD_FAMILIES
    rows = dict(seqlen=s["seqlen_k"], total=s["total_k"]) if main else dict(seqlen=s["seqlen_q"], total=s["total_q"])
    return backward_grid(family, f, batch=s["batch"], nheads=s["nheads"], **rows)


def _pointers(*names: str) -> Callable[[dict[str, Any], dict[str, Any]], dict[str, int]]:
    """The preprocess and postprocess take plain pointers to every tensor (the main kernel loads
    q/k/v/dout through TMA descriptors, which hold the addresses)."""
    return lambda f, named: {n: named[n].ptr for n in names}


def _family(name: str, arches: tuple[str, ...], axes: tuple, check: Callable, doc: str, **kw: Any) -> Family:
    kernel = kw.pop("fa4_kernel")
    return Family(
        name, arches, axes, check, doc, BACKWARD, tensors=backward_tensors, dims=dims, scalars=scalars,
        fa4_kernel=lambda f: kernel, grid=lambda f, s, n: _grid(name, f, s), **kw,
    )  # fmt: skip


def _main(name: str, kernel: str, doc: str, **kw: Any) -> Family:
    return _family(
        name, arches_running(name), BWD_AXES, check_bwd(name), doc, fa4_kernel=kernel,
        parts=lambda f: _bwd_parts(name, f), domain_axes=BWD_DOMAIN_AXES, **kw,
    )  # fmt: skip


FAMILIES = (
    _main(
        "bwd_sm90", "FlashAttentionBackwardSm90",
        "FA4 SM90 backward: preprocess, FlashAttentionBackwardSm90, dQ (and GQA dK/dV) postprocess",
    ),
    _main(
        "bwd_sm100", "FlashAttentionBackwardSm100",
        "FA4 SM100 backward: preprocess, FlashAttentionBackwardSm100, dQ (and GQA dK/dV) postprocess",
        cluster=lambda f: (2, 1, 1) if f.get("use_2cta_instrs") else None,
    ),
    _main(
        "bwd_sm120", "FlashAttentionBackwardSm",
        "FA4 SM120 backward: preprocess, FlashAttentionBackwardSm120 (the SM80 kernel within SM120's 99 KiB), "
        "dQ (and GQA dK/dV) postprocess",
    ),
    _family(
        "bwd_pre", BACKWARD_ARCHES, (), _helper_check,
        "FA4 backward preprocess (FlashAttentionBackwardPreprocess), built by the backward groups",
        fa4_kernel="FlashAttentionBackwardPreprocess", pointers=_pointers("out", "dout"),
    ),
    _family(
        "bwd_post", BACKWARD_ARCHES, (), _helper_check,
        "FA4 backward postprocess (FlashAttentionBackwardPostprocess), built by the backward groups",
        fa4_kernel="FlashAttentionBackwardPostprocess", pointers=_pointers("accum", "out"),
    ),
)  # fmt: skip
