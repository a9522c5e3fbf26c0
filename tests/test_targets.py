"""The other Blackwell targets: B300 (sm_103a) and RTX PRO 6000 (sm_120a). Nothing here runs
their kernels; they are checked by building (manifests/ci.yaml), reading the cubin's arch back,
running their launch plans (FA4's host code) on random shapes against FA4's grid formulas, byte
identity with FA4's own JIT, and the runtime's compute-capability matching."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import needs_dsl, run_cli

import fa4aot
from fa4aot.core import cubin
from fa4aot.core.errors import DeviceMismatchError
from fa4aot.core.index import Cache
from fa4aot.core.variant import SMEM_OPTIN_BYTES
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor
from fa4aot.tools.plancheck import check_entry

NEW = {"sm_103a": "FlashAttentionForwardSm100", "sm_120a": "FlashAttentionForwardSm120"}


def _entries(built_cache: Path):
    cache = Cache(built_cache)
    return cache, [e for e in cache.entries() if e.target.arch in NEW]


def test_every_new_target_family_is_built_and_its_cubin_reads_back_its_arch(built_cache):
    cache, entries = _entries(built_cache)
    kinds = {(e.target.arch, e.variant.family) for e in entries}
    assert kinds == {("sm_103a", "fwd_sm100"), ("sm_103a", "combine"), ("sm_120a", "fwd_sm120"), ("sm_120a", "combine"),
                     ("sm_120a", "bwd_sm120"), ("sm_120a", "bwd_pre"), ("sm_120a", "bwd_post")}  # fmt: skip
    for e in entries:
        parsed = cubin.parse(cache.read_cubin(e))
        assert parsed.arch == e.target.arch and parsed.sm == int(e.target.arch[3:6]), e.variant.label()
        assert e.meta["cubin_arch"] == e.target.arch
        if e.variant.family.startswith("fwd_"):
            assert all(NEW[e.target.arch] in name for name in parsed.kernels), list(parsed.kernels)


def test_sm120_launch_records_fa4s_block_and_tile_smem(built_cache):
    """FA4's SM120 forward: 4 warps, and Q + K + V tiles in shared memory (one K/V stage)."""
    cache, entries = _entries(built_cache)
    fwd = [e for e in entries if e.variant.family == "fwd_sm120"]
    assert {e.variant.fields["tile_n"] for e in fwd} == {64, 128}
    for e in fwd:
        f = e.variant.fields
        tiles = 2 * (f["tile_m"] * f["head_dim"] + f["tile_n"] * (f["head_dim"] + f["head_dim_v"]))
        assert e.meta["launch"]["block"] == [128, 1, 1]
        assert tiles <= e.meta["launch"]["smem"] <= e.target.optin_smem() == 99 * 1024


def test_new_target_plans_agree_with_fa4s_grid_formulas(built_cache):
    cache, entries = _entries(built_cache)
    reports = [check_entry(cache, e, 40) for e in entries if e.variant.family.startswith("fwd_")]
    assert len(reports) >= 4
    assert all(r.runs == 40 and not r.problems for r in reports), [r.problems[:2] for r in reports]


@pytest.mark.slow
@needs_dsl
def test_new_target_cubins_are_byte_identical_to_fa4s_jit(built_cache):
    """FA4 compiles each entry's configuration through its own interface, told the arch and SM
    count the way the build is (FLASH_ATTENTION_ARCH, CUTE_DSL_ARCH, FLASH_ATTENTION_NUM_SMS)."""
    from fa4aot.tools.against_fa4 import compare

    cache, entries = _entries(built_cache)
    results = compare(cache, entries)
    by_status = {}
    for r in results:
        by_status.setdefault(r.status, []).append((r.entry.target.arch, r.entry.variant.family, r.detail))
    assert set(by_status) == {"identical"}, by_status
    assert {(a, f) for a, f, _ in by_status["identical"]} == {
        ("sm_103a", "fwd_sm100"),
        ("sm_103a", "combine"),
        ("sm_120a", "fwd_sm120"),
        ("sm_120a", "combine"),
        ("sm_120a", "bwd_sm120"),
        ("sm_120a", "bwd_pre"),
        ("sm_120a", "bwd_post"),
    }


def _raw(i, shape, dtype="bf16"):
    return RawTensor(0x7F40_0000_0000 + i * (1 << 40), shape, dtype)


@pytest.mark.parametrize(
    "cc, sms, arch, kernel",
    [((10, 3), 148, "sm_103a", "FlashAttentionForwardSm100"), ((12, 0), 188, "sm_120a", "FlashAttentionForwardSm120")],
)
def test_the_runtime_serves_each_device_its_own_arch(built_cache, cc, sms, arch, kernel):
    drv = FakeDriver(cc=cc, num_sms=sms, smem_optin=SMEM_OPTIN_BYTES[arch])
    rt = Runtime(built_cache, driver=drv)
    assert rt.target.arch == arch
    b, s, h, hk, d = 2, 300, 16, 4, 128
    fa4aot.flash_attn_func(
        _raw(0, (b, s, h, d)), _raw(1, (b, s, hk, d)), _raw(2, (b, s, hk, d)), causal=True, out=_raw(3, (b, s, h, d)),
        runtime=rt,
    )  # fmt: skip
    assert len(drv.launches) == 1
    assert kernel in drv.kernel_names[drv.launches[0].kernel]


