"""Argument checks that run before anything is launched. Each failure names the argument and what
was expected. FA4's host code checks none of alignment, strides or devices (a misaligned base
pointer is accepted silently and faults or corrupts on the GPU), so these checks are ours.

Tensors are :class:`~fa4aot.runtime.tensors.DeviceTensor` tuples; the hot-path checks index
them by position (ptr, shape, strides, dtype, device).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.tensors import ITEMSIZE, DeviceTensor, as_device_tensor

#: FA4's q/k/v/o need 16-byte aligned bases and 16-byte multiples for every non-unit stride (TMA).
IO_ALIGN_BYTES = 16
IO_STRIDE_ELEMS = 8  # 16 bytes of a 2-byte dtype
TWO_BYTE = ("bf16", "fp16")
INT32_MAX = 2**31 - 1
#: DeviceTensor.source of a tensor its DLPack producer marked read-only
READ_ONLY = "dlpack-readonly"


#: Allocation ranges a runtime remembers (start address -> end, device); cleared when full.
MAX_POINTER_RANGES = 1024


class PointerRanges:
    """The device of each allocation range the driver has been asked about, so a buffer used call
    after call costs one lookup instead of ``cuPointerGetAttribute``. Kept only in a process that
    sees one device: there a range freed and allocated again is still on that device (with more,
    an address could come back on another one)."""

    def __init__(self, driver: Any):
        self._driver = driver
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._devices: list[int] = []

    def device(self, ptr: int) -> int | None:
        """The device of the allocation holding ``ptr`` (None: not device memory)."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i >= 0 and ptr < self._ends[i]:
            return self._devices[i]
        found = self._driver.pointer_range(ptr)
        if found is None:
            return None
        dev, start, size = found
        if len(self._starts) >= MAX_POINTER_RANGES:
            self._starts, self._ends, self._devices = [], [], []
        j = bisect.bisect_right(self._starts, start)
        if size > 0 and not (j > 0 and self._ends[j - 1] > start):  # a new range (never overlapping ones)
            self._starts.insert(j, start)
            self._ends.insert(j, start + size)
            self._devices.insert(j, dev)
        return dev


def device_of(t: DeviceTensor, name: str, device: int, rt: Any) -> None:
    """``t`` lives on ``device``. Sources that do not say (``__cuda_array_interface__``) or whose
    device is only declared (:class:`fa4aot.RawTensor`) are asked through the driver's pointer
    attributes (remembered per allocation range in a one-device process: :class:`PointerRanges`),
    so a buffer of another GPU is refused whatever protocol it came through."""
    dev = t[4]
    if (dev is None or t[5] == "raw") and t[0]:
        ranges = rt.pointer_ranges
        actual = ranges.device(t[0]) if ranges is not None else rt.driver.pointer_device(t[0])
        if actual is None:
            raise ArgumentError(f"{name}: address 0x{t[0]:x} is not CUDA device memory")
        if dev is not None and actual != dev:
            raise ArgumentError(f"{name}: is declared on cuda:{dev} but its memory is on cuda:{actual}")
        dev = actual
    if dev is not None and dev != device:
        raise ArgumentError(f"{name}: is on cuda:{dev}, the runtime's device is cuda:{device}")


def io(t: DeviceTensor, name: str, rank: int, device: int, rt: Any, writable: bool = False) -> None:
    """A q/k/v/out tensor (rank 3 or 4): rank, device, 16-byte aligned base, contiguous last
    dimension, other strides non-negative multiples of 8 elements (unit dimensions exempt)."""
    shape, strides = t[1], t[2]
    if len(shape) != rank:
        raise ArgumentError(f"{name}: expected {rank} dimensions, got shape {tuple(shape)}")
    if t[4] != device or t[5] == "raw":
        device_of(t, name, device, rt)
    if t[0] % IO_ALIGN_BYTES:
        raise ArgumentError(f"{name}: base address 0x{t[0]:x} is not {IO_ALIGN_BYTES}-byte aligned")
    if strides[-1] != 1 and shape[-1] != 1:
        raise ArgumentError(f"{name}: the last dimension must be contiguous (stride 1), got strides {tuple(strides)}")
    x = strides[0] | strides[1] | strides[2] if rank == 4 else strides[0] | strides[1]  # q/k/v/out: rank 3 or 4
    step = IO_STRIDE_ELEMS if t[3] in TWO_BYTE else IO_ALIGN_BYTES // ITEMSIZE[t[3]]
    if x < 0 or x % step:  # one test for all (exact when no unit dimensions)
        for i in range(rank - 1):
            s = strides[i]
            if s < 0:
                raise ArgumentError(f"{name}: negative strides are not supported, got {tuple(strides)}")
            if s % step and shape[i] > 1:
                raise ArgumentError(
                    f"{name}: stride {i} is {s} elements; the kernel needs multiples of {step} ({IO_ALIGN_BYTES} bytes)"
                )
    if writable and t[5] == READ_ONLY:
        raise ArgumentError(f"{name}: the tensor is read-only (its DLPack export says so); fa4aot writes it")


