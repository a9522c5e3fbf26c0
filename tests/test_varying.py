"""Prepared forwards with a per-call batch and max_seqlen (``prepare_forward(varying=True)``,
runtime/varying.py) on the CPU: every call launches what the full path launches for the same
arguments, with FA4's parameter bytes; bad tensors are typed errors with nothing launched."""

from __future__ import annotations

import random

import pytest
from fake_driver import FakeDriver
from test_fastpath import FakeTorch, _assert_fa4s_bytes, _hits, _made, _variant_of, fake_torch, t  # noqa: F401

import fa4aot
from fa4aot.core.errors import ArgumentError, VariantNotFoundError
from fa4aot.runtime import fastpath, prepared
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import DeviceTensor, RawTensor


@pytest.fixture
def pair(built_cache, monkeypatch):
    """(runtime, its driver, a reference runtime on the full path only, its driver): an SM100
    (the fast tier builds varlen-K kernels for SM100 only)."""
    real = prepared.alloc_like  # (raw pointers: the real one, which cannot allocate for them)
    monkeypatch.setattr(prepared, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype)
                        if isinstance(ref, FakeTorch) else real(ref, shape, dtype))  # fmt: skip
    drv, ref_drv = FakeDriver(cc=(10, 0), num_sms=148), FakeDriver(cc=(10, 0), num_sms=148)
    rt, ref = Runtime(built_cache, driver=drv), Runtime(built_cache, driver=ref_drv)
    fastpath._calls(ref).skip = 10**9
    return rt, drv, ref, ref_drv


def test_every_batch_and_max_seqlen_launches_what_the_full_path_launches(pair, monkeypatch):
    """A serving loop through one varying prepared call: batch and max_seqlen_q/k new on every
    call, served from the first call on (no sightings), re-deciding only at FA4's boundaries;
    each launch is the full path's kernel, grid, block and shared memory for the same call, with
    FA4's parameter bytes for the call's own values."""
    rt, drv, ref, ref_drv = pair
    steps = []
    real_step = fastpath._Family.step
    monkeypatch.setattr(fastpath._Family, "step", lambda self, *a: steps.append(a) or real_step(self, *a))
    made = []
    real_new_empty = FakeTorch.new_empty
    monkeypatch.setattr(FakeTorch, "new_empty", lambda self, shape, dtype=None: made.append(real_new_empty(self, shape, dtype)) or made[-1])  # fmt: skip
    total, h, hk, d = 15000, 16, 16, 128
    q, k, v, o = t(0, (total, h, d)), t(1, (total, hk, d)), t(2, (total, hk, d)), t(3, (total, h, d))
    cu5 = t(4, (6,), "int32")
    run = fa4aot.prepare_forward(q, k, v, o, cu_seqlens_q=cu5, cu_seqlens_k=cu5, max_seqlen_q=3000,
                                 max_seqlen_k=3000, causal=True, varying=True, runtime=rt)  # fmt: skip
    assert run.served and run.arg_names == ("q", "k", "v", "out", "cu_seqlens_q", "cu_seqlens_k")
    assert drv.launches == []  # preparing launches nothing
    rng = random.Random(1)
    served = 0
    for i in range(50):
        b = rng.choice([1, 3, 5, 7, 12, 40])
        cu = t(4, (b + 1,), "int32", offset=64 * i)
        mq, mk = rng.randint(total // b // 2, total // b), rng.randint(total // b // 2, total // b)
        try:
            fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mq, max_seqlen_k=mk,
                                          causal=True, out=o, runtime=ref)  # fmt: skip
        except VariantNotFoundError:  # FA4 decides on a kernel the small test cache lacks
            with pytest.raises(VariantNotFoundError):
                run(q, k, v, o, cu, cu, max_seqlen_q=mq, max_seqlen_k=mk)
            continue
        before = _hits(rt)
        run(q, k, v, o, cu, cu, max_seqlen_q=mq, max_seqlen_k=mk)
        got, want = drv.launches[-1], ref_drv.launches[-1]
        assert _variant_of(rt, got.kernel) == _variant_of(ref, want.kernel)
        assert (got.grid, got.block, got.smem) == (want.grid, want.block, want.smem)
        if _hits(rt) > before:
            served += 1
            _assert_fa4s_bytes(rt, drv, ref, (q, k, v, o, cu), mq, mk, made[-1] if made else None)
    assert served >= 40, served
    assert len(steps) < served // 2, (len(steps), served)  # most calls stay in the last decision's region


