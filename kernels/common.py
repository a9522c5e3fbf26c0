"""Shared build-time helpers: the target-hardware stand-in, fake tensors and the entry record."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cutlass
import cutlass.cute as cute

from fa4aot.core.signature import COMPACT, Arg, ScalarArg, StreamArg, TensorArg

CUTLASS_DTYPES = {
    "bf16": cutlass.BFloat16,
    "fp16": cutlass.Float16,
    "fp32": cutlass.Float32,
    "int32": cutlass.Int32,
    "int64": cutlass.Int64,
    "e4m3": cutlass.Float8E4M3FN,
    "e5m2": cutlass.Float8E5M2,
    "e8m0": cutlass.Float8E8M0FNU,
}


class TargetHardwareInfo:
    """Stand-in for ``cutlass.utils.HardwareInfo`` that answers with the manifest target.

    FA4 asks for the SM count while tracing (persistent schedulers, the prepare kernel) and bakes
    it into host-side grids; on a build machine without a GPU the real class fails, and on one
    with a different GPU it would silently build for the wrong SKU.
    """

    num_sms: int = 0

    def __init__(self, device_id: int = 0):
        self.device_id = device_id

    def get_device_multiprocessor_count(self) -> int:
        return type(self).num_sms

    def get_max_active_clusters(self, cluster_size: int, stream: Any = None) -> int:
        return type(self).num_sms // cluster_size


def install_target_hardware(num_sms: int) -> None:
    """Make every HardwareInfo lookup FA4 does answer ``num_sms`` (idempotent)."""
    import cutlass.utils
    import cutlass.utils.hardware_info as hardware_info

    TargetHardwareInfo.num_sms = num_sms
    cutlass.utils.HardwareInfo = TargetHardwareInfo
    hardware_info.HardwareInfo = TargetHardwareInfo
    import flash_attn.cute.tile_scheduler as tile_scheduler

    tile_scheduler.HardwareInfo = TargetHardwareInfo


@dataclass
class KernelEntry:
    """What the build compiles for one variant.

    ``fn`` is a ``@cute.jit`` function whose parameters are exactly ``args`` (tensors, scalars,
    the stream), compiled with ``compile_args`` (fake tensors etc.); ``options`` are extra
    ``cute.compile`` options (e.g. ptxas flags the FA4 class asks for).
    """

    fn: Callable[..., Any]
    compile_args: list[Any]
    args: list[Arg]
    options: str = ""


class Signature:
    """Collects fake compile-time arguments together with their :mod:`fa4aot.core.signature` records."""

    def __init__(self) -> None:
        self.compile_args: list[Any] = []
        self.args: list[Arg] = []

    def tensor(
        self,
        name: str,
        dtype: str,
        shape: tuple[Any, ...],
        *,
        leading_dim: int | None = -1,
        align: int = 16,
        stride_divisibility: int = 1,
        zero_strides: tuple[int, ...] = (),
    ) -> Any:
        """Add a fake tensor. ``shape`` items are ints (static) or SymInts (dynamic); every
        stride is dynamic except ``leading_dim``'s, which is 1 (FA4's ``mark_layout_dynamic``),
        and the broadcast modes ``zero_strides``, which CuTe keeps static at 0."""
        rank = len(shape)
        if leading_dim is not None and leading_dim < 0:
            leading_dim += rank
        stride = tuple(
            1 if i == leading_dim else 0 if i in zero_strides else cute.sym_int64(divisibility=stride_divisibility)
            for i in range(rank)
        )
        fake = cute.runtime.make_fake_tensor(CUTLASS_DTYPES[dtype], shape, stride=stride, assumed_align=align)
        self.compile_args.append(fake)
        self.args.append(
            TensorArg(
                name,
                dtype,
                tuple(s if isinstance(s, int) else None for s in shape),
                tuple(1 if i == leading_dim else 0 if i in zero_strides else None for i in range(rank)),
                align,
            )
        )
        return fake

    def compact_tensor(self, name: str, dtype: str, shape: tuple[Any, ...], align: int) -> Any:
        """Add a row-major compact fake tensor: its strides follow from the (dynamic or static)
        extents, as ``mark_compact_shape_dynamic`` makes them (FA4's semaphores)."""
        rank = len(shape)
        fake = cute.runtime.make_fake_compact_tensor(
            CUTLASS_DTYPES[dtype], shape, stride_order=tuple(range(rank - 1, -1, -1)), assumed_align=align
        )
        self.compile_args.append(fake)
        strides = []
        for i in range(rank):  # static where every inner extent is, else a field checked compact
            inner = shape[i + 1 :]
            strides.append(math.prod(inner) if all(isinstance(x, int) for x in inner) else COMPACT)
        self.args.append(
            TensorArg(name, dtype, tuple(s if isinstance(s, int) else None for s in shape), tuple(strides), align)
        )
        return fake

    def scalar(self, name: str, ctype: str) -> Any:
        """Add a dynamic scalar (``f32`` or ``i32``)."""
        value = cutlass.Float32(1.0) if ctype == "f32" else cutlass.Int32(1)
        self.compile_args.append(value)
        self.args.append(ScalarArg(name, ctype))
        return value

    def absent(self) -> None:
        """An optional argument the variant does not take: compiled as None, dropped from C."""
        self.compile_args.append(None)

    def stream(self) -> Any:
        s = cute.runtime.make_fake_stream()
        self.compile_args.append(s)
        self.args.append(StreamArg())
        return s


def sym() -> Any:
    """A fresh dynamic int32 extent."""
    return cute.sym_int()
