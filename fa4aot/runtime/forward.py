"""``fa4aot.flash_attn_func`` / ``flash_attn_varlen_func``: FA4's forward API on the zero-JIT runtime.

Same signatures as ``flash_attn.cute`` where they overlap (switching is one import change), same
return value ``(out, lse)`` (``lse`` is None unless ``return_lse``). Tensors may come from
PyTorch, CuPy or JAX (DLPack) or be :class:`fa4aot.RawTensor`; outputs are allocated with the
caller's framework when ``out`` is not given (raw pointers must pass ``out``). The stream defaults
to the framework's current stream (PyTorch, CuPy), else the legacy default stream.

A call validates its arguments, picks the cached variant FA4 would run (the compile-time half of
:mod:`fa4aot.runtime.dispatch` cached per static configuration, the per-call arithmetic done
every call), then launches: [prepare ->] forward [-> combine] on the stream. Allocation: ``out``
and ``lse`` when not given, and for split-KV the fp32 partials (``out_partial``, ``lse_partial``)
the combine reduces; split-KV varlen without ``scheduler_metadata`` also fills metadata from a
pool per stream and configuration (:class:`fa4aot.runtime.metadata.MetadataPool`). Nothing on this path synchronises the host. For CUDA graphs, pass
``out`` (and, for split-KV varlen, ``scheduler_metadata``) or use :func:`fa4aot.prepare_forward`,
which allocates everything at bind time.
"""

from __future__ import annotations

import math
from typing import Any

from fa4aot.core import fwd
from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError, FA4RejectsError
from fa4aot.core.fa4_interface import (
    as_fwd_config,
    clamp_window,
    out_dtype,
    resolve_window,
)
from fa4aot.core.tuning import bucket
from fa4aot.runtime import loader, validate
from fa4aot.runtime.calls import ForwardCall
from fa4aot.runtime.combine import combine
from fa4aot.runtime.combine import pick as pick_combine
from fa4aot.runtime.dispatch import ForwardRule, Pick, Shape, StaticCall, head_dims_rejected
from fa4aot.runtime.empty import fill_empty
from fa4aot.runtime.frameworks import alloc_like, default_stream, transposed
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.metadata import SchedulerMetadata, auto_metadata, check_metadata
from fa4aot.runtime.scales import NO_SCALES
from fa4aot.runtime.scales import check as check_scales
from fa4aot.runtime.tensors import (
    DeviceTensor,
    as_device_tensor,
    converter,
    stream_handle,
)
from fa4aot.runtime.validate import FORWARD_DTYPES, FP8_DTYPES, INT32_MAX, SINK_DTYPES, check_window
from fa4aot.runtime.workspaces import described, route_semaphore, workspace

#: Static forward configurations a runtime keeps rules for (a few per model are in use at once).
MAX_FORWARD_RULES = 512
#: static configuration -> ForwardRule (which caches its decisions and loaded variants)
forward_rules = loader.api_cache("forward_rules", lambda rt: BoundedDict(MAX_FORWARD_RULES))

#: A forward rule caches at most this many loaded variants (its shape-dependent field
#: combinations; in practice a handful).
MAX_RULE_VARIANTS = 64


_new_call = tuple.__new__


