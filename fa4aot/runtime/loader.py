"""Open a cache for the current GPU, load verified variants lazily (or ahead of time), launch them.

:class:`Runtime` is what production code holds. Opening it reads one small file: the packed
index of the cache target that matches the device (arch, SM count, host CPU arch), hash-checked.
It refuses mismatches (or, when told to, warns). For each variant on first use (or in
:meth:`Runtime.preload`) it reads the variant's launch plan, checks its sha256 (the cubin is a
hash-checked slice of it), loads the cubin with ``cuLibraryLoadData``, loads the plan (answering its
attribute queries with the real device's values) and applies the kernel attributes the plan's
module load asked for. After that a call is: validate, dispatch, one foreign call.

Every cache the runtime keeps is bounded: loaded variants by the cache's own entry count,
dispatch rules, combine picks and automatic scheduler metadata by fixed sizes
(:class:`fa4aot.core.bounded.BoundedDict`).

Thread safety: loading is serialised per variant; plans keep per-thread state (argument buffer,
recorded launches), so launches may come from several threads.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fa4aot.core import env, logs
from fa4aot.core.backward import bwd_knobs_from_env
from fa4aot.core.errors import (
    ArgumentError,
    CacheError,
    CorruptArtifactError,
    DeviceMismatchError,
    Fa4aotError,
    VariantNotFoundError,
)
from fa4aot.core.fa4_interface import Knobs, knobs_from_env
from fa4aot.core.index import (
    DEFAULT_CACHE_ENV,
    PACKED_DIR,
    Cache,
    Entry,
    PackedKey,
    cache_search_path,
    splice_plan,
)
from fa4aot.core.signing import check_cache_files, runtime_trusted_keys
from fa4aot.core.targets import arch_of_compute_capability
from fa4aot.core.tuning import TuningTable, table_filename
from fa4aot.core.variant import Target, Variant, cache_key
from fa4aot.plan.abi import DEV_ATTR_MAX_SMEM_OPTIN, FUNC_ATTR_SHARED_SIZE_BYTES, SHIM_ABI
from fa4aot.plan.library import Plan, open_plan
from fa4aot.runtime.tuned import TUNING_DIR, TunedChoices, open_tuning

if TYPE_CHECKING:
    from fa4aot.runtime.driver import DeviceInfo

#: CUDA driver version each cubin toolkit major needs.
_DRIVER_FOR_TOOLKIT = {12: 12000, 13: 13000}
#: Per-stream buffers a runtime keeps (workspaces, metadata pools): each holds device memory,
#: freed on eviction (the APIs that keep them declare them: :func:`api_cache`).
MAX_PER_STREAM = 16
#: Environment variables of the miss log, the record log and strict mode (see :class:`Runtime`).
MISS_LOG_ENV = env.MISS_LOG
RECORD_LOG_ENV = env.RECORD
REQUIRE_ENV = env.REQUIRE

_log = logs.get(__name__)
#: How the miss and record logs are opened: append-only, created if absent, never blocking (a
#: FIFO without a reader fails with ENXIO instead of hanging the call), never through a symlink.
LOG_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW

#: Argument order of the forward launchers (a superset of every forward plan's signature).
FORWARD_ORDER = (
    "q",
    "k",
    "v",
    "out",
    "lse",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "seqused_q",
    "seqused_k",
    "page_table",
    "num_splits_dynamic",
    "tile_count_semaphore",
    "num_nheads_in_l2",
    "softmax_scale",
    "window_size_left",
    "window_size_right",
    "learnable_sink",
    "max_seqlen_q",
    "tensormap_workspace",
    # FA4's scales= (fa4aot.runtime.scales.NAMES): FP8 descales, MXFP8 scale buffers
    "q_descale",
    "k_descale",
    "v_descale",
    "sf_q",
    "sf_k",
    "sf_v",
    "stream",
)


class VariantLog:
    """Appends one JSON line per distinct variant to a file: the miss log and the record log.
    One ``write`` per line on an ``O_APPEND`` descriptor, so processes sharing the file do not
    interleave lines; a failing write warns and never fails the call.

    The log never blocks or follows a link: it is opened non-blocking without following a final
    symlink, and anything but a regular file (a FIFO, a device, a link) stops the log with one
    warning - a call must not wait for a FIFO's reader or write where a link points."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        #: why logging stopped (None: logging)
        self.stopped: str | None = None

    def add(self, variant: Variant, **extra: Any) -> None:
        """Append ``variant`` (and ``extra``) once; later calls for it do nothing."""
        vid = variant.variant_id
        with self._lock:
            if vid in self._seen or self.stopped is not None:
                return
            self._seen.add(vid)
        line = json.dumps({"id": vid, "variant": variant.to_dict(), "time": time.time(), **extra}, sort_keys=True)
        try:
            fd = os.open(self.path, LOG_OPEN_FLAGS, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO without a reader
                self._stop("a symlink" if e.errno == errno.ELOOP else "a FIFO (or device) without a reader")
            else:
                warnings.warn(f"cannot append to {self.path}: {e.strerror or e}", stacklevel=3)
            return
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                self._stop("not a regular file")
                return
            os.write(fd, (line + "\n").encode())
        except OSError as e:
            warnings.warn(f"cannot append to {self.path}: {e.strerror or e}", stacklevel=3)
        finally:
            os.close(fd)

    def _stop(self, what: str) -> None:
        with self._lock:
            if self.stopped is not None:
                return
            self.stopped = what
        warnings.warn(f"fa4aot: {self.path} is {what}; not logging variants there", RuntimeWarning, stacklevel=4)


class LoadedVariant:
    """A variant ready to launch on this device: its entry, plan, kernel handles, its fields (a
    dict, made once) and, for forward variants, the generated launcher taking
    :data:`FORWARD_ORDER` (SM90 plans take no max_seqlen_q)."""

    __slots__ = ("entry", "plan", "kernels", "variant", "fields", "launch", "load_seconds", "tuned")

    def __init__(self, entry: Entry, plan: Plan, kernels: list[int]):
        self.entry = entry
        self.plan = plan
        self.kernels = kernels
        self.variant: Variant = entry.variant
        self.fields: dict[str, Any] = self.variant.fields
        #: seconds each phase of loading took (benchmarks read it)
        self.load_seconds: dict[str, float] = {}
        #: bucket -> variant id from the device's tuning table, when it has entries for this variant
        self.tuned: dict[tuple, str] | None = None
        self.launch: Callable[..., None] | None = (
            # the forward checks every tensor's rank before launching
            plan.launcher(FORWARD_ORDER, optional=("max_seqlen_q", "tensormap_workspace"), ranks_checked=True)
            if self.variant.family.startswith("fwd_")
            else None
        )


class Runtime:
    """A read-only fa4aot cache bound to the current CUDA device.

    ``allow_sm_mismatch``: use a cache built for another SM count of the same arch (warns; FA4's
    persistent grids then size for the wrong SKU - correct but not tuned); default: whether
    ``$FA4AOT_ALLOW_SM_MISMATCH`` is 1. ``knobs``: FA4's
    selection knobs (default: FA_DISABLE_2CTA, FA_DISABLE_S_PING_PONG and
    FLASH_ATTENTION_SM100_BACKEND from the environment, read now). ``tuned``: apply the cache's
    tuning table for this device when it has one (default: unless FA4AOT_TUNING=0).
    ``miss_log`` (default ``$FA4AOT_MISS_LOG``): append a JSON line per distinct variant a call
    needs and the cache lacks (with the manifest line that builds it). ``record_log`` (default
    ``$FA4AOT_RECORD``, set by ``fa4aot record``): the same for every variant calls ask for.
    ``require`` (default ``$FA4AOT_REQUIRE``): a requirements file (``fa4aot plan M --write-require``);
    opening fails, naming what is missing, unless the cache holds every variant it lists for this
    device - strict mode: a gap shows at start-up, not at the first request. ``driver`` is for tests.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        allow_sm_mismatch: bool | None = None,
        knobs: Knobs | None = None,
        tuned: bool | None = None,
        miss_log: str | Path | None = None,
        record_log: str | Path | None = None,
        require: str | Path | None = None,
        driver: Any = None,
    ):
        t0 = time.perf_counter()
        logs.configure_from_env()
        if allow_sm_mismatch is None:
            allow_sm_mismatch = env.allow_sm_mismatch()
        if driver is None:
            driver = make_driver()
        self.driver = driver
        t1 = time.perf_counter()
        self.device = driver.current_device()
        self.info = driver.device_info(self.device)
        t2 = time.perf_counter()
        self.host_arch = host_arch()
        if cache_dir:
            self.cache = Cache(cache_dir)
            self.index = self._open_index(allow_sm_mismatch)
        else:
            where, self.cache, self.index = choose_cache(self.info, self.host_arch, allow_sm_mismatch)
        warn_if_untrusted(self.cache, "" if cache_dir else f"{where} at {self.cache.root}")
        #: seconds spent opening: driver set-up, device queries, cache and index (benchmarks read it)
        self.open_seconds = {"driver": t1 - t0, "device": t2 - t1, "index": time.perf_counter() - t2}
        self.target: Target = self.index.target
        _log.info(
            "opened the cache %s for %s (%s, %d SMs, %s host)",
            self.cache.root, self.info.name, self.target.arch, self.target.num_sms, self.host_arch,
        )  # fmt: skip
        try:
            self.knobs = knobs_from_env(env.fa4_knobs()) if knobs is None else knobs
            self.bwd_knobs = bwd_knobs_from_env(env.fa4_knobs())
        except ValueError as e:
            raise ArgumentError(str(e)) from None
        self._selector: Any = None
        self._launch_fn = driver.launch_function()
        #: where raw-pointer tensors live, per allocation range (one-device processes only)
        self.pointer_ranges = _pointer_ranges(driver)
        self._loaded: dict[str, LoadedVariant] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        #: event counters behind stats() (fa4aot.runtime.stats): plain ints, one add where each event happens
        self._stat_hits = self._stat_misses = self._stat_loads = self._stat_invalid = self._stat_refused = 0
        #: the caches the APIs keep per runtime, by name (each declared, and bounded, by its API:
        #: :func:`api_cache`)
        self.api_caches: dict[str, Any] = {}
        #: the device's tuning table (None: none, or not applied) and its lookup: default variant
        #: id -> shape bucket -> chosen variant id (only entries this cache can honour)
        self.tuning_table: TuningTable | None = None
        self.tuning: dict[str, TunedChoices] = {}
        if tuned if tuned is not None else env.tuning():
            self.tuning_table, self.tuning = open_tuning(self)
        miss_log = miss_log or env.get(MISS_LOG_ENV)
        record_log = record_log or env.get(RECORD_LOG_ENV)
        self.miss_log = VariantLog(miss_log) if miss_log else None
        self.record_log = VariantLog(record_log) if record_log else None
        require = require or env.get(REQUIRE_ENV)
        if require:
            self._check_required(Path(require))

    def _check_required(self, path: Path) -> None:
        """Strict mode: every variant the requirements file lists for this device is in the cache."""
        try:
            doc = json.loads(path.read_bytes())
            listed = [(r["id"], r["label"], r["arch"], int(r["num_sms"])) for r in doc["variants"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"requirements file {path} unreadable: {e}") from None
        t = self.target
        mine = [(vid, label) for vid, label, arch, sms in listed if (arch, sms) == (t.arch, t.num_sms)]
        missing = [label for vid, label in mine if vid not in self.index]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise VariantNotFoundError(
                f"strict mode: the cache {self.cache.root} lacks {len(missing)} of the {len(mine)} variants "
                f"{doc.get('manifest', path)} declares for {t.name} ({t.arch}, {t.num_sms} SMs): "
                f"{'; '.join(missing[:3])}{more}. Build that manifest into this cache."
            )

    # -- tuning --------------------------------------------------------------------------

    def tuning_path(self) -> Path:
        """Where this cache keeps the tuning table for this target and device."""
        t = self.target
        return self.cache.root / TUNING_DIR / table_filename(t.arch, t.num_sms, self.info.name)

    # -- device checks ---------------------------------------------------------------------

    def _open_index(self, allow_sm_mismatch: bool) -> Any:
        return open_index(self.cache, self.info, self.host_arch, allow_sm_mismatch)

    def _check_entry(self, entry: Entry) -> None:
        # the key is recomputed from the record, as install and pull do: a record moved under
        # another key (a variant it was not built for) never loads
        if cache_key(entry.variant, entry.meta.get("toolchain", {}), entry.host_arch) != entry.key:
            raise CorruptArtifactError(
                f"{entry.variant.label()}: entry {entry.key} is not the key its record hashes to (a record moved "
                "under another key): run `fa4aot verify`"
            )
        foreign = foreign_toolchain(entry)
        if foreign:
            self.miss(entry.variant, why=foreign)
        if entry.host_arch != self.host_arch:
            raise DeviceMismatchError(
                f"{entry.variant.label()}: its launch plan was built for a {entry.host_arch} host; this is "
                f"{self.host_arch}. Build the cache on (or cross-compile for) this CPU arch."
            )
        toolkit = entry.meta.get("cubin_toolkit") or "13.0"
        need = _DRIVER_FOR_TOOLKIT.get(int(toolkit.split(".")[0]), 13000)
        if self.info.driver_version < need:
            raise DeviceMismatchError(
                f"{entry.variant.label()}: the cubin was built by CUDA {toolkit} and needs a driver for "
                f"CUDA {need // 1000}.0 or newer; this driver supports CUDA "
                f"{self.info.driver_version // 1000}.{self.info.driver_version % 1000 // 10}."
            )

    # -- FA4's selector -------------------------------------------------------------------

    @property
    def selector(self) -> Any:
        """FA4's config-selection module (its config.py) that the cache's entries were built with,
        read from the cache (size and sha256 checked) and loaded on first use."""
        sel = self._selector
        if sel is None:
            from fa4aot.core import selector as selector_mod

            ref = getattr(self.index, "selector", None)
            if ref is None:
                raise CacheError(
                    f"the cache {self.cache.root} holds no FA4 selector (its entries were built by an fa4aot "
                    "before the FA4 4.0.0b40 port, or its packed index is old: run `fa4aot reindex`); rebuild it"
                )
            source = self.cache.read_ref(ref, "FA4's selector (config.py)")
            with self._lock:
                if self._selector is None:
                    self._selector = selector_mod.load(source, str(self.cache.blob_path(ref)))
                sel = self._selector
        return sel

    # -- lookup and load -------------------------------------------------------------------

    def variant_for(self, family: str, **fields: Any) -> Variant:
        """The variant of ``family`` with ``fields`` for this runtime's target."""
        return Variant.make(family, self.target.arch, self.target.num_sms, **fields)

    def has(self, variant: Variant) -> bool:
        return variant.variant_id in self.index

    def variant_ids(self) -> list[str]:
        """Ids of every variant this runtime can load."""
        return list(self.index.records)

    def miss(self, variant: Variant, shapes: dict[str, list[Any]] | None = None, *, why: str = "") -> None:
        """Raise VariantNotFoundError for a variant the cache lacks, naming the manifest line that
        builds it (with the call's ``shapes`` for a forward variant), after logging it. ``why``:
        the cache holds the variant but this runtime cannot use that entry (it says why)."""
        from fa4aot.core.manifest_text import describe_missing

        line = describe_missing(variant, shapes)
        if why:
            self._stat_refused += 1
        else:
            self._stat_misses += 1
        if self.record_log is not None:
            self.record_log.add(variant, present=False)
        if self.miss_log is not None:
            self.miss_log.add(variant, target=self.target._asdict(), host_arch=self.host_arch, manifest=line)
        if why:
            raise VariantNotFoundError(
                f"the cache {self.cache.root} holds {variant.label()} only {why}; rebuild it with this fa4aot: {line}",
                variant=variant,
            )
        raise VariantNotFoundError(
            f"the cache {self.cache.root} has no {variant.label()}; add it to the manifest and rebuild: {line}",
            variant=variant,
        )

    def load(self, variant: Variant) -> LoadedVariant:
        """The loaded variant (loading and verifying it on first use)."""
        vid = variant.variant_id
        if self.record_log is not None:  # before the loaded check: preloaded variants count too
            self.record_log.add(variant, present=vid in self.index)
        lv = self._loaded.get(vid)
        if lv is not None:
            self._stat_hits += 1
            return lv
        if vid not in self.index:
            self.miss(variant)
        lv = self._load_id(vid)
        self._stat_hits += 1
        return lv

    def _load_id(self, vid: str) -> LoadedVariant:
        lv = self._loaded.get(vid)
        if lv is not None:
            return lv
        with self._lock:
            lock = self._loading.setdefault(vid, threading.Lock())
        with lock:  # one loader per variant; different variants load in parallel
            lv = self._loaded.get(vid)
            if lv is None:
                try:
                    entry = self.index.entry(vid)
                    if entry.variant.variant_id != vid:  # a packed index pointing at another variant's record
                        raise CorruptArtifactError(
                            f"the cache's index serves {entry.variant.label()} (entry {entry.key}) for variant "
                            f"{vid}: run `fa4aot verify` and `fa4aot reindex`"
                        )
                    lv = self._load_entry(entry)
                except VariantNotFoundError:
                    raise  # another fa4aot's entry: miss() counted it
                except DeviceMismatchError:
                    self._stat_refused += 1  # built for another host CPU or a newer driver
                    raise
                except Exception:
                    self._stat_invalid += 1  # damaged: a bad hash, record or plan
                    raise
                self._loaded[vid] = lv
                self._stat_loads += 1
        return lv

    def _load_entry(self, entry: Entry) -> LoadedVariant:
        t = [time.perf_counter()]
        _require_fields(entry)
        self._check_entry(entry)
        # both blobs sha256-checked: a corrupt one never loads
        cubin = self.cache.read_cubin(entry)
        plan_bytes = splice_plan(entry, self.cache.read_blob(entry, "plan"), cubin)
        t.append(time.perf_counter())
        drv = self.driver
        library = drv.load_library(cubin)
        symbols = [k["symbol"] for k in entry.meta["kernels"]]
        kernels = [drv.get_kernel(library, s) for s in symbols]
        t.append(time.perf_counter())
        plan = open_plan(plan_bytes, entry.meta)
        t.append(time.perf_counter())
        static_smem = drv.kernel_attribute(kernels[0], FUNC_ATTR_SHARED_SIZE_BYTES, self.device)
        load = plan.load(
            kernels,
            {DEV_ATTR_MAX_SMEM_OPTIN: self.info.smem_optin},
            {FUNC_ATTR_SHARED_SIZE_BYTES: static_smem},
            device=self.device,
            launch_fn=self._launch_fn,
        )
        by_name = dict(zip(symbols, kernels))
        for name, attr, value in load.set_attributes:
            drv.set_kernel_attribute(by_name[name], attr, value, self.device)
        t.append(time.perf_counter())
        lv = LoadedVariant(entry, plan, kernels)
        lv.tuned = self.tuning.get(entry.variant_id)
        t.append(time.perf_counter())
        phases = ("read_and_hash", "cubin_load", "plan_dlopen", "module_load", "launcher")
        lv.load_seconds = {p: b - a for p, a, b in zip(phases, t, t[1:])}
        _log.debug("loaded %s %s in %.1f ms", entry.key[:12], entry.variant.label(), 1000 * (t[-1] - t[0]))
        return lv

    def preload(self, variants: Iterable[Variant | str] | str = "all", threads: int = 4) -> int:
        """Do first-use work (read, verify, load cubin and plan) now for ``variants`` (Variant
        objects or variant ids) or ``"all"`` the cache holds for this device; returns how many
        are loaded. Missing variants raise VariantNotFoundError before anything loads."""
        if isinstance(variants, str):
            if variants != "all":
                raise ValueError('variants must be "all" or an iterable of variants / variant ids')
            ids = self.variant_ids()
        else:
            ids = []
            for v in variants:
                if isinstance(v, Variant):
                    if not self.has(v):
                        self.load(v)  # raises VariantNotFoundError naming the manifest line
                    ids.append(v.variant_id)
                else:
                    if v not in self.index:
                        raise VariantNotFoundError(f"the cache {self.cache.root} has no variant with id {v}")
                    ids.append(v)
        todo = [vid for vid in ids if vid not in self._loaded]
        if threads <= 1 or len(todo) <= 1:
            for vid in todo:
                self._load_id(vid)
        else:
            from concurrent.futures import ThreadPoolExecutor  # not imported at start-up

            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(self._load_id, todo))
        return len(ids)

    def free_after(self, stream: int, ptr: int) -> None:
        """Free a per-stream buffer once the stream's queued kernels, which may use it, are done."""
        self.driver.synchronize(stream)
        self.driver.free(ptr)

    def cache_sizes(self) -> dict[str, int]:
        """Sizes of the runtime's caches (for monitoring; every one is bounded): the loaded
        variants and each API's caches (those used so far)."""
        sizes = {"loaded_variants": len(self._loaded)}
        sizes.update((name, len(c)) for name, c in self.api_caches.items())
        return sizes

    def stats(self) -> Any:
        """This runtime's counters (loads, hits, misses, refused and invalid entries, launches per
        family, patch fallbacks) as a :class:`fa4aot.runtime.stats.RuntimeStats`."""
        from fa4aot.runtime.stats import collect

        return collect(self)


