"""Repeated plain calls launched from their prepared form (runtime/fastpath.py), on the CPU: the
same launches as the full path (kernels, grids, streams, FA4's parameter bytes), and every
unusual call back on the full path with its typed error. Torch-like tensors stand in for torch's
(the fast path's tensor class is injected; the full path reads them as raw pointers)."""

from __future__ import annotations

import sys

import pytest
from fake_driver import FakeDriver
from test_prepared import _buffer, _record_params, _same, _written

import fa4aot
from fa4aot.core.errors import ArgumentError, VariantNotFoundError
from fa4aot.interface import _flash_attn_fwd
from fa4aot.runtime import fastpath, tensors
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import DeviceTensor, RawTensor

B = 0x7F20_0000_0000


class FakeTorch:
    """torch.Tensor's accessors over a RawTensor."""

    def __init__(self, raw: RawTensor, requires_grad: bool = False):
        self.raw, self.requires_grad = raw, requires_grad
        self.shape, self.dtype = raw.shape, raw.dtype

    def stride(self):
        return self.raw.strides

    @property
    def layout(self):
        """torch's strided layout (checked once torch is imported, as every real tensor has one)."""
        return sys.modules["torch"].strided

    def get_device(self):
        return self.raw.device

    def numel(self):
        n = 1
        for size in self.shape:
            n *= size
        return n

    def is_contiguous(self):
        """torch's rule: every dimension of extent above 1 strided row-major."""
        want = 1
        for size, stride in reversed(list(zip(self.shape, self.raw.strides))):
            if size != 1 and stride != want:
                return False
            want *= size
        return True

    def data_ptr(self):
        return self.raw.ptr

    def new_empty(self, shape, dtype=None):
        """A fresh buffer (a new fake address), as torch's allocator would give."""
        _made[0] += 1
        name = "fp32" if dtype is not None and "float32" in str(dtype) else self.raw.dtype
        return FakeTorch(RawTensor(B + (100 + _made[0]) * (1 << 36), tuple(shape), name))


_made = [0]


def t(i, shape, dtype="bf16", offset=0, **kw):
    return FakeTorch(RawTensor(B + i * (1 << 36) + offset, tuple(shape), dtype), **kw)


@pytest.fixture(autouse=True)
def fake_torch(monkeypatch):
    from fa4aot.runtime import backward

    monkeypatch.setitem(tensors._CONVERTERS, FakeTorch, lambda o, name: tensors._from_raw(o.raw, name))
    # the full path allocates with the inputs' framework, as torch would: new_empty
    monkeypatch.setattr(backward, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype))
    monkeypatch.setattr(fastpath, "_API", [(FakeTorch, lambda device: 0)])  # stream 0, as the full path's


def _hits(rt) -> int:
    calls = fastpath.calls_of(rt)
    return calls.hits if calls is not None else 0


def test_a_repeated_call_launches_what_the_full_path_launches(sm90):
    rt, drv = sm90
    b, s, h, d = 2, 1000, 16, 128
    for n in range(4):  # new addresses every call
        ts = [t(i, (b, s, h, d), offset=n * 4096) for i in range(4)]
        q, k, v, out = ts
        res, lse = fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=rt)
        assert res is out and lse is None
        if n == 0:
            (lv,) = rt._loaded.values()
            _record_params(rt, drv)
    assert _hits(rt) == 2  # the first sighting and the second (which prepares) run the full path
    assert len(drv.launches) == 4 and rt.stats().fast_calls == 2
    full, fast = drv.launches[1], drv.launches[3]
    assert (full.kernel, full.grid, full.block, full.smem, full.stream) == (
        fast.kernel, fast.grid, fast.block, fast.smem, fast.stream,
    )  # fmt: skip
    named = {n: DeviceTensor(x.raw.ptr, x.shape, x.raw.strides, "bf16", 0, "raw") for n, x in zip("qkv", ts)}
    named["out"] = DeviceTensor(ts[3].raw.ptr, ts[3].shape, ts[3].raw.strides, "bf16", 0, "raw")
    want, mask = _written(lv, dict(named, softmax_scale=128**-0.5, stream=0))
    assert _same(_buffer(fast, lv), want, mask)


def test_paged_decode_through_the_engine_entry_takes_it_too(sm90):
    """vLLM's decode call (_flash_attn_fwd, page table, seqused_k, out given, no LSE)."""
    rt, drv = sm90
    qd, od, pool = t(5, (8, 1, 32, 128)), t(6, (8, 1, 32, 128)), t(7, (300, 128, 8, 128))
    pt, used = t(8, (8, 32), "int32"), t(9, (8,), "int32")

    def call(max_k):
        return _flash_attn_fwd(qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=max_k, page_table=pt,
                               causal=True, out=od, runtime=rt)  # fmt: skip

    for _ in range(3):
        res = call(4096)
        assert res[0] is od and res[1:] == (None, None, None, None)
    assert _hits(rt) == 1
    # a new max_seqlen_k FA4 decides the same way for: the same family, launched with the new value
    call(4000)
    assert _hits(rt) == 2 and len(drv.launches) == 4
    full, fast = drv.launches[0], drv.launches[3]
    assert (full.kernel, full.grid, full.block, full.smem) == (fast.kernel, fast.grid, fast.block, fast.smem)


def _variant_of(rt, handle):
    return next(lv.variant for lv in rt._loaded.values() if handle in lv.kernels)


