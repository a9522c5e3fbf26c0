"""Split-KV combine (FA4 ``FlashAttentionForwardCombine``), built from fake tensors like FA4's own
``_compile_fwd_combine``: same layouts, divisibility and shared extents, so the cubin is FA4's."""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Float32
from fa4aot_kernels.common import CUTLASS_DTYPES, KernelEntry, Signature, sym
from flash_attn.cute.flash_fwd_combine import FlashAttentionForwardCombine

from fa4aot.core.fa4_interface import combine_geometry
from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    head_dim = f["head_dim"]
    tile_m, k_block_size, _ = combine_geometry(head_dim, 1)
    kernel = FlashAttentionForwardCombine(
        dtype=CUTLASS_DTYPES[f["dtype"]],
        dtype_partial=Float32,
        head_dim=head_dim,
        num_head=f["num_head"],
        tile_m=tile_m,
        k_block_size=k_block_size,
        log_max_splits=f["log_max_splits"],
    )
    if not kernel.can_implement(
        CUTLASS_DTYPES[f["dtype"]],
        Float32,
        head_dim,
        tile_m,
        k_block_size,
        f["log_max_splits"],
        num_threads=256,
    ):
        raise ValueError("FlashAttentionForwardCombine.can_implement rejected this variant")

    sig = Signature()
    # quack's make_fake_tensor: stride divisibility in elements of the fp32 partials (16 bytes),
    # assumed alignment = divisibility * element bytes (so 8 bytes for a 16-bit out).
    div = 128 // 32
    out_align = div * _bits(f["dtype"]) // 8
    num_splits, nheads = sym(), sym()
    if f["varlen"]:
        total_q = sym()
        sig.tensor("out_partial", "fp32", (num_splits, total_q, nheads, head_dim), stride_divisibility=div)
        sig.tensor("lse_partial", "fp32", (num_splits, total_q, nheads), leading_dim=1, align=4)
        sig.tensor("out", f["dtype"], (total_q, nheads, head_dim), stride_divisibility=div, align=out_align)
        if f["has_lse"]:
            sig.tensor("lse", "fp32", (total_q, nheads), leading_dim=0, align=4)
        else:
            sig.absent()
        batch_1d = sym()
        sig.tensor("cu_seqlens", "int32", (sym(),), leading_dim=0, align=4)
    else:
        batch, seqlen = sym(), sym()
        sig.tensor("out_partial", "fp32", (num_splits, batch, seqlen, nheads, head_dim), stride_divisibility=div)
        sig.tensor("lse_partial", "fp32", (num_splits, batch, seqlen, nheads), leading_dim=2, align=4)
        sig.tensor("out", f["dtype"], (batch, seqlen, nheads, head_dim), stride_divisibility=div, align=out_align)
        if f["has_lse"]:
            sig.tensor("lse", "fp32", (batch, seqlen, nheads), leading_dim=1, align=4)
        else:
            sig.absent()
        batch_1d = batch
        sig.absent()  # cu_seqlens
    if f["seqused"]:
        sig.tensor("seqused", "int32", (batch_1d,), leading_dim=0, align=4)
    else:
        sig.absent()
    if f["num_splits_dynamic"]:
        sig.tensor("num_splits_dynamic", "int32", (batch_1d,), leading_dim=0, align=4)
    else:
        sig.absent()
    sig.stream()

    @cute.jit
    def combine_entry(
        out_partial: cute.Tensor,
        lse_partial: cute.Tensor,
        out: cute.Tensor,
        lse: Optional[cute.Tensor],
        cu_seqlens: Optional[cute.Tensor],
        seqused: Optional[cute.Tensor],
        num_splits_dynamic: Optional[cute.Tensor],
        stream: cuda.CUstream,
    ):
        kernel(out_partial, lse_partial, out, lse, cu_seqlens, seqused, num_splits_dynamic, None, None, stream)

    return KernelEntry(combine_entry, sig.compile_args, sig.args)


def _bits(dtype: str) -> int:
    return 32 if dtype == "fp32" else 16
