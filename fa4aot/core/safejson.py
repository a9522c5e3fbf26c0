"""Bounded JSON for everything fa4aot reads from outside its own process: cache records, archive
documents, store indexes, tuning tables, miss and record logs. A hostile or damaged document gets
a typed error naming what it is, never a RecursionError, a MemoryError or a NaN that later code
trips on."""

from __future__ import annotations

import json
from typing import Any

from fa4aot.core.errors import CorruptArtifactError

#: Largest document read by default (a cache record is ~2 KB; a packed index header of 10k
#: entries ~20 MB).
DEFAULT_MAX_BYTES = 64 << 20
#: Deepest nesting accepted (fa4aot's own documents nest at most ~6 levels).
DEFAULT_MAX_DEPTH = 32


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(
    data: str | bytes,
    what: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    error: type[Exception] = CorruptArtifactError,
) -> Any:
    """``json.loads`` with a size cap, a nesting cap and no NaN/Infinity; any failure is raised as
    ``error`` (default :class:`CorruptArtifactError`) with ``what`` (e.g. ``"record 3f2a..."``)."""
    if len(data) > max_bytes:
        raise error(f"{what}: {len(data)} bytes, more than the {max_bytes} a JSON document may have")
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise error(f"{what}: JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{what}: not valid JSON ({e})") from None
    if depth(doc, max_depth) > max_depth:
        raise error(f"{what}: JSON nested deeper than {max_depth} levels")
    return doc


def depth(doc: Any, limit: int) -> int:
    """Nesting depth of a parsed document, counted without recursion and stopping past ``limit``."""
    worst, stack = 0, [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        worst = max(worst, d)
        if worst > limit:
            return worst
        stack.extend((child, d + 1) for child in node if isinstance(child, (dict, list)))
    return worst
