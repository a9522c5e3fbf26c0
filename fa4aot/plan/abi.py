"""The byte layout of a plan entry's arguments (natural C alignment, every slot 8-aligned), which
the runtime packs with one precompiled :class:`struct.Struct`."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from fa4aot.core.signature import Arg, ScalarArg, TensorArg


def tensor_struct_format(arg: TensorArg) -> str:
    """``struct`` format of one tensor struct (native alignment, trailing pad to 8)."""
    fmt = "P"
    fmt += ("i" if arg.shape_bits == 32 else "q") * arg.n_dyn_shapes
    if arg.n_dyn_strides:
        if arg.stride_bits == 64 and arg.shape_bits == 32 and arg.n_dyn_shapes % 2:
            fmt += "x" * 4  # align the int64 strides
        fmt += ("q" if arg.stride_bits == 64 else "i") * arg.n_dyn_strides
    size = struct.calcsize("@" + fmt)
    if size % 8:
        fmt += "x" * (8 - size % 8)
    return fmt


def struct_layout(args: Sequence[Arg]) -> tuple[str, list[int]]:
    """One ``struct`` format for all argument storage, and each argument's byte offset in it.

    Tensors are their C struct; scalars a 4-byte slot; the stream an 8-byte slot; every slot
    starts 8-aligned so the entry can read it through a plain pointer.
    """
    fmt = "@"
    offsets = []
    pos = 0
    for a in args:
        offsets.append(pos)
        if isinstance(a, TensorArg):
            part = tensor_struct_format(a)
        elif isinstance(a, ScalarArg):
            part = ("f" if a.ctype == "f32" else "i") + "xxxx"
        else:
            part = "P"
        fmt += part
        pos = struct.calcsize(fmt)
    return fmt, offsets
