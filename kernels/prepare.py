"""FA4's scheduler-metadata prepare kernel (``FlashPrepareScheduler``) for one variant, with the
arguments ``interface._get_scheduler_metadata`` passes (4-byte aligned 1-D int32 tensors)."""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Int32
from fa4aot_kernels.common import KernelEntry, Signature, sym
from flash_attn.cute.prepare_scheduler import FlashPrepareScheduler

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    scheduler = FlashPrepareScheduler(
        f["num_warps"],
        f["tile_m"],
        f["tile_n"],
        f["nheads"],
        f["nheads_kv"],
        f["headdim"],
        f["headdim_v"],
        f["causal"],
        packgqa=f["pack_gqa"],
        sort=False,
        zfill_padded_output=True,
        ctas_per_sm=f["ctas_per_sm"],
        min_blocks_floor=(f["floor_ctas"], f["floor_blocks"]) if f["floor_ctas"] else None,
    )
    sig = Signature()
    sig.scalar("max_seqlen_q", "i32")
    sig.scalar("max_seqlen_k", "i32")
    sig.scalar("seqlen_k_new", "i32")

    def vec(name: str, on: bool) -> None:
        if on:
            sig.tensor(name, "int32", (sym(),), leading_dim=0, align=4)
        else:
            sig.absent()

    vec("cu_seqlens_q", f["varlen_q"])
    vec("cu_seqlens_k", f["varlen_k"])
    vec("seqused_q", f["seqused_q"])
    vec("seqused_k", f["seqused_k"])
    sig.scalar("num_batch", "i32")
    sig.scalar("num_splits", "i32")
    vec("tile_count_semaphore", f["has_semaphore"])
    vec("num_m_blocks", True)
    vec("num_splits_dynamic", True)
    vec("num_nheads_in_l2", f["causal"])
    sig.stream()

    @cute.jit
    def prepare_entry(
        max_seqlen_q: Int32,
        max_seqlen_k: Int32,
        seqlen_k_new: Int32,
        cu_seqlens_q: Optional[cute.Tensor],
        cu_seqlens_k: Optional[cute.Tensor],
        seqused_q: Optional[cute.Tensor],
        seqused_k: Optional[cute.Tensor],
        num_batch: Int32,
        num_splits: Int32,
        tile_count_semaphore: Optional[cute.Tensor],
        num_m_blocks: cute.Tensor,
        num_splits_dynamic: cute.Tensor,
        num_nheads_in_l2: Optional[cute.Tensor],
        stream: cuda.CUstream,
    ):
        scheduler(
            max_seqlen_q,
            max_seqlen_k,
            seqlen_k_new,
            cu_seqlens_q,
            cu_seqlens_k,
            None,  # cu_seqlens_k_new
            seqused_q,
            seqused_k,
            None,  # leftpad_k
            num_batch,
            num_splits,
            tile_count_semaphore,
            num_m_blocks,
            num_splits_dynamic,
            None,  # virtual_batch_idx (sort is not implemented in FA4)
            num_nheads_in_l2,
            None,  # n_blocks_per_split (FA4's heuristic decides)
            stream,
        )

    return KernelEntry(prepare_entry, sig.compile_args, sig.args)
