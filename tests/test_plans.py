"""Launch plans: FA4's exported host code, called on the CPU through the recording shim."""

from __future__ import annotations

import dataclasses
import math
import struct
import subprocess
import sys

import pytest
from helpers import run_cli, run_threads

from fa4aot.core import cubin, samples
from fa4aot.core.errors import ArgumentError
from fa4aot.core.families import dims_for
from fa4aot.core.families.combine import combine_grid
from fa4aot.core.families.forward import sm90_forward_grid, sm100_forward_grid
from fa4aot.core.index import Cache
from fa4aot.core.layouts import Dims
from fa4aot.core.signature import TensorDesc
from fa4aot.plan.library import open_plan, target_answers

SM90_MAX_SMEM_PER_BLOCK = 232448  # H100 opt-in shared memory per block (CUDA programming guide, CC 9.0)


def load_plan(cache: Cache, entry, static_smem: int = 0):
    plan = open_plan(cache.read_plan(entry), entry.meta)
    dev, ker = target_answers(entry.target.optin_smem(), static_smem)
    plan.load(list(range(1, len(plan.kernels) + 1)), dev, ker)
    return plan


def entries(built_cache, family=None, **fields):
    cache = Cache(built_cache)
    out = []
    for e in cache.entries():
        if family and e.variant.family != family:
            continue
        if all(e.variant.fields.get(k) == v for k, v in fields.items()):
            out.append(e)
    return cache, out


def test_every_plan_matches_its_cubin(built_cache):
    cache, all_entries = entries(built_cache)
    assert all_entries
    for e in all_entries:
        plan = load_plan(cache, e)
        parsed = cubin.parse(cache.read_cubin(e))
        ml = plan.module_load
        assert (ml.library_loads, ml.kernel_lookups) == (1, 1)
        sets = {(attr, value) for _, attr, value in ml.set_attributes}
        assert (8, e.target.optin_smem()) in sets and (14, 1) in sets  # max dyn smem, non-portable cluster
        named = samples.named_args(e.variant)
        (launch,) = plan.plan(plan.order(named))
        k = parsed.kernels[launch.kernel]  # the recorded kernel is the cubin's kernel symbol
        assert launch.kernel == e.meta["kernels"][0]["symbol"]
        assert launch.block == k.reqntid
        assert len(launch.param_bytes) == k.cbank_param_size
        starts = {p.offset for p in k.params}
        # every tensor the host code passes on by base address starts a parameter (a raw
        # pointer or the first word of a TMA descriptor), as the cubin's table says
        found = 0
        for name, desc in named.items():
            if not isinstance(desc, TensorDesc):
                continue
            raw = struct.pack("<Q", desc.ptr)
            buf = launch.param_bytes
            hits = [i for i in range(0, len(buf) - 7, 8) if buf[i : i + 8] == raw]
            if hits:
                found += 1
                assert set(hits) & starts, f"{e.variant.label()}: &{name} at {hits}, no parameter starts there"
        assert found >= 2, e.variant.label()


def _fwd_2cta(built_cache):
    cache, es = entries(built_cache, "fwd_sm100", use_2cta_instrs=True, qhead_per_kvhead=1, has_lse=False, causal=False)
    assert es, "ci.yaml must hold the d=128 bf16 non-causal 2CTA SM100 forward"
    return cache, es[0]


@pytest.mark.parametrize(
    "b,s,h", [(2, 1024, 16), (8, 4096, 32), (3, 1000, 7), (1, 257, 1), (4, 16384, 8), (16, 777, 3)]
)
def test_sm100_forward_2cta_launch(built_cache, b, s, h):
    cache, e = _fwd_2cta(built_cache)
    plan = load_plan(cache, e)
    dims = Dims(batch=b, seqlen_q=s, seqlen_k=s, nheads=h, nheads_kv=h)
    (launch,) = plan.plan(plan.order(samples.named_args(e.variant, dims)))
    assert launch.block == (512, 1, 1)
    assert launch.smem == 232448
    assert launch.cluster == (2, 1, 1)
    cluster_tiles = b * h * math.ceil(s / (2 * 256))
    assert launch.grid == (min(2 * cluster_tiles, 148), 1, 1)
    assert launch.grid == sm100_forward_grid(e.variant.fields, batch=b, seqlen_q=s, nheads=h, nheads_kv=h, num_sms=148)
    if (b, s, h) == (8, 4096, 32):
        assert 2 * cluster_tiles > 148  # a shape above the SM count is capped


