"""FA4's SM100 forward (``FlashAttentionForwardSm100``) for one variant.

The FA4 object is built exactly as ``flash_attn.cute.interface._flash_attn_fwd`` builds it for the
same decisions; the fake tensors mirror ``to_cute_tensor`` (every extent dynamic, every stride
dynamic except the innermost, 16-byte assumed alignment for q/k/v/o, 4 for the rest).
"""

from __future__ import annotations

from typing import Optional

import cuda.bindings.driver as cuda
import cutlass.cute as cute
from cutlass import Float32, Int32
from fa4aot_kernels.common import KernelEntry, Signature, sym
from flash_attn.cute.flash_fwd_sm100 import DescaleTensors, FlashAttentionForwardSm100
from flash_attn.cute.utils import AuxData

from fa4aot.core.fa4_interface import config_from_fields, out_dtype
from fa4aot.core.variant import Target, Variant


def fa4_config(variant: Variant):
    """The FA4 ``FwdConfig`` a forward variant's fields stand for (FA4's own class)."""
    from flash_attn.cute import config as fa4_config_module

    return config_from_fields(fa4_config_module, variant.fields, variant.arch)


def constructor_kwargs(variant: Variant) -> dict:
    """The FlashAttentionForwardSm100 (or SwapAB) arguments FA4's interface passes for this
    variant (interface.py 1502-1520)."""
    f = variant.fields
    return dict(
        head_dim=f["head_dim"],
        head_dim_v=f["head_dim_v"],
        config=fa4_config(variant),
        qhead_per_kvhead=f["qhead_per_kvhead"],
        is_causal=f["causal"],
        is_local=f["local"],
        score_mod=softcap_score_mod(f["softcap"]),
        mask_mod=None,
        has_aux_tensors=False,
        paged_kv_non_tma=not f["use_swapab"] and f["paged_kv"] == "cpasync",
        is_varlen_q=f["varlen_q"] or f["seqused_q"],
        q_subtile_factor=1,
        kv_subtile_factor=1,
        seqlen_k_per_split=None,
        has_tile_count_semaphore=f["tile_count_semaphore"],
        # interface.py 1496-1498: only MXFP8 calls pass the block-scale flags
        **(dict(qk_blockscaled=True, pv_blockscaled=f["mxfp8"] == "pv") if f.get("mxfp8") else {}),
    )


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    if f["use_swapab"]:
        from flash_attn.cute.flash_fwd_decode_sm100 import FlashAttentionForwardSm100SwapAB as cls
    else:
        cls = FlashAttentionForwardSm100
    kernel = cls(**constructor_kwargs(variant))
    sig = Signature()
    add_forward_tensors(sig, f)
    # num_splits_dynamic, tile_count_semaphore, num_nheads_in_l2: the scheduler metadata FA4's
    # forward passes (virtual_batch_idx and the varlen batch-lookup aids stay None).
    for name in ("num_splits_dynamic", "tile_count_semaphore", "num_nheads_in_l2"):
        if f[name]:
            sig.tensor(name, "int32", (sym(),), leading_dim=0, align=4)
        else:
            sig.absent()
    sig.scalar("max_seqlen_q", "i32")
    add_tensormap_workspace(sig, f)
    add_scales(sig, f)
    sig.stream()

    @cute.jit
    def fwd_sm100_entry(
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
        num_splits_dynamic: Optional[cute.Tensor],
        tile_count_semaphore: Optional[cute.Tensor],
        num_nheads_in_l2: Optional[cute.Tensor],
        max_seqlen_q: Int32,
        tensormap_workspace: Optional[cute.Tensor],
        q_descale: Optional[cute.Tensor],
        k_descale: Optional[cute.Tensor],
        v_descale: Optional[cute.Tensor],
        sf_q: Optional[cute.Tensor],
        sf_k: Optional[cute.Tensor],
        sf_v: Optional[cute.Tensor],
        stream: cuda.CUstream,
    ):
        # FA4 passes DescaleTensors only when a descale is given (interface.py 1338-1342), and
        # the block-scale operands only to the standard kernel (1606-1613)
        descales = (q_descale, k_descale, v_descale)
        descale_tensors = DescaleTensors(*descales) if any(t is not None for t in descales) else None
        sf = () if f["use_swapab"] else (sf_q, sf_k, sf_v)
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
            descale_tensors,
            None,  # blocksparse_tensors
            AuxData(None, None),
            num_splits_dynamic,
            tile_count_semaphore,
            None,  # virtual_batch_idx (FA4's LPT batch sort is not implemented)
            num_nheads_in_l2,
            None,
            None,
            None,  # cu_total_m_blocks, cu_total_splits_m_blocks, blocks_to_batch_idx
            max_seqlen_q,
            tensormap_workspace,
            *sf,
            stream,
        )

    return KernelEntry(fwd_sm100_entry, sig.compile_args, sig.args)


