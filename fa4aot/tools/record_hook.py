"""Installed by ``fa4aot record`` into the workload's interpreter (through a generated
``sitecustomize``): when ``flash_attn.cute.interface`` is imported, its forward, combine and
scheduler-metadata JIT caches are wrapped so that every compile key FA4 looks up is appended, as
JSON, to ``$FA4AOT_RECORD``, and so is each backward call (as fa4aot's backward call fields).
Lookups and results are unchanged: the wrappers only read.

The key's element names come from FA4's own source (the ``compile_key = (...)`` tuple of each
function, :mod:`fa4aot.tools.fa4_keys`; FA4's FwdConfig becomes a dict of its fields), so the
record says ``{"causal": true, "cu_seqlens_q is None": false, ...}`` and the
mapping to fa4aot's variant fields (:mod:`fa4aot.tools.record`) does not depend on positions.

Which processes are recorded. ``fa4aot record`` puts the directory of its generated
``sitecustomize`` first on the workload's ``PYTHONPATH`` and marks the session in the environment
(``$FA4AOT_RECORD_HOOK``: that directory; ``$FA4AOT_RECORD_PREFIX``: ``sys.prefix`` of its own
interpreter). The recorded tree is the command and every descendant Python process that inherits
that environment and runs the recorder's interpreter (same ``sys.prefix``): multi-process serving
(torchrun, multiprocessing workers, subprocess pools of the same environment) is recorded as a whole.
Left alone, with the marks and the ``PYTHONPATH`` entry removed from their environment so their own
children are left alone too, are: Python processes of another interpreter or virtual environment
(a tool the workload runs; nothing of this fa4aot or its site-packages is put on their path), and
processes that do not inherit the marks (non-descendants, or descendants started with a cleaned
environment). In every Python process it reaches, the generated ``sitecustomize`` takes itself off
``sys.path`` and then runs the ``sitecustomize`` the process would have run without it (the next one
on ``sys.path``: the user's own, from ``PYTHONPATH`` or site-packages).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
import threading
from typing import Any

RECORD_ENV = "FA4AOT_RECORD"
#: Set (to 1) by ``fa4aot record --no-compile``: the workload calls FA4 on fake tensors, and FA4's
#: own probe (``interface._compile_misses``, 4.0.0b40) makes it record misses instead of compiling.
NO_COMPILE_ENV = "FA4AOT_RECORD_NO_COMPILE"
TARGET_MODULE = "flash_attn.cute.interface"
#: Set by ``fa4aot record``: the directory of the session's generated ``sitecustomize``. The hook
#: runs only in processes whose environment names the directory their ``sitecustomize`` came from.
HOOK_ENV = "FA4AOT_RECORD_HOOK"
#: Set by ``fa4aot record``: ``sys.prefix`` of its interpreter, the one whose fa4aot and FA4 the
#: hook uses; Python processes of other interpreters are not recorded.
PREFIX_ENV = "FA4AOT_RECORD_PREFIX"
#: What ``fa4aot record`` sets for the workload; a process left out of the recording drops it all.
#: (The names are spelled here, not imported from fa4aot.core.env: :func:`site_main` runs before
#: fa4aot is importable, and reads them directly; tests/test_cli.py checks they match the table.)
SESSION_ENV = (RECORD_ENV, NO_COMPILE_ENV, HOOK_ENV, PREFIX_ENV)
SITE_MODULE = "sitecustomize"
#: Name this file is loaded under by the generated ``sitecustomize`` (by path: a process that is not
#: recorded imports nothing of fa4aot's package).
BOOT_MODULE = "_fa4aot_record_boot"
#: The directory holding the ``fa4aot`` package (appended to a recorded process's path if needed).
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: FA4 function -> the kind of kernel its cache compiles.
HOOKED = {"_flash_attn_fwd": "fwd", "_flash_attn_fwd_combine": "combine", "_get_scheduler_metadata": "prepare"}

_state = threading.local()
_lock = threading.Lock()
_seen: set[str] = set()


def key_names(mod: Any) -> dict[str, list[str]]:
    """Per hooked function, the source text of each element of its compile key (read from the
    module's source: :func:`fa4aot.tools.fa4_keys.key_names`)."""
    from fa4aot.tools import fa4_keys

    return fa4_keys.key_names(inspect.getsource(mod))


def _write(rec: dict[str, Any]) -> None:
    """Append ``rec`` to the record file, once per distinct record in this process."""
    line = json.dumps(rec, sort_keys=True)
    with _lock:
        if line in _seen:
            return
        _seen.add(line)
    from fa4aot.core import env  # not at the top: the sitecustomize bootstrap loads this file first

    path = env.get(RECORD_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


class RecordingCache:
    """A JIT cache that appends each distinct key it is asked about to the record file."""

    def __init__(self, inner: Any, kind: str, names: list[str], arch: Any):
        self._inner, self._kind, self._names, self._arch = inner, kind, names, arch

    def _record(self, key: Any) -> None:
        from fa4aot.tools.fa4_keys import name_key, plain

        if not isinstance(key, tuple):
            return
        rec = {"fa4": self._kind, "key": {n: plain(v) for n, v in name_key(self._names, key).items()}}
        if self._kind == "fwd":
            rec["softcap"] = getattr(_state, "softcap", None)
            _state.softcap = None
            rec["call"] = getattr(_state, "call", None)
        if self._kind == "prepare":
            rec["device_arch"] = plain(self._arch())
        _write(rec)

    def __contains__(self, key: Any) -> bool:
        try:
            self._record(key)
        except Exception as e:  # recording must never change the workload
            print(f"fa4aot record: could not record a {self._kind} key: {e}", file=sys.stderr)
        return key in self._inner

    def __getitem__(self, key: Any) -> Any:
        return self._inner[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._inner[key] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def call_shapes(args: dict[str, Any]) -> dict[str, Any]:
    """The shapes and requests of one ``_flash_attn_fwd`` call (its bound arguments), named as
    :class:`fa4aot.core.fa4_interface.FwdFacts` names them: :func:`fa4aot.core.fwd.call_group`
    turns them into the manifest axes that make FA4 select the call's kernel again."""
    q, k = args["q"], args["k"]
    cu_q, cu_k, page_table = args.get("cu_seqlens_q"), args.get("cu_seqlens_k"), args.get("page_table")
    seqused_k = args.get("seqused_k")
    batch = (cu_q.shape[0] - 1) if cu_q is not None else q.shape[0]
    if page_table is not None:
        batch = page_table.shape[0]
    elif cu_k is not None and cu_q is None:
        batch = cu_k.shape[0] - 1
    elif seqused_k is not None and cu_q is None:
        batch = seqused_k.shape[0]
    q_capacity = q.shape[0] if cu_q is not None else q.shape[1]
    if page_table is not None:
        k_capacity = page_table.shape[1] * k.shape[1]
    else:
        k_capacity = k.shape[0] if cu_k is not None else k.shape[1]
    out = {
        "batch": int(batch),
        "q_capacity": int(q_capacity),
        "k_capacity": int(k_capacity),
        "total_q": int(q_capacity if cu_q is not None else batch * q_capacity),
        "max_seqlen_q": args.get("max_seqlen_q"),
        "max_seqlen_k": args.get("max_seqlen_k"),
        "num_heads_kv": int(k.shape[-2]),
        "varlen_q": cu_q is not None,
        "num_splits": int(args.get("num_splits", 1)),
        "pack_gqa": args.get("pack_gqa"),
        "window_left": args.get("window_size_left"),
        "window_right": args.get("window_size_right"),
        # FA4: any input requiring grad selects a training forward (interface.py 659-661)
        "requires_grad": any(
            getattr(args.get(n), "requires_grad", False) for n in ("q", "k", "v", "qv", "learnable_sink")
        ),
    }
    if page_table is not None:
        out["page_size"] = int(k.shape[1])
    if args.get("tile_mn") is not None:
        out["requested_tile"] = list(args["tile_mn"])
    if args.get("mma_pv_is_rs") is not None:
        out["requested_mma_pv_is_rs"] = bool(args["mma_pv_is_rs"])
    md = args.get("scheduler_metadata")
    if md is not None and not args.get("disable_scheduler_metadata"):
        # FA4's get_scheduler_metadata ran its prepare kernel, or (no split, not causal) returned no buffers
        prepared = any(getattr(md, n, None) is not None for n in ("num_m_blocks_ptr", "tile_count_semaphore"))
        out["caller_metadata"], out["caller_prepared"] = True, prepared
    return out


def _wrap_forward(fn: Any) -> Any:
    """``_flash_attn_fwd`` that notes its call's shapes for the key it records."""
    sig = inspect.signature(fn)

    def fwd(*a: Any, **kw: Any) -> Any:
        try:
            _state.call = call_shapes(sig.bind_partial(*a, **kw).arguments)
        except Exception:  # recording must never change the workload
            _state.call = None
        return fn(*a, **kw)

    fwd.__wrapped__ = fn  # type: ignore[attr-defined]
    fwd.compile_cache = fn.compile_cache  # type: ignore[attr-defined]
    fwd._fa4aot_record = True  # type: ignore[attr-defined]
    return fwd


#: The gradients FA4's backward returns: (its argument for a preallocated one, the input whose shape
#: and dtype it has).
_GRADS = (("dq", "q"), ("dk", "k"), ("dv", "v"))


def _wrap_backward(fn: Any, arch: Any) -> Any:
    """``_flash_attn_bwd`` that records its call: FA4 4.0.0b40 looks up its backward kernels in
    several caches under keys of its own, so the record holds fa4aot's call fields instead
    (:func:`fa4aot.core.backward.fa4_call_fields`) and the FA4 arguments fa4aot refuses. Under
    ``--no-compile`` (fake tensors; FA4's backward has no ``_compile_misses`` probe and would
    compile) FA4 is not called: the gradients are empty tensors of the right shapes."""
    sig = inspect.signature(fn)

    def bwd(*a: Any, **kw: Any) -> Any:
        args: dict[str, Any] = {}
        try:
            bound = sig.bind(*a, **kw)
            bound.apply_defaults()
            args = bound.arguments
            _write(backward_record(args, arch()))
        except Exception as e:  # recording must never change the workload
            print(f"fa4aot record: could not record a backward call: {e}", file=sys.stderr)
        from fa4aot.core import env

        if env.get(NO_COMPILE_ENV) != "1" or not args:
            return fn(*a, **kw)
        import torch

        grads = [args[g] if args.get(g) is not None else torch.empty_like(args[t]) for g, t in _GRADS]
        sink = args.get("learnable_sink")
        return tuple(grads) if sink is None else (*grads, torch.empty_like(sink))

    bwd.__wrapped__ = fn  # type: ignore[attr-defined]
    bwd.compile_cache = getattr(fn, "compile_cache", None)  # type: ignore[attr-defined]
    bwd._fa4aot_record = True  # type: ignore[attr-defined]
    return bwd


def backward_record(args: dict[str, Any], arch: Any) -> dict[str, Any]:
    """The record line of one ``_flash_attn_bwd`` call (its bound arguments) on ``arch``."""
    from fa4aot.core.backward import fa4_call_fields
    from fa4aot.core.fa4_args import ENTRY_POINTS, REFUSED, is_default
    from fa4aot.tools.fa4_keys import plain

    refused = [
        p.name
        for p in ENTRY_POINTS["_flash_attn_bwd"]
        if p.use == REFUSED and not is_default(args.get(p.name, p.default), p.default)
    ]
    rec = {"fa4": "bwd", "key": fa4_call_fields(args), "refused": refused, "device_arch": plain(arch)}
    return dict(rec, call=backward_shapes(args))


def backward_shapes(args: dict[str, Any]) -> dict[str, int]:
    """The shapes of one ``_flash_attn_bwd`` call that FA4's backward selection reads (a group's
    domain axes: SM100 folds query heads by them)."""
    q, k = args["q"], args["k"]
    cu_q, cu_k = args.get("cu_seqlens_q"), args.get("cu_seqlens_k")
    batch = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    seqlen_q = args.get("max_seqlen_q") or (q.shape[0] if cu_q is not None else q.shape[1])
    seqlen_k = args.get("max_seqlen_k") or (k.shape[0] if cu_k is not None else k.shape[1])
    return {"batch": int(batch), "seqlen_q": int(seqlen_q), "seqlen_k": int(seqlen_k), "nheads_kv": int(k.shape[-2])}


def patch(mod: Any) -> None:
    """Wrap the JIT caches of FA4's interface module ``mod`` (and its forward, for call shapes)."""
    from fa4aot.core import env

    if env.get(NO_COMPILE_ENV) == "1" and hasattr(mod, "_compile_misses"):
        # for this interpreter's main context: FA4 adds (cache, key) here and skips the compile;
        # the wrapped caches below still see (and record) every key it looks up
        mod._compile_misses.set(set())
    arch = getattr(mod, "_get_device_arch", lambda: None)
    names = key_names(mod)
    for fname, kind in HOOKED.items():
        fn = getattr(mod, fname, None)
        if fn is None or not hasattr(fn, "compile_cache") or isinstance(fn.compile_cache, RecordingCache):
            continue
        fn.compile_cache = RecordingCache(fn.compile_cache, kind, names[fname], arch)
    fwd = getattr(mod, "_flash_attn_fwd", None)
    if fwd is not None and not getattr(fwd, "_fa4aot_record", False):
        mod._flash_attn_fwd = _wrap_forward(fwd)
    bwd = getattr(mod, "_flash_attn_bwd", None)
    if bwd is not None and not getattr(bwd, "_fa4aot_record", False):
        mod._flash_attn_bwd = _wrap_backward(bwd, arch)
    utils = getattr(mod, "utils", None)
    make = getattr(utils, "create_softcap_scoremod", None)
    if make is not None and not getattr(make, "_fa4aot_record", False):

        def softcap_scoremod(value: Any, *a: Any, **kw: Any) -> Any:
            _state.softcap = float(value)  # the value FA4 bakes in; its key holds only a hash
            return make(value, *a, **kw)

        softcap_scoremod._fa4aot_record = True  # type: ignore[attr-defined]
        utils.create_softcap_scoremod = softcap_scoremod


class _Finder(importlib.abc.MetaPathFinder):
    """Patches FA4's interface module right after it is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Hook FA4 in this interpreter (now if it is already imported, else at its import)."""
    if TARGET_MODULE in sys.modules:
        patch(sys.modules[TARGET_MODULE])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


# ---- the generated sitecustomize: which processes are recorded (see the module doc) ------------


def write_sitecustomize(hook_dir: str | os.PathLike[str]) -> None:
    """Write the ``sitecustomize.py`` that ``fa4aot record`` puts first on the workload's
    ``PYTHONPATH``: it loads this file by path and runs :func:`site_main`."""
    source = (
        f'"""Generated by fa4aot record: see {__name__}."""\n\n'
        "import importlib.util\n\n"
        f"_spec = importlib.util.spec_from_file_location({BOOT_MODULE!r}, {os.path.abspath(__file__)!r})\n"
        "_boot = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_boot)\n"
        "_boot.site_main(__file__)\n"
    )
    with open(os.path.join(hook_dir, f"{SITE_MODULE}.py"), "w") as f:
        f.write(source)


def site_main(site_file: str) -> None:
    """The generated ``sitecustomize`` of the directory holding ``site_file``: take it off this
    process's path, hook FA4 if this process is one the session records (else leave the session
    behind for this process and its children), then run the user's own ``sitecustomize``."""
    hook_dir = os.path.dirname(os.path.abspath(site_file))
    sys.path[:] = [p for p in sys.path if not _same_path(p, hook_dir)]
    marked = _same_path(os.environ.get(HOOK_ENV, ""), hook_dir)
    if marked and _same_path(os.environ.get(PREFIX_ENV, ""), sys.prefix):
        if importlib.util.find_spec("fa4aot") is None:  # the recorder ran from a source tree
            sys.path.append(_PKG_ROOT)  # last: the workload's own modules keep precedence
        try:
            importlib.import_module("fa4aot.tools.record_hook").install()
        except Exception as e:  # recording must never change the workload (its sitecustomize still runs)
            print(f"fa4aot record: cannot hook FA4 in this process: {e}", file=sys.stderr)
    else:
        _leave(hook_dir, drop_session=marked)
    chain_sitecustomize()


def _leave(hook_dir: str, drop_session: bool) -> None:
    """Keep this process's children out of the recording: ``hook_dir`` off ``$PYTHONPATH`` and,
    if ``drop_session`` (the marks are this directory's session), the session's variables."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    kept = [p for p in entries if not (p and _same_path(p, hook_dir))]
    if any(kept):
        os.environ["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        os.environ.pop("PYTHONPATH", None)
    if drop_session:
        for name in SESSION_ENV:
            os.environ.pop(name, None)


def chain_sitecustomize() -> None:
    """Run the ``sitecustomize`` this process would have run without ``fa4aot record``: the first
    one on ``sys.path`` (the generated one has taken itself off it). ``import sitecustomize`` then
    finds the user's module."""
    spec = importlib.machinery.PathFinder.find_spec(SITE_MODULE, sys.path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[SITE_MODULE] = module
    spec.loader.exec_module(module)


def _same_path(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` name the same directory (sys.path entries may be relative or
    reach it through symlinks)."""
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)
