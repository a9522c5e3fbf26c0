"""What several benchmarks share: host time per call, and the bar chart of it. Standard library
only at import (a benchmark run as ``python benchmarks/NAME.py`` finds this module by name: the
script's folder is first on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_us(
    fn: Callable[[], object],
    inner: int,
    repeats: int,
    *,
    warmup: int,
    sync: Callable[[], object] | None = None,
    before_batch: Callable[[], object] | None = None,
) -> float:
    """Median host microseconds per call of ``fn``: ``warmup`` calls, then ``repeats`` batches of
    ``inner`` back-to-back calls, each batch timed on its own. ``before_batch`` (e.g. a sleep
    kernel that keeps the GPU busy) runs before each batch, and ``sync`` after the warm-up and
    after each batch (draining the queue), both outside the timed region."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    per = []
    for _ in range(repeats):
        if before_batch is not None:
            before_batch()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        per.append((time.perf_counter() - t0) / inner * 1e6)
        if sync is not None:
            sync()
    return statistics.median(per)


def medians_interleaved(
    fns: dict[str, Callable[[], object]],
    inner: int,
    repeats: int,
    *,
    warmup: int,
    sync: Callable[[], object] | None = None,
    before_batch: Callable[[], object] | None = None,
) -> dict[str, float]:
    """:func:`median_us` of several rows at once, interleaved: each repeat times one batch of
    every row, starting one row later each time, so a noisy host's slow spells fall on every
    row alike and the rows' ratios hold within a repeat's span."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if sync is not None:
        sync()
    per: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            fn = fns[name]
            if before_batch is not None:
                before_batch()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            per[name].append((time.perf_counter() - t0) / inner * 1e6)
            if sync is not None:
                sync()
    return {name: statistics.median(per[name]) for name in names}


def plot_host_us(path: str, rows: dict[str, float], colors: list[str], title: str, figsize: tuple[float, float]):
    """A horizontal bar per row (the first at the bottom), in host microseconds per call, saved
    to ``path`` (PNG, 120 dpi)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    ax.barh(list(rows), list(rows.values()), color=colors)
    ax.set_xlabel("host microseconds per call (median)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
