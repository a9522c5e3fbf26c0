"""FA4's own host-side decisions, as code: ``flash_attn/cute/config.py`` (FA4 4.0.0b40 on).

FA4 states its forward and backward configuration choices as host-only Python
(``select_fwd_config``, ``select_bwd_config``, ``validate_*``, the SwapAB policy, the split
heuristics). fa4aot evaluates that module instead of restating it: the build reads it from the
installed FA4 and stores it in the cache as a hash-checked blob, next to the launch plans (it is
FA4's host code, as they are); the runtime loads it from the cache and runs it on each call's
host facts. Nothing here imports FA4, torch or the DSL.

The module is run in a namespace of its own with an import allow-list: the standard-library
modules it uses, and the one FA4 helper it imports lazily (``DynamicPersistentVarlenScheduler``'s
host bound, restated in :mod:`fa4aot.core.fa4_interface`). A new FA4 that imports anything else
fails to load with an error naming the import: the upgrade report lists it.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import linecache
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fa4aot.core.errors import CacheError
from fa4aot.core.variant import sha256_hex

#: Standard-library modules FA4's config.py may import (4.0.0b40: these four).
ALLOWED_IMPORTS = frozenset({"math", "dataclasses", "functools", "typing"})
#: Where the module lives inside the flash-attn-4 distribution.
CONFIG_PATH = ("cute", "config.py")
#: The names fa4aot reads from the module (checked when it loads: a new FA4 that renames one
#: fails here, not in the middle of a call).
REQUIRED = (
    "FwdConfig",
    "FwdHeuristicInputs",
    "select_fwd_config",
    "validate_fwd_config",
    "derive_fwd_config",
    "needs_split_metadata",
    "routes_dynamic_varlen",
    "SWAPAB",
    "BwdConfig",
    "BwdHeuristicInputs",
    "select_bwd_config",
    "validate_bwd_config",
    "Sm90Registers",
    "Sm100Registers",
)


class SelectorError(CacheError):
    """FA4's selector module is missing, damaged or does not load."""


def _fa4_stand_ins() -> dict[str, types.ModuleType]:
    """The FA4 modules config.py imports lazily, served by fa4aot's restatement."""
    from fa4aot.core import fa4_interface

    tile_scheduler = types.ModuleType("flash_attn.cute.tile_scheduler")
    tile_scheduler.DynamicPersistentVarlenScheduler = fa4_interface.DynamicPersistentVarlenScheduler
    return {"flash_attn.cute.tile_scheduler": tile_scheduler}


def load(source: bytes, origin: str) -> types.ModuleType:
    """Run FA4's config.py ``source`` as a fresh module; ``origin`` names it in tracebacks (its
    lines are registered with :mod:`linecache`, so a traceback shows FA4's code)."""
    stand_ins = _fa4_stand_ins()

    def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0):
        if level == 0 and name in ALLOWED_IMPORTS:
            return importlib.import_module(name)
        if level == 0 and name in stand_ins:
            return stand_ins[name]
        raise ImportError(f"FA4's config.py imports {name!r}, which fa4aot does not provide to it ({origin})")

    digest = sha256_hex(source)
    name = f"fa4aot_fa4_config_{digest[:12]}"
    filename = f"<FA4 config.py {digest[:12]} from {origin}>"
    try:
        text = source.decode("utf-8")
        code = compile(text, filename, "exec")
    except (UnicodeDecodeError, SyntaxError, ValueError) as e:
        raise SelectorError(f"FA4's config.py from {origin} does not compile: {e}") from None
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__builtins__ = dict(vars(builtins), __import__=guarded_import)
    # dataclasses looks the defining module up in sys.modules while the class body runs
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except Exception as e:
        sys.modules.pop(name, None)
        raise SelectorError(f"FA4's config.py from {origin} failed to load: {type(e).__name__}: {e}") from None
    missing = [n for n in REQUIRED if not hasattr(module, n)]
    if missing:
        sys.modules.pop(name, None)
        raise SelectorError(f"FA4's config.py from {origin} lacks {missing}: not the module fa4aot was written for")
    module.SOURCE_SHA256 = digest
    return module


def installed_source() -> tuple[bytes, str]:
    """(bytes, path) of the installed FA4's config.py, found without importing flash_attn (which
    would import torch and the DSL)."""
    spec = importlib.util.find_spec("flash_attn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*CONFIG_PATH)
        if path.is_file():
            return path.read_bytes(), str(path)
    raise SelectorError("flash-attn-4 is not installed (no flash_attn/cute/config.py): install the build extra")


_INSTALLED: list[types.ModuleType] = []
_USING: list[types.ModuleType] = []


def installed() -> types.ModuleType:
    """The installed FA4's selector module (build side; loaded once per process), or, inside
    :func:`using`, the module given there."""
    if _USING:
        return _USING[-1]
    if not _INSTALLED:
        source, path = installed_source()
        _INSTALLED.append(load(source, path))
    return _INSTALLED[0]


@contextlib.contextmanager
def using(sel: types.ModuleType) -> Iterator[None]:
    """Within the block, :func:`installed` answers ``sel``: a cache's selector, for a tool that
    decides as the runtime does (``fa4aot tune`` on a GPU machine without flash-attn-4)."""
    _USING.append(sel)
    try:
        yield
    finally:
        _USING.pop()
