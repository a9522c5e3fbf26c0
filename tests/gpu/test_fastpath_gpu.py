"""Repeated plain calls served from their prepared form (runtime/fastpath.py) on a real GPU:
bitwise equal to the full path, on torch's current stream, inside a CUDA graph, and a bad call
after warm-up still a typed error that leaves ``out`` untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import qkv, rand  # noqa: E402

import fa4aot  # noqa: E402
from fa4aot.core.errors import ArgumentError  # noqa: E402
from fa4aot.runtime import fastpath, workspaces  # noqa: E402


def _hits(rt) -> int:
    calls = fastpath.calls_of(rt)
    return calls.hits if calls is not None else 0


@pytest.mark.parametrize("causal", [False, True])
def test_repeated_calls_equal_the_full_path_bitwise(runtime, causal):
    b, s, h, hk, d = 2, 700, 16, 4, 128
    want = None
    before = _hits(runtime)
    for seed in range(5):  # the same values at new addresses each time
        q, k, v = qkv(b, s, h, d, hk)
        out = torch.full((b, s, h, d), 7.0, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # the fast path launches on torch's current stream
            res, lse = fa4aot.flash_attn_func(q, k, v, causal=causal, out=out, runtime=runtime)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        assert res is out and lse is None
        if want is None:
            want = out.clone()  # the first call: the full path
        assert torch.equal(out, want), seed
    assert _hits(runtime) - before == 3


def test_repeated_varlen_calls_with_a_tensor_map_workspace_equal_the_full_path(runtime):
    """SM90 varlen-K calls bind FA4's tensor-map workspace: the fast path launches them with its
    stream's buffer; outputs bitwise equal the full path's (a new workspace per call)."""
    total, h, hk, d = 512, 32, 8, 128
    q, k, v = rand(total, h, d), rand(total, hk, d, seed=1), rand(total, hk, d, seed=2)
    cu = torch.arange(0, total + 1, 64, dtype=torch.int32, device="cuda")
    before, want = _hits(runtime), None
    for _ in range(4):
        out = torch.full((total, h, d), 7.0, device="cuda", dtype=torch.bfloat16)
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True, out=out,
            runtime=runtime,
        )  # fmt: skip
        torch.cuda.synchronize()
        want = out.clone() if want is None else want
        assert torch.equal(out, want)
    assert _hits(runtime) - before == 2


def test_varlen_calls_with_batch_and_max_seqlen_changing_equal_the_full_path(runtime):
    """A serving loop: the batch and max_seqlen_q/k change on every call. The fast path serves
    them from FA4's decisions by region with per-call values; outputs bitwise equal the full
    path's (the fast path paused) for the same calls."""
    total, h, hk, d = 512, 32, 8, 128
    q, k, v = rand(total, h, d), rand(total, hk, d, seed=1), rand(total, hk, d, seed=2)
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 3, 5]
    cus = {b: torch.arange(0, total + 1, total // b, dtype=torch.int32, device="cuda")[: b + 1] for b in sizes}
    calls = fastpath._calls(runtime)

    def call(i):
        b = sizes[i % len(sizes)]
        m = total // b + i % 7
        out = torch.full((total, h, d), 7.0, device="cuda", dtype=torch.bfloat16)
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cus[b], cu_seqlens_k=cus[b], max_seqlen_q=m, max_seqlen_k=m + i % 3, causal=True,
            out=out, runtime=runtime,
        )  # fmt: skip
        return out

    calls.skip = 10**9  # the full path only
    wants = [call(i) for i in range(40)]
    calls.skip = 0
    before = _hits(runtime)
    for _ in range(3):
        for i in range(40):
            assert torch.equal(call(i), wants[i]), i
    torch.cuda.synchronize()
    assert _hits(runtime) - before >= 60  # most calls after the first sightings are served


def test_varlen_workspaces_on_two_streams_and_in_a_cuda_graph(runtime):
    """The served varlen calls' tensor-map workspace is a buffer per stream: calls interleaved on
    two streams (batches growing the buffers as they go) equal the full path's; a call captured in
    a CUDA graph takes a block of the graph's pool and replays equal after eager calls on the
    capture stream replaced that stream's buffer."""
    total, h, hk, d = 1024, 32, 8, 128
    q, k, v = rand(total, h, d), rand(total, hk, d, seed=1), rand(total, hk, d, seed=2)
    sizes = [2, 128, 4, 64, 8, 256]
    cus = {b: torch.arange(0, total + 1, total // b, dtype=torch.int32, device="cuda") for b in sizes}
    calls = fastpath._calls(runtime)

    def call(b, out):
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cus[b], cu_seqlens_k=cus[b], max_seqlen_q=total // b, max_seqlen_k=total // b,
            causal=True, out=out, runtime=runtime,
        )  # fmt: skip

    def fresh():
        return torch.full((total, h, d), 7.0, device="cuda", dtype=torch.bfloat16)

    calls.skip = 10**9  # the full path only
    wants = {}
    for b in sizes:
        wants[b] = fresh()
        call(b, wants[b])
    calls.skip = 0
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for st in streams:
        st.wait_stream(torch.cuda.current_stream())
    outs, before = [], _hits(runtime)
    for rep in range(3):
        for i, b in enumerate(sizes):
            out, st = fresh(), streams[(i + rep) % 2]
            st.wait_stream(torch.cuda.current_stream())  # (out's fill, on the current stream, first)
            with torch.cuda.stream(st):
                call(b, out)
            outs.append((b, out))
    torch.cuda.synchronize()
    assert _hits(runtime) - before >= len(sizes)  # the later rounds served
    for b, out in outs:
        assert torch.equal(out, wants[b]), b
    assert len(workspaces.stream_workspaces(runtime)) >= 2  # one buffer per stream
    graph, side, out = torch.cuda.CUDAGraph(), torch.cuda.Stream(), fresh()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call(4, out)  # the stream's buffer sized for batch 4
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out.fill_(7.0)
    with torch.cuda.graph(graph, stream=side):
        call(4, out)
    other = fresh()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(256, other)  # replaces the side stream's buffer by a larger one
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, wants[4]) and torch.equal(other, wants[256])


def test_repeated_calls_in_a_cuda_graph(runtime):
    b, s, h, d = 2, 512, 16, 128
    q, k, v = qkv(b, s, h, d)
    out = torch.zeros_like(q)

    def call():
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=runtime)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    want = out.clone()
    out.zero_()
    before = _hits(runtime)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    assert _hits(runtime) == before + 1  # captured through the fast path, on the capture stream
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_a_bad_call_after_warm_up_is_a_typed_error_and_out_stays(runtime):
    b, s, h, d = 2, 256, 16, 128
    q, k, v = qkv(b, s, h, d)
    out = torch.empty_like(q)
    for _ in range(3):
        fa4aot.flash_attn_func(q, k, v, out=out, runtime=runtime)
    guard = torch.full_like(q, 3.0)
    bad_out = guard.clone()
    with pytest.raises(ArgumentError):  # a K of another head dim: another key, the full path's error
        fa4aot.flash_attn_func(q, rand(b, s, h, 64), v, out=bad_out, runtime=runtime)
    with pytest.raises(ArgumentError):  # a misaligned output view of the right shape
        raw = torch.empty(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
        fa4aot.flash_attn_func(q, k, v, out=raw[1:].view(q.shape), runtime=runtime)
    torch.cuda.synchronize()
    assert torch.equal(bad_out, guard)


def _same(grads, want, exact: bool) -> bool:
    if exact:
        return all(torch.equal(g, w) for g, w in zip(grads, want))
    return all(torch.allclose(g.float(), w.float(), rtol=2e-2, atol=2e-2) for g, w in zip(grads, want))


@pytest.mark.parametrize("heads", [(16, 16), (16, 4)])
def test_repeated_backwards_equal_the_full_path(runtime, heads):
    """flash_attn_backward with no outputs given: the first two calls run the full path, the
    third on are served from their prepared form. Bitwise equal to the full path where the full
    path repeats itself bitwise (FA4's GQA dK/dV accumulate with atomics: there, within bf16
    rounding - a scratch not zeroed or a wrong buffer is far outside it)."""
    b, s, d = 2, 700, 128
    h, hk = heads
    q, k, v = qkv(b, s, h, d, hk)
    dout = rand(b, s, h, d, seed=3)
    out, lse = fa4aot.flash_attn_func(q, k, v, causal=True, return_lse=True, runtime=runtime)
    full = []
    for _ in range(2):  # the full path (outputs given), twice: does it repeat itself bitwise?
        grads = [torch.empty_like(t) for t in (q, k, v)]
        fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, dq=grads[0], dk=grads[1], dv=grads[2],
                                   runtime=runtime)  # fmt: skip
        full.append(grads)
    torch.cuda.synchronize()
    exact = _same(full[1], full[0], True)
    assert exact or hk < h  # MHA's backward is deterministic
    before = _hits(runtime)
    for _ in range(4):
        grads = fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, runtime=runtime)
        torch.cuda.synchronize()
        assert _same(grads, full[0], exact)
    assert _hits(runtime) - before == 2


def test_autograd_steps_take_the_backward_fast_path(runtime):
    """Training steps through fa4aot.torch (MHA: FA4's backward repeats itself bitwise)."""
    import fa4aot.torch as ft

    fa4aot.open_runtime(runtime.cache.root)  # the default runtime the ops use
    b, s, h, d = 2, 512, 16, 128
    q0, k0, v0 = qkv(b, s, h, d)
    seen = []
    for _ in range(4):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out, _ = ft.flash_attn_func(q, k, v, causal=True)
        out.float().square().sum().backward()
        torch.cuda.synchronize()
        seen.append((q.grad, k.grad, v.grad))
    for grads in seen[1:]:
        assert _same(grads, seen[0], True)
