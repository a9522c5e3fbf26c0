"""Prepared calls, preload and the ctypes driver on a real GPU: bitwise equal to the plain API,
new addresses and streams followed, CUDA graph capture, refusals that leave outputs untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch_helpers import qkv, rand, varlen_args  # noqa: E402

import fa4aot  # noqa: E402
from fa4aot.core.errors import ArgumentError, VariantNotFoundError  # noqa: E402


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)])
def test_prepared_batched_forward_equals_plain_call(runtime, causal, heads):
    b, s, d = 2, 700, 128
    h, hk = heads
    run = fa4aot.prepare_forward(
        rand(b, s, h, d), rand(b, s, hk, d), rand(b, s, hk, d), torch.empty(b, s, h, d, device="cuda",
        dtype=torch.bfloat16), causal=causal, runtime=runtime,
    )  # fmt: skip
    for seed in range(3):  # new tensors (new addresses) each time, then the same ones again
        q, k, v = rand(b, s, h, d, seed=seed), rand(b, s, hk, d, seed=seed + 10), rand(b, s, hk, d, seed=seed + 20)
        want, _ = fa4aot.flash_attn_func(q, k, v, causal=causal, runtime=runtime)
        out = torch.full_like(want, 7.0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        run(q, k, v, out, stream=stream)
        run(q, k, v, out, stream=stream)  # same addresses: the recorded launch is reused
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        assert torch.equal(out, want)


def test_prepared_varlen_forward_and_combine_equal_plain_calls(runtime):
    lens_q, lens_k = [5, 0, 300, 1, 129], [40, 7, 300, 1000, 129]
    varlen = varlen_args(lens_q, lens_k)
    q, k, v = rand(sum(lens_q), 16, 128), rand(sum(lens_k), 4, 128, seed=1), rand(sum(lens_k), 4, 128, seed=2)
    want, _ = fa4aot.flash_attn_varlen_func(q, k, v, **varlen, causal=True, runtime=runtime)
    out = torch.zeros_like(want)
    run = fa4aot.prepare_forward(q, k, v, out, **varlen, causal=True, runtime=runtime)
    assert run.arg_names == ("q", "k", "v", "out", "cu_seqlens_q", "cu_seqlens_k")
    run(q, k, v, out, varlen["cu_seqlens_q"], varlen["cu_seqlens_k"])
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    # combine
    op = torch.randn(4, 2, 8, 16, 128, device="cuda")
    lp = torch.randn(4, 2, 16, 8, device="cuda").transpose(-1, -2)
    a, b = (
        torch.empty(2, 8, 16, 128, device="cuda", dtype=torch.bfloat16),
        torch.zeros(2, 8, 16, 128, device="cuda", dtype=torch.bfloat16),
    )
    fa4aot.combine(op, lp, a, runtime=runtime)
    fa4aot.prepare_combine(op, lp, b, runtime=runtime)(op, lp, b)
    torch.cuda.synchronize()
    assert torch.equal(a, b)


def test_prepared_call_refusals_leave_out_untouched(runtime):
    b, s, h, d = 1, 256, 8, 128
    q, k, v = qkv(b, s, h, d)
    out = torch.full_like(q, 7.0)
    run = fa4aot.prepare_forward(q, k, v, out, runtime=runtime)
    big = rand(b, s, h, d + 8)
    for args in (
        (q[:, :100], k, v, out),  # shape
        (big[..., :d], k, v, out),  # strides
        (q.half(), k, v, out),  # dtype
        (q.cpu(), k, v, out),  # device
        (rand(b * s * h * d + 4).view(-1)[4:].view(b, s, h, d), k, v, out),  # 8-byte aligned only
    ):
        with pytest.raises(ArgumentError):
            run(*args)
    torch.cuda.synchronize()
    assert (out == 7.0).all()


def test_prepared_call_in_a_cuda_graph(runtime):
    b, s, h, d = 2, 512, 16, 128
    q, k, v = qkv(b, s, h, d)
    out = torch.empty_like(q)
    run = fa4aot.prepare_forward(q, k, v, out, causal=True, runtime=runtime)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(q, k, v, out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(q, k, v, out)  # the stream defaults to torch's current (capturing) stream
    for seed in range(3):
        q.copy_(rand(b, s, h, d, seed=100 + seed))
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        want, _ = fa4aot.flash_attn_func(q, k, v, causal=True, runtime=runtime)
        torch.cuda.synchronize()
        assert torch.equal(out, want)


def test_a_varying_prepared_forward_equals_plain_calls_for_every_batch(runtime):
    """prepare_forward(varying=True): one prepared call, the batch and max_seqlen_q/k new on every
    call (some seen before, some not), each output bitwise equal to the plain call's; a tensor of
    another shape is refused with out untouched; calls captured in a CUDA graph replay equal."""
    total, h, hk, d = 512, 32, 8, 128
    q, k, v = rand(total, h, d), rand(total, hk, d, seed=1), rand(total, hk, d, seed=2)
    sizes = [1, 3, 8, 2, 64, 5, 16, 128, 7]
    cus = {b: torch.arange(0, total + 1, total // b, dtype=torch.int32, device="cuda") for b in sizes}
    out = torch.empty_like(q)
    run = fa4aot.prepare_forward(q, k, v, out, cu_seqlens_q=cus[8], cu_seqlens_k=cus[8], max_seqlen_q=64,
                                 max_seqlen_k=64, causal=True, varying=True, runtime=runtime)  # fmt: skip
    assert run.served
    checked = 0
    for rep in range(2):
        for i, b in enumerate(sizes):
            m = total // b
            mq, mk = m + (i + rep) % 5, m + (i * 3 + rep) % 11
            try:
                want, _ = fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cus[b], cu_seqlens_k=cus[b],
                                                        max_seqlen_q=mq, max_seqlen_k=mk, causal=True, runtime=runtime)  # fmt: skip
            except VariantNotFoundError:  # a decision whose kernel the GPU cache lacks
                with pytest.raises(VariantNotFoundError):
                    run(q, k, v, out, cus[b], cus[b], max_seqlen_q=mq, max_seqlen_k=mk)
                continue
            out.fill_(7.0)
            run(q, k, v, out, cus[b], cus[b], max_seqlen_q=mq, max_seqlen_k=mk)
            torch.cuda.synchronize()
            n = int(cus[b][-1])  # the rows of the sequences (the plain call's other rows are torch.empty's)
            assert torch.equal(out[:n], want[:n]), (b, mq, mk)
            checked += 1
    assert checked >= 12, checked
    out.fill_(7.0)
    with pytest.raises(ArgumentError, match="^q: shape"):
        run(q[:-1], k, v, out, cus[8], cus[8], max_seqlen_q=64, max_seqlen_k=64)
    torch.cuda.synchronize()
    assert bool((out == 7.0).all())
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(q, k, v, out, cus[16], cus[16], max_seqlen_q=128, max_seqlen_k=128)
    torch.cuda.current_stream().wait_stream(side)
    want, _ = fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cus[16], cu_seqlens_k=cus[16], max_seqlen_q=128,
                                            max_seqlen_k=128, causal=True, runtime=runtime)  # fmt: skip
    torch.cuda.synchronize()
    out.fill_(7.0)
    with torch.cuda.graph(graph, stream=side):
        run(q, k, v, out, cus[16], cus[16], max_seqlen_q=128, max_seqlen_k=128)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_a_varying_prepared_forward_of_raw_pointers_equals_plain_calls(runtime):
    """prepare_forward(varying=True) bound to raw device pointers (another framework's tensors):
    calls of new batches and max_seqlens, on a stream of their own, launched from prepared forms
    (not the full path), each output bitwise equal to the plain PyTorch call's; a tensor of another
    dtype is refused with out untouched."""
    from fa4aot.runtime.tensors import RawTensor

    total, h, hk, d = 512, 32, 8, 128
    q, k, v = rand(total, h, d), rand(total, hk, d, seed=1), rand(total, hk, d, seed=2)
    sizes = [8, 1, 3, 2, 64, 5, 16, 128, 7]
    cus = {b: torch.arange(0, total + 1, total // b, dtype=torch.int32, device="cuda") for b in sizes}
    out = torch.empty_like(q)

    def raw(x, dtype="bf16"):
        return RawTensor(x.data_ptr(), tuple(x.shape), dtype, device=0)

    rq, rk, rv, ro = raw(q), raw(k), raw(v), raw(out)
    run = fa4aot.prepare_forward(rq, rk, rv, ro, cu_seqlens_q=raw(cus[8], "int32"), cu_seqlens_k=raw(cus[8], "int32"),
                                 max_seqlen_q=64, max_seqlen_k=64, causal=True, varying=True, runtime=runtime)  # fmt: skip
    assert not run.served and run.other is not None
    side = torch.cuda.Stream()
    checked = 0
    for i, b in enumerate(sizes):
        m = total // b
        mq, mk = m + i % 5, m + (i * 3) % 11
        try:
            want, _ = fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cus[b], cu_seqlens_k=cus[b],
                                                    max_seqlen_q=mq, max_seqlen_k=mk, causal=True, runtime=runtime)  # fmt: skip
        except VariantNotFoundError:  # a decision whose kernel the GPU cache lacks
            continue
        out.fill_(7.0)
        side.wait_stream(torch.cuda.current_stream())
        rc = raw(cus[b], "int32")
        run(rq, rk, rv, ro, rc, rc, max_seqlen_q=mq, max_seqlen_k=mk, stream=side.cuda_stream)
        torch.cuda.synchronize()
        n = int(cus[b][-1])
        assert torch.equal(out[:n], want[:n]), (b, mq, mk)
        checked += 1
    assert checked >= 6 and run.other_calls >= checked - 1, (checked, run.other_calls)
    out.fill_(7.0)
    with pytest.raises(ArgumentError, match="^k: dtype"):
        run(rq, raw(k, "fp16"), rv, ro, raw(cus[8], "int32"), raw(cus[8], "int32"))
    torch.cuda.synchronize()
    assert bool((out == 7.0).all())


def test_preload_then_calls_load_nothing(gpu_cache):
    from fa4aot.runtime.loader import Runtime

    rt = Runtime(gpu_cache)
    n = rt.preload("all", threads=4)
    assert n == len(rt.index) == len(rt._loaded)
    q = rand(1, 128, 16, 128)
    out, _ = fa4aot.flash_attn_func(q, q, q, causal=True, runtime=rt)
    torch.cuda.synchronize()
    assert len(rt._loaded) == n and out.isfinite().all()