def api_cache(name: str, make: Callable[[Runtime], Any]) -> Callable[[Runtime], Any]:
    """Declare a cache an API keeps per runtime: ``cache = api_cache(name, make)`` in the API's
    module, then ``cache(rt)`` is ``rt``'s (made by ``make(rt)`` on first use; ``make`` bounds
    it). The runtime holds it, so it lives and goes with the runtime; ``rt.cache_sizes()``
    reports it under ``name``."""

    def get(rt: Runtime) -> Any:
        c = rt.api_caches.get(name)
        if c is None:
            c = rt.api_caches.setdefault(name, make(rt))
        return c

    get.__name__ = get.__qualname__ = name
    return get


def choose_cache(
    info: DeviceInfo | None,
    host: str,
    allow_sm_mismatch: bool = False,
    places: list[tuple[str, Path]] | None = None,
) -> tuple[str, Cache, Any]:
    """(where, cache, index) of the cache a runtime opened without a path reads on this machine:
    the first place of :func:`cache_search_path` serving the device (``info``; None: no GPU
    visible, the first serving this host) - ``Runtime()`` and the CLI's read-only commands both
    choose with this function, so they read the same cache.

    With ``$FA4AOT_TRUSTED_KEYS`` (or ``~/.config/fa4aot/trusted_keys``) set, a cache wheel not
    signed by one of those keys, or changed since, is passed over with a warning. A cache wheel
    built for another GPU or host is passed over silently; one that is damaged or
    not a cache is passed over with a warning naming it; when a later wheel holds kernels for the
    same target, a warning names both (only the first is read). The last place's errors are raised.
    ``places``: the search path, if the caller has it already.
    """
    places = cache_search_path() if places is None else places
    keys = None
    for i, (where, path) in enumerate(places[:-1]):
        try:
            if where.startswith("wheel "):
                keys = runtime_trusted_keys() if keys is None else keys
                if keys:  # cache wheels must be signed by one of them (docs/security.md)
                    check_cache_files(path, keys, f"the cache {where}")
            cache = Cache(path)
            index = open_index(cache, info, host, allow_sm_mismatch)
        except DeviceMismatchError:
            continue  # built for another GPU or host: passing over it is what the search is for
        except (Fa4aotError, OSError) as e:
            warnings.warn(f"fa4aot: skipping the cache {where} at {path}: {e}", RuntimeWarning, stacklevel=3)
            continue
        _warn_shadowed(where, index, places[i + 1 : -1])
        return where, cache, index
    where, path = places[-1]
    try:
        cache = Cache(path)
    except CacheError as e:
        if len(places) == 1:
            raise
        raise CacheError(f"{e} (searched: {', '.join(f'{n} {p}' for n, p in places)})") from None
    return where, cache, open_index(cache, info, host, allow_sm_mismatch)


