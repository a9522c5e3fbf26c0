"""The zero-JIT runtime on the CPU: a fake driver stands in for cuda-python, so argument checks,
device checks, artifact verification, plans and the launch path all run without a GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import run_threads

import fa4aot
from fa4aot.compile.store import CacheWriter
from fa4aot.core import samples
from fa4aot.core.errors import (
    ArgumentError,
    CorruptArtifactError,
    DeviceMismatchError,
    LaunchError,
    VariantNotFoundError,
)
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.metadata import SchedulerMetadata
from fa4aot.runtime.tensors import RawTensor, as_device_tensor, stream_handle

BASE = 0x7F10_0000_0000


def raw(shape, dtype="fp32", strides=None, offset=0, index=0):
    return RawTensor(BASE + index * (1 << 36) + offset, tuple(shape), dtype, strides)


def combine_args(b=2, s=100, h=16, d=128, splits=5, out_dtype="bf16", lse=True):
    op = raw((splits, b, s, h, d), index=0)
    # FA4's layout: lse_partial is (splits, b, h, s) contiguous, seen as (splits, b, s, h)
    lp = raw((splits, b, s, h), strides=(b * h * s, h * s, 1, s), index=1)
    out = raw((b, s, h, d), out_dtype, index=2)
    ls = raw((b, s, h), strides=(h * s, 1, s), index=3) if lse else None
    return op, lp, out, ls


@pytest.fixture
def runtime(built_cache):
    drv = FakeDriver(cc=(9, 0), num_sms=132)
    rt = Runtime(built_cache, driver=drv)
    return rt, drv


def _sizes(rt, drv):
    for lv in rt._loaded.values():
        for h, k in zip(lv.kernels, lv.entry.meta["kernels"]):
            drv.param_sizes[h] = [size for _, _, size in sorted(k["params"])]


def test_combine_launch_path(runtime):
    rt, drv = runtime
    op, lp, out, ls = combine_args()
    fa4aot.combine(op, lp, out, ls, stream=0x1234, runtime=rt)
    (launch,) = drv.launches
    lv = next(iter(rt._loaded.values()))
    assert lv.variant.fields["num_head"] == 16 and lv.variant.fields["has_lse"]
    # the launch is exactly what the plan records for these arguments
    (want,) = lv.plan.plan(
        lv.plan.order(
            dict(
                out_partial=as_device_tensor(op, "x")
                and samples.TensorDesc(op.ptr, op.shape, as_device_tensor(op, "x").strides),
                lse_partial=samples.TensorDesc(lp.ptr, lp.shape, lp.strides),
                out=samples.TensorDesc(out.ptr, out.shape, as_device_tensor(out, "o").strides),
                lse=samples.TensorDesc(ls.ptr, ls.shape, ls.strides),
                stream=0x1234,
            )
        )
    )
    assert (launch.grid, launch.block, launch.smem, launch.stream) == (want.grid, want.block, want.smem, 0x1234)
    # module load applied the attributes the plan asked for (max dynamic smem, non-portable cluster)
    assert {(a, v) for _, a, v, _ in drv.set_attributes} == {(8, 232448), (14, 1)}
    # the parameter pointers handed to cuLaunchKernelEx point at the recorded parameter bytes
    _sizes(rt, drv)
    fa4aot.combine(op, lp, out, ls, stream=0x1234, runtime=rt)
    sizes = [size for _, _, size in sorted(lv.entry.meta["kernels"][0]["params"])]
    assert [len(p) for p in drv.launches[-1].params] == sizes  # one pointer per KPARAM_INFO entry
    assert drv.launches[-1].params[0][:8] == op.ptr.to_bytes(8, "little")
    # a driver error surfaces as LaunchError with the CUresult
    drv.launch_result = 700
    with pytest.raises(LaunchError, match="CUresult 700"):
        fa4aot.combine(op, lp, out, ls, stream=0x1234, runtime=rt)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(op=raw((5, 2, 100, 16, 128), "bf16")), "out_partial: dtype must be fp32"),
        (
            lambda a: a.update(op=raw((5, 2, 100, 16, 128), offset=4)),
            "out_partial: base address .* not 16-byte aligned",
        ),
        (
            lambda a: a.update(out=raw((2, 100, 16, 128), "bf16", offset=2, index=2)),
            "out: base address .* not 8-byte aligned",
        ),
        (lambda a: a.update(out=raw((2, 100, 16, 64), "bf16", index=2)), r"out: expected shape \(2, 100, 16, 128\)"),
        (lambda a: a.update(lp=raw((5, 2, 100, 16), index=1)), "lse_partial: dimension 2 must be contiguous"),
        (
            lambda a: a.update(
                op=raw((5, 2, 100, 16, 128), strides=(2 * 100 * 16 * 128, 100 * 16 * 128, 16 * 128, 130, 1))
            ),
            "out_partial: stride 3 is 130 elements; the kernel needs multiples of 4",
        ),
        (
            lambda a: a.update(
                op=raw((5, 2, 100, 16, 128), strides=(2 * 100 * 16 * 256, 100 * 16 * 256, 16 * 256, 256, 2))
            ),
            "out_partial: dimension 4 must be contiguous",
        ),
        (
            lambda a: a.update(
                op=raw((300, 2, 100, 16, 128)), lp=raw((300, 2, 100, 16), strides=(3200, 1600, 1, 100), index=1)
            ),
            "300 splits",
        ),
        (
            lambda a: a.update(op=RawTensor(BASE, (5, 2, 100, 16, 128), "fp32", device=1)),
            "out_partial: is (declared )?on cuda:1",
        ),
        (
            lambda a: a.update(ls=raw((2, 100, 8), strides=(800, 1, 100), index=3)),
            r"lse: expected shape \(2, 100, 16\)",
        ),
        (lambda a: a.update(op=object()), "out_partial: expected a CUDA tensor"),
    ],
)
def test_combine_rejects_bad_arguments_before_launching(runtime, mutate, match):
    rt, drv = runtime
    op, lp, out, ls = combine_args()
    a = dict(op=op, lp=lp, out=out, ls=ls)
    mutate(a)
    with pytest.raises(ArgumentError, match=match):
        fa4aot.combine(a["op"], a["lp"], a["out"], a["ls"], runtime=rt)
    assert drv.launches == []


def test_missing_variant_names_the_manifest_entry(runtime):
    rt, drv = runtime
    op, lp, out, ls = combine_args(d=64)
    with pytest.raises(VariantNotFoundError) as ei:
        fa4aot.combine(op, lp, out, ls, runtime=rt)
    msg = str(ei.value)
    assert "families.combine: - {" in msg and "head_dim: [64]" in msg and "return_lse: [true]" in msg
    assert drv.launches == []


def test_device_mismatches_are_refused(built_cache):
    with pytest.raises(DeviceMismatchError, match="sm_80.*cannot run them"):
        Runtime(built_cache, driver=FakeDriver(cc=(8, 0), num_sms=108))
    with pytest.raises(DeviceMismatchError, match="has 114 SMs.*refuses"):
        Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=114))
    with pytest.warns(RuntimeWarning, match="built for 132 SMs"):
        rt = Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=114), allow_sm_mismatch=True)
    assert rt.target.num_sms == 132
    old = FakeDriver(cc=(9, 0), num_sms=132, driver_version=12080)
    rt = Runtime(built_cache, driver=old)
    op, lp, out, ls = combine_args()
    with pytest.raises(DeviceMismatchError, match="needs a driver for CUDA 13.0"):
        fa4aot.combine(op, lp, out, ls, runtime=rt)
    assert old.launches == [] and old.libraries == []


def test_host_arch_mismatch_is_refused(built_cache, monkeypatch):
    monkeypatch.setattr("fa4aot.runtime.loader.host_arch", lambda: "aarch64")
    with pytest.raises(DeviceMismatchError, match=r"x86_64 host, shim ABI \d+\).*this host is aarch64"):
        Runtime(built_cache, driver=FakeDriver())


@pytest.mark.parametrize("role", ["cubin", "plan"])
def test_corrupt_artifact_is_refused_not_launched(built_cache, tmp_path, role):
    """A flipped byte in the cubin or in the plan (FA4's host code) is refused before anything is
    loaded or launched."""
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    drv = FakeDriver()
    rt = Runtime(copy, driver=drv)
    op, lp, out, ls = combine_args()
    (entry,) = [e for e in Cache(copy).entries() if e.variant.family == "combine" and e.variant.fields["has_lse"]]
    path = Cache(copy).blob_path(entry.blobs[role])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=f"{role} of entry .* is corrupt"):
        fa4aot.combine(op, lp, out, ls, runtime=rt)
    assert drv.launches == [] and drv.libraries == []


def test_scheduler_metadata_compute_and_reset(runtime):
    rt, drv = runtime
    md = SchedulerMetadata(20, 16, 4, 128, runtime=rt)
    assert md.num_nheads_in_l2 is None and md.fields["pack_gqa"] and md.fields["num_warps"] == 1
    cu = raw((21,), "int32", index=5)
    md.compute(
        max_seqlen_q=100,
        max_seqlen_k=4000,
        num_splits=16,
        cu_seqlens_q=cu,
        cu_seqlens_k=raw((21,), "int32", index=6),
        stream=7,
    )
    (launch,) = drv.launches
    assert launch.grid == (1, 1, 1) and launch.block == (32, 1, 1) and launch.stream == 7
    md.reset_semaphore(stream=7)
    assert drv.memsets == [(md.tile_count_semaphore.ptr, 0, 1, 7)]
    with pytest.raises(ArgumentError, match="cu_seqlens_q: expected length 21"):
        md.compute(max_seqlen_q=1, max_seqlen_k=1, num_splits=2, cu_seqlens_q=raw((20,), "int32"))
    with pytest.raises(ArgumentError, match="give at least one"):
        md.compute(max_seqlen_q=1, max_seqlen_k=1, num_splits=2)
    md.close()
    assert drv.allocs == {}


def test_stream_and_tensor_protocols():
    class CAI:
        __cuda_array_interface__ = {
            "shape": (2, 3),
            "typestr": "<f2",
            "data": (4096, False),
            "strides": (12, 2),
            "version": 3,
        }

    t = as_device_tensor(CAI(), "x")
    assert (t.ptr, t.shape, t.strides, t.dtype) == (4096, (2, 3), (6, 1), "fp16")

    class S:
        def __cuda_stream__(self):
            return (0, 77)

    assert stream_handle(S()) == 77 and stream_handle(None) == 0 and stream_handle(5) == 5
    with pytest.raises(ArgumentError, match="stream"):
        stream_handle("bad")


ISOLATED = r"""
import importlib.abc, sys
# An environment without the build and CLI stacks: importing any of these fails as if absent.
MISSING = ("yaml", "diskcache", "click", "cutlass", "flash_attn", "tvm_ffi", "torch", "quack", "triton", "cuda")
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.path.insert(0, sys.argv[2])
import fa4aot
from fake_driver import FakeDriver
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor
drv = FakeDriver()
rt = Runtime(sys.argv[1], driver=drv)
B = 0x7F10_0000_0000
op = RawTensor(B, (4, 2, 64, 16, 128), "fp32")
lp = RawTensor(B + (1 << 36), (4, 2, 64, 16), "fp32", (2 * 16 * 64, 16 * 64, 1, 64))
out = RawTensor(B + (2 << 36), (2, 64, 16, 128), "bf16")
lse = RawTensor(B + (3 << 36), (2, 64, 16), "fp32", (16 * 64, 1, 64))
fa4aot.combine(op, lp, out, lse, runtime=rt)
md = fa4aot.SchedulerMetadata(8, 16, 4, 128, runtime=rt)
md.compute(max_seqlen_q=64, max_seqlen_k=512, num_splits=4, cu_seqlens_q=RawTensor(B + (4 << 36), (9,), "int32"),
           cu_seqlens_k=RawTensor(B + (5 << 36), (9,), "int32"))
q, k, v, o = (RawTensor(B + ((6 + i) << 36), (2, 256, 16, 128), "bf16") for i in range(4))
fa4aot.flash_attn_func(q, k, v, causal=True, out=o, runtime=rt)
run = fa4aot.prepare_forward(q, k, v, o, causal=True, runtime=rt)
run(q, k, v, o)
rt.preload("all")
try:
    fa4aot.flash_attn_func(q, k, v, window_size=(64, 64), out=o, runtime=rt)
except fa4aot.VariantNotFoundError as e:
    assert "families.fwd_sm90" in str(e)  # the manifest line, without the manifest module
halves = sorted(m for m in sys.modules if m.startswith(("fa4aot.compile", "fa4aot.tools")))
print(len(drv.launches), sorted(m for m in sys.modules if m.split(".")[0] in MISSING), halves)
"""


def test_runtime_works_without_build_cli_or_framework_packages(built_cache):
    """The runtime in an environment with none of yaml, diskcache, click, the DSL, torch or
    cuda-python importable: open, combine, prepare, forward, prepared forward, preload, a miss."""
    out = subprocess.run(
        [sys.executable, "-c", ISOLATED, str(built_cache), str(Path(__file__).parent)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4 [] []"


def test_import_fa4aot_is_lazy():
    code = (
        "import sys, fa4aot; print(sorted(m for m in sys.modules if m.startswith(('cuda', 'fa4aot.runtime', 'yaml'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_sm100_cache_on_sm90_device_is_refused(built_cache, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(built_cache, copy)
    cache = CacheWriter(copy)
    for e in cache.entries():
        if e.target.arch == "sm_90a":
            cache.delete(e.key)
    cache.write_packed()
    cache.close()
    with pytest.raises(
        DeviceMismatchError,
        match=r"b200 \(sm_100a, 148 SMs, x86_64 host, shim ABI \d+\).*\(sm_90a, 132 SMs\), which cannot run them",
    ):
        Runtime(copy, driver=FakeDriver(cc=(9, 0), num_sms=132))


def test_launches_from_several_threads(runtime):
    from fa4aot.core.families.combine import combine_grid

    rt, drv = runtime
    errors = []

    def worker(seed):
        try:
            for i in range(50):
                s = 1 + (seed * 13 + i * 7) % 300
                op, lp, out, ls = combine_args(s=s)
                fa4aot.combine(op, lp, out, ls, stream=seed + 1, runtime=rt)
        except Exception as e:
            errors.append(e)

    run_threads(worker, range(8))
    assert not errors
    assert len(drv.launches) == 400
    fields = next(iter(rt._loaded.values())).variant.fields
    for launch in drv.launches:
        seed = launch.stream - 1
        grids = {combine_grid(fields, batch=2, seqlen=1 + (seed * 13 + i * 7) % 300, nheads=16) for i in range(50)}
        assert launch.grid in grids
