"""The combine and prepare kernels through the fa4aot runtime on a real GPU (H100: sm_90a),
checked against float32 / Python references of FA4's formulas."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fa4aot  # noqa: E402
from fa4aot.core.errors import CorruptArtifactError  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def combine_reference(out_partial, lse_partial, nsd=None, rows_batch=None):
    """logsumexp over the valid splits, then the weighted sum of the partial outputs.

    ``out_partial`` (S, R, H, D), ``lse_partial`` (S, R, H); with ``nsd``, row r uses only the first
    ``nsd[rows_batch[r]]`` splits."""
    op, lp = out_partial.double(), lse_partial.double()
    if nsd is not None:
        valid = torch.arange(op.shape[0], device=op.device)[:, None] < nsd.long()[rows_batch][None, :]
        lp = torch.where(valid[..., None], lp, torch.full_like(lp, -math.inf))
    lse = torch.logsumexp(lp, dim=0)
    w = torch.nan_to_num(torch.exp(lp - lse[None]), nan=0.0)
    return (w[..., None] * op).sum(0), lse


def _close(got, ref, what, rel):
    err = (got.double() - ref).abs()
    tol = rel * ref.abs() + 1e-4
    bad = (err > tol).sum().item()
    assert bad == 0, f"{what}: {bad} elements off, max err {err.max().item():.3g}"


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("with_nsd", [False, True])
def test_combine_matches_fp32_reference(runtime, varlen, d, dtype, with_lse, with_nsd):
    gen = torch.Generator(device="cuda").manual_seed(d + 7 * varlen + 3 * with_lse)
    h = 16
    for splits in (1, 2, 3, 7, 16, 31, 64, 100, 128):
        if varlen:
            lens = [1, 37, 0, 300, 129]
            b, total = len(lens), sum(lens)
            cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32, device="cuda")
            rows_batch = torch.repeat_interleave(torch.arange(b, device="cuda"), torch.tensor(lens, device="cuda"))
            op = torch.randn(splits, total, h, d, device="cuda", generator=gen)
            lp = torch.randn(splits, h, total, device="cuda", generator=gen).transpose(-1, -2)
            out = torch.empty(total, h, d, dtype=DT[dtype], device="cuda")
            lse = torch.empty(h, total, device="cuda").transpose(-1, -2) if with_lse else None
        else:
            b, s = 3, 77
            cu, rows_batch = None, torch.arange(b, device="cuda").repeat_interleave(s)
            op = torch.randn(splits, b, s, h, d, device="cuda", generator=gen)
            lp = torch.randn(splits, b, h, s, device="cuda", generator=gen).transpose(-1, -2)
            out = torch.empty(b, s, h, d, dtype=DT[dtype], device="cuda")
            lse = torch.empty(b, h, s, device="cuda").transpose(-1, -2) if with_lse else None
        nsd = None
        if with_nsd:
            nsd = torch.randint(1, splits + 1, (b,), dtype=torch.int32, device="cuda", generator=gen)
        fa4aot.combine(
            op, lp, out, lse, cu_seqlens=cu, num_splits_dynamic=nsd, stream=torch.cuda.current_stream(), runtime=runtime
        )
        torch.cuda.synchronize()
        flat_op = op if varlen else op.flatten(1, 2)
        flat_lp = lp if varlen else lp.flatten(1, 2)
        ref_out, ref_lse = combine_reference(flat_op, flat_lp, nsd, rows_batch)
        got = out if varlen else out.flatten(0, 1)
        _close(got, ref_out, f"out splits={splits}", 2**-7 if dtype == "bf16" else 2**-9)
        if with_lse:
            got_lse = lse if varlen else lse.flatten(0, 1)
            _close(got_lse, ref_lse, f"lse splits={splits}", 1e-5)


NUM_SMS = 132


def prepare_reference(
    lens_q, lens_k, num_splits, nheads, nheads_kv, hd, hdv, causal, pack, tile_m=128, tile_n=128, zfill=True
):
    """Python rendering of FA4's FlashPrepareScheduler (sort off), float32 where FA4 is; ``zfill``:
    its zfill_padded_output (num_splits_for_sequence: at least one split per sequence)."""
    f32 = np.float32
    b = len(lens_q)
    qh = nheads // nheads_kv
    m = [(q * (qh if pack else 1) + tile_m - 1) // tile_m for q in lens_q]
    n = [(k + tile_n - 1) // tile_n for k in lens_k]
    num_ctas = (b + 31 * 32 - 1) // (31 * 32)
    nheads_computed = nheads_kv if pack else nheads
    nsd = []
    n_after = []
    total = sum(mi * ni for mi, ni in zip(m, n))
    for ni in n:
        if num_ctas > 1 or num_splits == 1:
            s = 1
        else:
            sm_margin = max(f32(f32(NUM_SMS) / f32(128)) + f32(0.001), f32(1.1))
            bps = max(int(f32(f32(f32(f32(total) * sm_margin) * f32(nheads_computed)) / f32(NUM_SMS))), 1)
            s = min((ni + bps - 1) // bps, num_splits)
            if zfill:
                s = max(s, 1)
            if s > 0:  # FA4 divides the blocks only among splits it gives
                ni = (ni + s - 1) // s
        nsd.append(s)
        n_after.append(ni)
    l2 = None
    if causal:
        div = 1 if qh == 1 else 2 if qh <= 2 else 4 if qh <= 4 else 8 if qh <= 8 else 16
        size_l2 = (32 * 1024 * 1024) // div
        one = tile_n * (hd + hdv) * 2
        max_blocks = (size_l2 + one - 1) // one
        l2 = []
        for ni in n_after:
            v = (
                16
                if ni * 16 <= max_blocks
                else 8
                if ni * 8 <= max_blocks
                else 4
                if ni * 4 <= max_blocks
                else 2
                if ni * 2 <= max_blocks
                else 1
            )
            if not pack:
                v *= qh
            l2.append(min(v, nheads_computed))
    return m, nsd, l2


@pytest.mark.parametrize("heads, pack", [((16, 16), False), ((16, 4), False), ((16, 4), True)])
@pytest.mark.parametrize("causal", [False, True])
def test_prepare_matches_fa4_formulas(runtime, heads, pack, causal):
    rng = np.random.default_rng(sum(heads) + pack + 10 * causal)
    nheads, nheads_kv = heads
    for batch in (1, 5, 31, 32, 100, 500, 992, 993, 2000):
        lens_q = rng.integers(0, 700, batch).tolist()
        lens_k = rng.integers(1, 9000, batch).tolist()
        cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32, device="cuda")
        for num_splits in (1, 16):
            md = fa4aot.SchedulerMetadata(batch, nheads, nheads_kv, 128, causal=causal, pack_gqa=pack, runtime=runtime)
            md.compute(
                max_seqlen_q=max(lens_q),
                max_seqlen_k=max(lens_k),
                num_splits=num_splits,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                stream=torch.cuda.current_stream(),
            )
            torch.cuda.synchronize()
            got = _read_i32(md, batch)
            m, nsd, l2 = prepare_reference(lens_q, lens_k, num_splits, nheads, nheads_kv, 128, 128, causal, pack)
            assert got["num_m_blocks"] == m, f"batch {batch}"
            assert got["num_splits_dynamic"] == nsd, f"batch {batch} splits {num_splits}"
            if causal:
                assert got["num_nheads_in_l2"] == l2, f"batch {batch}"
            assert got["tile_count_semaphore"] == [0]
            md.close()


@pytest.mark.parametrize("zfill", [True, False])
def test_zfill_padded_output_as_fa4s_prepare_kernel_computes_it(runtime, zfill):
    """FA4's ``_get_scheduler_metadata(zfill_padded_output=...)``: an empty sequence (no keys) gets
    one split, or none with False; the others the same either way (tests/fast.yaml builds both)."""
    from fa4aot.runtime.interface import _get_scheduler_metadata

    rng = np.random.default_rng(11 + zfill)
    for batch in (5, 31):
        lens_q = rng.integers(1, 700, batch).tolist()
        lens_k = rng.integers(1, 9000, batch).tolist()
        lens_k[0] = lens_k[batch // 2] = 0
        cu_q = torch.tensor([0] + list(np.cumsum(lens_q)), dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0] + list(np.cumsum(lens_k)), dtype=torch.int32, device="cuda")
        md = _get_scheduler_metadata(
            batch, max(lens_q), max(lens_k), 16, 4, 128, 16, 128, 128, pack_gqa=True, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, zfill_padded_output=zfill, stream=torch.cuda.current_stream(), runtime=runtime,
        )  # fmt: skip
        torch.cuda.synchronize()
        got = _read_i32(md, batch)
        m, nsd, _ = prepare_reference(lens_q, lens_k, 16, 16, 4, 128, 128, False, True, zfill=zfill)
        assert got["num_m_blocks"] == m and got["num_splits_dynamic"] == nsd, f"batch {batch}"
        empty = [got["num_splits_dynamic"][i] for i in (0, batch // 2)]
        assert empty == ([1, 1] if zfill else [0, 0])
        md.close()


def _read_i32(md, batch):
    out = {}
    for name in ("num_m_blocks", "num_splits_dynamic", "num_nheads_in_l2", "tile_count_semaphore"):
        t = getattr(md, name)
        if t is None:
            continue
        host = np.empty(t.shape[0], dtype=np.int32)
        from cuda.bindings import driver

        assert int(driver.cuMemcpyDtoH(host.ctypes.data, t.ptr, host.nbytes)[0]) == 0
        out[name] = host.tolist()
    return out


def test_semaphore_reset_is_stream_ordered(runtime):
    md = fa4aot.SchedulerMetadata(4, 16, 16, 128, runtime=runtime)
    from cuda.bindings import driver

    one = np.array([123], dtype=np.int32)
    driver.cuMemcpyHtoD(md.tile_count_semaphore.ptr, one.ctypes.data, 4)
    md.reset_semaphore(stream=torch.cuda.current_stream())
    torch.cuda.synchronize()
    assert _read_i32(md, 4)["tile_count_semaphore"] == [0]


@pytest.mark.parametrize("role", ["cubin", "plan"])
def test_corrupt_artifact_is_refused_on_gpu(gpu_cache, tmp_path, role):
    from fa4aot.core.index import Cache
    from fa4aot.runtime.loader import Runtime

    copy = tmp_path / "c"
    shutil.copytree(gpu_cache, copy)
    rt = Runtime(copy)
    op = torch.randn(4, 2, 8, 16, 128, device="cuda")
    lp = torch.randn(4, 2, 16, 8, device="cuda").transpose(-1, -2)
    out = torch.full((2, 8, 16, 128), 7.0, dtype=torch.bfloat16, device="cuda")
    v = rt.variant_for(
        "combine",
        dtype="bf16",
        head_dim=128,
        num_head=16,
        varlen=False,
        seqused=False,
        has_lse=False,
        num_splits_dynamic=False,
        log_max_splits=7,
    )
    entry = rt.index.entry(v.variant_id)
    path = Cache(copy).blob_path(entry.blobs[role])  # the cubin, or the plan (FA4's host code)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=f"{role} of entry"):
        fa4aot.combine(op, lp, out, runtime=rt)
    torch.cuda.synchronize()
    assert (out == 7.0).all()  # nothing ran


CUPY_ONLY = r"""
import sys, math
import numpy as np
import cupy as cp
import fa4aot
rt = fa4aot.open_runtime(sys.argv[1])
h, d, s, b = 16, 128, 64, 2
for splits in (1, 5, 64):
    op = cp.random.standard_normal((splits, b, s, h, d), dtype=cp.float32)
    lp = cp.random.standard_normal((splits, b, h, s), dtype=cp.float32).transpose(0, 1, 3, 2)
    out = cp.empty((b, s, h, d), dtype=cp.float16)
    lse = cp.empty((b, h, s), dtype=cp.float32).transpose(0, 2, 1)
    fa4aot.combine(op, lp, out, lse, stream=cp.cuda.get_current_stream())
    m = lp.max(axis=0)
    ref_lse = m + cp.log(cp.exp(lp - m[None]).sum(0))
    ref = (cp.exp(lp - ref_lse[None])[..., None] * op).sum(0)
    assert float(cp.abs(out.astype(cp.float32) - ref).max()) < 5e-2 * max(1.0, float(cp.abs(ref).max())), splits
    assert float(cp.abs(lse - ref_lse).max()) < 1e-4
lens = [5, 0, 130, 1]
cu = cp.asarray([0] + list(np.cumsum(lens)), dtype=cp.int32)
md = fa4aot.SchedulerMetadata(4, 16, 4, 128, causal=True)
md.compute(max_seqlen_q=130, max_seqlen_k=130, num_splits=8, cu_seqlens_q=cu, cu_seqlens_k=cu)
cp.cuda.Device().synchronize()
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cutlass", "flash_attn", "tvm_ffi", "quack", "triton"))
print("CUPY-ONLY OK", banned)
"""


def test_cupy_only_process(gpu_cache):
    pytest.importorskip("cupy")
    out = subprocess.run([sys.executable, "-c", CUPY_ONLY, str(gpu_cache)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("CUPY-ONLY OK []")
