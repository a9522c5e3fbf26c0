"""Open a cache for the current GPU, load verified variants lazily, and launch them.

:class:`Runtime` is what production code holds: it picks the cache target that matches the
device (arch, SM count), refuses mismatches (or, when told to, warns), and for each variant on
first use verifies the cubin's and the plan's sha256, loads the cubin with ``cuLibraryLoadData``,
loads the plan (answering its attribute queries with the real device's values) and applies the
kernel attributes the plan's module load asked for. Everything after that is per-call work only:
validate (callers do), run the plan, launch.

Thread safety: variant loading is serialised by a lock; plans keep per-thread state (argument
buffer, recorded launches), so launches may come from several threads.
"""

from __future__ import annotations

import platform
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.core.errors import DeviceMismatchError, VariantNotFoundError
from fa4aot.core.index import Cache, Entry, default_cache_dir
from fa4aot.core.variant import Target, Variant
from fa4aot.plan.library import (
    DEV_ATTR_MAX_SMEM_OPTIN,
    FUNC_ATTR_SHARED_SIZE_BYTES,
    Plan,
    open_plan,
)

#: CUDA driver major version each cubin toolkit major needs.
_DRIVER_FOR_TOOLKIT = {12: 12000, 13: 13000}


@dataclass
class LoadedVariant:
    """A variant ready to launch on this device."""

    entry: Entry
    plan: Plan
    kernels: list[Any]
    handles: list[int]

    @property
    def variant(self) -> Variant:
        return self.entry.variant


