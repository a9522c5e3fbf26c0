"""The manifest-driven build (tests/fast.yaml in the fast tier, manifests/ci.yaml in the full one),
what makes a key change, reuse of another cache's entries, and byte identity with FA4's JIT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CI_MANIFEST, FAST_MANIFEST, HAS_DSL, needs_dsl, run_cli

from fa4aot.compile import manifest, toolchain
from fa4aot.core.index import Cache
from fa4aot.core.targets import ARCHES
from fa4aot.core.variant import Variant, cache_key


def _builds_every_variant_for_every_arch(cache_dir: Path, manifest_path: Path) -> None:
    cache = Cache(cache_dir)
    entries = cache.entries()
    plan = manifest.load(manifest_path)
    assert {e.variant_id for e in entries} >= {pv.variant.variant_id for pv in plan.variants}
    assert {e.meta["cubin_arch"] for e in entries} == set(ARCHES)  # every arch of fa4aot's table
    assert {e.variant.family for e in entries} == {
        "fwd_sm100", "fwd_sm90", "fwd_sm120", "combine", "prepare", "bwd_sm90", "bwd_sm100", "bwd_sm120", "bwd_pre",
        "bwd_post",
    }  # fmt: skip
    out = run_cli("verify", "--cache", str(cache_dir))
    assert f"verified {len(entries)} entries: {len(entries)} ok, 0 bad" in out.stdout


def test_fast_manifest_builds_every_family_for_every_arch(built_cache):
    _builds_every_variant_for_every_arch(built_cache, FAST_MANIFEST)


@pytest.mark.slow
def test_ci_manifest_builds_every_variant_for_every_arch(ci_cache):
    _builds_every_variant_for_every_arch(ci_cache, CI_MANIFEST)


def test_sm100_forward_entry_shows_threads_and_parameter_table(built_cache):
    cache = Cache(built_cache)
    (entry,) = [
        e
        for e in cache.entries()
        if e.variant.family == "fwd_sm100"
        and e.variant.fields["use_2cta_instrs"]
        and e.variant.fields["qhead_per_kvhead"] == 1
    ]
    out = run_cli("show", entry.key[:10], "--cache", str(built_cache)).stdout
    k = entry.meta["kernels"][0]
    assert "block [512, 1, 1]" in out
    assert f"{len(k['params'])} params, {k['cbank_param_size']} bytes" in out
    for o, off, size in k["params"]:
        assert f"param {o:>2}  offset 0x{off:03x}  size {size}" in out
    assert "smem 232448 cluster [2, 1, 1]" in out


def _build_totals(stdout: str) -> dict[str, int]:
    """The counts on the build table's total line."""
    head = next(ln for ln in stdout.splitlines() if ln.startswith("family")).split()[1:5]
    total = next(ln for ln in stdout.splitlines() if ln.startswith("total")).split()[1:5]
    assert head == ["built", "cached", "reused", "failed"], head
    return dict(zip(head, map(int, total)))


def test_second_build_compiles_nothing(built_cache):
    t0 = time.perf_counter()
    out = run_cli("build", str(FAST_MANIFEST), "--cache", str(built_cache), "-q")
    elapsed = time.perf_counter() - t0
    n = len(manifest.load(FAST_MANIFEST).variants)
    assert _build_totals(out.stdout) == {"built": 0, "cached": n, "reused": 0, "failed": 0}
    assert elapsed < 60


