"""fa4aot: ahead-of-time compiled FlashAttention-4 kernels, launched with zero JIT.

Run-time API (cuda-python only; never imports cutlass, flash_attn, tvm_ffi or torch)::

    import fa4aot
    fa4aot.open_runtime("cache/")          # optional: default is $FA4AOT_CACHE or ./cache
    fa4aot.combine(out_partial, lse_partial, out, lse)
    md = fa4aot.SchedulerMetadata(batch, nheads, nheads_kv, headdim, causal=True)
    md.compute(max_seqlen_q=..., max_seqlen_k=..., num_splits=8, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

Names are resolved lazily so ``import fa4aot`` costs almost nothing and touches no GPU.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "combine": ("fa4aot.runtime.combine", "combine"),
    "SchedulerMetadata": ("fa4aot.runtime.metadata", "SchedulerMetadata"),
    "Runtime": ("fa4aot.runtime.loader", "Runtime"),
    "open_runtime": ("fa4aot.runtime.loader", "open_runtime"),
    "default_runtime": ("fa4aot.runtime.loader", "default_runtime"),
    "RawTensor": ("fa4aot.runtime.tensors", "RawTensor"),
    "TensorwiseScales": ("fa4aot.runtime.scales", "TensorwiseScales"),
    "BlockScales": ("fa4aot.runtime.scales", "BlockScales"),
    "flash_attn_func": ("fa4aot.runtime.entry", "flash_attn_func"),
    "flash_attn_varlen_func": ("fa4aot.runtime.entry", "flash_attn_varlen_func"),
    "flash_attn_fwd": ("fa4aot.runtime.interface", "_flash_attn_fwd"),
    "flash_attn_backward": ("fa4aot.runtime.entry", "flash_attn_backward"),
    "prepare_forward": ("fa4aot.runtime.prepared", "prepare_forward"),
    "prepare_combine": ("fa4aot.runtime.prepared", "prepare_combine"),
    "prepare_backward": ("fa4aot.runtime.backward", "prepare_backward"),
    "Prepared": ("fa4aot.runtime.prepared", "Prepared"),
    "VaryingForward": ("fa4aot.runtime.varying", "VaryingForward"),
    "Fa4aotError": ("fa4aot.core.errors", "Fa4aotError"),
    "ArgumentError": ("fa4aot.core.errors", "ArgumentError"),
    "FA4RejectsError": ("fa4aot.core.errors", "FA4RejectsError"),
    "VariantNotFoundError": ("fa4aot.core.errors", "VariantNotFoundError"),
    "DeviceMismatchError": ("fa4aot.core.errors", "DeviceMismatchError"),
    "CorruptArtifactError": ("fa4aot.core.errors", "CorruptArtifactError"),
    "stats": ("fa4aot.runtime.loader", "stats"),
    "RuntimeStats": ("fa4aot.runtime.stats", "RuntimeStats"),
    # the drop-in (docs/drop-in.md): FA4's entry points routed to fa4aot
    "patch": ("fa4aot.dropin", "patch"),
    "unpatch": ("fa4aot.dropin", "unpatch"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fa4aot' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
