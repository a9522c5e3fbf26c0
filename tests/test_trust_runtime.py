"""Isolation of failures in the runtime (issue 23): a rejected launch plan never poisons later plan
loads; a bad tuning table or candidate falls back to FA4's choice with one warning; the miss and
record logs never block or follow links; cache wheels - the CLI and the runtime choose the same
one, shadowing, damaged and writable-by-others wheels are reported; entries built by another
fa4aot with the same shim ABI are a miss, not loaded. All on the fake driver (no GPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import HAS_DSL, run_cli
from test_runtime import combine_args
from test_tuning import BUCKET, CANDIDATE, DEFAULT, _call, _kernel, _resigned, _runtime, _write, entry, table

import fa4aot
from fa4aot.core.errors import PlanError, VariantNotFoundError
from fa4aot.core.index import Cache, PackedIndex
from fa4aot.plan.library import open_plan, target_answers
from fa4aot.runtime import loader
from fa4aot.runtime.loader import Runtime
from fa4aot.tools import tune

#: Seconds a call may take before the test calls it hung (a blocked open never returns).
HANG_SECONDS = 10
#: The H100 packed index of tests/fast.yaml's cache.
H100_INDEX = "sm_90a-132-x86_64-abi3.idx"
B200_INDEX = "sm_100a-148-x86_64-abi3.idx"


def _h100(**kw) -> FakeDriver:
    return FakeDriver(cc=(9, 0), num_sms=132, **kw)


def _flip(path: Path, offset: int) -> None:
    """Flip one bit of ``path`` at ``offset`` (a private copy: never a shared test cache)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def _ours(records: list[warnings.WarningMessage], pattern: str) -> list[str]:
    return [str(w.message) for w in records if re.search(pattern, str(w.message))]


@pytest.fixture
def cache(built_cache, tmp_path) -> Path:
    """A private copy of the fast cache (tests damage it)."""
    dst = tmp_path / "cache"
    shutil.copytree(built_cache, dst, ignore=shutil.ignore_patterns("tuning", "LOCK"))
    return dst


# --- 1. a rejected plan never poisons later plan loads -------------------------------------------

#: A shared library that is not a launch plan: it lacks the shim's symbols, so open_plan rejects it
#: after dlopen (the case that used to leave it mapped under a reused /proc/self/fd/N path).
NOT_A_PLAN_C = "unsigned int fa4aot_shim_abi(void) { return 999; }\n"