def test_bad_tensors_are_typed_errors_and_nothing_launches(pair):
    """A tensor unlike the prepared one (shape, dtype, strides; a sequence tensor's length is
    free) raises before anything launches; sequence tensors of different batches get the full
    path's error; prepare refuses what a varying call does not take."""
    rt, drv, _, _ = pair
    total, h, d = 4000, 16, 128
    q, k, v, o = (t(i, (total, h, d)) for i in range(4))
    cu = t(4, (5,), "int32")
    run = fa4aot.prepare_forward(q, k, v, o, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1000, max_seqlen_k=1000,
                                 causal=True, varying=True, runtime=rt)  # fmt: skip
    run(q, k, v, o, cu, cu)
    n = len(drv.launches)
    for bad, match in [
        ((t(0, (total, h, 64)), k, v, o, cu, cu), "^q: shape"),
        ((q, t(1, (total, h, d), "fp16"), v, o, cu, cu), "^k: dtype"),
        ((q, k, v, o, cu, t(5, (3, 2), "int32")), "^cu_seqlens_k: shape"),
        ((q, k, v, o, cu, t(5, (4,), "int32")), "cu_seqlens_k"),  # batch 3 against cu_seqlens_q's 4
    ]:
        with pytest.raises(ArgumentError, match=match):
            run(*bad)
    for bad_max in (-1, 2**31, 1.5, "64"):  # the full path's typed errors for bad max_seqlens
        with pytest.raises(ArgumentError, match="max_seqlen_q"):
            run(q, k, v, o, cu, cu, max_seqlen_q=bad_max)
    assert len(drv.launches) == n
    for kw in ({"lse": t(6, (h, total), "fp32")}, {"scales": object()}):
        with pytest.raises(ArgumentError, match="varying=True takes no lse, scales"):
            fa4aot.prepare_forward(q, k, v, o, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=1000,
                                   max_seqlen_k=1000, varying=True, runtime=rt, **kw)  # fmt: skip


def test_raw_pointer_calls_are_served_on_their_stream_and_a_torch_stream_call_takes_the_full_path(pair):
    """Another framework's tensors (raw pointers here): every call of a new batch and max_seqlen
    launches from the family's prepared form - the full path's kernel, grid, block and shared
    memory, on the given stream, with FA4's parameter bytes for the call's own values and the
    stream's workspace buffer, which the full path gives such calls too; a tensor unlike the
    bound one is still the full path's typed error, nothing launched. PyTorch calls given a
    ``stream`` run the full path."""
    from test_fastpath import _as_raw
    from test_prepared import _buffer, _record_params, _same, _written

    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.workspaces import stream_workspaces, workspace_slots

    rt, drv, ref, ref_drv = pair
    total, h, d, base = 15000, 16, 128, 0x7F30_0000_0000
    raws = [RawTensor(base + i * (1 << 36), (total, h, d), "bf16") for i in range(4)]
    q, k, v, o = raws
    cu5 = RawTensor(base + 4 * (1 << 36), (6,), "int32")
    run = fa4aot.prepare_forward(*raws, cu_seqlens_q=cu5, cu_seqlens_k=cu5, max_seqlen_q=3000, max_seqlen_k=3000,
                                 causal=True, varying=True, runtime=rt)  # fmt: skip
    assert not run.served and run.other is not None and drv.launches == []
    rng, served = random.Random(2), 0
    for i in range(30):
        b = rng.choice([1, 3, 5, 7, 12, 40])
        cu = RawTensor(cu5.ptr + 256 * i, (b + 1,), "int32")
        mq, mk = rng.randint(total // b // 2, total // b), rng.randint(total // b // 2, total // b)
        stream = 5 + i % 2
        try:
            fa4aot.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mq, max_seqlen_k=mk,
                                          causal=True, out=o, stream=stream, runtime=ref)  # fmt: skip
        except VariantNotFoundError:  # FA4 decides on a kernel the small test cache lacks
            with pytest.raises(VariantNotFoundError):
                run(q, k, v, o, cu, cu, max_seqlen_q=mq, max_seqlen_k=mk, stream=stream)
            continue
        before = run.other_calls
        run(q, k, v, o, cu, cu, max_seqlen_q=mq, max_seqlen_k=mk, stream=stream)
        got, want = drv.launches[-1], ref_drv.launches[-1]
        assert _variant_of(rt, got.kernel) == _variant_of(ref, want.kernel)
        assert (got.grid, got.block, got.smem, got.stream) == (want.grid, want.block, want.smem, stream)
        if run.other_calls == before:
            continue
        served += 1
        lv = next(x for x in rt._loaded.values() if got.kernel in x.kernels)
        _record_params(rt, drv)
        named = {n: _as_raw(x) for n, x in (("q", q), ("k", k), ("v", v), ("out", o), ("cu_seqlens_q", cu),
                                             ("cu_seqlens_k", cu))}  # fmt: skip
        named.update(softmax_scale=d**-0.5, stream=stream)
        takes = {a.name for a in lv.plan.signature}
        if "max_seqlen_q" in takes:
            named["max_seqlen_q"] = mq
        if "tensormap_workspace" in takes:  # the stream's buffer, as large as this call needs at least
            fc = analyse(ref, q, k, v, cu, cu, mq, mk, None, None, None, True, (None, None), 1, None, False, False)
            ptr, have = stream_workspaces(rt)[stream]
            assert have >= workspace_slots(ref, fc)
            named["tensormap_workspace"] = DeviceTensor(ptr, (workspace_slots(ref, fc), 16), (16, 1), "int64", 0, "raw")
        want_bytes, mask = _written(lv, named)
        assert _same(_buffer(got, lv), want_bytes, mask)
    assert served >= 20, served
    n = len(drv.launches)
    with pytest.raises(ArgumentError, match="^k: dtype"):
        run(q, RawTensor(k.ptr, k.shape, "fp16"), v, o, cu5, cu5)
    with pytest.raises(ArgumentError, match="cu_seqlens_k"):  # batch 3 against cu_seqlens_q's 5
        run(q, k, v, o, cu5, RawTensor(cu5.ptr, (4,), "int32"))
    assert len(drv.launches) == n
    tq, tk, tv, to = (t(i, (4000, h, d)) for i in range(4))
    tcu = t(4, (5,), "int32")
    run = fa4aot.prepare_forward(tq, tk, tv, to, cu_seqlens_q=tcu, cu_seqlens_k=tcu, max_seqlen_q=1000,
                                 max_seqlen_k=1000, causal=True, varying=True, runtime=rt)  # fmt: skip
    assert run.other is None
    before = _hits(rt)
    run(tq, tk, tv, to, tcu, tcu, stream=5)  # a stream given: the full path
    assert _hits(rt) == before and drv.launches[-1].stream == 5
    run(tq, tk, tv, to, tcu, tcu)
    assert _hits(rt) == before + 1