def _served_key(index: Any) -> PackedKey:
    """The (target, host, shim ABI) an opened index serves."""
    t = index.target
    return PackedKey(t.arch, t.num_sms, index.host_arch, getattr(index, "shim_abi", SHIM_ABI))


def _warn_shadowed(where: str, index: Any, later: list[tuple[str, Path]]) -> None:
    """Warn, naming both, for each later cache wheel holding kernels for the target ``index``
    serves: the first wheel hides the other completely, whatever either holds."""
    key = _served_key(index)
    for other, path in later:
        try:
            cache = Cache(path)
            if key not in cache.packed_targets():
                continue
            idx = cache.open_packed(key)
            size = f"{len(idx)} entries"
            idx.close()
        except Fa4aotError:
            continue  # unusable anyway; it is reported when it is the one chosen
        warnings.warn(
            f"fa4aot: the cache {where} ({len(index)} entries) shadows the cache {other} ({size}) for "
            f"{key.describe()}: only the first is read. Uninstall one, or set ${DEFAULT_CACHE_ENV} to choose.",
            RuntimeWarning,
            stacklevel=4,
        )


def untrusted(root: Path) -> str | None:
    """Why other users can change the cache at ``root`` (None: they cannot): the directory, its
    FORMAT or its index is writable by any user, or owned by a user other than root and this one.
    Whoever can write a cache's index chooses the native code (launch plans) a process runs."""
    me = os.geteuid()
    paths = [root, root / "FORMAT", root / "index", root / "index" / "cache.db", root / PACKED_DIR]
    try:
        paths += sorted((root / PACKED_DIR).iterdir())
    except OSError:
        pass  # no packed directory: nothing more to check
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_mode & stat.S_IWOTH:
            return f"{p} is writable by every user (mode {stat.S_IMODE(st.st_mode):o})"
        if st.st_uid not in (0, me):
            return f"{p} is owned by another user (uid {st.st_uid})"
    return None


