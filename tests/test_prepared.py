"""Prepared calls on the CPU (fake driver): they launch exactly what the plain API launches, follow
new addresses and streams, refuse tensors that differ from the bound ones without launching, and
own their split-KV buffers."""

from __future__ import annotations

import pytest
from helpers import SPLIT_DECODE, run_threads, split_decode_tensors

import fa4aot
from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.metadata import SchedulerMetadata
from fa4aot.runtime.tensors import DeviceTensor, RawTensor

B = 0x7F30_0000_0000


def t(i, shape, dtype="bf16", strides=None, offset=0, device=0):
    return RawTensor(B + i * (1 << 36) + offset, tuple(shape), dtype, strides, device)


def _record_params(rt, drv):
    """Let the fake driver read every launch's parameter bytes."""
    for lv in rt._loaded.values():
        for h, k in zip(lv.kernels, lv.entry.meta["kernels"]):
            drv.param_sizes[h] = [size for _, _, size in sorted(k["params"])]


def _buffer(launch, lv):
    """The launch's parameter bytes laid out as the kernel's parameter buffer."""
    k = lv.entry.meta["kernels"][0]
    buf = bytearray(k["cbank_param_size"])
    for (_, off, size), raw in zip(sorted(k["params"]), launch.params):
        buf[off : off + size] = raw
    return bytes(buf)


def _written(lv, named):
    """Expected parameter bytes and which of them FA4's host code writes (the rest is stack)."""
    plan = lv.plan
    flat = plan.pack(named)
    n = plan.kernels[0].param_bytes
    a = bytes(plan.call(flat, pattern=0x00).launches[0].params[:n])
    b = bytes(plan.call(flat, pattern=0xFF).launches[0].params[:n])
    return a, [x == y for x, y in zip(a, b)]


def _same(got: bytes, want: bytes, mask: list[bool]) -> bool:
    return all(g == w for g, w, m in zip(got, want, mask) if m)


def _same_launches(drv, lv, stream, named) -> bytes:
    """Check the last two launches, the plain call's then the prepared call's: the same grid,
    block, smem and attributes on ``stream``, and both carrying the bytes FA4's host code writes
    for ``named``. The prepared launch's parameter buffer."""
    plain, prep = drv.launches[-2:]
    assert (prep.grid, prep.block, prep.smem, prep.attrs, prep.stream) == (
        plain.grid,
        plain.block,
        plain.smem,
        plain.attrs,
        stream,
    )
    named = {
        n: (DeviceTensor(x.ptr, x.shape, x.strides, x.dtype, 0, "raw") if isinstance(x, RawTensor) else x)
        for n, x in named.items()
    }
    want, mask = _written(lv, named)
    assert _same(_buffer(prep, lv), want, mask) and _same(_buffer(plain, lv), want, mask)
    return _buffer(prep, lv)


def test_prepared_forward_launches_what_the_plain_call_launches(sm90):
    rt, drv = sm90
    b, s, h, d = 2, 1000, 16, 128
    q, k, v, o = (t(i, (b, s, h, d)) for i in range(4))
    run = fa4aot.prepare_forward(q, k, v, o, causal=True, runtime=rt)
    assert run.arg_names == ("q", "k", "v", "out") and run.variants[0].family == "fwd_sm90"
    (lv,) = rt._loaded.values()
    _record_params(rt, drv)
    # the same call through the plain API and the prepared one, then new addresses, then the old again
    q2, o2 = t(7, (b, s, h, d)), t(8, (b, s, h, d))
    for qq, oo, stream in ((q, o, 5), (q2, o2, 6), (q, o, 7), (q, o, 8)):
        fa4aot.flash_attn_func(qq, k, v, causal=True, out=oo, stream=stream, runtime=rt)
        run(qq, k, v, oo, stream=stream)
        # what the launch must carry: FA4's host code run on these
        named = dict(q=qq, k=k, v=v, out=oo, softmax_scale=128**-0.5, stream=stream)
        params = _same_launches(drv, lv, stream, named)
        assert qq.ptr.to_bytes(8, "little") in params  # the new q address reached the kernel


