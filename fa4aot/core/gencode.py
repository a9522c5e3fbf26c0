"""Generated Python (launchers, packers, prepared calls) that keeps its source: each text is
compiled under a name a traceback or profile shows (``<fa4aot launch abc123def456>``) and
registered with :mod:`linecache`, so the generated line appears instead of ``<string>``."""

from __future__ import annotations

import hashlib
import linecache
from collections import OrderedDict
from typing import Any

#: Generated sources kept in linecache at once (one per distinct launcher or prepared call; a
#: few KB each). The oldest is dropped past this, as any long-running cache here is bounded.
MAX_SOURCES = 512
_registered: OrderedDict[str, None] = OrderedDict()


def run(source: str, scope: dict[str, Any], kind: str, names: dict[str, Any] | None = None) -> None:
    """Execute ``source`` (a generated module body) with globals ``scope``, under a linecache'd
    name; ``names``: where its top-level definitions go (default: ``scope``)."""
    filename = f"<fa4aot {kind} {hashlib.sha256(source.encode()).hexdigest()[:12]}>"
    code = compile(source, filename, "exec")
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _registered[filename] = None
    _registered.move_to_end(filename)
    while len(_registered) > MAX_SOURCES:
        linecache.cache.pop(_registered.popitem(last=False)[0], None)
    exec(code, scope, scope if names is None else names)  # noqa: S102 - fa4aot's own generated code, from recorded signatures and bound calls
