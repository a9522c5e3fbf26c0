"""FA4's SM120 backward (``FlashAttentionBackwardSm120``: the SM80 kernel within SM120's 99 KiB of
shared memory) for one variant, built as ``flash_attn.cute.interface._flash_attn_bwd`` builds it on
compute capability 12.x (interface.py 2609-2632: the selected ``BwdConfig``'s tiles, stages,
threads and MMA layouts; no tensor-map workspace, no semaphores)."""

from __future__ import annotations

from fa4aot_kernels.bwd_sm90 import entry_for, fa4_config, softcap_score_mod_bwd
from fa4aot_kernels.common import CUTLASS_DTYPES, KernelEntry
from fa4aot_kernels.fwd_sm100 import softcap_score_mod
from flash_attn.cute.flash_bwd_sm120 import FlashAttentionBackwardSm120

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    f = variant.fields
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm120(
        CUTLASS_DTYPES[f["dtype"]],
        f["head_dim"],
        f["head_dim_v"],
        f["qhead_per_kvhead"],
        c.tile_m,
        c.tile_n,
        c.num_stages_Q,
        c.num_stages_dO,
        c.num_threads,
        c.pack_gqa,
        f["causal"],
        f["local"],
        c.SdP_swapAB,
        c.dKV_swapAB,
        c.dQ_swapAB,
        c.AtomLayoutMSdP,
        c.AtomLayoutNdKV,
        c.AtomLayoutMdQ,
        V_in_regs=c.V_in_regs,
        score_mod=softcap_score_mod(f["softcap"]),
        score_mod_bwd=softcap_score_mod_bwd(f["softcap"]),
    )
    return entry_for(kernel, variant, workspace=False)
