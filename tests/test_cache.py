"""The artifact cache: atomic puts, integrity checks, concurrency, kill -9, gc, read-only use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import HAS_DSL, combine_variant, run_cli

from fa4aot.compile.store import CacheWriter
from fa4aot.core.errors import CacheError, CorruptArtifactError
from fa4aot.core.index import Cache
from fa4aot.core.variant import Target, Variant, cache_key

TARGET = Target("b200", "sm_100a", 148)


def _meta(v: Variant) -> dict:
    return {"variant": v.to_dict(), "target": TARGET.to_dict(), "toolchain": {"x": "1"}, "host_arch": "x86_64"}


def test_put_get_roundtrip(tmp_path):
    cache = CacheWriter(tmp_path)
    v = combine_variant(1)
    key = cache_key(v, {"x": "1"}, "x86_64")
    assert cache.get(key) is None
    entry = cache.put(key, _meta(v), {"cubin": b"c" * 100, "plan": b"p" * 10})
    got = cache.get(key)
    assert got == entry and got.variant == v
    assert cache.read_blob(got, "cubin") == b"c" * 100
    # blobs are plain files named by content: external tools can read them
    assert cache.blob_path(got.blobs["cubin"]).read_bytes() == b"c" * 100
    assert [e.key for e in cache.entries()] == [key]
    assert cache.resolve(key[:8]).key == key


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_blob_is_never_served(tmp_path, damage):
    cache = CacheWriter(tmp_path)
    v = combine_variant(2)
    entry = cache.put("k", _meta(v), {"cubin": bytes(range(256)) * 8})
    path = cache.blob_path(entry.blobs["cubin"])
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-1]))
    else:
        path.unlink()
    with pytest.raises(CorruptArtifactError, match="cubin of entry k"):
        cache.read_blob(entry, "cubin")
    # a rebuild (same put) repairs the blob
    cache.put("k", _meta(v), {"cubin": bytes(range(256)) * 8})
    assert cache.read_blob(cache.get("k"), "cubin") == bytes(range(256)) * 8


def test_readonly_open_writes_nothing(tmp_path):
    cache = CacheWriter(tmp_path)
    cache.put("k", _meta(combine_variant(3)), {"cubin": b"x"})
    cache.close()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    ro = Cache(tmp_path)
    assert ro.get("k") is not None and len(ro.entries()) == 1
    assert not hasattr(ro, "put")  # the reader has no write path at all
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert before == after
    with pytest.raises(CacheError, match="not an fa4aot cache"):
        Cache(tmp_path / "missing")


def test_gc_removes_orphans_but_not_fresh_files(tmp_path):
    cache = CacheWriter(tmp_path)
    e = cache.put("k", _meta(combine_variant(5)), {"cubin": b"keep"})
    orphan = cache.root / "blobs" / "zz" / "orphan.cubin"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"old")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))
    fresh = cache.root / "tmp" / "inflight.tmp"
    fresh.write_bytes(b"new")
    stats = cache.gc()
    assert stats["files_removed"] == 1 and not orphan.exists() and fresh.exists()
    assert cache.read_blob(cache.get("k"), "cubin") == b"keep"
    stats = cache.gc(keep=set())
    assert stats["entries_removed"] == 1 and cache.get("k") is None
    cache.gc(grace_seconds=0)
    assert not cache.blob_path(e.blobs["cubin"]).exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import fa4aot.compile.store as c
    orig = c._atomic_write
    n = {"i": 0}
    def slow(tmp_dir, path, data):
        orig(tmp_dir, path, data)
        n["i"] += 1
        print("wrote", n["i"], flush=True)
        time.sleep(30)  # killed here, between blob writes and the index record
    c._atomic_write = slow
    cache = c.CacheWriter(sys.argv[1])
    cache.put("victim", {"variant": %r, "target": %r, "toolchain": {}, "host_arch": "x86_64"},
              {"cubin": b"a" * 1000, "plan": b"b" * 1000})
    """
)


def test_sigkill_mid_put_leaves_no_valid_entry(tmp_path):
    CacheWriter(tmp_path).put("other", _meta(combine_variant(6)), {"cubin": b"ok"})
    script = KILL_SCRIPT % (combine_variant(7).to_dict(), TARGET.to_dict())
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("wrote 1")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = CacheWriter(tmp_path)
    assert cache.get("victim") is None
    assert [e.key for e in cache.entries()] == ["other"]
    assert cache.read_blob(cache.get("other"), "cubin") == b"ok"
    # the blob written before the kill is an orphan that gc removes
    assert CacheWriter(tmp_path).gc(grace_seconds=0)["files_removed"] >= 1


