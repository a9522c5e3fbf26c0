"""The "fa4aot" transformers attention backend on the CPU.

The backend's own work - FA4's layout, GQA, the window transformers' ``sliding_window`` means,
softcap, sinks, bottom-right causal attention with a KV cache, unpadding a padded batch and
padding the output back, packed sequences - is checked without a GPU: FA4's two functions are
replaced by a naive attention with FA4's semantics, and every output is compared with an eager
attention written here the way transformers' eager path computes it (the (batch, heads, seq,
dim) layout, an explicit mask over absolute positions, the sink as an extra logit column).
Registration with transformers is checked when transformers is installed.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fa4aot.core.errors import ArgumentError  # noqa: E402
from fa4aot.integrations import transformers as backend  # noqa: E402


def fa4_like(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0):
    """Naive attention with FA4's semantics on (batch, seq, heads, dim) tensors: GQA by head
    groups, causal and window aligned to the bottom right, softcap tanh, a sink logit per head."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    kk = k.float().repeat_interleave(h // hk, dim=2)
    vv = v.float().repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qi = torch.arange(sq)[:, None] + (sk - sq)
    kj = torch.arange(sk)[None, :]
    left, right = window_size
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        allowed &= kj <= qi
    if left is not None:
        allowed &= kj >= qi - left
    if right is not None:
        allowed &= kj <= qi + right
    s = s.masked_fill(~allowed, float("-inf"))
    if learnable_sink is not None:
        sink = learnable_sink.float()[None, :, None, None].expand(b, h, sq, 1)
        s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :sk].nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype), None


