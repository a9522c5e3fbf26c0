"""The CUDA driver calls fa4aot makes, behind one small interface.

:class:`CudaDriver` calls ``libcuda`` through ctypes, resolving each entry point it uses with
``cuGetProcAddress`` - the mechanism ``cuda.bindings`` uses - on first use. It does not import
``cuda.bindings.driver``: that import alone (about 75-120 ms on the CI CPU, most of it
``cuda.pathfinder``) would be most of the runtime's start-up budget, and fa4aot calls a dozen entry
points. Launches do not go through Python at all: plans call ``cuLaunchKernelEx`` from C with the
address :meth:`CudaDriver.launch_function` returns. Tests substitute a fake with the same methods.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, NamedTuple

from fa4aot.core.errors import Fa4aotError

#: CUdevice_attribute values (cuda.h)
DEV_ATTR_SM_COUNT = 16
DEV_ATTR_CC_MAJOR = 75
DEV_ATTR_CC_MINOR = 76
DEV_ATTR_MAX_SMEM_OPTIN = 97
#: CUpointer_attribute CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, _RANGE_START_ADDR, _RANGE_SIZE (cuda.h)
POINTER_ATTR_DEVICE_ORDINAL = 9
POINTER_ATTR_RANGE_START = 11
POINTER_ATTR_RANGE_SIZE = 12
#: The driver ABI fa4aot asks cuGetProcAddress for: CUDA 12.0, the first with cuLibrary* and
#: cuLaunchKernelEx (so every entry point below exists in that version).
ABI_VERSION = 12000
#: CUresult CUDA_ERROR_INVALID_VALUE, returned by cuPointerGetAttribute for host memory.
CUDA_ERROR_INVALID_VALUE = 1

_c_int, _c_uint, _c_size, _p = ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p
_c_u64 = ctypes.c_uint64

#: entry point -> argument types (all return CUresult, an int)
_PROTOS: dict[str, tuple[Any, ...]] = {
    "cuInit": (_c_uint,),
    "cuDriverGetVersion": (ctypes.POINTER(_c_int),),
    "cuGetErrorName": (_c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuGetErrorString": (_c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuCtxGetCurrent": (ctypes.POINTER(_p),),
    "cuCtxSetCurrent": (_p,),
    "cuCtxGetDevice": (ctypes.POINTER(_c_int),),
    "cuDeviceGet": (ctypes.POINTER(_c_int), _c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(_p), _c_int),
    "cuDeviceGetAttribute": (ctypes.POINTER(_c_int), _c_int, _c_int),
    "cuDeviceGetName": (ctypes.c_char_p, _c_int, _c_int),
    "cuLibraryLoadData": (ctypes.POINTER(_p), _p, _p, _p, _c_uint, _p, _p, _c_uint),
    "cuLibraryGetKernel": (ctypes.POINTER(_p), _p, ctypes.c_char_p),
    "cuKernelGetAttribute": (ctypes.POINTER(_c_int), _c_int, _p, _c_int),
    "cuKernelSetAttribute": (_c_int, _c_int, _p, _c_int),
    "cuMemAlloc": (ctypes.POINTER(_c_u64), _c_size),
    "cuMemFree": (_c_u64,),
    "cuMemsetD32Async": (_c_u64, _c_uint, _c_size, _p),
    "cuMemsetD2D32Async": (_c_u64, _c_size, _c_uint, _c_size, _c_size, _p),
    "cuMemcpyDtoH": (_p, _c_u64, _c_size),
    "cuStreamSynchronize": (_p,),
    "cuPointerGetAttribute": (_p, _c_int, _c_u64),
    "cuDeviceGetCount": (ctypes.POINTER(_c_int),),
}


class CudaError(Fa4aotError):
    """A CUDA driver call failed."""

    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.code = code


class DeviceInfo(NamedTuple):
    ordinal: int
    name: str
    compute_capability: tuple[int, int]
    num_sms: int
    smem_optin: int
    driver_version: int  # e.g. 13000 for CUDA 13.0


class CudaDriver:
    """``libcuda`` behind the methods fa4aot needs. Thread-safe (entry points resolve under a lock)."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(library)
            gpa = self._lib.cuGetProcAddress_v2
        except (OSError, AttributeError) as e:
            raise CudaError(
                f"the CUDA driver is not available ({library}: {e}); fa4aot needs an NVIDIA driver"
            ) from None
        gpa.restype = _c_int
        gpa.argtypes = [ctypes.c_char_p, ctypes.POINTER(_p), _c_int, _c_u64, ctypes.POINTER(_c_int)]
        self._gpa = gpa
        self._fns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._check(self._fn("cuInit")(0), "cuInit")

    def _address(self, name: str) -> int:
        pfn, status = _p(), _c_int()
        rc = self._gpa(name.encode(), ctypes.byref(pfn), ABI_VERSION, 0, ctypes.byref(status))
        if rc or not pfn.value:
            raise CudaError(f"the CUDA driver does not provide {name} (CUDA 12.0 or newer needed)", rc)
        return pfn.value

    def _fn(self, name: str) -> Any:
        fn = self._fns.get(name)
        if fn is None:
            with self._lock:
                fn = self._fns.get(name)
                if fn is None:
                    fn = ctypes.CFUNCTYPE(_c_int, *_PROTOS[name])(self._address(name))
                    self._fns[name] = fn
        return fn

    def _check(self, rc: int, what: str) -> None:
        if rc:
            raise CudaError(f"{what} failed: {self.error_name(rc)}", rc)

    def error_name(self, rc: int) -> str:
        """``CUDA_ERROR_...: description`` for a CUresult."""
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        try:
            self._fn("cuGetErrorName")(rc, ctypes.byref(name))
            self._fn("cuGetErrorString")(rc, ctypes.byref(text))
        except CudaError:
            pass
        return f"{(name.value or b'CUresult %d' % rc).decode()}: {(text.value or b'').decode()}"

    # -- device and context ------------------------------------------------------------------

    def current_device(self) -> int:
        """Ordinal of the current context's device; makes device 0's primary context current
        when no context is (the case for raw-pointer users)."""
        ctx = _p()
        self._check(self._fn("cuCtxGetCurrent")(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = _c_int()
            self._check(self._fn("cuDeviceGet")(ctypes.byref(dev), 0), "cuDeviceGet")
            self._check(self._fn("cuDevicePrimaryCtxRetain")(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
            self._check(self._fn("cuCtxSetCurrent")(ctx), "cuCtxSetCurrent")
        dev = _c_int()
        self._check(self._fn("cuCtxGetDevice")(ctypes.byref(dev)), "cuCtxGetDevice")
        return dev.value

    def ensure_context(self, ordinal: int) -> None:
        """Make device ``ordinal``'s primary context current on this thread if none is (a thread
        of the caller's framework, e.g. PyTorch's autograd engine, may have none for the driver)."""
        ctx = _p()
        self._check(self._fn("cuCtxGetCurrent")(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            return
        dev = _c_int()
        self._check(self._fn("cuDeviceGet")(ctypes.byref(dev), ordinal), "cuDeviceGet")
        self._check(self._fn("cuDevicePrimaryCtxRetain")(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
        self._check(self._fn("cuCtxSetCurrent")(ctx), "cuCtxSetCurrent")

    def device_info(self, ordinal: int) -> DeviceInfo:
        dev = _c_int()
        self._check(self._fn("cuDeviceGet")(ctypes.byref(dev), ordinal), "cuDeviceGet")
        get = self._fn("cuDeviceGetAttribute")

        def attr(a: int) -> int:
            v = _c_int()
            self._check(get(ctypes.byref(v), a, dev.value), "cuDeviceGetAttribute")
            return v.value

        name = ctypes.create_string_buffer(256)
        self._check(self._fn("cuDeviceGetName")(name, 256, dev.value), "cuDeviceGetName")
        version = _c_int()
        self._check(self._fn("cuDriverGetVersion")(ctypes.byref(version)), "cuDriverGetVersion")
        return DeviceInfo(
            ordinal=ordinal,
            name=name.value.decode(errors="replace"),
            compute_capability=(attr(DEV_ATTR_CC_MAJOR), attr(DEV_ATTR_CC_MINOR)),
            num_sms=attr(DEV_ATTR_SM_COUNT),
            smem_optin=attr(DEV_ATTR_MAX_SMEM_OPTIN),
            driver_version=version.value,
        )

    def pointer_device(self, ptr: int) -> int | None:
        """Device ordinal of the allocation holding ``ptr`` (None for memory the driver does not
        know, e.g. host memory)."""
        ordinal = _c_int()
        rc = self._fn("cuPointerGetAttribute")(ctypes.byref(ordinal), POINTER_ATTR_DEVICE_ORDINAL, ptr)
        if rc == CUDA_ERROR_INVALID_VALUE:
            return None
        self._check(rc, "cuPointerGetAttribute")
        return ordinal.value

    def pointer_range(self, ptr: int) -> tuple[int, int, int] | None:
        """(device ordinal, start, size) of the allocation holding ``ptr``; None for memory the
        driver does not know."""
        dev = self.pointer_device(ptr)
        if dev is None:
            return None
        start, size = _c_u64(), _c_u64()
        fn = self._fn("cuPointerGetAttribute")
        self._check(fn(ctypes.byref(start), POINTER_ATTR_RANGE_START, ptr), "cuPointerGetAttribute")
        self._check(fn(ctypes.byref(size), POINTER_ATTR_RANGE_SIZE, ptr), "cuPointerGetAttribute")
        return dev, start.value, size.value

    def device_count(self) -> int:
        """How many CUDA devices this process sees (``cuDeviceGetCount``)."""
        n = _c_int()
        self._check(self._fn("cuDeviceGetCount")(ctypes.byref(n)), "cuDeviceGetCount")
        return n.value

    # -- modules -------------------------------------------------------------------------------

    def load_library(self, cubin: bytes) -> int:
        """Load a cubin as a context-independent library (``cuLibraryLoadData``)."""
        lib = _p()
        rc = self._fn("cuLibraryLoadData")(ctypes.byref(lib), cubin, None, None, 0, None, None, 0)
        self._check(rc, "cuLibraryLoadData")
        return lib.value or 0

    def get_kernel(self, library: int, name: str) -> int:
        k = _p()
        self._check(
            self._fn("cuLibraryGetKernel")(ctypes.byref(k), library, name.encode()),
            f"cuLibraryGetKernel({name[:40]}...)",
        )
        return k.value or 0

    def kernel_attribute(self, kernel: int, attr: int, device: int) -> int:
        v = _c_int()
        self._check(self._fn("cuKernelGetAttribute")(ctypes.byref(v), attr, kernel, device), "cuKernelGetAttribute")
        return v.value

    def set_kernel_attribute(self, kernel: int, attr: int, value: int, device: int) -> None:
        self._check(self._fn("cuKernelSetAttribute")(attr, value, kernel, device), "cuKernelSetAttribute")

    # -- memory --------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        ptr = _c_u64()
        self._check(self._fn("cuMemAlloc")(ctypes.byref(ptr), max(nbytes, 1)), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self._fn("cuMemFree")(ptr), "cuMemFree")

    def memset_d32(self, ptr: int, value: int, count: int, stream: int) -> None:
        self._check(self._fn("cuMemsetD32Async")(ptr, value, count, stream or None), "cuMemsetD32Async")

    def memset_d2d32(self, ptr: int, pitch: int, value: int, width: int, height: int, stream: int) -> None:
        """``height`` rows of ``width`` 32-bit words, ``pitch`` bytes apart, set to ``value``."""
        fn = self._fn("cuMemsetD2D32Async")
        self._check(fn(ptr, pitch, value, width, height, stream or None), "cuMemsetD2D32Async")

    def synchronize(self, stream: int) -> None:
        """Wait for ``stream``'s queued work."""
        self._check(self._fn("cuStreamSynchronize")(stream or None), "cuStreamSynchronize")

    def read(self, ptr: int, nbytes: int, stream: int) -> bytes:
        """``nbytes`` at device address ``ptr`` once ``stream``'s work is done (synchronises)."""
        self._check(self._fn("cuStreamSynchronize")(stream or None), "cuStreamSynchronize")
        buf = ctypes.create_string_buffer(nbytes)
        self._check(self._fn("cuMemcpyDtoH")(buf, ptr, nbytes), "cuMemcpyDtoH")
        return buf.raw

    # -- launches ------------------------------------------------------------------------------

    def launch_function(self) -> int:
        """Address of the driver's ``cuLaunchKernelEx``: plans call it directly with the launch
        they recorded."""
        return self._address("cuLaunchKernelEx")

    def capture_status_function(self) -> int:
        """Address of the driver's ``cuStreamIsCapturing``: the fast path asks it from C whether a
        launch stream is being captured into a CUDA graph (fa4aot.plan._hop.stream_buffer)."""
        return self._address("cuStreamIsCapturing")
