"""The CUDA driver calls fa4aot makes, behind one small interface.

:class:`CudaDriver` implements it with ``cuda.bindings.driver`` (imported on first use, never at
``import fa4aot``). Tests substitute a fake with the same methods, so argument validation and the
launch path run on machines without a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from fa4aot.core.errors import Fa4aotError

#: CUdevice_attribute / CUfunction_attribute values used here
DEV_ATTR_SM_COUNT = 16
DEV_ATTR_CC_MAJOR = 75
DEV_ATTR_CC_MINOR = 76
DEV_ATTR_MAX_SMEM_OPTIN = 97


class CudaError(Fa4aotError):
    """A CUDA driver call failed."""


@dataclass(frozen=True)
class DeviceInfo:
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    num_sms: int
    smem_optin: int
    driver_version: int  # e.g. 13000 for CUDA 13.0


class CudaDriver:
    """``cuda.bindings.driver`` behind the methods fa4aot needs. Thread-safe."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver

            result = driver.cuInit(0)
        except Exception as e:  # ImportError, or cuda-python's "libcuda not found"
            raise CudaError(f"the CUDA driver is not available: {e}") from None
        self._d = driver
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}
        self._check(result, "cuInit")

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, name = self._d.cuGetErrorName(err)
            _, text = self._d.cuGetErrorString(err)
            raise CudaError(f"{what} failed: {name.decode() if name else int(err)}: {text.decode() if text else ''}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else tuple(rest)

    # -- device and context ------------------------------------------------------------------

    def current_device(self) -> int:
        """Ordinal of the current context's device; makes device 0's primary context current
        when no context is (the case for raw-pointer users)."""
        d = self._d
        ctx = self._check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(ctx) == 0:
            dev = self._check(d.cuDeviceGet(0), "cuDeviceGet")
            ctx = self._check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            self._check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return int(self._check(d.cuCtxGetDevice(), "cuCtxGetDevice"))

    def device_info(self, ordinal: int) -> DeviceInfo:
        d = self._d
        dev = self._check(d.cuDeviceGet(ordinal), "cuDeviceGet")

        def attr(a: int) -> int:
            return int(self._check(d.cuDeviceGetAttribute(d.CUdevice_attribute(a), dev), "cuDeviceGetAttribute"))

        name = self._check(d.cuDeviceGetName(256, dev), "cuDeviceGetName")
        return DeviceInfo(
            ordinal=ordinal,
            name=name.split(b"\0", 1)[0].decode(),
            compute_capability=(attr(DEV_ATTR_CC_MAJOR), attr(DEV_ATTR_CC_MINOR)),
            num_sms=attr(DEV_ATTR_SM_COUNT),
            smem_optin=attr(DEV_ATTR_MAX_SMEM_OPTIN),
            driver_version=int(self._check(d.cuDriverGetVersion(), "cuDriverGetVersion")),
        )

    # -- modules -------------------------------------------------------------------------------

    def load_library(self, cubin: bytes) -> Any:
        """Load a cubin as a context-independent library (``cuLibraryLoadData``)."""
        d = self._d
        return self._check(d.cuLibraryLoadData(cubin, None, None, 0, None, None, 0), "cuLibraryLoadData")

    def get_kernel(self, library: Any, name: str) -> Any:
        return self._check(self._d.cuLibraryGetKernel(library, name.encode()), f"cuLibraryGetKernel({name[:40]}...)")

    def kernel_attribute(self, kernel: Any, attr: int, device: int) -> int:
        d = self._d
        dev = self._check(d.cuDeviceGet(device), "cuDeviceGet")
        return int(
            self._check(d.cuKernelGetAttribute(d.CUfunction_attribute(attr), kernel, dev), "cuKernelGetAttribute")
        )

    def set_kernel_attribute(self, kernel: Any, attr: int, value: int, device: int) -> None:
        d = self._d
        dev = self._check(d.cuDeviceGet(device), "cuDeviceGet")
        self._check(d.cuKernelSetAttribute(d.CUfunction_attribute(attr), value, kernel, dev), "cuKernelSetAttribute")

    def kernel_handle(self, kernel: Any) -> int:
        return int(kernel)

    # -- memory --------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._d.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc"))

    def free(self, ptr: int) -> None:
        self._check(self._d.cuMemFree(ptr), "cuMemFree")

    def memset_d32(self, ptr: int, value: int, count: int, stream: int) -> None:
        self._check(self._d.cuMemsetD32Async(ptr, value, count, self.stream(stream)), "cuMemsetD32Async")

    # -- launches ------------------------------------------------------------------------------

    def launch_function(self) -> int:
        """Address of the driver's ``cuLaunchKernelEx`` (from cuda-python's ``cuGetProcAddress``):
        plans call it directly with the launch they recorded."""
        d = self._d
        res = d.cuGetProcAddress(b"cuLaunchKernelEx", 12000, d.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_DEFAULT)
        pfn = self._check(res[:2], "cuGetProcAddress(cuLaunchKernelEx)")
        if not pfn:
            raise CudaError("the CUDA driver does not provide cuLaunchKernelEx (CUDA 12.0 or newer needed)")
        return int(pfn)

    def stream(self, handle: int) -> Any:
        s = self._streams.get(handle)
        if s is None:
            s = self._d.CUstream(handle)
            with self._lock:
                self._streams[handle] = s
        return s
