"""``fa4aot build``: expand a manifest, skip what the cache already has, compile the rest in a
bounded process pool, store each result as it arrives, and report."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fa4aot.compile import manifest as manifest_mod
from fa4aot.compile.store import CacheWriter, blob_ok
from fa4aot.compile.toolchain import fingerprint, host_arch
from fa4aot.compile.worker import BuildOutput, build_variant, check_cross_host, configure
from fa4aot.core.errors import CacheError, CacheFullError, Fa4aotError, ManifestError
from fa4aot.core.families import FAMILIES
from fa4aot.core.index import Cache
from fa4aot.core.variant import Target, Variant, cache_key

#: Compiles per worker process before it is replaced (bounds memory growth across compiles).
TASKS_PER_WORKER = 16
#: Rough peak RSS of one FA4 forward compile, for the default job count.
WORKER_RSS_BYTES = 1 << 30
#: Seconds a stopped worker gets to exit after SIGTERM before it is killed (Ctrl-C).
STOP_GRACE_S = 2.0


@dataclass
class Row:
    """One variant's outcome."""

    variant: Variant
    key: str
    status: str  # built | cached | reused | failed
    seconds: float = 0.0
    size: int = 0
    error: str | None = None
    #: the host CPU arch of its launch plan
    host: str = ""


@dataclass
class BuildReport:
    rows: list[Row] = field(default_factory=list)
    wall_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    #: why the build stopped before the end (a full disk), else None
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        return not self.stopped and all(r.status != "failed" for r in self.rows)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.rows)


