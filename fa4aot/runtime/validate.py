"""Argument checks that run before anything is launched. Each failure names the argument and what
was expected. FA4's host code checks none of alignment, strides or devices (a misaligned base
pointer is accepted silently and faults or corrupts on the GPU), so these checks are ours."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor


def tensor(
    obj: Any,
    name: str,
    *,
    dtypes: Sequence[str],
    rank: int,
    device: int,
    align: int = 16,
    contiguous_dim: int | None = -1,
    stride_multiple: int = 1,
) -> DeviceTensor:
    """Describe ``obj`` and check dtype, rank, device, base alignment (bytes), unit stride of
    ``contiguous_dim`` and that the other strides are multiples of ``stride_multiple`` elements."""
    t = as_device_tensor(obj, name)
    if t.dtype not in dtypes:
        raise ArgumentError(f"{name}: dtype must be {' or '.join(dtypes)}, got {t.dtype}")
    if len(t.shape) != rank:
        raise ArgumentError(f"{name}: expected {rank} dimensions, got shape {t.shape}")
    if t.device is not None and t.device != device:
        raise ArgumentError(f"{name}: is on cuda:{t.device}, the current device is cuda:{device}")
    if t.ptr % align:
        raise ArgumentError(f"{name}: base address 0x{t.ptr:x} is not {align}-byte aligned")
    d = -1 if contiguous_dim is None else contiguous_dim % rank
    if d >= 0 and t.strides[d] != 1 and t.shape[d] > 1:
        raise ArgumentError(f"{name}: dimension {d} must be contiguous (stride 1), got strides {t.strides}")
    for i, s in enumerate(t.strides):
        if s < 0:
            raise ArgumentError(f"{name}: negative strides are not supported, got {t.strides}")
        if s % stride_multiple and i != d and t.shape[i] > 1:
            raise ArgumentError(
                f"{name}: stride {i} is {s} elements; the kernel needs multiples of {stride_multiple} "
                f"({stride_multiple * t.itemsize} bytes)"
            )
    return t


def shape(t: DeviceTensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ArgumentError(f"{name}: expected shape {tuple(expected)} ({what}), got {t.shape}")


def int32_vector(obj: Any, name: str, length: int, device: int) -> DeviceTensor:
    """A contiguous int32 vector of ``length`` (cu_seqlens, seqused, metadata buffers)."""
    t = tensor(obj, name, dtypes=("int32",), rank=1, device=device, align=4)
    if t.shape[0] != length:
        raise ArgumentError(f"{name}: expected length {length}, got {t.shape[0]}")
    return t


def fits_int32(value: int, name: str) -> int:
    if not -(2**31) <= value < 2**31:
        raise ArgumentError(f"{name}: {value} does not fit the kernel's int32")
    return value
