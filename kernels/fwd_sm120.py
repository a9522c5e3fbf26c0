"""FA4's SM120 forward (``FlashAttentionForwardSm120``: the SM80 kernel within SM120's 99 KiB of
shared memory) for one variant, built as ``flash_attn.cute.interface._flash_attn_fwd`` builds it on
compute capability 12.x (128 threads, one K/V stage, no page table, no split-KV, no sink)."""

from __future__ import annotations

from fa4aot_kernels.common import KernelEntry, attention_kwargs
from fa4aot_kernels.fwd_sm90 import entry_for
from flash_attn.cute.flash_fwd_sm120 import FlashAttentionForwardSm120

from fa4aot.core.fa4_interface import SM120_STAGES, SM120_THREADS
from fa4aot.core.variant import Target, Variant


def constructor_kwargs(variant: Variant) -> dict:
    """The FlashAttentionForwardSm120 arguments FA4's interface passes for this variant
    (interface.py 1522-1539: 128 threads, one K/V stage, the config's tiles)."""
    f = variant.fields
    return dict(
        **attention_kwargs(f, dtype=True),
        **{field: f[field] for field in ("pack_gqa", "tile_m", "tile_n")},  # the selected config's
        num_stages=SM120_STAGES,
        num_threads=SM120_THREADS,
        Q_in_regs=False,
    )


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's SM120 forward for this variant."""
    # page_table and learnable_sink are absent (FA4 refuses them on SM120); no workspace
    return entry_for(FlashAttentionForwardSm120(**constructor_kwargs(variant)), variant.fields, workspace=False)
