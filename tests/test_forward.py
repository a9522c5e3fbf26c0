"""The forward API on the CPU (fake driver): dispatch to cached variants, the prepare -> forward ->
combine sequence for split-KV, argument checks, and what a missing variant says."""

from __future__ import annotations

import pytest
from helpers import SPLIT_DECODE, split_decode_tensors

import fa4aot
from fa4aot.core.errors import ArgumentError, VariantNotFoundError
from fa4aot.core.fwd import scheduler_of
from fa4aot.runtime.tensors import RawTensor
from fa4aot.runtime.workspaces import stream_workspaces

B = 0x7F20_0000_0000


def t(i, shape, dtype="bf16", strides=None, offset=0):
    return RawTensor(B + i * (1 << 36) + offset, tuple(shape), dtype, strides)


def test_sm90_forward_dispatch_and_launch(sm90):
    rt, drv = sm90
    b, s, h, d = 2, 1000, 16, 128
    out = t(3, (b, s, h, d))
    res, lse = fa4aot.flash_attn_func(
        t(0, (b, s, h, d)), t(1, (b, s, h, d)), t(2, (b, s, h, d)), causal=True, out=out, stream=5, runtime=rt
    )
    assert res is out and lse is None
    (launch,) = drv.launches
    (lv,) = rt._loaded.values()
    assert lv.variant.family == "fwd_sm90" and lv.variant.fields["causal"]
    assert launch.block == (384, 1, 1) and launch.smem == 164864 and launch.stream == 5
    # a second call with the same signature reuses the dispatch decision
    fa4aot.flash_attn_func(t(0, (b, s, h, d)), t(1, (b, s, h, d)), t(2, (b, s, h, d)), causal=True, out=out, runtime=rt)
    assert len(drv.launches) == 2 and rt.cache_sizes()["forward_rules"] == 1


def test_sm100_2cta_prefill_dispatch(sm100):
    rt, drv = sm100
    b, s, h, d = 2, 1024, 16, 128
    fa4aot.flash_attn_func(
        t(0, (b, s, h, d)), t(1, (b, s, h, d)), t(2, (b, s, h, d)), out=t(3, (b, s, h, d)), runtime=rt
    )
    (launch,) = drv.launches
    (lv,) = rt._loaded.values()
    assert lv.variant.fields["use_2cta_instrs"] and scheduler_of(lv.variant.fields) == "static"
    assert launch.attrs[1] == (4, (2, 1, 1)) and launch.grid == (128, 1, 1)


def test_sm100_varlen_split_on_raw_pointers_asks_for_out_and_launches_nothing(sm100):
    rt, drv = sm100
    q, k, v, cu_q, cu_k, out = split_decode_tensors(t)
    # raw pointers cannot get split-KV scratch buffers allocated for them
    with pytest.raises(ArgumentError, match="pass out="):
        fa4aot.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=1,
            max_seqlen_k=4000,
            causal=False,
            num_splits=8,
            out=out,
            runtime=rt,
        )
    assert drv.launches == []


@pytest.fixture
def framework_alloc(monkeypatch):
    """Stand in for the caller's framework allocator: fresh fake device buffers."""
    from fa4aot.runtime import forward

    made = []

    def alloc(ref, shape, dtype):
        made.append(t(20 + len(made), shape, dtype))
        return made[-1]

    monkeypatch.setattr(forward, "alloc_like", alloc)
    return made


def test_sm100_varlen_split_sequence(sm100, framework_alloc):
    rt, drv = sm100
    b, h, hk, d, total_q, _ = SPLIT_DECODE
    q, k, v, cu_q, cu_k, out = split_decode_tensors(t)
    args = dict(
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, out=out, stream=9
    )
    res, lse = fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=rt)
    assert res is out and lse is None
    prepare, fwd, comb = drv.launches
    assert [x.stream for x in drv.launches] == [9, 9, 9]
    families = {lv.kernels[0]: lv.variant for lv in rt._loaded.values()}
    assert [families[x.kernel].family for x in drv.launches] == ["prepare", "fwd_sm100", "combine"]
    fv = families[fwd.kernel].fields
    assert fv["num_splits"] > 1 and scheduler_of(fv) == "dynamic" and fv["q_stage"] == 1
    assert families[comb.kernel].fields["num_splits_dynamic"] and families[comb.kernel].fields["varlen"]
    out_partial, lse_partial = framework_alloc
    assert out_partial.shape == (8, total_q, h, d) and out_partial.dtype == "fp32"
    assert lse_partial.shape == (8, h, total_q)
    # metadata buffers are cached per (stream, configuration): a second call allocates nothing new
    n_allocs = len(drv.allocs)
    fa4aot.flash_attn_varlen_func(q, k, v, **args, runtime=rt)
    assert len(drv.allocs) == n_allocs and len(drv.launches) == 6 and drv.memsets == []
    # caller-provided metadata: no prepare launch, and the semaphore is reset after the forward
    md = fa4aot.SchedulerMetadata(b, h, hk, d, runtime=rt)
    md.compute(max_seqlen_q=1, max_seqlen_k=4000, num_splits=8, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, stream=9)
    n = len(drv.launches)
    fa4aot.flash_attn_varlen_func(q, k, v, **args, scheduler_metadata=md, runtime=rt)
    assert [families.get(x.kernel, None) and families[x.kernel].family for x in drv.launches[n:]] == [
        "fwd_sm100",
        "combine",
    ]
    assert drv.memsets == [(md.tile_count_semaphore.ptr, 0, 1, 9)]