def warn_if_untrusted(cache: Cache, where: str = "") -> None:
    """One warning when other users can change ``cache`` (see :func:`untrusted`)."""
    why = untrusted(cache.root)
    if why:
        fix = (
            "make it writable only by its owner (chmod -R o-w)"
            if "every user" in why
            else 'if that user is trusted, filter this warning: warnings.filterwarnings("ignore", "fa4aot: the cache")'
        )
        warnings.warn(
            f"fa4aot: the cache {where or cache.root} can be changed by other users: {why}. Its launch plans "
            f"are native code this process runs; {fix}.",
            RuntimeWarning,
            stacklevel=4,
        )


def visible_device() -> DeviceInfo | None:
    """The device a runtime would open (ordinal 0; no context is created), or None when there is
    no CUDA driver or device (a build machine)."""
    try:
        return make_driver().device_info(0)
    except Exception:  # no driver, no device, a driver too old: the CLI then works by host only
        return None


def device_arch(info: DeviceInfo) -> str:
    """The cubin arch a device runs (``sm_90a`` for compute capability 9.0)."""
    cc = info.compute_capability
    return arch_of_compute_capability(cc) or f"sm_{cc[0]}{cc[1]}a"  # the latter: named in errors


def open_index(cache: Cache, info: DeviceInfo | None, host: str, allow_sm_mismatch: bool = False) -> Any:
    """The index of ``cache`` serving this device and host with this fa4aot's shim ABI: the packed
    index of the device's arch and SM count (another SM count of the arch only with
    ``allow_sm_mismatch``, warning). ``info`` None (no GPU visible: the CLI on a build machine):
    the first index for this host. DeviceMismatchError when the cache serves neither."""
    arch = None if info is None else device_arch(info)
    keys = cache.packed_targets()
    if not keys:
        return _fallback_index(cache, info, host, allow_sm_mismatch)
    here = [k for k in keys if k.host_arch == host and arch in (None, k.arch)]
    mine = [k for k in here if k.shim_abi == SHIM_ABI]
    if not mine:
        have = _describe(cache, keys)
        if here:
            raise DeviceMismatchError(
                f"the cache {cache.root} holds launch plans for {have}, built by another fa4aot "
                f"version; this one reads shim ABI {SHIM_ABI}. Rebuild the cache with this fa4aot."
            )
        if info is not None and any(k.host_arch == host for k in keys):
            raise DeviceMismatchError(
                f"the cache {cache.root} holds kernels for {have}; this device is {info.name} "
                f"({arch}, {info.num_sms} SMs), which cannot run them. Build a manifest whose target.arch is {arch}."
            )
        raise DeviceMismatchError(
            f"the cache {cache.root} holds launch plans for {have}; this host is {host}. "
            "Build the cache on (or for) this CPU arch."
        )
    exact = [k for k in mine if info is None or k.num_sms == info.num_sms]
    pick = exact[0] if exact else mine[0]
    if not exact:
        _sm_mismatch(info, pick.num_sms, _describe(cache, keys), allow_sm_mismatch)
    return cache.open_packed(pick)


