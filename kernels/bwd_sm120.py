"""FA4's SM120 backward (``FlashAttentionBackwardSm120``: the SM80 kernel within SM120's 99 KiB of
shared memory) for one variant, built as ``flash_attn.cute.interface._flash_attn_bwd`` builds it on
compute capability 12.x (interface.py 2609-2632: the selected ``BwdConfig``'s tiles, stages,
threads and MMA layouts; no tensor-map workspace, no semaphores)."""

from __future__ import annotations

from fa4aot_kernels.bwd_sm90 import SM80_MMA_CONFIG, backward_kwargs, entry_for, fa4_config
from fa4aot_kernels.common import KernelEntry, config_kwargs
from flash_attn.cute.flash_bwd_sm120 import FlashAttentionBackwardSm120

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's SM120 main backward kernel for this variant."""
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm120(
        # the class takes no mask_mod / has_aux_tensors, and the tiles as m/n_block_size
        **backward_kwargs(variant.fields, dtype=True, mask_mod=False),
        **config_kwargs(
            c,
            f"{SM80_MMA_CONFIG} num_stages_Q num_stages_dO num_threads pack_gqa",
            m_block_size="tile_m",
            n_block_size="tile_n",
        ),
    )
    return entry_for(kernel, variant, workspace=False)
