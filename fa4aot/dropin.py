"""``fa4aot.patch()`` / ``fa4aot.unpatch()``: FA4's entry points routed to fa4aot, in programs
nobody changed (docs/drop-in.md).

``patch(policy, modules)`` replaces, in each FA4 package root (``flash_attn.cute``, vLLM's
``vllm.vllm_flash_attn.cute``, SGLang's ``sglang.jit_kernel.flash_attention.cute``, or the roots
given), the functions :data:`ENTRY_NAMES` lists in the root and in its ``interface`` module by
wrappers that call fa4aot (:mod:`fa4aot.integrations.flash_attn`). Three ways a caller can hold
one of those functions, and how each is covered:

1. it looks the name up at call time (``interface._flash_attn_fwd(...)``, a function-level
   ``from ... import``, as vLLM's FA4 path does): the module attribute is replaced;
2. its module is imported later: a ``sys.meta_path`` finder wraps the loaders of the FA4 modules,
   so they are patched right after they execute, before anyone can import a name from them;
3. it bound the name earlier (``from flash_attn.cute import flash_attn_varlen_func as fa4``, at
   module level): ``patch()`` scans the globals of every imported module and replaces each
   binding of an original function by its wrapper (``rebind=False`` skips the scan). A reference
   held elsewhere (a closure, a default argument, a dict of backends, a class attribute, a
   ``functools.partial``) is not found.

Each wrapper has its original's exact signature (generated code, no per-call binding): an
argument fa4aot's function takes is passed on by name; one it does not know (a vendored copy's
extra argument) must be at the original's default, else the call is refused like a feature
fa4aot does not build. A call fa4aot cannot serve (:data:`MISSES`: a variant the cache lacks, a
refused argument, no usable cache) follows the policy: ``error`` raises it (the
VariantNotFoundError names the manifest line that builds the variant), ``warn`` logs it once per
distinct reason on the ``fa4aot.patch`` logger and calls FA4's original (JIT) function,
``fallback`` calls the original silently. Fallbacks are counted (``fa4aot.stats()``). While an
original runs, FA4's internal calls to patched names go to FA4 (a thread-local flag).

``patch`` is idempotent (a second call changes only the policy and adds roots), ``unpatch``
puts back every original it replaced (a binding someone else changed since is left alone), and
both hold one lock. With ``$FA4AOT_PATCH`` set (1, error, warn or fallback) the
``fa4aot_patch.pth`` file installed with fa4aot calls :func:`install_from_env` at interpreter
start (docs/drop-in.md); unset, that line costs one environment lookup.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

from fa4aot.core.errors import (
    ArgumentError,
    CacheError,
    DeviceMismatchError,
    VariantNotFoundError,
)

POLICIES = ("error", "warn", "fallback")
#: FA4's package roots: the PyPI package and the copies engines vendor.
DEFAULT_ROOTS = ("flash_attn.cute", "vllm.vllm_flash_attn.cute", "sglang.jit_kernel.flash_attention.cute")
#: Per module of a root ("" the root package itself), the names routed to fa4aot.
ENTRY_NAMES: dict[str, tuple[str, ...]] = {
    "": ("flash_attn_func", "flash_attn_varlen_func"),
    "interface": (
        "flash_attn_func",
        "flash_attn_varlen_func",
        "_flash_attn_fwd",
        "_flash_attn_bwd",
        "get_scheduler_metadata",
        "_get_scheduler_metadata",
        "_flash_attn_fwd_combine",
    ),
}
#: What fa4aot cannot serve (the policy decides): a variant the cache lacks (or holds only as
#: another fa4aot's build), an argument or feature fa4aot refuses, no usable cache, a cache for
#: another GPU. Launch and plan failures are faults, raised whatever the policy.
MISSES = (VariantNotFoundError, ArgumentError, CacheError, DeviceMismatchError)
#: Distinct (function, reason) pairs the warn policy logs before it stops remembering them.
MAX_WARNED = 1024

_LOCK = threading.RLock()
_COUNT_LOCK = threading.Lock()
_local = threading.local()
#: the policy of the active patch (None: not patched); wrappers read it on a miss
_policy: str | None = None
_roots: tuple[str, ...] = ()
#: module names the import hook watches (a root and its interface)
_watched: frozenset[str] = frozenset()
_finder: _Finder | None = None
#: (id of a namespace dict, name) -> (namespace, name, wrapper, original), in the order applied
_bindings: dict[tuple[int, str], tuple[dict[str, Any], str, Callable[..., Any], Callable[..., Any]]] = {}
#: id(original) -> its wrapper (the wrapper keeps the original alive, so ids stay unique)
_wrappers: dict[int, Callable[..., Any]] = {}
_fallbacks: dict[str, int] = {}
_warned: set[tuple[str, str]] = set()


def _log() -> Any:
    from fa4aot.core import logs

    return logs.get("fa4aot.patch")


# -- public API -------------------------------------------------------------------------------


def patch(policy: str = "error", modules: Iterable[str] | None = None, *, rebind: bool = True) -> None:
    """Route FA4's entry points to fa4aot (see the module docstring). ``policy``: ``"error"``,
    ``"warn"`` or ``"fallback"``; ``modules``: FA4 package roots (default :data:`DEFAULT_ROOTS`);
    ``rebind``: also replace names other modules imported from them before this call."""
    if policy not in POLICIES:
        raise ArgumentError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    roots = tuple(DEFAULT_ROOTS if modules is None else _roots_of(modules))
    global _policy, _roots, _watched, _finder
    with _LOCK:
        _policy = policy
        _roots = tuple(dict.fromkeys((*_roots, *roots)))
        _watched = frozenset(f"{r}.{sub}" if sub else r for r in _roots for sub in ENTRY_NAMES)
        if _finder is None:
            _finder = _Finder()
            sys.meta_path.insert(0, _finder)
        for name in sorted(_watched):
            module = sys.modules.get(name)
            if module is not None:
                _patch_module(module)
        if rebind:
            _rebind()


def unpatch() -> None:
    """Undo :func:`patch`: remove the import hook and put every original back where a wrapper
    of it still is. A no-op when nothing is patched."""
    global _policy, _roots, _watched, _finder
    with _LOCK:
        if _finder is not None:
            try:
                sys.meta_path.remove(_finder)
            except ValueError:
                pass  # someone else took it out
            _finder = None
        for ns, name, wrapper, original in reversed(list(_bindings.values())):
            if ns.get(name) is wrapper:
                ns[name] = original
        # names bound while patched (a module imported after patch() took the wrapper)
        _scan_modules({id(w): (w, w.__fa4aot_original__) for w in _wrappers.values()}, record=False)
        _bindings.clear()
        _wrappers.clear()
        _policy, _roots, _watched = None, (), frozenset()


def is_patched() -> bool:
    """Whether a patch is active."""
    return _policy is not None


def policy() -> str | None:
    """The active patch's policy (None: not patched)."""
    return _policy