def analyse(
    rt: Runtime,
    q: Any,
    k: Any,
    v: Any,
    cu_q: Any,
    cu_k: Any,
    max_q: int | None,
    max_k: int | None,
    su_q: Any,
    su_k: Any,
    softmax_scale: float | None,
    causal: bool,
    window_size: Any,
    num_splits: int,
    pack_gqa: bool | None,
    return_lse: bool,
    has_metadata: bool | str,
    page_table: Any = None,
    learnable_sink: Any = None,
    softcap: float | None = 0.0,
    requires_grad: bool = False,
    config: Any = None,
    requests: tuple[Any, Any, Any] = (None, None, None),
    scales: Any = None,
) -> ForwardCall:
    """Validate a forward call's inputs and pick its variant (nothing is launched or allocated).
    ``config``: an explicit FwdConfig (FA4 validates it instead of selecting); ``requests``:
    FA4's tile_mn, mma_pv_is_rs and intra_wg_overlap arguments; ``scales``: FA4's
    TensorwiseScales (FP8 descales) or BlockScales (MXFP8).

    Page indexes live on the device: they are not checked (that would need a synchronisation);
    a page table pointing outside the K/V pool is undefined behaviour, as in FA4."""
    dev = rt.device
    varlen_q, varlen_k = cu_q is not None, cu_k is not None
    if page_table is not None and varlen_k:
        raise ArgumentError("page_table cannot be used with cu_seqlens_k (FA4 indexes pages per batch entry)")
    qd, kd, vd = _qkv(rt, q, k, v, varlen_q, varlen_k, scales is not None)
    dtype, qs, ks = qd[3], qd[1], kd[1]
    nheads, head_dim = qs[-2], qs[-1]
    nheads_kv, head_dim_v = vd[1][-2], vd[1][-1]
    suq = suk = None
    given_q, given_k = max_q, max_k  # the caller's host bounds (FA4 selects differently without them)
    cuq, batch, max_q, rows = _queries(rt, cu_q, max_q, qs)
    pt, page_size, cuk, max_k = _keys(rt, dev, page_table, cu_k, varlen_k, ks, batch, max_k)
    sc = NO_SCALES if scales is None else check_scales(scales, qd, kd, vd, batch, dev, rt)
    if sc.mxfp8 is None and vd[3] != dtype:
        raise ArgumentError(f"q, k and v must share one dtype, got {dtype}, {kd[3]}, {vd[3]}")
    odtype = out_dtype(dtype, sc.mxfp8)
    sink = _sink(rt, dev, learnable_sink, nheads) if learnable_sink is not None else None
    sink_dtype = sink[3] if sink is not None else "none"
    softcap = _softcap(softcap)
    if su_q is not None:
        suq = validate.int32_vector(su_q, "seqused_q", batch, dev, rt)
    if su_k is not None:
        suk = validate.int32_vector(su_k, "seqused_k", batch, dev, rt)
    if max_q.__class__ is not int or not 0 <= max_q <= INT32_MAX:
        validate.seqlen(max_q, "max_seqlen_q")  # raises, saying why
    if max_k.__class__ is not int or not 0 <= max_k <= INT32_MAX:
        validate.seqlen(max_k, "max_seqlen_k")
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else validate.finite(softmax_scale, "softmax_scale")
    if num_splits.__class__ is not int:
        raise ArgumentError(f"num_splits: expected an int, got {num_splits!r}")
    wl, wr = _window(window_size)
    # FA4 returns before compiling anything when there are no keys or no queries (out = 0, lse =
    # -inf or the sink); FA4's host code would divide by the empty extent, so nothing launches
    # (a page table without columns addresses no keys either)
    k_capacity = pt[1][1] * page_size if pt is not None else (ks[0] if varlen_k else ks[1])
    total_q = qs[0] if varlen_q else batch * qs[1]
    seqlen_k = ks[0] * ks[1] if pt is not None else (ks[0] if varlen_k else ks[1])
    if seqlen_k == 0 or k_capacity == 0 or total_q == 0:
        return _new_call(
            ForwardCall,
            (rt, None, 1, False, None, None, qd, kd, vd, cuq, cuk, suq, suk, batch, rows, nheads, head_dim_v, dtype, max_q, max_k, 0.0, None, None, pt, sink, sc.tensors, odtype, None, None),
        )  # fmt: skip
    # the static call: StaticCall's fields after arch and num_sms
    key = (
        dtype, head_dim, head_dim_v, nheads, nheads_kv, bool(causal), varlen_q, varlen_k, su_q is not None,
        su_k is not None, pack_gqa, bool(return_lse), has_metadata, pt is not None, sink_dtype, softcap, requires_grad,
        requests, config, sc.descales, sc.mxfp8,
    )  # fmt: skip
    rule = forward_rules(rt).get(key) if config is None else None
    if rule is None:
        rule = _rule(rt, key, config)
    total_k = ks[0] if varlen_k else ks[0] * ks[1]  # FA4: math.prod(v.shape[:-2])
    shape = Shape(
        batch, total_q, total_k, qs[0] if varlen_q else qs[1], k_capacity, given_q, given_k, wl, wr, page_size, num_splits
    )  # fmt: skip
    pick = rule.memo.get(shape)
    if pick is None:
        pick = _pick(rt, rule, shape)
    lv = pick.lv if pick.lv.tuned is None else _tuned(rt, pick.lv, rows[0] if varlen_q else batch, nheads, max_q, max_k)
    wl, wr = _kernel_window(bool(causal), wl, wr, qs[0] if varlen_q else qs[1], k_capacity, max_q, max_k)
    splits = pick.plan.num_splits
    return _new_call(
        ForwardCall,
        (rt, lv, splits, splits > 1, pick.plan, pick.config, qd, kd, vd, cuq, cuk, suq, suk, batch, rows, nheads, head_dim_v, dtype, max_q, max_k, scale, wl, wr, pt, sink, sc.tensors, odtype, rule, shape),
    )  # fmt: skip