def test_prepared_call_refuses_other_tensors_and_launches_nothing(sm90):
    rt, drv = sm90
    b, s, h, d = 2, 512, 8, 128
    q, k, v, o = (t(i, (b, s, h, d)) for i in range(4))
    run = fa4aot.prepare_forward(q, k, v, o, runtime=rt)
    cases = [
        ((t(0, (b, s + 1, h, d)), k, v, o), "q: shape"),
        ((q, t(1, (b, s, h, d), strides=(s * h * d * 2, h * d * 2, d, 1)), v, o), "k: strides"),
        ((q, k, t(2, (b, s, h, d), "fp16"), o), "v: dtype"),
        ((q, k, v, t(3, (b, s, h, d), device=1)), "out: device"),
        ((q, k, v, t(3, (b, s, h, d), offset=8)), "out: base address .* not 16-byte aligned"),
        ((q, k, v), "missing|positional"),
    ]
    for args, match in cases:
        with pytest.raises((ArgumentError, TypeError), match=match):
            run(*args)
    assert drv.launches == []
    run(q, k, v, o)
    assert len(drv.launches) == 1


def test_prepared_split_varlen_owns_its_buffers(sm100):
    rt, drv = sm100
    q, k, v, cu_q, cu_k, out = split_decode_tensors(t)
    before = dict(drv.allocs)
    run = fa4aot.prepare_forward(
        q, k, v, out, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, runtime=rt
    )
    assert [x.family for x in run.variants] == ["fwd_sm100", "combine"]
    # the partials, the scheduler metadata and FA4's tensor-map workspace (varlen K), owned by the call
    assert len(drv.allocs) == len(before) + 3
    n_allocs = len(drv.allocs)
    for stream in (9, 10):
        run(q, k, v, out, cu_q, cu_k, stream=stream)
    assert len(drv.allocs) == n_allocs  # nothing allocated per call
    families = {lv.kernels[0]: lv.variant.family for lv in rt._loaded.values()}
    assert [families[x.kernel] for x in drv.launches] == ["prepare", "fwd_sm100", "combine"] * 2
    assert [x.stream for x in drv.launches] == [9, 9, 9, 10, 10, 10]
    run.close()
    assert len(drv.allocs) == len(before)


def test_prepared_split_varlen_with_caller_metadata_resets_its_semaphore(sm100):
    rt, drv = sm100
    b, h, hk, d, _, _ = SPLIT_DECODE
    q, k, v, cu_q, cu_k, out = split_decode_tensors(t)
    md = SchedulerMetadata(b, h, hk, d, runtime=rt).compute(
        max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k
    )
    run = fa4aot.prepare_forward(
        q, k, v, out, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=4000, num_splits=8,
        scheduler_metadata=md, runtime=rt,
    )  # fmt: skip
    n = len(drv.launches)
    run(q, k, v, out, cu_q, cu_k, stream=3)
    families = {lv.kernels[0]: lv.variant.family for lv in rt._loaded.values()}
    assert [families[x.kernel] for x in drv.launches[n:]] == ["fwd_sm100", "combine"]
    assert drv.memsets[-1] == (md.tile_count_semaphore.ptr, 0, 1, 3)