def _describe(cache: Cache, keys: list[PackedKey]) -> str:
    """'b200 (sm_100a, 148 SMs, x86_64 host, shim ABI 3), ...' for error messages."""
    out = []
    for k in keys:
        try:
            idx = cache.open_packed(k)
            name = idx.target.name
            idx.close()
        except Fa4aotError:
            name = "?"
        out.append(f"{name} ({k.arch}, {k.num_sms} SMs, {k.host_arch} host, shim ABI {k.shim_abi})")
    return ", ".join(out)


def _sm_mismatch(info: DeviceInfo, built_sms: int, have: str, allowed: bool) -> None:
    if not allowed:
        raise DeviceMismatchError(
            f"the cache holds {have}; this device ({info.name}) has {info.num_sms} SMs. FA4 sizes "
            f"persistent grids by SM count at build time, so fa4aot refuses to launch a grid built "
            f"for another SKU. Build for target.num_sms: {info.num_sms}, or pass allow_sm_mismatch=True "
            f"(or set ${env.ALLOW_SM_MISMATCH}=1)."
        )
    warnings.warn(
        f"fa4aot: using kernels built for {built_sms} SMs on {info.name} with {info.num_sms} SMs: "
        "FA4's persistent grids are sized for the other SKU.",
        RuntimeWarning,
        stacklevel=5,
    )