@pytest.mark.parametrize("cc", [(10, 0)])  # (the fast tier builds varlen-K for SM100 only)
def test_varlen_calls_with_a_new_batch_and_max_seqlen_every_call(built_cache, monkeypatch, cc):
    """A serving loop's varlen calls: batch and max_seqlen_q/k change on every call. Served calls
    launch the variant, grid, block and shared memory the full path launches for the same call
    (a second runtime, fast path off), with exactly the parameter bytes FA4's host code writes
    for the call's own arguments (batch-long cu_seqlens, the max_seqlen, a workspace sized for
    the batch); a decision FA4 has not made for these values yet goes to the full path."""
    import random

    from fa4aot.runtime import prepared

    made, steps = [], []
    real_step = fastpath._Family.step
    monkeypatch.setattr(fastpath._Family, "step", lambda self, *a: steps.append(a) or real_step(self, *a))
    real_new_empty = FakeTorch.new_empty
    monkeypatch.setattr(FakeTorch, "new_empty", lambda self, shape, dtype=None: made.append(real_new_empty(self, shape, dtype)) or made[-1])  # fmt: skip
    monkeypatch.setattr(prepared, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype))
    num_sms = 132 if cc == (9, 0) else 148
    drv, ref_drv = FakeDriver(cc=cc, num_sms=num_sms), FakeDriver(cc=cc, num_sms=num_sms)
    rt, ref = Runtime(built_cache, driver=drv), Runtime(built_cache, driver=ref_drv)
    fastpath._calls(ref).skip = 10**9  # the reference: the full path only
    total, h, hk, d = 15000, 16, 16, 128  # near tests/fast.yaml's varlen-prefill
    q, k, v, o = t(0, (total, h, d)), t(1, (total, hk, d)), t(2, (total, hk, d)), t(3, (total, h, d))
    rng = random.Random(0)
    served = 0
    for i in range(60):
        b = rng.choice([3, 4, 5, 6, 8, 10]) if i >= 2 else 5  # (the key's first two sightings)
        cu = t(4, (b + 1,), "int32", offset=64 * i)
        mq, mk = rng.randint(total // b // 2, total // b), rng.randint(total // b // 2, total // b)
        args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mq, max_seqlen_k=mk, causal=True, out=o)
        before = _hits(rt)
        try:
            fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=ref)
        except VariantNotFoundError:  # FA4 decides on a kernel the small test cache lacks
            with pytest.raises(VariantNotFoundError):
                fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=rt)
            continue
        fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=rt)
        got, want = drv.launches[-1], ref_drv.launches[-1]
        assert _variant_of(rt, got.kernel) == _variant_of(ref, want.kernel)
        assert (got.grid, got.block, got.smem) == (want.grid, want.block, want.smem)
        if _hits(rt) == before:
            continue
        served += 1
        _assert_fa4s_bytes(rt, drv, ref, (q, k, v, o, cu), mq, mk, made[-1] if made else None)
    assert served >= 20, served  # most calls reuse a decision (FA4's regions) and are served
    # new values in the last decision's region are served without step() (_region_lines)
    assert len(steps) < served // 2, (len(steps), served)


def _assert_fa4s_bytes(rt, drv, ref, tensors, mq, mk, ws):
    """The last launch's parameter bytes are those FA4's host code writes for a varlen call of
    ``tensors`` (q, k, v, out, cu_seqlens used for q and k) and max_seqlens ``mq``/``mk``, with
    the workspace ``ws`` (the last one made) sized for the call's batch."""
    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.workspaces import workspace_slots

    q, k, v, o, cu = tensors
    got = drv.launches[-1]
    fc = analyse(ref, q, k, v, cu, cu, mq, mk, None, None, None, True, (None, None), 1, None, False, False)
    lv = next(x for x in rt._loaded.values() if got.kernel in x.kernels)
    _record_params(rt, drv)
    named = {n: _as_raw(x) for n, x in
             (("q", q), ("k", k), ("v", v), ("out", o), ("cu_seqlens_q", cu), ("cu_seqlens_k", cu))}  # fmt: skip
    named.update(softmax_scale=q.shape[-1] ** -0.5, stream=0)
    takes = {a.name for a in lv.plan.signature}
    if "max_seqlen_q" in takes:
        named["max_seqlen_q"] = mq
    if "tensormap_workspace" in takes:
        assert tuple(ws.shape) == (workspace_slots(ref, fc), 16)
        named["tensormap_workspace"] = DeviceTensor(ws.data_ptr(), tuple(ws.shape), (16, 1), "int64", 0, "raw")
    assert got.params, "the fake driver recorded the parameter bytes"
    want_bytes, mask = _written(lv, named)
    assert _same(_buffer(got, lv), want_bytes, mask)


def _as_raw(x) -> DeviceTensor:
    """A FakeTorch's, a RawTensor's or a torch host tensor's description, as raw device 0 memory."""
    if isinstance(x, FakeTorch):
        return DeviceTensor(x.raw.ptr, x.shape, x.raw.strides, x.raw.dtype, 0, "raw")
    if isinstance(x, RawTensor):
        return DeviceTensor(x.ptr, x.shape, x.strides, x.dtype, 0, "raw")
    dtype = str(x.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float16", "fp16")
    return DeviceTensor(x.data_ptr(), tuple(x.shape), x.stride(), dtype, 0, "raw")


def test_unusual_calls_take_the_full_path_and_its_errors(sm90):
    rt, drv = sm90
    shape = (2, 1000, 16, 128)
    q, k, v, out = (t(i, shape) for i in range(4))
    for _ in range(3):
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=rt)
    assert _hits(rt) == 1 and len(drv.launches) == 3
    # a misaligned address: the full path names the tensor, nothing launches
    bad = t(1, shape, offset=2)
    with pytest.raises(ArgumentError, match="^k: "):
        fa4aot.flash_attn_func(q, bad, v, causal=True, out=out, runtime=rt)
    # an argument of another class (True is not 1 to the checks): another key
    with pytest.raises(ArgumentError, match="num_splits"):
        fa4aot.flash_attn_func(q, k, v, causal=True, num_splits=True, out=out, runtime=rt)
    # an unhashable window (a list) is decided by the full path
    fa4aot.flash_attn_func(q, k, v, causal=True, window_size=[None, None], out=out, runtime=rt)
    assert _hits(rt) == 1 and len(drv.launches) == 4
    # an input that requires grad: the runtime's call has no autograd either way (the full path
    # launches the same), so it is served like any other
    fa4aot.flash_attn_func(t(0, shape, requires_grad=True), k, v, causal=True, out=out, runtime=rt)
    assert _hits(rt) == 2 and len(drv.launches) == 5
    # a wrong out shape on a fresh key: the full path's error, before anything launches
    with pytest.raises(ArgumentError, match="^out: "):
        for _ in range(3):
            fa4aot.flash_attn_func(q, k, v, causal=True, out=t(3, (2, 999, 16, 128)), runtime=rt)
    assert len(drv.launches) == 5