def fallback_counts() -> dict[str, int]:
    """Calls handed to FA4's original functions, per function (``module.name``), since start."""
    with _COUNT_LOCK:
        return dict(_fallbacks)


def install_from_env(value: str | None = None) -> bool:
    """The ``$FA4AOT_PATCH`` switch (read by the ``fa4aot_patch.pth`` hook at interpreter start):
    ``1`` means the ``error`` policy; ``error``, ``warn``, ``fallback`` name one; ``0`` or unset
    patches nothing. ``$FA4AOT_PATCH_MODULES`` (comma-separated) adds package roots. An invalid
    value warns on stderr and patches nothing (a ``.pth`` line must not stop the interpreter).
    Returns whether it patched."""
    from fa4aot.core import env

    raw = (env.get(env.PATCH) if value is None else value) or ""
    raw = raw.strip().lower()
    if raw in ("", "0"):
        return False
    chosen = "error" if raw == "1" else raw
    if chosen not in POLICIES:
        sys.stderr.write(f"fa4aot: ${env.PATCH}={raw!r} is not 1, error, warn or fallback; FA4 is not patched\n")
        return False
    extra = [m.strip() for m in (env.get(env.PATCH_MODULES) or "").split(",") if m.strip()]
    patch(chosen, (*DEFAULT_ROOTS, *extra))
    return True


