"""FA4's SM90 forward (``FlashAttentionForwardSm90``) for one variant, built as
``flash_attn.cute.interface._flash_attn_fwd`` builds it on Hopper (384 threads, 2 stages)."""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Float32, Int32
from fa4aot_kernels.common import CUTLASS_DTYPES, KernelEntry, Signature
from fa4aot_kernels.fwd_sm100 import add_forward_tensors, softcap_score_mod
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData

from fa4aot.core.variant import Target, Variant


def constructor_kwargs(f: dict) -> dict:
    """The FlashAttentionForwardSm90 arguments FA4's interface passes for these variant fields."""
    return dict(
        dtype=CUTLASS_DTYPES[f["dtype"]],
        head_dim=f["head_dim"],
        head_dim_v=f["head_dim_v"],
        qhead_per_kvhead=f["qhead_per_kvhead"],
        is_causal=f["causal"],
        is_local=f["local"],
        pack_gqa=f["pack_gqa"],
        tile_m=f["tile_m"],
        tile_n=f["tile_n"],
        num_stages=2,
        num_threads=384,
        Q_in_regs=False,
        intra_wg_overlap=f["intra_wg_overlap"],
        mma_pv_is_rs=f["mma_pv_is_rs"],
        paged_kv_non_tma=f["paged_kv"] == "cpasync",
        score_mod=softcap_score_mod(f["softcap"]),
    )


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    return entry_for(FlashAttentionForwardSm90(**constructor_kwargs(f)), f)


def entry_for(kernel, f: dict) -> KernelEntry:
    """The entry of an FA4 forward that takes FA4's SM80 / SM90 / SM120 call arguments (no
    scheduler metadata): the SM90 and the SM120 forward."""
    sig = Signature()
    add_forward_tensors(sig, f)
    sig.stream()

    @cute.jit
    def fwd_entry(
        q: cute.Tensor,
        k: cute.Tensor,
        v: cute.Tensor,
        out: cute.Tensor,
        lse: Optional[cute.Tensor],
        softmax_scale: Float32,
        cu_seqlens_q: Optional[cute.Tensor],
        cu_seqlens_k: Optional[cute.Tensor],
        seqused_q: Optional[cute.Tensor],
        seqused_k: Optional[cute.Tensor],
        page_table: Optional[cute.Tensor],
        window_size_left: Optional[Int32],
        window_size_right: Optional[Int32],
        learnable_sink: Optional[cute.Tensor],
        stream: cuda.CUstream,
    ):
        kernel(
            q,
            k,
            v,
            out,
            lse,
            softmax_scale,
            cu_seqlens_q,
            cu_seqlens_k,
            seqused_q,
            seqused_k,
            page_table,
            window_size_left,
            window_size_right,
            learnable_sink,
            None,  # blocksparse_tensors
            AuxData(None, None),
            None,
            None,  # cu_total_m_blocks, cu_total_splits_m_blocks
            stream,
        )

    return KernelEntry(fwd_entry, sig.compile_args, sig.args)