def test_calls_owning_buffers_are_not_served(sm100, monkeypatch):
    """Split-KV calls own partials (a plain call allocates them per call): never served here."""
    from fa4aot.runtime import forward

    made = []  # the caller's framework allocator, as fresh fake device buffers
    monkeypatch.setattr(
        forward, "alloc_like", lambda ref, shape, dtype: made.append(t(20 + len(made), shape, dtype).raw) or made[-1]
    )
    rt, drv = sm100
    q, o = t(0, (16, 16, 128)), t(3, (16, 16, 128))
    k = t(1, (40000, 4, 128))
    cu_q, cu_k = t(4, (17,), "int32"), t(5, (17,), "int32")
    allocs = []
    for _ in range(3):
        fa4aot.flash_attn_varlen_func(
            q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, out=o,
            runtime=rt, stream=None,
        )  # fmt: skip
        allocs.append(len(drv.allocs))
    assert _hits(rt) == 0 and len(drv.launches) == 9  # prepare, forward, combine, three times
    assert allocs[2] == allocs[0]  # the probe on the second call allocated nothing (graph-capture safe)
    (entry,) = fastpath.calls_of(rt).entries.values()
    assert entry is fastpath._NOT_SERVED


@pytest.mark.parametrize(
    "cu_q, cu_k, page_table, free",
    [(True, True, False, True), (True, False, False, False), (True, False, True, False), (False, True, False, False)],
)
def test_the_batch_is_free_only_where_no_tensor_in_the_key_carries_it(cu_q, cu_k, page_table, free):
    """A call family's batch may change per call only when q and k are both packed and there is
    no page table: a batched q or k, or a page table (batch, pages), is in the key with its batch
    (a call whose sequence tensors say otherwise must reach the full path's check)."""
    from types import SimpleNamespace

    from fa4aot.runtime.dispatch import Shape

    shape = Shape(4, 400, 400, 400, 400, 100, 100, None, None, None, 1)
    lv = SimpleNamespace(fields={"tile_m": 128, "pack_gqa": False})
    rule = SimpleNamespace(memo={shape: SimpleNamespace(lv=lv)})
    d = DeviceTensor(B, (5,), (1,), "int32", 0, "raw")
    fc = SimpleNamespace(
        rule=rule, shape=shape, cu_q=d if cu_q else None, cu_k=d if cu_k else None, su_q=None, su_k=None,
        page_table=d if page_table else None, batch=4, max_q=100, max_k=100, wl=None, lv=lv, nheads=16,
        k=(0, (400, 16, 128)), rt=SimpleNamespace(target=SimpleNamespace(num_sms=132)), rows=(400,) if cu_q else (4, 100),
    )  # fmt: skip
    names = ("q", "k", "v", "out") + ("cu_seqlens_q",) * cu_q + ("cu_seqlens_k",) * cu_k + ("page_table",) * page_table
    prepared = SimpleNamespace(fc=fc, _owned=[], launch_ptrs=None, _aligns=[16] * len(names), arg_names=names,
                               _tensors=[d] * len(names), workspace_slots=0, runtime=fc.rt)  # fmt: skip
    family = fastpath._Family(prepared)

    def seq(n):
        return SimpleNamespace(shape=(n,))

    # sequence tensors of a batch of 6 (cu_seqlens: 7 entries): a free family takes it, a pinned
    # one (batch 4, in the key) returns -1 so the full path names the mismatch
    given = dict(cu_q=seq(7) if cu_q else None, cu_k=seq(7) if cu_k else None, su_q=None, su_k=None)
    assert family.batch_of(**given) == (6 if free else -1)
    # the key's own batch: 4 everywhere
    assert family.batch_of(**{n: seq(5) if t is not None else None for n, t in given.items()}) == 4
    if cu_q and cu_k:  # lengths that disagree with each other: -1, either way
        assert family.batch_of(cu_q=seq(7), cu_k=seq(6), su_q=None, su_k=None) == -1
        same = seq(7)  # one tensor for both (self-attention): its length is read once
        assert family.batch_of(cu_q=same, cu_k=same, su_q=None, su_k=None) == (6 if free else -1)


def test_threads_sharing_an_entry_launch_their_own_addresses(sm90):
    """Each thread packs into its own call block: no launch mixes two calls' addresses."""
    import threading

    rt, drv = sm90
    shape = (2, 1000, 16, 128)
    sets = [[t(i, shape, offset=n * (1 << 20)) for i in range(4)] for n in range(4)]
    for _ in range(3):
        fa4aot.flash_attn_func(*sets[0][:3], causal=True, out=sets[0][3], runtime=rt)
        if not drv.param_sizes:
            _record_params(rt, drv)
    (lv,) = rt._loaded.values()
    named = {n: DeviceTensor(x.raw.ptr, x.shape, x.raw.strides, "bf16", 0, "raw") for n, x in zip("qkv", sets[0])}
    named["out"] = DeviceTensor(sets[0][3].raw.ptr, shape, sets[0][3].raw.strides, "bf16", 0, "raw")
    _, written = _written(lv, dict(named, softmax_scale=128**-0.5, stream=0))

    def work(ts):
        for _ in range(200):
            fa4aot.flash_attn_func(*ts[:3], causal=True, out=ts[3], runtime=rt)

    threads = [threading.Thread(target=work, args=(ts,)) for ts in sets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert _hits(rt) == 1 + 800
    for launch in drv.launches[3:]:
        # only the bytes FA4's host code writes: the padding between them is stack garbage, which
        # may hold addresses an earlier thread left on a reused thread stack
        blob = bytes(b if w else 0 for b, w in zip(_buffer(launch, lv), written))
        owners = {n for n, ts in enumerate(sets) for x in ts if x.raw.ptr.to_bytes(8, "little") in blob}
        assert len(owners) == 1


def test_a_repeated_backward_launches_what_the_full_path_launches(sm90):
    """GQA backward (preprocess, main kernel, three postprocesses, one memset of the scratch):
    the same kernels, grids and memset on new gradient and scratch buffers per call."""
    pytest.importorskip("torch")  # the fast path allocates the fp32 scratch with torch's dtype
    rt, drv = sm90
    b, s, h, hk, d = 2, 1000, 16, 4, 128
    q, out, dout = t(0, (b, s, h, d)), t(3, (b, s, h, d)), t(4, (b, s, h, d))
    k, v, lse = t(1, (b, s, hk, d)), t(2, (b, s, hk, d)), t(5, (b, h, s), "fp32")
    results = []
    for _ in range(4):
        results.append(fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, runtime=rt))
    assert _hits(rt) == 2
    assert len(drv.launches) == 20 and len(drv.memsets) == 4
    full, fast = drv.launches[5:10], drv.launches[15:20]
    for a, b_ in zip(full, fast):
        assert (a.kernel, a.grid, a.block, a.smem, a.stream) == (b_.kernel, b_.grid, b_.block, b_.smem, b_.stream)
    assert drv.memsets[1][1:] == drv.memsets[3][1:]  # the same words zeroed, on the same stream
    dq, dk, dv = results[3]
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert len({id(r[0]) for r in results}) == 4  # new gradients every call
    for grad, launch in ((dq, fast[2]), (dk, fast[3]), (dv, fast[4])):  # each postprocess writes its gradient
        assert any(grad.raw.ptr.to_bytes(8, "little") in p for p in launch.params)
    # the scratch the memset zeroes lies in a buffer of the full path's size (torch's, per call)
    assert drv.memsets[3][0] != drv.memsets[1][0]


