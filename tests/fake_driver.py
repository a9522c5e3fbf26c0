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
    allocs: dict = field(default_factory=dict)
    #: per kernel handle, parameter sizes (to read the bytes a launch passes)
    param_sizes: dict = field(default_factory=dict)
    _next: int = 0x7E00_0000_0000

    def current_device(self) -> int:
        return self.device

    def device_info(self, ordinal: int) -> DeviceInfo:
        return DeviceInfo(ordinal, "Fake GPU", self.cc, self.num_sms, self.smem_optin, self.driver_version)

    def load_library(self, cubin: bytes):
        self.libraries.append(cubin)
        return len(self.libraries)

    def get_kernel(self, library, name: str):
        return 0x1000 * library + len(name)

    def kernel_attribute(self, kernel, attr: int, device: int) -> int:
        return 0

    def set_kernel_attribute(self, kernel, attr: int, value: int, device: int) -> None:
        self.set_attributes.append((kernel, attr, value, device))

    def kernel_handle(self, kernel) -> int:
        return int(kernel)

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += (nbytes + 0xFFFF) // 0x10000 * 0x10000
        self.allocs[ptr] = nbytes
        return ptr

    def free(self, ptr: int) -> None:
        del self.allocs[ptr]

    def memset_d32(self, ptr: int, value: int, count: int, stream: int) -> None:
        self.memsets.append((ptr, value, count, stream))

    def pointer_device(self, ptr: int):
        return self.device

    def make_launcher(self, kernel):
        drv = self

        class _L:
            def launch(self, grid, block, smem, stream, attrs, params_ptr):
                n = len(drv.param_sizes.get(int(kernel), ()))
                ptrs = (ctypes.c_void_p * max(n, 1)).from_address(params_ptr)
                params = [ctypes.string_at(ptrs[i], size) for i, size in enumerate(drv.param_sizes.get(int(kernel), ()))]
                drv.launches.append(FakeLaunch(int(kernel), grid, block, smem, stream, attrs, params))

        return _L()
