"""FA4's remaining engine entry points on the zero-JIT runtime: ``_flash_attn_bwd``,
``_flash_attn_fwd_combine`` and the public ``get_scheduler_metadata`` (4.0.0b40), with FA4's
signatures (plus fa4aot's keyword-only ``stream`` and ``runtime``), for engines that call them
and for :func:`fa4aot.patch`. Like :mod:`fa4aot.runtime.interface`, an argument of a path fa4aot
does not build raises ArgumentError naming it when it has a value other than FA4's default;
arguments FA4 itself ignores are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_args import mirror
from fa4aot.core.fa4_interface import forward_prepare_options, needs_prepare_kernel, resolve_window
from fa4aot.runtime import loader, validate
from fa4aot.runtime.combine import combine  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.entry import flash_attn_backward  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime.interface import check_arch
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.metadata import SchedulerMetadata

_flash_attn_bwd = mirror(
    "_flash_attn_bwd",
    """
    return flash_attn_backward(
        dout, q, k, v, out, lse, softmax_scale, causal, (window_size_left, window_size_right), softcap,
        cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, deterministic,
        dq, dk, dv, dlse, learnable_sink, stream, runtime=runtime,
    )
    """,
    globals(),
    extras=(("stream", None), ("runtime", None)),
    doc="""FA4's ``_flash_attn_bwd``: ``(dq, dk, dv)``, or ``(dq, dk, dv, dsink)`` with a learnable
    sink (note FA4's argument order: ``out`` before ``dout``). The legacy tile arguments
    (``IGNORED`` in :data:`fa4aot.core.fa4_args.FLASH_ATTN_BWD`) are ignored as FA4 ignores them; ``V_in_regs``, ``config``, score/mask
    mods, aux tensors and block sparsity are FA4 paths fa4aot does not build.""",
)


_flash_attn_fwd_combine = mirror(
    "_flash_attn_fwd_combine",
    """
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    check_arch(rt, _arch)
    combine(out_partial, lse_partial, out, lse, cu_seqlens, seqused, num_splits_dynamic_ptr, stream, runtime=rt)
    """,
    globals(),
    extras=(("stream", None), ("runtime", None)),
    doc="""FA4's ``_flash_attn_fwd_combine``: reduce split-KV partials into ``out`` (and ``lse``), FA4's
    layouts (see :func:`fa4aot.combine`). ``virtual_batch_idx`` (FA4's LPT batch sort, which FA4
    itself does not enable yet) and ``semaphore_to_reset`` are not built.""",
)


def dtype_name(dtype: Any) -> str:
    """fa4aot's name of a forward dtype given as FA4 takes it (``torch.bfloat16``) or by name."""
    text = str(dtype).removeprefix("torch.")
    names = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "fp16": "fp16"}
    if text not in names:
        raise ArgumentError(f"dtype: expected torch.bfloat16 or torch.float16 (or 'bf16' / 'fp16'), got {dtype!r}")
    return names[text]


def _batch_of(tensors: dict[str, Any], dev: int, rt: Runtime) -> int:
    """The batch size the sequence tensors agree on (FA4 asserts they agree)."""
    sizes = {}
    for name, obj in tensors.items():
        if obj is not None:
            t = validate.int32_vector_any(obj, name, dev, rt)
            sizes[name] = t[1][0] - 1 if name.startswith("cu_") else t[1][0]
    if not sizes:
        raise ArgumentError("get_scheduler_metadata needs one of cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k")
    if len(set(sizes.values())) != 1:
        raise ArgumentError(f"inconsistent batch size across inputs: {sizes}")
    batch = next(iter(sizes.values()))
    if batch < 1:
        raise ArgumentError(f"get_scheduler_metadata: batch must be >= 1, got {sizes}")
    return batch


