"""FA4's SM90 backward (``FlashAttentionBackwardSm90``) for one variant, built as
``flash_attn.cute.interface._flash_attn_bwd`` builds it on Hopper (``_tile_size_bwd_sm90``'s
configuration; tensors as ``to_cute_tensor`` describes them: every extent dynamic, every stride
dynamic but the innermost, 16-byte alignment, 4 for the int32 vectors)."""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Float32, Int32
from fa4aot_kernels.common import CUTLASS_DTYPES, KernelEntry, Signature, sym
from fa4aot_kernels.fwd_sm100 import softcap_score_mod
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.utils import AuxData

from fa4aot.core.backward import config_from_fields, dkv_postprocess
from fa4aot.core.variant import Target, Variant


def softcap_score_mod_bwd(softcap: float):
    """FA4's softcap backward score_mod (``utils.create_softcap_scoremod_bwd``), or None for 0."""
    if not softcap:
        return None
    from flash_attn.cute.utils import create_softcap_scoremod_bwd

    return create_softcap_scoremod_bwd(float(softcap))


def fa4_config(variant: Variant):
    """FA4's ``BwdConfig`` a main backward variant's fields stand for (FA4's own class)."""
    from flash_attn.cute import config as fa4_config_module

    return config_from_fields(fa4_config_module, variant.fields, variant.arch)


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm90(
        CUTLASS_DTYPES[f["dtype"]],
        f["head_dim"],
        f["head_dim_v"],
        f["qhead_per_kvhead"],
        f["causal"],
        is_local=f["local"],
        deterministic=f["deterministic"],
        tile_m=c.tile_m,
        tile_n=c.tile_n,
        Q_stage=c.num_stages_Q,
        dO_stage=c.num_stages_dO,
        PdS_stage=c.num_stages_PdS,
        SdP_swapAB=c.SdP_swapAB,
        dKV_swapAB=c.dKV_swapAB,
        dQ_swapAB=c.dQ_swapAB,
        AtomLayoutMSdP=c.AtomLayoutMSdP,
        AtomLayoutNdKV=c.AtomLayoutNdKV,
        AtomLayoutMdQ=c.AtomLayoutMdQ,
        num_threads=c.num_threads,
        V_in_regs=c.V_in_regs,
        score_mod=softcap_score_mod(f["softcap"]),
        score_mod_bwd=softcap_score_mod_bwd(f["softcap"]),
        mask_mod=None,
        has_aux_tensors=False,
        q_subtile_factor=BWD_Q_SUBTILE_FACTOR,
        dQ_single_wg=c.dQ_single_wg,
        spt=c.spt,
        registers=c.registers,
    )
    return entry_for(kernel, variant)


#: FA4's ``bwd_q_subtile_factor`` without block sparsity (config.py 2577-2580: "the legacy
#: factor of 2").
BWD_Q_SUBTILE_FACTOR = 2


