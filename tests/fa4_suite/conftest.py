"""FA4's own test file (test_flash_attn.py, fetched by fetch.py, see README.md) run against FA4 or, with ``FA4AOT_PATCH``,
against fa4aot's drop-in. Opt-in: without ``FA4AOT_FA4_SUITE=1`` the file is one skipped item (it
holds some 415,000 parametrized cases and needs a GPU, or FA4's fake-tensor mode).

With ``FA4AOT_FA4_SUITE=1``:

* ``FA4AOT_PATCH`` (1, error, warn, fallback): ``fa4aot.dropin.install_from_env()`` runs here,
  before the test module imports ``flash_attn.cute`` (for a machine without fa4aot's .pth file).
  ``1`` is the drop-in's ``error`` policy: a call fa4aot cannot serve fails its test, saying why.
* Every FA4 JIT compile is counted: ``flash_attn.cute.cache_utils.JITCache.__setitem__`` (every
  ``compile_cache[key] = ...`` of FA4's interface), per function, and ``cutlass.cute.compile``
  calls. With ``FA4SUITE_COUNTS=PREFIX`` each pytest process (xdist workers too) writes
  ``PREFIX-<worker>.json``: the counts, FA4's probe misses under ``fa4aot record --no-compile``, and
  ``fa4aot.stats()`` in a patched run.
* ``FA4SUITE_CASES=path``: only the cases listed there (``test_name[id]`` lines, ``#`` comments)
  are collected (the rest are never generated); ``FA4SUITE_SHARD=k/n`` keeps every n-th from the k-th.
* No CUDA device (a CPU box): ``torch.cuda.get_device_capability`` answers the arch of
  ``FLASH_ATTENTION_ARCH`` (default sm_90a), ``torch.cuda.empty_cache`` / ``synchronize`` do
  nothing, and FA4 sees ``FLASH_ATTENTION_NUM_SMS`` SMs, so the module collects and, in FA4's
  fake-tensor mode (``FLASH_ATTENTION_FAKE_TENSOR=1``), its tests call FA4 on fake tensors: what
  record.sh records (FA4's backward is then recorded, not run, by ``fa4aot record --no-compile``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

ENABLED = os.environ.get("FA4AOT_FA4_SUITE") == "1"

if ENABLED:
    _patch = os.environ.get("FA4AOT_PATCH", "")
    if _patch not in ("", "0"):
        import fa4aot.dropin

        if not fa4aot.dropin.install_from_env():
            raise pytest.UsageError(f"FA4AOT_PATCH={_patch!r}: fa4aot.dropin did not patch (see stderr)")

    import torch

    if not torch.cuda.is_available():
        _arch = os.environ.get("FLASH_ATTENTION_ARCH", "sm_90a").removeprefix("sm_").rstrip("af")
        _cc = (int(_arch[:-1]), int(_arch[-1]))
        torch.cuda.get_device_capability = lambda device=None: _cc
        torch.cuda.empty_cache = lambda: None
        torch.cuda.synchronize = lambda device=None: None
        if os.environ.get("FLASH_ATTENTION_NUM_SMS"):  # FA4 asks cutlass for the SM count while tracing
            from fa4aot_kernels.common import install_target_hardware

            install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))


#: FA4 compiles seen in this process: cache name -> count (and the total of cute.compile calls)
COMPILES: Counter[str] = Counter()
_lock = threading.Lock()


def _count_compiles() -> None:
    """Count every kernel FA4's interface compiles (module-level caches and cute.compile)."""
    import cutlass.cute as cute
    from flash_attn.cute import cache_utils
    from flash_attn.cute import interface as fa4

    names = {}
    for fname, fn in vars(fa4).items():
        inner = getattr(fn, "__wrapped__", fn)
        cache = getattr(inner, "compile_cache", None) or getattr(fn, "compile_cache", None)
        cache = getattr(cache, "_inner", cache)  # fa4aot record's RecordingCache wraps FA4's
        if isinstance(cache, cache_utils.JITCache):
            names[id(cache)] = fname

    original_set = cache_utils.JITCache.__setitem__
    if not getattr(original_set, "_fa4suite", False):

        def setitem(self, key, fn):  # JITPersistentCache.__setitem__ calls JITCache.__setitem__: once each
            with _lock:
                COMPILES["setitem:" + names.get(id(self), "other")] += 1
            return original_set(self, key, fn)

        setitem._fa4suite = True
        cache_utils.JITCache.__setitem__ = setitem

    original_compile = cute.compile
    if not getattr(original_compile, "_fa4suite", False):

        class CountingCompile:
            """cute.compile counted; ``cute.compile[...]`` (options) still works."""

            _fa4suite = True

            def __call__(self, *a, **kw):
                with _lock:
                    COMPILES["cute.compile"] += 1
                return original_compile(*a, **kw)

            def __getitem__(self, item):
                inner = original_compile[item]

                def call(*a, **kw):
                    with _lock:
                        COMPILES["cute.compile"] += 1
                    return inner(*a, **kw)

                return call

            def __getattr__(self, name):
                return getattr(original_compile, name)

        cute.compile = CountingCompile()