class Runtime:
    """A read-only fa4aot cache bound to the current CUDA device.

    ``allow_sm_mismatch``: use a cache built for another SM count of the same arch (warns; FA4's
    persistent grids then size for the wrong SKU - correct but not tuned). ``driver`` is for tests.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        allow_sm_mismatch: bool = False,
        driver: Any = None,
    ):
        if driver is None:
            from fa4aot.runtime.driver import CudaDriver

            driver = CudaDriver()
        self.driver = driver
        self.cache = Cache(cache_dir or default_cache_dir(), readonly=True)
        self.device = driver.current_device()
        self.info = driver.device_info(self.device)
        entries = self.cache.entries()
        self.target = self._pick_target(entries, allow_sm_mismatch)
        self._by_id: dict[str, Entry] = {}
        for e in entries:
            if e.target.identity() == self.target.identity():
                # a later build (e.g. a newer toolchain) of the same variant wins
                prev = self._by_id.get(e.variant_id)
                if prev is None or e.meta.get("created", 0) >= prev.meta.get("created", 0):
                    self._by_id[e.variant_id] = e
        self._launch_fn = driver.launch_function()
        self._loaded: dict[str, LoadedVariant] = {}
        #: dispatch decisions of the API functions, by their argument signature
        self.memo: dict[tuple, LoadedVariant] = {}
        self._lock = threading.Lock()
        self._attrs_applied: set[tuple[str, int]] = set()

    # -- device checks ---------------------------------------------------------------------

    def _pick_target(self, entries: list[Entry], allow_sm_mismatch: bool) -> Target:
        info = self.info
        cc = info.compute_capability
        targets = {e.target.identity()["arch"] + f"/{e.target.num_sms}": e.target for e in entries}
        if not targets:
            raise VariantNotFoundError(f"the cache {self.cache.root} is empty; build it with `fa4aot build MANIFEST`")
        same_arch = [t for t in targets.values() if t.compute_capability == cc]
        have = ", ".join(f"{t.name} ({t.arch}, {t.num_sms} SMs)" for t in targets.values())
        if not same_arch:
            raise DeviceMismatchError(
                f"the cache {self.cache.root} holds kernels for {have}; this device is {info.name} "
                f"(sm_{cc[0]}{cc[1]}, {info.num_sms} SMs), which cannot run them. Build a manifest whose "
                f"target.arch is sm_{cc[0]}{cc[1]}a."
            )
        exact = [t for t in same_arch if t.num_sms == info.num_sms]
        if exact:
            target = exact[0]
        elif allow_sm_mismatch:
            target = same_arch[0]
            warnings.warn(
                f"fa4aot: using kernels built for {target.num_sms} SMs ({target.name}) on {info.name} with "
                f"{info.num_sms} SMs: FA4's persistent grids are sized for the other SKU.",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            raise DeviceMismatchError(
                f"the cache holds {have}; this device ({info.name}) has {info.num_sms} SMs. FA4 sizes "
                f"persistent grids by SM count at build time, so fa4aot refuses to launch a grid built "
                f"for another SKU. Build for target.num_sms: {info.num_sms}, or pass allow_sm_mismatch=True."
            )
        return target

    def _check_entry(self, entry: Entry) -> None:
        host = entry.meta.get("host_arch")
        if host != platform.machine():
            raise DeviceMismatchError(
                f"{entry.variant.label()}: its launch plan was built for a {host} host; this is "
                f"{platform.machine()}. Build the cache on (or cross-compile for) this CPU arch."
            )
        toolkit = entry.meta.get("cubin_toolkit") or "13.0"
        need = _DRIVER_FOR_TOOLKIT.get(int(toolkit.split(".")[0]), 13000)
        if self.info.driver_version < need:
            raise DeviceMismatchError(
                f"{entry.variant.label()}: the cubin was built by CUDA {toolkit} and needs a driver for "
                f"CUDA {need // 1000}.0 or newer; this driver supports CUDA "
                f"{self.info.driver_version // 1000}.{self.info.driver_version % 1000 // 10}."
            )

    # -- lookup and load -------------------------------------------------------------------

    def variant_for(self, family: str, **fields: Any) -> Variant:
        """The variant of ``family`` with ``fields`` for this runtime's target."""
        return Variant.make(family, self.target.arch, self.target.num_sms, **fields)

    def has(self, variant: Variant) -> bool:
        return variant.variant_id in self._by_id

    def load(self, variant: Variant) -> LoadedVariant:
        """The loaded variant (loading and verifying it on first use)."""
        lv = self._loaded.get(variant.variant_id)
        if lv is not None:
            return lv
        with self._lock:
            lv = self._loaded.get(variant.variant_id)
            if lv is None:
                lv = self._load(variant)
                self._loaded[variant.variant_id] = lv
        return lv

    def _load(self, variant: Variant) -> LoadedVariant:
        from fa4aot.core.families import describe_missing

        entry = self._by_id.get(variant.variant_id)
        if entry is None:
            raise VariantNotFoundError(
                f"the cache {self.cache.root} has no {variant.label()}; add it to the manifest and "
                f"rebuild: {describe_missing(variant)}"
            )
        self._check_entry(entry)
        cubin = self.cache.read_blob(entry, "cubin")  # sha256 checked: a corrupt blob never loads
        plan_bytes = self.cache.read_blob(entry, "plan")
        drv = self.driver
        library = drv.load_library(cubin)
        kernels = [drv.get_kernel(library, k["symbol"]) for k in entry.meta["kernels"]]
        handles = [drv.kernel_handle(k) for k in kernels]
        plan = open_plan(plan_bytes, entry.meta)
        static_smem = drv.kernel_attribute(kernels[0], FUNC_ATTR_SHARED_SIZE_BYTES, self.device)
        load = plan.load(
            handles,
            {DEV_ATTR_MAX_SMEM_OPTIN: self.info.smem_optin},
            {FUNC_ATTR_SHARED_SIZE_BYTES: static_smem},
            device=self.device,
        )
        lv = LoadedVariant(entry, plan, kernels, handles)
        by_name = dict(zip((k["symbol"] for k in entry.meta["kernels"]), kernels))
        for name, attr, value in load.set_attributes:
            drv.set_kernel_attribute(by_name[name], attr, value, self.device)
        return lv

    # -- launch ----------------------------------------------------------------------------

    def launch(self, lv: LoadedVariant, flat_args: list[Any], stream: int) -> int:
        """Run ``lv``'s plan on already validated, flattened arguments (the stream among them) and
        launch what it records with ``cuLaunchKernelEx``; returns the number of launches."""
        return lv.plan.call_launch(flat_args, self._launch_fn)


_DEFAULT: Runtime | None = None
_DEFAULT_LOCK = threading.Lock()


def default_runtime() -> Runtime:
    """The process-wide runtime over ``$FA4AOT_CACHE`` (or ./cache), created on first use."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Runtime()
    return _DEFAULT


def set_default_runtime(runtime: Runtime | None) -> None:
    """Use ``runtime`` for calls that do not pass one (None: recreate on next use)."""
    global _DEFAULT
    _DEFAULT = runtime


def open_runtime(cache_dir: str | Path | None = None, **kwargs: Mapping[str, Any]) -> Runtime:
    """Open ``cache_dir`` for the current device and make it the default runtime."""
    rt = Runtime(cache_dir, **kwargs)  # type: ignore[arg-type]
    set_default_runtime(rt)
    return rt
