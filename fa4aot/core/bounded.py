"""A dict with a size bound, for the runtime's caches (a long-running server must not grow them
without limit). Lookups are plain ``dict.get`` (the hot path pays nothing); inserting into a full
dict evicts the oldest entry, handing it to ``on_evict`` (e.g. to free device buffers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BoundedDict(dict):
    """``dict`` holding at most ``maxsize`` items; the oldest inserted goes first."""

    def __init__(self, maxsize: int, on_evict: Callable[[Any, Any], None] | None = None):
        super().__init__()
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self.on_evict = on_evict

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self and len(self) >= self.maxsize:
            old = next(iter(self))
            old_value = dict.pop(self, old)
            if self.on_evict is not None:
                self.on_evict(old, old_value)
        dict.__setitem__(self, key, value)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]