def test_unusual_backward_calls_take_the_full_path(sm90):
    """The backward's key: an unhashable window (a list) and a scalar of another class (1 for
    True) are the full path's to decide; a served key keeps serving after them."""
    pytest.importorskip("torch")
    rt, drv = sm90
    b, s, h, hk, d = 2, 1000, 16, 4, 128
    q, out, dout = t(0, (b, s, h, d)), t(3, (b, s, h, d)), t(4, (b, s, h, d))
    k, v, lse = t(1, (b, s, hk, d)), t(2, (b, s, hk, d)), t(5, (b, h, s), "fp32")
    for _ in range(3):
        fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, runtime=rt)
    assert _hits(rt) == 1
    fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, window_size=[None, None], runtime=rt)
    for _ in range(2):  # causal=1: a key of its own (its first two sightings run the full path)
        fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=1, runtime=rt)
    assert _hits(rt) == 1 and len(drv.launches) == 6 * 5
    fa4aot.flash_attn_backward(dout, q, k, v, out, lse, causal=True, runtime=rt)
    assert _hits(rt) == 2


def test_a_varlen_call_gets_a_new_tensor_map_workspace_per_call(sm100, monkeypatch):
    """Without torch's raw allocator (a CPU build of torch), FA4's tensor-map workspace (varlen-K
    calls) is, as on the full path, a new buffer from the caller's allocator on every call: the
    fast path passes it as the prepared call's last argument."""
    from fa4aot.runtime import forward, prepared

    monkeypatch.setattr(forward, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype).raw)
    monkeypatch.setattr(prepared, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype))
    rt, drv = sm100
    b, s, h, d = 5, 3000, 16, 128
    q, k, v, o = (t(i, (b * s, h, d)) for i in range(4))
    cu = t(4, (b + 1,), "int32")
    allocs = []
    for _ in range(4):
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, causal=True, out=o, runtime=rt
        )
        allocs.append(dict(drv.allocs))
    assert _hits(rt) == 2 and len(drv.launches) == 4
    full, fast = drv.launches[1], drv.launches[3]
    assert (full.kernel, full.grid, full.block, full.smem) == (fast.kernel, fast.grid, fast.block, fast.smem)
    (family,) = fastpath.calls_of(rt).entries.values()
    assert family.last[1].ws_slots > 0
    # the probe and the fast calls allocate nothing from the driver (the full path's first call
    # made its per-stream workspace: these stand-in tensors are not torch's)
    assert allocs[3] == allocs[0]
    made = _made[0]
    fa4aot.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, causal=True, out=o, runtime=rt
    )
    assert _made[0] == made + 1  # one new workspace from the caller's allocator
    # the new buffer's address reached the kernel's arguments (its TMA descriptors live there)
    assert any((B + (100 + _made[0]) * (1 << 36)).to_bytes(8, "little") in p for p in drv.launches[-1].params)


def test_a_workload_that_never_repeats_stops_paying_for_the_key(sm90, monkeypatch):
    """A window of calls none of which is served (every call's key new) sends the next calls
    straight to the full path; the fast path probes again after them."""
    monkeypatch.setattr(fastpath, "WINDOW", 8)
    monkeypatch.setattr(fastpath, "SKIP", 5)
    rt, drv = sm90
    pool, pt, used = t(7, (300, 128, 8, 128)), t(8, (8, 32), "int32"), t(9, (8,), "int32")
    qd, od = t(5, (8, 1, 32, 128)), t(6, (8, 1, 32, 128))

    def call(scale):
        _flash_attn_fwd(qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=4096, page_table=pt,
                        softmax_scale=scale, causal=True, out=od, runtime=rt)  # fmt: skip

    for i in range(8):  # a new softmax scale every call: a new key every call
        call(0.1 + i / 1024)
    calls = fastpath.calls_of(rt)
    assert calls.skip == 5 and calls.hits == 0
    for _ in range(5):  # skipped: no key, no sighting
        call(0.5)
    assert calls.skip == 0 and calls.hits == 0 and len(calls.sighted) == 8
    for _ in range(3):  # probing again: a repeated call is served from its third sighting
        call(0.5)
    assert calls.hits == 1 and len(drv.launches) == 16


class _Other(FakeTorch):
    """A tensor class of its own (a subclass may override any accessor)."""


def _raw(i, shape, dtype="bf16", strides=None, device=0, offset=0):
    return FakeTorch(RawTensor(B + i * (1 << 36) + offset, tuple(shape), dtype, strides, device))


