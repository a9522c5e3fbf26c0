"""The device's tuning table as the runtime applies it (``fa4aot tune`` writes it): which tuned
choice replaces FA4's for a default variant and a shape bucket. A corrupt, foreign or stale table or
entry never changes dispatch: it is skipped with one warning and FA4's choice stands."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from fa4aot.core.errors import Fa4aotError
from fa4aot.core.index import read_regular
from fa4aot.core.tuning import (
    MAX_TABLE_BYTES,
    TuningEntry,
    TuningTable,
    TuningTableError,
    result_class_difference,
)

#: Directory of a cache holding tuning tables (one per target and device name).
TUNING_DIR = "tuning"
#: Largest tuning table read (a table is a few KB; a bigger file is not one).
MAX_TUNING_BYTES = MAX_TABLE_BYTES


class TunedChoices(dict):
    """One default variant's tuned choices (shape bucket -> chosen variant id), as the forward
    dispatch reads them (``lv.tuned.get(bucket)``). A choice is loaded on its first use here, so a
    choice that cannot load (a damaged blob or record) is dropped with one warning and the call
    gets FA4's choice, instead of every call of its bucket failing."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Any, choices: dict[tuple, str]):
        super().__init__(choices)
        self._runtime = runtime

    def get(self, key: Any, default: Any = None) -> Any:
        """The chosen variant id for ``key`` (loaded), or ``default``."""
        vid = dict.get(self, key)
        if vid is None:
            return default
        if vid in self._runtime._loaded:  # the per-call path: already loaded
            return vid
        return self._load(vid) or default

    def _load(self, vid: str) -> str | None:
        """Load a tuned choice on its first use; ``vid`` when it loads, else None after dropping it
        from every tuned lookup with one warning (the call and later ones get FA4's choice)."""
        rt = self._runtime
        try:
            rt._load_id(vid)
            return vid
        except (Fa4aotError, OSError) as e:
            with rt._lock:
                dropped = not any(vid in m.values() for m in rt.tuning.values())
                for m in rt.tuning.values():
                    for b in [b for b, c in m.items() if c == vid]:
                        del m[b]
            if not dropped:  # another thread may have failed on it at the same time
                warnings.warn(
                    f"tuning table {rt.tuning_path()}: the tuned choice {vid} cannot be loaded ({e}); "
                    "using FA4's choice for its buckets",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return None


def open_tuning(rt: Any) -> tuple[TuningTable | None, dict[str, TunedChoices]]:
    """Read the device's tuning table if there is one. A corrupt, foreign or stale table (or
    entry) never changes dispatch: it is skipped with one warning, and FA4's choice stands."""
    path = rt.tuning_path()
    try:
        table = _read(rt, path)
        if table is None:
            return None, {}
        usable, stale = [], []
        for e in table.entries:
            why = _entry_problem(rt, e)
            (stale if why else usable).append((e, why))
    except (Fa4aotError, OSError) as e:
        warnings.warn(f"tuning table {path} ignored: {e}; using FA4's dispatch", stacklevel=3)
        return None, {}
    if stale:
        e, why = stale[0]
        warnings.warn(
            f"tuning table {path}: {len(stale)} of {len(table.entries)} entries ignored (stale: "
            f"e.g. {e.default} -> {e.choice}: {why}); rerun `fa4aot tune` after rebuilding",
            stacklevel=3,
        )
    choices = table.lookup_map(e for e, _ in usable)
    return table, {vid: TunedChoices(rt, buckets) for vid, buckets in choices.items()}


def _read(rt: Any, path: Path) -> TuningTable | None:
    """The device's table (None: there is none); TuningTableError or OSError when it is damaged,
    foreign or unreadable."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None
    if size > MAX_TUNING_BYTES:
        raise TuningTableError(f"{size} bytes, more than {MAX_TUNING_BYTES}")
    table = TuningTable.from_bytes(read_regular(rt.cache.root, (TUNING_DIR, path.name), size))
    t = rt.target
    if (table.arch, table.num_sms, table.device_name) != (t.arch, t.num_sms, rt.info.name):
        raise TuningTableError(
            f"made for {table.device_name} ({table.arch}, {table.num_sms} SMs), this is "
            f"{rt.info.name} ({t.arch}, {t.num_sms} SMs)"
        )
    return table


def _entry_problem(rt: Any, e: TuningEntry) -> str | None:
    """Why this runtime cannot honour a tuning entry (None: it can)."""
    for vid in (e.default, e.choice):
        if vid not in rt.index:
            return f"the cache has no variant {vid}"
    try:
        de, ce = rt.index.entry(e.default), rt.index.entry(e.choice)
        for want, entry in zip(e.cubins, (de, ce)):
            if want and (entry.cubin is None or entry.cubin.sha256 != want):
                return f"variant {entry.variant_id} was rebuilt (another cubin) since it was measured"
    except (Fa4aotError, KeyError, TypeError, ValueError) as err:
        # a damaged record of one variant disables only the entries naming it
        return f"an index record it names is damaged ({err})"
    d, c = de.variant, ce.variant
    if d.family != c.family:
        return "the two variants are of different families"
    return result_class_difference(d.family, d.fields, c.fields)