def add_backward_tensors(sig: Signature, f: dict) -> None:
    """The main backward kernel's tensors and scalars in FA4's argument order (shared with SM100)."""
    dt = f["dtype"]
    gqa = dkv_postprocess(f)  # fp32 dK/dV accumulators (several query-head tiles share a KV head)

    def dims(n: int) -> tuple:
        return tuple(sym() for _ in range(n))

    q_rank = 3 if f["varlen_q"] else 4
    k_rank = 3 if f["varlen_k"] else 4
    sig.tensor("q", dt, dims(q_rank))
    sig.tensor("k", dt, dims(k_rank))
    sig.tensor("v", dt, dims(k_rank))
    sig.tensor("dout", dt, dims(q_rank))
    sig.tensor("lse_log2", "fp32", dims(q_rank - 1))
    sig.tensor("dpsum", "fp32", dims(q_rank - 1))
    sig.tensor("dq_accum", "fp32", dims(q_rank - 1))
    if gqa:  # fp32 accumulators (batch, h_kv, seqlen_k_rounded * d) or (h_kv, total_k_padded * d)
        sig.tensor("dk", "fp32", dims(k_rank - 1))
        sig.tensor("dv", "fp32", dims(k_rank - 1))
    else:
        sig.tensor("dk", dt, dims(k_rank))
        sig.tensor("dv", dt, dims(k_rank))
    sig.scalar("softmax_scale", "f32")
    for name, on in (
        ("cu_seqlens_q", f["varlen_q"]),
        ("cu_seqlens_k", f["varlen_k"]),
        ("seqused_q", f["seqused_q"]),
        ("seqused_k", f["seqused_k"]),
    ):
        if on:
            sig.tensor(name, "int32", (sym(),), leading_dim=0, align=4)
        else:
            sig.absent()
    if f["local"]:
        sig.scalar("window_size_left", "i32")
        sig.scalar("window_size_right", "i32")
    else:
        sig.absent()
        sig.absent()
    if f["deterministic"]:
        # FA4's semaphores: int32 (batch, heads, blocks, n) row-major, n static (the dQ one's the
        # cluster size, dK/dV's 2), the rest dynamic (convert_from_dlpack_leading_static)
        cluster = f["cluster_size"]
        sig.compact_tensor("dq_semaphore", "int32", (sym(), sym(), sym(), cluster), align=4)
        if gqa:
            sig.compact_tensor("dk_semaphore", "int32", (sym(), sym(), sym(), 2), align=4)
            sig.compact_tensor("dv_semaphore", "int32", (sym(), sym(), sym(), 2), align=4)
        else:
            sig.absent()
            sig.absent()
    else:
        for _ in range(3):  # dQ, dK, dV semaphores: deterministic only
            sig.absent()


def entry_for(kernel, variant: Variant, workspace: bool = True) -> KernelEntry:
    """The entry of an FA4 main backward kernel (SM90, SM100 and SM120 take the same arguments;
    FA4 hands SM120's no tensor-map workspace: ``workspace=False``, interface.py 2764-2769)."""
    f = variant.fields
    sig = Signature()
    add_backward_tensors(sig, f)
    if workspace and (f["varlen_k"] or f["seqused_k"]):
        # the per-CTA K / V (and SM100 2-CTA Kt) descriptors (to_cute_tensor(..., assumed_align=128,
        # leading_dim=2)): FA4 passes it to varlen-K and seqused_k calls
        sig.tensor("tensormap_workspace", "int64", (sym(), sym(), sym()), leading_dim=2, align=128)
    else:
        sig.absent()
    sig.stream()

    @cute.jit
    def bwd_entry(
        q: cute.Tensor,
        k: cute.Tensor,
        v: cute.Tensor,
        dout: cute.Tensor,
        lse_log2: cute.Tensor,
        dpsum: cute.Tensor,
        dq_accum: cute.Tensor,
        dk: cute.Tensor,
        dv: cute.Tensor,
        softmax_scale: Float32,
        cu_seqlens_q: Optional[cute.Tensor],
        cu_seqlens_k: Optional[cute.Tensor],
        seqused_q: Optional[cute.Tensor],
        seqused_k: Optional[cute.Tensor],
        window_size_left: Optional[Int32],
        window_size_right: Optional[Int32],
        dq_semaphore: Optional[cute.Tensor],
        dk_semaphore: Optional[cute.Tensor],
        dv_semaphore: Optional[cute.Tensor],
        tensormap_workspace: Optional[cute.Tensor],
        stream: cuda.CUstream,
    ):
        kernel(
            q, k, v, dout, lse_log2, dpsum, dq_accum, dk, dv, softmax_scale,
            cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, window_size_left, window_size_right,
            dq_semaphore, dk_semaphore, dv_semaphore,
            AuxData(None, None),
            None,  # blocksparse_tensors
            None,  # cu_total_m_blocks (FA4's batch-lookup aid above 256 varlen batches: not built)
            *((tensormap_workspace,) if workspace else ()),
            stream,
        )  # fmt: skip

    return KernelEntry(bwd_entry, sig.compile_args, sig.args)