def pytest_configure(config):
    if not ENABLED:
        return
    if not (Path(__file__).parent / "test_flash_attn.py").exists():
        # FA4's file is fetched, not committed: say how to get it rather than run nothing
        pytest.exit("FA4AOT_FA4_SUITE=1 but FA4's test file is absent: python tests/fa4_suite/fetch.py", returncode=4)
    _count_compiles()


class _Gated(pytest.File):
    """FA4's test file while the suite is off: one item, skipped with the reason."""

    def collect(self):
        yield _GateItem.from_parent(self, name="fa4_suite")


class _GateItem(pytest.Item):
    def runtest(self):
        pytest.skip("FA4's own test suite (tests/fa4_suite/README.md): set FA4AOT_FA4_SUITE=1 to run it")

    def reportinfo(self):
        return self.path, None, "fa4_suite (off)"


def pytest_pycollect_makemodule(module_path, parent):
    if not ENABLED and module_path.name == "test_flash_attn.py":
        return _Gated.from_parent(parent, path=module_path)
    return None


def _listed_cases() -> dict[str, set[str]] | None:
    """FA4SUITE_CASES: test function name -> the parametrization ids listed ("" for a plain test)."""
    path = os.environ.get("FA4SUITE_CASES")
    if not path:
        return None
    out: dict[str, set[str]] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split("::")[-1]
        fn, _, rest = name.partition("[")
        out.setdefault(fn, set()).add(rest[:-1] if rest else "")
    return out


_WANTED = _listed_cases() if ENABLED else None


def pytest_pycollect_makeitem(collector, name, obj):
    """A test function no case of FA4SUITE_CASES names is not collected at all (the file has
    some 415,000 cases: generating them all takes a minute)."""
    if _WANTED is not None and name.startswith("test_") and callable(obj) and name not in _WANTED:
        return []
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_generate_tests(metafunc):
    """Keep only the listed parametrizations of a listed function (before items are made)."""
    yield
    if _WANTED is None:
        return
    ids = _WANTED.get(metafunc.function.__name__)
    calls = getattr(metafunc, "_calls", None)
    if ids is None or not calls or not all(hasattr(c, "id") for c in calls):
        return  # pytest_collection_modifyitems still deselects what is not listed
    metafunc._calls = [c for c in calls if c.id in ids]


def pytest_collection_modifyitems(session, config, items):
    if _WANTED is None:
        return
    keep, drop, seen = [], [], set()
    for item in items:
        fn, _, rest = item.name.partition("[")
        ident = rest[:-1] if rest else ""
        if ident in _WANTED.get(fn, ()):
            keep.append(item)
            seen.add((fn, ident))
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    missing = sorted(f"{fn}[{i}]" for fn, ids in _WANTED.items() for i in ids if (fn, i) not in seen)
    if missing:
        raise pytest.UsageError(f"FA4SUITE_CASES lists {len(missing)} cases the file does not have: {missing[:5]}")
    shard = os.environ.get("FA4SUITE_SHARD")  # "k/n": every n-th listed case from the k-th (0-based)
    if shard:
        k, n = (int(x) for x in shard.split("/"))
        drop = [it for i, it in enumerate(items) if i % n != k]
        items[:] = [it for i, it in enumerate(items) if i % n == k]
        config.hook.pytest_deselected(items=drop)


def _probe_misses() -> dict[str, int] | None:
    """Under FA4's ``_compile_misses`` probe: the kernels FA4 skipped compiling, per function."""
    fa4 = sys.modules.get("flash_attn.cute.interface")
    probe = getattr(fa4, "_compile_misses", None)
    misses = probe.get() if probe is not None else None
    if misses is None:
        return None
    names = {}
    for fname, fn in vars(fa4).items():
        cache = getattr(fn, "compile_cache", None)
        names[id(getattr(cache, "_inner", cache))] = fname
        names[id(cache)] = fname
    return dict(Counter(names.get(cache_id, "other") for cache_id, _ in misses))


def pytest_sessionfinish(session, exitstatus):
    if not ENABLED:
        return
    prefix = os.environ.get("FA4SUITE_COUNTS")
    if not prefix:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = f"{prefix}-{worker}.json"
    out = {
        "patch": os.environ.get("FA4AOT_PATCH", ""),
        "compiles": dict(COMPILES),
        "fa4_jit_compiles": sum(n for k, n in COMPILES.items() if k.startswith("setitem:")),
        "cute_compile_calls": COMPILES.get("cute.compile", 0),
    }
    misses = _probe_misses()
    if misses is not None:  # fa4aot record --no-compile: what FA4 would have compiled, per cache
        out["fa4_probe_misses"] = misses
    if out["patch"] not in ("", "0"):
        import fa4aot

        out["fa4aot_stats"] = fa4aot.stats().as_dict()
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