def test_prepared_combine_matches_combine(sm90):
    rt, drv = sm90
    splits, b, s, h, d = 5, 2, 100, 16, 128
    op = t(0, (splits, b, s, h, d), "fp32")
    lp = t(1, (splits, b, s, h), "fp32", strides=(b * h * s, h * s, 1, s))
    out = t(2, (b, s, h, d))
    run = fa4aot.prepare_combine(op, lp, out, runtime=rt)
    assert run.arg_names == ("out_partial", "lse_partial", "out")
    (lv,) = rt._loaded.values()
    assert lv.variant.family == "combine"
    _record_params(rt, drv)
    op2, out2 = t(7, (splits, b, s, h, d), "fp32"), t(8, (b, s, h, d))
    for oo_p, oo, stream in ((op, out, 4), (op2, out2, 5), (op, out, 6)):
        fa4aot.combine(oo_p, lp, oo, stream=stream, runtime=rt)
        run(oo_p, lp, oo, stream=stream)
        named = dict(out_partial=oo_p, lse_partial=lp, out=oo, stream=stream)  # FA4's host code run on these
        params = _same_launches(drv, lv, stream, named)
        assert oo_p.ptr.to_bytes(8, "little") in params  # the new partials' address reached the kernel


def test_prepared_call_from_threads(sm90):
    rt, drv = sm90
    b, s, h, d = 1, 256, 8, 128
    q, k, v, o = (t(i, (b, s, h, d)) for i in range(4))
    run = fa4aot.prepare_forward(q, k, v, o, runtime=rt)
    errors = []

    def worker(stream):
        try:
            for _ in range(50):
                run(q, k, v, o, stream=stream)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_threads(worker, (100 + i for i in range(4)))
    assert not errors and len(drv.launches) == 200
    assert sorted({x.stream for x in drv.launches}) == [100, 101, 102, 103]


def test_launch_ptrs_launches_what_the_checked_call_launches(sm90, sm100):
    """``launch_ptrs(*addresses, stream=)`` makes the launches of the checked call (kernels,
    grids, streams, and the parameter bytes FA4's host code writes), with no tensor check."""
    rt, drv = sm90
    b, s, h, d = 2, 1000, 16, 128
    ts = [t(i, (b, s, h, d)) for i in range(4)]
    run = fa4aot.prepare_forward(*ts, causal=True, runtime=rt)
    (lv,) = rt._loaded.values()
    _record_params(rt, drv)
    named = dict(zip(("q", "k", "v", "out"), (DeviceTensor(x.ptr, x.shape, x.strides, x.dtype, 0, "raw") for x in ts)))
    for stream in (5, 6):
        run(*ts, stream=stream)
        run.launch_ptrs(*(x.ptr for x in ts), stream=stream)
        checked, unchecked = drv.launches[-2:]
        assert (checked.kernel, checked.grid, checked.block, checked.smem, checked.stream) == (
            unchecked.kernel, unchecked.grid, unchecked.block, unchecked.smem, stream,
        )  # fmt: skip
        want, mask = _written(lv, dict(named, softmax_scale=128**-0.5, stream=stream))
        assert _same(_buffer(unchecked, lv), want, mask) and _same(_buffer(checked, lv), want, mask)
    # split-KV varlen: prepare -> forward -> combine, on the buffers the call owns
    rt, drv = sm100
    b, h, hk, d = 16, 16, 4, 128
    ts = [t(0, (16, h, d)), t(1, (40000, hk, d)), t(2, (40000, hk, d)), t(3, (16, h, d)), t(4, (b + 1,), "int32"),
          t(5, (b + 1,), "int32")]  # fmt: skip
    run = fa4aot.prepare_forward(
        *ts[:4], cu_seqlens_q=ts[4], cu_seqlens_k=ts[5], max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, runtime=rt
    )
    _record_params(rt, drv)
    run(*ts, stream=9)
    run.launch_ptrs(*(x.ptr for x in ts), stream=9)
    checked, unchecked = drv.launches[:3], drv.launches[3:]
    assert [(x.kernel, x.grid, x.block, x.stream) for x in checked] == [
        (x.kernel, x.grid, x.block, x.stream) for x in unchecked
    ]
    assert ts[0].ptr.to_bytes(8, "little") in b"".join(unchecked[1].params)  # q reached the forward
    run.close()