@pytest.mark.slow
@needs_dsl
def test_reuse_copies_entries_of_the_same_key_and_compiles_the_rest(built_cache, tmp_path):
    """`build --reuse`: an entry another cache holds under the same key is copied (blobs
    identical, record the same but for its origin and time), what it lacks is compiled, and a
    damaged or mislabelled source entry is compiled instead of copied."""
    from fa4aot.compile.store import CacheWriter

    src = Cache(built_cache)
    m = tmp_path / "m.yaml"
    m.write_text(
        "target: {name: rtx-pro-6000, arch: sm_120a, num_sms: 188}\nfamilies:\n"
        "  fwd_sm120:\n    - {head_dims: [[128, 128]], qhead_per_kvhead: 4, causal: true}\n"
        "  combine:\n    - {head_dim: 128, num_head: [16, 8], max_splits: 128}\n"
    )
    wanted = {pv.variant.variant_id for pv in manifest.load(m).variants}
    have = [e for e in src.entries() if e.variant_id in wanted]  # the session cache lacks the 8-head combine
    assert len(wanted) == 3 and {e.variant.family for e in have} == {"fwd_sm120", "combine"} and len(have) == 2
    out = run_cli("build", str(m), "--cache", str(tmp_path / "a"), "--reuse", str(built_cache), "-q")
    assert _build_totals(out.stdout) == {"built": 1, "cached": 0, "reused": 2, "failed": 0}
    a = Cache(tmp_path / "a")
    for e in have:
        copy = a.get(e.key)
        assert copy is not None and copy.blobs == e.blobs
        drop = ("created", "origin")
        assert {k: v for k, v in copy.meta.items() if k not in drop} == {
            k: v for k, v in e.meta.items() if k not in drop
        }
    assert "0 bad" in run_cli("verify", "--cache", str(tmp_path / "a")).stdout
    # a source whose record for a key names another variant (its blobs: that variant's) is not copied
    bad = tmp_path / "bad"
    shutil.copytree(built_cache, bad)
    fwd = next(e for e in have if e.variant.family == "fwd_sm120")
    comb = next(e for e in have if e.variant.family == "combine")
    w = CacheWriter(bad)
    w.put(
        fwd.key, {k: v for k, v in comb.meta.items() if k != "blobs"}, {r: src.read_blob(comb, r) for r in comb.blobs}
    )
    w.close()
    out = run_cli("build", str(m), "--cache", str(tmp_path / "b"), "--reuse", str(bad), "-q")
    assert _build_totals(out.stdout) == {"built": 2, "cached": 0, "reused": 1, "failed": 0}
    assert Cache(tmp_path / "b").get(fwd.key).blobs == fwd.blobs  # compiled: FA4's bytes again
    p = run_cli("build", str(m), "--cache", str(tmp_path / "c"), "--reuse", str(tmp_path / "nothing"), check=False)
    assert p.returncode == 2 and "nothing" in p.stderr and not (tmp_path / "c").exists()


def test_key_changes_with_versions_sources_and_host():
    v = Variant.make("combine", "sm_90a", 132, head_dim=128)
    tc = {"nvidia-cutlass-dsl": "4.8.1", "flash-attn-4": "4.0.0b36", "kernels-src": "abc"}
    base = cache_key(v, tc, "x86_64")
    assert cache_key(v, dict(tc), "x86_64") == base
    assert cache_key(v, {**tc, "flash-attn-4": "4.0.0b37"}, "x86_64") != base
    assert cache_key(v, {**tc, "nvidia-cutlass-dsl": "4.8.2"}, "x86_64") != base
    assert cache_key(v, {**tc, "kernels-src": "abd"}, "x86_64") != base
    assert cache_key(v, tc, "aarch64") != base
    assert cache_key(Variant.make("combine", "sm_90a", 148, head_dim=128), tc, "x86_64") != base
    assert cache_key(Variant.make("combine", "sm_90a", 132, head_dim=64), tc, "x86_64") != base


