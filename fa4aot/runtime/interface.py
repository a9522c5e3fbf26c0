"""FA4's engine entry points, for engines that call FA4's private interface (vLLM's FA4 backend
calls ``flash_attn.cute.interface._flash_attn_fwd``): switching is one import,
``from fa4aot.interface import _flash_attn_fwd``.

Same signatures, same results for what fa4aot builds; an argument of a path fa4aot does not build
(qv, score_mod, mask_mod, block sparsity, gather_kv_indices, tile overrides, ...)
raises ArgumentError naming it when it is given a non-default value.
"""

from __future__ import annotations

from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_args import mirror
from fa4aot.core.fa4_interface import PrepareOptions, needs_prepare_kernel
from fa4aot.runtime import loader  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.fastpath import forward as _fast  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.forward import forward  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.metadata import SchedulerMetadata


def check_arch(rt: Runtime, arch: int | None) -> None:
    """FA4's ``_arch`` (e.g. 90) must name this runtime's device: fa4aot runs what it has."""
    if arch is not None:
        cc = rt.info.compute_capability
        if arch != cc[0] * 10 + cc[1]:
            raise ArgumentError(f"_arch: {arch} is not this runtime's device (sm_{cc[0]}{cc[1]})")


_flash_attn_fwd = mirror(
    "_flash_attn_fwd",
    """
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    if q is None or k is None:
        raise ArgumentError("q and k are required (fa4aot does not build FA4's MLA forms without them)")
    if _arch is not None:
        check_arch(rt, _arch)
    if (
        out is not None and lse is None and stream is None and not return_lse and config is None and scales is None
        and scheduler_metadata is None and tile_mn is None and mma_pv_is_rs is None and intra_wg_overlap is None
    ):  # a repeated call: launched from its prepared form (runtime/fastpath.py), first by the
        # serve of the key served last, else by the call's key
        window = (window_size_left, window_size_right)
        f = rt.api_caches.get("fast_calls")
        f = None if f is None else f.fwd
        r = -1 if f is None else f(
            q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, page_table, learnable_sink,
            max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap, num_splits, pack_gqa,
        )
        if r == 1 or r < 0 and _fast(
            rt, q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k,
            page_table, learnable_sink, softmax_scale, causal, window, softcap, num_splits, pack_gqa,
        ):
            return out, None, None, None, None
    out, lse = forward(
        rt, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale,
        causal, (window_size_left, window_size_right), num_splits, pack_gqa, return_lse, out, scheduler_metadata,
        stream, page_table, learnable_sink, softcap, lse, config=config,
        requests=(_tile_request(tile_mn), mma_pv_is_rs, intra_wg_overlap), scales=scales,
    )
    return out, lse, None, None, None
    """,
    globals(),
    extras=(("stream", None), ("runtime", None)),
    doc="""FA4's ``_flash_attn_fwd`` (4.0.0b40): returns ``(out, lse, None, None, None)`` like FA4
    (its last three are MLA outputs). ``q``, ``k``, ``v`` batched, varlen (``cu_seqlens_*``) or
    with a paged KV pool (``page_table``); ``lse``: a preallocated LSE to fill. ``tile_mn``,
    ``mma_pv_is_rs``, ``intra_wg_overlap`` are FA4's requests to its selector and ``config`` an
    explicit FwdConfig (FA4 validates it): served when the cache holds the variant. ``scales``:
    FA4's TensorwiseScales (FP8 descales) or BlockScales (MXFP8), SM100-family only. ``stream``
    and ``runtime`` are fa4aot's keyword-only extras.""",
)


def _tile_request(tile_mn: Any) -> tuple[int, int] | None:
    """FA4's ``tile_mn`` argument as a hashable pair (checked: two positive ints)."""
    if tile_mn is None:
        return None
    try:
        m, n = tile_mn
    except (TypeError, ValueError):
        raise ArgumentError(f"tile_mn: expected (tile_m, tile_n), got {tile_mn!r}") from None
    if not all(x.__class__ is int and x > 0 for x in (m, n)):
        raise ArgumentError(f"tile_mn: expected two positive ints, got {tile_mn!r}")
    return m, n


def _scheduler_metadata(a: Any, stream: Any, runtime: Any) -> SchedulerMetadata:
    """The served part of FA4's ``_get_scheduler_metadata`` (the mirror below refuses the rest)."""
    md = SchedulerMetadata(
        a.num_batch, a.nheads, a.nheads_kv, a.headdim, a.headdim_v, causal=a.causal, pack_gqa=bool(a.pack_gqa),
        tile_m=a.tile_m, tile_n=a.tile_n,
        semaphore=not a.use_clc_scheduler,  # FA4 allocates no semaphore for its CLC scheduler
        options=PrepareOptions.of_call(a), prepare=needs_prepare_kernel(a.num_splits, a.causal), runtime=runtime,
    )  # fmt: skip
    seqs = {n: getattr(a, n) for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")}
    return md.compute(
        max_seqlen_q=a.max_seqlen_q, max_seqlen_k=a.max_seqlen_k, num_splits=a.num_splits, stream=stream, **seqs
    )


_get_scheduler_metadata = mirror(
    "_get_scheduler_metadata",
    """
    return _scheduler_metadata({args}, stream, runtime)
    """,
    globals(),
    extras=(("stream", None), ("runtime", None)),
    doc="""FA4's ``_get_scheduler_metadata``: the varlen scheduler metadata, computed on the device by
    FA4's prepare kernel, as a :class:`fa4aot.SchedulerMetadata` to pass to the forward.""",
)
