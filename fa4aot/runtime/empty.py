"""FA4's result for a forward call without keys (or queries): nothing launches; ``out`` = 0 and
``lse`` = -inf, or each head's sink logit (interface.py's early return)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.tensors import ITEMSIZE, DeviceTensor, set_words

if TYPE_CHECKING:
    from fa4aot.runtime.loader import Runtime


#: fp32 -inf: the LSE of a row with no keys and no sink (FA4: ``lse.fill_(-inf)``)
NEG_INF_F32 = 0xFF800000


def fill_empty(rt: Runtime, od: DeviceTensor, ld: DeviceTensor | None, sink: DeviceTensor | None, stream: int) -> None:
    """FA4's result for a call without keys: ``out`` = 0 and ``lse`` = -inf, or the sink logit of
    each head with a learnable sink (the sink is read back to the host: this synchronises)."""
    drv = rt.driver
    if 0 in od[1]:
        return  # no queries: nothing to write
    if (od[1][-1] * ITEMSIZE[od[3]]) % 4:
        raise ArgumentError(f"out: rows of {od[1][-1]} {od[3]} elements are not whole 32-bit words")
    set_words(drv, od, 0, stream)
    if ld is None:
        return
    if sink is None:
        set_words(drv, ld, NEG_INF_F32, stream)
        return
    raw = drv.read(sink[0], sink[1][0] * ITEMSIZE[sink[3]], stream)
    if sink[3] == "fp32":
        words = struct.unpack(f"<{sink[1][0]}I", raw)
    elif sink[3] == "bf16":
        words = tuple(w << 16 for w in struct.unpack(f"<{sink[1][0]}H", raw))
    else:
        halves = struct.unpack(f"<{sink[1][0]}e", raw)
        words = struct.unpack(f"<{len(halves)}I", struct.pack(f"<{len(halves)}f", *halves))
    shape, strides = ld[1], ld[2]
    for h, word in enumerate(words):  # lse: (batch, nheads, seqlen_q) or (nheads, total_q)
        if len(shape) == 3:
            base = ld[0] + h * strides[1] * 4
            drv.memset_d2d32(base, max(strides[0], shape[2]) * 4, word, shape[2], shape[0], stream)
        else:
            drv.memset_d2d32(ld[0] + h * strides[0] * 4, shape[1] * 4, word, shape[1], 1, stream)