def _fallback_index(cache: Cache, info: DeviceInfo | None, host: str, allow_sm_mismatch: bool) -> Any:
    """A cache without packed indexes (filled by copying index records): read the full
    index instead. Slower to open; `fa4aot reindex` writes the packed ones."""
    from fa4aot.core.index import MemoryIndex

    entries, skipped = [], 0
    for key, text in cache.records():
        try:
            e = Entry.from_json(key, text)
        except CacheError:
            skipped += 1
            continue
        if e.meta.get("shim_abi") == SHIM_ABI:  # other fa4aot versions' plans are never loaded
            entries.append(e)
    if skipped:
        warnings.warn(
            f"fa4aot: skipped {skipped} malformed index record(s) of {cache.root}; `fa4aot verify` lists them",
            RuntimeWarning,
            stacklevel=5,
        )
    if not entries:
        raise VariantNotFoundError(f"the cache {cache.root} is empty; build it with `fa4aot build MANIFEST`")
    arch = None if info is None else device_arch(info)
    mine = [e for e in entries if e.host_arch == host and arch in (None, e.target.arch)]
    have = ", ".join(sorted({f"{e.target.arch} with {e.target.num_sms} SMs for {e.host_arch} hosts" for e in entries}))
    if not mine:
        device = "this is " if info is None else f"this device is {info.name} ({arch}, {info.num_sms} SMs) on "
        raise DeviceMismatchError(
            f"the cache {cache.root} holds {have}; {device}a {host} host. Build a manifest for it."
        )
    exact = [e for e in mine if info is None or e.target.num_sms == info.num_sms]
    if not exact:
        _sm_mismatch(info, mine[0].target.num_sms, have, allow_sm_mismatch)
    first = (exact or mine)[0].target
    return MemoryIndex([e for e in mine if (e.target.arch, e.target.num_sms) == (first.arch, first.num_sms)])


