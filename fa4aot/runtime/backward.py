"""``fa4aot.flash_attn_backward``: FA4's backward pass (``_flash_attn_bwd``) on the zero-JIT runtime.

One call launches what FA4's does, on the caller's stream: the preprocess (dot(O, dO), the LSE in
log2 units, the zeroed fp32 dQ accumulator), the main kernel (dK, dV; dQ accumulated in fp32),
and the postprocess that converts the dQ accumulator (with GQA also the dK and dV accumulators,
which are zeroed first) to the input dtype and, with a learnable sink, computes dsink. The
scratch FA4 allocates (dpsum, lse_log2, dq_accum; for GQA dk_accum / dv_accum; for the
deterministic backward the dQ/dK/dV semaphores) is sized by FA4's rules
(:func:`fa4aot.core.backward.scratch`) and taken as one allocation from the caller's framework;
what FA4 zeroes is zeroed with one memset on the stream.

Tensors may come from PyTorch, CuPy or JAX (DLPack) or be :class:`fa4aot.RawTensor` (then every
output, ``dq``/``dk``/``dv``, must be given and the scratch is allocated through the driver).
Every argument is validated and every kernel loaded before anything is launched or written.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from fa4aot.core.backward import BACKWARD_FAMILY, CALL_FIELDS, BwdFacts, check_call, scratch, select
from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError, VariantNotFoundError
from fa4aot.core.fa4_interface import arch_number, clamp_window, resolve_window
from fa4aot.core.variant import Variant
from fa4aot.runtime import loader, validate
from fa4aot.runtime.frameworks import alloc_like, default_stream, framework
from fa4aot.runtime.loader import LoadedVariant, Runtime
from fa4aot.runtime.tensors import (
    DeviceTensor,
    RawTensor,
    as_device_tensor,
    contiguous_strides,
    set_words,
    stream_handle,
)
from fa4aot.runtime.validate import FORWARD_DTYPES, SINK_DTYPES, check_window

#: Backward call configurations a runtime remembers the kernels of, and call shapes the scratch
#: layout of.
MAX_BACKWARD_PICKS = 256
MAX_BACKWARD_LAYOUTS = 1024
#: call fields -> BackwardKernels
backward_picks = loader.api_cache("backward_picks", lambda rt: BoundedDict(MAX_BACKWARD_PICKS))
#: call shape -> where its scratch regions lie (scratch_layout)
backward_layouts = loader.api_cache("backward_layouts", lambda rt: BoundedDict(MAX_BACKWARD_LAYOUTS))
#: raw-pointer inputs: stream -> (device pointer, bytes) of its scratch (freed when evicted)
backward_workspaces = loader.api_cache(
    "backward_workspaces",
    lambda rt: BoundedDict(loader.MAX_PER_STREAM, on_evict=lambda stream, ws: rt.free_after(stream, ws[0])),
)


class BackwardKernels(NamedTuple):
    """The loaded kernels of one backward configuration, in launch order."""

    pre: LoadedVariant
    main: LoadedVariant
    post_dq: LoadedVariant
    post_dk: LoadedVariant | None
    post_dv: LoadedVariant | None


class BwdArgs(NamedTuple):
    """A backward call's arguments as :func:`fa4aot.runtime.entry.flash_attn_backward` takes them
    (FA4's names; the defaults are FA4's): what the full path checks and dispatches."""

    dout: Any
    q: Any
    k: Any
    v: Any
    out: Any
    lse: Any
    softmax_scale: float | None = None
    causal: bool = False
    window_size: Any = (None, None)
    softcap: float | None = 0.0
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    seqused_q: Any = None
    seqused_k: Any = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    deterministic: bool = False
    dq: Any = None
    dk: Any = None
    dv: Any = None
    dlse: Any = None
    learnable_sink: Any = None
    stream: Any = None


def pick(rt: Runtime, key: tuple[Any, ...], facts: BwdFacts) -> BackwardKernels:
    """Load the kernels FA4's backward launches for a call whose field values, in
    :data:`fa4aot.core.backward.CALL_FIELDS` order, are ``key``, and whose shapes FA4's
    ``select_bwd_config`` reads are ``facts``; remembered per (key, facts). Raises
    VariantNotFoundError naming the manifest group to add when any of them is not cached."""
    got = backward_picks(rt).get((key, facts))
    if got is not None:
        return got
    fields = dict(zip(CALL_FIELDS, key))
    family = BACKWARD_FAMILY.get(rt.target.arch)
    if family is None:
        raise ArgumentError(f"fa4aot builds no backward for {rt.target.arch}")
    if reason := check_call(family, fields):
        raise ArgumentError(f"FA4's backward cannot run this call on {rt.target.arch}: {reason}")
    try:
        _, ps = select(rt.selector, family, fields, facts, rt.bwd_knobs)
    except (ValueError, AssertionError) as e:
        raise ArgumentError(f"FA4 rejects this backward call: {e}") from None
    variants = [rt.variant_for(p.family, **p.field_dict) for p in ps]
    missing = [v for v in variants if not rt.has(v)]
    if missing:
        from fa4aot.core.manifest_text import describe_missing  # the error path only

        group = Variant.make(family, rt.target.arch, rt.target.num_sms, **fields)
        shapes = {"batch": [facts.batch], "nheads_kv": [facts.num_heads_kv]}
        line = describe_missing(group, shapes)
        rt._stat_misses += 1
        if rt.miss_log is not None:  # the group, so `fa4aot manifest from-misses` can ask for it
            rt.miss_log.add(group, target=rt.target._asdict(), host_arch=rt.host_arch, manifest=line)
        raise VariantNotFoundError(
            f"the cache {rt.cache.root} lacks {len(missing)} of the {len(ps)} backward kernels of this call "
            f"({', '.join(v.label() for v in missing)}); add the group and rebuild: {line}",
            variant=missing[0],
        )
    todo = [v for v in variants if v.variant_id not in rt._loaded]
    if len(todo) > 1:  # first use: load the call's kernels side by side (hashing, dlopen release the GIL)
        rt.preload(todo, threads=len(todo))
    loaded = {p.role: rt.load(v) for p, v in zip(ps, variants)}
    got = BackwardKernels(
        loaded["pre"], loaded["main"], loaded["post_dq"], loaded.get("post_dk"), loaded.get("post_dv")
    )
    backward_picks(rt)[(key, facts)] = got
    return got


def backward(rt: Runtime, a: BwdArgs) -> tuple[Any, ...]:
    """The backward call :func:`fa4aot.runtime.entry.flash_attn_backward` describes, checked,
    dispatched and launched in full (the path that raises the typed errors)."""
    c = analyse(rt, a)
    dq, dk, dv, dsink = c.outputs
    s = default_stream(a.q) if a.stream is None else stream_handle(a.stream)
    if c.kern is None:  # FA4: zero gradients, dsink = sum of dlse over the rows (or zero)
        _bwd_empty(rt, c, s)
    else:
        _keep_until_done(_bwd_launch(rt, c, a.q, s), s, a.stream is None)
    return (dq, dk, dv) if dsink is None else (dq, dk, dv, dsink)


class BwdCall(NamedTuple):
    """A backward call, checked and dispatched (nothing launched): what :func:`_bwd_launch`
    and a prepared backward need."""

    kern: BackwardKernels | None  # None: no queries or no keys (nothing to launch)
    dims: tuple  # key, facts, batch, nheads, nheads_kv, max_q, max_k, total_q, total_k
    t: tuple  # the descriptors: q, k, v, out, dout, lse, dlse, cu/seqused q/k, sink, dq, dk, dv, dsink
    scale: float
    local: bool
    wl: int | None
    wr: int | None
    raw: bool  # raw-pointer inputs (no framework to allocate with)
    outputs: tuple  # the caller's or new dq, dk, dv, dsink (None without a sink)


def analyse(rt: Runtime, a: BwdArgs) -> BwdCall:
    """Validate a backward call, allocate the gradients not given (``a.dq``...) and load its kernels;
    nothing is launched or written."""
    q, deterministic = a.q, a.deterministic
    varlen_q, varlen_k = a.cu_seqlens_q is not None, a.cu_seqlens_k is not None
    if deterministic.__class__ is not bool:
        raise ArgumentError(f"deterministic: expected True or False, got {deterministic!r}")
    qd, kd, vd, od, dod = _bwd_inputs(rt, q, a.k, a.v, a.out, a.dout, varlen_q, varlen_k)
    dtype, qrows = qd.dtype, qd.shape[:-2]
    nheads, head_dim = qd.shape[-2], qd.shape[-1]
    nheads_kv, head_dim_v = vd.shape[-2], vd.shape[-1]
    cuq, cuk, suq, suk, batch, max_q, total_q, max_k, total_k = _bwd_lengths(
        rt, qrows, kd, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.seqused_q, a.seqused_k
    )
    lse_shape = (nheads, qrows[0]) if varlen_q else (batch, nheads, qrows[1])
    ld, dld, sink = _bwd_stats(rt, a.lse, a.dlse, a.learnable_sink, lse_shape, nheads)
    scale = 1.0 / math.sqrt(head_dim) if a.softmax_scale is None else validate.finite(a.softmax_scale, "softmax_scale")
    softcap = 0.0 if a.softcap is None else validate.finite(a.softcap, "softcap")
    if softcap < 0:
        raise ArgumentError(f"softcap: must be >= 0 (0: off), got {softcap}")
    causal_r, local, wl, wr = _bwd_window(
        a.causal,
        a.window_size,
        qrows[0] if varlen_q else qrows[1],
        kd.shape[0] if varlen_k else kd.shape[1],
        max_q,
        max_k,
    )
    # the call's fields in CALL_FIELDS order (the dispatch key), and what FA4's selection reads
    key = (
        dtype, head_dim, head_dim_v, nheads // nheads_kv, causal_r, local, varlen_q, varlen_k, suq is not None,
        suk is not None, deterministic, float(softcap), dld is not None, sink.dtype if sink is not None else "none",
    )  # fmt: skip
    facts = BwdFacts(
        arch_number(rt.target.arch), rt.target.num_sms, dtype, head_dim, head_dim_v, nheads, nheads_kv, batch,
        qrows[0] if varlen_q else batch * qrows[1], kd.shape[0] if varlen_k else batch * kd.shape[1],
        a.max_seqlen_q if varlen_q else None, a.max_seqlen_k if varlen_k else None, varlen_q, varlen_k, causal_r, local,
        deterministic, softcap != 0.0, sink is not None,
    )  # fmt: skip
    # outputs: the caller's (checked) or new ones from the inputs' framework
    empty = 0 in qd.shape or 0 in kd.shape
    raw = isinstance(q, (RawTensor, DeviceTensor))
    (dq, dqd), (dk, dkd), (dv, dvd), (dsink, dsd) = _bwd_outputs(rt, q, (a.dq, a.dk, a.dv), (qd, kd, vd), dtype, raw,
                                                                 a.learnable_sink, sink, nheads)  # fmt: skip
    kern = None if empty else pick(rt, key, facts)  # every kernel loaded before anything is written
    return BwdCall(
        kern, (key, facts, batch, nheads, nheads_kv, max_q, max_k, total_q, total_k),
        (qd, kd, vd, od, dod, ld, dld, cuq, cuk, suq, suk, sink, dqd, dkd, dvd, dsd), scale, local, wl, wr, raw,
        (dq, dk, dv, dsink),
    )  # fmt: skip


def _bwd_empty(rt: Runtime, c: BwdCall, s: int) -> None:
    """FA4's result without queries or keys: zero gradients, dsink zero (fa4aot does not reduce
    dlse on the host)."""
    dld, dqd, dkd, dvd, dsd = c.t[6], c.t[12], c.t[13], c.t[14], c.t[15]
    for t in (dqd, dkd, dvd):
        if 0 not in t.shape:
            _zero(rt.driver, t, s)
    if dsd is not None:
        if dld is not None and 0 not in dld.shape:
            raise ArgumentError("learnable_sink with dlse and no keys: fa4aot does not reduce dlse on the host")
        _zero(rt.driver, dsd, s)


def _bwd_stats(
    rt: Runtime, lse: Any, dlse: Any, learnable_sink: Any, lse_shape: tuple[int, ...], nheads: int
) -> tuple[DeviceTensor, DeviceTensor | None, DeviceTensor | None]:
    """The forward's LSE, the gradient of a returned LSE and the learnable sink, checked."""
    dev = rt.device
    ld = validate.tensor(lse, "lse", dtypes=("fp32",), rank=len(lse_shape), device=dev, rt=rt, align=4)
    validate.shape(ld, "lse", lse_shape, "FA4's (batch, nheads, seqlen_q) or (nheads, total_q)")
    dld = sink = None
    if dlse is not None:
        dld = validate.tensor(dlse, "dlse", dtypes=("fp32",), rank=len(lse_shape), device=dev, rt=rt, align=4)
        validate.shape(dld, "dlse", lse_shape, "lse's shape")
    if learnable_sink is not None:
        sink = validate.tensor(learnable_sink, "learnable_sink", dtypes=SINK_DTYPES, rank=1, device=dev, rt=rt, align=4)
        validate.shape(sink, "learnable_sink", (nheads,), "one logit per query head")
    return ld, dld, sink