def default_jobs() -> int:
    """Worker count bounded by CPUs and by memory (about 1 GiB per FA4 compile)."""
    cpus = os.cpu_count() or 1
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        by_mem = max(1, mem // WORKER_RSS_BYTES - 1)
    except (ValueError, OSError):
        by_mem = cpus
    return max(1, min(cpus, by_mem))


def _cached(cache: CacheWriter, key: str) -> int | None:
    """Size of a complete cached entry for ``key`` (all blobs present and intact), else None."""
    entry = cache.get(key)
    if entry is None:
        return None
    if all(blob_ok(cache.root, ref) for ref in entry.blobs.values()):
        return sum(ref.size for ref in entry.blobs.values())
    return None


def build(
    manifest_path: str | Path,
    cache_dir: str | Path,
    jobs: int | None = None,
    *,
    progress: Callable[[int, int, Row], None] | None = None,
    families: tuple[str, ...] = (),
    compile_fn: Callable[[Variant, Target, str], BuildOutput] = build_variant,
    pool_factory: Callable[[Target, int], cf.Executor] | None = None,
    reuse: tuple[str | Path, ...] = (),
) -> BuildReport:
    """Build every variant the manifest asks for (of ``families``, if given) into ``cache_dir``.

    Checks before compiling anything that the families exist in the manifest and that the cache
    is writable. A full disk stops the build cleanly: what was stored stays, the report says what
    was not (``report.stopped``). Ctrl-C (KeyboardInterrupt) terminates the workers at once (they
    ignore SIGINT themselves, so they print nothing) and propagates; what was stored stays. Each target's variants are built once per host arch its manifest
    names (``compile_fn(variant, target, host_arch)``). ``compile_fn`` and ``pool_factory`` (a
    process pool per target by default) let tests run fake compiles.

    ``reuse``: read-only caches to copy an entry from instead of compiling it, when they hold one
    under the same key (variant, target, toolchain fingerprint and host arch: builds are
    reproducible, so its bytes are what a compile here would give). A copied entry is checked as
    any read is (its key recomputes from its record, every blob's size and sha256) and is reported
    as ``reused``.
    """
    t0 = time.perf_counter()
    plan = manifest_mod.load(manifest_path)
    planned = plan.variants
    if families:
        known = {pv.variant.family for pv in planned}
        for fam in families:
            if fam not in FAMILIES:
                raise ManifestError("--family", f"unknown family {fam!r}; known: {sorted(FAMILIES)}")
            if fam not in known:
                raise ManifestError("--family", f"{manifest_path} builds no {fam} variant")
        planned = [pv for pv in planned if pv.variant.family in families]
    here = host_arch()
    jobs_list = [(pv, host) for pv in planned for host in plan.hosts(pv.target, here)]
    for host in sorted({h for _, h in jobs_list} - {here}):
        check_cross_host(host)  # before anything is compiled or written
    toolchains = {host: fingerprint(host) for host in {h for _, h in jobs_list}}
    sources = [_open_reuse(p) for p in reuse]
    cache = CacheWriter(cache_dir)
    cache.check_writable()
    report = BuildReport()
    todo: dict[Target, list[tuple[manifest_mod.PlannedVariant, str, str]]] = {}
    total = len(jobs_list)
    done = 0
    for pv, host in jobs_list:
        key = cache_key(pv.variant, toolchains[host], host)
        size = _cached(cache, key)
        row = Row(pv.variant, key, "cached", size=size, host=host) if size is not None else None
        if row is None and sources and not report.stopped:
            try:
                row = _reuse(cache, sources, pv, key, host)
            except CacheFullError as e:
                report.stopped = str(e)
        if row is not None:
            report.rows.append(row)
            done += 1
            if progress:
                progress(done, total, row)
        else:
            todo.setdefault(pv.target, []).append((pv, key, host))
    jobs = max(1, jobs or default_jobs())
    for target, all_items in todo.items():
        # A fresh pool per chunk recycles workers (bounding memory growth across compiles); the
        # executor's own max_tasks_per_child can deadlock on Python 3.11.
        chunk = jobs * TASKS_PER_WORKER
        for start in range(0, len(all_items), chunk):
            if report.stopped:
                break
            items = all_items[start : start + chunk]
            pool = (pool_factory or _pool)(target, min(jobs, len(items)))
            try:
                for row in _compile_chunk(pool, compile_fn, cache, target, items, toolchains, report):
                    report.rows.append(row)
                    done += 1
                    if progress:
                        progress(done, total, row)
            except BaseException:  # Ctrl-C (KeyboardInterrupt): stop now, not after the running compiles
                _stop(pool)
                raise
            pool.shutdown(wait=True)
    if report.stopped:
        done_keys = {r.key for r in report.rows}
        for items in todo.values():
            report.rows += [
                Row(pv.variant, key, "failed", error="not built: the build stopped", host=host)
                for pv, key, host in items
                if key not in done_keys
            ]
    try:
        cache.write_packed()
    except (OSError, CacheError) as e:
        report.stopped = report.stopped or f"cannot write the packed index: {e}"
    cache.close()
    report.wall_seconds = time.perf_counter() - t0
    return report


def _compile_chunk(
    pool: cf.Executor,
    compile_fn: Callable[[Variant, Target, str], BuildOutput],
    cache: CacheWriter,
    target: Target,
    items: list[tuple[manifest_mod.PlannedVariant, str, str]],
    toolchains: dict[str, dict[str, str]],
    report: BuildReport,
) -> Iterator[Row]:
    """Compile ``items`` in ``pool`` and store each result as it arrives; yields its row. After a
    full disk (``report.stopped``) the rest are cancelled."""
    with _sigint_blocked():  # the workers this starts inherit the mask: Ctrl-C is the parent's to handle
        futures = {pool.submit(compile_fn, pv.variant, target, host): (pv, key, host) for pv, key, host in items}
    for fut in cf.as_completed(futures):
        pv, key, host = futures[fut]
        if report.stopped:
            fut.cancel()
            continue
        try:
            out: BuildOutput = fut.result()
        except Exception as e:  # a worker died (e.g. killed by the OOM killer)
            out = BuildOutput(pv.variant, False, error=f"build worker died: {e!r}")
        report.peak_rss_mb = max(report.peak_rss_mb, out.peak_rss_mb)
        try:
            row = _store(cache, pv, key, target, out, toolchains[host], host)
        except CacheFullError as e:
            report.stopped = str(e)
            row = Row(pv.variant, key, "failed", out.seconds, error=f"not stored: {e}", host=host)
        yield row


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT held back in this thread while it starts worker processes: they inherit the signal
    mask, so a Ctrl-C at the terminal (sent to the whole process group) never reaches a worker,
    which would print a traceback of its own. A Ctrl-C meanwhile arrives when the mask is lifted.
    Elsewhere than in the main thread of a POSIX process, nothing is blocked."""
    blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if blocked:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(pool: cf.Executor) -> None:
    """Stop a pool at once: pending compiles cancelled, running ones' worker processes terminated
    (a compile takes up to a minute; Ctrl-C should not wait for it)."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14+
    if terminate is not None:
        terminate()
        return
    # before shutdown, which forgets them (ProcessPoolExecutor._processes: no public way before 3.14)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        with contextlib.suppress(Exception):  # already gone
            proc.terminate()
    # a worker whose SIGTERM is deferred or handled (inside a long native compile, or by a library's
    # handler) is killed after a grace period: the interpreter's exit joins every worker
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_GRACE_S)