def _tuned(rt: Runtime, lv: Any, rows: int, nheads: int, max_q: int, max_k: int) -> Any:
    """The variant the device's tuning table picks over FA4's choice ``lv`` for this shape bucket."""
    choice = lv.tuned.get(bucket(rows, nheads, max_q, max_k))
    return lv if choice is None else rt._load_id(choice)


def _qkv(
    rt: Runtime, q: Any, k: Any, v: Any, varlen_q: bool, varlen_k: bool, scaled: bool
) -> tuple[DeviceTensor, DeviceTensor, DeviceTensor]:
    """q, k, v described and checked: dtypes (one for the three, but MXFP8's QK path, ``scaled``,
    may take a bf16 v: its scales check it), layouts, and shapes that agree."""
    dev = rt.device
    conv = converter(q, "q")  # one lookup for the three (they are almost always one class)
    qd = conv(q, "q")
    kd = conv(k, "k") if k.__class__ is q.__class__ else as_device_tensor(k, "k")
    vd = conv(v, "v") if v.__class__ is q.__class__ else as_device_tensor(v, "v")
    dtype = qd[3]
    if dtype not in FORWARD_DTYPES and dtype not in FP8_DTYPES:
        raise ArgumentError(f"q: dtype must be bf16, fp16, e4m3 or e5m2 (FP8: SM100-family only), got {dtype}")
    if kd[3] != dtype or (vd[3] != dtype and not scaled):
        raise ArgumentError(f"q, k and v must share one dtype, got {dtype}, {kd[3]}, {vd[3]}")
    try:
        validate.io(qd, "q", 3 if varlen_q else 4, dev, rt)
        validate.io(kd, "k", 3 if varlen_k else 4, dev, rt)
        validate.io(vd, "v", 3 if varlen_k else 4, dev, rt)
    except ArgumentError:  # FA4 asserts on its head dims before anything else: say what FA4 says
        if len(qd[1]) >= 3 and (why := head_dims_rejected(rt.target.arch, qd[1][-1], vd[1][-1], dtype)):
            raise FA4RejectsError(f"FA4 rejects this call: {why}") from None
        raise
    qs, ks, vs = qd[1], kd[1], vd[1]
    if ks[:-1] != vs[:-1] or ks[-1] != qs[-1]:
        raise ArgumentError(f"k {tuple(ks)} and v {tuple(vs)} must agree (and k's head_dim equal q's {qs[-1]})")
    nheads, nheads_kv = qs[-2], vs[-2]
    if nheads_kv < 1 or nheads % nheads_kv:
        raise ArgumentError(f"q has {nheads} heads, k/v {nheads_kv}: nheads must be a multiple of nheads_kv")
    return qd, kd, vd


def _queries(rt: Runtime, cu_q: Any, max_q: int | None, qs: tuple[int, ...]):
    """(cu_seqlens_q, batch, max_seqlen_q, out rows) of packed (``cu_q`` given) or batched queries."""
    if cu_q is not None:
        cu = validate.int32_vector_any(cu_q, "cu_seqlens_q", rt.device, rt)
        batch = cu[1][0] - 1
        if batch < 1:
            raise ArgumentError("cu_seqlens_q: needs batch + 1 >= 2 entries")
        return cu, batch, qs[0] if max_q is None else max_q, (qs[0],)
    batch, seqlen_q = qs[0], qs[1]
    if max_q is not None and max_q != seqlen_q:
        raise ArgumentError(f"max_seqlen_q ({max_q}) must equal q's seqlen ({seqlen_q}) without cu_seqlens_q")
    return None, batch, seqlen_q, (batch, seqlen_q)