def _bwd_window(
    causal: bool, window_size: Any, q_cap: int, k_cap: int, max_q: int, max_k: int
) -> tuple[bool, bool, int | None, int | None]:
    """(causal, local, left, right) as FA4 resolves the mask; a local call's sides clamped as FA4
    clamps them (interface.py 2158), an open edge as the whole sequence (the variants take both)."""
    if window_size is None or tuple(window_size) == (None, None):
        return bool(causal), False, None, None
    wl, wr = window_size
    causal_r, local, wl, wr = resolve_window(bool(causal), check_window(wl, "left"), check_window(wr, "right"))
    if local:
        wl, wr = clamp_window(True, wl, wr, q_cap, k_cap)
        wl = max_k + max_q if wl is None else wl
        wr = max_k + max_q if wr is None else wr
    return causal_r, local, wl, wr


def _bwd_inputs(
    rt: Runtime, q: Any, k: Any, v: Any, out: Any, dout: Any, varlen_q: bool, varlen_k: bool
) -> tuple[DeviceTensor, ...]:
    """q, k, v, out, dout described and checked: one dtype, layouts, shapes that agree."""
    dev = rt.device
    qd, kd, vd = as_device_tensor(q, "q"), as_device_tensor(k, "k"), as_device_tensor(v, "v")
    od, dod = as_device_tensor(out, "out"), as_device_tensor(dout, "dout")
    dtype = qd.dtype
    if dtype not in FORWARD_DTYPES:
        raise ArgumentError(f"q: dtype must be bf16 or fp16, got {dtype}")
    for t, name in ((kd, "k"), (vd, "v"), (od, "out"), (dod, "dout")):
        if t.dtype != dtype:
            raise ArgumentError(f"{name}: dtype must be {dtype} (q's), got {t.dtype}")
    q_rank, k_rank = (3 if varlen_q else 4), (3 if varlen_k else 4)
    for t, name, rank in ((qd, "q", q_rank), (kd, "k", k_rank), (vd, "v", k_rank), (od, "out", q_rank),
                          (dod, "dout", q_rank)):  # fmt: skip
        validate.io(t, name, rank, dev, rt)
    nheads, head_dim = qd.shape[-2], qd.shape[-1]
    nheads_kv, head_dim_v = vd.shape[-2], vd.shape[-1]
    if kd.shape[:-1] != vd.shape[:-1] or kd.shape[-1] != head_dim:
        raise ArgumentError(f"k {kd.shape} and v {vd.shape} must agree (and k's head_dim equal q's {head_dim})")
    if nheads_kv < 1 or nheads % nheads_kv:
        raise ArgumentError(f"q has {nheads} heads, k/v {nheads_kv}: nheads must be a multiple of nheads_kv")
    for t, name in ((od, "out"), (dod, "dout")):
        validate.shape(t, name, (*qd.shape[:-2], nheads, head_dim_v), "q's rows and heads with v's head_dim")
    return qd, kd, vd, od, dod