def _roots_of(modules: Iterable[str]) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    out = []
    for m in modules:
        if not isinstance(m, str) or not m or not all(part.isidentifier() for part in m.split(".")):
            raise ArgumentError(f"modules: expected dotted module names, got {m!r}")
        out.append(m)
    return out


# -- patching modules --------------------------------------------------------------------------


def _patch_module(module: types.ModuleType) -> None:
    """Replace the routed names of one FA4 module (under _LOCK)."""
    sub = next((s for s in ENTRY_NAMES if s and module.__name__.endswith("." + s)), "")
    ns = module.__dict__
    for name in ENTRY_NAMES[sub]:
        current = ns.get(name)
        if current is None or not callable(current):
            continue  # this copy has no such function
        key = (id(ns), name)
        if key in _bindings:
            continue
        original = getattr(current, "__fa4aot_original__", None)
        if original is not None:  # bound from a module patched before it (interface -> root)
            _bindings[key] = (ns, name, current, original)
            continue
        wrapper = _wrapper_for(name, current)
        if wrapper is not None:
            ns[name] = wrapper
            _bindings[key] = (ns, name, wrapper, current)


def _rebind() -> None:
    """Replace, in every imported module's globals, each binding of a patched original by its
    wrapper (names imported before patching). Under _LOCK."""
    _scan_modules({id(original): (original, wrapper) for _, _, wrapper, original in _bindings.values()}, record=True)


def _scan_modules(replace: dict[int, tuple[Any, Any]], *, record: bool) -> None:
    """In every imported module's globals, replace each value ``old`` of ``replace`` (id(old) ->
    (old, new)) by ``new``; ``record``: remember the binding for unpatch. Under _LOCK."""
    if not replace:
        return
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or str(getattr(module, "__name__", "")).startswith("fa4aot"):
            continue  # fa4aot's own tools call FA4 itself on purpose (record, verify --against-fa4)
        ns = module.__dict__
        for name, value in list(ns.items()):
            hit = replace.get(id(value))
            if hit is not None and hit[0] is value and (id(ns), name) not in _bindings:
                ns[name] = hit[1]
                if record:
                    _bindings[(id(ns), name)] = (ns, name, hit[1], value)


def _wrapper_for(name: str, original: Callable[..., Any]) -> Callable[..., Any] | None:
    """The wrapper of ``original`` (made once), or None (logged) when its signature cannot be
    routed: fa4aot's function needs an argument the original does not have."""
    wrapper = _wrappers.get(id(original))
    if wrapper is not None:
        return wrapper
    from fa4aot import _dropin_codegen
    from fa4aot.integrations import flash_attn as adapters

    qualname = f"{getattr(original, '__module__', '?')}.{getattr(original, '__qualname__', name)}"
    try:
        wrapper = _dropin_codegen.make_wrapper(
            qualname,
            original,
            adapters.ENTRY_POINTS[name],
            result=_dropin_codegen.result_adapter(name, original),
            fixup=adapters.drop_fa4aot_metadata if name in FIXED_UP else None,
            on_miss=_on_miss,
            local=_local,
            misses=MISSES,
        )
    except _dropin_codegen.CannotRoute as e:
        _log().warning("%s is not routed to fa4aot: %s", qualname, e)
        return None
    _wrappers[id(original)] = wrapper
    return wrapper


#: Entry points whose FA4 original cannot take a fa4aot.SchedulerMetadata (dropped on fallback).
FIXED_UP = frozenset({"flash_attn_varlen_func", "_flash_attn_fwd"})