def test_key_is_stable_across_processes():
    code = (
        "from fa4aot.core.variant import Variant, cache_key;"
        "print(cache_key(Variant.make('prepare','sm_100a',148,b=1,a=2),{'x':'1'},'x86_64'))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in range(2)}
    assert len(outs) == 1
    assert outs.pop().strip() == cache_key(Variant.make("prepare", "sm_100a", 148, a=2, b=1), {"x": "1"}, "x86_64")


@needs_dsl
def test_kernels_source_edit_changes_fingerprint(tmp_path, monkeypatch):
    base = dict(toolchain.fingerprint())
    copy = tmp_path / "kernels"
    shutil.copytree(toolchain.kernels_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(toolchain, "kernels_dir", lambda: copy)
    toolchain.fingerprint.cache_clear()
    try:
        assert toolchain.fingerprint() == base
        (copy / "combine.py").write_text((copy / "combine.py").read_text() + "\n# edit\n")
        toolchain.fingerprint.cache_clear()
        edited = toolchain.fingerprint()
        assert edited["kernels-src"] != base["kernels-src"]
        assert {k for k in base if base[k] != edited[k]} == {"kernels-src"}
    finally:
        toolchain.fingerprint.cache_clear()


def test_build_reports_a_failing_variant_and_continues(tmp_path, monkeypatch):
    if not toolchain.shutil.which("cc") and not toolchain.shutil.which("gcc"):
        pytest.skip("no C compiler")
    m = tmp_path / "m.yaml"
    m.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\n"
        "families:\n  prepare:\n    - heads: [16, 4]\n      max_batch: 62\n"
    )
    pytest.importorskip("cutlass")
    # Make one variant fail: the prepare module rejects num_warps 2.
    code = (
        "import sys, fa4aot_kernels.prepare as p;"
        "orig = p.make_entry\n"
        "def bad(v, t):\n"
        "    if v.fields['num_warps'] == 2: raise ValueError('injected failure')\n"
        "    return orig(v, t)\n"
        "p.make_entry = bad\n"
        "from fa4aot.compile import orchestrate, worker\n"
        "import concurrent.futures as cf\n"
        "class P(cf.ThreadPoolExecutor):\n"
        "    def __init__(self, max_workers, **kw): super().__init__(max_workers)\n"
        "orchestrate._pool = lambda target, n: (worker.configure(target), P(n))[1]\n"
        "r = orchestrate.build(sys.argv[1], sys.argv[2], 1)\n"
        "print([(row.status, row.variant.fields['num_warps'], row.error) for row in r.rows]); sys.exit(0 if r.ok else 1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(m), str(tmp_path / "c")], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "('built', 1, None)" in proc.stdout and "('failed', 2, 'ValueError: injected failure')" in proc.stdout


FA4_CUBIN = r"""
import glob, json, os, sys
arch, sms, cases, dump = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
os.environ.update(FLASH_ATTENTION_ARCH=arch, CUTE_DSL_ARCH=arch, FLASH_ATTENTION_NUM_SMS=sms,
                  CUTE_DSL_KEEP="cubin", CUTE_DSL_DUMP_DIR=dump, CUTE_DSL_LOG_LEVEL="0")
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(sms))
from flash_attn.cute import interface as I
from fa4aot.tools.fa4_calls import fa4_forward
paths = []
for i, case in enumerate(cases):
    with FakeTensorMode():
        fa4_forward(I, torch, case)
    # move this call's cubin aside: the next call's file may have the same name
    os.makedirs(f"{dump}/{i}")
    paths.append([os.rename(p, f"{dump}/{i}/{os.path.basename(p)}") or f"{dump}/{i}/{os.path.basename(p)}"
                  for p in glob.glob(dump + "/*.cubin")])
print(json.dumps(paths))
"""

#: One call per kind whose cubin is compared with FA4's (manifests/ci.yaml builds each on both arches).
CUBIN_CASES = {
    "dense": dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128),
    "dense-causal": dict(
        batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True
    ),
    "paged-tma": dict(batch=4, seqlen_q=1, seqlen_k=1000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
                      causal=True, seqused_k=True, page_size=128),
    "paged-cpasync": dict(batch=4, seqlen_q=1, seqlen_k=1000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
                          causal=True, seqused_k=True, page_size=16),
    "paged-chunked-prefill": dict(batch=4, seqlen_q=300, seqlen_k=1000, nheads=32, nheads_kv=8, head_dim=128,
                                  head_dim_v=128, causal=True, varlen_q=True, total_q=900, seqused_k=True,
                                  page_size=128, return_lse=True),
    "sink-window": dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64,
                        causal=True, wl=128, wr=0, learnable_sink="bf16"),
    "softcap": dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=8, head_dim=128, head_dim_v=128,
                    causal=True, softcap=50.0),
    "softcap-hd256": dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=8, nheads_kv=4, head_dim=256,
                          head_dim_v=256, causal=True, softcap=50.0),
}  # fmt: skip


