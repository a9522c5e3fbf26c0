"""fa4aot.patch() / unpatch() and the $FA4AOT_PATCH switch, on the CPU.

FA4's real functions (flash_attn.cute 4.0.0b40, imported, never called) give the signatures:
stand-in FA4 packages are built in sys.modules (or on disk, for the import hook) with functions of
those exact signatures that record their calls, and fa4aot's side is replaced by recorders of the
adapters' signatures, so a test sees what each side received. The policy, reversibility,
idempotence, thread safety, vendored copies and early-bound names are checked that way; the
argument mapping is checked parameter by parameter against FA4's own signature lists.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import types
import uuid

import pytest

from fa4aot.core import fa4_args

fi = pytest.importorskip("flash_attn.cute.interface", reason="needs flash-attn-4 (the build extra) for its signatures")

import fa4aot  # noqa: E402
from fa4aot import _dropin_codegen, dropin  # noqa: E402
from fa4aot.core.errors import ArgumentError, LaunchError, VariantNotFoundError  # noqa: E402
from fa4aot.integrations import flash_attn as adapters  # noqa: E402
from fa4aot.runtime.metadata import SchedulerMetadata  # noqa: E402

NAMES = dropin.ENTRY_NAMES["interface"]
MISSING_LINE = "add it to the manifest and rebuild: families.fwd_sm90: - {head_dims: [[96, 96]]}"


@pytest.fixture(autouse=True)
def _unpatched():
    dropin.unpatch()
    yield
    dropin.unpatch()


class Recorder:
    """Stand-ins for both sides: FA4 originals (FA4's signatures) and fa4aot targets (the
    adapters' signatures). Each records (side, name, arguments by name) and returns a marker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def fn(self, side: str, name: str, like, body=None):
        sig = inspect.signature(like)

        def f(*args, **kwargs):
            with self.lock:
                self.calls.append((side, name, dict(sig.bind(*args, **kwargs).arguments)))
            if side == "fa4aot" and self.error is not None:
                raise self.error
            if body is not None:
                return body()
            if name == "_flash_attn_fwd":
                return (side, "lse", None, None, None)
            return (side, name)

        f.__signature__ = sig
        f.__name__ = f.__qualname__ = like.__name__
        f.__module__ = "fakefa4" if side == "FA4" else "fa4aot.integrations.flash_attn"
        return f

    def of(self, side: str, name: str | None = None) -> list[dict]:
        return [a for s, n, a in self.calls if s == side and (name is None or n == name)]


@pytest.fixture
def rec(monkeypatch) -> Recorder:
    """fa4aot's side replaced by recorders (the wrappers bind their target when made)."""
    r = Recorder()
    for name, real in list(adapters.ENTRY_POINTS.items()):
        monkeypatch.setitem(adapters.ENTRY_POINTS, name, r.fn("fa4aot", name, real))
    return r


def fake_root(rec: Recorder, root: str, originals: dict | None = None) -> tuple[types.ModuleType, types.ModuleType]:
    """A stand-in FA4 package ``root`` and ``root.interface`` in sys.modules: the interface holds
    FA4-signature recorders, the package re-exports two of them as flash_attn.cute does."""
    pkg = types.ModuleType(root)
    pkg.__path__ = []
    iface = types.ModuleType(root + ".interface")
    for name in NAMES:
        iface.__dict__[name] = (originals or {}).get(name) or rec.fn("FA4", name, getattr(fi, name))
    pkg.flash_attn_func, pkg.flash_attn_varlen_func = iface.flash_attn_func, iface.flash_attn_varlen_func
    pkg.interface = iface
    parts = root.split(".")
    for i in range(1, len(parts)):  # parent packages, so dotted imports of the root work
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[root], sys.modules[root + ".interface"] = pkg, iface
    return pkg, iface


@pytest.fixture
def fake(rec):
    """One stand-in FA4 root, removed afterwards."""
    root = f"fakefa4_{uuid.uuid4().hex[:8]}.cute"
    pkg, iface = fake_root(rec, root)
    yield root, pkg, iface
    for m in [m for m in sys.modules if m == root.split(".")[0] or m.startswith(root.split(".")[0] + ".")]:
        del sys.modules[m]


def _q():
    return object()


# -- routing, reversibility, idempotence ----------------------------------------------------------


def test_patch_routes_every_entry_point_and_unpatch_restores_exactly(fake, rec):
    root, pkg, iface = fake
    originals = {n: iface.__dict__[n] for n in NAMES}
    pkg_originals = (pkg.flash_attn_func, pkg.flash_attn_varlen_func)
    fa4aot.patch(modules=[root])
    assert dropin.is_patched() and dropin.policy() == "error"
    for name in NAMES:
        w = iface.__dict__[name]
        assert w is not originals[name] and w.__fa4aot_original__ is originals[name]
        assert w.__module__.startswith("fa4aot.") and w.__name__ == name
    assert pkg.flash_attn_func is iface.flash_attn_func and pkg.flash_attn_varlen_func is iface.flash_attn_varlen_func
    q = _q()
    assert iface._flash_attn_fwd(q, q, q, causal=True)[0] == "fa4aot"
    assert pkg.flash_attn_varlen_func(q, q, q, max_seqlen_q=7)[0] == "fa4aot"
    (fwd,) = rec.of("fa4aot", "_flash_attn_fwd")
    assert fwd["q"] is q and fwd["causal"] is True
    (var,) = rec.of("fa4aot", "flash_attn_varlen_func")
    assert var["max_seqlen_q"] == 7 and rec.of("FA4") == []
    fa4aot.unpatch()
    assert not dropin.is_patched()
    assert all(iface.__dict__[n] is originals[n] for n in NAMES)
    assert (pkg.flash_attn_func, pkg.flash_attn_varlen_func) == pkg_originals
    assert not any(isinstance(f, dropin._Finder) for f in sys.meta_path)


def test_patch_twice_is_patch_once_and_unpatch_twice_is_harmless(fake, rec):
    root, pkg, iface = fake
    original = iface._flash_attn_fwd
    fa4aot.patch("warn", modules=[root])
    first = {n: iface.__dict__[n] for n in NAMES}
    bindings = len(dropin._bindings)
    fa4aot.patch("fallback", modules=[root])
    assert {n: iface.__dict__[n] for n in NAMES} == first and len(dropin._bindings) == bindings
    assert sum(isinstance(f, dropin._Finder) for f in sys.meta_path) == 1
    assert dropin.policy() == "fallback"  # the second call changes only the policy
    assert iface._flash_attn_fwd.__fa4aot_original__ is original  # a wrapper is never wrapped again
    fa4aot.unpatch()
    fa4aot.unpatch()
    assert iface._flash_attn_fwd is original


def test_bad_arguments_to_patch_are_typed_errors():
    with pytest.raises(ArgumentError, match="policy"):
        fa4aot.patch("sometimes")
    with pytest.raises(ArgumentError, match="modules"):
        fa4aot.patch(modules=["not a module"])
    assert not dropin.is_patched()


# -- policies -------------------------------------------------------------------------------------


def test_error_policy_raises_the_miss_naming_the_manifest_line(fake, rec):
    root, _, iface = fake
    rec.error = VariantNotFoundError(f"the cache /c has no fwd_sm90[...]; {MISSING_LINE}")
    fa4aot.patch("error", modules=[root])
    with pytest.raises(VariantNotFoundError) as ei:
        iface._flash_attn_fwd(_q(), _q(), _q())
    assert MISSING_LINE in str(ei.value)
    assert any("policy" in n and "warn" in n for n in getattr(ei.value, "__notes__", []))
    assert rec.of("FA4") == []


@pytest.mark.parametrize("error", [VariantNotFoundError("no variant; " + MISSING_LINE), ArgumentError("score_mod: x")])
def test_warn_policy_logs_once_and_runs_fa4(fake, rec, caplog, error):
    root, _, iface = fake
    rec.error = error
    before = dropin.fallback_counts()
    fa4aot.patch("warn", modules=[root])
    q = _q()
    with caplog.at_level(logging.WARNING, logger="fa4aot.patch"):
        assert iface.flash_attn_func(q, q, q, causal=True) == ("FA4", "flash_attn_func")
        assert iface.flash_attn_func(q, q, q, causal=True) == ("FA4", "flash_attn_func")
    warned = [r for r in caplog.records if r.name == "fa4aot.patch"]
    assert len(warned) == 1 and str(error) in warned[0].getMessage()
    calls = rec.of("FA4", "flash_attn_func")
    assert len(calls) == 2 and calls[0]["q"] is q and calls[0]["causal"] is True
    qual = iface.flash_attn_func.__fa4aot_original__.__module__ + ".flash_attn_func"
    assert dropin.fallback_counts()[qual] - before.get(qual, 0) == 2
    assert fa4aot.stats().patch_fallbacks[qual] == dropin.fallback_counts()[qual]


def test_fallback_policy_is_silent(fake, rec, caplog):
    root, _, iface = fake
    rec.error = VariantNotFoundError("no variant; " + MISSING_LINE)
    fa4aot.patch("fallback", modules=[root])
    with caplog.at_level(logging.DEBUG, logger="fa4aot.patch"):
        assert iface._flash_attn_bwd(*[_q()] * 6)[0] == "FA4"
    assert [r for r in caplog.records if r.name == "fa4aot.patch"] == []
    assert len(rec.of("FA4", "_flash_attn_bwd")) == 1


def test_a_launch_failure_is_not_a_miss(fake, rec):
    root, _, iface = fake
    rec.error = LaunchError("cuLaunchKernelEx failed with CUresult 719", 719)
    fa4aot.patch("fallback", modules=[root])
    with pytest.raises(LaunchError):
        iface._flash_attn_fwd(_q(), _q(), _q())
    assert rec.of("FA4") == []


def test_fa4_running_its_own_code_calls_its_own_functions(rec):
    """During a fallback FA4's internal calls to patched names (flash_attn_func -> _flash_attn_fwd)
    stay FA4's: no second trip through fa4aot, no second fallback."""
    root = f"fakefa4_{uuid.uuid4().hex[:8]}.cute"
    holder: dict = {}
    inner = rec.fn("FA4", "flash_attn_func", fi.flash_attn_func, body=lambda: holder["iface"]._flash_attn_fwd(1, 2, 3))
    _, iface = fake_root(rec, root, {"flash_attn_func": inner})
    holder["iface"] = iface
    rec.error = ArgumentError("score_mod: fa4aot does not build it")
    try:
        fa4aot.patch("fallback", modules=[root])
        assert iface.flash_attn_func(1, 2, 3) == ("FA4", "lse", None, None, None)
        assert [n for s, n, _ in rec.calls] == ["flash_attn_func", "flash_attn_func", "_flash_attn_fwd"]
        assert [s for s, n, _ in rec.calls] == ["fa4aot", "FA4", "FA4"]
    finally:
        for m in [m for m in sys.modules if m.startswith(root.split(".")[0])]:
            del sys.modules[m]


def test_fallback_drops_fa4aot_scheduler_metadata_fa4_cannot_read(fake, rec):
    root, _, iface = fake
    rec.error = VariantNotFoundError("no variant")
    md = object.__new__(SchedulerMetadata)  # a fa4aot metadata object (buffers not needed here)
    fa4aot.patch("fallback", modules=[root])
    iface.flash_attn_varlen_func(1, 2, 3, scheduler_metadata=md)
    iface._flash_attn_fwd(1, 2, 3, scheduler_metadata=md)
    assert [c["scheduler_metadata"] for c in rec.of("fa4aot")] == [md, md]
    assert [c["scheduler_metadata"] for c in rec.of("FA4")] == [None, None]


# -- modules imported later, names bound earlier ---------------------------------------------------


def _disk_package(tmp_path, name: str) -> None:
    """An FA4-like package on disk: ``name.cute`` re-exports from ``name.cute.interface``
    (a subset of FA4's signature), and ``name_user`` binds a name at import time."""
    cute = tmp_path / name / "cute"
    cute.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    (cute / "__init__.py").write_text("from .interface import flash_attn_func, flash_attn_varlen_func\n")
    (cute / "interface.py").write_text(
        textwrap.dedent("""
        def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False):
            return ("FA4", "flash_attn_func")

        def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, causal=False):
            return ("FA4", "flash_attn_varlen_func")
        """)
    )
    (tmp_path / f"{name}_user.py").write_text(
        f"from {name}.cute import flash_attn_varlen_func as fa4\n\ndef call(q):\n    return fa4(q, q, q, causal=True)\n"
    )


@pytest.fixture
def disk(tmp_path, rec):
    name = f"hookfa4_{uuid.uuid4().hex[:8]}"
    _disk_package(tmp_path, name)
    sys.path.insert(0, str(tmp_path))
    yield name
    sys.path.remove(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[m]


def test_modules_imported_after_patch_are_patched_at_import(disk, rec):
    fa4aot.patch(modules=[f"{disk}.cute"])
    assert f"{disk}.cute" not in sys.modules  # patch() imports nothing
    cute = __import__(f"{disk}.cute", fromlist=["interface"])
    user = __import__(f"{disk}_user")
    assert cute.interface.flash_attn_varlen_func.__fa4aot_original__ is not None
    assert cute.flash_attn_varlen_func is cute.interface.flash_attn_varlen_func
    assert user.fa4 is cute.flash_attn_varlen_func  # bound after the patch: the wrapper
    q = _q()
    assert user.call(q)[0] == "fa4aot"
    (call,) = rec.of("fa4aot", "flash_attn_varlen_func")
    assert call["q"] is q and call["causal"] is True  # by name: the copy's order is not FA4's
    fa4aot.unpatch()
    original = cute.interface.flash_attn_varlen_func
    assert not hasattr(original, "__fa4aot_original__")
    assert cute.flash_attn_varlen_func is original and user.fa4 is original
    assert user.call(q) == ("FA4", "flash_attn_varlen_func")


def test_names_bound_before_patch_are_rebound_and_restored(disk, rec):
    cute = __import__(f"{disk}.cute", fromlist=["interface"])
    user = __import__(f"{disk}_user")
    original = user.fa4
    fa4aot.patch(modules=[f"{disk}.cute"], rebind=False)
    assert user.fa4 is original  # without the scan, an early binding keeps FA4's function
    fa4aot.patch(modules=[f"{disk}.cute"])
    assert user.fa4 is cute.flash_attn_varlen_func and user.fa4.__fa4aot_original__ is original
    assert user.call(_q())[0] == "fa4aot"
    fa4aot.unpatch()
    assert user.fa4 is original and cute.flash_attn_varlen_func is original


def test_unpatch_leaves_a_binding_someone_else_changed(fake, rec):
    root, pkg, iface = fake
    fa4aot.patch(modules=[root])

    def theirs(*a, **k):
        return "theirs"

    iface._flash_attn_fwd = theirs
    fa4aot.unpatch()
    assert iface._flash_attn_fwd is theirs


# -- vendored copies -------------------------------------------------------------------------------

VLLM_FWD = """
def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                    causal=False, dynamic_causal=None, softcap=None, window_size_left=None, window_size_right=None,
                    learnable_sink=None, tile_mn=None, mma_pv_is_rs=None, intra_wg_overlap=None, num_threads=384,
                    num_splits=1, pack_gqa=None, _arch=None, score_mod=None, mask_mod=None, block_sparse_tensors=None,
                    return_lse=False, out=None, lse=None, aux_tensors=None, aux_scalars=None, q_descale=None,
                    k_descale=None, v_descale=None, gather_kv_indices=None, output_scale=None
                    ) -> "Tuple[torch.Tensor, torch.Tensor]":
    CALLS.append(("FA4", dict(locals())))
    return ("FA4-out", "FA4-lse")
"""
SGLANG_FWD = """
def _flash_attn_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False, softcap=None,
                    window_size_left=None, window_size_right=None, learnable_sink=None, m_block_size=128,
                    n_block_size=128, num_threads=384, num_splits=1, pack_gqa=None, _compute_capability=None,
                    score_mod=None, mask_mod=None, block_sparse_tensors=None, return_lse=False, out=None, lse=None,
                    aux_tensors=None) -> "Tuple[torch.Tensor, torch.Tensor]":
    CALLS.append(("FA4", dict(locals())))
    return ("FA4-out", "FA4-lse")
"""


def _vendored(root: str, source: str) -> tuple[types.ModuleType, list]:
    """A vendored copy's interface module in sys.modules (its function from ``source``)."""
    calls: list = []
    parts = root.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) not in sys.modules:
            sys.modules[".".join(parts[:i])] = mod = types.ModuleType(".".join(parts[:i]))
            mod.__path__ = []
    iface = types.ModuleType(root + ".interface")
    iface.CALLS = calls
    exec(source, iface.__dict__)
    sys.modules[root + ".interface"] = iface
    return iface, calls


@pytest.mark.parametrize(
    "root, source",
    [("vllm.vllm_flash_attn.cute", VLLM_FWD), ("sglang.jit_kernel.flash_attention.cute", SGLANG_FWD)],
    ids=["vllm", "sglang"],
)
def test_vendored_copies_map_by_name_and_keep_their_return_shape(rec, root, source):
    top = root.split(".")[0]
    saved = {m: sys.modules[m] for m in list(sys.modules) if m == top or m.startswith(top + ".")}
    try:
        iface, calls = _vendored(root, source)
        fa4aot.patch("fallback")  # the default roots cover the vendored copies
        q, cu = _q(), _q()
        # positional, in the copy's own order (SGLang's 4th parameter is cu_seqlens_q, FA4 4.0's is qv)
        pos = list(inspect.signature(iface._flash_attn_fwd).parameters).index("cu_seqlens_q")
        args = [q, q, q] + [None] * (pos - 3) + [cu]
        assert iface._flash_attn_fwd(*args, causal=True) == ("fa4aot", "lse")  # two values, as the copy
        (got,) = rec.of("fa4aot", "_flash_attn_fwd")
        assert got["cu_seqlens_q"] is cu and got.get("qv") is None and got["causal"] is True
        assert got.get("window_size_left") is None and "num_threads" not in got  # at default: dropped
        # a copy-only argument with a value is refused, and the policy runs the copy itself
        extra = "dynamic_causal" if "dynamic_causal" in source else "m_block_size"
        value = _q() if extra == "dynamic_causal" else 64
        assert iface._flash_attn_fwd(q, q, q, **{extra: value}) == ("FA4-out", "FA4-lse")
        assert calls[-1][1][extra] is value and len(rec.of("fa4aot")) == 1
        fa4aot.unpatch()
        assert not hasattr(iface._flash_attn_fwd, "__fa4aot_original__")
    finally:
        for m in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[m]
        sys.modules.update(saved)


# -- thread safety --------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_patch_unpatch_and_calls(fake, rec):
    root, pkg, iface = fake
    originals = {n: iface.__dict__[n] for n in NAMES}
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn() -> None:
        try:
            for i in range(40):
                fa4aot.patch(("error", "warn", "fallback")[i % 3], modules=[root])
                fa4aot.unpatch()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def call() -> None:
        try:
            while not stop.is_set():
                assert iface._flash_attn_fwd(1, 2, 3)[0] in ("fa4aot", "FA4")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(4)] + [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[:4]:
        t.join()
    stop.set()
    for t in threads[4:]:
        t.join()
    assert errors == []
    fa4aot.unpatch()
    assert all(iface.__dict__[n] is originals[n] for n in NAMES)
    fa4aot.patch(modules=[root])
    mine = [b for b in dropin._bindings.values() if b[0] is iface.__dict__ or b[0] is pkg.__dict__]
    assert len(mine) == len(NAMES) + 2  # each name once: no duplicate bindings
    assert all(iface.__dict__[n].__fa4aot_original__ is originals[n] for n in NAMES)


# -- the argument mapping: FA4 4.0.0b40's parameters ------------------------------------------------

#: FA4 parameters fa4aot does not build, per function (from FA4's docstrings and fa4aot's docs):
#: a non-default value must raise ArgumentError naming the parameter.
REFUSED = {
    "_flash_attn_bwd": {
        "V_in_regs", "config", "score_mod", "score_mod_bwd", "mask_mod", "aux_tensors", "aux_scalars",
        "block_sparse_tensors",
    },
    "_flash_attn_fwd_combine": {"virtual_batch_idx", "semaphore_to_reset"},
}  # fmt: skip
#: FA4 parameters FA4 4.0.0b40 itself ignores (interface.py: "BwdConfig owns them").
IGNORED = {
    "_flash_attn_bwd": {
        "m_block_size", "n_block_size", "num_threads", "pack_gqa", "num_stages_Q", "num_stages_dO", "SdP_swapAB",
        "dKV_swapAB", "dQ_swapAB", "AtomLayoutMSdP", "AtomLayoutNdKV", "AtomLayoutMdQ",
    },
}  # fmt: skip
#: How an FA4 parameter reaches fa4aot's runtime function when the name changes.
RENAMED = {
    "_flash_attn_bwd": {"window_size_left": ("window_size", 0), "window_size_right": ("window_size", 1)},
    "_flash_attn_fwd_combine": {"num_splits_dynamic_ptr": ("num_splits_dynamic", None)},
}


def test_every_fa4_parameter_reaches_the_adapter_unchanged():
    """FA4 4.0.0b40 -> the drop-in's adapters: the same parameters in the same places with the same
    defaults (the wrapper passes calls through untouched), except get_scheduler_metadata, whose
    dtype default is FA4's torch.bfloat16 (the generated wrapper passes FA4's default on)."""
    for name in NAMES:
        fa4_sig, ours = inspect.signature(getattr(fi, name)), inspect.signature(adapters.ENTRY_POINTS[name])
        missing = [p for p in fa4_sig.parameters if p not in ours.parameters]
        assert missing == [], (name, missing)
        through = _dropin_codegen.passes_through(fa4_sig, ours)
        assert through == (name != "get_scheduler_metadata"), name
        extra = [p for p in list(ours.parameters)[len(fa4_sig.parameters) :] if p not in fa4_sig.parameters]
        assert all(ours.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in extra), (name, extra)


def test_wrappers_pass_each_fa4_parameter_by_position_and_by_name(fake, rec):
    """Every parameter of FA4's signature, given positionally (where it can be) and by keyword to the
    patched function, arrives at fa4aot's side under its own name."""
    root, _, iface = fake
    fa4aot.patch(modules=[root])
    for name in NAMES:
        params = list(inspect.signature(getattr(fi, name)).parameters.values())
        for i, p in enumerate(params):
            marker = _q()
            rec.calls.clear()
            required = {r.name: _q() for r in params if r.default is r.empty}
            getattr(iface, name)(**{**required, p.name: marker})
            ((_, _, got),) = [c for c in rec.calls if c[0] == "fa4aot"]
            assert got[p.name] is marker, (name, p.name)
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                args = [_q() for _ in params[:i]] + [marker]
                rest = {r.name: _q() for r in params[i + 1 :] if r.default is r.empty}
                rec.calls.clear()
                getattr(iface, name)(*args, **rest)
                ((_, _, got),) = [c for c in rec.calls if c[0] == "fa4aot"]
                assert got[p.name] is marker, (name, p.name, "positional")


def _bind(fn, args, kwargs) -> dict:
    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


def _arrived(runtime_fn, monkeypatch, owner, attr, call) -> dict:
    """Call ``call()`` with ``owner.attr`` (a runtime function) replaced by a recorder; the
    arguments it received, by ``runtime_fn``'s parameter names."""
    got: list = []
    monkeypatch.setattr(owner, attr, lambda *a, **k: got.append(_bind(runtime_fn, a, k)) or ("o", "l"))
    call()
    assert len(got) == 1
    return got[0]


def _check_adapter(name, adapter, runtime_fn, owner, attr, monkeypatch, required, skip=()):
    """Each FA4 parameter of ``name`` given a marker reaches ``runtime_fn`` under its name (or
    the RENAMED slot), is ignored (IGNORED), or is refused by name (REFUSED)."""
    fa4_params = inspect.signature(getattr(fi, name)).parameters
    for pname in fa4_params:
        if pname in required or pname in skip:
            continue
        marker = _q()
        call = lambda: adapter(**required, **{pname: marker})  # noqa: B023, E731
        if pname in REFUSED.get(name, ()):
            with pytest.raises(ArgumentError, match=rf"^{pname}: fa4aot does not build"):
                _arrived(runtime_fn, monkeypatch, owner, attr, call)
            continue
        got = _arrived(runtime_fn, monkeypatch, owner, attr, call)
        if pname in IGNORED.get(name, ()):
            assert marker not in [v for v in got.values()], pname
            continue
        slot, index = RENAMED.get(name, {}).get(pname, (pname, None))
        value = got[slot] if index is None else got[slot][index]
        assert value is marker, (name, pname)
    assert set(required) <= set(fa4_params)


#: What fa4aot's forward paths refuse, by FA4 parameter: the runtime forward (inference) and, on
#: the autograd path, the adapter (forward-only FA4 paths) and fa4aot.torch (inference-only ones).
#: What the runtime forward refuses, and what the adapter refuses under autograd (fa4aot's table of
#: FA4's arguments: fa4aot.core.fa4_args).
RUNTIME_REFUSES = {n: set(fa4_args.refused_names(n)) for n in ("flash_attn_func", "flash_attn_varlen_func")}
AUTOGRAD_ADAPTER_REFUSES = {
    n: set(fa4_args.refused_names(n, autograd=True)) for n in ("flash_attn_func", "flash_attn_varlen_func")
}


@pytest.mark.parametrize("name", ["flash_attn_func", "flash_attn_varlen_func"])
def test_forward_adapters_forward_or_refuse_every_parameter(monkeypatch, name):
    """Each FA4 parameter of flash_attn_func / flash_attn_varlen_func, given a value: on the
    inference path it reaches the runtime forward under its name, which serves it or refuses it by
    name; on the autograd path it reaches fa4aot.torch's function (which serves or refuses it) or
    the adapter refuses it by name."""
    from fa4aot.runtime import entry

    torch = pytest.importorskip("torch")
    import fa4aot.torch as ft

    adapter, runtime_fn, torch_fn = getattr(adapters, name), getattr(entry, name), getattr(ft, name)
    params = [p for p in inspect.signature(getattr(fi, name)).parameters if p not in ("q", "k", "v")]
    for grad in (False, True):
        q = torch.zeros(1, requires_grad=True) if grad else _q()
        for pname in params:
            marker = _q()
            call = lambda: adapter(q, _q(), _q(), **{pname: marker})  # noqa: B023, E731
            if grad and pname in AUTOGRAD_ADAPTER_REFUSES[name]:
                with pytest.raises(ArgumentError, match=rf"^{pname}: fa4aot"):
                    call()
                continue
            owner, fn = (ft, torch_fn) if grad else (entry, runtime_fn)
            got = _arrived(fn, monkeypatch, owner, name, call)
            assert got[pname] is marker, (name, grad, pname)
            monkeypatch.undo()
            if not grad and pname in RUNTIME_REFUSES[name]:  # the real function refuses it
                with pytest.raises(ArgumentError, match=rf"^{pname}: fa4aot does not build"):
                    fn(q, _q(), _q(), **{pname: marker})


def test_flash_attn_bwd_forwards_ignores_or_refuses_every_parameter(monkeypatch):
    from fa4aot.runtime import entry, fa4_entries

    req = {n: _q() for n in ("q", "k", "v", "out", "dout", "lse")}
    _check_adapter(
        "_flash_attn_bwd", adapters._flash_attn_bwd, entry.flash_attn_backward, fa4_entries, "flash_attn_backward",
        monkeypatch, req,
    )  # fmt: skip
    got = _arrived(
        entry.flash_attn_backward,
        monkeypatch,
        fa4_entries,
        "flash_attn_backward",
        lambda: adapters._flash_attn_bwd(**req),
    )
    assert all(got[n] is req[n] for n in req)  # out and dout not swapped (FA4: out before dout)


def test_flash_attn_fwd_combine_forwards_or_refuses_every_parameter(monkeypatch):
    from fa4aot.runtime import combine, fa4_entries

    class Rt:  # what the combine mirror reads of a runtime (only for _arch)
        info = types.SimpleNamespace(compute_capability=(9, 0))

    req = {"out_partial": _q(), "lse_partial": _q(), "out": _q()}
    monkeypatch.setattr(fa4_entries.loader, "_DEFAULT", Rt())
    _check_adapter(
        "_flash_attn_fwd_combine", adapters._flash_attn_fwd_combine, combine.combine, fa4_entries, "combine",
        monkeypatch, req, skip=("_arch",),
    )  # fmt: skip
    with pytest.raises(ArgumentError, match="_arch: 100"):
        adapters._flash_attn_fwd_combine(**req, _arch=100)


def test_get_scheduler_metadata_refuses_what_fa4aot_does_not_build():
    for pname, value in (("seqlen_k_new", 5), ("cu_seqlens_k_new", _q()), ("leftpad_k", _q())):
        with pytest.raises(ArgumentError, match=rf"^{pname}: fa4aot does not build"):
            adapters.get_scheduler_metadata(64, 512, 16, 4, 128, 4, **{pname: value})


# -- the environment switch -----------------------------------------------------------------------


def test_the_build_hook_and_the_drop_in_write_the_same_pth_line():
    build = pytest.importorskip("fa4aot._build_pth", reason="needs setuptools")
    assert build.PTH_LINE == dropin.PTH_LINE and build.PTH_NAME == dropin.PTH_NAME


def _python(site_dir, code: str, patch: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FA4AOT_PATCH")}
    if patch is not None:
        env["FA4AOT_PATCH"] = patch
    prelude = f"import site; site.addsitedir({str(site_dir)!r}); "  # processes the .pth as site does at start
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def site_dir(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fa4aot.dropin", "install-pth", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / dropin.PTH_NAME).read_text() == dropin.PTH_LINE
    return tmp_path


@pytest.mark.slow
def test_env_switch_routes_flash_attn_cute_in_an_unchanged_program(site_dir):
    code = "import flash_attn.cute as m; print(m.flash_attn_func.__module__, m.interface._flash_attn_fwd.__module__)"
    on = _python(site_dir, code, "1")
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["fa4aot.integrations.flash_attn", "fa4aot.runtime.interface"]
    off = _python(site_dir, code + "; import sys; print('fa4aot' in sys.modules)", None)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["flash_attn.cute.interface", "flash_attn.cute.interface", "False"]


def test_env_switch_imports_neither_torch_nor_flash_attn(site_dir):
    code = "import sys; from fa4aot import dropin; print(dropin.policy(), 'torch' in sys.modules, 'flash_attn' in sys.modules)"
    out = _python(site_dir, code, "warn")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["warn", "False", "False"]
    bad = _python(site_dir, code, "sometimes")
    assert bad.returncode == 0 and "is not 1, error, warn or fallback" in bad.stderr
    assert bad.stdout.split() == ["None", "False", "False"]


def test_get_scheduler_metadata_computes_fa4s_choice_on_the_fake_driver(built_cache):
    """fa4aot's get_scheduler_metadata picks the config FA4's own get_scheduler_metadata would
    (FA4's selector, run here through FA4's module) and launches the prepare kernel for it."""
    torch = pytest.importorskip("torch")
    from fake_driver import FakeDriver

    from fa4aot.runtime.loader import Runtime
    from fa4aot.runtime.tensors import RawTensor

    drv = FakeDriver(cc=(10, 0), num_sms=148)
    rt = Runtime(built_cache, driver=drv)
    base = 0x7F40_0000_0000
    cu_q, cu_k = RawTensor(base, (9,), "int32"), RawTensor(base + (1 << 36), (9,), "int32")
    md = adapters.get_scheduler_metadata(64, 512, 16, 4, 128, 4, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, runtime=rt)
    want = fi.select_fwd_config(
        fi._get_fwd_inputs(
            device_arch=100, num_sms=148, dtype=torch.bfloat16, head_dim=128, head_dim_v=128, num_heads=16,
            num_heads_kv=4, batch_size=8, total_q=8 * 64, total_k=8 * 512, max_seqlen_q=64, max_seqlen_k=512,
            seqlen_k_per_split=None, causal=False, local=False, window_size_left=None, window_size_right=None,
            has_cu_seqlens_q=True, has_cu_seqlens_k=True, has_seqused_q=False, has_seqused_k=False,
            has_caller_scheduler_metadata=True, pack_gqa=None, num_splits=4,
        )._replace(requested_use_swapab=False)
    )  # fmt: skip
    f = md.fields
    assert (f["tile_m"], f["tile_n"], f["pack_gqa"], md.num_splits) == (
        want.tile_m, want.tile_n, want.pack_gqa, want.num_splits,
    )  # fmt: skip
    assert f["has_semaphore"] is (not want.use_clc_scheduler)
    ((lv,),) = [[lv for lv in rt._loaded.values() if lv.variant.family == "prepare"]]
    assert [launch.kernel for launch in drv.launches] == lv.kernels[:1]


#: Runs FA4's own get_scheduler_metadata on fake tensors (its _compile_misses probe: nothing
#: compiles) and prints, per (num_splits, causal), the config's split count and whether FA4 ran
#: its prepare kernel (FA4's metadata then holds num_m_blocks).
_FA4_METADATA = r"""
import json, os, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
out = []
for num_splits, causal, batch in json.loads(os.environ["CASES"]):
    token = I._compile_misses.set(set())
    try:
        with FakeTensorMode():
            cu = torch.zeros(batch + 1, dtype=torch.int32, device="cuda")
            md = I.get_scheduler_metadata(512, 4096, 16, 4, 128, num_splits, causal=causal, cu_seqlens_q=cu,
                                          cu_seqlens_k=cu)
    finally:
        I._compile_misses.reset(token)
    out.append(md.num_m_blocks_ptr is not None)
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "arch,num_sms",
    [pytest.param("sm_90a", 132, marks=pytest.mark.slow), pytest.param("sm_100a", 148, marks=pytest.mark.slow)],
)  # the full tier: FA4's fake-mode run takes 3-4 s per arch
def test_get_scheduler_metadata_runs_the_prepare_kernel_when_fa4_does(built_cache, arch, num_sms):
    """FA4's get_scheduler_metadata skips its prepare kernel for calls that are neither split nor
    causal (its metadata holds no buffers): fa4aot's does the same (nothing launched, FA4's field
    names None), and the forward then dispatches as FA4's does for such metadata."""
    from fake_driver import FakeDriver

    from fa4aot.core.fa4_interface import UNPREPARED
    from fa4aot.runtime.loader import Runtime
    from fa4aot.runtime.metadata import metadata_kind
    from fa4aot.runtime.tensors import RawTensor

    cases = [(1, False, 8), (1, True, 8), (1, False, 300)]
    if arch != "sm_90a":  # FA4 splits KV on SM100 only
        cases += [(3, False, 8), (3, True, 8)]
    env = dict(os.environ, FLASH_ATTENTION_ARCH=arch, CUTE_DSL_ARCH=arch, FLASH_ATTENTION_NUM_SMS=str(num_sms),
               CASES=json.dumps(cases), CUTE_DSL_LOG_LEVEL="0")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _FA4_METADATA], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fa4_prepared = json.loads(proc.stdout.strip().splitlines()[-1])
    cc = {"sm_90a": (9, 0), "sm_100a": (10, 0)}[arch]
    for (num_splits, causal, batch), prepared in zip(cases, fa4_prepared):
        drv = FakeDriver(cc=cc, num_sms=num_sms)
        rt = Runtime(built_cache, driver=drv)
        cu = RawTensor(0x7F40_0000_0000, (batch + 1,), "int32")
        try:
            md = adapters.get_scheduler_metadata(
                512, 4096, 16, 4, 128, num_splits, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, runtime=rt
            )
        except VariantNotFoundError:  # fa4aot asked for a prepare kernel fast.yaml does not build
            assert prepared, f"{arch} {num_splits=} {causal=}: FA4 runs no prepare kernel, fa4aot asked for one"
            continue
        assert (md.kind is True) is prepared, f"{arch} {num_splits=} {causal=}: FA4 prepared={prepared}"
        assert metadata_kind(md) == (True if prepared else UNPREPARED)
        if not prepared:
            assert drv.launches == [] and md.buffers == (None, None, None)
            assert md.num_m_blocks_ptr is None and md.tile_count_semaphore is None and md.cu_total_m_blocks is None
            md.reset_semaphore()  # nothing to reset: no driver call
            assert drv.launches == []


def test_unprepared_metadata_selects_fa4s_kernel_without_metadata_buffers():
    """A forward given metadata without buffers runs the kernel FA4 compiles for it: no split
    counts, no tile semaphore, no nheads-in-L2 (FA4's compile key flags all false). FA4's SM90
    kernel takes no metadata at all (its key still names it): fa4aot builds the one kernel."""
    from fa4aot.core import fa4_interface as rules
    from fa4aot.core import selector

    sel = selector.installed()
    base = dict(dtype="bf16", head_dim=128, head_dim_v=128, num_heads=16, num_heads_kv=4, batch=8, total_q=4096,
                total_k=4096, q_capacity=4096, k_capacity=4096, max_seqlen_q=512, max_seqlen_k=512, causal=False,
                varlen_q=True, varlen_k=True)  # fmt: skip
    for arch, num_sms in ((100, 148), (90, 132)):
        for prepared in (True, False):
            f = rules.FwdFacts(arch=arch, num_sms=num_sms, **base, caller_metadata=True, caller_semaphore=prepared,
                               caller_prepared=prepared)  # fmt: skip
            inputs = rules.fwd_inputs(sel, f)
            plan = rules.fwd_plan(sel, sel.select_fwd_config(inputs), inputs, f)
            got = (plan.num_splits_dynamic, plan.tile_count_semaphore, plan.num_nheads_in_l2)
            want = (True, True, False) if prepared and arch == 100 else (False, False, False)
            assert got == want, (arch, prepared, got)


def test_inference_calls_detach_tensors_that_require_grad(monkeypatch):
    """Under torch.no_grad() a Parameter (gpt-oss's sinks) still requires grad, which DLPack
    refuses: the inference path hands the runtime a detached view of the same memory."""
    torch = pytest.importorskip("torch")
    from fa4aot.runtime import entry

    sink = torch.nn.Parameter(torch.zeros(4))
    q = torch.zeros(1, 2, 4, 8, requires_grad=True)
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        with torch.no_grad():
            got = _arrived(
                getattr(entry, name), monkeypatch, entry, name,
                lambda: getattr(adapters, name)(q, q, q, learnable_sink=sink),  # noqa: B023
            )  # fmt: skip
        for arg, src in (("q", q), ("learnable_sink", sink)):
            assert not got[arg].requires_grad and got[arg].data_ptr() == src.data_ptr(), (name, arg)


def test_the_wheel_installs_the_pth_line(tmp_path):
    """fa4aot's build (pyproject's cmdclass) puts fa4aot_patch.pth, with the drop-in's line, at the
    top of the wheel: pip installs it into site-packages."""
    import shutil
    import zipfile

    pytest.importorskip("build", reason="needs the 'build' package")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        if os.path.exists(os.path.join(root, name)):
            shutil.copy(os.path.join(root, name), src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fa4aot", "kernels"):
        shutil.copytree(os.path.join(root, name), src / name, ignore=skip)
    out = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read(dropin.PTH_NAME).decode() == dropin.PTH_LINE


def test_autograd_op_carries_scheduler_metadata_and_requires_grad(monkeypatch):
    """FA4's differentiable varlen function takes scheduler_metadata (its forward reads it) and
    selects a training forward when an input requires grad: fa4aot's autograd op hands both to
    the runtime's forward."""
    torch = pytest.importorskip("torch")
    import fa4aot.torch as ft

    seen = {}

    def fake_forward(*a, **kw):
        seen.update(metadata=a[17], requires_grad=kw.get("requires_grad"))
        q, v = a[1], a[3]
        return q.new_zeros((*q.shape[:-1], v.shape[-1])), q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)

    monkeypatch.setattr(ft, "forward", fake_forward)
    md = SchedulerMetadata.__new__(SchedulerMetadata)  # a metadata object; the op only passes it on
    q = torch.zeros(10, 4, 64, requires_grad=True)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    ft._fwd(q, q, q, cu, cu, None, None, 10, 10, 0.125, False, ft._NONE, ft._NONE, None, 0.0, 1, None, False, False,
            True, ft._metadata_id(md))  # fmt: skip
    assert seen == {"metadata": md, "requires_grad": True}
    with pytest.raises(ArgumentError, match="must be a fa4aot.SchedulerMetadata"):
        ft._metadata_id(object())
    gone = ft._metadata_id(SchedulerMetadata.__new__(SchedulerMetadata))  # collected right away
    with pytest.raises(ArgumentError, match="no longer exists"):
        ft._fwd(q, q, q, cu, cu, None, None, 10, 10, 0.125, False, ft._NONE, ft._NONE, None, 0.0, 1, None, False,
                False, True, gone)  # fmt: skip


@pytest.mark.parametrize("head_dim", [4, 148, 288])
def test_head_dims_fa4_asserts_on_raise_what_fa4_raises(built_cache, head_dim):
    """FA4 checks head dims first, with an assert (its own test expects AssertionError and its
    message): fa4aot raises FA4RejectsError, an ArgumentError and an AssertionError, with FA4's
    words, even where a stride check would fail first (head_dim 4 and 148: unaligned rows)."""
    from fake_driver import FakeDriver

    from fa4aot.core.errors import FA4RejectsError
    from fa4aot.runtime.loader import Runtime
    from fa4aot.runtime.tensors import RawTensor

    rt = Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=132))
    q = RawTensor(0x7F40_0000_0000, (1, 64, 4, head_dim), "bf16")
    with pytest.raises(
        AssertionError, match=re.escape(f"(head_dim, head_dim_v)=({head_dim}, {head_dim}) is not supported on SM")
    ) as e:
        fa4aot.flash_attn_func(q, q, q, runtime=rt)
    assert isinstance(e.value, FA4RejectsError) and isinstance(e.value, ArgumentError)
    assert rt.driver.launches == []


def test_autograd_paths_trace_in_one_graph_under_torch_compile():
    """torch.compile(fullgraph=True) traces fa4aot.torch's functions and the drop-in adapters
    whole (their argument checks included; on meta tensors, where the ops' Meta kernels run)."""
    torch = pytest.importorskip("torch")
    import fa4aot.torch as ft

    q = torch.empty(2, 16, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.zeros(3, dtype=torch.int32, device="meta")
    qp = torch.empty(32, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    for fn in (ft.flash_attn_func, adapters.flash_attn_func):
        out = torch.compile(lambda a, f=fn: f(a, a, a, causal=True)[0], fullgraph=True, backend="eager")(q)
        assert out.shape == q.shape
    for fn in (ft.flash_attn_varlen_func, adapters.flash_attn_varlen_func):
        step = torch.compile(
            lambda a, c, f=fn: f(a, a, a, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=16, max_seqlen_k=16)[0],
            fullgraph=True,
            backend="eager",
        )
        assert step(qp, cu).shape == qp.shape
