"""The runtime's driver calls through cuda-python's ``cuda.bindings.driver``: the same methods as
:class:`fa4aot.runtime.driver.CudaDriver` (module loading, kernel lookup and attributes, pointer
queries, memory, error strings), for processes that already import cuda-python or prefer its
maintained bindings. Chosen with ``FA4AOT_DRIVER=cuda-bindings`` (see
:func:`fa4aot.runtime.driver.make_driver`); launches stay in the plans' C code either way.

benchmarks/driver_bindings.py measures both on a GPU: importing ``cuda.bindings.driver`` costs
tens of milliseconds (``cuda.pathfinder``), which is why it is not the default.
"""

from __future__ import annotations

from typing import Any

from fa4aot.runtime.driver import (
    ABI_VERSION,
    CUDA_ERROR_INVALID_VALUE,
    DEV_ATTR_CC_MAJOR,
    DEV_ATTR_CC_MINOR,
    DEV_ATTR_MAX_SMEM_OPTIN,
    DEV_ATTR_SM_COUNT,
    POINTER_ATTR_DEVICE_ORDINAL,
    POINTER_ATTR_RANGE_SIZE,
    POINTER_ATTR_RANGE_START,
    CudaError,
    DeviceInfo,
)

#: Bytes of the buffer cuDeviceGetName writes the device name into.
NAME_BYTES = 256