def _not_a_plan(tmp_path: Path, flags: list[str]) -> bytes:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build a library that is not a launch plan")
    src, out = tmp_path / "bad.c", tmp_path / "bad.so"
    src.write_text(NOT_A_PLAN_C)
    subprocess.run([cc, "-shared", "-fPIC", *flags, "-o", str(out), str(src)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("flags", [[], ["-Wl,-z,nodelete"]], ids=["dlclosed", "nodelete"])
def test_a_plan_rejected_after_dlopen_never_poisons_later_loads(built_cache, tmp_path, flags):
    cache = Cache(built_cache)
    good = list(cache.entries())
    with pytest.raises(PlanError, match="lacks a symbol"):
        open_plan(_not_a_plan(tmp_path, flags), good[0].meta)
    for e in good:  # every real plan still loads and runs its module load
        plan = open_plan(cache.read_plan(e), e.meta)
        dev, ker = target_answers(e.target.optin_smem())
        plan.load(list(range(1, len(plan.kernels) + 1)), dev, ker)
        assert plan.module_load is not None


# --- 2. tuning tables and candidates ---------------------------------------------------------------


def _signed_with(**fields) -> bytes:
    doc = json.loads(table([entry()]).to_bytes())
    doc.update(fields)
    return _resigned(doc)


@pytest.mark.parametrize(
    "data",
    [
        lambda: _signed_with(num_sms=float("inf")),  # written as Infinity
        lambda: _signed_with(num_sms=float("inf")).replace(b"Infinity", b"1e400"),  # parses as inf
        lambda: b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser recurses
        lambda: _signed_with(measured="not a list"),
    ],
    ids=["Infinity", "1e400", "deep", "measured"],
)
def test_a_damaged_tuning_table_falls_back_to_fa4s_choice_with_one_warning(cache, data):
    _write(cache, data())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = _runtime(cache)
    assert len(_ours(caught, "tuning table")) == 1, [str(w.message) for w in caught]
    assert rt.tuning == {} and rt.tuning_table is None
    assert _call(rt) == _kernel(rt, DEFAULT)


def _packed_record_offset(index_path: Path, variant_id: str) -> int:
    idx = PackedIndex(index_path)
    _, offset, length, _ = idx.records[variant_id]
    body = idx._body
    idx.close()
    return body + offset + length // 2


def test_a_damaged_candidate_record_disables_only_its_entries(cache):
    tune.write_table(cache, table([entry()]))
    _flip(cache / "packed" / H100_INDEX, _packed_record_offset(cache / "packed" / H100_INDEX, CANDIDATE.variant_id))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = _runtime(cache)  # used to raise CorruptArtifactError: one record failed the runtime
    assert len(_ours(caught, "tuning table")) == 1 and "damaged" in _ours(caught, "tuning table")[0]
    assert rt.tuning == {}
    assert _call(rt) == _kernel(rt, DEFAULT)


def test_a_damaged_candidate_cubin_falls_back_to_fa4s_choice_with_one_warning(cache):
    tune.write_table(cache, table([entry()]))
    store = Cache(cache)
    cand = next(e for e in store.entries() if e.variant_id == CANDIDATE.variant_id)
    _flip(store.blob_path(cand.blobs["cubin"]), 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = _runtime(cache)
        assert rt.tuning == {DEFAULT.variant_id: {BUCKET: CANDIDATE.variant_id}}  # not read yet
        first = _call(rt)  # in the tuned bucket: used to raise CorruptArtifactError on every call
        second = _call(rt, b=3)
    assert first == second == _kernel(rt, DEFAULT)
    assert len(_ours(caught, "tuned choice")) == 1 and "cannot be loaded" in _ours(caught, "tuned choice")[0]
    assert rt.tuning == {DEFAULT.variant_id: {}}


def test_show_tuning_reports_damaged_tables_without_a_traceback(cache):
    tune.write_table(cache, dataclasses.replace(table([entry()]), measured=({"shape": "a row without numbers"},)))
    _write(cache, _signed_with(num_sms=float("inf"), device_name="Other GPU"), device="Other GPU")
    p = run_cli("show-tuning", "--cache", str(cache), check=False)
    assert "Traceback" not in p.stderr, p.stderr
    assert "malformed measured row" in p.stdout and "tile_n=176" in p.stdout
    assert p.returncode == 1 and "other-gpu.json: ignored by the runtime" in p.stderr


# --- 3. the miss and record logs ----------------------------------------------------------------------


def _miss(rt: Runtime) -> None:
    op, lp, out, ls = combine_args(d=64)  # tests/fast.yaml builds no d64 combine
    with pytest.raises(VariantNotFoundError):
        fa4aot.combine(op, lp, out, ls, runtime=rt)


def test_a_miss_log_fifo_without_a_reader_never_blocks_the_call(built_cache, tmp_path):
    fifo = tmp_path / "misses"
    os.mkfifo(fifo)
    rt = Runtime(built_cache, driver=_h100(), miss_log=fifo)
    done = threading.Event()

    def call() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _miss(rt)
        done.set()

    threading.Thread(target=call, daemon=True).start()
    try:
        assert done.wait(HANG_SECONDS), "the call blocked opening the miss log (a FIFO without a reader)"
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # frees a blocked opener


def test_a_miss_log_fifo_with_a_reader_is_refused_with_one_warning(built_cache, tmp_path):
    fifo = tmp_path / "misses"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        rt = Runtime(built_cache, driver=_h100(), miss_log=fifo)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _miss(rt)
            with pytest.raises(VariantNotFoundError):
                fa4aot.combine(*combine_args(d=96), runtime=rt)  # another missing variant
        assert len(_ours(caught, "misses")) == 1 and "not a regular file" in _ours(caught, "misses")[0]
        assert os.read(reader, 4096) == b""  # nothing was written into the FIFO (no writer left: EOF)
    finally:
        os.close(reader)


def test_a_record_log_symlink_is_not_followed(built_cache, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "record.jsonl"
    link.symlink_to(target)
    rt = Runtime(built_cache, driver=_h100(), record_log=link)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _miss(rt)
    assert len(_ours(caught, "record.jsonl")) == 1
    assert target.read_text() == ""


def test_a_regular_miss_log_still_gets_one_line_per_variant(built_cache, tmp_path):
    log = tmp_path / "misses.jsonl"
    rt = Runtime(built_cache, driver=_h100(), miss_log=log)
    _miss(rt)
    _miss(rt)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["variant"]["params"]["head_dim"] == 64


# --- 4. cache wheels --------------------------------------------------------------------------------


def _wheel_cache(built_cache: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the fast cache serving only the packed indexes ``keep`` (a wheel of those targets)."""
    shutil.copytree(built_cache, dst, ignore=shutil.ignore_patterns("tuning", "LOCK", "tmp"))
    for p in (dst / "packed").glob("*.idx"):
        if p.name not in keep:
            p.unlink()
    return dst


def _install(site: Path, name: str, target: Path | None) -> str:
    """Register ``target`` as an installed cache wheel named ``name`` (a dist-info with the entry
    point a cache wheel declares; None: an entry point whose module is missing); returns the
    entry point's name (unique per test: imported modules stay in sys.modules)."""
    mod = f"fa4aot_cache_{name}_{re.sub(r'[^a-z0-9]', '_', site.parent.name.lower())}"
    if target is not None:
        (site / f"{mod}.py").write_text(f"def cache_dir():\n    return {str(target)!r}\n")
    dist = site / f"{mod}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {mod}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[fa4aot.caches]\n{mod} = {mod}:cache_dir\n")
    return mod


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """Where test wheels get installed (on sys.path), with no $FA4AOT_CACHE, in an empty directory."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("FA4AOT_CACHE", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return site


def test_the_cli_reads_the_cache_the_runtime_serves(built_cache, tmp_path, wheels, monkeypatch):
    from fa4aot.tools import cli

    b200 = _wheel_cache(built_cache, tmp_path / "b200", (B200_INDEX,))
    h100 = _wheel_cache(built_cache, tmp_path / "h100", (H100_INDEX,))
    _install(wheels, "a_b200", b200)  # sorts first: the runtime on an H100 passes over it
    _install(wheels, "b_h100", h100)
    rt = Runtime(driver=_h100())
    assert rt.cache.root == h100
    monkeypatch.setattr(loader, "visible_device", lambda: _h100().device_info(0), raising=False)
    assert cli._open(None).root == rt.cache.root


def test_the_cli_names_the_cache_it_reads(built_cache, tmp_path, wheels):
    h100 = _wheel_cache(built_cache, tmp_path / "h100", (H100_INDEX,))
    name = _install(wheels, "a_h100", h100)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(wheels), os.environ.get("PYTHONPATH", "")]))
    env.pop("FA4AOT_CACHE", None)
    p = run_cli("ls", env=env, cwd=tmp_path / "work")
    assert f"using the cache {h100} (wheel {name}" in p.stderr, p.stderr
    p = run_cli("reindex", env=env, cwd=tmp_path / "work", check=False)  # a writer: ./cache
    assert "using the cache cache (the default)" in p.stderr, p.stderr


def test_a_wheel_shadowing_another_for_the_same_target_is_a_warning_naming_both(built_cache, tmp_path, wheels):
    small = _install(wheels, "a_small", _wheel_cache(built_cache, tmp_path / "small", (H100_INDEX,)))
    big = _install(wheels, "b_big", _wheel_cache(built_cache, tmp_path / "big", (H100_INDEX,)))
    with pytest.warns(RuntimeWarning, match="shadows") as caught:
        rt = Runtime(driver=_h100())
    msg = _ours(list(caught), "shadows")[0]
    assert small in msg and big in msg and "sm_90a with 132 SMs" in msg
    assert rt.cache.root == tmp_path / "small"


def test_a_damaged_wheel_is_reported_not_skipped_silently(built_cache, tmp_path, wheels):
    damaged = _wheel_cache(built_cache, tmp_path / "damaged", (H100_INDEX,))
    _flip(damaged / "packed" / H100_INDEX, 200)  # inside the hashed header
    name = _install(wheels, "a_damaged", damaged)
    broken = _install(wheels, "b_broken", None)  # its entry point's module is missing
    shutil.copytree(built_cache, tmp_path / "work" / "cache", ignore=shutil.ignore_patterns("tuning", "LOCK"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt = Runtime(driver=_h100())
    assert str(rt.cache.root) == "cache"  # ./cache serves, as before ...
    assert len(_ours(caught, name)) == 1 and "corrupt" in _ours(caught, name)[0]  # ... but not silently
    assert len(_ours(caught, broken)) == 1


@pytest.mark.parametrize("how", ["world-writable", "other-owner"])
def test_a_cache_others_can_write_gets_a_warning(built_cache, tmp_path, wheels, how):
    root = _wheel_cache(built_cache, tmp_path / "h100", (H100_INDEX,))
    _install(wheels, "a_h100", root)
    if how == "world-writable":
        root.chmod(0o777)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(root / "packed" / H100_INDEX, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="can be changed by other users") as caught:
        Runtime(driver=_h100())
    why = "writable by every user" if how == "world-writable" else "owned by another user"
    assert len(_ours(list(caught), "other users")) == 1 and why in _ours(list(caught), "other users")[0]


# --- 5. entries of another fa4aot with the same shim ABI ---------------------------------------------


def test_an_entry_built_by_another_fa4aot_with_the_same_shim_abi_is_a_miss(cache, tmp_path):
    from fa4aot.compile.store import CacheWriter
    from fa4aot.core.variant import cache_key

    w = CacheWriter(cache)
    mine = next(e for e in w.entries() if e.variant_id == DEFAULT.variant_id)
    other = dict(mine.meta, created=mine.meta["created"] + 10)
    other["toolchain"] = dict(mine.meta["toolchain"], **{"kernels-src": "0" * 16})
    other.pop("blobs")
    key = cache_key(mine.variant, other["toolchain"], mine.host_arch)  # its own key, as its build made it
    w.put(key, other, {role: w.read_blob(mine, role) for role in mine.blobs})
    w.write_packed()
    w.close()
    log = tmp_path / "misses.jsonl"
    rt = Runtime(cache, driver=_h100(), miss_log=log)
    assert rt.index.entry(DEFAULT.variant_id).key == key  # the newest, as packed
    with pytest.raises(VariantNotFoundError, match="only as built by another fa4aot .*kernels-src 0000"):
        rt.load(DEFAULT)
    assert json.loads(log.read_text())["id"] == DEFAULT.variant_id
    assert rt.load(CANDIDATE).entry.meta["toolchain"] == mine.meta["toolchain"]  # this fa4aot's: loads


@pytest.mark.skipif(not HAS_DSL, reason="the build fingerprint needs the build extra")
def test_the_runtime_knows_its_own_toolchain_as_the_build_computes_it():
    from fa4aot.compile.toolchain import fingerprint

    built = fingerprint()
    assert loader.own_toolchain() == {k: built[k] for k in loader.OWN_TOOLCHAIN_PARTS}


def test_a_record_moved_under_another_key_never_loads(built_cache, tmp_path):
    """The runtime recomputes an entry's key from its record at load, as install and pull do: a
    record stored under a key it does not hash to is refused, and nothing is loaded."""
    from fa4aot.compile.store import CacheWriter
    from fa4aot.core.errors import CorruptArtifactError

    src = Cache(built_cache)
    e = next(x for x in src.entries() if x.variant.family == "fwd_sm90")
    blobs = {role: src.read_blob(e, role) for role in e.blobs}
    dst = CacheWriter(tmp_path / "moved")
    dst.put("f" * 32, {k: v for k, v in e.meta.items() if k != "blobs"}, blobs)
    dst.write_packed()
    drv = FakeDriver(cc=(9, 0), num_sms=132)
    rt = Runtime(tmp_path / "moved", driver=drv)
    with pytest.raises(CorruptArtifactError, match="not the key its record hashes to"):
        rt.load(e.variant)
    assert drv.libraries == []
