"""``fa4aot.interface``: FA4's engine entry points under FA4's module name
(``flash_attn.cute.interface``), so an engine switches with one import. See
:mod:`fa4aot.runtime.interface`."""

from fa4aot.runtime.entry import flash_attn_func, flash_attn_varlen_func
from fa4aot.runtime.fa4_entries import _flash_attn_bwd, _flash_attn_fwd_combine, get_scheduler_metadata
from fa4aot.runtime.interface import _flash_attn_fwd, _get_scheduler_metadata

__all__ = [
    "_flash_attn_bwd",
    "_flash_attn_fwd",
    "_flash_attn_fwd_combine",
    "_get_scheduler_metadata",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "get_scheduler_metadata",
]
