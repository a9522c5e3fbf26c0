"""FA4's SM100 backward (``FlashAttentionBackwardSm100``) for one variant, built as
``flash_attn.cute.interface._flash_attn_bwd`` builds it on compute capability 10.x (interface.py
2666-2690): the selected ``BwdConfig``'s tiles, 2-CTA MMA, query-head fold, registers and stages;
same arguments as the SM90 backward."""

from __future__ import annotations

from fa4aot_kernels.bwd_sm90 import BWD_Q_SUBTILE_FACTOR, entry_for, fa4_config, softcap_score_mod_bwd
from fa4aot_kernels.common import KernelEntry
from fa4aot_kernels.fwd_sm100 import softcap_score_mod
from flash_attn.cute.flash_bwd_sm100 import FlashAttentionBackwardSm100

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm100(
        f["head_dim"],
        f["head_dim_v"],
        is_causal=f["causal"],
        is_local=f["local"],
        qhead_per_kvhead=f["qhead_per_kvhead"],
        tile_m=c.tile_m,
        tile_n=c.tile_n,
        cluster_size=c.cluster_size,
        use_2cta_instrs=c.use_2cta_instrs,
        deterministic=f["deterministic"],
        spt=c.spt,
        score_mod=softcap_score_mod(f["softcap"]),
        score_mod_bwd=softcap_score_mod_bwd(f["softcap"]),
        mask_mod=None,
        has_aux_tensors=False,
        q_subtile_factor=BWD_Q_SUBTILE_FACTOR,
        kv_subtile_factor=1,  # config_kv_subtile_factor without block sparsity
        pack_factor=c.pack_factor,
        head_loop=c.head_loop,
        registers=c.registers,
        Q_stage=c.num_stages_Q,
        dO_stage=c.num_stages_dO,
        fold_LSE_dPsum=c.fold_LSE_dPsum,
    )
    return entry_for(kernel, variant)
