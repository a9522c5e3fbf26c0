"""Tensors and streams from any runtime, as plain descriptions (no framework imports).

Accepted tensors: objects with ``__cuda_array_interface__`` (PyTorch, CuPy, Numba), DLPack
producers (``__dlpack__``: JAX, PyTorch, CuPy, ...), and :class:`RawTensor` for raw device
pointers. Accepted streams: None (the legacy default stream), an int handle, an object with
``__cuda_stream__`` (the CUDA stream protocol), ``cuda_stream`` (PyTorch), ``ptr`` (CuPy), or a
``cuda.bindings`` ``CUstream``.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError

#: bytes per element of the dtypes fa4aot handles
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "int32": 4, "int64": 8, "uint8": 1, "e4m3": 1, "e5m2": 1, "e8m0": 1}

_CAI_TYPES = {"<f2": "fp16", "<f4": "fp32", "<i4": "int32", "<i8": "int64", "|u1": "uint8", "<u1": "uint8"}
# DLPack (code, bits) -> dtype; code 0 int, 1 uint, 2 float, 4 bfloat; DLPack 1.1's float8 codes
# 10 (kDLFloat8_e4m3fn), 12 (kDLFloat8_e5m2), 14 (kDLFloat8_e8m0fnu)
_DL_TYPES = {
    (2, 16): "fp16",
    (2, 32): "fp32",
    (4, 16): "bf16",
    (0, 32): "int32",
    (0, 64): "int64",
    (1, 8): "uint8",
    (10, 8): "e4m3",
    (12, 8): "e5m2",
    (14, 8): "e8m0",
}
_KDLCUDA, _KDLCUDA_MANAGED = 2, 13
#: DLPack 1.x: the version fa4aot reads, the read-only flag, and where DLManagedTensorVersioned
#: ({DLPackVersion version; void *manager_ctx; deleter; uint64_t flags; DLTensor dl_tensor})
#: keeps its flags and its tensor.
DLPACK_MAX_VERSION = (1, 0)
DLPACK_FLAG_READ_ONLY = 1 << 0
_DLV_FLAGS_OFFSET = 8 + 8 + 8
_DLV_TENSOR_OFFSET = _DLV_FLAGS_OFFSET + 8


class _RawTensorFields(NamedTuple):
    # address, shape, strides first, as in DeviceTensor and TensorDesc (plans read them by position)
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    device: int


class RawTensor(_RawTensorFields):
    """A tensor given as a raw device pointer: ``RawTensor(ptr, shape, dtype, strides=None,
    device=0)``, shape and strides in elements. ``strides`` defaults to the contiguous (row-major)
    strides of ``shape``. Immutable."""

    __slots__ = ()

    def __new__(
        cls, ptr: int, shape: tuple[int, ...], dtype: str, strides: tuple[int, ...] | None = None, device: int = 0
    ) -> RawTensor:
        # normalise once here, not on every call that takes the tensor
        shape = tuple(int(s) for s in shape)
        strides = contiguous_strides(shape) if strides is None else tuple(int(s) for s in strides)
        return super().__new__(cls, int(ptr), shape, strides, dtype, int(device))


class DeviceTensor(NamedTuple):
    """What fa4aot needs to know about a tensor: address, shape, strides (elements), dtype,
    device ordinal (None when the source does not say, e.g. ``__cuda_array_interface__``) and
    where it came from (``dlpack-readonly``: the producer marked it read-only). A plan takes it
    directly as a tensor argument."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str
    device: int | None
    source: str

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(out))


def as_device_tensor(obj: Any, name: str) -> DeviceTensor:
    """Describe ``obj`` (see the module doc); raises :class:`ArgumentError` naming ``name``.

    The converter is picked once per Python class (torch, CuPy, JAX, ...) and remembered."""
    conv = _CONVERTERS.get(obj.__class__)
    if conv is None:
        conv = converter(obj, name)
    return conv(obj, name)


def converter(obj: Any, name: str) -> Callable[[Any, str], DeviceTensor]:
    """The function that describes tensors of ``obj``'s class (remembered per class)."""
    cls = obj.__class__
    conv = _CONVERTERS.get(cls)
    if conv is not None:
        return conv
    if cls is DeviceTensor:
        conv = _from_device_tensor
    elif cls is RawTensor:
        conv = _from_raw
    elif cls.__module__ == "torch" and hasattr(obj, "data_ptr"):
        conv = _from_torch
    elif cls.__module__.startswith("cupy") and hasattr(obj, "data") and hasattr(obj, "device"):
        conv = _from_cupy
    elif hasattr(obj, "__cuda_array_interface__"):
        conv = _from_cai_obj
    elif hasattr(obj, "__dlpack__"):
        conv = _from_dlpack
    else:
        raise ArgumentError(
            f"{name}: expected a CUDA tensor (__cuda_array_interface__ or __dlpack__) or fa4aot.RawTensor, "
            f"got {cls.__name__}"
        )
    _CONVERTERS[cls] = conv
    return conv