#: Parts of a build's toolchain fingerprint that are this fa4aot's own code: the kernel wrappers
#: (``fa4aot_kernels``) and the plan shim. Two fa4aot versions with one shim ABI share a packed
#: index (newest entry per variant); these tell their entries apart. The rest of the fingerprint
#: (FA4, DSL, C compiler) describes the build machine, which a runtime cannot see.
OWN_TOOLCHAIN_PARTS = ("kernels-src", "plan-shim")


def _hash_sources(paths: list[Path]) -> str:
    """``fa4aot.compile.toolchain``'s source hash (the same bytes hashed the same way)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def own_toolchain() -> dict[str, str]:
    """This installation's :data:`OWN_TOOLCHAIN_PARTS`, hashed from its installed sources without
    importing them (the kernel wrappers import the DSL); a part whose sources are absent is left
    out, and then not checked."""
    import importlib.util

    out: dict[str, str] = {}
    try:
        spec = importlib.util.find_spec("fa4aot_kernels")
        if spec is not None and spec.origin:
            out["kernels-src"] = _hash_sources(list(Path(spec.origin).resolve().parent.glob("*.py")))
    except (ImportError, ValueError, OSError):
        pass
    try:
        out["plan-shim"] = _hash_sources([Path(__file__).resolve().parent.parent / "plan" / "shim.c"])
    except OSError:
        pass
    return out


def foreign_toolchain(entry: Entry) -> str | None:
    """Why ``entry`` was built by another fa4aot than this runtime (None: by this one, or its
    record does not say): its kernel wrappers or plan shim differ from this installation's."""
    theirs = entry.meta.get("toolchain")
    if not isinstance(theirs, dict):
        return None
    mine = own_toolchain()
    diff = [
        f"{k} {theirs[k]}, this fa4aot's {mine[k]}"
        for k in OWN_TOOLCHAIN_PARTS
        if k in mine and k in theirs and theirs[k] != mine[k]
    ]
    return f"as built by another fa4aot ({'; '.join(diff)})" if diff else None


