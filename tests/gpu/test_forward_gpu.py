"""FA4's SM90 forward through fa4aot on a real H100/H200, against a float32 reference, with FA4's
own tolerance rule: error at most twice that of a bf16 reference, plus a small absolute slack."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import upcast_gqa, varlen_args  # noqa: E402

import fa4aot  # noqa: E402


def attention_ref(q, k, v, causal, upcast=True, cu_q=None, cu_k=None):
    """Attention in float32 (upcast) or in the inputs' precision (P rounded like a bf16 kernel).
    q (b, sq, h, d), k/v (b, sk, hk, d); causal masks are bottom-right aligned, as in FA."""
    if cu_q is not None:
        outs, lses = [], []
        for i in range(cu_q.numel() - 1):
            a, b_ = int(cu_q[i]), int(cu_q[i + 1])
            c, d_ = int(cu_k[i]), int(cu_k[i + 1])
            o, lse = attention_ref(q[None, a:b_], k[None, c:d_], v[None, c:d_], causal, upcast)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=-1)
    dtype = q.dtype
    q, k, v = upcast_gqa(q, k, v, upcast, heads_dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q * scale, k).float()
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        qi = torch.arange(sq, device=q.device)[:, None]
        ki = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(ki > qi + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    return o.to(dtype if not upcast else torch.float32), lse


def check(out, q, k, v, causal, **kw):
    """FA4's test rule: |out - ref| <= 2 |ref_lowprec - ref| + 2 * (rounding of ref), with ref the
    float32 computation rounded to the output dtype and ref_lowprec computed in that dtype."""
    ref32, lse = attention_ref(q, k, v, causal, upcast=True, **kw)
    ref = ref32.to(out.dtype)
    ref_lo, _ = attention_ref(q, k, v, causal, upcast=False, **kw)
    err = (out - ref).abs().max().item()
    err_lo = (ref_lo - ref).abs().max().item()
    atol = 2 * (ref + 0.3 - 0.3 - ref).abs().max().item()
    assert err <= 2 * err_lo + atol, f"max error {err:.3g}; bf16 reference {err_lo:.3g}, slack {atol:.3g}"
    return lse


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)])
@pytest.mark.parametrize("shape", [(2, 333, 1000), (1, 1537, 1537), (3, 17, 400), (4, 1, 777)])
def test_batched_forward_matches_reference(runtime, d, causal, heads, shape):
    b, sq, sk = shape
    h, hk = heads
    g = torch.Generator(device="cuda").manual_seed(d + sq + 7 * causal)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = fa4aot.flash_attn_func(q, k, v, causal=causal, runtime=runtime)
    torch.cuda.synchronize()
    assert lse is None and out.shape == (b, sq, h, d) and out.dtype == torch.bfloat16
    check(out, q, k, v, causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)])
def test_varlen_forward_matches_reference(runtime, d, causal, heads):
    h, hk = heads
    lens_q, lens_k = [5, 0, 300, 1, 129], [40, 7, 300, 1000, 129]
    varlen = varlen_args(lens_q, lens_k)
    g = torch.Generator(device="cuda").manual_seed(d + causal)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, _ = fa4aot.flash_attn_varlen_func(q, k, v, **varlen, causal=causal, runtime=runtime)
    torch.cuda.synchronize()
    check(out, q, k, v, causal, cu_q=varlen["cu_seqlens_q"].cpu(), cu_k=varlen["cu_seqlens_k"].cpu())


@pytest.mark.parametrize("causal", [False, True])
def test_lse_and_noncontiguous_inputs(runtime, causal):
    b, sq, sk, h, d = 2, 300, 500, 16, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    big = torch.randn(b, sq, h, d + 64, device="cuda", dtype=torch.bfloat16, generator=g)
    q = big[..., :d]  # padded head stride: not contiguous
    k = torch.randn(b, h, sk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(b, sk, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, lse = fa4aot.flash_attn_func(q, k, v, causal=causal, return_lse=True, runtime=runtime)
    torch.cuda.synchronize()
    ref_lse = check(out, q, k, v, causal)
    assert lse.shape == (b, h, sq)
    assert (lse - ref_lse).abs().max().item() < 1e-3


def test_decode_with_kv_cache(runtime):
    b, sk, h, hk, d = 8, 4096, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    used = torch.randint(1, sk + 1, (b,), dtype=torch.int32, device="cuda", generator=g)
    out, _ = fa4aot.flash_attn_varlen_func(q, k, v, seqused_k=used, causal=True, runtime=runtime)
    torch.cuda.synchronize()
    for i in range(b):
        n = int(used[i])
        check(out[i : i + 1], q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], True)


def test_cuda_graph_capture_and_replay(runtime):
    b, s, h, d = 2, 512, 16, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=runtime)  # warm-up: loads the kernels
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=runtime)
    for seed in range(3):
        torch.manual_seed(seed)
        q.copy_(torch.randn_like(q))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        check(out, q, k, v, True)


def test_cuda_graph_of_a_varlen_call_replays_with_new_cu_seqlens(runtime):
    """A captured varlen call (cu_seqlens_k: FA4's tensor-map workspace, at a stable address)
    replays correctly after the sequence lengths in its cu_seqlens change."""
    h, hk, d, total_q, total_k = 16, 4, 128, 600, 2400
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(total_q, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(total_k, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(total_k, hk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu_q = torch.zeros(4, dtype=torch.int32, device="cuda")
    cu_k = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    layouts = [([200, 200, 200], [800, 800, 800]), ([1, 99, 500], [10, 1390, 1000]), ([600, 0, 0], [2400, 0, 0])]

    def set_lens(lq, lk):
        cu_q.copy_(torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32))
        cu_k.copy_(torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32))

    def run():
        fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=total_q,
                                      max_seqlen_k=total_k, causal=True, out=out, runtime=runtime)  # fmt: skip

    set_lens(*layouts[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: loads the kernel, sizes the workspace for these bounds
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lq, lk in layouts:
        set_lens(lq, lk)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        check(out, q, k, v, True, cu_q=cu_q.cpu(), cu_k=cu_k.cpu())


CUPY_ONLY = r"""
import sys, math
import cupy as cp
import fa4aot
from fa4aot import RawTensor
rt = fa4aot.open_runtime(sys.argv[1])

def bf16(x):  # float32 -> bfloat16 bits (round to nearest even), as uint16
    u = x.astype(cp.float32).view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)

