"""``fa4aot verify --rebuild-sample N``: compile N random entries again and compare every blob
byte for byte with what the cache holds. Builds are reproducible (the cache key's inputs fix
the bytes; no path, time or build directory leaks into a blob), so any difference means the
stored blob was not produced by this manifest line and toolchain."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from fa4aot.compile.orchestrate import _pool
from fa4aot.compile.toolchain import fingerprint, host_arch
from fa4aot.compile.worker import build_variant
from fa4aot.core.index import Cache, Entry


@dataclass(frozen=True)
class RebuildResult:
    entry: Entry
    status: str  # "identical", "different", "failed", "skipped"
    detail: str = ""


def rebuild_sample(cache: Cache, n: int, seed: int | None = None) -> list[RebuildResult]:
    """Rebuild ``n`` random entries this toolchain built, for this host arch or one it can build
    and test plans for (others cannot be reproduced here and are not drawn), and compare their
    blobs."""
    from fa4aot.compile.archive import cache_entries
    from fa4aot.compile.emulate import emulation_available

    hosts = {e.host_arch for e in cache_entries(cache)}
    buildable = {h for h in hosts if h == host_arch() or emulation_available(h) is None}
    toolchains = {h: fingerprint(h) for h in buildable}
    pool = [
        e
        for e in cache_entries(cache)
        if e.host_arch in buildable and e.meta.get("toolchain") == toolchains[e.host_arch]
    ]
    rng = random.Random(seed)
    picked = rng.sample(pool, min(n, len(pool)))
    out = []
    for e in picked:
        with _pool(e.target, 1) as ex:
            res = ex.submit(build_variant, e.variant, e.target, e.host_arch).result()
        if not res.ok:
            out.append(RebuildResult(e, "failed", res.error or "the rebuild failed"))
            continue
        diffs = []
        for role, ref in sorted(e.blobs.items()):
            data = res.blobs.get(role)
            if data is None:
                diffs.append(f"{role}: not produced by the rebuild")
            elif hashlib.sha256(data).hexdigest() != ref.sha256:
                diffs.append(f"{role}: rebuilt {len(data)} bytes differ from the stored {ref.size}")
        out.append(RebuildResult(e, "different" if diffs else "identical", "; ".join(diffs)))
    return out
