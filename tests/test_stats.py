"""Runtime.stats() / fa4aot.stats() on the fake driver: every counter is checked against what the
fake driver recorded (launches, libraries loaded) or what the test itself caused, never against
another counter of the code under test."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import pytest
from fake_driver import FakeDriver

import fa4aot
from fa4aot.core.errors import CorruptArtifactError, VariantNotFoundError
from fa4aot.core.index import Cache
from fa4aot.runtime import loader
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.stats import RuntimeStats
from fa4aot.runtime.tensors import RawTensor

B = 0x7F30_0000_0000


def t(i, shape, dtype="bf16", strides=None):
    return RawTensor(B + i * (1 << 36), tuple(shape), dtype, strides)


def qkvo(b=2, s=1000, h=16, d=128):
    return t(0, (b, s, h, d)), t(1, (b, s, h, d)), t(2, (b, s, h, d)), t(3, (b, s, h, d))


def combine_args():
    b, s, h, d, splits = 2, 100, 16, 128, 5
    op = t(4, (splits, b, s, h, d), "fp32")
    lp = t(5, (splits, b, s, h), "fp32", (b * h * s, h * s, 1, s))
    return op, lp, t(6, (b, s, h, d)), t(7, (b, s, h), "fp32", (h * s, 1, s))


def counters(s: RuntimeStats) -> RuntimeStats:
    """The runtime's own counters (the drop-in's fallbacks are process-wide: other tests add to them)."""
    return dataclasses.replace(s, patch_fallbacks={})


def families_launched(rt: Runtime, drv: FakeDriver) -> dict[str, int]:
    """Launches per family as the fake driver saw them: each recorded kernel handle mapped to the
    family of the loaded variant that owns it."""
    owner = {h: lv.variant.family for lv in rt._loaded.values() for h in lv.kernels}
    out: dict[str, int] = {}
    for launch in drv.launches:
        out[owner[launch.kernel]] = out.get(owner[launch.kernel], 0) + 1
    return out


def test_a_fresh_runtime_counts_nothing(sm90):
    rt, _ = sm90
    s = rt.stats()
    assert counters(s) == RuntimeStats() and s.total_launches == 0 and s.as_dict()["launches"] == {}


def test_forward_combine_and_repeats_are_counted(sm90):
    rt, drv = sm90
    q, k, v, o = qkvo()
    for _ in range(3):  # one decision, one load, three launches
        fa4aot.flash_attn_func(q, k, v, causal=True, out=o, runtime=rt)
    fa4aot.combine(*combine_args(), runtime=rt)
    s = rt.stats()
    assert s.loads == len(drv.libraries) == 2
    assert s.hits == 2  # the forward's first decision and the combine pick; the repeats hit the memo
    assert s.misses == s.invalid == s.refused == 0
    assert dict(s.launches) == families_launched(rt, drv) == {"fwd_sm90": 3, "combine": 1}
    assert s.total_launches == len(drv.launches) == 4


def test_prepared_calls_and_scheduler_metadata_launches_are_counted(sm90):
    rt, drv = sm90
    q, k, v, o = qkvo(s=256)
    run = fa4aot.prepare_forward(q, k, v, o, causal=True, runtime=rt)
    run(q, k, v, o)
    run(q, k, v, o)
    md = fa4aot.SchedulerMetadata(8, 16, 4, 128, runtime=rt)
    md.compute(
        max_seqlen_q=64,
        max_seqlen_k=512,
        num_splits=4,
        cu_seqlens_q=t(8, (9,), "int32"),
        cu_seqlens_k=t(9, (9,), "int32"),
    )
    s = rt.stats()
    assert dict(s.launches) == families_launched(rt, drv)
    assert s.launches["fwd_sm90"] == 2 and s.launches["prepare"] == 1 and s.total_launches == len(drv.launches)


def test_a_missing_variant_is_a_miss_and_launches_nothing(sm90):
    rt, drv = sm90
    q, k, v, o = qkvo(d=96)  # the fast cache holds no head dim 96
    for _ in range(2):
        with pytest.raises(VariantNotFoundError):
            fa4aot.flash_attn_func(q, k, v, causal=True, out=o, runtime=rt)
    s = rt.stats()
    assert s.misses == 2 and s.hits == s.loads == 0 and s.total_launches == 0 and drv.launches == []


def test_a_corrupt_entry_is_counted_invalid(built_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    cache = Cache(copy)
    paths = {  # every SM90 combine cubin with an LSE (entries share blobs): the call loads one of them
        cache.blob_path(e.blobs["cubin"])
        for e in cache.entries()
        if e.variant.family == "combine" and e.variant.fields["has_lse"] and e.target.arch == "sm_90a"
    }
    for path in paths:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    drv = FakeDriver()
    rt = Runtime(copy, driver=drv)
    with pytest.raises(CorruptArtifactError):
        fa4aot.combine(*combine_args(), runtime=rt)
    s = rt.stats()
    assert (s.invalid, s.loads, s.total_launches) == (1, 0, 0) and drv.libraries == []


def test_an_entry_for_another_driver_is_counted_refused(built_cache):
    drv = FakeDriver(driver_version=12080)  # the cubins need a CUDA 13 driver
    rt = Runtime(built_cache, driver=drv)
    with pytest.raises(fa4aot.DeviceMismatchError):
        fa4aot.combine(*combine_args(), runtime=rt)
    s = rt.stats()
    assert (s.refused, s.invalid, s.loads) == (1, 0, 0)


def test_fa4aot_stats_reads_the_default_runtime_and_opens_none(sm90, monkeypatch):
    rt, drv = sm90
    monkeypatch.setattr(loader, "_DEFAULT", None)
    assert counters(fa4aot.stats()) == RuntimeStats()  # nothing opened, nothing counted
    assert loader._DEFAULT is None
    monkeypatch.setattr(loader, "_DEFAULT", rt)
    q, k, v, o = qkvo()
    fa4aot.flash_attn_func(q, k, v, causal=True, out=o)
    assert fa4aot.stats() == rt.stats() and fa4aot.stats().launches == {"fwd_sm90": len(drv.launches)}


def test_launch_counts_from_threads_add_up(sm90):
    rt, drv = sm90
    q, k, v, o = qkvo()
    fa4aot.flash_attn_func(q, k, v, causal=True, out=o, runtime=rt)  # load once, before the threads

    def work() -> None:
        for _ in range(50):
            fa4aot.flash_attn_func(q, k, v, causal=True, out=o, runtime=rt)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert rt.stats().launches == {"fwd_sm90": len(drv.launches)} and len(drv.launches) == 201


@pytest.mark.parametrize("regions_on", [True, False])
def test_new_shapes_are_counted_as_traced_or_reused_decisions(sm90, monkeypatch, regions_on):
    """A decode loop (vLLM's call, max_seqlen_k growing by one): each new shape is decided either by
    tracing FA4's selection into a region or by a region already traced; none with regions off."""
    from fa4aot.interface import _flash_attn_fwd
    from fa4aot.runtime import dispatch

    monkeypatch.setattr(dispatch, "REGIONS_ON", regions_on)
    rt, drv = sm90
    q, out, pool = t(5, (8, 1, 32, 128)), t(6, (8, 1, 32, 128)), t(7, (300, 128, 8, 128))
    table, used = t(8, (8, 32), "int32"), t(9, (8,), "int32")
    for step in range(20):
        _flash_attn_fwd(
            q, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=3000 + step, page_table=table, causal=True,
            out=out, runtime=rt,
        )  # fmt: skip
    s = rt.stats()
    assert len(drv.launches) == 20 and s.fast_calls == 0  # raw pointers: the full path every call
    if regions_on:
        assert s.decisions_traced >= 1 and s.decisions_traced + s.decisions_reused == 20
    else:
        assert s.decisions_traced == s.decisions_reused == 0