def test_hostile_calls_of_raw_pointers_are_typed_errors_with_nothing_launched_or_allocated(pair):
    """A raw-pointer varying call given bad tensors, sequence lengths, alignments, max_seqlens or
    streams: the full path's typed error naming the argument, nothing launched and no buffer made
    (a bad stream handle is refused before its workspace would be)."""
    rt, drv, _, _ = pair
    total, h, d, base = 15000, 16, 128, 0x7F30_0000_0000
    q, k, v, o = (RawTensor(base + i * (1 << 36), (total, h, d), "bf16") for i in range(4))
    cu = RawTensor(base + 4 * (1 << 36), (6,), "int32")
    run = fa4aot.prepare_forward(q, k, v, o, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3000, max_seqlen_k=3000,
                                 causal=True, varying=True, runtime=rt)  # fmt: skip
    run(q, k, v, o, cu, cu)
    assert run.other_calls == 1
    launches, allocs = len(drv.launches), dict(drv.allocs)
    bad_tensors = [
        ((q, k, v, None, cu, cu), "^out: expected a CUDA tensor"),
        (("q", k, v, o, cu, cu), "^q: expected a CUDA tensor"),
        ((q, k, v, o, RawTensor(cu.ptr, (3, 2), "int32"), cu), "^cu_seqlens_q: shape"),
        ((q, k, v, o, cu, RawTensor(cu.ptr, (4,), "int32")), "^cu_seqlens_k: expected length 6"),
        ((q, k, v, o, RawTensor(cu.ptr, (1,), "int32"), RawTensor(cu.ptr, (1,), "int32")), "^cu_seqlens_q: needs"),
        ((RawTensor(q.ptr + 2, q.shape, "bf16"), k, v, o, cu, cu), "^q: base address 0x[0-9a-f]+ is not 16-byte"),
        ((q, k, v, o, RawTensor(cu.ptr + 2, (6,), "int32"), RawTensor(cu.ptr + 2, (6,), "int32")), "4-byte aligned"),
        ((RawTensor(q.ptr, q.shape, "bf16", device=1), k, v, o, cu, cu), "^q: device 1 differs"),
        ((q, RawTensor(k.ptr, k.shape, "bf16", strides=(h * d * 2, d, 1)), v, o, cu, cu), "^k: strides"),
    ]
    for args, match in bad_tensors:
        with pytest.raises(ArgumentError, match=match):
            run(*args)
    for kw, match in [
        (dict(max_seqlen_q=-1), "^max_seqlen_q: must be >= 0"),
        (dict(max_seqlen_q=True), "^max_seqlen_q: expected an int"),
        (dict(max_seqlen_k=1.5), "^max_seqlen_k: expected an int"),
        (dict(max_seqlen_q=2**40), "^max_seqlen_q: .* does not fit"),
        (dict(stream=-1), "^stream: -1 is not a CUDA stream handle"),
        (dict(stream=2**64), "^stream: .* is not a CUDA stream handle"),
        (dict(stream=True), "^stream: True is not a CUDA stream handle"),
        (dict(stream="s"), "^stream: cannot get a CUDA stream handle"),
    ]:
        with pytest.raises(ArgumentError, match=match):
            run(q, k, v, o, cu, cu, **kw)
    assert len(drv.launches) == launches and drv.allocs == allocs
