"""FA4's public functions, argument for argument: each serves a repeated call from its prepared
form (:mod:`fa4aot.runtime.fastpath`) and otherwise runs the full path (:mod:`.forward`,
:mod:`.backward`), which checks every argument and raises the typed errors. This module sits above
both, so the full paths never call back into the fast path.
"""

from __future__ import annotations

from typing import Any

from fa4aot.core.fa4_args import mirror
from fa4aot.runtime import fastpath, loader
from fa4aot.runtime.backward import BwdArgs, backward
from fa4aot.runtime.forward import forward  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.loader import Runtime

#: fa4aot's keyword-only extras after FA4's parameters.
EXTRAS = (("out", None), ("stream", None), ("runtime", None))

flash_attn_func = mirror(
    "flash_attn_func",
    """
    rt = runtime or loader._DEFAULT
    if (
        out is not None and rt is not None and stream is None and not return_lse and config is None
        and scales is None and learnable_sink is None
    ):  # a repeated call: launched from its prepared form (runtime/fastpath.py), first by the
        # serve of the key served last, else by the call's key
        f = rt.api_caches.get("fast_calls")
        f = None if f is None else f.dense
        r = -1 if f is None else f(q, k, v, out, softmax_scale, causal, window_size, softcap, num_splits, pack_gqa)
        if r == 1 or r == -1 and fastpath.dense(
            rt, q, k, v, out, softmax_scale, causal, window_size, softcap, num_splits, pack_gqa
        ):
            return out, None
    return forward(
        rt, q, k, v, None, None, None, None, None, None, softmax_scale, causal, window_size, num_splits,
        pack_gqa, return_lse, out, None, stream, None, learnable_sink, softcap, config=config, scales=scales,
    )
    """,
    globals(),
    extras=EXTRAS,
    doc="""FA4's ``flash_attn_func``, argument for argument (positional calls mean what they mean to
    FA4): attention over ``q`` (batch, seqlen_q, nheads, head_dim), ``k`` (batch, seqlen_k,
    nheads_kv, head_dim), ``v`` (batch, seqlen_k, nheads_kv, head_dim_v); returns ``(out, lse)``
    with ``out`` (batch, seqlen_q, nheads, head_dim_v) and ``lse`` (batch, nheads, seqlen_q) fp32
    or None. ``learnable_sink`` (nheads,) bf16/fp16/fp32; ``softcap`` >= 0 (0: off). FA4
    arguments fa4aot does not build (qv, gather_kv_indices, score_mod, mask_mod, aux tensors,
    block sparsity, ...) raise ArgumentError when given. ``deterministic`` concerns only the
    backward. Keyword-only extras: ``out``, ``stream`` (default: the framework's current
    stream), ``runtime``.""",
)

flash_attn_varlen_func = mirror(
    "flash_attn_varlen_func",
    """
    rt = runtime or loader._DEFAULT
    if (
        out is not None and rt is not None and stream is None and not return_lse and config is None
        and scales is None and scheduler_metadata is None
    ):  # a repeated call: launched from its prepared form (runtime/fastpath.py), first by the
        # serve of the key served last, else by the call's key
        f = rt.api_caches.get("fast_calls")
        f = None if f is None else f.fwd
        r = -1 if f is None else f(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, learnable_sink,
            max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, softcap, num_splits, pack_gqa,
        )
        if r == 1 or r < 0 and fastpath.forward(
            rt, q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
            page_table, learnable_sink, softmax_scale, causal, window_size, softcap, num_splits, pack_gqa,
        ):
            return out, None
    return forward(
        rt, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
        softmax_scale, causal, window_size, num_splits, pack_gqa, return_lse, out, scheduler_metadata, stream,
        page_table, learnable_sink, softcap, config=config, scales=scales,
    )
    """,
    globals(),
    extras=EXTRAS,
    doc="""FA4's ``flash_attn_varlen_func``, argument for argument. With ``cu_seqlens_q`` (batch+1,)
    int32, ``q`` is (total_q, nheads, head_dim) and ``out`` (total_q, nheads, head_dim_v), ``lse``
    (nheads, total_q); else ``q`` is batched. Likewise ``cu_seqlens_k`` for ``k``/``v``.
    ``seqused_q``/``seqused_k`` (batch,) limit the used length per batch entry.
    ``page_table`` (batch, max_pages) int32 with ``k``/``v`` a page pool (num_pages, page_size,
    nheads_kv, head_dim): FA4 loads pages by TMA when page_size equals the kernel's tile_n (128
    on SM100), by cp.async otherwise; not with ``cu_seqlens_k``. ``max_seqlen_q``/``max_seqlen_k``
    are host ints (FA4's tile and scheduler choices depend on them; they must bound every
    sequence; with a page table max_seqlen_k defaults to max_pages * page_size).
    ``scheduler_metadata``: a :class:`fa4aot.SchedulerMetadata` computed for this batch (split-KV
    varlen; reuse it across layers); without it fa4aot runs the prepare kernel itself.
    ``min_seqlen_k`` only matters to FA4's sparse (gather) path and is ignored. Arguments fa4aot
    does not build raise ArgumentError when given; keyword-only extras: ``out``, ``stream``,
    ``runtime``.""",
)


def flash_attn_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    softcap: float = 0.0,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    deterministic: bool = False,
    dq: Any = None,
    dk: Any = None,
    dv: Any = None,
    dlse: Any = None,
    learnable_sink: Any = None,
    stream: Any = None,
    *,
    runtime: Runtime | None = None,
) -> tuple[Any, ...]:
    """Gradients of FA4's attention: ``(dq, dk, dv)``, or ``(dq, dk, dv, dsink)`` with a
    ``learnable_sink``; FA4's ``_flash_attn_bwd`` semantics.

    Layouts are FA4's: q/out/dout (batch, seqlen_q, nheads, d) or, with ``cu_seqlens_q``,
    (total_q, nheads, d); k/v likewise with ``cu_seqlens_k``; ``lse`` (and ``dlse``, the
    gradient of a returned LSE) (batch, nheads, seqlen_q) or (nheads, total_q) fp32, as the
    forward returned it. ``dq``/``dk``/``dv``: preallocated outputs to write (else allocated
    with the inputs' framework). ``stream`` defaults to the framework's current stream.
    """
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    if dq is None and dk is None and dv is None and learnable_sink is None and stream is None:
        # a repeated call: launched from its prepared form (runtime/fastpath.py), first by the
        # serve of the key served last, else by the call's key
        f = rt.api_caches.get("fast_calls")
        f = None if f is None else f.bwd
        grads = -1 if f is None else f(
            dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
            max_seqlen_k, softmax_scale, causal, window_size, softcap, deterministic,
        )  # fmt: skip
        if grads == -1:
            grads = fastpath.backward(
                rt, dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q,
                max_seqlen_k, softmax_scale, causal, window_size, softcap, deterministic,
            )  # fmt: skip
        if grads:
            return grads
    return backward(rt, BwdArgs(
        dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap, cu_seqlens_q, cu_seqlens_k,
        seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, deterministic, dq, dk, dv, dlse, learnable_sink, stream,
    ))  # fmt: skip
