"""The caller's framework, seen from the runtime: which one a tensor comes from, allocating like
it, a transposed view in it, and its current stream. Nothing is imported here: a framework's
module is taken from ``sys.modules``, where the caller's own import put it."""

from __future__ import annotations

import sys
from typing import Any

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor

_FRAMEWORK_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "int32": "int32", "int64": "int64"}
#: Python class -> framework name ("torch", "cupy", "jax", "raw")
_FRAMEWORKS: BoundedDict = BoundedDict(64)


def framework(obj: Any) -> str:
    """The framework a tensor comes from (remembered per Python class)."""
    cls = obj.__class__
    fw = _FRAMEWORKS.get(cls)
    if fw is None:
        mod = cls.__module__.split(".")[0]
        fw = mod if mod in ("torch", "cupy") else ("jax" if mod in ("jax", "jaxlib") else "raw")
        _FRAMEWORKS[cls] = fw
    return fw


def alloc_like(ref: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """An empty tensor on ``ref``'s device, made by ``ref``'s own framework (already imported by
    the caller, so nothing new is imported here)."""
    fw = framework(ref)
    if fw == "torch":
        torch = sys.modules["torch"]
        return ref.new_empty(shape, dtype=getattr(torch, _FRAMEWORK_DTYPES[dtype]))
    if fw == "cupy":
        cp = sys.modules["cupy"]
        if dtype == "bf16":
            raise ArgumentError("CuPy has no bfloat16 arrays: pass out= (or use fp16)")
        with ref.device:
            return cp.empty(shape, dtype=getattr(cp, _FRAMEWORK_DTYPES[dtype]))
    if fw == "jax":
        jnp = sys.modules["jax.numpy"]
        return jnp.empty(shape, dtype=getattr(jnp, _FRAMEWORK_DTYPES[dtype]), device=next(iter(ref.devices())))
    raise ArgumentError(
        f"cannot allocate a {dtype}{list(shape)} output for raw pointers: pass out= (and use num_splits=1 and "
        "return_lse=False, or call the kernels through a framework, or use fa4aot.prepare_forward)"
    )


def transposed(t: Any) -> Any:
    """The last two dimensions swapped, as a view in the tensor's framework (or a descriptor)."""
    if isinstance(t, DeviceTensor):
        s, st = list(t.shape), list(t.strides)
        s[-1], s[-2], st[-1], st[-2] = s[-2], s[-1], st[-2], st[-1]
        return t._replace(shape=tuple(s), strides=tuple(st))
    fw = framework(t)
    if fw == "torch":
        return t.transpose(-1, -2)
    if fw == "cupy":
        return t.swapaxes(-1, -2)
    return transposed(as_device_tensor(t, "lse"))


_TORCH_STREAM: list[Any] = []


def default_stream(ref: Any) -> int:
    """The caller's framework's current stream (FA4 launches on torch's current stream)."""
    fw = framework(ref)
    if fw == "torch":
        if not _TORCH_STREAM:
            torch = sys.modules["torch"]
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the fast accessor, if present
            _TORCH_STREAM.append(raw or (lambda d: torch.cuda.current_stream(d).cuda_stream))
        return _TORCH_STREAM[0](ref.get_device())
    if fw == "cupy":
        return sys.modules["cupy"].cuda.get_current_stream().ptr
    return 0
