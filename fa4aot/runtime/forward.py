"""``fa4aot.flash_attn_func`` / ``flash_attn_varlen_func``: FA4's forward API on the zero-JIT runtime.

Same signatures as ``flash_attn.cute`` where they overlap (switching is one import change), same
return value ``(out, lse)`` (``lse`` is None unless ``return_lse``). Tensors may come from
PyTorch, CuPy or JAX (DLPack) or be :class:`fa4aot.RawTensor`; outputs are allocated with the
caller's framework when ``out`` is not given (raw pointers must pass ``out``). The stream defaults
to the framework's current stream (PyTorch, CuPy), else the legacy default stream.

A call picks the cached variant FA4 would run (:mod:`fa4aot.runtime.dispatch`, decided once per call
signature), then launches: [prepare ->] forward [-> combine] on the stream. Nothing on this path
synchronises the host or allocates when ``out`` (and, for split-KV varlen, ``scheduler_metadata``)
is given, so calls can be captured in a CUDA graph (run once before capturing, to load the kernels).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.runtime import validate
from fa4aot.runtime.combine import combine
from fa4aot.runtime.dispatch import Call, Decision, decide
from fa4aot.runtime.loader import Runtime, default_runtime
from fa4aot.runtime.metadata import SchedulerMetadata
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor, stream_handle

_FRAMEWORK_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def flash_attn_func(
    q: Any,
    k: Any,
    v: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    return_lse: bool = False,
    out: Any = None,
    stream: Any = None,
    *,
    runtime: Runtime | None = None,
) -> tuple[Any, Any]:
    """Attention over ``q`` (batch, seqlen_q, nheads, head_dim), ``k`` (batch, seqlen_k,
    nheads_kv, head_dim), ``v`` (batch, seqlen_k, nheads_kv, head_dim_v); returns ``(out, lse)``
    with ``out`` (batch, seqlen_q, nheads, head_dim_v) and ``lse`` (batch, nheads, seqlen_q) fp32."""
    return _forward(
        q,
        k,
        v,
        None,
        None,
        None,
        None,
        None,
        None,
        softmax_scale,
        causal,
        window_size,
        num_splits,
        pack_gqa,
        return_lse,
        out,
        None,
        stream,
        runtime,
    )


def flash_attn_varlen_func(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    return_lse: bool = False,
    out: Any = None,
    scheduler_metadata: SchedulerMetadata | None = None,
    stream: Any = None,
    *,
    runtime: Runtime | None = None,
) -> tuple[Any, Any]:
    """Variable-length attention. With ``cu_seqlens_q`` (batch+1,) int32, ``q`` is (total_q,
    nheads, head_dim) and ``out`` (total_q, nheads, head_dim_v), ``lse`` (nheads, total_q); else
    ``q`` is batched. Likewise ``cu_seqlens_k`` for ``k``/``v``. ``seqused_q``/``seqused_k`` (batch,)
    limit the used length per batch entry. ``max_seqlen_q``/``max_seqlen_k`` are host ints (FA4's
    tile and scheduler choices depend on them; they must bound every sequence).
    ``scheduler_metadata``: a :class:`fa4aot.SchedulerMetadata` computed for this batch (split-KV
    varlen; reuse it across layers); without it fa4aot runs the prepare kernel itself."""
    return _forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        seqused_q,
        seqused_k,
        softmax_scale,
        causal,
        window_size,
        num_splits,
        pack_gqa,
        return_lse,
        out,
        scheduler_metadata,
        stream,
        runtime,
    )


def _forward(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    su_q,
    su_k,
    softmax_scale,
    causal,
    window_size,
    num_splits,
    pack_gqa,
    return_lse,
    out,
    metadata,
    stream,
    runtime,
) -> tuple[Any, Any]:
    rt = runtime or default_runtime()
    dev = rt.device
    varlen_q, varlen_k = cu_q is not None, cu_k is not None
    qd = validate.tensor(q, "q", dtypes=("bf16", "fp16"), rank=3 if varlen_q else 4, device=dev, stride_multiple=8)
    kd = validate.tensor(k, "k", dtypes=(qd.dtype,), rank=3 if varlen_k else 4, device=dev, stride_multiple=8)
    vd = validate.tensor(v, "v", dtypes=(qd.dtype,), rank=3 if varlen_k else 4, device=dev, stride_multiple=8)
    nheads, head_dim = qd.shape[-2:]
    nheads_kv, head_dim_v = vd.shape[-2:]
    if kd.shape[:-1] != vd.shape[:-1] or kd.shape[-1] != head_dim:
        raise ArgumentError(f"k {kd.shape} and v {vd.shape} must agree (and k's head_dim equal q's {head_dim})")
    if nheads_kv < 1 or nheads % nheads_kv:
        raise ArgumentError(f"q has {nheads} heads, k/v {nheads_kv}: nheads must be a multiple of nheads_kv")
    named: dict[str, Any] = {"q": qd, "k": kd, "v": vd}
    if varlen_q:
        cu = validate.tensor(cu_q, "cu_seqlens_q", dtypes=("int32",), rank=1, device=dev, align=4)
        batch = cu.shape[0] - 1
        if batch < 1:
            raise ArgumentError("cu_seqlens_q: needs batch + 1 >= 2 entries")
        named["cu_seqlens_q"] = cu
        total_q = qd.shape[0]
        max_q = total_q if max_q is None else max_q
    else:
        batch, seqlen_q = qd.shape[0], qd.shape[1]
        if max_q is not None and max_q != seqlen_q:
            raise ArgumentError(f"max_seqlen_q ({max_q}) must equal q's seqlen ({seqlen_q}) without cu_seqlens_q")
        max_q = seqlen_q
    if varlen_k:
        ck = validate.int32_vector(cu_k, "cu_seqlens_k", batch + 1, dev)
        named["cu_seqlens_k"] = ck
        max_k = kd.shape[0] if max_k is None else max_k
    else:
        if kd.shape[0] != batch:
            raise ArgumentError(f"k: batch {kd.shape[0]} != q's batch {batch}")
        max_k = kd.shape[1] if max_k is None else max_k
    if su_q is not None:
        named["seqused_q"] = validate.int32_vector(su_q, "seqused_q", batch, dev)
    if su_k is not None:
        named["seqused_k"] = validate.int32_vector(su_k, "seqused_k", batch, dev)
    validate.fits_int32(max_q, "max_seqlen_q")
    validate.fits_int32(max_k, "max_seqlen_k")

    wl, wr = window_size if window_size is not None else (None, None)
    key = (
        qd.dtype,
        batch,
        max_q,
        max_k,
        nheads,
        nheads_kv,
        head_dim,
        head_dim_v,
        bool(causal),
        wl,
        wr,
        varlen_q,
        varlen_k,
        su_q is not None,
        su_k is not None,
        num_splits,
        pack_gqa,
        bool(return_lse),
        metadata is not None,
    )
    hit = rt.memo.get(key)
    if hit is None:
        call = Call(rt.target.arch, rt.target.num_sms, *key)
        d = decide(call)
        lv = rt.load(rt.variant_for("fwd_sm90" if rt.target.arch == "sm_90a" else "fwd_sm100", **d.fields))
        hit = rt.memo[key] = (d, lv, call, any(a.name == "max_seqlen_q" for a in lv.plan.signature))
    d, lv, call, takes_max_q = hit
    split = d.fields.get("split_kv", False)
    if metadata is not None and not (varlen_q or su_q is not None):
        raise ArgumentError("scheduler_metadata is for varlen queries (cu_seqlens_q or seqused_q)")

    s = _default_stream(q) if stream is None else stream_handle(stream)
    rows = (qd.shape[0],) if varlen_q else (batch, qd.shape[1])
    lse_shape = (nheads, rows[0]) if varlen_q else (batch, nheads, rows[1])
    if out is None:
        out = _alloc_like(q, (*rows, nheads, head_dim_v), qd.dtype)
    od = validate.tensor(out, "out", dtypes=(qd.dtype,), rank=len(rows) + 2, device=dev, stride_multiple=8)
    validate.shape(od, "out", (*rows, nheads, head_dim_v), "q's shape with head_dim_v")
    lse = _alloc_like(q, lse_shape, "fp32") if return_lse else None
    ld = as_device_tensor(lse, "lse") if lse is not None else None

    if split:
        out_partial = _alloc_like(q, (d.num_splits, *rows, nheads, head_dim_v), "fp32")
        lse_partial = _alloc_like(q, (d.num_splits, *lse_shape), "fp32")
        named["out"] = as_device_tensor(out_partial, "out_partial")
        named["lse"] = as_device_tensor(lse_partial, "lse_partial")
    else:
        named["out"] = od
        if ld is not None:
            named["lse"] = ld
    named["softmax_scale"] = (1.0 / math.sqrt(head_dim)) if softmax_scale is None else float(softmax_scale)
    if d.local:
        # fa4aot's local variants take both window edges; an open edge is the whole sequence
        named["window_size_left"] = max_k + max_q if d.window_left is None else d.window_left
        named["window_size_right"] = max_k + max_q if d.window_right is None else d.window_right
    md = None
    if d.fields.get("scheduler") == "dynamic":
        md = metadata if metadata is not None else _auto_metadata(rt, d, call, named, s)
        _check_metadata(md, batch, d)
        for name in ("num_splits_dynamic", "tile_count_semaphore"):
            named[name] = as_device_tensor(getattr(md, name), name)
        if d.causal:
            named["num_nheads_in_l2"] = as_device_tensor(md.num_nheads_in_l2, "num_nheads_in_l2")
    if takes_max_q:
        named["max_seqlen_q"] = max_q
    named["stream"] = s
    rt.launch(lv, lv.plan.pack(named), s)
    if split:
        lse_c = _transposed(lse) if lse is not None else None
        combine(
            out_partial,
            _transposed(lse_partial),
            out,
            lse_c,
            cu_seqlens=cu_q,
            seqused=su_q if varlen_q else None,
            num_splits_dynamic=md.num_splits_dynamic if md is not None else None,
            stream=s,
            runtime=rt,
        )
    if metadata is not None and md is metadata:
        md.reset_semaphore(s)  # the forward counted it up; zero it for the next use (FA4 does the same)
    return out, lse


def _check_metadata(md: SchedulerMetadata, batch: int, d: Decision) -> None:
    if not isinstance(md, SchedulerMetadata):
        raise ArgumentError("scheduler_metadata must be a fa4aot.SchedulerMetadata")
    if md.batch_size != batch:
        raise ArgumentError(f"scheduler_metadata was made for batch {md.batch_size}, this call has {batch}")
    if md.num_splits is None:
        raise ArgumentError("scheduler_metadata has not been computed (call .compute(...))")
    if d.causal and md.num_nheads_in_l2 is None:
        raise ArgumentError("scheduler_metadata was made with causal=False for a causal call")


def _auto_metadata(rt: Runtime, d: Decision, call: Call, named: dict[str, Any], stream: int) -> SchedulerMetadata:
    """Prepare-kernel metadata for a split-KV varlen call, like FA4's automatic path. The buffers
    are cached per (stream, configuration), so repeated calls allocate nothing."""
    key = (
        "auto-metadata",
        stream,
        call.batch,
        call.nheads,
        call.nheads_kv,
        call.head_dim,
        call.head_dim_v,
        d.causal,
        d.fields["pack_gqa"],
        d.fields["tile_m"],
        d.fields["tile_n"],
    )
    md = rt.memo.get(key)
    if md is None:
        md = rt.memo[key] = SchedulerMetadata(
            call.batch,
            call.nheads,
            call.nheads_kv,
            call.head_dim,
            call.head_dim_v,
            causal=d.causal,
            pack_gqa=d.fields["pack_gqa"],
            tile_m=d.fields["tile_m"],
            tile_n=d.fields["tile_n"],
            runtime=rt,
        )
    md.compute(
        max_seqlen_q=call.max_seqlen_q,
        max_seqlen_k=call.max_seqlen_k,
        num_splits=d.num_splits,
        cu_seqlens_q=named.get("cu_seqlens_q"),
        cu_seqlens_k=named.get("cu_seqlens_k"),
        seqused_q=named.get("seqused_q"),
        seqused_k=named.get("seqused_k"),
        stream=stream,
    )
    return md


def _framework(obj: Any) -> str:
    mod = type(obj).__module__.split(".")[0]
    if mod in ("torch", "cupy"):
        return mod
    if mod in ("jax", "jaxlib"):
        return "jax"
    return "raw"


def _alloc_like(ref: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """An empty tensor on ``ref``'s device, made by ``ref``'s own framework (already imported by
    the caller, so nothing new is imported here)."""
    fw = _framework(ref)
    if fw == "torch":
        torch = sys.modules["torch"]
        return ref.new_empty(shape, dtype=getattr(torch, _FRAMEWORK_DTYPES[dtype]))
    if fw == "cupy":
        cp = sys.modules["cupy"]
        if dtype == "bf16":
            raise ArgumentError("CuPy has no bfloat16 arrays: pass out= (or use fp16)")
        with ref.device:
            return cp.empty(shape, dtype=getattr(cp, _FRAMEWORK_DTYPES[dtype]))
    if fw == "jax":
        jnp = sys.modules["jax.numpy"]
        return jnp.empty(shape, dtype=getattr(jnp, _FRAMEWORK_DTYPES[dtype]), device=next(iter(ref.devices())))
    raise ArgumentError(
        f"cannot allocate a {dtype}{list(shape)} output for raw pointers: pass out= (and use num_splits=1 and "
        "return_lse=False, or call the kernels through a framework)"
    )


def _transposed(t: Any) -> Any:
    """The last two dimensions swapped, as a view in the tensor's framework (or a descriptor)."""
    if isinstance(t, DeviceTensor):
        s, st = list(t.shape), list(t.strides)
        s[-1], s[-2], st[-1], st[-2] = s[-2], s[-1], st[-2], st[-1]
        return t._replace(shape=tuple(s), strides=tuple(st))
    fw = _framework(t)
    if fw == "torch":
        return t.transpose(-1, -2)
    if fw == "cupy":
        return t.swapaxes(-1, -2)
    return _transposed(as_device_tensor(t, "lse"))


def _default_stream(ref: Any) -> int:
    """The caller's framework's current stream (FA4 launches on torch's current stream)."""
    fw = _framework(ref)
    if fw == "torch":
        torch = sys.modules["torch"]
        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the fast accessor, if present
        return raw(ref.get_device()) if raw is not None else torch.cuda.current_stream(ref.device).cuda_stream
    if fw == "cupy":
        return sys.modules["cupy"].cuda.get_current_stream().ptr
    return 0
