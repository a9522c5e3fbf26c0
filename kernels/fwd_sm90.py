"""FA4's SM90 forward (``FlashAttentionForwardSm90``) for one variant, built as
``flash_attn.cute.interface._flash_attn_fwd`` builds it on Hopper (384 threads, 2 stages)."""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Float32, Int32
from fa4aot_kernels.common import CUTLASS_DTYPES, KernelEntry, Signature
from fa4aot_kernels.fwd_sm100 import add_forward_tensors, add_tensormap_workspace, fa4_config, softcap_score_mod
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData

from fa4aot.core.variant import Target, Variant


def constructor_kwargs(variant: Variant) -> dict:
    """The FlashAttentionForwardSm90 arguments FA4's interface passes for this variant
    (interface.py 1406-1426: 2 stages, the config's tiles, MMA flags and registers)."""
    f = variant.fields
    config = fa4_config(variant)
    return dict(
        dtype=CUTLASS_DTYPES[f["dtype"]],
        head_dim=f["head_dim"],
        head_dim_v=f["head_dim_v"],
        qhead_per_kvhead=f["qhead_per_kvhead"],
        is_causal=f["causal"],
        is_local=f["local"],
        pack_gqa=config.pack_gqa,
        tile_m=config.tile_m,
        tile_n=config.tile_n,
        num_stages=2,
        Q_in_regs=False,
        intra_wg_overlap=config.intra_wg_overlap,
        mma_pv_is_rs=config.mma_pv_is_rs,
        mask_mod=None,
        score_mod=softcap_score_mod(f["softcap"]),
        has_aux_tensors=False,
        q_subtile_factor=1,
        paged_kv_non_tma=f["paged_kv"] == "cpasync",
        registers=config.registers,
    )


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    return entry_for(FlashAttentionForwardSm90(**constructor_kwargs(variant)), variant.fields, workspace=True)


def entry_for(kernel, f: dict, workspace: bool) -> KernelEntry:
    """The entry of an FA4 forward that takes FA4's SM80 / SM90 / SM120 call arguments (no
    scheduler metadata): the SM90 forward (which also takes the tensor-map workspace) and the
    SM120 forward."""
    sig = Signature()
    add_forward_tensors(sig, f)
    if workspace:
        add_tensormap_workspace(sig, f)
    else:
        sig.absent()
    sig.stream()
    tail = (True,) if workspace else ()

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
        tensormap_workspace: Optional[cute.Tensor],
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
            *((tensormap_workspace,) if tail else ()),
            stream,
        )

    return KernelEntry(fwd_entry, sig.compile_args, sig.args)