def _launches_of_each_path(cache, hop):
    """The launches of a plain call (the full launcher), a checked prepared call and its
    ``launch_ptrs``, with fa4aot's compiled hop or with ctypes."""
    from fake_driver import FakeDriver

    from fa4aot.plan import library
    from fa4aot.runtime.loader import Runtime

    saved, library.HOP = library.HOP, hop
    try:
        drv = FakeDriver(cc=(9, 0), num_sms=132)
        rt = Runtime(cache, driver=drv)
        ts = [t(i, (2, 1000, 16, 128)) for i in range(4)]
        run = fa4aot.prepare_forward(*ts, causal=True, runtime=rt)
        _record_params(rt, drv)
        fa4aot.flash_attn_func(*ts[:3], causal=True, out=ts[3], stream=5, runtime=rt)
        run(*ts, stream=6)
        run.launch_ptrs(*(x.ptr for x in ts), stream=7)
        with pytest.raises(ArgumentError, match="not a 64-bit unsigned int|not a valid pointer"):
            run.launch_ptrs(-1, *(x.ptr for x in ts[1:]), stream=7)
        (lv,) = rt._loaded.values()
        named = dict(
            zip(("q", "k", "v", "out"), (DeviceTensor(x.ptr, x.shape, x.strides, x.dtype, 0, "raw") for x in ts))
        )
        out = []
        for x in drv.launches:  # the bytes FA4's host code writes (the rest is stack)
            want, mask = _written(lv, dict(named, softmax_scale=128**-0.5, stream=x.stream))
            assert _same(_buffer(x, lv), want, mask)
            out.append((x.kernel, x.grid, x.block, x.smem, x.attrs, x.stream, bytes(want)))
        return out
    finally:
        library.HOP = saved


def test_the_compiled_hop_launches_what_ctypes_launches(built_cache):
    """``pip install`` builds fa4aot/plan/_hop.c where a C compiler is (the test environment has
    one: the build extra links launch plans), and a launch through it carries what the ctypes path
    carries; a bad address is a typed error either way, launching nothing."""
    from fa4aot.plan import library

    assert library.HOP is not None, "fa4aot.plan._hop is not built: reinstall with `pip install -e .` (needs cc)"
    with_hop = _launches_of_each_path(built_cache, library.HOP)
    assert len(with_hop) == 3 and with_hop == _launches_of_each_path(built_cache, None)


def test_the_hops_stream_buffer_answers_only_an_uncaptured_stream_with_enough_slots():
    """fa4aot.plan._hop.stream_buffer (the served calls' workspace check): the stream's buffer
    address when the dict holds one of at least the slots asked and the driver's
    cuStreamIsCapturing says the stream is not being captured; None when it is (or the driver
    cannot tell, or there is no buffer, or it is too small), so the caller's own path decides."""
    from fake_driver import FakeDriver

    from fa4aot.plan import library

    assert library.HOP is not None, "fa4aot.plan._hop is not built: reinstall with `pip install -e .` (needs cc)"
    sb, drv = library.HOP.stream_buffer, FakeDriver()
    query = drv.capture_status_function()
    buffers = {7: (0x7F00_0000_0000, 64), 0: (0x7F00_1000_0000, 8)}
    assert sb(query, buffers, 7, 64) == 0x7F00_0000_0000 and sb(query, buffers, 7, 1) == 0x7F00_0000_0000
    assert sb(query, buffers, 0, 8) == 0x7F00_1000_0000  # (the legacy default stream, handle 0)
    assert sb(query, buffers, 7, 65) is None and sb(query, buffers, 9, 1) is None
    drv.capturing = {7}
    assert sb(query, buffers, 7, 1) is None and sb(query, buffers, 0, 1) == 0x7F00_1000_0000
    drv.capturing, drv.capture_result = set(), 900  # (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
    assert sb(query, buffers, 7, 1) is None
    with pytest.raises(TypeError):
        sb(query, list(buffers.items()), 7, 1)
    with pytest.raises(ArgumentError):
        sb(query, buffers, -1, 1)
