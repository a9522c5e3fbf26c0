"""Build-time kernel family definitions (installed as ``fa4aot_kernels``).

One module per family. Each exposes ``make_entry(variant, target) -> KernelEntry``: the FA4 kernel
object instantiated for the variant, a small ``@cute.jit`` wrapper that takes only tensors,
scalars and the stream (what ``export_to_c`` can express), fake compile-time arguments, and the
argument signature the launch plan will be called with. Importing these modules imports the CUTLASS
DSL and flash_attn; the runtime never does.
"""

from __future__ import annotations

import importlib

#: family name -> module name under fa4aot_kernels
FAMILY_MODULES = {
    "fwd_sm100": "fwd_sm100",
    "fwd_sm90": "fwd_sm90",
    "fwd_sm120": "fwd_sm120",
    "combine": "combine",
    "prepare": "prepare",
    "bwd_sm90": "bwd_sm90",
    "bwd_sm100": "bwd_sm100",
    "bwd_pre": "bwd_pre",
    "bwd_post": "bwd_post",
}


def module_for(family: str):
    """The kernel module that builds ``family``."""
    return importlib.import_module(f"{__name__}.{FAMILY_MODULES[family]}")