def test_the_last_served_call_answers_exactly_the_calls_of_its_key(sm90):
    """After a served call, the next call is checked attribute by attribute against the served
    key (no key built): a call with new addresses is launched (1); a call that differs in any
    tensor's shape, strides, dtype, device or class, or in a scalar's value or class, is not
    (-1: the key path decides); a misaligned address is not served (0: the full path names it).
    A contiguous tensor whose extent-1 dimension has another stride reads the same addresses:
    served."""
    rt, drv = sm90
    shape = (2, 1000, 16, 128)
    base = dict(softmax_scale=None, causal=True, window_size=(None, None), softcap=0.0, num_splits=1, pack_gqa=None)
    for _ in range(3):
        fa4aot.flash_attn_func(*(t(i, shape) for i in range(3)), **base, out=t(3, shape), runtime=rt)
    serve = fastpath.calls_of(rt).dense

    def call(*tensors, **scalars):
        return serve(*tensors, **dict(base, **scalars))

    q, k, v, out = (_raw(i, shape, offset=4096) for i in range(4))
    assert call(q, k, v, out) == 1
    assert len(drv.launches) == 4  # the three calls above, then this one
    odd = (1000 * 16 * 128, 16 * 128, 128, 1)
    assert call(_raw(0, (1, 1000, 16, 128), strides=odd), k, v, out) == -1  # another shape
    variants = [
        _raw(0, (2, 1000, 16, 128), strides=(1000 * 16 * 128, 128, 1000 * 128, 1)),  # transposed heads
        _raw(0, shape, dtype="fp16"),
        _raw(0, shape, device=1),
        _Other(RawTensor(B, shape, "bf16")),
    ]
    for bad in variants:
        assert call(bad, k, v, out) == -1
        assert call(q, k, v, bad) == -1
    for name, value in [("causal", 1), ("causal", False), ("softmax_scale", 0.1), ("window_size", (None, 0)),
                        ("window_size", [None, None]), ("softcap", 0), ("softcap", 1.0), ("num_splits", True),
                        ("num_splits", 2), ("pack_gqa", False)]:  # fmt: skip
        assert call(q, k, v, out, **{name: value}) == -1, (name, value)
    assert call(q, _raw(1, shape, offset=2), v, out) == 0
    # (1, ...) batch with any stride on its extent-1 dimension: contiguous to torch, same addresses
    for _ in range(3):
        fa4aot.flash_attn_func(*(t(i, (1,) + shape[1:]) for i in range(3)), causal=True, out=t(3, (1,) + shape[1:]),
                               runtime=rt)  # fmt: skip
    serve = fastpath.calls_of(rt).dense
    one = [_raw(i, (1,) + shape[1:]) for i in range(4)]
    assert call(_raw(0, (1,) + shape[1:], strides=(7,) + odd[1:]), *one[1:]) == 1
    assert len(drv.launches) == 8  # nothing launched for the calls not served


def test_a_served_family_answers_only_calls_of_its_key(sm90):
    """The paged decode family: new addresses and a new max_seqlen_k FA4 decides the same way are
    served; a sequence tensor of another dtype, strides or length, a page table of another
    shape, max_seqlen of another class, or a tensor given that the key has not, are not."""
    rt, drv = sm90
    qd, od, pool = t(5, (8, 1, 32, 128)), t(6, (8, 1, 32, 128)), t(7, (300, 128, 8, 128))
    pt, used = t(8, (8, 32), "int32"), t(9, (8,), "int32")
    for _ in range(3):
        _flash_attn_fwd(qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=4096, page_table=pt, causal=True,
                        out=od, runtime=rt)  # fmt: skip
    serve = fastpath.calls_of(rt).fwd
    scalars = (None, True, (None, None), None, 1, None)

    def call(q=qd, k=pool, v=pool, out=od, su_k=used, page_table=pt, max_q=1, max_k=4096, cu_q=None, sink=None):
        return serve(q, k, v, out, cu_q, None, None, su_k, page_table, sink, max_q, max_k, *scalars)

    assert call(su_k=t(9, (8,), "int32", offset=256)) == 1
    assert call(max_k=4000) == 1
    assert call(su_k=t(9, (8,), "int64")) == -1
    assert call(su_k=_raw(9, (8,), "int32", strides=(2,))) == -1
    assert call(su_k=t(9, (7,), "int32")) == 0  # the key's page table says 8: the full path names it
    assert call(page_table=t(8, (8, 16), "int32")) == -1
    assert call(max_k=4096.0) == -1
    assert call(cu_q=t(10, (9,), "int32")) == -1
    assert call(sink=t(11, (32,), "fp32")) == -1
    assert len(drv.launches) == 5


def test_a_torch_tensors_check_in_prepared_calls():
    """prepared.torch_mismatch: a tensor bound contiguous matches any tensor of its shape that
    torch calls contiguous (an extent-1 dimension's stride is never used); one bound strided
    matches its strides exactly; dtype and device always."""
    from fa4aot.runtime.prepared import torch_contiguous, torch_mismatch

    assert torch_contiguous((2, 1, 4), (4, 99, 1)) and not torch_contiguous((2, 3, 4), (12, 1, 3))
    for bound, same, differ in [
        (_raw(0, (2, 1, 4)), [_raw(1, (2, 1, 4), strides=(4, 7, 1))], [_raw(1, (2, 4, 1)), _raw(1, (2, 1, 4), "fp16"),
                                                                        _raw(1, (2, 1, 4), device=1),
                                                                        _raw(1, (2, 1, 4), strides=(8, 4, 1))]),
        (_raw(0, (2, 3, 4), strides=(24, 4, 1)), [_raw(1, (2, 3, 4), strides=(24, 4, 1))],
         [_raw(1, (2, 3, 4)), _raw(1, (2, 3, 4), strides=(12, 1, 3))]),
    ]:  # fmt: skip
        scope = {}
        meta = (bound.shape, bound.stride(), bound.dtype, bound.get_device())
        expr = torch_mismatch("a", meta, "_b", scope)
        for obj, want in [(x, False) for x in same] + [(x, True) for x in differ]:
            assert eval(expr, dict(scope, a=obj)) is want, (obj.shape, obj.stride(), obj.dtype)  # noqa: S307


