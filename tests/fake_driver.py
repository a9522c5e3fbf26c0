"""A stand-in for fa4aot.runtime.driver.CudaDriver: same methods, no GPU. Records what would
have been launched so CPU tests can check the whole launch path."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from fa4aot.runtime.driver import DeviceInfo


@dataclass
class FakeLaunch:
    kernel: int
    grid: tuple
    block: tuple
    smem: int
    stream: int
    attrs: tuple
    params: list[bytes]


@dataclass
class FakeDriver:
    cc: tuple = (9, 0)
    num_sms: int = 132
    smem_optin: int = 232448
    driver_version: int = 13000
    device: int = 0
    launches: list = field(default_factory=list)
    libraries: list = field(default_factory=list)
    set_attributes: list = field(default_factory=list)
    memsets: list = field(default_factory=list)
    syncs: list = field(default_factory=list)
    #: device address -> bytes, what ``read`` returns
    memory: dict = field(default_factory=dict)
    allocs: dict = field(default_factory=dict)
    #: per kernel handle, parameter sizes (to read the bytes a launch passes)
    param_sizes: dict = field(default_factory=dict)
    #: CUresult every launch returns (set non-zero to simulate a driver error)
    launch_result: int = 0
    #: address -> device ordinal (or None) reported by pointer_device
    pointer_devices: dict = field(default_factory=dict)
    #: kernel handle -> kernel (symbol) name
    kernel_names: dict = field(default_factory=dict)
    #: devices the process sees (one: the runtime remembers pointer ranges)
    num_devices: int = 1
    #: calls of pointer_device / pointer_range (what a range cache saves)
    pointer_queries: int = 0
    #: streams cuStreamIsCapturing reports as being captured into a CUDA graph
    capturing: set = field(default_factory=set)
    #: cuStreamIsCapturing's CUresult (non-zero: the driver cannot tell)
    capture_result: int = 0
    _next: int = 0x7E00_0000_0000

    def ensure_context(self, ordinal: int) -> None:
        self.contexts_bound = getattr(self, "contexts_bound", 0) + 1

    def current_device(self) -> int:
        return self.device

    def device_info(self, ordinal: int) -> DeviceInfo:
        return DeviceInfo(ordinal, "Fake GPU", self.cc, self.num_sms, self.smem_optin, self.driver_version)

    def load_library(self, cubin: bytes):
        self.libraries.append(cubin)
        return len(self.libraries)

    def get_kernel(self, library, name: str):
        handle = 0x1000 * library + len(name)
        self.kernel_names[handle] = name
        # the parameter sizes the cubin declares, so launches record the bytes they pass
        from fa4aot.core import cubin

        kernel = cubin.parse(self.libraries[library - 1]).kernels.get(name)
        if kernel is not None and handle not in self.param_sizes:
            self.param_sizes[handle] = tuple(p.size for p in sorted(kernel.params, key=lambda p: p.ordinal))
        return handle

    def kernel_attribute(self, kernel, attr: int, device: int) -> int:
        return 0

    def set_kernel_attribute(self, kernel, attr: int, value: int, device: int) -> None:
        self.set_attributes.append((kernel, attr, value, device))

    def pointer_device(self, ptr: int):
        """Device of an address: ``pointer_devices`` overrides (None: not device memory)."""
        self.pointer_queries += 1
        return self.pointer_devices.get(ptr, self.device)

    def pointer_range(self, ptr: int):
        """(device, start, size): an address lies in a 64 KiB range of its own (an override in
        ``pointer_devices`` makes a one-byte range)."""
        dev = self.pointer_device(ptr)
        if dev is None:
            return None
        return (dev, ptr, 1) if ptr in self.pointer_devices else (dev, ptr & ~0xFFFF, 0x10000)

    def device_count(self) -> int:
        return self.num_devices

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += (nbytes + 0xFFFF) // 0x10000 * 0x10000
        self.allocs[ptr] = nbytes
        return ptr

    def free(self, ptr: int) -> None:
        del self.allocs[ptr]

    def memset_d32(self, ptr: int, value: int, count: int, stream: int) -> None:
        self.memsets.append((ptr, value, count, stream))

    def memset_d2d32(self, ptr: int, pitch: int, value: int, width: int, height: int, stream: int) -> None:
        self.memsets.append((ptr, pitch, value, width, height, stream))

    def synchronize(self, stream: int) -> None:
        self.syncs.append(stream)

    def read(self, ptr: int, nbytes: int, stream: int) -> bytes:
        """Bytes from ``memory`` (address -> bytes), zeros elsewhere."""
        return self.memory.get(ptr, bytes(nbytes))[:nbytes]

    def launch_function(self) -> int:
        """A C-callable stand-in for cuLaunchKernelEx that records each launch (a ctypes callback,
        so the plan's real C launch path runs)."""
        if getattr(self, "_cb", None) is None:
            self._cb = _LAUNCH_T(self._record)
        return ctypes.cast(self._cb, ctypes.c_void_p).value

    def capture_status_function(self) -> int:
        """A C-callable stand-in for cuStreamIsCapturing reporting :attr:`capturing`."""
        if getattr(self, "_capture_cb", None) is None:
            self._capture_cb = _CAPTURE_T(self._capture_status)
        return ctypes.cast(self._capture_cb, ctypes.c_void_p).value

    def _capture_status(self, stream, status):
        status[0] = 1 if (stream or 0) in self.capturing else 0  # CU_STREAM_CAPTURE_STATUS_ACTIVE / NONE
        return self.capture_result

    def _record(self, cfg_ptr, f, params, extra):
        cfg = _Config.from_address(cfg_ptr)
        attrs = tuple(
            (cfg.attrs[i].id, tuple(cfg.attrs[i].val[:3]) if cfg.attrs[i].id == 4 else (cfg.attrs[i].val[0],))
            for i in range(cfg.num_attrs)
        )
        sizes = self.param_sizes.get(int(f or 0), ())
        blobs = [ctypes.string_at(params[i], size) for i, size in enumerate(sizes)]
        self.launches.append(
            FakeLaunch(int(f or 0), tuple(cfg.grid), tuple(cfg.block), cfg.smem, cfg.stream or 0, attrs, blobs)
        )
        return self.launch_result


class _Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("val", ctypes.c_uint32 * 16)]


class _Config(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("smem", ctypes.c_uint32),
        ("stream", ctypes.c_uint64),
        ("attrs", ctypes.POINTER(_Attr)),
        ("num_attrs", ctypes.c_uint32),
    ]


_CAPTURE_T = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int))
_LAUNCH_T = ctypes.CFUNCTYPE(
    ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p
)