SMALL_MANIFEST = """
target: {name: h100, arch: sm_90a, num_sms: 132}
families:
  combine:
    - head_dim: [64, 128]
      num_head: 16
      max_splits: 32
  prepare:
    - heads: [16, 4]
      max_batch: 62
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DSL, reason="needs the build extra to compile kernels")
def test_concurrent_builds_end_consistent(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(SMALL_MANIFEST)
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fa4aot.tools.cli", "build", str(m), "--cache", str(cache), "-j", "1", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, out + err
    c = Cache(cache)
    assert len(c.entries()) == 4  # two combine + two prepare buckets, each once
    out = run_cli("verify", "--cache", str(cache))
    assert "4 ok, 0 bad" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DSL, reason="needs the build extra to compile kernels")
def test_build_killed_midway_then_verify_and_resume(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(SMALL_MANIFEST.replace("max_batch: 62", "max_batch: 992"))
    cache = tmp_path / "cache"
    p = subprocess.Popen(
        [sys.executable, "-m", "fa4aot.tools.cli", "build", str(m), "--cache", str(cache), "-j", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # wait for the first stored entry, then kill the whole build (parent and workers)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = p.stderr.readline()
        if "built" in line:
            break
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    n_before = len(Cache(cache).entries())
    assert 1 <= n_before < 8
    assert "0 bad" in run_cli("verify", "--cache", str(cache)).stdout
    out = run_cli("build", str(m), "--cache", str(cache), "-q")
    total = next(ln for ln in out.stdout.splitlines() if ln.startswith("total")).split()[1:5]
    assert total == [str(8 - n_before), str(n_before), "0", "0"]  # built, cached, reused, failed
    assert len(Cache(cache).entries()) == 8


@pytest.mark.skipif(not HAS_DSL, reason="needs the build extra to compile kernels")
def test_verify_catches_flipped_and_truncated_artifacts(built_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built_cache, copy)
    cache = Cache(copy)
    entries = cache.entries()
    cubin_path = cache.blob_path(entries[0].blobs["cubin"])
    data = bytearray(cubin_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cubin_path.write_bytes(bytes(data))
    header_path = cache.blob_path(entries[1].blobs["header"])
    header_path.write_bytes(header_path.read_bytes()[:-100])
    (packed,) = [p for p in (copy / "packed").iterdir() if p.name.startswith("sm_90a")]
    raw = bytearray(packed.read_bytes())
    raw[-10] ^= 0x01  # inside the last record
    packed.write_bytes(bytes(raw))
    out = run_cli("verify", "--cache", str(copy), check=False)
    assert out.returncode == 1
    assert f"{len(entries) - 2} ok, 2 bad" in out.stdout
    assert "cubin of entry" in out.stderr and "header of entry" in out.stderr
    assert "packed indexes: 1 problem" in out.stdout and "record of" in out.stderr
    with pytest.raises(CorruptArtifactError):
        cache.read_cubin(entries[0])


def test_malformed_index_record_is_reported(tmp_path):
    cache = CacheWriter(tmp_path)
    cache.put("good", _meta(combine_variant(8)), {"cubin": b"x"})
    cache._writer().set("bad", json.dumps({"variant": {}}))
    from fa4aot.tools.verify import verify

    n, problems = verify(Cache(tmp_path), run_plans=False)
    assert n == 2 and any(p.key == "bad" and "malformed" in p.what for p in problems)


def test_verify_loads_each_selector_once_and_reports_a_bad_one_per_entry(built_cache, tmp_path, monkeypatch):
    """Entries share FA4's selector module: verify loads each distinct one once, and reports a
    module that does not load on every entry that carries it."""
    from fa4aot.core import selector
    from fa4aot.tools.verify import verify

    copy = tmp_path / "copy"
    shutil.copytree(built_cache, copy)
    good = Cache(copy)
    entries = [e for e in good.entries() if "selector" in e.blobs]
    writer = CacheWriter(copy)
    for e in entries[:2]:  # the same records, but a selector that does not compile
        blobs = {r: good.read_blob(e, r) for r in e.blobs} | {"selector": b"def broken(:\n"}
        writer.put(e.key, {k: v for k, v in e.meta.items() if k != "blobs"}, blobs)
    loads = []
    real = selector.load
    monkeypatch.setattr(selector, "load", lambda source, origin: loads.append(origin) or real(source, origin))
    n, problems = verify(Cache(copy), run_plans=False)
    bad = [p for p in problems if "does not compile" in p.what]
    others = [p for p in problems if not p.key.startswith("packed/")]  # the packed index differs, rightly
    assert n == len(good.entries()) and len(others) == len(bad) == 2
    assert {p.key for p in bad} == {e.key for e in entries[:2]}
    assert len(loads) == 2  # the good module and the bad one, once each