def _softcap(softcap: Any) -> float:
    if softcap is None:
        return 0.0
    if softcap.__class__ is not float or softcap != 0.0:
        softcap = validate.finite(softcap, "softcap")
        if softcap < 0:
            raise ArgumentError(f"softcap: must be >= 0 (0: off), got {softcap}")
    return softcap


def _window(window_size: Any) -> tuple[int | None, int | None]:
    if window_size is None or window_size == (None, None):
        return None, None
    wl, wr = window_size
    return check_window(wl, "left"), check_window(wr, "right")


def _rule(rt: Runtime, key: tuple, config: Any) -> ForwardRule:
    """The forward rule of a static call (made on its first sight); an explicit ``config`` joins
    the key as the cache's selector's FwdConfig (hashable, and equal across calls)."""
    if config is not None:
        try:
            key = (*key[:-3], as_fwd_config(rt.selector, config), *key[-2:])
        except (TypeError, ValueError) as e:
            raise ArgumentError(f"config: {e}") from None
        if (rule := forward_rules(rt).get(key)) is not None:
            return rule
    t = rt.target
    rule = ForwardRule(StaticCall(t.arch, t.num_sms, *key), rt.selector, rt.knobs)
    forward_rules(rt)[key] = rule
    return rule


def _kernel_window(
    causal: bool, wl: int | None, wr: int | None, q_cap: int, k_capacity: int, max_q: int, max_k: int
) -> tuple[int | None, int | None]:
    """The window edges the kernel takes: FA4's clamped sides (interface.py 898) for a local
    call, an open edge as the whole sequence (fa4aot's local variants take both); None, None
    otherwise."""
    _, local, wl, wr = resolve_window(causal, wl, wr)
    if not local:
        return None, None
    wl, wr = clamp_window(True, wl, wr, q_cap, k_capacity)
    return (max_k + max_q if wl is None else wl), (max_k + max_q if wr is None else wr)


def _keys(
    rt: Runtime,
    dev: int,
    page_table: Any,
    cu_k: Any,
    varlen_k: bool,
    ks: tuple[int, ...],
    batch: int,
    max_k: int | None,
) -> tuple[DeviceTensor | None, int | None, DeviceTensor | None, int]:
    """(page table, page size, cu_seqlens_k, max_seqlen_k) of where a call's keys come from: pages,
    packed sequences or a batch, each checked against q's batch."""
    pt = page_size = cuk = None
    if page_table is not None:
        pt = as_device_tensor(page_table, "page_table")
        ps_ = pt[2]
        # the usual table in one test; anything else gets the full check (which names the problem)
        if not (
            pt[3] == "int32" and len(ps_) == 2 and pt[4] == dev and pt[5] != "raw" and not pt[0] % 4
            and (ps_[1] == 1 or pt[1][1] == 1) and ps_[0] >= 0
        ):  # fmt: skip
            pt = validate.tensor(page_table, "page_table", dtypes=("int32",), rank=2, device=dev, rt=rt, align=4)
        if pt[1][0] != batch:
            raise ArgumentError(f"page_table: expected shape (batch={batch}, max_pages), got {tuple(pt[1])}")
        page_size = ks[1]  # k, v: (num_pages, page_size, nheads_kv, head_dim)
        max_k = pt[1][1] * page_size if max_k is None else max_k
    elif varlen_k:
        cuk = validate.int32_vector(cu_k, "cu_seqlens_k", batch + 1, dev, rt)
        max_k = ks[0] if max_k is None else max_k
    else:
        if ks[0] != batch:
            raise ArgumentError(f"k: batch {ks[0]} != q's batch {batch}")
        max_k = ks[1] if max_k is None else max_k
    return pt, page_size, cuk, max_k


