"""Build-time kernel family definitions (installed as ``fa4aot_kernels``).

One module per family, named after it. Each exposes ``make_entry(variant, target) -> KernelEntry``: the FA4 kernel
object instantiated for the variant, a small ``@cute.jit`` wrapper that takes only tensors,
scalars and the stream (what ``export_to_c`` can express), fake compile-time arguments, and the
argument signature the launch plan will be called with. Importing these modules imports the CUTLASS
DSL and flash_attn; the runtime never does.
"""

from __future__ import annotations

import importlib


def module_for(family: str):
    """The kernel module that builds ``family``: the module named after it (one per row of
    :data:`fa4aot.core.families.FAMILIES`)."""
    from fa4aot.core.families import FAMILIES

    if family not in FAMILIES:
        raise KeyError(f"unknown kernel family {family!r}")
    return importlib.import_module(f"{__name__}.{family}")