def _bwd_lengths(
    rt: Runtime,
    qrows: tuple[int, ...],
    kd: DeviceTensor,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    seqused_q: Any,
    seqused_k: Any,
) -> tuple[Any, ...]:
    """(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, batch, max_q, total_q, max_k, total_k):
    the sequences of packed or batched queries and keys, checked against each other."""  # fmt: skip
    dev = rt.device
    cuq = cuk = suq = suk = None
    if cu_seqlens_q is not None:
        cuq = validate.int32_vector_any(cu_seqlens_q, "cu_seqlens_q", dev, rt)
        batch = cuq.shape[0] - 1
        if batch < 1:
            raise ArgumentError("cu_seqlens_q: needs batch + 1 >= 2 entries")
        total_q: int | None = qrows[0]
        max_q = total_q if max_seqlen_q is None else validate.seqlen(max_seqlen_q, "max_seqlen_q")
    else:
        batch, max_q, total_q = qrows[0], qrows[1], None
    if cu_seqlens_k is not None:
        cuk = validate.int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, dev, rt)
        total_k: int | None = kd.shape[0]
        max_k = total_k if max_seqlen_k is None else validate.seqlen(max_seqlen_k, "max_seqlen_k")
    else:
        if kd.shape[0] != batch:
            raise ArgumentError(f"k: batch {kd.shape[0]} != q's batch {batch}")
        max_k, total_k = kd.shape[1], None
    if seqused_q is not None:
        suq = validate.int32_vector(seqused_q, "seqused_q", batch, dev, rt)
    if seqused_k is not None:
        suk = validate.int32_vector(seqused_k, "seqused_k", batch, dev, rt)
    return cuq, cuk, suq, suk, batch, max_q, total_q, max_k, total_k