def fa4_like_varlen(
    q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, window_size=(None, None), **kw
):
    """The varlen form, sequence by sequence (and checking the host bounds bound every sequence)."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        c, d = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        assert b - a <= max_seqlen_q and d - c <= max_seqlen_k
        outs.append(fa4_like(q[None, a:b], k[None, c:d], v[None, c:d], window_size=window_size, **kw)[0][0])
    return torch.cat(outs), None


@pytest.fixture(autouse=True)
def naive_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(backend, "flash_attn_func", lambda *a, **k: calls.append(("dense", k)) or fa4_like(*a, **k))
    monkeypatch.setattr(
        backend, "flash_attn_varlen_func", lambda *a, **k: calls.append(("varlen", k)) or fa4_like_varlen(*a, **k)
    )
    return calls


def eager(query, key, value, q_pos, k_pos, keep_k, scale, sliding_window=None, softcap=None, sinks=None):
    """transformers' eager attention: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out;
    ``q_pos``/``k_pos`` (batch, seq) absolute positions, ``keep_k`` (batch, seq_k) padding mask."""
    h, hk = query.shape[1], key.shape[1]
    kk, vv = (t.float().repeat_interleave(h // hk, dim=1) for t in (key, value))
    s = query.float() @ kk.transpose(2, 3) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & keep_k[:, None, :]
    if sliding_window is not None:
        allowed &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float()[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., : key.shape[2]]
    return (p @ vv).transpose(1, 2).to(query.dtype)


class Module(torch.nn.Module):
    """What the backend reads of an attention module."""

    is_causal = True

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4, dtype=torch.bfloat16)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


def close(a, b):
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window, softcap, sinks", [(None, None, False), (16, 30.0, True), (8, None, False)])
def test_prefill_and_decode_with_a_cache_match_eager(naive_kernels, window, softcap, sinks):
    b, h, hk, d, s = 2, 8, 2, 32, 40
    sink = rand(h) if sinks else None
    q, k, v = rand(b, h, s, d), rand(b, hk, s, d), rand(b, hk, s, d)
    pos = torch.arange(s).expand(b, s)
    keep = torch.ones(b, s, dtype=torch.bool)
    out, weights = backend.fa4aot_attention_forward(
        Module(), q, k, v, None, scaling=0.2, sliding_window=window, softcap=softcap, s_aux=sink
    )
    assert weights is None and out.shape == (b, s, h, d)
    close(out, eager(q, k, v, pos, pos, keep, 0.2, window, softcap, sink))
    # a decode step: one query against the cache (bottom-right causal)
    q1 = rand(b, h, 1, d)
    out1, _ = backend.fa4aot_attention_forward(
        Module(), q1, k, v, None, scaling=0.2, sliding_window=window, softcap=softcap, s_aux=sink
    )
    close(out1, eager(q1, k, v, pos[:, -1:], pos, keep, 0.2, window, softcap, sink))
    (kind, kw), *_ = naive_kernels
    assert kind == "dense" and kw["window_size"] == ((window - 1, 0) if window else (None, None))


def test_left_padded_batch_is_unpadded_and_padded_back(naive_kernels):
    b, h, hk, d, s = 3, 4, 4, 16, 12
    lengths = [12, 7, 3]
    keep = torch.tensor([[i >= s - n for i in range(s)] for n in lengths])
    q, k, v = rand(b, h, s, d), rand(b, hk, s, d), rand(b, hk, s, d)
    pos = (keep.cumsum(-1) - 1).clamp(min=0)  # positions count only real tokens (generate's left padding)
    out, _ = backend.fa4aot_attention_forward(Module(), q, k, v, keep.long(), scaling=0.25)
    want = eager(q, k, v, pos, pos, keep, 0.25)
    for i, n in enumerate(lengths):
        close(out[i, s - n :], want[i, s - n :])
        assert out[i, : s - n].abs().sum() == 0  # padded queries: zeros
    # the next decode step of the same batch (one new real token each)
    keep2 = torch.cat([keep, torch.ones(b, 1, dtype=torch.bool)], dim=1)
    k2, v2, q2 = rand(b, hk, s + 1, d), rand(b, hk, s + 1, d), rand(b, h, 1, d)
    pos2 = (keep2.cumsum(-1) - 1).clamp(min=0)
    out2, _ = backend.fa4aot_attention_forward(Module(), q2, k2, v2, keep2, scaling=0.25)
    close(out2, eager(q2, k2, v2, pos2[:, -1:], pos2, keep2, 0.25))
    assert [kind for kind, _ in naive_kernels] == ["varlen", "varlen"]


def test_packed_sequences_by_cu_seq_lens_and_by_position_ids(naive_kernels):
    h, d, lengths = 4, 16, [5, 9, 2]
    n = sum(lengths)
    q, k, v = rand(1, h, n, d), rand(1, h, n, d), rand(1, h, n, d)
    pos = torch.cat([torch.arange(m) for m in lengths])[None]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    # the reference: each sequence alone
    want = torch.cat(
        [
            eager(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pos[:, a:b], pos[:, a:b], torch.ones(1, b - a, dtype=torch.bool), 0.25)
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())
        ],
        dim=1,
    )  # fmt: skip
    kw = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    out, _ = backend.fa4aot_attention_forward(Module(), q, k, v, None, scaling=0.25, **kw)
    close(out, want)
    out2, _ = backend.fa4aot_attention_forward(Module(), q, k, v, None, scaling=0.25, position_ids=pos)
    close(out2, want)
    assert [kind for kind, _ in naive_kernels] == ["varlen", "varlen"]
    # one sequence (consecutive positions, from any start) stays one dense call
    backend.fa4aot_attention_forward(Module(), q, k, v, None, position_ids=torch.arange(n)[None] + 3)
    assert naive_kernels[-1][0] == "dense"


def test_refusals_are_typed_and_say_what_to_do():
    q = rand(1, 2, 4, 16)
    with pytest.raises(ArgumentError, match="dropout"):
        backend.fa4aot_attention_forward(Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(ArgumentError, match="2D padding mask.*sdpa"):
        backend.fa4aot_attention_forward(Module(), q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ArgumentError, match="float32"):
        m = Module().float()
        backend.fa4aot_attention_forward(m, q.float(), q.float(), q.float(), None)
    with pytest.raises(ArgumentError, match="cu_seq_lens"):
        backend.fa4aot_attention_forward(Module(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4]))


def test_fp32_inputs_run_in_the_models_dtype(naive_kernels):
    """PEFT's fp32 layer norms hand fp32 states in: the call runs in the weights' dtype (bf16)."""
    q = torch.randn(1, 2, 4, 16)
    out, _ = backend.fa4aot_attention_forward(Module(), q, q, q, None)
    assert out.dtype == torch.bfloat16


def test_registration_with_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    assert backend.register()
    from transformers import AttentionInterface

    assert AttentionInterface()._global_mapping[backend.NAME] is backend.fa4aot_attention_forward
    masking = pytest.importorskip("transformers.masking_utils")
    assert masking.AttentionMaskInterface()._global_mapping[backend.NAME] is masking.flash_attention_mask
    assert transformers.__version__