def _require_fields(entry: Entry) -> None:
    """An index record has every field loading reads (a malformed record fails its own variant,
    with a typed error, never the runtime)."""
    m = entry.meta
    try:
        ok = (
            isinstance(m["kernels"], list)
            and m["kernels"]
            and all(isinstance(k["symbol"], str) and isinstance(k["params"], list) for k in m["kernels"])
            and all(isinstance(m["signature"][f], str) for f in ("entry", "init", "load"))
            and isinstance(m["signature"]["args"], list)
            and entry.cubin is not None
            and "plan" in entry.blobs
            and "cubin" in entry.blobs
        )
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CacheError(f"index record {entry.key} ({entry.variant.label()}) is malformed; run `fa4aot verify`")


def host_arch() -> str:
    """This CPU's arch as ``platform.machine()`` names it (x86_64, aarch64), without importing
    platform at start-up."""
    return os.uname().machine


_DEFAULT: Runtime | None = None
_DEFAULT_LOCK = threading.Lock()


def default_runtime() -> Runtime:
    """The process-wide runtime, created on first use, over the cache :func:`choose_cache` picks
    (``$FA4AOT_CACHE``, else the installed cache wheel serving this GPU, else ./cache)."""
    global _DEFAULT
    rt = _DEFAULT
    if rt is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Runtime()
            rt = _DEFAULT
    return rt


def set_default_runtime(runtime: Runtime | None) -> None:
    """Use ``runtime`` for calls that do not pass one (None: recreate on next use)."""
    global _DEFAULT
    _DEFAULT = runtime


def open_runtime(cache_dir: str | Path | None = None, **kwargs: Any) -> Runtime:
    """Open ``cache_dir`` for the current device and make it the default runtime."""
    rt = Runtime(cache_dir, **kwargs)
    set_default_runtime(rt)
    return rt


def make_driver() -> Any:
    """The driver binding ``$FA4AOT_DRIVER`` names: :class:`fa4aot.runtime.driver.CudaDriver` (``ctypes``, the default)
    or :class:`fa4aot.runtime.driver_bindings.BindingsDriver` (``cuda-bindings``)."""
    from fa4aot.runtime import driver

    try:
        which = env.driver()
    except ValueError as e:
        raise driver.CudaError(str(e)) from None
    if which == "cuda-bindings":
        from fa4aot.runtime.driver_bindings import BindingsDriver

        return BindingsDriver()
    return driver.CudaDriver()


def stats(runtime: Runtime | None = None) -> Any:
    """``runtime``'s counters, or the default runtime's (``fa4aot.stats()``), as a
    :class:`fa4aot.runtime.stats.RuntimeStats`. Opens nothing: with no default runtime yet the
    runtime counters are zero (the patch's fallbacks are still reported)."""
    from fa4aot.runtime.stats import RuntimeStats, collect, patch_fallbacks

    rt = runtime or _DEFAULT
    if rt is None:
        return RuntimeStats(patch_fallbacks=patch_fallbacks())
    return collect(rt)


def _pointer_ranges(driver: Any) -> Any:
    """A :class:`fa4aot.runtime.validate.PointerRanges` when the process sees exactly one device
    (and the driver can say so), else None: every raw pointer is then asked about each call."""
    from fa4aot.runtime.driver import CudaError
    from fa4aot.runtime.validate import PointerRanges

    try:
        one = driver.device_count() == 1
    except (AttributeError, CudaError):
        return None
    return PointerRanges(driver) if one else None