def test_sm120_refuses_what_fa4_has_no_kernel_for_before_launching(built_cache):
    drv = FakeDriver(cc=(12, 0), num_sms=188, smem_optin=SMEM_OPTIN_BYTES["sm_120a"])
    rt = Runtime(built_cache, driver=drv)
    b, s, h, hk = 2, 64, 8, 8
    q, o = _raw(0, (b, s, h, 256)), _raw(3, (b, s, h, 256))
    with pytest.raises(fa4aot.ArgumentError, match="not supported on SM120"):
        fa4aot.flash_attn_func(q, _raw(1, (b, s, hk, 256)), _raw(2, (b, s, hk, 256)), out=o, runtime=rt)
    q, o = _raw(0, (b, s, h, 128)), _raw(3, (b, s, h, 128))
    k, v = _raw(1, (b, s, hk, 128)), _raw(2, (b, s, hk, 128))
    with pytest.raises(fa4aot.ArgumentError, match="num_splits=1"):
        fa4aot.flash_attn_func(q, k, v, out=o, num_splits=4, runtime=rt)
    with pytest.raises(fa4aot.ArgumentError, match="learnable sink"):
        fa4aot.flash_attn_func(q, k, v, out=o, learnable_sink=_raw(8, (h,)), runtime=rt)
    assert drv.launches == []


def test_a_device_of_another_compute_capability_is_refused(built_cache):
    with pytest.raises(DeviceMismatchError, match="sm_121a.*cannot run them.*target.arch is sm_121a"):
        Runtime(built_cache, driver=FakeDriver(cc=(12, 1), num_sms=48))


@needs_dsl
def test_sm103a_and_sm100a_caches_are_not_interchangeable(built_cache, tmp_path):
    """sm_XXXa cubins run only on that exact compute capability: a B300 cache on a B200 (10.0)
    is refused, and so is the reverse. (Each cache's combine is reused from the session cache.)"""
    groups = {
        "sm_103a": "{head_dim: 128, num_head: 16, max_splits: 128}",
        "sm_100a": "{head_dim: 128, num_head: 16, max_splits: 128, varlen: true, num_splits_dynamic: true}",
    }
    for arch, other_cc in (("sm_103a", (10, 0)), ("sm_100a", (10, 3))):
        manifest = tmp_path / f"{arch}.yaml"
        manifest.write_text(
            f"target: {{name: t, arch: {arch}, num_sms: 148}}\nfamilies:\n  combine:\n    - {groups[arch]}\n"
        )
        out = run_cli("build", str(manifest), "--cache", str(tmp_path / arch), "--reuse", str(built_cache), "-q")
        assert next(ln for ln in out.stdout.splitlines() if ln.startswith("total")).split()[1:5] == ["0", "0", "1", "0"]
        mine = (10, 3) if arch == "sm_103a" else (10, 0)
        assert Runtime(tmp_path / arch, driver=FakeDriver(cc=mine, num_sms=148)).target.arch == arch
        want = f"sm_{other_cc[0]}{other_cc[1]}a"
        with pytest.raises(DeviceMismatchError, match=f"{arch}.*cannot run them.*target.arch is {want}"):
            Runtime(tmp_path / arch, driver=FakeDriver(cc=other_cc, num_sms=148))


def test_one_table_of_arches_and_models_feeds_every_reader():
    """Manifests, record, written manifests and the parity oracle read core/targets.py, so
    they agree: every model's arch is an arch, each arch's default model is of that arch, and
    each reader's view is derived from the table (the gb200 / rtx-pro-6000 disagreement between
    record and manifest_text cannot recur)."""
    from fa4aot.compile.manifest import ARCHES as MANIFEST_ARCHES
    from fa4aot.core.families import FAMILIES
    from fa4aot.core.manifest_text import target_name
    from fa4aot.core.targets import ARCHES, MODELS, arch_of_compute_capability
    from fa4aot.tools import fa4_parity, record

    assert set(MANIFEST_ARCHES) == set(ARCHES) == set(fa4_parity.ARCHES)
    for m in MODELS.values():
        assert m.arch in ARCHES and record.TARGETS[m.name] == (m.arch, m.num_sms)
    for a in ARCHES.values():
        assert MODELS[a.default_model].arch == a.name
        assert arch_of_compute_capability(a.compute_capability) == a.name
        assert record._arch(10 * a.compute_capability[0] + a.compute_capability[1]) == a.name
        assert a.name in FAMILIES[a.forward].arches and a.name in FAMILIES["combine"].arches
        assert (a.name in FAMILIES["prepare"].arches) == a.scheduler_metadata
        default = MODELS[a.default_model]
        assert target_name(a.name, default.num_sms) == a.default_model
    assert target_name("sm_100a", 152) == "gb200" and target_name("sm_100a", 150) == "sm100a-150sms"
