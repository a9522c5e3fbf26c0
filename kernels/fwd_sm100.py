"""FA4's SM100 forward (``FlashAttentionForwardSm100``) for one variant.

The FA4 object is built exactly as ``flash_attn.cute.interface._flash_attn_fwd`` builds it for the
same decisions; the fake tensors mirror ``to_cute_tensor`` (every extent dynamic, every stride
dynamic except the innermost, 16-byte assumed alignment for q/k/v/o, 4 for the rest).
"""

from __future__ import annotations

from fa4aot_kernels.common import EntryArgs, KernelEntry, Signature, attention_kwargs, sym
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
        **attention_kwargs(f, dtype=False),
        config=fa4_config(variant),
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
    """The entry of FA4's SM100 forward (or its SwapAB decode kernel) for this variant."""
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
        sig.optional_tensor(name, f[name], "int32", (sym(),), leading_dim=0, align=4)
    sig.scalar("max_seqlen_q", "i32")
    add_tensormap_workspace(sig, f)
    add_scales(sig, f)
    sig.stream()

    def call(a: EntryArgs) -> None:
        # FA4 passes DescaleTensors only when a descale is given (interface.py 1338-1342), and
        # the block-scale operands only to the standard kernel (1606-1613)
        descales = a.span("q_descale", "v_descale")
        descale_tensors = DescaleTensors(*descales) if any(t is not None for t in descales) else None
        sf = () if f["use_swapab"] else a.span("sf_q", "sf_v")
        kernel(
            *a.span("q", "learnable_sink"),
            descale_tensors,
            None,  # blocksparse_tensors
            AuxData(None, None),
            *a.span("num_splits_dynamic", "tile_count_semaphore"),
            None,  # virtual_batch_idx (FA4's LPT batch sort is not implemented)
            a["num_nheads_in_l2"],
            None,  # cu_total_m_blocks
            None,  # cu_total_splits_m_blocks
            None,  # blocks_to_batch_idx
            *a.span("max_seqlen_q", "tensormap_workspace"),
            *sf,
            a["stream"],
        )

    return sig.entry("fwd_sm100_entry", call)


def add_tensormap_workspace(sig: Signature, f: dict) -> None:
    """FA4's per-CTA V descriptor workspace (int64 (n_ctas, 16), 128-byte aligned, rows
    contiguous: ``to_cute_tensor(..., assumed_align=128, leading_dim=1)``), passed to the SM90
    and SM100 forwards of varlen-K or seqused_k calls without a page table."""
    present = f["paged_kv"] == "none" and (f["varlen_k"] or f["seqused_k"])
    sig.optional_tensor("tensormap_workspace", present, "int64", (sym(), sym()), leading_dim=1, align=128)


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
        zero_strides = DESCALE_ZERO_STRIDES.get(layout, ())
        sig.optional_tensor(
            name, layout != "none", "fp32", (sym(), sym()), leading_dim=1, align=4, zero_strides=zero_strides
        )
    mx = f.get("mxfp8")
    for name, on in (("sf_q", mx), ("sf_k", mx), ("sf_v", mx == "pv")):
        sig.optional_tensor(name, bool(on), "e8m0", (sym(),), leading_dim=0, align=16)


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
    lse_rank = (2 if f["varlen_q"] else 3) + (1 if split else 0)
    sig.optional_tensor("lse", f["has_lse"] or split, "fp32", tuple(sym() for _ in range(lse_rank)), align=4)
    sig.scalar("softmax_scale", "f32")
    sig.seqlen_vectors(f)
    # (batch, max_pages_per_seq), pages contiguous
    sig.optional_tensor("page_table", paged, "int32", (sym(), sym()), leading_dim=1, align=4)
    sig.window_sizes(f)
    sink = f["learnable_sink"]  # (nheads,)
    sig.optional_tensor("learnable_sink", sink != "none", sink, (sym(),), leading_dim=0, align=4)