def test_missing_forward_variant_names_manifest_entry(sm90):
    rt, drv = sm90
    b, s, h, d = 2, 100, 16, 96
    with pytest.raises(VariantNotFoundError, match=r"families.fwd_sm90: - \{.*head_dims: \[\[96, 96\]\]"):
        fa4aot.flash_attn_func(
            t(0, (b, s, h, d)), t(1, (b, s, h, d)), t(2, (b, s, h, d)), out=t(3, (b, s, h, d)), runtime=rt
        )
    assert drv.launches == []


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(q=t(0, (2, 100, 16, 128), "fp32")), "q: dtype must be bf16, fp16, e4m3 or e5m2"),
        (dict(k=t(1, (2, 100, 16, 128), "fp16")), "q, k and v must share one dtype"),
        (dict(q=t(0, (2, 100, 16, 128), offset=8)), "q: base address .* not 16-byte aligned"),
        (dict(q=t(0, (2, 100, 16, 128), strides=(100 * 16 * 132, 16 * 132, 132, 1))), "q: stride 2 is 132 elements"),
        (
            dict(q=t(0, (2, 100, 16, 128), strides=(100 * 16 * 256, 16 * 256, 256, 2))),
            "q: the last dimension must be contiguous",
        ),
        (dict(k=t(1, (2, 100, 16, 64))), "k .* and v .* must agree"),
        (dict(k=t(1, (2, 100, 5, 128)), v=t(2, (2, 100, 5, 128))), "multiple of nheads_kv"),
        (dict(out=t(3, (2, 100, 16, 64))), r"out: expected shape \(2, 100, 16, 128\)"),
        (dict(out=RawTensor(B, (2, 100, 16, 128), "bf16", device=3)), "out: is (declared )?on cuda:3"),
        (dict(out=None), "pass out="),
    ],
)
def test_forward_rejects_bad_arguments(sm90, kw, match):
    rt, drv = sm90
    a = dict(
        q=t(0, (2, 100, 16, 128)), k=t(1, (2, 100, 16, 128)), v=t(2, (2, 100, 16, 128)), out=t(3, (2, 100, 16, 128))
    )
    a.update(kw)
    with pytest.raises(ArgumentError, match=match):
        fa4aot.flash_attn_func(a["q"], a["k"], a["v"], out=a["out"], runtime=rt)
    assert drv.launches == []


def test_sm90_rejects_split_kv(sm90):
    rt, _ = sm90
    x = t(0, (2, 100, 16, 128))
    with pytest.raises(ArgumentError, match="num_splits"):
        fa4aot.flash_attn_func(x, x, x, num_splits=4, out=t(3, (2, 100, 16, 128)), runtime=rt)


def test_varlen_workspace_per_stream_and_capture(sm100):
    """Raw-pointer varlen-K calls get FA4's tensor-map workspace from one grow-only buffer per
    stream; a capturing stream that would need a new one is refused with a specific error and
    nothing is launched (torch callers get torch's graph-safe allocator instead)."""
    from fa4aot.runtime.driver import CudaError

    rt, drv = sm100
    b, h, d, seqlen = 5, 16, 128, 3000

    def call(batch, stream):
        q, k, v = (t(i, (batch * seqlen, h, d)) for i in range(3))
        fa4aot.flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=t(4, (batch + 1,), "int32"), cu_seqlens_k=t(5, (batch + 1,), "int32"),
            max_seqlen_q=seqlen, max_seqlen_k=seqlen, causal=True, out=t(3, (batch * seqlen, h, d)),
            stream=stream, runtime=rt,
        )  # fmt: skip

    call(b, 7)
    (ptr, slots), n = stream_workspaces(rt)[7], len(drv.allocs)
    call(b, 7)  # same bounds: the same buffer, nothing allocated
    assert stream_workspaces(rt)[7] == (ptr, slots) and len(drv.allocs) == n and len(drv.launches) == 2
    call(b, 8)  # another stream: its own buffer
    assert stream_workspaces(rt)[8][0] != ptr

    def capturing(nbytes):
        raise CudaError("cuMemAlloc failed: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", 900)

    real_alloc = drv.alloc
    drv.alloc = capturing
    with pytest.raises(ArgumentError, match="captured into a CUDA graph"):
        call(4 * b, 7)  # more rows than the stream's buffer holds
    assert len(drv.launches) == 3 and stream_workspaces(rt)[7] == (ptr, slots)
    drv.alloc = real_alloc
    call(4 * b, 7)  # a larger buffer replaces the stream's, and the old one is freed
    assert stream_workspaces(rt)[7][0] != ptr and ptr not in drv.allocs


