"""The plain-call rows of ``host_overhead.py``, made with whichever fa4aot is imported: this
checkout's in the benchmark's own process, a baseline checkout's in its subprocess (so this
module imports nothing of fa4aot itself)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import cycle
from typing import Any

#: the rows issue 27 sets goals for (the others are for reference)
GOAL_ROWS = ("batched forward, same shapes", "varlen forward, max_seqlen and batch changing",
             "paged decode, _flash_attn_fwd")  # fmt: skip


def calls(fa4aot: Any, torch: Any) -> dict[str, Callable[[], object]]:
    """Each plain-call row's call (PyTorch tensors on the current CUDA device, ``out`` given,
    bf16, causal, head_dim 128) on ``fa4aot``'s default runtime. The changing rows' arguments are
    made here, before timing (cycled), so a row times the call, not the harness."""
    from fa4aot.interface import _flash_attn_fwd  # (the imported checkout's)

    bf = torch.bfloat16
    q = torch.randn(1, 128, 16, 128, device="cuda", dtype=bf)
    o = torch.empty_like(q)
    qv, kv = torch.randn(512, 32, 128, device="cuda", dtype=bf), torch.randn(512, 8, 128, device="cuda", dtype=bf)
    ov = torch.empty_like(qv)
    cu = torch.arange(0, 513, 64, dtype=torch.int32, device="cuda")
    varlen = fa4aot.flash_attn_varlen_func
    changing = cycle([(64 + i, 64 + (i * 7) % 4096) for i in range(4096)])

    def varlen_changing() -> None:
        mq, mk = next(changing)
        varlen(qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mq, max_seqlen_k=mk, causal=True, out=ov)

    # batch sizes dividing the 512 packed tokens; max_seqlen bounds each sequence and changes too
    cus = [torch.arange(0, 513, 512 // b, dtype=torch.int32, device="cuda") for b in (1, 2, 4, 8, 16, 32, 64, 128)]
    batch_changing = cycle([(cus[i % 8], 512 // (cus[i % 8].numel() - 1) + i % 997, i % 13) for i in range(8 * 997)])

    def varlen_batch_changing() -> None:
        c, m, dk = next(batch_changing)
        varlen(qv, kv, kv, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=m, max_seqlen_k=m + dk, causal=True, out=ov)

    # paged decode as vLLM's FA4 backend calls it: 8 requests, 1 query token, page 16, GQA 4
    qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=bf)
    od = torch.empty_like(qd)
    pool = torch.randn(64, 16, 8, 128, device="cuda", dtype=bf)
    pt = torch.arange(64, dtype=torch.int32, device="cuda").reshape(8, 8)
    used = torch.full((8,), 100, dtype=torch.int32, device="cuda")

    def paged_decode() -> None:
        _flash_attn_fwd(qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=128, page_table=pt, causal=True,
                        out=od)  # fmt: skip

    return {
        "batched forward, same shapes": lambda: fa4aot.flash_attn_func(q, q, q, causal=True, out=o),
        "varlen forward, max_seqlen and batch changing": varlen_batch_changing,
        "paged decode, _flash_attn_fwd": paged_decode,
        "varlen forward, same shapes": lambda: varlen(
            qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True, out=ov
        ),  # fmt: skip
        "varlen forward, max_seqlen changing": varlen_changing,
    }