def add_tensormap_workspace(sig: Signature, f: dict) -> None:
    """FA4's per-CTA V descriptor workspace (int64 (n_ctas, 16), 128-byte aligned, rows
    contiguous: ``to_cute_tensor(..., assumed_align=128, leading_dim=1)``), passed to the SM90
    and SM100 forwards of varlen-K or seqused_k calls without a page table."""
    if f["paged_kv"] == "none" and (f["varlen_k"] or f["seqused_k"]):
        sig.tensor("tensormap_workspace", "int64", (sym(), sym()), leading_dim=1, align=128)
    else:
        sig.absent()


#: Strides CuTe keeps static (0) for each descale layout of a (batch, kv_head) descale
#: (fa4aot.core.fa4_interface.DESCALE_LAYOUTS).
DESCALE_ZERO_STRIDES = {"full": (), "per_head": (0,)}


def add_scales(sig: Signature, f: dict) -> None:
    """FP8 descales (fp32 (batch, kv_head), heads contiguous, 4-byte aligned:
    ``to_cute_tensor(t, assumed_align=4, leading_dim=1)``) and MXFP8 scale buffers (flat UE8M0,
    16-byte aligned: ``to_cute_tensor(t.view(torch.uint8))`` retyped), each absent unless the
    variant takes it."""
    layouts = (f.get("descales") or "none,none,none").split(",")
    for name, layout in zip(("q_descale", "k_descale", "v_descale"), layouts):
        if layout == "none":
            sig.absent()
        else:
            sig.tensor(name, "fp32", (sym(), sym()), leading_dim=1, align=4, zero_strides=DESCALE_ZERO_STRIDES[layout])
    mx = f.get("mxfp8")
    for name, on in (("sf_q", mx), ("sf_k", mx), ("sf_v", mx == "pv")):
        if on:
            sig.tensor(name, "e8m0", (sym(),), leading_dim=0, align=16)
        else:
            sig.absent()


def add_forward_tensors(sig: Signature, f: dict) -> None:
    """q, k, v, out, lse, softmax_scale, cu_seqlens/seqused, page_table, the window scalars and
    learnable_sink, in FA4's argument order, with FA4's layouts (``to_cute_tensor``: every mode
    dynamic but the contiguous one; 16-byte alignment for q/k/v/o, 4 for the rest). Shared with
    the SM90 forward."""
    dt = f["dtype"]
    split = f.get("num_splits", 1) > 1
    paged = f["paged_kv"] != "none"
    if f["varlen_q"]:
        q_shape = (sym(), sym(), sym())
    else:
        q_shape = (sym(), sym(), sym(), sym())
    # K/V: (batch, seqlen_k, h_kv, d), (total_k, h_kv, d) with cu_seqlens_k, or with a page
    # table (num_pages, page_size, h_kv, d): the page size stays dynamic (FA4 divides by it at
    # run time); whether it equals tile_n (TMA) or not (cp.async) is the variant's.
    kv_rank = 3 if f["varlen_k"] else 4
    sig.tensor("q", dt, q_shape)
    sig.tensor("k", dt, tuple(sym() for _ in range(kv_rank)))
    sig.tensor("v", "bf16" if f.get("mxfp8") == "qk" else dt, tuple(sym() for _ in range(kv_rank)))
    o_rank = len(q_shape) + (1 if split else 0)
    # With split-KV, out and lse are FA4's fp32 partials (a leading num_splits mode); FP8 and
    # MXFP8 calls write bf16 (interface.py 808).
    sig.tensor("out", "fp32" if split else out_dtype(dt, f.get("mxfp8")), tuple(sym() for _ in range(o_rank)))
    if f["has_lse"] or split:
        lse_rank = (2 if f["varlen_q"] else 3) + (1 if split else 0)
        sig.tensor("lse", "fp32", tuple(sym() for _ in range(lse_rank)), align=4)
    else:
        sig.absent()
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
    if paged:  # (batch, max_pages_per_seq), pages contiguous
        sig.tensor("page_table", "int32", (sym(), sym()), leading_dim=1, align=4)
    else:
        sig.absent()
    if f["local"]:
        sig.scalar("window_size_left", "i32")
        sig.scalar("window_size_right", "i32")
    else:
        sig.absent()
        sig.absent()
    if f["learnable_sink"] != "none":  # (nheads,)
        sig.tensor("learnable_sink", f["learnable_sink"], (sym(),), leading_dim=0, align=4)
    else:
        sig.absent()


def softcap_score_mod(softcap: float):
    """FA4's softcap: a score_mod with the value baked in (``utils.create_softcap_scoremod``), or
    None for 0 (FA4 turns softcap 0.0 into None)."""
    if not softcap:
        return None
    from flash_attn.cute.utils import create_softcap_scoremod

    return create_softcap_scoremod(float(softcap))