@pytest.mark.parametrize("driver_query", [True, False], ids=["driver-capture-query", "torch-checks-only"])
def test_the_workspace_is_a_buffer_per_stream_and_a_block_per_call_while_capturing(sm100, monkeypatch, driver_query):
    """With torch's caching allocator's raw entry points (CUDA builds of torch), a served varlen
    call's tensor-map workspace is its launch stream's buffer, the one the full path gives
    other frameworks' calls (workspaces.stream_workspace): made once, shared by the stream's
    calls, replaced by a larger one when a call needs more slots (the old one freed after the
    stream's queued work), one per stream. While the stream is being captured into a CUDA graph,
    a raw block of torch's of the size FA4 needs per call, freed after the launch (the graph's
    pool keeps it). ``driver_query``: the compiled hop asks the driver (cuStreamIsCapturing)
    about the launch stream itself first, so another current device of torch's still takes the
    stream's buffer, and a driver that cannot tell leaves the call to torch's checks; without
    the driver's function, torch's checks decide every call, and when torch's current device is
    not the tensors', the workspace is a new tensor on theirs."""
    from fa4aot.core.fa4_interface import TENSORMAP_WORDS
    from fa4aot.runtime import forward, prepared

    if not driver_query:
        monkeypatch.delattr(FakeDriver, "capture_status_function")
    elif fastpath.HOP is None:
        pytest.skip("the compiled hop (fa4aot/plan/_hop.c) is not built here: torch's checks decide every call")

    monkeypatch.setattr(forward, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype).raw)
    monkeypatch.setattr(prepared, "alloc_like", lambda ref, shape, dtype: ref.new_empty(shape, dtype))
    events, state = [], {"stream": 7, "capturing": False, "device": 0}
    blocks = iter(range(B + (1 << 44), B + (1 << 45), 1 << 20))

    def alloc(nbytes, stream):
        ptr = next(blocks)
        events.append(("alloc", nbytes, stream, ptr))
        return ptr

    memory = (alloc, lambda p: events.append(("free", p)), lambda: state["capturing"], lambda: state["device"])
    monkeypatch.setattr(fastpath, "_torch_memory", lambda: memory)
    monkeypatch.setattr(fastpath, "_API", [(FakeTorch, lambda device: state["stream"])])
    rt, drv = sm100
    syncs = []
    monkeypatch.setattr(drv, "synchronize", lambda stream: syncs.append(stream))
    s, h, d = 3000, 16, 128
    q, k, v, o = (t(i, (16 * s, h, d)) for i in range(4))
    cus = {b: t(4 + b, (b + 1,), "int32") for b in (1, 2, 96)}

    def call(b):
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cus[b], cu_seqlens_k=cus[b], max_seqlen_q=s, max_seqlen_k=s, causal=True, out=o,
            runtime=rt,
        )  # fmt: skip
        families = list(fastpath.calls_of(rt).entries.values())
        return (families[0].last[2][3] if families else None), drv.launches[-1]

    def launched_with(launch, ptr):
        return any(ptr.to_bytes(8, "little") in p for p in launch.params)

    for _ in range(2):
        call(2)
    assert _hits(rt) == 0  # (the second call prepared its key: the full path's tensor)
    held = set(drv.allocs)  # (the runtime's own buffers)

    def buffer():  # (address, bytes) of the stream buffers the driver holds since, newest last
        return [(p, n) for p, n in drv.allocs.items() if p not in held]

    assert buffer() == []
    slots2, launch = call(2)
    assert _hits(rt) == 1 and launch.stream == 7
    ((first, nbytes),) = buffer()
    assert nbytes >= slots2 * TENSORMAP_WORDS * 8 and launched_with(launch, first)
    assert launched_with(call(1)[1], first) and len(buffer()) == 1  # fewer slots: the same buffer
    slots_big, launch = call(96)
    assert slots_big > slots2 and syncs == [7]  # the old buffer freed after the stream's work
    ((grown, nbytes),) = buffer()
    assert nbytes >= slots_big * TENSORMAP_WORDS * 8 and launched_with(launch, grown)
    assert launched_with(call(2)[1], grown)
    state["stream"] = 9  # another stream: a buffer of its own
    _, launch = call(2)
    assert len(buffer()) == 2 and launched_with(launch, buffer()[-1][0])
    assert events == []  # torch's raw blocks: only while capturing
    state["capturing"] = True  # a block per call, freed once launched
    drv.capturing = {9}
    for b in (2, 96):
        slots, launch = call(b)
        assert events[-2][1:3] == (slots * TENSORMAP_WORDS * 8, 9) and events[-1] == ("free", events[-2][3])
        assert launched_with(launch, events[-2][3])
    drv.capture_result = 999  # the driver cannot tell: torch's check (capturing) decides
    slots, launch = call(2)
    assert events[-2][1:3] == (slots * TENSORMAP_WORDS * 8, 9) and launched_with(launch, events[-2][3])
    drv.capture_result, drv.capturing = 0, set()
    state["capturing"], state["device"] = False, 1  # another current device
    n, allocs = len(events), buffer()
    _, launch = call(2)
    assert len(events) == n and buffer() == allocs
    if driver_query:  # the launch stream's own buffer: the driver said it is not being captured
        assert launched_with(launch, allocs[-1][0])
    else:  # torch's checks are of its current device: a tensor on the tensors'
        assert launched_with(launch, B + (100 + _made[0]) * (1 << 36))


def _torch_guard_or_skip():
    torch = pytest.importorskip("torch")
    from fa4aot.runtime.prepared import torch_guard

    if torch_guard([torch.zeros(2)], [(2,)]) is None:
        pytest.skip(f"torch {torch.__version__} has no torch._C._dynamo.guards.TensorGuards (accessors check instead)")
    return torch, torch_guard


def test_torchs_own_check_passes_exactly_tensors_like_the_bound_ones():
    """prepared.torch_guard: torch's C++ check of the bound tensors passes new tensors of the same
    class, dtype, device, shape (any length where the size is None) and strides, passed with
    the same aliasing; anything else fails (the caller then checks through the accessors)."""
    torch, torch_guard = _torch_guard_or_skip()
    bf = torch.bfloat16

    def bound():
        q, k = torch.zeros(2, 3, 4, 8, dtype=bf), torch.zeros(2, 5, 4, 8, dtype=bf)
        return [q, k, k, torch.zeros(3, dtype=torch.int32)]  # v is k; a sequence tensor of any length

    objs = bound()
    guard = torch_guard(objs, [objs[0].shape, objs[1].shape, objs[2].shape, (None,)])
    assert guard.unique == (0, 1, 3) and guard.aliases == ((2, 1),)
    scope = {}
    expr = guard.expression(["a", "b", "c", "d"], scope, "_G")

    def passes(q, k, v, cu):
        return eval(expr, dict(scope, a=q, b=k, c=v, d=cu))  # noqa: S307

    q, k, _, cu = bound()
    assert passes(q, k, k, cu) and passes(q, k, k, torch.zeros(9, dtype=torch.int32))

    class Sub(torch.Tensor):
        pass

    for bad_q in [
        q.float(),  # dtype
        torch.zeros(2, 3, 4, 16, dtype=bf),  # shape
        torch.zeros(2, 4, 3, 8, dtype=bf).transpose(1, 2),  # strides
        torch.zeros(2, 3, 4, 8, dtype=bf, device="meta"),  # device
        torch.zeros(2, 3, 4, 8, dtype=bf, requires_grad=True),
        q.as_subclass(Sub),
        None,
        0,
    ]:
        assert not passes(bad_q, k, k, cu)
    assert not passes(q, k, k, torch.zeros(3, dtype=torch.int64))
    assert not passes(q, k, k, torch.zeros(6, dtype=torch.int32)[::2])  # a strided sequence tensor
    assert not passes(q, k, torch.zeros_like(k), cu)  # v no longer k
    assert not passes(q, q, q, cu)  # an alias it was not bound with (and q's shape is not k's)
    assert not passes(q, k, k, q)  # q twice: torch's check refuses a repeated tensor


