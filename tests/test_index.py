"""The packed per-target index the runtime opens: written by builds, hash-checked, read lazily,
rewritten by `fa4aot reindex`, and a full-index fallback for caches without it."""

from __future__ import annotations

import shutil

import pytest
from fake_driver import FakeDriver
from helpers import run_cli

from fa4aot.compile.store import CacheWriter
from fa4aot.core.errors import CacheError, CorruptArtifactError
from fa4aot.core.index import PACKED_MAGIC, Cache, PackedIndex, PackedKey, pack_index
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, Variant
from fa4aot.plan.abi import SHIM_ABI
from fa4aot.runtime.loader import Runtime


def _copy(built_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    return copy


def test_build_writes_one_packed_index_per_target(built_cache):
    cache = Cache(built_cache)
    assert [(k.arch, k.num_sms, k.shim_abi) for k in cache.packed_targets()] == [
        ("sm_100a", 148, SHIM_ABI),
        ("sm_103a", 148, SHIM_ABI),
        ("sm_110a", 20, SHIM_ABI),
        ("sm_120a", 188, SHIM_ABI),
        ("sm_90a", 132, SHIM_ABI),
    ]
    for key in cache.packed_targets():
        packed = cache.open_packed(key)
        entries = [e for e in cache.entries() if e.target.arch == key.arch]
        assert set(packed.records) == {e.variant_id for e in entries}
        for e in entries:
            assert packed.entry(e.variant_id).meta == e.meta


def test_runtime_opens_from_the_packed_index_alone(built_cache, tmp_path):
    copy = _copy(built_cache, tmp_path)
    shutil.rmtree(copy / "index")  # the CLI's full index: the runtime never reads it
    rt = Runtime(copy, driver=FakeDriver())
    assert rt.target.arch == "sm_90a" and len(rt.variant_ids()) == len(rt.index)
    assert rt.preload("all") == len(rt.index)


def test_corrupt_packed_header_fails_open_and_corrupt_record_fails_its_variant(built_cache, tmp_path):
    copy = _copy(built_cache, tmp_path)
    (path,) = [p for p in (copy / "packed").iterdir() if p.name.startswith("sm_90a")]
    good = path.read_bytes()
    header_at = good.index(b"\n", len(PACKED_MAGIC)) + 5
    path.write_bytes(good[:header_at] + bytes([good[header_at] ^ 1]) + good[header_at + 1 :])
    with pytest.raises(CorruptArtifactError, match="header does not match"):
        Runtime(copy, driver=FakeDriver())
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # inside the last record
    rt = Runtime(copy, driver=FakeDriver())
    packed = PackedIndex(path)
    last = max(packed.records, key=lambda vid: packed.records[vid][1])
    others = [vid for vid in packed.records if vid != last]
    rt.preload(others)
    with pytest.raises(CorruptArtifactError, match=f"record of {last} is corrupt"):
        rt.preload([last])
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CorruptArtifactError):
        Runtime(copy, driver=FakeDriver()).preload("all")


def test_reindex_rewrites_packed_indexes_and_runtime_falls_back_without_them(built_cache, tmp_path):
    copy = _copy(built_cache, tmp_path)
    want = sorted(p.name for p in (copy / "packed").glob("*.idx"))
    shutil.rmtree(copy / "packed")
    rt = Runtime(copy, driver=FakeDriver())  # reads the full index instead
    assert len(rt.index) == len([e for e in Cache(copy).entries() if e.target.arch == "sm_90a"])
    out = run_cli("reindex", "--cache", str(copy))
    assert sorted(p.name for p in (copy / "packed").glob("*.idx")) == want and "wrote" in out.stdout
    assert len(Runtime(copy, driver=FakeDriver()).index) == len(rt.index)
    bad = run_cli("reindex", "--cache", str(tmp_path / "nothing"), check=False)
    assert bad.returncode != 0 and "not an fa4aot cache" in bad.stderr
    assert not (tmp_path / "nothing").exists()


def test_newest_entry_of_a_variant_wins_in_the_packed_index(tmp_path):
    cache = CacheWriter(tmp_path)
    target = Target("h100", "sm_90a", 132)
    v = Variant.make("combine", "sm_90a", 132, head_dim=128)
    meta = {"variant": v.to_dict(), "target": target.to_dict(), "toolchain": {}, "host_arch": "x86_64", "shim_abi": 7}
    cache.put("old", dict(meta, created=1.0), {"plan": b"1"})
    cache.put("new", dict(meta, created=2.0), {"plan": b"2"})
    cache.put("stale-format", dict(meta, created=3.0, format=1), {"plan": b"3"})
    cache.write_packed()
    packed = Cache(tmp_path).open_packed(PackedKey("sm_90a", 132, "x86_64", 7))
    assert packed.entry(v.variant_id).key == "new"


def test_packed_index_rejects_another_format(tmp_path):
    target = Target("h100", "sm_90a", 132)
    raw = pack_index(target, "x86_64", [])
    raw = raw.replace(f'"format":{CACHE_FORMAT_VERSION}'.encode(), b'"format":9')
    # the header hash covers the format: rehash so that only the format is wrong
    import hashlib

    start = raw.index(b"\n", len(PACKED_MAGIC)) + 1
    header = raw[start:]
    line = f"{hashlib.sha256(header).hexdigest()} {len(header)}\n".encode()
    (tmp_path / "x.idx").write_bytes(PACKED_MAGIC + line + header)
    with pytest.raises(CacheError, match="format 9"):
        PackedIndex(tmp_path / "x.idx")
