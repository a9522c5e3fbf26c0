"""The ``"fa4aot"`` attention backend for Hugging Face transformers: FA4's kernels from an fa4aot
cache, zero JIT, for any model that dispatches through ``AttentionInterface``::

    import fa4aot.integrations.transformers  # registers "fa4aot" (or call register())
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fa4aot", dtype=torch.bfloat16)

Served (the call transformers makes: query/key/value (batch, heads, seq, dim), as for
``flash_attention_2``): GQA/MQA (no repeat of K/V), causal attention with a KV cache (FA4's causal
mask is bottom-right aligned, as flash-attention's), ``sliding_window`` (transformers' window
counts the query token: FA4's ``window_size=(sliding_window - 1, 0)``, applied, as transformers'
flash path does, only when there are more keys than the window), ``softcap`` (Gemma 2), attention
sinks (``s_aux``, gpt-oss: FA4's ``learnable_sink``), padding-free packed sequences (the
``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k`` kwargs of a data collator, or
packed ``position_ids`` with batch 1), and padded batches (the 2D padding mask transformers builds
for flash-style backends: the tokens are unpadded into FA4's varlen form and the output padded
back, as transformers' flash-attention path does). Training runs FA4's backward kernels through
:mod:`fa4aot.torch`. Refused with an ``ArgumentError``: attention dropout, and a 4D mask (a model
that builds its own mask tensor: use ``sdpa`` or ``eager`` for it).

The kernels a model needs are those of its head dims, GQA ratio, windows and softcap value:
manifests/transformers-h100.yaml lists them for the models tests/gpu/test_transformers.py builds.
"""

from __future__ import annotations

from typing import Any

import torch

from fa4aot.core.errors import ArgumentError
from fa4aot.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

#: The name models select with ``attn_implementation=``.
NAME = "fa4aot"
#: What fa4aot's kernels compute in (FA4: bf16 and fp16).
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def register(name: str = NAME) -> bool:
    """Register the backend (attention function and mask function) under ``name``. Returns False
    when transformers is not installed; an older transformers without ``AttentionMaskInterface``
    gets the attention function only (models then pass masks of their own, which are refused)."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(name, fa4aot_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError:
        return True
    # flash-style masks: None, or the 2D padding mask (what this backend unpads with)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return True


def _kernel_dtype(module: Any, q: torch.Tensor) -> torch.dtype:
    """The dtype the call runs in: q's, or for fp32 inputs (PEFT's fp32 layer norms) the autocast
    dtype or the model's weights' dtype, as transformers' flash path chooses."""
    if q.dtype in _KERNEL_DTYPES:
        return q.dtype
    if q.dtype == torch.float32:
        if torch.is_autocast_enabled():
            want = torch.get_autocast_gpu_dtype()
        else:
            want = getattr(getattr(module, "config", None), "_pre_quantization_dtype", None) or next(
                (m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear)), q.dtype
            )
        if want in _KERNEL_DTYPES:
            return want
    raise ArgumentError(f"query: fa4aot's kernels take bfloat16 or float16, got {q.dtype} (load the model in bf16)")


def _window(sliding_window: int | None, causal: bool, keys: int) -> tuple[int | None, int | None]:
    """FA4's window for transformers' ``sliding_window`` (which counts the query token)."""
    if sliding_window is None or keys <= sliding_window:
        return None, None
    if sliding_window < 1:
        raise ArgumentError(f"sliding_window: expected a positive int, got {sliding_window!r}")
    return sliding_window - 1, 0 if causal else sliding_window - 1


