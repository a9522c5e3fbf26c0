"""Installed by ``fa4aot record`` into the workload's interpreter (through a generated
``sitecustomize``): when ``flash_attn.cute.interface`` is imported, its forward, combine and
scheduler-metadata JIT caches are wrapped so that every compile key FA4 looks up is appended, as
JSON, to ``$FA4AOT_RECORD``. Lookups and results are unchanged: the wrapper only reads the key.

The key's element names come from FA4's own source (the ``compile_key = (...)`` tuple of each
function), so the record says ``{"causal": true, "cu_seqlens_q is None": false, ...}`` and the
mapping to fa4aot's variant fields (:mod:`fa4aot.tools.record`) does not depend on positions.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import sys
import textwrap
import threading
from typing import Any

RECORD_ENV = "FA4AOT_RECORD"
TARGET_MODULE = "flash_attn.cute.interface"
#: FA4 function -> the kind of kernel its cache compiles.
HOOKED = {"_flash_attn_fwd": "fwd", "_flash_attn_fwd_combine": "combine", "_get_scheduler_metadata": "prepare"}

_state = threading.local()
_lock = threading.Lock()
_seen: set[str] = set()


def key_names(fn: Any) -> list[str]:
    """Source text of each element of the first ``compile_key``/``cache_key`` tuple in ``fn``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("compile_key", "cache_key")
            and isinstance(node.value, ast.Tuple)
        ):
            return [ast.unparse(e) for e in node.value.elts]
    raise LookupError(f"no compile key tuple in {fn.__name__}")


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return str(v)


class RecordingCache:
    """A JIT cache that appends each distinct key it is asked about to the record file."""

    def __init__(self, inner: Any, kind: str, names: list[str], arch: Any):
        self._inner, self._kind, self._names, self._arch = inner, kind, names, arch

    def _record(self, key: Any) -> None:
        if not isinstance(key, tuple) or len(key) != len(self._names):
            return
        rec = {"fa4": self._kind, "key": dict(zip(self._names, map(_plain, key)))}
        if self._kind == "fwd":
            rec["softcap"] = getattr(_state, "softcap", None)
            _state.softcap = None
        if self._kind == "prepare":
            rec["device_arch"] = _plain(self._arch())
        line = json.dumps(rec, sort_keys=True)
        with _lock:
            if line in _seen:
                return
            _seen.add(line)
        path = os.environ.get(RECORD_ENV)
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)

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


def patch(mod: Any) -> None:
    """Wrap the JIT caches of FA4's interface module ``mod``."""
    arch = getattr(mod, "_get_device_arch", lambda: None)
    for fname, kind in HOOKED.items():
        fn = getattr(mod, fname, None)
        if fn is None or not hasattr(fn, "compile_cache") or isinstance(fn.compile_cache, RecordingCache):
            continue
        fn.compile_cache = RecordingCache(fn.compile_cache, kind, key_names(fn), arch)
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