class BindingsDriver:
    """``cuda.bindings.driver`` behind :class:`~fa4aot.runtime.driver.CudaDriver`'s methods."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError as e:
            raise CudaError(f"FA4AOT_DRIVER=cuda-bindings needs cuda-python (pip install cuda-python): {e}") from None
        self._cu = cu
        try:
            result = cu.cuInit(0)
        except Exception as e:  # cuda-python raises its own errors when libcuda is absent
            raise CudaError(f"cuInit failed: the CUDA driver is not available ({type(e).__name__}: {e})") from None
        self._check(result, "cuInit")

    def _check(self, result: Any, what: str) -> Any:
        """The values of a cuda.bindings call (its first item is the CUresult)."""
        rc = int(result[0])
        if rc:
            raise CudaError(f"{what} failed: {self.error_name(rc)}", rc)
        rest = result[1:]
        return rest[0] if len(rest) == 1 else rest

    def error_name(self, rc: int) -> str:
        """``CUDA_ERROR_...: description`` for a CUresult."""
        cu = self._cu
        try:
            code = cu.CUresult(rc)
        except ValueError:
            return f"CUresult {rc}: "
        _, name = cu.cuGetErrorName(code)
        _, text = cu.cuGetErrorString(code)
        return f"{(name or b'CUresult %d' % rc).decode()}: {(text or b'').decode()}"

    # -- device and context ------------------------------------------------------------------

    def current_device(self) -> int:
        """Ordinal of the current context's device; device 0's primary context made current when
        no context is."""
        cu = self._cu
        ctx = self._check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if not int(ctx):
            dev = self._check(cu.cuDeviceGet(0), "cuDeviceGet")
            ctx = self._check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            self._check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return int(self._check(cu.cuCtxGetDevice(), "cuCtxGetDevice"))

    def ensure_context(self, ordinal: int) -> None:
        """Make device ``ordinal``'s primary context current on this thread if none is."""
        cu = self._cu
        if int(self._check(cu.cuCtxGetCurrent(), "cuCtxGetCurrent")):
            return
        dev = self._check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        self._check(
            cu.cuCtxSetCurrent(self._check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")),
            "cuCtxSetCurrent",
        )

    def device_info(self, ordinal: int) -> DeviceInfo:
        cu = self._cu
        dev = self._check(cu.cuDeviceGet(ordinal), "cuDeviceGet")

        def attr(a: int) -> int:
            return int(self._check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute(a), dev), "cuDeviceGetAttribute"))

        name = self._check(cu.cuDeviceGetName(NAME_BYTES, dev), "cuDeviceGetName")
        return DeviceInfo(
            ordinal=ordinal,
            name=bytes(name).split(b"\0", 1)[0].decode(errors="replace"),
            compute_capability=(attr(DEV_ATTR_CC_MAJOR), attr(DEV_ATTR_CC_MINOR)),
            num_sms=attr(DEV_ATTR_SM_COUNT),
            smem_optin=attr(DEV_ATTR_MAX_SMEM_OPTIN),
            driver_version=int(self._check(cu.cuDriverGetVersion(), "cuDriverGetVersion")),
        )

    def pointer_device(self, ptr: int) -> int | None:
        """Device ordinal of the allocation holding ``ptr`` (None for memory the driver does not know)."""
        cu = self._cu
        result = cu.cuPointerGetAttribute(cu.CUpointer_attribute(POINTER_ATTR_DEVICE_ORDINAL), ptr)
        if int(result[0]) == CUDA_ERROR_INVALID_VALUE:
            return None
        return int(self._check(result, "cuPointerGetAttribute"))

    def pointer_range(self, ptr: int) -> tuple[int, int, int] | None:
        """(device ordinal, start, size) of the allocation holding ``ptr`` (None: not device memory)."""
        dev = self.pointer_device(ptr)
        if dev is None:
            return None
        cu = self._cu
        start = self._check(
            cu.cuPointerGetAttribute(cu.CUpointer_attribute(POINTER_ATTR_RANGE_START), ptr), "cuPointerGetAttribute"
        )
        size = self._check(
            cu.cuPointerGetAttribute(cu.CUpointer_attribute(POINTER_ATTR_RANGE_SIZE), ptr), "cuPointerGetAttribute"
        )
        return dev, int(start), int(size)

    def device_count(self) -> int:
        """How many CUDA devices this process sees (``cuDeviceGetCount``)."""
        return int(self._check(self._cu.cuDeviceGetCount(), "cuDeviceGetCount"))

    # -- modules -------------------------------------------------------------------------------

    def load_library(self, cubin: bytes) -> int:
        """Load a cubin as a context-independent library (``cuLibraryLoadData``)."""
        lib = self._check(self._cu.cuLibraryLoadData(cubin, None, None, 0, None, None, 0), "cuLibraryLoadData")
        return int(lib)

    def get_kernel(self, library: int, name: str) -> int:
        cu = self._cu
        k = self._check(
            cu.cuLibraryGetKernel(cu.CUlibrary(library), name.encode()), f"cuLibraryGetKernel({name[:40]}...)"
        )
        return int(k)

    def kernel_attribute(self, kernel: int, attr: int, device: int) -> int:
        cu = self._cu
        got = cu.cuKernelGetAttribute(cu.CUfunction_attribute(attr), cu.CUkernel(kernel), device)
        return int(self._check(got, "cuKernelGetAttribute"))

    def set_kernel_attribute(self, kernel: int, attr: int, value: int, device: int) -> None:
        cu = self._cu
        self._check(
            cu.cuKernelSetAttribute(cu.CUfunction_attribute(attr), value, cu.CUkernel(kernel), device),
            "cuKernelSetAttribute",
        )

    # -- memory --------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._cu.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc"))

    def free(self, ptr: int) -> None:
        self._check(self._cu.cuMemFree(ptr), "cuMemFree")

    def memset_d32(self, ptr: int, value: int, count: int, stream: int) -> None:
        self._check(self._cu.cuMemsetD32Async(ptr, value, count, stream), "cuMemsetD32Async")

    def memset_d2d32(self, ptr: int, pitch: int, value: int, width: int, height: int, stream: int) -> None:
        """``height`` rows of ``width`` 32-bit words, ``pitch`` bytes apart, set to ``value``."""
        self._check(self._cu.cuMemsetD2D32Async(ptr, pitch, value, width, height, stream), "cuMemsetD2D32Async")

    def synchronize(self, stream: int) -> None:
        """Wait for ``stream``'s queued work."""
        self._check(self._cu.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def read(self, ptr: int, nbytes: int, stream: int) -> bytes:
        """``nbytes`` at device address ``ptr`` once ``stream``'s work is done (synchronises)."""
        self.synchronize(stream)
        buf = bytearray(nbytes)
        self._check(self._cu.cuMemcpyDtoH(buf, ptr, nbytes), "cuMemcpyDtoH")
        return bytes(buf)

    # -- launches ------------------------------------------------------------------------------

    def launch_function(self) -> int:
        """Address of the driver's ``cuLaunchKernelEx`` (plans call it from C)."""
        return self._address(b"cuLaunchKernelEx")

    def capture_status_function(self) -> int:
        """Address of the driver's ``cuStreamIsCapturing`` (the fast path calls it from C)."""
        return self._address(b"cuStreamIsCapturing")

    def _address(self, name: bytes) -> int:
        pfn, _status = self._check(self._cu.cuGetProcAddress(name, ABI_VERSION, 0), "cuGetProcAddress")
        return int(pfn)