def f32(bits):
    return (bits.astype(cp.uint32) << 16).view(cp.float32)

b, s, h, d = 2, 300, 16, 128
rs = cp.random.RandomState(0)
q, k, v = (bf16(rs.standard_normal((b, s, h, d), dtype=cp.float32)) for _ in range(3))
out = cp.empty((b, s, h, d), dtype=cp.uint16)
raw = lambda a: RawTensor(a.data.ptr, a.shape, "bf16")
fa4aot.flash_attn_func(raw(q), raw(k), raw(v), causal=True, out=raw(out), stream=cp.cuda.get_current_stream())
qf, kf, vf = f32(q), f32(k), f32(v)
sc = cp.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(d)
sc = cp.where(cp.tril(cp.ones((s, s), dtype=bool)), sc, -cp.inf)
p = cp.exp(sc - sc.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
ref = cp.einsum("bhqk,bkhd->bqhd", p, vf)
err = float(cp.abs(f32(out) - ref).max())
assert err < 2e-2, err
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "cutlass", "flash_attn", "tvm_ffi", "quack", "triton"))
print("CUPY-ONLY FORWARD OK", f"{err:.2e}", banned)
"""


def test_cupy_only_forward(gpu_cache):
    pytest.importorskip("cupy")
    out = subprocess.run([sys.executable, "-c", CUPY_ONLY, str(gpu_cache)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CUPY-ONLY FORWARD OK" in out.stdout and out.stdout.strip().endswith("[]")