def test_sm100_decode_and_varlen_shapes_are_recorded(built_cache):
    cache, dec = entries(built_cache, "fwd_sm100", seqused_k=True, qhead_per_kvhead=8, paged_kv="none")
    assert {e.variant.fields["use_swapab"] for e in dec} == {False, True}  # FA4's SwapAB kernel and its standard one
    for e in dec:
        plan = load_plan(cache, e)
        d = Dims(batch=64, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=4)
        (launch,) = plan.plan(plan.order(samples.named_args(e.variant, d)))
        assert launch.cluster in (None, (1, 1, 1)), launch.cluster
        assert launch.grid == sm100_forward_grid(
            e.variant.fields, batch=64, seqlen_q=1, nheads=32, nheads_kv=4, num_sms=148
        )
        if e.variant.fields["use_swapab"]:  # one CTA per (KV head, sequence)
            assert launch.grid == (1, 4, 64)
    cache, var = entries(built_cache, "fwd_sm100", varlen_q=True, num_splits=1, paged_kv="none")
    plan = load_plan(cache, var[0])
    d = Dims(batch=5, seqlen_q=3000, seqlen_k=3000, nheads=16, nheads_kv=16, total_q=5000, total_k=6000)
    (launch,) = plan.plan(plan.order(samples.named_args(var[0].variant, d)))
    assert launch.grid == sm100_forward_grid(
        var[0].variant.fields, batch=5, seqlen_q=3000, nheads=16, nheads_kv=16, num_sms=148, total_q=5000
    )


