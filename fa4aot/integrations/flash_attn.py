"""FA4's public entry points (``flash_attn.cute`` 4.0.0b40) served by fa4aot: what
:func:`fa4aot.patch` routes FA4's functions (and those of the copies vLLM and SGLang vendor) to.

``flash_attn_func`` / ``flash_attn_varlen_func`` are differentiable in FA4. Here a call that needs
autograd (grad mode on and an input that requires grad) or runs under ``torch.compile`` goes
through :mod:`fa4aot.torch` (``torch.library`` ops with a backward); any other call goes straight
to the runtime's forward, which also serves what the autograd ops do not (a paged KV cache,
``scheduler_metadata``, ``config``). The private entry points (``_flash_attn_fwd``,
``_flash_attn_bwd``, ``_flash_attn_fwd_combine``, ``get_scheduler_metadata``,
``_get_scheduler_metadata``) are the runtime's mirrors. Arguments fa4aot does not build raise
ArgumentError naming them (the drop-in's policy then decides what happens).
"""

from __future__ import annotations

from typing import Any

import torch

from fa4aot.core.fa4_args import mirror
from fa4aot.runtime import entry, fa4_entries  # noqa: F401 - called by the generated mirrors
from fa4aot.runtime import interface as rt_interface
from fa4aot.runtime.metadata import SchedulerMetadata

_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def needs_autograd(*tensors: Any) -> bool:
    """Whether a call must run through the autograd ops: grad mode is on and an input requires
    grad, or torch.compile is tracing (the ops are what it can trace)."""
    if _compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and getattr(t, "requires_grad", False) for t in tensors)


def _plain(t: Any) -> Any:
    """``t`` detached when it is a tensor that requires grad but the call runs without autograd
    (grad mode off: a ``torch.nn.Parameter`` sink under ``torch.no_grad()``): the runtime reads
    tensors through DLPack, which torch refuses for tensors that require grad."""
    return t.detach() if getattr(t, "requires_grad", False) else t


def _fa4aot_torch() -> Any:
    """fa4aot.torch, imported on first differentiable call (it registers the fa4aot:: ops)."""
    import fa4aot.torch as ft

    return ft


def _differentiable(entry_point: str, doc: str) -> Any:
    """A mirror of FA4's differentiable ``entry_point``: through fa4aot.torch's autograd op when the
    call needs autograd, else straight to the runtime's function of that name."""
    return mirror(
        entry_point,
        f"""
    if needs_autograd(q, k, v, learnable_sink):  # fa4aot.torch refuses the inference-only FA4 paths
        return _fa4aot_torch().{entry_point}({{all}})
    q, k, v, learnable_sink = _plain(q), _plain(k), _plain(v), _plain(learnable_sink)
    return entry.{entry_point}({{all}})
    """,
        globals(),
        check="none",  # the functions it calls refuse
        doc=doc,
    )


flash_attn_func = _differentiable(
    "flash_attn_func", """FA4's ``flash_attn_func``: ``(out, lse)``, differentiable when an input requires grad."""
)
flash_attn_varlen_func = _differentiable(
    "flash_attn_varlen_func",
    """FA4's ``flash_attn_varlen_func``: ``(out, lse)``, differentiable when an input requires grad
    (a paged KV cache is an inference path, as in FA4).""",
)


#: The runtime's mirrors of FA4's private entry points (torch-free; torch tensors go in by DLPack).
_flash_attn_fwd = rt_interface._flash_attn_fwd
_get_scheduler_metadata = rt_interface._get_scheduler_metadata
_flash_attn_bwd = fa4_entries._flash_attn_bwd
_flash_attn_fwd_combine = fa4_entries._flash_attn_fwd_combine
get_scheduler_metadata = fa4_entries.get_scheduler_metadata

#: The functions the drop-in routes, by FA4's name.
ENTRY_POINTS = {
    "flash_attn_func": flash_attn_func,
    "flash_attn_varlen_func": flash_attn_varlen_func,
    "_flash_attn_fwd": _flash_attn_fwd,
    "_flash_attn_bwd": _flash_attn_bwd,
    "_flash_attn_fwd_combine": _flash_attn_fwd_combine,
    "get_scheduler_metadata": get_scheduler_metadata,
    "_get_scheduler_metadata": _get_scheduler_metadata,
}


def drop_fa4aot_metadata(args: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments made fit for FA4's own function: a fa4aot.SchedulerMetadata (from a
    routed get_scheduler_metadata) means nothing to FA4, which computes its own without one."""
    if isinstance(args.get("scheduler_metadata"), SchedulerMetadata):
        args = {**args, "scheduler_metadata": None}
    return args