def _from_device_tensor(t: DeviceTensor, name: str) -> DeviceTensor:
    return t


def _from_raw(t: RawTensor, name: str) -> DeviceTensor:
    if t.dtype not in ITEMSIZE:
        raise ArgumentError(f"{name}: unknown dtype {t.dtype!r}; use one of {sorted(ITEMSIZE)}")
    if len(t.strides) != len(t.shape):
        raise ArgumentError(f"{name}: {len(t.shape)} dims but {len(t.strides)} strides")
    return DeviceTensor(t.ptr, t.shape, t.strides, t.dtype, t.device, "raw")


_TORCH_DTYPES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "float8_e4m3fn": "e4m3",
    "float8_e5m2": "e5m2",
    "float8_e8m0fnu": "e8m0",
}
#: DeviceTensor's constructor without its Python-level __new__ (the torch path is per call)
_new = tuple.__new__
#: torch dtype object -> fa4aot dtype, filled from the torch the caller already imported
_TORCH_DT: dict[Any, str] = {}


def _from_torch(t: Any, name: str) -> DeviceTensor:
    """A torch.Tensor through its own accessors (duck-typed: torch is never imported here).
    Faster than either protocol, and works for bfloat16, which torch's
    ``__cuda_array_interface__`` refuses."""
    dtype = _TORCH_DT.get(t.dtype)
    if dtype is None:
        if not _TORCH_DT:
            torch = sys.modules["torch"]
            _TORCH_DT.update({getattr(torch, k): v for k, v in _TORCH_DTYPES.items() if hasattr(torch, k)})
        dtype = _TORCH_DT.get(t.dtype)
        if dtype is None:
            raise ArgumentError(f"{name}: unsupported dtype {t.dtype}")
    dev = t.get_device()
    if dev < 0 or not t.is_cuda:
        raise ArgumentError(f"{name}: must be a CUDA tensor, got one on {t.device}")
    try:
        return _new(DeviceTensor, (t.data_ptr(), t.shape, t.stride(), dtype, dev, "torch"))
    except RuntimeError:  # (no strides or no storage: a sparse or nested tensor)
        raise ArgumentError(f"{name}: a {t.layout} tensor; FA4 takes strided (dense) tensors") from None


_CUPY_TYPES = {"e": "fp16", "f": "fp32", "i": "int32", "l": "int64", "q": "int64", "B": "uint8"}


