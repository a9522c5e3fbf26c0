"""``fa4aot.stats()`` / ``Runtime.stats()``: what a runtime has done, from counters it keeps anyway.

The counters are plain integers the runtime adds to where each event happens (loading a variant,
a lookup the cache answers or cannot, a launch): reading them costs nothing on the launch path.

- ``loads``: variants loaded (read, hash-checked, cubin and plan loaded) by this runtime.
- ``hits``: variant lookups the cache answered (a dispatch decision for a new shape, a combine,
  backward or prepare pick); a repeated shape is served from the dispatch memo without a lookup.
- ``misses``: lookups of a variant the cache lacks (each raised VariantNotFoundError naming the
  manifest line that builds it).
- ``refused``: entries the cache holds that this runtime will not load: built by another fa4aot,
  for another host CPU, or for a newer CUDA driver.
- ``invalid``: entries that failed verification while loading (a hash mismatch, a malformed
  record, a plan that does not load).
- ``launches``: successful launches (one foreign call each: FA4's host code, then its kernel),
  per variant family (``fwd_sm90``, ``combine``, ``prepare``, ``bwd_sm100``, ...).
- ``patch_fallbacks``: calls :func:`fa4aot.patch` handed to FA4's own (JIT) function under the
  ``warn`` or ``fallback`` policy, per FA4 function; process-wide.
- ``fast_calls``: plain calls launched from their prepared form (``fa4aot/runtime/fastpath.py``).
- ``decisions_traced`` / ``decisions_reused``: new call shapes whose forward decision was traced
  into a region of FA4's selection, and new shapes a region answered
  (``fa4aot/runtime/regions.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RuntimeStats:
    """A snapshot of a runtime's counters (see the module docstring for each field's meaning)."""

    loads: int = 0
    hits: int = 0
    misses: int = 0
    refused: int = 0
    invalid: int = 0
    launches: Mapping[str, int] = field(default_factory=dict)
    patch_fallbacks: Mapping[str, int] = field(default_factory=dict)
    fast_calls: int = 0
    decisions_traced: int = 0
    decisions_reused: int = 0

    @property
    def total_launches(self) -> int:
        """Launches of every family."""
        return sum(self.launches.values())

    @property
    def total_fallbacks(self) -> int:
        """Calls handed to FA4's JIT functions by the drop-in patch."""
        return sum(self.patch_fallbacks.values())

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-able values."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        # the per-family and per-function counts may be any Mapping: copied into plain dicts
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}


def patch_fallbacks() -> dict[str, int]:
    """The drop-in patch's fallback counts, when it was ever imported (it is never imported here:
    the runtime must not pay for it)."""
    mod = sys.modules.get("fa4aot.dropin")
    return mod.fallback_counts() if mod is not None else {}


def collect(rt: Any) -> RuntimeStats:
    """The counters of ``rt`` (a :class:`fa4aot.runtime.loader.Runtime`) now."""
    launches: dict[str, int] = {}
    for lv in list(rt._loaded.values()):  # list(): a snapshot, other threads may be loading
        n = lv.plan.launches
        if n:
            family = lv.variant.family
            launches[family] = launches.get(family, 0) + n
    # the caches runtime.fastpath and runtime.forward keep (loader.api_cache), where used yet
    calls = rt.api_caches.get("fast_calls")
    rules = rt.api_caches.get("forward_rules") or {}
    regions = [r.regions for r in list(rules.values()) if r.regions is not None]
    return RuntimeStats(
        fast_calls=calls.hits if calls is not None else 0,
        decisions_traced=sum(r.traces for r in regions),
        decisions_reused=sum(r.reuses for r in regions),
        loads=rt._stat_loads,
        hits=rt._stat_hits,
        misses=rt._stat_misses,
        refused=rt._stat_refused,
        invalid=rt._stat_invalid,
        launches=dict(sorted(launches.items())),
        patch_fallbacks=patch_fallbacks(),
    )