def _packed_position_ids(position_ids: Any, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, max_seqlen) of several sequences packed into one row (batch 1, no cache),
    told apart by their restarting ``position_ids`` as transformers' flash path tells them (a row
    that is not one run of consecutive positions; each sequence starts at position 0). None when
    the row is one sequence or the call is not of that form. One host sync."""
    if not isinstance(position_ids, torch.Tensor) or q.shape[0] != 1 or q.shape[1] != k.shape[1] or q.shape[1] < 2:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != q.shape[1]:
        return None
    if torch.equal(pos, torch.arange(pos.numel(), device=pos.device, dtype=pos.dtype) + pos[0]):
        return None  # one sequence: plain (causal) attention
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ArgumentError(
            "position_ids: packed sequences must each start at position 0, the first at the row's start"
        )
    total = torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _unpad(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(indices of the kept tokens in the flattened batch, cu_seqlens, max_seqlen) of a 2D mask."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu, int(lengths.max())


def _padded(q, k, v, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Attention over a padded batch: unpad keys by ``mask`` (batch, keys), queries by its last
    ``seq_q`` columns (left padding, as generation pads), run varlen, pad the output back."""
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if mask.shape != (b, sk):
        raise ArgumentError(
            f"attention_mask: expected a (batch, keys) = {(b, sk)} padding mask, got {tuple(mask.shape)}"
        )
    mask = mask.bool()
    idx_k, cu_k, max_k = _unpad(mask)
    k_un = k.reshape(b * sk, hk, k.shape[-1]).index_select(0, idx_k)
    v_un = v.reshape(b * sk, hk, v.shape[-1]).index_select(0, idx_k)
    if sq == sk:
        idx_q, cu_q, max_q = idx_k, cu_k, max_k
    elif sq == 1:  # decode: one query per sequence
        idx_q = torch.arange(b, device=q.device)
        cu_q, max_q = torch.arange(b + 1, device=q.device, dtype=torch.int32), 1
    else:
        idx_q, cu_q, max_q = _unpad(mask[:, -sq:])
    q_un = q.reshape(b * sq, h, q.shape[-1]).index_select(0, idx_q)
    out_un, _ = flash_attn_varlen_func(
        q_un, k_un, v_un, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, **kw
    )
    out = out_un.new_zeros((b * sq, h, out_un.shape[-1]))
    out.index_copy_(0, idx_q, out_un)
    return out.view(b, sq, h, out_un.shape[-1])


def fa4aot_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (batch, heads, seq_q, head_dim), key and
    value (batch, kv_heads, seq_k, head_dim[_v]); returns ``(out, None)`` with out (batch, seq_q,
    heads, head_dim_v) (attention weights are never materialised)."""
    if dropout:
        raise ArgumentError(f"dropout: fa4aot's kernels have no attention dropout (got {dropout}); set it to 0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ArgumentError(
            f"attention_mask: fa4aot takes transformers' flash-style 2D padding mask, got a {attention_mask.dim()}D "
            "mask (this model builds its own masks: use attn_implementation='sdpa' or 'eager' for it)"
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    dtype = _kernel_dtype(module, query)
    # FA4's layout (batch, seq, heads, dim): a transposed view, no copy
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    kw: dict[str, Any] = {
        "softmax_scale": scaling,
        "causal": causal,
        "learnable_sink": s_aux,
        "softcap": float(softcap or 0.0),
    }
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:  # padding-free: several sequences packed in one row
        if cu_q is None or cu_k is None or q.shape[0] != 1:
            raise ArgumentError("cu_seq_lens_q / cu_seq_lens_k: give both, with the sequences packed in batch 1")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q, max_k = (None if m is None else int(m) for m in (max_q, max_k))
        kw["window_size"] = _window(sliding_window, causal, max_k if max_k is not None else k.shape[1])
        out, _ = flash_attn_varlen_func(
            q[0], k[0], v[0], cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
            max_seqlen_q=max_q, max_seqlen_k=max_k, **kw,
        )  # fmt: skip
        return out.unsqueeze(0), None
    if attention_mask is not None:
        kw["window_size"] = _window(sliding_window, causal, k.shape[1])
        return _padded(q, k, v, attention_mask, **kw), None
    packed = _packed_position_ids(kwargs.get("position_ids"), q, k)
    if packed is not None:
        cu, max_len = packed
        kw["window_size"] = _window(sliding_window, causal, max_len)
        out, _ = flash_attn_varlen_func(
            q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kw
        )
        return out.unsqueeze(0), None
    kw["window_size"] = _window(sliding_window, causal, k.shape[1])
    out, _ = flash_attn_func(q, k, v, **kw)
    return out, None


register()
