"""PyTorch autograd for fa4aot: ``fa4aot.torch.flash_attn_func`` / ``flash_attn_varlen_func``,
FA4's differentiable API on the zero-JIT runtime (the subset fa4aot builds).

The one module of fa4aot that imports torch. The forward and backward are ``torch.library``
ops (``fa4aot::fwd``, ``fa4aot::bwd``) with Meta (fake) implementations and the backward
registered as the forward's autograd formula, so ``torch.compile`` treats them as opaque ops
(no graph break, no tracing into fa4aot), and everything they allocate comes from PyTorch's
caching allocator on the current stream (CUDA-graph capturable, as FA4's are).

Same signatures as ``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func`` for what
fa4aot builds (FA4 paths fa4aot does not build raise ``ArgumentError``); returns ``(out, lse)``
like FA4 (``lse`` None unless ``return_lse``). The forward always computes the LSE, which the
backward needs (FA4 does the same when an input requires grad).
"""

from __future__ import annotations

import math
import weakref
from collections import namedtuple
from typing import Any

import torch

from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_args import mirror
from fa4aot.runtime import loader
from fa4aot.runtime.entry import flash_attn_backward
from fa4aot.runtime.forward import forward
from fa4aot.runtime.metadata import SchedulerMetadata


def _win(w: int) -> int | None:
    return None if w == _NONE else w


#: How an absent window edge travels through the custom ops (their schema takes plain ints).
_NONE = -(2**62)
#: Scheduler metadata travels through the forward op as an int (its schema takes no Python
#: objects): the id of a live fa4aot.SchedulerMetadata registered here (0: none).
_METADATA: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _metadata_id(md: Any) -> int:
    if md is None:
        return 0
    if not isinstance(md, SchedulerMetadata):
        raise ArgumentError(
            "scheduler_metadata must be a fa4aot.SchedulerMetadata (FA4's metadata tensors come from FA4's own "
            "prepare kernel; get fa4aot's from get_scheduler_metadata)"
        )
    _METADATA[id(md)] = md
    return id(md)


def _fields(schema: str) -> tuple[str, ...]:
    """The argument names of an op's schema, in order (the schema is the one statement of them)."""
    params = schema[schema.index("(") + 1 : schema.index(") ->")]
    return tuple(p.split()[-1] for p in params.split(","))


#: The ops' schemas: every argument crosses the op boundary by position, in this order.
_FWD_SCHEMA = (
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_q, "
    "Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k, float softmax_scale, bool causal, int window_left, "
    "int window_right, Tensor? learnable_sink, float softcap, int num_splits, bool? pack_gqa, bool return_lse, "
    "bool deterministic, bool requires_grad, int metadata_id) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor? cu_seqlens_q, "
    "Tensor? cu_seqlens_k, Tensor? seqused_q, Tensor? seqused_k, int? max_seqlen_q, int? max_seqlen_k, "
    "float softmax_scale, bool causal, int window_left, int window_right, Tensor? learnable_sink, float softcap, "
    "bool deterministic) -> Tensor[]"
)
_FwdArgs = namedtuple("_FwdArgs", _fields(_FWD_SCHEMA))
_BwdArgs = namedtuple("_BwdArgs", _fields(_BWD_SCHEMA))
#: What the forward saves for the backward (besides out and lse), and the scalars it keeps.
_SAVED = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "learnable_sink")
_KEPT = ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "window_left", "window_right", "softcap")


