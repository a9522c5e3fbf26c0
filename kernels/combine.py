"""Split-KV combine (FA4 ``FlashAttentionForwardCombine``), built from fake tensors like FA4's own
``_compile_fwd_combine``: same layouts, divisibility and shared extents, so the cubin is FA4's."""

from __future__ import annotations

from cutlass import Float32
from fa4aot_kernels.common import CUTLASS_DTYPES, EntryArgs, KernelEntry, Signature, sym
from flash_attn.cute.flash_fwd_combine import FlashAttentionForwardCombine

from fa4aot.core.fa4_interface import combine_geometry
from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's split-KV combine kernel for this variant."""
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
    # rows: (total_q,) with cu_seqlens, else (batch, seqlen); the last of them is the contiguous
    # mode of lse_partial and lse
    varlen = f["varlen"]
    rows = (sym(),) if varlen else (sym(), sym())
    sig.tensor("out_partial", "fp32", (num_splits, *rows, nheads, head_dim), stride_divisibility=div)
    sig.tensor("lse_partial", "fp32", (num_splits, *rows, nheads), leading_dim=len(rows), align=4)
    sig.tensor("out", f["dtype"], (*rows, nheads, head_dim), stride_divisibility=div, align=out_align)
    sig.optional_tensor("lse", f["has_lse"], "fp32", (*rows, nheads), leading_dim=len(rows) - 1, align=4)
    batch = sym() if varlen else rows[0]
    sig.optional_tensor("cu_seqlens", varlen, "int32", (sym(),), leading_dim=0, align=4)
    for name in ("seqused", "num_splits_dynamic"):
        sig.optional_tensor(name, f[name], "int32", (batch,), leading_dim=0, align=4)
    sig.stream()

    def call(a: EntryArgs) -> None:
        # virtual_batch_idx and semaphore_to_reset: None, as FA4's interface passes them
        kernel(*a.span("out_partial", "num_splits_dynamic"), None, None, a["stream"])

    return sig.entry("combine_entry", call)


def _bits(dtype: str) -> int:
    return 32 if dtype == "fp32" else 16