def test_sm90_and_combine_grids(built_cache):
    cache, es = entries(built_cache, "fwd_sm90")
    for e in es:
        plan = load_plan(cache, e)
        d = dims_for(e.variant, batch=3, seqlen_q=1000, seqlen_k=1000)
        (launch,) = plan.plan(plan.order(samples.named_args(e.variant, d)))
        f = e.variant.fields
        # one producer warp group plus one MMA warp group per 64 rows of the tile
        assert launch.block == (128 * (f["tile_m"] // 64 + 1), 1, 1)
        if (f["head_dim"], f["tile_m"], f["tile_n"], f["mma_pv_is_rs"]) == (128, 128, 128, True):
            assert launch.smem == 164864
        assert 0 < launch.smem <= SM90_MAX_SMEM_PER_BLOCK
        assert launch.grid == sm90_forward_grid(
            f, batch=3, seqlen_q=1000, nheads=d.nheads, nheads_kv=d.nheads_kv, total_q=d.total_q
        )
    cache, es = entries(built_cache, "combine")
    for e in es:
        plan = load_plan(cache, e)
        d = Dims(batch=2, seqlen_q=1024, nheads=16, head_dim=128, num_splits=4, total_q=1500)
        (launch,) = plan.plan(plan.order(samples.named_args(e.variant, d)))
        assert launch.block == (256, 1, 1) and launch.cluster is None
        assert launch.grid == combine_grid(e.variant.fields, batch=2, seqlen=1024, nheads=16, total_q=1500)


def _never_written(plan, flat_args) -> set[int]:
    """Parameter bytes the host code never writes: they differ between two calls whose stacks
    were poisoned with different patterns."""
    a = bytes(plan.call(flat_args, pattern=0x00).launches[0].params[: plan.kernels[0].param_bytes])
    b = bytes(plan.call(flat_args, pattern=0xFF).launches[0].params[: plan.kernels[0].param_bytes])
    return {i for i in range(len(a)) if a[i] != b[i]}


def _moved(plan, base_named, changed_named, mask) -> dict[int, list[int]]:
    """{param ordinal: [byte offsets inside it]} that differ between two argument sets."""
    a = bytes(
        plan.call(plan.flatten(plan.order(base_named)), pattern=0x00).launches[0].params[: plan.kernels[0].param_bytes]
    )
    b = bytes(
        plan.call(plan.flatten(plan.order(changed_named)), pattern=0x00)
        .launches[0]
        .params[: plan.kernels[0].param_bytes]
    )
    k = plan.kernels[0]
    out: dict[int, list[int]] = {}
    for i in range(len(a)):
        if a[i] != b[i] and i not in mask:
            (o,) = [o for o, (off, size) in enumerate(zip(k.param_offsets, k.param_sizes)) if off <= i < off + size]
            out.setdefault(o, []).append(i - k.param_offsets[o])
    return out


def _check_moves(plan, named, ptr_name, scale_name=None):
    flat = plan.flatten(plan.order(named))
    mask = _never_written(plan, flat)
    k = plan.kernels[0]
    assert mask, "expected some never-written padding in the parameter buffer"
    # a call is deterministic outside the mask
    assert not _moved(plan, named, named, mask)
    # pointer: exactly the 8 bytes that held it move, inside one parameter
    t = named[ptr_name]
    moved = _moved(plan, named, {**named, ptr_name: t._replace(ptr=t.ptr + 4096)}, mask)
    assert len(moved) == 1
    ((o, offs),) = moved.items()
    base = bytes(plan.call(flat).launches[0].params[: k.param_bytes])
    at = base.find(struct.pack("<Q", t.ptr))
    assert k.param_offsets[o] <= at and set(offs) <= set(range(at - k.param_offsets[o], at - k.param_offsets[o] + 8))
    # stride: the tensor's batch stride moves its own parameter(s) only, never the pointer word
    st = list(t.strides)
    st[0] *= 2
    moved_stride = _moved(plan, named, {**named, ptr_name: t._replace(strides=tuple(st))}, mask)
    assert moved_stride and all(not (o2 == o and set(v) & set(offs)) for o2, v in moved_stride.items())
    report = {ptr_name + ".ptr": sorted(moved), ptr_name + ".stride[0]": sorted(moved_stride)}
    if scale_name:
        moved_scale = _moved(plan, named, {**named, scale_name: named[scale_name] * 2}, mask)
        ((so, sv),) = moved_scale.items()
        assert k.param_sizes[so] == 4
        new = plan.call(plan.flatten(plan.order({**named, scale_name: named[scale_name] * 2}))).launches[0]
        (val,) = struct.unpack_from("<f", bytes(new.params[k.param_offsets[so] : k.param_offsets[so] + 4]))
        assert val == pytest.approx(named[scale_name] * 2 * math.log2(math.e), rel=1e-6)
        report[scale_name] = [so]
    return report


def test_parameter_bytes_move_with_inputs_sm100_forward(built_cache, capsys):
    cache, e = _fwd_2cta(built_cache)
    plan = load_plan(cache, e)
    named = samples.named_args(e.variant, Dims(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16))
    report = _check_moves(plan, named, "q", "softmax_scale")
    # a shape change (seqlen) moves the shape parameters and the tile count
    d2 = Dims(batch=2, seqlen_q=2048, seqlen_k=1024, nheads=16, nheads_kv=16)
    mask = _never_written(plan, plan.flatten(plan.order(named)))
    moved_shape = _moved(plan, named, samples.named_args(e.variant, d2), mask)
    assert 0 in moved_shape and 3 in moved_shape  # shapes of Q and O
    report["seqlen_q"] = sorted(moved_shape)
    with capsys.disabled():
        print(f"\nSM100 forward: parameters that move per input: {report}")


def test_parameter_bytes_move_with_inputs_combine(built_cache, capsys):
    cache, es = entries(built_cache, "combine", varlen=False)
    plan = load_plan(cache, es[0])
    named = samples.named_args(es[0].variant, Dims(batch=2, seqlen_q=1024, nheads=16, head_dim=128, num_splits=4))
    report = _check_moves(plan, named, "out_partial")
    with capsys.disabled():
        print(f"\ncombine: parameters that move per input: {report}")


def test_argument_mismatches_are_errors(built_cache):
    cache, es = entries(built_cache, "combine", varlen=False)
    plan = load_plan(cache, es[0])
    named = samples.named_args(es[0].variant)
    args = plan.order(named)
    with pytest.raises(ArgumentError, match="takes"):
        plan.plan(args[:-1])
    bad = dict(named, out=TensorDesc(named["out"].ptr, named["out"].shape[:-1], named["out"].strides[:-1]))
    with pytest.raises(ArgumentError, match="out: expected rank 4"):
        plan.plan(plan.order(bad))
    o = named["out"]
    with pytest.raises(ArgumentError, match="compiled as 128"):
        plan.plan(plan.order(dict(named, out=TensorDesc(o.ptr, o.shape[:-1] + (64,), o.strides))))
    with pytest.raises(ArgumentError, match="stride 3 must be 1"):
        plan.plan(plan.order(dict(named, out=TensorDesc(o.ptr, o.shape, o.strides[:-1] + (2,)))))
    with pytest.raises(ArgumentError, match="needs out_partial"):
        plan.order({k: v for k, v in named.items() if k != "out_partial"})
    with pytest.raises(ArgumentError, match="takes no cu_seqlens"):
        plan.order(dict(named, cu_seqlens=o))


def test_plans_are_reentrant_across_threads(built_cache):
    cache, e = _fwd_2cta(built_cache)
    plan = load_plan(cache, e)
    errors = []

    def worker(seed):
        try:
            for i in range(200):
                b, s, h = 1 + (seed + i) % 8, 128 * (1 + (seed * 7 + i) % 64), 1 + (i % 16)
                d = Dims(batch=b, seqlen_q=s, seqlen_k=s, nheads=h, nheads_kv=h)
                (launch,) = plan.plan(plan.order(samples.named_args(e.variant, d)))
                want = sm100_forward_grid(e.variant.fields, batch=b, seqlen_q=s, nheads=h, nheads_kv=h, num_sms=148)
                if launch.grid != want:
                    errors.append((b, s, h, launch.grid, want))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    run_threads(worker, range(8))
    assert not errors, errors[:3]


ISOLATED = r"""
import sys
from fa4aot.core.index import Cache
from fa4aot.core import samples
from fa4aot.plan.library import open_plan, target_answers
cache = Cache(sys.argv[1])
n = 0
for e in cache.entries():
    plan = open_plan(cache.read_plan(e), e.meta)
    plan.load(list(range(1, len(plan.kernels) + 1)), *target_answers(e.target.optin_smem()))
    assert plan.plan(plan.order(samples.named_args(e.variant)))
    n += 1
banned = sorted(m for m in sys.modules if m.split(".")[0] in ("cutlass", "flash_attn", "tvm_ffi", "torch", "quack", "triton"))
maps = open("/proc/self/maps").read()
print(n, banned, "libcuda" in maps, "cute_dsl_runtime" in maps)
"""


def test_plans_run_without_dsl_torch_or_libcuda(built_cache):
    out = subprocess.run([sys.executable, "-c", ISOLATED, str(built_cache)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    n, rest = out.stdout.split(" ", 1)
    assert int(n) >= 20
    assert rest.strip() == "[] False False"


def test_launch_plan_cli(built_cache):
    cache, e = _fwd_2cta(built_cache)
    out = run_cli(
        "launch-plan",
        e.key[:10],
        "--cache",
        str(built_cache),
        "--shape",
        "batch=8,seqlen_q=4096,seqlen_k=4096,nheads=32,nheads_kv=32",
    ).stdout
    assert "grid (148, 1, 1) block (512, 1, 1) smem 232448 cluster (2, 1, 1)" in out
    assert "+0: &q" in out and "+0: &out" in out
    n_params = len(e.meta["kernels"][0]["params"])
    assert sum(line.lstrip().startswith("param ") for line in out.splitlines()) == n_params
    bad = run_cli("launch-plan", e.key[:10], "--cache", str(built_cache), "--shape", "bogus=1", check=False)
    assert bad.returncode != 0 and "bogus" in bad.stderr


def test_every_forward_plan_on_random_arguments(built_cache):
    """>= 30 random argument sets per forward variant (see fa4aot.tools.plancheck for what varies and
    what is checked: block, smem, grid vs FA4's formulas, cluster, Q/K/V/O addresses)."""
    from fa4aot.core.families import FORWARD, of_stage
    from fa4aot.tools.plancheck import check_cache

    reports = check_cache(Cache(built_cache), n=30, families=of_stage(FORWARD))
    assert {r.entry.variant.family for r in reports} == {"fwd_sm100", "fwd_sm90", "fwd_sm120"}
    assert all(r.runs >= 30 for r in reports)
    problems = [(r.entry.variant.label(), p) for r in reports for p in r.problems]
    assert not problems, problems[:5]


def test_plan_check_catches_a_wrong_grid(built_cache, monkeypatch):
    """The check can fail: with a wrong oracle it reports every call."""
    from fa4aot.core.families import FAMILIES
    from fa4aot.tools import plancheck

    wrong = dataclasses.replace(FAMILIES["fwd_sm100"], grid=lambda f, sizes, num_sms: (1, 1, 1))
    monkeypatch.setitem(FAMILIES, "fwd_sm100", wrong)
    cache, (e, *_) = entries(built_cache, "fwd_sm100")
    assert len(plancheck.check_entry(cache, e, n=5).problems) == 5


def test_generated_launchers_show_their_source_in_tracebacks():
    """Generated code is registered with linecache under a named file: a traceback through it
    shows the generated line, not <string>."""
    import linecache
    import traceback

    from fa4aot.core import gencode

    scope: dict = {}
    gencode.run("def launch(x):\n    return 1 // x  # the generated line\n", scope, "launcher")
    try:
        scope["launch"](0)
    except ZeroDivisionError:
        text = traceback.format_exc()
    assert "<fa4aot launcher " in text and "return 1 // x  # the generated line" in text
    names = [n for n in linecache.cache if n.startswith("<fa4aot ")]
    assert len(names) <= gencode.MAX_SOURCES


def test_bound_call_words_go_where_the_plan_reads_them(sm100):
    """A bound call's per-call words: a 32-bit scalar's slot, or a tensor's dynamic extent after
    its address. A call with words for another batch and max_seqlen_q launches what FA4's host
    code launches for a plan bound with those values; anything else is refused."""
    from fa4aot.core.errors import PlanError

    rt, drv = sm100
    e = next(x for x in Cache(rt.cache.root).entries() if x.variant.family == "fwd_sm100"
             and x.variant.fields["varlen_q"] and x.variant.fields["varlen_k"])  # fmt: skip
    plan = rt.load(e.variant).plan
    named = samples.named_args(e.variant)
    words = [("cu_seqlens_q", 0), ("cu_seqlens_k", 0), ("max_seqlen_q", None)]
    bound = plan.bind(named, words)
    for bad in [("softmax_scale", None), ("nope", None), ("q", 3), ("q", None), ("max_seqlen_q", 0)]:
        with pytest.raises(PlanError):
            bound.word_offset(*bad)
    batch, max_q = named["cu_seqlens_q"][1][0] + 2, 77  # not the bound values
    other = dict(named, max_seqlen_q=max_q)
    for n in ("cu_seqlens_q", "cu_seqlens_k"):
        other[n] = named[n]._replace(shape=(batch + 1,))
    want = plan.plan(plan.order(other))
    values = [batch + 1, batch + 1, max_q]
    bound([named[n][0] for n in bound.tensor_names] + [v | h for v, h in zip(values, bound.word_highs)], 5)
    got = drv.launches[-len(want) :]
    assert [(g.grid, g.block, g.smem, g.stream) for g in got] == [(w.grid, w.block, w.smem, 5) for w in want]
    assert want[0].grid != plan.plan(plan.order(named))[0].grid  # the words changed the launch
