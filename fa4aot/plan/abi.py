"""The plan library's C ABI, mirrored in ctypes (see ``shim.c``; both change together with
``SHIM_ABI``), and the byte layout of a plan entry's arguments (natural C alignment, every slot
8-aligned), which is packed with one precompiled :class:`struct.Struct`."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

from fa4aot.core.signature import Arg, ScalarArg, TensorArg

#: Bumped with every layout change of the structs below (FA4AOT_SHIM_ABI in shim.c).
SHIM_ABI = 3
MAX_KERNELS = 4
MAX_PARAMS = 64
MAX_PARAM_BYTES = 4096
MAX_LAUNCHES = 4
MAX_ATTRS = 8
MAX_ANSWERS = 8
MAX_SETATTRS = 16
MAX_PTRS = 16
#: Library handle the shim hands the plan's module load when no real one is needed (any
#: non-zero value: the shim only checks that kernel lookups use the handle it handed out).
FAKE_LIBRARY_HANDLE = 0x1B

#: cudaLaunchAttributeID values that plans are known to record.
ATTR_COOPERATIVE = 2
ATTR_CLUSTER_DIMENSION = 4
ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6
ATTR_NAMES = {
    ATTR_COOPERATIVE: "cooperative",
    ATTR_CLUSTER_DIMENSION: "cluster_dim",
    ATTR_PROGRAMMATIC_STREAM_SERIALIZATION: "programmatic_stream_serialization",
}
#: Attribute queries a plan's module load makes, and how we answer them.
DEV_ATTR_MAX_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin
FUNC_ATTR_SHARED_SIZE_BYTES = 1  # CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES (static smem)

_u32, _i32, _u64 = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64


class KernelInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 512),
        ("handle", _u64),
        ("n_params", _u32),
        ("param_bytes", _u32),
        ("param_offset", _u32 * MAX_PARAMS),
        ("param_size", _u32 * MAX_PARAMS),
    ]


class Answer(ctypes.Structure):
    _fields_ = [("attr", _i32), ("value", _i32)]


class SetAttr(ctypes.Structure):
    _fields_ = [("kernel", _u64), ("attr", _i32), ("value", _i32), ("device", _i32), ("pad", _i32)]


class LaunchRecord(ctypes.Structure):
    _fields_ = [
        ("kernel", _u64),
        ("grid", _u32 * 3),
        ("block", _u32 * 3),
        ("smem", _u64),
        ("stream", _u64),
        ("n_attrs", _u32),
        ("param_bytes", _u32),
        ("attr_id", _u32 * MAX_ATTRS),
        ("attr_val", (ctypes.c_uint8 * 64) * MAX_ATTRS),
        ("params", ctypes.c_uint8 * MAX_PARAM_BYTES),
    ]


class State(ctypes.Structure):
    _fields_ = [
        ("abi", _u32),
        ("device", _i32),
        ("library_handle", _u64),
        ("n_kernels", _u32),
        ("n_device_answers", _u32),
        ("n_kernel_answers", _u32),
        ("pad0", _u32),
        ("kernels", KernelInfo * MAX_KERNELS),
        ("device_answers", Answer * MAX_ANSWERS),
        ("kernel_answers", Answer * MAX_ANSWERS),
        ("n_library_loads", _u32),
        ("n_kernel_lookups", _u32),
        ("n_launches", _u32),
        ("n_setattrs", _u32),
        ("error", _i32),
        ("launch_error", _i32),
        ("error_msg", ctypes.c_char * 256),
        ("setattrs", SetAttr * MAX_SETATTRS),
        ("launches", LaunchRecord * MAX_LAUNCHES),
    ]


class CallBlock(ctypes.Structure):
    """``fa4aot_call``: everything one call needs, so a launch is one foreign call."""

    _fields_ = [
        ("state", ctypes.c_void_p),
        ("entry", ctypes.c_void_p),
        ("argv", ctypes.c_void_p),
        ("argbuf", ctypes.c_void_p),
        ("launch", ctypes.c_void_p),
        ("nargs", _i32),
        ("n_ptrs", _u32),
        ("ptr_offset", _u32 * MAX_PTRS),
        ("stream_offset", _u32),
        ("have_last", _u32),
        ("ptrs", _u64 * MAX_PTRS),
        ("stream", _u64),
        ("last_ptrs", _u64 * MAX_PTRS),
    ]


#: Byte offset of ``ptrs`` in a call block: prepared calls write addresses and stream there.
CALL_PTRS_OFFSET = CallBlock.ptrs.offset


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
