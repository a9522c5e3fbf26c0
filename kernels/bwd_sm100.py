"""FA4's SM100 backward (``FlashAttentionBackwardSm100``) for one variant, built as
``flash_attn.cute.interface._flash_attn_bwd`` builds it on compute capability 10.x: 128x128 tiles,
2-CTA MMA (cluster 2) from head dim 128 up; same arguments as the SM90 backward."""

from __future__ import annotations

from fa4aot_kernels.bwd_sm90 import entry_for, softcap_score_mod_bwd
from fa4aot_kernels.common import KernelEntry
from fa4aot_kernels.fwd_sm100 import softcap_score_mod
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    two_cta = f["two_cta"]
    kernel = FlashAttentionBackwardSm100(
        f["head_dim"],
        f["head_dim_v"],
        is_causal=f["causal"],
        is_local=f["local"],
        qhead_per_kvhead=f["qhead_per_kvhead"],
        tile_m=f["tile_m"],
        tile_n=f["tile_n"],
        cluster_size=2 if two_cta else 1,
        use_2cta_instrs=two_cta,
        deterministic=f["deterministic"],
        spt=(f["causal"] or f["local"]) and f["deterministic"],
        score_mod=softcap_score_mod(f["softcap"]),
        score_mod_bwd=softcap_score_mod_bwd(f["softcap"]),
        mask_mod=None,
        has_aux_tensors=False,
        q_subtile_factor=2,
        kv_subtile_factor=1,  # get_kv_subtile_factor(None, tile_n)
    )
    return entry_for(kernel, f)