def _from_cupy(a: Any, name: str) -> DeviceTensor:
    dtype = _CUPY_TYPES.get(a.dtype.char)
    if dtype is None:
        raise ArgumentError(f"{name}: unsupported element type {a.dtype}")
    item = ITEMSIZE[dtype]
    bs = a.strides
    if any(b % item for b in bs):
        raise ArgumentError(f"{name}: byte strides {tuple(bs)} are not multiples of the element size {item}")
    return DeviceTensor(a.data.ptr, a.shape, tuple(b // item for b in bs), dtype, a.device.id, "cupy")


def _from_cai_obj(obj: Any, name: str) -> DeviceTensor:
    return _from_cai(obj.__cuda_array_interface__, name)


#: Python class -> converter (a handful of tensor classes; bounded all the same)
_CONVERTERS: BoundedDict = BoundedDict(64)


def _from_cai(cai: dict[str, Any], name: str) -> DeviceTensor:
    typestr = cai.get("typestr")
    dtype = _CAI_TYPES.get(typestr)
    if dtype is None:
        raise ArgumentError(f"{name}: unsupported element type {typestr!r} (__cuda_array_interface__)")
    shape = tuple(int(s) for s in cai["shape"])
    item = ITEMSIZE[dtype]
    if cai.get("strides") is None:
        strides = contiguous_strides(shape)
    else:
        bs = cai["strides"]
        if any(b % item for b in bs):
            raise ArgumentError(f"{name}: byte strides {tuple(bs)} are not multiples of the element size {item}")
        strides = tuple(int(b) // item for b in bs)
    ptr = int(cai["data"][0])
    return DeviceTensor(ptr, shape, strides, dtype, None, "cuda_array_interface")


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_PyCapsule_GetPointer = ctypes.pythonapi.PyCapsule_GetPointer
_PyCapsule_GetPointer.restype = ctypes.c_void_p
_PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_PyCapsule_IsValid = ctypes.pythonapi.PyCapsule_IsValid
_PyCapsule_IsValid.restype = ctypes.c_int
_PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _from_dlpack(obj: Any, name: str) -> DeviceTensor:
    try:
        dev_type, dev_id = obj.__dlpack_device__()
    except Exception as e:
        raise ArgumentError(f"{name}: __dlpack_device__ failed: {e}") from None
    if int(dev_type) not in (_KDLCUDA, _KDLCUDA_MANAGED):
        raise ArgumentError(f"{name}: must be on a CUDA device (DLPack device type {int(dev_type)}, 2 is CUDA)")
    try:
        # DLPack >= 1.0 producers hand out a versioned capsule, which carries the read-only flag
        capsule = obj.__dlpack__(stream=None, max_version=DLPACK_MAX_VERSION)
    except TypeError:
        try:
            capsule = obj.__dlpack__(stream=None)
        except TypeError:
            capsule = obj.__dlpack__()
        except Exception as e:
            raise ArgumentError(f"{name}: __dlpack__ failed: {e}") from None
    except Exception as e:
        raise ArgumentError(f"{name}: __dlpack__ failed: {e}") from None
    # The capsule stays unconsumed: its destructor releases the producer's reference when it is
    # collected, while ``obj`` (held by the caller) keeps the memory alive.
    source = "dlpack"
    if _PyCapsule_IsValid(capsule, b"dltensor"):
        addr = _PyCapsule_GetPointer(capsule, b"dltensor")
    elif _PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        base = _PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        if ctypes.c_uint64.from_address(base + _DLV_FLAGS_OFFSET).value & DLPACK_FLAG_READ_ONLY:
            source = "dlpack-readonly"
        addr = base + _DLV_TENSOR_OFFSET
    else:
        raise ArgumentError(f"{name}: __dlpack__ returned no dltensor capsule")
    t = _DLTensor.from_address(addr)
    key = (t.dtype.code, t.dtype.bits)
    dtype = _DL_TYPES.get(key)
    if dtype is None or t.dtype.lanes != 1:
        raise ArgumentError(f"{name}: unsupported DLPack element type code={key[0]} bits={key[1]}")
    ndim = t.ndim
    shape = tuple(t.shape[i] for i in range(ndim))
    strides = tuple(t.strides[i] for i in range(ndim)) if t.strides else contiguous_strides(shape)
    ptr = (t.data or 0) + t.byte_offset
    return DeviceTensor(ptr, shape, strides, dtype, t.device.device_id, source)


def stream_handle(stream: Any) -> int:
    """The raw ``CUstream`` value of ``stream`` (see the module doc); 0 is the legacy default.
    :class:`~fa4aot.ArgumentError` for anything else, or a handle that is no 64-bit unsigned int
    (before any buffer is made for the stream)."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        handle = stream
    else:
        handle = _handle_of(stream)
    if handle.__class__ is not int or not 0 <= handle < 1 << 64:
        raise ArgumentError(f"stream: {stream!r} is not a CUDA stream handle (a 64-bit unsigned int)")
    return handle


def _handle_of(stream: Any) -> Any:
    """``stream``'s handle from the protocols streams of CUDA Python, PyTorch, CuPy and others offer."""
    proto = getattr(stream, "__cuda_stream__", None)
    if proto is not None:
        _, handle = proto() if callable(proto) else proto
        return int(handle)
    for attr in ("cuda_stream", "ptr", "handle"):
        v = getattr(stream, attr, None)
        if isinstance(v, int):
            return v
    try:
        return int(stream)  # cuda.bindings CUstream supports int()
    except (TypeError, ValueError):
        raise ArgumentError(f"stream: cannot get a CUDA stream handle from {type(stream).__name__}") from None


def set_words(drv: Any, t: DeviceTensor, word: int, stream: int) -> None:
    """Every 32-bit word of ``t`` (last dimension contiguous, rows of whole words) set to
    ``word``: one memset when ``t`` is contiguous, else one 2D memset per slice of its leading
    dimensions."""
    shape, strides, item = t[1], t[2], ITEMSIZE[t[3]]
    if 0 in shape:
        return
    if strides == contiguous_strides(shape):
        drv.memset_d32(t[0], word, math.prod(shape) * item // 4, stream)
        return
    width = shape[-1] * item // 4
    rows = shape[-2] if len(shape) > 1 else 1
    pitch = max(strides[-2] * item if len(shape) > 1 else 0, width * 4)
    for idx in itertools.product(*(range(n) for n in shape[:-2])):
        base = t[0] + sum(i * st for i, st in zip(idx, strides[:-2])) * item
        drv.memset_d2d32(base, pitch, word, width, rows, stream)