def _on_miss(qualname: str, error: BaseException, call_original: Callable[[], Any]) -> Any:
    """A call fa4aot could not serve: raise, or warn and fall back, or fall back (the policy)."""
    pol = _policy or "error"
    if pol == "error":
        if hasattr(error, "add_note"):
            error.add_note(
                f"(fa4aot.patch: {qualname} was routed to fa4aot with the 'error' policy; build the variant, or "
                "patch with policy 'warn' or 'fallback' to run FA4's JIT function instead)"
            )
        raise error
    reason = f"{type(error).__name__}: {error}"
    with _COUNT_LOCK:
        _fallbacks[qualname] = _fallbacks.get(qualname, 0) + 1
        first = (qualname, reason) not in _warned
        if first and len(_warned) < MAX_WARNED:
            _warned.add((qualname, reason))
    if pol == "warn" and first:
        _log().warning("%s: fa4aot cannot serve this call, running FA4's JIT function: %s", qualname, reason)
    depth = _local.__dict__.get("in_fa4", 0)
    _local.in_fa4 = depth + 1  # FA4's own calls to patched names, from inside it, stay FA4's
    try:
        return call_original()
    finally:
        _local.in_fa4 = depth


# -- the import hook ---------------------------------------------------------------------------


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched FA4 module it asks the finders after it and wraps the
    loader of the spec they return, so the module is patched right after it executes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _watched or fullname in _local.__dict__.setdefault("finding", set()):
            return None  # not FA4's, or a finder asked below is asking the import system again
        _local.finding.add(fullname)
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _local.finding.discard(fullname)
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module") and not isinstance(loader, _PatchingLoader):
            spec.loader = _PatchingLoader(loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """A loader that runs another, then patches the module it made (while a patch is active)."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec) if hasattr(self._loader, "create_module") else None

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        with _LOCK:
            if _policy is not None and module.__name__ in _watched:
                _patch_module(module)

    def __getattr__(self, attr: str) -> Any:  # get_source, is_package, get_resource_reader, ...
        return getattr(self._loader, attr)


# -- the .pth switch, for installs that do not carry it -------------------------------------------

#: The file the wheel installs into site-packages, and its one line (fa4aot/_build_pth.py writes it
#: at build time; tests check the two agree). ``site`` executes a ``.pth`` line starting with import.
PTH_NAME = "fa4aot_patch.pth"
PTH_LINE = (
    'import os; os.environ.get("FA4AOT_PATCH", "0").strip() not in ("", "0") and __import__("fa4aot._pth_hook")\n'
)


def pth_path(site_dir: str | None = None) -> str:
    """Where the ``.pth`` file goes: ``site_dir``, else this interpreter's purelib (site-packages)."""
    import os
    import sysconfig

    return os.path.join(site_dir or sysconfig.get_paths()["purelib"], PTH_NAME)


def main(argv: list[str] | None = None) -> int:
    """``python -m fa4aot.dropin install-pth|remove-pth|status [--site-dir DIR]``: an editable
    install (``pip install -e .``) does not carry the wheel's ``.pth`` file; this writes it."""
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m fa4aot.dropin", description=main.__doc__)
    ap.add_argument("action", choices=("install-pth", "remove-pth", "status"))
    ap.add_argument("--site-dir", help="a site directory (default: this interpreter's site-packages)")
    args = ap.parse_args(argv)
    path = pth_path(args.site_dir)
    if args.action == "install-pth":
        with open(path, "w") as f:
            f.write(PTH_LINE)
        print(f"wrote {path}: set FA4AOT_PATCH=1 (or error, warn, fallback) to route FA4 to fa4aot")
    elif args.action == "remove-pth":
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}")
        else:
            print(f"{path} does not exist")
    else:
        state = "installed" if os.path.exists(path) else "not installed"
        print(f"{path}: {state}; patched in this process: {is_patched()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
