"""FA4's scheduler-metadata prepare kernel (``FlashPrepareScheduler``) for one variant, with the
arguments ``interface._get_scheduler_metadata`` passes (4-byte aligned 1-D int32 tensors)."""

from __future__ import annotations

from fa4aot_kernels.common import EntryArgs, KernelEntry, Signature, sym
from flash_attn.cute.prepare_scheduler import FlashPrepareScheduler

from fa4aot.core.fa4_interface import PrepareOptions
from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's scheduler-metadata prepare kernel for this variant."""
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
        **PrepareOptions.of_fields(f).kwargs(),
    )
    sig = Signature()
    sig.scalar("max_seqlen_q", "i32")
    sig.scalar("max_seqlen_k", "i32")
    sig.scalar("seqlen_k_new", "i32")

    sig.seqlen_vectors(f)
    sig.scalar("num_batch", "i32")
    sig.scalar("num_splits", "i32")
    sig.optional_tensor("tile_count_semaphore", f["has_semaphore"], "int32", (sym(),), leading_dim=0, align=4)
    sig.tensor("num_m_blocks", "int32", (sym(),), leading_dim=0, align=4)
    sig.tensor("num_splits_dynamic", "int32", (sym(),), leading_dim=0, align=4)
    sig.optional_tensor("num_nheads_in_l2", f["causal"], "int32", (sym(),), leading_dim=0, align=4)
    sig.stream()

    def call(a: EntryArgs) -> None:
        scheduler(
            *a.span("max_seqlen_q", "cu_seqlens_k"),
            None,  # cu_seqlens_k_new
            *a.span("seqused_q", "seqused_k"),
            None,  # leftpad_k
            *a.span("num_batch", "num_splits_dynamic"),
            None,  # virtual_batch_idx (sort is not implemented in FA4)
            a["num_nheads_in_l2"],
            None,  # n_blocks_per_split (FA4's heuristic decides)
            a["stream"],
        )

    return sig.entry("prepare_entry", call)