def _sink(rt: Runtime, dev: int, learnable_sink: Any, nheads: int) -> DeviceTensor:
    """The learnable sink, checked: one value per query head, in a dtype FA4 takes."""
    sink = as_device_tensor(learnable_sink, "learnable_sink")
    if not (
        sink[3] in SINK_DTYPES and len(sink[1]) == 1 and sink[4] == dev and sink[5] != "raw" and not sink[0] % 4
        and (sink[2][0] == 1 or sink[1][0] == 1)
    ):  # fmt: skip
        sink = validate.tensor(learnable_sink, "learnable_sink", dtypes=SINK_DTYPES, rank=1, device=dev, rt=rt, align=4)
    if sink[1][0] != nheads:
        raise ArgumentError(f"learnable_sink: expected shape (nheads={nheads},), got {tuple(sink[1])}")
    return sink


def _pick(rt: Runtime, rule: ForwardRule, shape: Shape) -> Pick:
    """FA4's decision for a shape the rule has not seen: a traced region's (runtime/regions.py),
    else FA4's selection, then the variant (loaded on first use, or the manifest line that builds
    it when the cache lacks it)."""
    pick = rule.region(shape)
    if pick is None:
        traced = rule.traced_decision(shape)
        d = traced[0] if traced is not None else rule.decision(shape)
        key = tuple(sorted(d.fields.items()))
        lv = rule.loaded.get(key)
        if lv is None:
            variant = rule.variant(d.fields)
            if not rt.has(variant):
                rt.miss(variant, fwd.call_group(rule.facts(shape), rule.knobs, rule.s.config))
            lv = rt.load(variant)
            rule.loaded[key] = lv
        pick = Pick(lv, d.plan, d.config)
        if traced is not None:
            rule.regions.add(*traced[1], pick)
    rule.memo[shape] = pick
    return pick


def forward(
    runtime: Runtime | None,
    q: Any,
    k: Any,
    v: Any,
    cu_q: Any,
    cu_k: Any,
    max_q: int | None,
    max_k: int | None,
    su_q: Any,
    su_k: Any,
    softmax_scale: float | None,
    causal: bool,
    window_size: Any,
    num_splits: int,
    pack_gqa: bool | None,
    return_lse: bool,
    out: Any,
    metadata: SchedulerMetadata | None,
    stream: Any,
    page_table: Any = None,
    learnable_sink: Any = None,
    softcap: float | None = 0.0,
    lse: Any = None,
    requires_grad: bool = False,
    config: Any = None,
    requests: tuple[Any, Any, Any] = (None, None, None),
    scales: Any = None,
) -> tuple[Any, Any]:
    """The forward call behind the API functions (positional: it is the hot path). ``lse``: a
    preallocated LSE (FA4's layout) to write, which implies return_lse; ``requires_grad``: a
    training forward (FA4 selects for the backward that follows)."""
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    if metadata is not None and not isinstance(metadata, SchedulerMetadata):
        raise ArgumentError(
            "scheduler_metadata must be a fa4aot.SchedulerMetadata (FA4's metadata tensors come from FA4's own "
            "prepare kernel; compute fa4aot's with SchedulerMetadata(...).compute(...))"
        )
    if lse is not None:
        return_lse = True
    fc = analyse(
        rt, q, k, v, cu_q, cu_k, max_q, max_k, su_q, su_k, softmax_scale, causal, window_size, num_splits, pack_gqa,
        return_lse, False if metadata is None else metadata.kind, page_table, learnable_sink, softcap, requires_grad, config, requests, scales,
    )  # fmt: skip
    s = default_stream(q) if stream is None else stream_handle(stream)
    out_shape = (*fc.rows, fc.nheads, fc.head_dim_v)
    out, od, lse, ld = _outputs(rt, fc, q, out, lse, return_lse, out_shape)
    if fc.lv is None:  # no keys or no queries: FA4's early return, nothing launches
        fill_empty(rt, od, ld, fc.learnable_sink, s)
        return out, lse
    plan = fc.plan
    if fc.split:
        # everything the combine needs is resolved before anything is launched
        out_partial = alloc_like(q, (fc.num_splits, *out_shape), "fp32")
        lse_partial = alloc_like(q, (fc.num_splits, *fc.lse_shape), "fp32")
        o_arg, l_arg = as_device_tensor(out_partial, "out_partial"), as_device_tensor(lse_partial, "lse_partial")
        pick_combine(
            rt, fc.out_dtype, fc.head_dim_v, fc.nheads, fc.num_splits, cu_q is not None,
            su_q is not None and cu_q is not None, lse is not None, plan.num_splits_dynamic,
        )  # fmt: skip
    else:
        o_arg, l_arg = od, ld
    scratch: list[Any] = []  # torch scratch, referenced until its launch is queued
    md, nsd, sem, l2, ws = _scheduler_args(rt, fc, metadata, q, s, scratch)
    fc.lv.launch(
        fc.q, fc.k, fc.v, o_arg, l_arg, fc.cu_q, fc.cu_k, fc.su_q, fc.su_k, fc.page_table, nsd, sem, l2, fc.scale,
        fc.wl, fc.wr, fc.learnable_sink, fc.max_q, ws, *fc.scales, s,
    )  # fmt: skip
    if fc.split:
        combine(
            out_partial,
            transposed(lse_partial),
            out,
            transposed(lse) if lse is not None else None,
            cu_seqlens=cu_q,
            seqused=su_q,  # FA4 passes seqused_q to the combine (interface.py 1733)
            num_splits_dynamic=md.num_splits_dynamic if nsd is not None else None,
            stream=s,
            runtime=rt,
        )
    if metadata is not None and sem is not None:
        md.reset_semaphore(s)  # the forward counted it up; zero it for the next use
    return out, lse