def _torch_on_cpu(monkeypatch):
    """torch (with its C++ tensor check), its host tensors standing in for device 0's."""
    torch, _ = _torch_guard_or_skip()
    from fa4aot.runtime import frameworks

    monkeypatch.setattr(frameworks, "_TORCH_STREAM", [lambda device: 0])  # torch's current stream: 0
    monkeypatch.setattr(fastpath, "_API", [(torch.Tensor, lambda device: 0)])
    # host tensors as device 0's, read by fa4aot's own torch converter
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    return torch


def test_prepared_torch_calls_have_the_compiled_hop_read_the_addresses(sm90, monkeypatch):
    """A prepared call hands tensors that passed torch's check to the compiled hop, which reads
    their addresses with torch's own reader: the launch carries FA4's parameter bytes for the new
    tensors; a misaligned one is the typed error naming it, nothing launched; tensors torch's check
    refuses take the accessors, as before."""
    from fa4aot.plan.library import HOP

    torch = _torch_on_cpu(monkeypatch)
    if not hasattr(torch._C._dynamo.guards, "_torchinductor_pyobject_tensor_data_ptr"):
        pytest.skip(f"torch {torch.__version__} exports no tensor address reader (the accessors read them)")
    assert HOP is not None, "fa4aot.plan._hop is not built: reinstall with `pip install -e .` (needs cc)"
    rt, drv = sm90
    shape, bf = (2, 300, 16, 128), torch.bfloat16
    q, k, v, out = (torch.zeros(shape, dtype=bf) for _ in range(4))
    run = fa4aot.prepare_forward(q, k, v, out, causal=True, runtime=rt)
    scope = type(run).__call__.__globals__
    assert "_A" in scope and "_ht0" in scope  # the branch for tensors that pass torch's check
    _record_params(rt, drv)
    fresh = [torch.zeros(shape, dtype=bf) for _ in range(4)]
    run(*fresh)
    (lv,) = [x for x in rt._loaded.values() if drv.launches[-1].kernel in x.kernels]
    named = {
        n: DeviceTensor(x.data_ptr(), shape, x.stride(), "bf16", 0, "raw")
        for n, x in zip(("q", "k", "v", "out"), fresh)
    }
    want, mask = _written(lv, dict(named, softmax_scale=128**-0.5, stream=0))
    assert _same(_buffer(drv.launches[-1], lv), want, mask)
    numel = q.numel()
    for i, name in enumerate(("q", "k", "v", "out")):  # a view 2 bytes past a buffer's start
        odd = list(fresh)
        odd[i] = torch.zeros(numel + 8, dtype=bf)[1 : numel + 1].view(shape)
        with pytest.raises(ArgumentError, match=f"^{name}: base address 0x[0-9a-f]+ is not 16-byte aligned"):
            run(*odd)
    assert len(drv.launches) == 1
    run(fresh[0], fresh[1], fresh[1], fresh[3])  # aliased: torch's check refuses it, the accessors pass it
    assert len(drv.launches) == 2
    # the hop reads only tensors of the reader's class, and only as words of launch_tensors/aligned
    with pytest.raises(ArgumentError, match="not a 64-bit unsigned int"):
        HOP.launch_tensors(1, 1, "q", 0)
    with pytest.raises(TypeError):
        HOP.aligned(b"\x0f", 16)
    with pytest.raises(TypeError):
        HOP.aligned(b"\x0f\x0f", q)
    with pytest.raises(ValueError):
        HOP.tensor_reader(0, torch.Tensor)
    assert HOP.aligned(b"\x0f", q) is True and HOP.aligned(b"\x0f", odd[3]) is False


def test_a_sparse_tensor_is_a_typed_error_in_prepared_served_and_plain_calls(sm90, monkeypatch):
    """A sparse tensor of the bound shape (no strides, no address) gets the full path's typed error
    naming its layout - from a prepared call, a served plain call and a first plain call - with
    nothing launched."""
    torch = _torch_on_cpu(monkeypatch)
    rt, drv = sm90
    shape, bf = (2, 300, 16, 128), torch.bfloat16
    q, k, v, out = (torch.zeros(shape, dtype=bf) for _ in range(4))
    run = fa4aot.prepare_forward(q, k, v, out, causal=True, runtime=rt)
    for _ in range(3):  # (the plain call's key is served from here on)
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=rt)
    n = len(drv.launches)
    sparse = q.to_sparse()
    with pytest.raises(ArgumentError, match="^q: a torch.sparse_coo tensor; FA4 takes strided"):
        run(sparse, k, v, out)
    with pytest.raises(ArgumentError, match="^k: a torch.sparse_coo tensor"):
        fa4aot.flash_attn_func(q, sparse, v, causal=True, out=out, runtime=rt)
    fastpath.clear(rt)
    with pytest.raises(ArgumentError, match="^v: a torch.sparse_coo tensor"):
        fa4aot.flash_attn_func(q, k, sparse, causal=True, out=out, runtime=rt)
    assert len(drv.launches) == n