def tensor(
    obj: Any,
    name: str,
    *,
    dtypes: Sequence[str],
    rank: int,
    device: int,
    rt: Any = None,
    align: int = 16,
    contiguous_dim: int | None = -1,
    stride_multiple: int = 1,
    writable: bool = False,
) -> DeviceTensor:
    """Describe ``obj`` and check dtype, rank, device, base alignment (bytes), unit stride of
    ``contiguous_dim``, that the other strides are multiples of ``stride_multiple`` elements and,
    for outputs (``writable``), that its producer did not mark it read-only."""
    t = as_device_tensor(obj, name)
    if writable and t.source == READ_ONLY:
        raise ArgumentError(f"{name}: the tensor is read-only (its DLPack export says so); fa4aot writes it")
    if t.dtype not in dtypes:
        raise ArgumentError(f"{name}: dtype must be {' or '.join(dtypes)}, got {t.dtype}")
    if len(t.shape) != rank:
        raise ArgumentError(f"{name}: expected {rank} dimensions, got shape {tuple(t.shape)}")
    if rt is not None and (t.device != device or t.source == "raw"):
        device_of(t, name, device, rt)
    elif t.device is not None and t.device != device:
        raise ArgumentError(f"{name}: is on cuda:{t.device}, the runtime's device is cuda:{device}")
    if t.ptr % align:
        raise ArgumentError(f"{name}: base address 0x{t.ptr:x} is not {align}-byte aligned")
    d = -1 if contiguous_dim is None else contiguous_dim % rank
    if d >= 0 and t.strides[d] != 1 and t.shape[d] > 1:
        raise ArgumentError(f"{name}: dimension {d} must be contiguous (stride 1), got strides {tuple(t.strides)}")
    for i, s in enumerate(t.strides):
        if s < 0:
            raise ArgumentError(f"{name}: negative strides are not supported, got {tuple(t.strides)}")
        if s % stride_multiple and i != d and t.shape[i] > 1:
            raise ArgumentError(
                f"{name}: stride {i} is {s} elements; the kernel needs multiples of {stride_multiple} "
                f"({stride_multiple * t.itemsize} bytes)"
            )
    return t


def shape(t: DeviceTensor, name: str, expected: Sequence[int], what: str) -> None:
    if tuple(t[1]) != tuple(expected):
        raise ArgumentError(f"{name}: expected shape {tuple(expected)} ({what}), got {tuple(t[1])}")


def int32_vector_any(obj: Any, name: str, device: int, rt: Any) -> DeviceTensor:
    """A contiguous int32 vector of any length (cu_seqlens, seqused, metadata buffers)."""
    t = as_device_tensor(obj, name)
    if t[3] != "int32":
        raise ArgumentError(f"{name}: dtype must be int32, got {t[3]}")
    if len(t[1]) != 1:
        raise ArgumentError(f"{name}: expected 1 dimension, got shape {tuple(t[1])}")
    if t[4] != device or t[5] == "raw":
        device_of(t, name, device, rt)
    if t[0] % 4:
        raise ArgumentError(f"{name}: base address 0x{t[0]:x} is not 4-byte aligned")
    if t[2][0] != 1 and t[1][0] > 1:
        raise ArgumentError(f"{name}: must be contiguous (stride 1), got stride {t[2][0]}")
    return t


def int32_vector(obj: Any, name: str, length: int, device: int, rt: Any = None) -> DeviceTensor:
    """A contiguous int32 vector of ``length``."""
    t = int32_vector_any(obj, name, device, rt)
    if t[1][0] != length:
        raise ArgumentError(f"{name}: expected length {length}, got {t[1][0]}")
    return t


def fits_int32(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{name}: expected an int, got {value!r}")
    if not -(2**31) <= value <= INT32_MAX:
        raise ArgumentError(f"{name}: {value} does not fit the kernel's int32")
    return value


def seqlen(value: Any, name: str) -> int:
    """A sequence length: an int in 0..2^31-1."""
    fits_int32(value, name)
    if value < 0:
        raise ArgumentError(f"{name}: must be >= 0, got {value}")
    return value


def finite(value: Any, name: str) -> float:
    """A finite float scalar (ints and numpy/torch scalars are converted; bools and strings are not)."""
    if value.__class__ is not float:
        if isinstance(value, (bool, str, bytes)):
            raise ArgumentError(f"{name}: expected a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ArgumentError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ArgumentError(f"{name}: must be finite, got {value}")
    return value


#: dtypes FA4's backward takes for q, k, v, out (and its forward on every arch)
FORWARD_DTYPES = ("bf16", "fp16")
#: dtypes FA4's SM100-family forward also takes for q, k, v (out is bf16 then)
FP8_DTYPES = ("e4m3", "e5m2")
#: dtypes FA4 takes for learnable_sink (``_LEARNABLE_SINK_DTYPES``)
SINK_DTYPES = ("bf16", "fp16", "fp32")


def check_window(value: Any, name: str) -> int | None:
    """A window side: None, or an int that fits FA4's int32."""
    if value is None:
        return None
    if value.__class__ is not int:
        raise ArgumentError(f"window_size {name}: expected an int or None, got {value!r}")
    return fits_int32(value, f"window_size {name}")