@pytest.fixture(scope="module")
def fa4_cubins(tmp_path_factory):
    """FA4's own JIT cubins for CUBIN_CASES on each arch (one FA4 process per arch)."""
    import json

    if not HAS_DSL:
        pytest.skip("needs the build extra (CUTLASS DSL + flash-attn-4)")
    out = {}
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    for arch, sms in (("sm_90a", 132), ("sm_100a", 148)):
        dump = tmp_path_factory.mktemp(f"fa4-{arch}")
        proc = subprocess.run(
            [sys.executable, "-c", FA4_CUBIN, arch, str(sms), json.dumps(list(CUBIN_CASES.values())), str(dump)],
            capture_output=True,
            text=True,
            env=env,
            timeout=1200,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        paths = json.loads(proc.stdout.strip().splitlines()[-1])
        out[arch] = dict(zip(CUBIN_CASES, paths))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch, sms", [("sm_90a", 132), ("sm_100a", 148)])
@pytest.mark.parametrize("kind", list(CUBIN_CASES))
def test_cubins_are_the_ones_fa4_builds(ci_cache, fa4_cubins, arch, sms, kind, tmp_path):
    """The variant dispatch picks for a call has exactly the cubin FA4's own JIT builds for it
    (a variant manifests/ci.yaml does not hold is built from the manifest line its miss names)."""
    from fa4aot.core import fwd
    from fa4aot.core.manifest_text import describe_missing
    from fa4aot.tools.fa4_calls import decide, facts

    (path,) = fa4_cubins[arch][kind]
    fa4 = open(path, "rb").read()
    case = CUBIN_CASES[kind]
    v = Variant.make("fwd_sm90" if arch == "sm_90a" else "fwd_sm100", arch, sms, **decide(arch, sms, case).fields)
    cache = Cache(ci_cache)
    if not any(e.variant_id == v.variant_id for e in cache.entries()):
        line = describe_missing(v, fwd.call_group(facts(arch, sms, case)))
        group = line.split(": - ", 1)[1].rsplit("  (target", 1)[0]
        m = tmp_path / "miss.yaml"
        m.write_text(f"target: {{name: t, arch: {arch}, num_sms: {sms}}}\nfamilies:\n  {v.family}:\n    - {group}\n")
        run_cli("build", str(m), "--cache", str(tmp_path / "c"), "--reuse", str(ci_cache), "-q")
        cache = Cache(tmp_path / "c")
    (entry,) = [e for e in cache.entries() if e.variant_id == v.variant_id][-1:]
    assert cache.read_cubin(entry) == fa4


@pytest.mark.slow
@needs_dsl
def test_builds_are_byte_identical_across_directories_and_job_counts(tmp_path):
    """Same manifest, toolchain and sources: the same blobs, whatever the directory, -j or time."""
    m = tmp_path / "small.yaml"
    m.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  combine:\n    - head_dim: [64, 128]\n"
        "      num_head: 8\n  prepare:\n    - heads: [8, 2]\n      max_batch: 31\n"
    )
    blobs = []
    for d, j in (("a", "1"), ("deeper/b", "2")):
        run_cli("build", str(m), "--cache", str(tmp_path / d), "-j", j, "-q")
        blobs.append(
            {k: sorted(b["sha256"] for b in json.loads(t)["blobs"].values()) for k, t in Cache(tmp_path / d).records()}
        )
    assert blobs[0] == blobs[1] and len(blobs[0]) == 3


