"""Sample plan arguments: FA4-layout tensors at fake, distinct, aligned device addresses.

Used without a GPU by the build's self-test, ``fa4aot launch-plan`` and the tests. A plan only
does arithmetic on the addresses (it never dereferences them), so any aligned value will do.
"""

from __future__ import annotations

from typing import Any

from fa4aot.core.families import dims_for, sample_scalars, tensors_for
from fa4aot.core.layouts import Dims
from fa4aot.core.signature import TensorDesc
from fa4aot.core.variant import Variant

FAKE_BASE = 0x7F00_0000_0000
FAKE_STRIDE = 0x0100_0000_0000 // 64  # 1 TiB / 64: room for any sample tensor


def fake_pointer(index: int) -> int:
    """The fake device address of the ``index``-th sample tensor (256-byte aligned)."""
    return FAKE_BASE + index * FAKE_STRIDE


def named_args(variant: Variant, dims: Dims | None = None, *, stream: int = 0) -> dict[str, Any]:
    """Every argument a variant's plan takes, by name, for ``dims`` (default: representative)."""
    d = dims or dims_for(variant)
    out: dict[str, Any] = {}
    for i, (name, t) in enumerate(sorted(tensors_for(variant, d).items())):
        out[name] = TensorDesc(fake_pointer(i), t.shape, t.strides)
    out.update(sample_scalars(variant, d))
    out["stream"] = stream
    return out


def describe(variant: Variant, dims: Dims | None = None) -> str:
    d = dims or dims_for(variant)
    return (
        f"batch={d.batch} seqlen_q={d.seqlen_q} seqlen_k={d.seqlen_k} "
        f"nheads={d.nheads} nheads_kv={d.nheads_kv} splits={d.num_splits}"
    )