def test_the_workspace_of_a_batched_call_counts_every_query_row():
    """FA4 sizes the tensor-map workspace by q.shape[0] * q.shape[1] rows for batched queries
    (interface.py 1262-1272). b=7, seqlen_q=1023, 6 heads, tile_m 128, H100: 7161 // 128 + 2 * 7 + 1
    = 70 m-blocks, 70 * 6 = 420 CTAs, max(420, 2 * 132) + 8 = 428 slots (the kernel traps with fewer
    slots than CTAs: the grid has 8 * 7 * 6 = 336)."""
    from types import SimpleNamespace

    from fa4aot.runtime.workspaces import workspace_slots

    rt = SimpleNamespace(target=SimpleNamespace(num_sms=132))
    fc = SimpleNamespace(
        lv=SimpleNamespace(fields={"pack_gqa": False, "tile_m": 128}),
        nheads=6, k=(0, (7, 1023, 6, 128)), rows=(7, 1023), batch=7, num_splits=1,
    )  # fmt: skip
    assert workspace_slots(rt, fc) == 428
    packed = SimpleNamespace(**{**vars(fc), "rows": (7161,)})  # varlen queries: q.shape[0] rows
    assert workspace_slots(rt, packed) == 428


def test_the_workspace_of_a_packed_gqa_call_counts_rows_per_kv_head():
    """Packed GQA (32 heads over 8): q_mult 4, so 5000 varlen rows of batch 3 make 5000 * 4 // 128
    + 2 * 3 + 1 = 163 m-blocks over 8 KV heads, max(1304, 264) + 8 = 1312 slots; the fast path's
    per-batch form (base + per_batch * batch) gives the same for every batch."""
    from fa4aot.core.fa4_interface import tensormap_workspace_ctas, tensormap_workspace_terms

    assert tensormap_workspace_ctas(True, 128, 32, 8, 132, 5000, 3, 1) == 1312
    assert tensormap_workspace_ctas(False, 128, 32, 8, 132, 5000, 3, 1) == (5000 // 128 + 7) * 32 + 8
    assert tensormap_workspace_ctas(True, 128, 32, 8, 132, 10, 1, 1) == 2 * 132 + 8  # the SM floor
    for pack, splits in ((True, 1), (False, 1), (True, 3)):
        base, per_batch, least = tensormap_workspace_terms(pack, 128, 32, 8, 132, 5000, splits)
        for batch in (1, 3, 17, 300):
            q_mult = 4 if pack else 1  # FA4's lines, written out
            want = max((5000 * q_mult // 128 + 2 * batch + 1) * (8 if pack else 32) * splits, 2 * 132) + 8
            assert max(base + per_batch * batch, least) == want


def test_automatic_metadata_pool_allocates_nothing_after_warm_up(sm100):
    """Split-KV varlen calls without caller metadata take their metadata from a pool per (stream,
    configuration) shared by every batch size: 1,000 views cycling through 50 batch sizes grow it
    twice and then allocate nothing; growing frees the old buffer only after a stream sync."""
    from fa4aot.runtime.metadata import MIN_POOL_CAPACITY, MetadataPool, SchedulerMetadata, metadata_bytes

    rt, drv = sm100

    def make(batch, buffer):
        return SchedulerMetadata(batch, 16, 4, 128, causal=True, runtime=rt, buffer=buffer)

    pool = MetadataPool(rt, 9, make)
    sizes = [1 + (i * 37) % 200 for i in range(50)]  # 1..200, in a scrambled order
    for b in sizes:
        pool.get(b)
    capacity, allocated = pool.capacity, dict(drv.allocs)
    assert capacity == 256 and len(drv.allocs) == 1 and drv.syncs == [9, 9]  # 64 -> 128 -> 256, old ones synced
    assert list(drv.allocs.values()) == [metadata_bytes(256, 3)] and MIN_POOL_CAPACITY == 64
    for i in range(1000):
        md = pool.get(sizes[i % 50])
        assert md.num_m_blocks.shape == (sizes[i % 50],) and md.fields["num_warps"] >= 1
    assert drv.allocs == allocated and pool.capacity == capacity
    (base,) = allocated
    for md in map(pool.get, sizes[:5]):  # every view lies inside the one allocation, its vectors apart
        ends = [md.num_m_blocks.ptr, md.num_splits_dynamic.ptr, md.num_nheads_in_l2.ptr]
        assert base < ends[0] < ends[1] < ends[2] < base + metadata_bytes(256, 3)
        md.close()  # a view owns nothing
    assert drv.allocs == allocated
    pool.close()
    assert drv.allocs == {} and drv.syncs[-1] == 9
