"""FA4's SM100 backward (``FlashAttentionBackwardSm100``) for one variant, built as
``flash_attn.cute.interface._flash_attn_bwd`` builds it on compute capability 10.x (interface.py
2666-2690): the selected ``BwdConfig``'s tiles, 2-CTA MMA, query-head fold, registers and stages;
same arguments as the SM90 backward."""

from __future__ import annotations

from fa4aot_kernels.bwd_sm90 import entry_for, fa4_config, main_kwargs
from fa4aot_kernels.common import KernelEntry, config_kwargs
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's SM100 main backward kernel for this variant."""
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm100(
        **main_kwargs(variant.fields, c, dtype=False),
        kv_subtile_factor=1,  # config_kv_subtile_factor without block sparsity
        **config_kwargs(c, "cluster_size use_2cta_instrs pack_factor head_loop fold_LSE_dPsum"),
    )
    return entry_for(kernel, variant)