def _scheduler_metadata(a: Any, stream: Any, runtime: Runtime | None) -> SchedulerMetadata:
    """The served part of FA4's ``get_scheduler_metadata`` (the mirror below refuses the rest)."""
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    check_arch(rt, a._arch)
    name = dtype_name(a.dtype)
    headdim, nheads, nheads_kv, num_splits = a.headdim, a.nheads, a.nheads_kv, a.num_splits
    headdim_v = headdim if a.headdim_v is None else a.headdim_v
    seqs = {n: getattr(a, n) for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")}
    batch = _batch_of(seqs, rt.device, rt)
    max_q, max_k = validate.seqlen(a.max_seqlen_q, "max_seqlen_q"), validate.seqlen(a.max_seqlen_k, "max_seqlen_k")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise ArgumentError(f"num_splits: expected an int, got {num_splits!r}")
    is_causal, local, wl, wr = resolve_window(bool(a.causal), a.window_size_left, a.window_size_right)
    sel = rt.selector
    arch = rt.info.compute_capability[0] * 10 + rt.info.compute_capability[1]
    # FA4's get_scheduler_metadata (interface.py 4622-4643): _get_fwd_inputs with these fields
    inputs = sel.FwdHeuristicInputs(
        device_arch=arch, num_sms=rt.target.num_sms, dtype=f"torch.{'bfloat16' if name == 'bf16' else 'float16'}",
        head_dim=headdim, head_dim_v=headdim_v, num_heads=nheads, num_heads_kv=nheads_kv, batch_size=batch,
        total_q=batch * max_q, total_k=batch * max_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        seqlen_k_per_split=None, causal=is_causal, local=local, window_size_left=wl, window_size_right=wr,
        has_cu_seqlens_q=a.cu_seqlens_q is not None, has_cu_seqlens_k=a.cu_seqlens_k is not None,
        has_seqused_q=a.seqused_q is not None, has_seqused_k=a.seqused_k is not None,
        has_caller_scheduler_metadata=True, pack_gqa=a.pack_gqa,
        requested_num_splits=None if num_splits < 1 else num_splits,
        disable_2cta=rt.knobs.disable_2cta, disable_s_ping_pong=rt.knobs.disable_s_ping_pong,
        requested_use_swapab=False,
    )  # fmt: skip
    try:
        config = sel.select_fwd_config(inputs)
    except (ValueError, AssertionError) as e:
        raise ArgumentError(f"FA4 rejects this call: {e}") from None
    # the kernel's split rule for this config (FA4's SwapAB rule only for SwapAB, excluded here)
    options = forward_prepare_options(sel, config, headdim)
    md = SchedulerMetadata(
        batch, nheads, nheads_kv, headdim, headdim_v, causal=is_causal, pack_gqa=bool(config.pack_gqa),
        tile_m=config.tile_m, tile_n=config.tile_n, semaphore=not config.use_clc_scheduler, options=options,
        prepare=needs_prepare_kernel(config.num_splits, is_causal), runtime=rt,
    )  # fmt: skip
    return md.compute(
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        num_splits=config.num_splits,
        stream=stream,
        **{n: t for n, t in seqs.items() if t is not None},
    )


get_scheduler_metadata = mirror(
    "get_scheduler_metadata",
    """
    return _scheduler_metadata({args}, stream, runtime)
    """,
    globals(),
    extras=(("stream", None), ("runtime", None)),
    doc="""FA4's public ``get_scheduler_metadata``: FA4's selector picks the forward config a call with
    caller metadata would run (SwapAB excluded, as FA4 does), and the prepare kernel computes that
    config's metadata on ``stream``. Returns a :class:`fa4aot.SchedulerMetadata`, which fa4aot's
    forward takes as ``scheduler_metadata`` (FA4's own forward does not: it takes FA4's tensors).
    ``dtype``: the attention inputs' dtype (``torch.bfloat16`` or ``torch.float16``, or a name).""",
)


__all__ = ["_flash_attn_bwd", "_flash_attn_fwd_combine", "get_scheduler_metadata"]