def _fwd(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = _FwdArgs(*args)
    # return_lse only tells the autograd formula whether a gradient of the LSE is meaningful
    md = _METADATA.get(a.metadata_id) if a.metadata_id else None
    if a.metadata_id and md is None:
        raise ArgumentError("scheduler_metadata: the SchedulerMetadata this call was traced with no longer exists")
    out, lse = forward(
        None, a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, a.seqused_q,
        a.seqused_k, a.softmax_scale, a.causal, (_win(a.window_left), _win(a.window_right)), a.num_splits,
        a.pack_gqa, True, None, md, None, None, a.learnable_sink, a.softcap, requires_grad=a.requires_grad,
    )  # fmt: skip
    return out, lse


def _fwd_fake(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = _FwdArgs(*args)
    q = a.q
    out = q.new_empty((*q.shape[:-1], a.v.shape[-1]))
    if a.cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def _bwd(*args: Any) -> list[torch.Tensor]:
    a = _BwdArgs(*args)
    # PyTorch runs the backward on its autograd thread, where the driver may have no current
    # context (the runtime API binds one lazily): bind q's device's primary context
    rt = loader._DEFAULT or loader.default_runtime()
    rt.driver.ensure_context(a.q.get_device())
    res = flash_attn_backward(
        a.dout, a.q, a.k, a.v, a.out, a.lse, a.softmax_scale, a.causal, (_win(a.window_left), _win(a.window_right)),
        a.softcap, a.cu_seqlens_q, a.cu_seqlens_k, a.seqused_q, a.seqused_k, a.max_seqlen_q, a.max_seqlen_k,
        a.deterministic, dlse=a.dlse, learnable_sink=a.learnable_sink,
    )  # fmt: skip
    return list(res)


def _bwd_fake(*args: Any) -> list[torch.Tensor]:
    a = _BwdArgs(*args)
    grads = [torch.empty_like(a.q), torch.empty_like(a.k), torch.empty_like(a.v)]
    if a.learnable_sink is not None:
        grads.append(torch.empty_like(a.learnable_sink))
    return grads


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    a = _FwdArgs(*inputs)._asdict()
    out, lse = output
    ctx.save_for_backward(out, lse, *(a[n] for n in _SAVED))
    ctx.args = {n: a[n] for n in _KEPT}
    ctx.deterministic = a["deterministic"]
    ctx.return_lse = a["return_lse"]
    ctx.set_materialize_grads(False)  # FA4: an unused output's gradient stays None


def _backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple:
    out, lse, *saved = ctx.saved_tensors
    s = dict(zip(_SAVED, saved))
    if dout is None:
        dout = torch.zeros_like(out)
    dlse = _dense(dlse) if ctx.return_lse else None
    grads = torch.ops.fa4aot.bwd(*_BwdArgs(
        dout=_dense(dout), out=out, lse=lse, dlse=dlse, deterministic=ctx.deterministic, **s, **ctx.args
    ))  # fmt: skip
    # one gradient per forward input: q, k, v and the sink's; None for the rest
    got = dict(zip(("q", "k", "v"), grads[:3]))
    got["learnable_sink"] = grads[3] if s["learnable_sink"] is not None else None
    return tuple(got.get(n) for n in _FwdArgs._fields)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with a contiguous last dimension and no broadcast (stride 0) dimension: gradients
    often arrive expanded (``out.sum()`` gives a stride-0 tensor of ones)."""
    if t is None or (t.stride(-1) == 1 and 0 not in t.stride()):
        return t
    return t.contiguous()


# The ops: defined with explicit schemas on a torch.library.Library (custom_op's schema inference
# and source lookups cost ~10 ms of start-up), CUDA kernels, Meta kernels (what FakeTensor and
# torch.compile trace with), and the backward as the forward's autograd formula.
_LIB = torch.library.Library("fa4aot", "DEF")
_LIB.define(_FWD_SCHEMA)
_LIB.define(_BWD_SCHEMA)
_LIB.impl("fwd", _fwd, "CUDA")
_LIB.impl("fwd", _fwd_fake, "Meta")
_LIB.impl("bwd", _bwd, "CUDA")
_LIB.impl("bwd", _bwd_fake, "Meta")
torch.library.register_autograd("fa4aot::fwd", _backward, setup_context=_setup_context, lib=_LIB)


def _call(
    q, k, v, cu_q, cu_k, su_q, su_k, max_q, max_k, softmax_scale, causal, window_size, learnable_sink, softcap,
    num_splits, pack_gqa, return_lse, deterministic, scheduler_metadata=None,
):  # fmt: skip
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    wl, wr = (None, None) if window_size is None else window_size
    # FA4 selects a training forward when an input requires grad (interface.py 659-661)
    requires_grad = any(t is not None and t.requires_grad for t in (q, k, v, learnable_sink))
    out, lse = torch.ops.fa4aot.fwd(
        q, k, v, cu_q, cu_k, su_q, su_k, max_q, max_k, scale, bool(causal), _NONE if wl is None else int(wl),
        _NONE if wr is None else int(wr), learnable_sink, float(softcap or 0.0), int(num_splits), pack_gqa,
        bool(return_lse), bool(deterministic), requires_grad, _metadata_id(scheduler_metadata),
    )  # fmt: skip
    return out, (lse if return_lse else None)


flash_attn_func = mirror(
    "flash_attn_func",
    """
    return _call(
        q, k, v, None, None, None, None, None, None, softmax_scale, causal, window_size, learnable_sink, softcap,
        num_splits, pack_gqa, return_lse, deterministic,
    )
    """,
    globals(),
    check="autograd",
    doc="""FA4's differentiable ``flash_attn_func``: ``(out, lse)`` for q (batch, seqlen_q, nheads,
    d), k / v (batch, seqlen_k, nheads_kv, d / d_v); gradients flow to q, k, v (and a learnable
    sink) through FA4's backward kernels.""",
)


flash_attn_varlen_func = mirror(
    "flash_attn_varlen_func",
    """
    return _call(
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
        window_size, learnable_sink, softcap, num_splits, pack_gqa, return_lse, deterministic, scheduler_metadata,
    )
    """,
    globals(),
    check="autograd",
    doc="""FA4's differentiable ``flash_attn_varlen_func`` (packed sequences with ``cu_seqlens_q`` /
    ``cu_seqlens_k``, optional ``seqused_q`` / ``seqused_k``; ``scheduler_metadata`` from
    ``get_scheduler_metadata`` serves the forward); a paged KV cache has no backward.""",
)


__all__ = ["flash_attn_func", "flash_attn_varlen_func"]