def _outputs(
    rt: Runtime, fc: ForwardCall, q: Any, out: Any, lse: Any, return_lse: bool, out_shape: tuple[int, ...]
) -> tuple[Any, DeviceTensor, Any, DeviceTensor | None]:
    """(out, its descriptor, lse, its descriptor): the caller's, checked, or allocated like ``q``."""
    if out is None:
        out = alloc_like(q, out_shape, fc.out_dtype)
    od = as_device_tensor(out, "out")
    if od[3] != fc.out_dtype:
        what = "q's" if fc.out_dtype == fc.dtype else "FA4 writes bf16 for FP8 inputs"
        raise ArgumentError(f"out: dtype must be {fc.out_dtype} ({what}), got {od[3]}")
    validate.io(od, "out", len(out_shape), rt.device, rt, writable=True)
    if od[1] != out_shape:
        validate.shape(od, "out", out_shape, "q's shape with head_dim_v")
    if lse is not None:
        ld = validate.tensor(
            lse, "lse", dtypes=("fp32",), rank=len(fc.lse_shape), device=rt.device, rt=rt, align=4, writable=True
        )
        validate.shape(ld, "lse", fc.lse_shape, "FA4's (batch, nheads, seqlen_q) or (nheads, total_q)")
    else:
        lse = alloc_like(q, fc.lse_shape, "fp32") if return_lse else None
        ld = as_device_tensor(lse, "lse") if lse is not None else None
    return out, od, lse, ld


def _scheduler_args(
    rt: Runtime, fc: ForwardCall, metadata: SchedulerMetadata | None, q: Any, s: int, scratch: list[Any]
) -> tuple[SchedulerMetadata | None, Any, Any, Any, Any]:
    """(metadata, num_splits_dynamic, tile semaphore, nheads-in-L2, tensor-map workspace) the
    forward kernel takes, as FA4's plan for the call says; torch scratch is kept in ``scratch``."""
    plan = fc.plan
    nsd = sem = l2 = md = None
    if metadata is not None or plan.prepare:
        # FA4's scheduler metadata: the caller's, or the prepare kernel's for a split varlen call
        md = metadata if metadata is not None else auto_metadata(fc, s)  # may launch prepare
        check_metadata(md, fc)
        b_nsd, b_sem, b_l2 = md.buffers
        nsd = b_nsd if plan.num_splits_dynamic else None
        sem = b_sem if plan.tile_count_semaphore else None
        l2 = b_l2 if plan.num_nheads_in_l2 else None
    elif plan.dynamic_route:
        sem = described(route_semaphore(rt, q, s), scratch)
    ws = described(workspace(rt, fc, q, s), scratch) if plan.tensormap_workspace else None
    return md, nsd, sem, l2, ws