def _open_reuse(path: str | Path) -> Cache:
    """A cache to reuse entries from, opened read-only (an error before anything is compiled)."""
    try:
        return Cache(path)
    except Fa4aotError as e:
        raise CacheError(f"--reuse {path}: {e}") from None


def _reuse(
    cache: CacheWriter, sources: list[Cache], pv: manifest_mod.PlannedVariant, key: str, host: str
) -> Row | None:
    """Copy the entry stored under ``key`` from the first of ``sources`` that holds an intact one
    into ``cache``; None if none does. The key must recompute from the source's record and name
    this variant and host arch, and every blob must match its recorded size and sha256: a damaged
    or mislabelled source entry is passed over (it is compiled instead), never copied."""
    for src in sources:
        try:
            entry = src.get(key)
            if entry is None or entry.variant != pv.variant or entry.host_arch != host:
                continue
            if cache_key(entry.variant, entry.meta.get("toolchain", {}), entry.host_arch) != key:
                continue
            blobs = {role: src.read_blob(entry, role) for role in entry.blobs}
        except Fa4aotError:
            continue
        meta = {k: v for k, v in entry.meta.items() if k not in ("blobs", "created")}
        meta["origin"] = pv.origin
        stored = cache.put(key, meta, blobs)
        return Row(pv.variant, key, "reused", size=sum(r.size for r in stored.blobs.values()), host=host)
    return None


def _store(
    cache: CacheWriter,
    pv: manifest_mod.PlannedVariant,
    key: str,
    target: Target,
    out: BuildOutput,
    toolchain: dict[str, str],
    host: str,
) -> Row:
    """Put a successful build into the cache (blobs first, index record last)."""
    if not out.ok:
        return Row(pv.variant, key, "failed", out.seconds, error=out.error, host=host)
    meta = dict(out.meta)
    meta.update(
        variant=pv.variant.to_dict(),
        target=target.to_dict(),
        toolchain=toolchain,
        host_arch=host,
        origin=pv.origin,
        build={"seconds": round(out.seconds, 3), "peak_rss_mb": round(out.peak_rss_mb, 1)},
    )
    entry = cache.put(key, meta, out.blobs)
    return Row(pv.variant, key, "built", out.seconds, sum(r.size for r in entry.blobs.values()), host=host)


def _pool(target: Target, workers: int) -> cf.ProcessPoolExecutor:
    # spawn: workers must import the DSL after configure() has set the arch; fork would inherit
    # a parent's DSL state.
    ctx = multiprocessing.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(target,))


def _init_worker(target: Target) -> None:
    """A local build worker: Ctrl-C is the parent's to handle (it terminates the workers), so a
    worker ignores SIGINT instead of printing a traceback; then the target's set-up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure(target)