@pytest.mark.slow
@needs_dsl
def test_verify_rebuild_sample_catches_a_swapped_blob(tmp_path):
    from fa4aot.compile.store import CacheWriter

    m = tmp_path / "small.yaml"
    m.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  combine:\n    - head_dim: [64, 128]\n      num_head: 8\n"
    )
    cache = tmp_path / "c"
    run_cli("build", str(m), "--cache", str(cache), "-q")
    out = run_cli("verify", "--cache", str(cache), "--rebuild-sample", "2").stdout
    assert "rebuilt 2 sampled entries: 2 byte-identical" in out
    # a blob built with another option (the other head dim) put in place of one entry's header
    a, b = sorted(Cache(cache).entries(), key=lambda e: e.variant.fields["head_dim"])
    w = CacheWriter(cache)
    meta = {k: v for k, v in a.meta.items() if k != "blobs"}
    c = Cache(cache)
    w.put(a.key, meta, {"cubin": c.read_cubin(a), "plan": c.read_blob(a, "plan"), "header": c.read_blob(b, "header")})
    w.close()
    p = run_cli("verify", "--cache", str(cache), "--no-plans", "--rebuild-sample", "2", check=False)
    assert p.returncode == 1 and "REBUILD DIFFERENT" in p.stderr and "header" in p.stderr


@pytest.mark.slow
@needs_dsl
def test_verify_against_fa4_compares_sampled_entries_with_fa4s_own_jit(ci_cache):
    """Every sampled forward entry of the CI cache has exactly the cubin FA4's interface
    compiles for a call that makes FA4 pick that configuration; tuning candidates are skipped."""
    out = run_cli("verify", "--cache", str(ci_cache), "--no-plans", "--against-fa4", "--sample", "4", "--seed", "7")
    assert "against FA4's JIT: " in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("against FA4's JIT"))
    same, of = line.split(": ")[1].split(" cubins")[0].split(" of ")
    assert same == of and int(of) >= 3, out.stdout + out.stderr


@pytest.mark.slow
@needs_dsl
def test_every_combine_and_prepare_entry_is_byte_identical_to_fa4s_jit(ci_cache):
    """Combine entries compiled through FA4's _flash_attn_fwd_combine, prepare entries through its
    _get_scheduler_metadata, on every arch of the CI cache."""
    from fa4aot.tools.against_fa4 import compare

    cache = Cache(ci_cache)
    entries = [e for e in cache.entries() if e.variant.family in ("combine", "prepare")]
    results = compare(cache, entries)
    assert {r.status for r in results} == {"identical"}, [
        (r.entry.variant.label(), r.status, r.detail) for r in results
    ]
    assert {(r.entry.variant.family, r.entry.target.arch) for r in results} >= {
        ("prepare", "sm_100a"),
        ("prepare", "sm_90a"),
        ("combine", "sm_90a"),
        ("combine", "sm_100a"),
        ("combine", "sm_103a"),
        ("combine", "sm_120a"),
    }


@pytest.mark.nightly
def test_every_b200_entry_is_byte_identical_to_fa4s_jit(tmp_path):
    """On demand (python -m pytest -m nightly): all of manifests/b200.yaml against FA4's JIT."""
    if not HAS_DSL:
        pytest.skip("needs the build extra")
    cache = Path(os.environ.get("FA4AOT_B200_CACHE") or tmp_path / "b200")
    run_cli("build", str(Path(CI_MANIFEST).parent / "b200.yaml"), "--cache", str(cache), "-q")
    out = run_cli("verify", "--cache", str(cache), "--no-plans", "--against-fa4", check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_a_stopped_build_pool_kills_a_worker_that_ignores_sigterm():
    """Ctrl-C stops a build's pool at once: a worker whose SIGTERM does not end it (deferred inside
    a native compile, or handled by a library) is killed after the grace period, so the build's
    exit never waits on it."""
    import concurrent.futures as cf
    import multiprocessing
    import signal

    from fa4aot.compile import orchestrate

    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(
        1, mp_context=ctx, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_IGN)
    )
    assert pool.submit(os.getpid).result(timeout=60) > 0  # the worker is up, SIGTERM ignored
    (proc,) = pool._processes.values()
    pool.submit(time.sleep, 120)
    time.sleep(0.3)
    t0 = time.monotonic()
    orchestrate._stop(pool)
    # the pool's own thread may reap the worker first: its exit code shows up there a moment later
    while proc.is_alive() and time.monotonic() - t0 < orchestrate.STOP_GRACE_S + 3:
        time.sleep(0.05)
    assert not proc.is_alive()
