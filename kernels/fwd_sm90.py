"""FA4's SM90 forward (``FlashAttentionForwardSm90``) for one variant, built as
``flash_attn.cute.interface._flash_attn_fwd`` builds it on Hopper (384 threads, 2 stages)."""

from __future__ import annotations

from fa4aot_kernels.common import EntryArgs, KernelEntry, Signature, attention_kwargs, config_kwargs
from fa4aot_kernels.fwd_sm100 import add_forward_tensors, add_tensormap_workspace, fa4_config
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90
from flash_attn.cute.utils import AuxData

from fa4aot.core.variant import Target, Variant


def constructor_kwargs(variant: Variant) -> dict:
    """The FlashAttentionForwardSm90 arguments FA4's interface passes for this variant
    (interface.py 1406-1426: 2 stages, the config's tiles, MMA flags and registers)."""
    f = variant.fields
    return dict(
        **attention_kwargs(f, dtype=True),
        **config_kwargs(fa4_config(variant), "pack_gqa tile_m tile_n intra_wg_overlap mma_pv_is_rs registers"),
        num_stages=2,
        Q_in_regs=False,
        q_subtile_factor=1,
        paged_kv_non_tma=f["paged_kv"] == "cpasync",
    )


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's SM90 forward for this variant."""
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
        sig.absent("tensormap_workspace")
    sig.stream()

    def call(a: EntryArgs) -> None:
        kernel(
            *a.span("q", "learnable_sink"),
            None,  # blocksparse_tensors
            AuxData(None, None),
            None,  # cu_total_m_blocks
            None,  # cu_total_splits_m_blocks
            *((a["tensormap_workspace"],) if workspace else ()),
            a["stream"],
        )

    return sig.entry("fwd_entry", call)