def _bwd_outputs(
    rt: Runtime,
    q: Any,
    given: tuple[Any, Any, Any],
    refs: tuple[DeviceTensor, ...],
    dtype: str,
    raw: bool,
    learnable_sink: Any,
    sink: DeviceTensor | None,
    nheads: int,
) -> list[tuple[Any, Any]]:
    """[(dq, its descriptor), (dk, ...), (dv, ...), (dsink or None, ...)]: the caller's, checked,
    or new ones from the inputs' framework."""  # fmt: skip
    outs: list[tuple[Any, Any]] = []
    for g, ref, name in zip(given, refs, ("dq", "dk", "dv")):
        if g is None:
            if raw:
                raise ArgumentError(f"{name}: raw-pointer inputs need every output passed ({name}=...)")
            g = alloc_like(q, ref.shape, dtype)
        t = as_device_tensor(g, name)
        if t.dtype != dtype:
            raise ArgumentError(f"{name}: dtype must be {dtype}, got {t.dtype}")
        validate.io(t, name, len(ref.shape), rt.device, rt, writable=True)
        validate.shape(t, name, ref.shape, f"{name[1:]}'s shape")
        outs.append((g, t))
    if sink is None:
        return [*outs, (None, None)]
    if isinstance(learnable_sink, (RawTensor, DeviceTensor)):
        raise ArgumentError("learnable_sink: fa4aot allocates dsink with the sink's framework; pass a framework tensor")
    dsink = alloc_like(learnable_sink, (nheads,), sink.dtype)
    return [*outs, (dsink, as_device_tensor(dsink, "dsink"))]