def test_served_torch_varlen_calls_have_the_compiled_hop_read_the_addresses(built_cache, monkeypatch):
    """Served varlen calls of torch tensors whose batch and max_seqlen change: the tensors that
    pass torch's check are launched as objects, the compiled hop reading their addresses, with
    FA4's parameter bytes for each call; an aliased call (refused by torch's check) and a
    misaligned one are still served and refused as before."""
    import random

    torch = _torch_on_cpu(monkeypatch)
    if not hasattr(torch._C._dynamo.guards, "_torchinductor_pyobject_tensor_data_ptr"):
        pytest.skip(f"torch {torch.__version__} exports no tensor address reader (the accessors read them)")
    made = []
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: made.append(real_new_empty(self, *a, **kw)) or made[-1])  # fmt: skip
    # (the fast tier builds varlen-K for SM100 only)
    drv, ref_drv = FakeDriver(cc=(10, 0), num_sms=148), FakeDriver(cc=(10, 0), num_sms=148)
    rt, ref = Runtime(built_cache, driver=drv), Runtime(built_cache, driver=ref_drv)
    fastpath._calls(ref).skip = 10**9  # the reference: the full path only
    total, h, d, bf = 15000, 16, 128, torch.bfloat16
    q, k, v, o = (torch.zeros(total, h, d, dtype=bf) for _ in range(4))
    rng, served = random.Random(1), 0
    for i in range(40):
        b = rng.choice([3, 4, 5, 6, 8, 10]) if i >= 2 else 5
        cu = torch.zeros(b + 1, dtype=torch.int32)
        mq = rng.randint(total // b // 2, total // b)
        args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mq, max_seqlen_k=mq, causal=True, out=o)
        try:
            fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=ref)
        except VariantNotFoundError:  # FA4 decides on a kernel the small test cache lacks
            continue
        before = _hits(rt)
        fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=rt)
        if _hits(rt) > before:
            served += 1
            _assert_fa4s_bytes(rt, drv, ref, (q, k, v, o, cu), mq, mq, made[-1] if made else None)
    assert served >= 15, served
    serve = fastpath.calls_of(rt).fwd
    assert "_A" in serve.__globals__  # the branch for tensors that pass torch's check
    n = len(drv.launches)
    fa4aot.flash_attn_varlen_func(q, k, k, **args, runtime=rt)  # aliased: the accessors' branch
    odd = torch.zeros(q.numel() + 8, dtype=bf)[1 : q.numel() + 1].view(q.shape)
    with pytest.raises(ArgumentError, match="aligned"):
        fa4aot.flash_attn_varlen_func(odd, k, v, **args, runtime=rt)
    assert len(drv.launches) == n + 1


def test_steps_launch_objects_only_where_every_tensor_word_is_a_tensor_or_a_fixed_address():
    """A prepared call launches tensors as objects (the hop reading their addresses) only where
    each of its tensor words is a user tensor itself or a fixed address: a sub-buffer of one (a
    backward's scratch regions: ``p9 + offset``) is an address computation, so such a call keeps
    the addresses' path - the fault the GPU tests found (the offset added to the tensor)."""
    from types import SimpleNamespace

    from fa4aot.plan.library import HOP
    from fa4aot.runtime.prepared import _Steps

    if HOP is None:
        pytest.skip("fa4aot.plan._hop is not built (launches go through ctypes, never as objects)")
    call = SimpleNamespace(tensor_names=("a", "b"), word_highs=(), hop=HOP.launch, run_addr=1, plan=None, _local=None)
    steps = _Steps()
    steps.bound(call, {"a": "p0", "b": 4096})
    assert steps.tensor_lines is not None and "_ht0(_a0, s_.addr, p0, 4096, st)" in "\n".join(steps.tensor_lines)
    steps.bound(call, {"a": "p0", "b": "(p1 + 256)"})
    assert steps.tensor_lines is None and len(steps.lines) == 2 * 5


def test_torch_tensors_take_torchs_check_in_served_and_prepared_calls(sm90, monkeypatch):
    """PyTorch tensors (host memory standing in for device 0's): a prepared call and the last
    served plain call check them with torch's own check; a call that fails it is checked through
    the accessors, so tensors that torch's check refuses only by aliasing or requires_grad are
    still launched, and a wrong tensor is still a typed error with nothing launched."""
    torch = _torch_on_cpu(monkeypatch)
    rt, drv = sm90
    shape = (2, 1000, 16, 128)
    q, k, v, out = (torch.zeros(shape, dtype=torch.bfloat16) for _ in range(4))
    run = fa4aot.prepare_forward(q, k, v, out, causal=True, runtime=rt)
    assert "_G" in type(run).__call__.__globals__  # the generated call offers torch's check first
    run(q, k, v, out)
    run(q, k, k, out)  # aliased: refused by torch's check, passed by the accessors
    run(q, k, v, out.requires_grad_(True))
    assert len(drv.launches) == 3
    with pytest.raises(ArgumentError, match="dtype"):
        run(q, k, v, out.detach().half())
    with pytest.raises(ArgumentError, match="shape"):
        run(q, k, v, torch.zeros(2, 999, 16, 128, dtype=torch.bfloat16))
    assert len(drv.launches) == 3
    # bound with v the same tensor as k: the address torch's check lets through is k's, read once
    aliased = fa4aot.prepare_forward(q, k, k, out.detach(), causal=True, runtime=rt)
    _record_params(rt, drv)
    k2 = torch.zeros(shape, dtype=torch.bfloat16)
    aliased(q, k2, k2, out.detach())
    assert "_G" in type(aliased).__call__.__globals__ and len(drv.launches) == 4
    # its parameter bytes are what FA4's host code writes for q, k2, k2, out
    (lv,) = [x for x in rt._loaded.values() if drv.launches[-1].kernel in x.kernels]
    named = {n: DeviceTensor(x.data_ptr(), shape, x.stride(), "bf16", 0, "raw") for n, x in
             (("q", q), ("k", k2), ("v", k2), ("out", out))}  # fmt: skip
    want, mask = _written(lv, dict(named, softmax_scale=128**-0.5, stream=0))
    assert _same(_buffer(drv.launches[-1], lv), want, mask)
    del drv.launches[-1]
    out.requires_grad_(False)
    for _ in range(3):
        fa4aot.flash_attn_func(q, k, v, causal=True, out=out, runtime=rt)
    serve = fastpath.calls_of(rt).dense
    assert "_G" in serve.__globals__
    scalars = dict(softmax_scale=None, causal=True, window_size=(None, None), softcap=0.0, num_splits=1,
                   pack_gqa=None)  # fmt: skip
    fresh = [torch.zeros(shape, dtype=torch.bfloat16) for _ in range(4)]
    assert serve(*fresh, **scalars) == 1
    assert serve(fresh[0], fresh[1], fresh[1], fresh[3], **scalars) == 1  # aliased: the accessors pass it
    assert serve(fresh[0].half(), *fresh[1:], **scalars) == -1
    assert serve(*fresh[:3], torch.zeros(2, 999, 16, 128, dtype=torch.bfloat16), **scalars) == -1
    assert len(drv.launches) == 3 + 3 + 2
