"""The vocabulary of tensor layouts: a call's sizes (:class:`Dims`) and a tensor's dtype, shape and
strides (:class:`TensorLayout`). Each family's home (:mod:`fa4aot.core.families`) says which
tensors its kernels take in these terms; the build's self-test, ``fa4aot verify``, ``fa4aot
launch-plan`` and the tests make sample arguments from them (the runtime checks callers' tensors
itself, in :mod:`fa4aot.runtime.validate`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dims:
    """Problem sizes of one call. ``total_q``/``total_k`` are the packed lengths for varlen."""

    batch: int = 2
    seqlen_q: int = 1024
    seqlen_k: int = 1024
    nheads: int = 16
    nheads_kv: int = 16
    head_dim: int = 128
    head_dim_v: int = 128
    num_splits: int = 1
    total_q: int | None = None
    total_k: int | None = None
    #: paged K/V: tokens per page, and pages in the pool (default: enough for every sequence)
    page_size: int | None = None
    num_pages: int | None = None


@dataclass(frozen=True)
class TensorLayout:
    """A tensor's dtype, shape and strides (elements). ``strides`` is FA4's layout for it."""

    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    acc = 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def contiguous(dtype: str, *shape: int) -> TensorLayout:
    """A row-major tensor of this dtype and shape."""
    return TensorLayout(dtype, tuple(shape), contiguous_strides(tuple(shape)))


def int32_vectors(fields: Mapping[str, Any], wanted: Iterable[tuple[str | None, str, int]]) -> dict[str, TensorLayout]:
    """The int32 vectors (cu_seqlens, seqused, scheduler metadata) a call takes, from ``(switch,
    name, length)`` rows: each present when the variant field ``switch`` is true (None: always),
    in the rows' order."""
    return {name: contiguous("int32", n) for switch, name, n in wanted if switch is None or fields[switch]}


def swap_last(layout: TensorLayout) -> TensorLayout:
    """View of a contiguous (..., a, b) tensor as (..., b, a): how FA4 hands LSE to combine."""
    s, st = list(layout.shape), list(layout.strides)
    s[-1], s[-2] = s[-2], s[-1]
    st[-1], st[-2] = st[-2], st[-1]
    return TensorLayout(layout.dtype, tuple(s), tuple(st))