def _bwd_launch(rt: Runtime, c: BwdCall, q: Any, s: int) -> list[Any]:
    """Lay out the scratch, pack every kernel's arguments (checked against the plans' signatures
    before the first launch), zero what must start at zero, launch preprocess -> main ->
    postprocess back to back; the framework buffers to keep alive until the stream is done."""
    layout = _layout(rt, c)
    regions, total_bytes, zero_offset = layout
    bufs: list[Any] = []
    if c.raw:  # no framework to allocate with: the runtime's per-stream workspace
        base = workspace(rt, s, total_bytes)
    else:
        bufs = [alloc_like(q, (total_bytes // 4,), "fp32")]
        base = as_device_tensor(bufs[0], "scratch").ptr
    calls = kernel_calls(rt, c, regions, base, s)
    packed = [(lv.plan, lv.plan.pack(named)) for lv, named in calls]
    if total_bytes > zero_offset:
        rt.driver.memset_d32(base + zero_offset, 0, (total_bytes - zero_offset) // 4, s)
    for plan, flat in packed:
        plan.call_launch(flat)
    return bufs


def _layout(rt: Runtime, c: BwdCall) -> tuple[list[tuple[str, int, tuple[int, ...], tuple[int, ...], str]], int, int]:
    """The call's scratch layout (:func:`scratch_layout`), remembered per call shape."""
    key, facts, batch, nheads, nheads_kv, max_q, max_k, total_q, total_k = c.dims
    lkey = (key, facts, max_q, max_k, total_q, total_k)
    layout = backward_layouts(rt).get(lkey)
    if layout is None:
        assert c.kern is not None
        layout = scratch_layout(rt, c.kern, batch, nheads, nheads_kv, max_q, max_k, total_q, total_k)
        backward_layouts(rt)[lkey] = layout
    return layout


def kernel_calls(rt: Runtime, c: BwdCall, regions: list[Any], base: int, s: int) -> list[tuple[LoadedVariant, dict]]:
    """FA4's backward launches as (kernel, named arguments): preprocess, main kernel, dQ (and
    GQA dK, dV) postprocess, with the scratch regions laid out from ``base``."""
    kern = c.kern
    assert kern is not None
    qd, kd, vd, od, dod, ld, dld, cuq, cuk, suq, suk, sink, dqd, dkd, dvd, dsd = c.t
    sc = {name: DeviceTensor(base + off, sh, st, dt, rt.device, "scratch") for name, off, sh, st, dt in regions}
    dpsum, lse_log2, dq_accum = sc["dpsum"], sc["lse_log2"], sc["dq_accum"]
    dk_accum, dv_accum = sc.get("dk_accum"), sc.get("dv_accum")
    sem_t = {n: sc[n] for n in ("dq_semaphore", "dk_semaphore", "dv_semaphore") if n in sc}
    common_q = {"cu_seqlens_q": cuq, "seqused_q": suq}
    calls = [
        (kern.pre, dict(out=od, dout=dod, dpsum=dpsum, lse=ld, lse_log2=lse_log2, dq_accum=dq_accum, dlse=dld,
                        softmax_scale=c.scale, stream=s, **common_q)),
    ]  # fmt: skip
    main_args = dict(
        q=qd, k=kd, v=vd, dout=dod, lse_log2=lse_log2, dpsum=dpsum, dq_accum=dq_accum,
        dk=dk_accum if dk_accum is not None else dkd, dv=dv_accum if dv_accum is not None else dvd,
        softmax_scale=c.scale, cu_seqlens_k=cuk, seqused_k=suk, stream=s, tensormap_workspace=sc.get("workspace"),
        **common_q, **sem_t,
    )  # fmt: skip
    if c.local:
        main_args.update(window_size_left=c.wl, window_size_right=c.wr)
    calls.append((kern.main, main_args))
    post = dict(accum=dq_accum, out=dqd, scale=c.scale, cu_seqlens=cuq, seqused=suq, stream=s)
    if sink is not None:
        post.update(dpsum=dpsum, lse=ld, learnable_sink=sink, dsink=dsd)
    calls.append((kern.post_dq, post))
    if dk_accum is not None:
        assert kern.post_dk is not None and kern.post_dv is not None
        kv = dict(cu_seqlens=cuk, seqused=suk, stream=s)
        calls.append((kern.post_dk, dict(accum=dk_accum, out=dkd, scale=c.scale, **kv)))
        calls.append((kern.post_dv, dict(accum=dv_accum, out=dvd, scale=1.0, **kv)))
    return [(lv, {k: v for k, v in named.items() if v is not None}) for lv, named in calls]


def scratch_layout(
    rt: Runtime,
    kern: BackwardKernels,
    batch: int,
    nheads: int,
    nheads_kv: int,
    max_q: int,
    max_k: int,
    total_q: int | None,
    total_k: int | None,
) -> tuple[list[tuple[str, int, tuple[int, ...], tuple[int, ...], str]], int, int]:
    """Where FA4's scratch lives in one allocation: (name, offset, shape, strides, dtype) per
    region - dpsum, lse_log2, dq_accum, the tensor-map workspace, then what FA4 zeroes (the dK/dV
    accumulators and the deterministic semaphores), each 256-byte aligned - the total bytes, and
    the offset from which everything is zeroed per call. Remembered per call shape."""
    main = kern.main
    sc = scratch(main.variant.family, main.fields, batch, nheads, nheads_kv, max_q, max_k, total_q, total_k,
                 rt.target.num_sms)  # fmt: skip
    plan: list[tuple[str, tuple[int, ...] | None, str]] = [
        ("dpsum", sc.scratch, "fp32"),
        ("lse_log2", sc.scratch, "fp32"),
        ("dq_accum", sc.dq_accum, "fp32"),
        ("workspace", sc.workspace, "int64"),
        # zeroed per call from here on (torch.zeros in FA4)
        ("dk_accum", sc.dk_accum, "fp32"),
        ("dv_accum", sc.dv_accum, "fp32"),
        ("dq_semaphore", sc.dq_semaphore, "int32"),
        ("dk_semaphore", sc.dk_semaphore, "int32"),
        ("dv_semaphore", sc.dk_semaphore, "int32"),
    ]
    regions = []
    at = 0
    zero_at = None
    for name, sh, dt in plan:
        if name == "dk_accum":
            zero_at = at
        if sh is None:
            continue
        regions.append((name, at, sh, contiguous_strides(sh), dt))
        at += _padded_bytes(sh, 8 if dt == "int64" else 4)
    return regions, at, at if zero_at is None else zero_at


#: Scratch buffers in a workspace start on 256-byte boundaries (the 16 bytes FA4's kernels assume, with room).
WORKSPACE_ALIGN = 256


def _padded_bytes(shape: tuple[int, ...], itemsize: int = 4) -> int:
    return (itemsize * math.prod(shape) + WORKSPACE_ALIGN - 1) // WORKSPACE_ALIGN * WORKSPACE_ALIGN


def workspace(rt: Runtime, stream: int, nbytes: int) -> int:
    """The runtime's scratch for backward calls with raw-pointer inputs on ``stream``: one device
    allocation per stream, reused by later calls there (stream order keeps them apart) and
    replaced by a larger one when needed (after the stream's queued work, which may use it)."""
    kept = backward_workspaces(rt)
    have = kept.get(stream)
    if have is not None and have[1] >= nbytes:
        return have[0]
    if have is not None:
        rt.free_after(stream, have[0])
        del kept[stream]
    ptr = rt.driver.alloc(nbytes)
    kept[stream] = (ptr, nbytes)
    return ptr


def _zero(drv: Any, t: DeviceTensor, stream: int) -> None:
    """Zero a tensor of whole 32-bit words (fp32 accumulators; bf16/fp16 rows of even length)."""
    if t.strides != contiguous_strides(t.shape) or (math.prod(t.shape) * t.itemsize) % 4:
        raise ArgumentError(f"{t.shape}: fa4aot zeroes only contiguous tensors of whole 32-bit words")
    set_words(drv, t, 0, stream)


def _keep_until_done(bufs: list[Any], stream: int, on_current: bool) -> None:
    """PyTorch's and CuPy's caching allocators are ordered on the stream the scratch was
    allocated on (the current one): freeing it now lets them reuse it only for later work on that
    stream. Otherwise (JAX, or an explicit other stream) the scratch is kept until the next
    backward on the same stream."""
    if bufs and not (on_current and framework(bufs[0]) in ("torch", "cupy")):
        _PINNED[stream] = bufs


#: stream -> scratch of the last backward launched there that is not stream-ordered
_PINNED: BoundedDict = BoundedDict(64)


#: The tensors a prepared backward takes, in order (then the optional ones given at bind time),
#: with the positions of their descriptors in BwdCall.t and their base alignment in bytes.
_PREPARED_TENSORS = (("dout", 4, 16), ("q", 0, 16), ("k", 1, 16), ("v", 2, 16), ("out", 3, 16), ("lse", 5, 4),
                     ("dq", 12, 16), ("dk", 13, 16), ("dv", 14, 16))  # fmt: skip
_PREPARED_OPTIONAL = (("dlse", 6), ("cu_seqlens_q", 7), ("cu_seqlens_k", 8), ("seqused_q", 9), ("seqused_k", 10))


#: Alignment of a caller-given scratch buffer (FA4's scratch regions keep their 256-byte offsets).
SCRATCH_ALIGN = 256


def _in_scratch(ptr: int, base: int, nbytes: int, at_base: str) -> int | str:
    """A scratch address as the prepared call's source: relative to the scratch argument."""
    return f"({at_base} + {ptr - base})" if base <= ptr < base + nbytes and not at_base.isdigit() else ptr


#: :class:`BwdArgs` a prepared backward takes as keywords (the gradients are positional; a
#: learnable sink's gradient is allocated per call and the stream given per call: not prepared).
PREPARED_OPTIONS = tuple(n for n in BwdArgs._fields[6:] if n not in ("dq", "dk", "dv", "learnable_sink", "stream"))


def prepare_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    *,
    runtime: Runtime | None = None,
    **options: Any,
) -> Any:
    """Prepare FA4's backward for tensors shaped like these; ``options``: the keyword arguments of
    :func:`flash_attn_backward` (``cu_seqlens_q``, ``cu_seqlens_k``, ``seqused_q``, ``seqused_k``,
    ``max_seqlen_q``, ``max_seqlen_k``, ``softmax_scale``, ``causal``, ``window_size``,
    ``softcap``, ``deterministic``, ``dlse``: :data:`PREPARED_OPTIONS`); the gradients ``dq``,
    ``dk``, ``dv`` are written in place. The prepared call (:class:`fa4aot.runtime.prepared.Prepared`)
    takes ``(dout, q, k, v, out, lse, dq, dk, dv[, dlse][, cu_seqlens_q][, cu_seqlens_k][,
    seqused_q][, seqused_k])`` (those given here, see ``arg_names``) and ``stream=``; per call it
    checks the tensors match, zeroes what FA4 zeroes and launches FA4's kernels - nothing
    allocated, nothing synchronised (CUDA-graph capturable). FA4's scratch is allocated now and
    owned by the call (``close()`` frees it). A learnable sink (whose gradient FA4 allocates per
    call) is not prepared: use :func:`flash_attn_backward` for it."""
    unknown = sorted(set(options) - set(PREPARED_OPTIONS))
    if unknown:
        raise TypeError(
            f"prepare_backward() got unexpected keyword arguments {unknown}: it takes {', '.join(PREPARED_OPTIONS)} "
            "(a learnable sink's gradient is allocated per call: use flash_attn_backward for it)"
        )
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    a = BwdArgs(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, **options)
    given = {n: getattr(a, n) for n in ("dlse", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")}
    return bind_backward(rt, analyse(rt, a), [dout, q, k, v, out, lse, dq, dk, dv], given, None)


def scratch_bytes(rt: Runtime, c: BwdCall) -> int:
    """The bytes of FA4's scratch for the call ``c``."""
    return _layout(rt, c)[1]


def bind_backward(rt: Runtime, c: BwdCall, tensors: list[Any], given: dict[str, Any], scratch: Any) -> Any:
    """The prepared form of the analysed call ``c`` (:func:`prepare_backward`). ``scratch``: None
    (the call owns FA4's scratch), or an example framework buffer of :func:`scratch_bytes` bytes -
    then the scratch is the prepared call's last argument, a new buffer each call (the plain
    call's fast path, runtime/fastpath.py)."""
    from fa4aot.runtime.prepared import Prepared, _Steps, _torch_keys

    if c.kern is None:
        raise ArgumentError("prepare_backward: the call has no queries or no keys; call flash_attn_backward")
    names = [n for n, _, _ in _PREPARED_TENSORS] + [n for n, _ in _PREPARED_OPTIONAL if given[n] is not None]
    objs = tensors + [given[n] for n, _ in _PREPARED_OPTIONAL if given[n] is not None]
    at = dict((n, i) for n, i, _ in _PREPARED_TENSORS) | dict(_PREPARED_OPTIONAL)
    descs = [c.t[at[n]] for n in names]
    aligns = [a for _, _, a in _PREPARED_TENSORS] + [4] * (len(names) - len(_PREPARED_TENSORS))
    regions, total_bytes, zero_offset = _layout(rt, c)
    owned: list[Any] = []
    if scratch is None:
        base = rt.driver.alloc(total_bytes)
        owned.append(base)
        at_base = str(base)
    else:
        sd = as_device_tensor(scratch, "scratch")
        base, at_base = sd.ptr, f"p{len(names)}"
        names.append("scratch")
        objs.append(scratch)
        descs.append(sd)
        aligns.append(SCRATCH_ALIGN)
    try:
        steps = _Steps()
        if total_bytes > zero_offset:  # what FA4 zeroes (torch.zeros), on the call's stream
            memset, words = rt.driver.memset_d32, (total_bytes - zero_offset) // 4
            steps.python(lambda st, b: memset(b + zero_offset, 0, words, st), f"st, {at_base}")
        user = {id(d): f"p{i}" for i, d in enumerate(descs)}
        for lv, named in kernel_calls(rt, c, regions, base, 0):
            sources = {n: user.get(id(t)) or _in_scratch(t[0], base, total_bytes, at_base)
                       for n, t in named.items() if isinstance(t, DeviceTensor)}  # fmt: skip
            steps.bound(lv.plan.bind(named), sources)
        run = Prepared(rt, names, descs, aligns, _torch_keys(objs, descs), steps, owned)
    except BaseException:
        for ptr in owned:
            rt.driver.free(ptr)
        raise
    kern = c.kern
    run.variants = tuple(lv.variant for lv in kern if lv is not None)
    return run
