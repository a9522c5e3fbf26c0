"""The backward families without a GPU: FA4's configuration restated (checked against FA4's own
functions), the kernels one call launches and how they are built (checked against what FA4's
``_flash_attn_bwd`` constructs in fake mode), manifest expansion and errors, the runtime's
launch sequence on the fake driver, and byte identity with FA4's JIT for the CI cache."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import assert_imports_none_of, needs_dsl

import fa4aot
from fa4aot.compile.manifest import ManifestError, expand
from fa4aot.core import selector
from fa4aot.core.backward import CALL_FIELDS, check_call, dkv_postprocess, facts_for, scratch, select
from fa4aot.core.errors import ArgumentError, VariantNotFoundError
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor

TESTS = str(Path(__file__).resolve().parent)
B = 0x7F20_0000_0000


def call(**kw):
    f = dict(dtype="bf16", head_dim=128, head_dim_v=128, qhead_per_kvhead=1, causal=False, local=False,
             varlen_q=False, varlen_k=False, seqused_q=False, seqused_k=False, deterministic=False, softcap=0.0,
             has_dlse=False, learnable_sink="none")  # fmt: skip
    f.update(kw)
    assert set(f) == set(CALL_FIELDS)
    return f


# -- FA4's rules ---------------------------------------------------------------------------------


def parts(family: str, f: dict, b: int = 2, sq: int = 1000, sk: int = 777, hk: int = 4):
    """The kernels of a call of class ``f`` with these shapes, FA4's selector choosing the config."""
    arch, sms = ("sm_90a", 132) if family == "bwd_sm90" else ("sm_100a", 148)
    return select(selector.installed(), family, f, facts_for(arch, sms, f, b, sq, sk, hk))[1]


def test_rules_name_fa4s_reasons():
    from fa4aot.core import selector

    sel = selector.installed()
    gqa = call(head_dim=192, qhead_per_kvhead=2)
    with pytest.raises(ValueError, match="GQA backward requires head_dim == head_dim_v"):
        select(sel, "bwd_sm90", gqa, facts_for("sm_90a", 132, gqa, 2, 512, 512, 4))
    assert check_call("bwd_sm90", call(head_dim=192, qhead_per_kvhead=1)) is None
    assert check_call("bwd_sm100", call(head_dim=256, head_dim_v=256)) is None  # b40: the generic kernel
    assert "not supported on SM100" in check_call("bwd_sm100", call(head_dim=160, head_dim_v=160))
    assert check_call("bwd_sm90", call(deterministic=True)) is None
    # FA4's backward takes seqused_q/k on batched tensors too (no cu_seqlens): so does fa4aot
    assert check_call("bwd_sm90", call(seqused_q=True, seqused_k=True)) is None


def test_parts_follow_fa4s_launch_sequence():
    ps = parts("bwd_sm90", call(causal=True))
    assert [p.role for p in ps] == ["pre", "main", "post_dq"]
    gqa = parts("bwd_sm90", call(qhead_per_kvhead=4, has_dlse=True, learnable_sink="bf16"))
    f = {p.role: p.field_dict for p in gqa}
    assert f["pre"]["has_dlse"] and f["post_dq"]["learnable_sink"] == "bf16"
    if "post_dk" in f:  # FA4 accumulates dK/dV in fp32 (no query-head fold): postprocessed per side
        assert [p.role for p in gqa] == ["pre", "main", "post_dq", "post_dk", "post_dv"]
        assert f["post_dk"]["learnable_sink"] == "none"
    # the dQ postprocess follows the main kernel's tile and dQ layout
    assert (f["post_dq"]["tile"], f["post_dq"]["swap_ab"]) == (f["main"]["tile_m"], f["main"]["dQ_swapAB"])
    sm100 = {p.role: p.field_dict for p in parts("bwd_sm100", call(qhead_per_kvhead=2))}
    assert sm100["post_dq"]["two_cta"] == sm100["main"]["use_2cta_instrs"]


def test_scratch_sizes_are_fa4s():
    main = parts("bwd_sm90", call(qhead_per_kvhead=4))[1].field_dict
    tm, pack = main["tile_m"], main["pack_factor"]
    sc = scratch("bwd_sm90", main, 2, 16, 4, 1000, 777, None, None, 132)
    assert sc.scratch == (2, 16 // pack, -(-1000 * pack // tm) * tm)
    # varlen: total + (batch + 1) tiles, rounded down to the tile
    sc = scratch("bwd_sm90", main, 3, 16, 4, 0, 0, 1000, 777, 132)
    assert sc.scratch == (16 // pack, (1000 * pack + 4 * tm - 1) // tm * tm)
    # varlen K: the tensor-map workspace FA4 sizes for the grid (2 descriptors on SM90)
    vk = parts("bwd_sm90", call(varlen_q=True, varlen_k=True))[1].field_dict
    ws = scratch("bwd_sm90", vk, 3, 8, 8, 0, 0, 1000, 777, 132).workspace
    assert ws == (max((777 // vk["tile_n"] + 7) * 8 * 2, 264) + 8, 2, 16)
    # SM100 with a 2-CTA cluster and dK/dV accumulators: K padded to whole CTA pairs
    for f in (call(qhead_per_kvhead=4), call(qhead_per_kvhead=4, causal=True), call(qhead_per_kvhead=8)):
        main = parts("bwd_sm100", f)[1].field_dict
        if main["cluster_size"] == 2 and dkv_postprocess(main):
            dk = scratch("bwd_sm100", main, 1, 16, 4, 128, 1, None, None, 148).dk_accum
            assert dk == (1, 4, 2 * main["tile_n"] * 128), (f, dk)
            break
    else:
        pytest.fail("no SM100 GQA call selects a 2-CTA cluster with dK/dV accumulators")


# -- FA4's own choices (fake mode, nothing compiled) ----------------------------------------------

#: Runs FA4's _flash_attn_bwd in fake mode with cute.compile stubbed out, recording every FA4
#: kernel object it constructs; then builds fa4aot's entries for the same call (make_entry) under
#: the same recording and prints both.
ORACLE = r"""
import inspect, json, os, sys
cases = json.loads(sys.stdin.read())
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import cutlass.cute as cute
from flash_attn.cute import interface as I
from flash_attn.cute import flash_bwd_sm90, flash_bwd_sm100, flash_bwd_preprocess, flash_bwd_postprocess
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
log = []
def norm(v):
    if v is None or isinstance(v, (bool, int, float, str)): return v
    if callable(v) and not isinstance(v, type): return "callable"
    return getattr(v, "name", None) or getattr(v, "__name__", None) or repr(v)
for mod, name in ((flash_bwd_sm90, "FlashAttentionBackwardSm90"), (flash_bwd_sm100, "FlashAttentionBackwardSm100"),
                  (flash_bwd_preprocess, "FlashAttentionBackwardPreprocess"),
                  (flash_bwd_postprocess, "FlashAttentionBackwardPostprocess")):
    cls = getattr(mod, name)
    orig = cls.__init__
    sig = inspect.signature(orig)
    def rec(self, *a, __orig=orig, __sig=sig, __name=name, **k):
        b = __sig.bind(self, *a, **k); b.apply_defaults()
        log.append([__name, {n: norm(v) for n, v in list(b.arguments.items())[1:]}])
        __orig(self, *a, **k)
    cls.__init__ = rec
cute.compile = lambda *a, **k: (lambda *x, **y: None)
from flash_attn.cute import utils as fa4_utils
from torch._subclasses.fake_tensor import unset_fake_temporarily
leading_static = fa4_utils.convert_from_dlpack_leading_static
def leading_static_cpu(x, *a, **k):  # the deterministic semaphores go through DLPack: a CPU twin
    with unset_fake_temporarily():
        return leading_static(torch.zeros(tuple(x.shape), dtype=x.dtype).as_strided(tuple(x.shape), tuple(x.stride())), *a, **k)
fa4_utils.convert_from_dlpack_leading_static = leading_static_cpu
from fa4aot.tools.fa4_calls import fa4_backward
from fa4aot.core import selector
from fa4aot.core.backward import facts_for, select
from fa4aot.core.variant import Target, Variant
from fa4aot_kernels import module_for
arch = os.environ["FLASH_ATTENTION_ARCH"]
target = Target("t", arch, int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
out = []
for case in cases:
    fields, family = case.pop("fields"), case.pop("family")
    for c in [f.compile_cache for f in vars(I).values() if hasattr(getattr(f, "compile_cache", None), "clear")]:
        c.clear()
    log.clear()
    with FakeTensorMode():
        fa4_backward(I, torch, case)
    fa4 = [json.dumps(x, sort_keys=True) for x in log]
    log.clear()
    facts = facts_for(arch, target.num_sms, fields, case["batch"], case["seqlen_q"], case["seqlen_k"], case["nheads_kv"])
    for p in select(selector.installed(), family, fields, facts)[1]:
        module_for(p.family).make_entry(Variant.make(p.family, arch, target.num_sms, **p.field_dict), target)
    mine = [json.dumps(x, sort_keys=True) for x in log]
    out.append({"fa4": sorted(set(fa4)), "mine": sorted(set(mine))})
print(json.dumps(out))
"""


def _oracle(arch: str, sms: int, cases: list[dict]) -> list[dict]:
    env = dict(os.environ, FLASH_ATTENTION_ARCH=arch, CUTE_DSL_ARCH=arch, FLASH_ATTENTION_NUM_SMS=str(sms),
               CUTE_DSL_LOG_LEVEL="0", PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", ORACLE], input=json.dumps(cases), capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _case(family: str, b=2, sq=1000, sk=777, hk=4, wl=None, wr=None, **kw) -> dict:
    f = call(**kw)
    c = dict(family=family, fields=f, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=hk * f["qhead_per_kvhead"],
             nheads_kv=hk, head_dim=f["head_dim"], head_dim_v=f["head_dim_v"], causal=f["causal"], dtype=f["dtype"],
             varlen_q=f["varlen_q"], varlen_k=f["varlen_k"], seqused_q=f["seqused_q"], seqused_k=f["seqused_k"],
             total_q=b * sq, total_k=b * sk, dlse=f["has_dlse"], softcap=f["softcap"],
             deterministic=f["deterministic"])  # fmt: skip
    if f["local"]:
        c.update(wl=wl if wl is not None else 100, wr=wr if wr is not None else 20)
    if f["learnable_sink"] != "none":
        c["learnable_sink"] = f["learnable_sink"]
    return c


SM90_CASES = [
    dict(),
    dict(causal=True),
    dict(qhead_per_kvhead=4, causal=True),
    dict(head_dim=64, head_dim_v=64, qhead_per_kvhead=8),
    dict(head_dim=96, head_dim_v=96, causal=True, dtype="fp16"),
    dict(head_dim=192, head_dim_v=128),
    dict(head_dim=192, head_dim_v=192, qhead_per_kvhead=2, local=True),
    dict(head_dim=256, head_dim_v=256, causal=True),
    dict(head_dim=72, head_dim_v=72, qhead_per_kvhead=3),
    dict(qhead_per_kvhead=2, varlen_q=True, varlen_k=True, causal=True, has_dlse=True),
    dict(head_dim=64, head_dim_v=64, qhead_per_kvhead=8, varlen_q=True, varlen_k=True, seqused_q=True,
         seqused_k=True, learnable_sink="fp32", has_dlse=True),
    dict(softcap=30.0, causal=True),
    dict(varlen_q=True, local=True),
    dict(deterministic=True, causal=True),
    dict(deterministic=True, qhead_per_kvhead=4, varlen_q=True, varlen_k=True),
]  # fmt: skip

SM100_CASES = [
    dict(),
    dict(causal=True, qhead_per_kvhead=4),
    dict(head_dim=64, head_dim_v=64, qhead_per_kvhead=8, causal=True),
    dict(head_dim=192, head_dim_v=128, qhead_per_kvhead=2),
    dict(head_dim=96, head_dim_v=96, local=True, softcap=20.0),
    dict(qhead_per_kvhead=4, varlen_q=True, varlen_k=True, causal=True, learnable_sink="bf16", has_dlse=True),
    dict(head_dim=64, head_dim_v=64, varlen_q=True, varlen_k=True, seqused_q=True, seqused_k=True),
    dict(deterministic=True, causal=True, qhead_per_kvhead=2),
    dict(head_dim=256, head_dim_v=256, causal=True),
    dict(head_dim=256, head_dim_v=256, qhead_per_kvhead=2),
]

SM120_CASES = [
    dict(causal=True),
    dict(qhead_per_kvhead=4, causal=True, dtype="fp16"),
    dict(head_dim=64, head_dim_v=64, qhead_per_kvhead=8, local=True, softcap=30.0),
    dict(head_dim=192, head_dim_v=128, qhead_per_kvhead=2, varlen_q=True, varlen_k=True, has_dlse=True),
    dict(head_dim=96, head_dim_v=96, seqused_k=True),
]


@needs_dsl
@pytest.mark.parametrize(
    "arch,sms,family,cases",
    [
        ("sm_90a", 132, "bwd_sm90", SM90_CASES),
        pytest.param("sm_100a", 148, "bwd_sm100", SM100_CASES, marks=pytest.mark.slow),
        pytest.param("sm_103a", 148, "bwd_sm100", SM100_CASES[:3], marks=pytest.mark.slow),
        # (the fast tier's sample: SM90; the full tier adds SM100, SM103 and SM120)
        pytest.param("sm_120a", 188, "bwd_sm120", SM120_CASES, marks=pytest.mark.slow),
    ],  # fmt: skip
)
def test_kernels_are_constructed_as_fa4_constructs_them(arch, sms, family, cases):
    """For each call, the FA4 kernel objects (class and every constructor argument) fa4aot's
    kernel modules build for the call's parts are exactly those FA4's _flash_attn_bwd builds."""
    got = _oracle(arch, sms, [_case(family, **c) for c in cases])
    for c, r in zip(cases, got):
        assert r["fa4"] and r["mine"] == r["fa4"], (c, r)


# -- manifests -----------------------------------------------------------------------------------


def test_manifest_group_expands_into_every_kernel_of_the_call():
    doc = {"target": {"name": "h100", "arch": "sm_90a", "num_sms": 132},
           "families": {"bwd_sm90": [{"head_dims": [[128, 128]], "qhead_per_kvhead": [1, 4], "causal": True}]}}  # fmt: skip
    plan = expand(doc)
    fams = sorted(pv.variant.family for pv in plan.variants)
    # two mains, one shared preprocess, the dQ postprocess and (GQA) one dK/dV postprocess
    assert fams == ["bwd_post", "bwd_post", "bwd_pre", "bwd_sm90", "bwd_sm90"]


@pytest.mark.parametrize(
    "group,where,what",
    [
        ({"head_dims": [[192, 128]], "qhead_per_kvhead": 2}, "bwd_sm90[0]", "GQA backward requires"),
        ({"deterministic": "yes"}, "bwd_sm90[0].deterministic", "true/false"),
        ({"dlse": "yes"}, "bwd_sm90[0].dlse", "true/false"),
        ({"tiles": [64, 128]}, "bwd_sm90[0].tiles", "unknown axis"),
    ],
)
def test_manifest_errors_name_the_field(group, where, what):
    doc = {"target": {"name": "h100", "arch": "sm_90a", "num_sms": 132}, "families": {"bwd_sm90": [group]}}
    with pytest.raises(ManifestError) as e:
        expand(doc)
    assert where in str(e.value) and what in str(e.value), str(e.value)


def test_helper_families_are_not_listed_directly():
    doc = {"target": {"name": "h100", "arch": "sm_90a", "num_sms": 132}, "families": {"bwd_pre": [{}]}}
    with pytest.raises(ManifestError, match="built as part of a backward group"):
        expand(doc)


def test_sm100_builds_fa4s_hd256_backward_and_refuses_the_sm90_family_on_blackwell():
    doc = {"target": {"name": "b200", "arch": "sm_100a", "num_sms": 148},
           "families": {"bwd_sm100": [{"head_dims": [[256, 256]], "causal": [False, True]}]}}  # fmt: skip
    mains = [pv.variant.fields for pv in expand(doc).variants if pv.variant.family == "bwd_sm100"]
    assert mains and all(f["head_dim"] == 256 for f in mains)
    doc["families"] = {"bwd_sm90": [{}]}
    with pytest.raises(ManifestError, match="builds for"):
        expand(doc)


@pytest.mark.parametrize(
    "group,what",
    [
        ({"head_dims": [[256, 256]]}, "131072 bytes of shared memory, more than SM120's 101376"),
        ({"deterministic": True}, "SM120 backward is not deterministic"),
        ({"learnable_sink": "bf16"}, "SM120 backward takes no learnable sink"),
    ],
)
def test_sm120_backward_refuses_what_fa4s_cannot_build(group, what):
    """FA4's SM120 backward (its SM80 kernel in 99 KiB): what FlashAttentionBackwardSm120 cannot
    implement and what FA4's interface refuses on SM120 are refused by the manifest, naming why."""
    doc = {"target": {"name": "rtx-pro-6000", "arch": "sm_120a", "num_sms": 188},
           "families": {"bwd_sm120": [dict(group, batch=[2], seqlen_q=[512], seqlen_k=[512], nheads_kv=[2])]}}  # fmt: skip
    with pytest.raises(ManifestError, match=what):
        expand(doc)


# -- the runtime on the fake driver ---------------------------------------------------------------


def t(i, shape, dtype="bf16"):
    return RawTensor(B + i * (1 << 36), tuple(shape), dtype)


def _args(b, s, h, hk, d, varlen=False):
    rows = (b * s,) if varlen else (b, s)
    krows = (b * s,) if varlen else (b, s)
    lse = t(5, (h, b * s), "fp32") if varlen else t(5, (b, h, s), "fp32")
    return dict(q=t(0, (*rows, h, d)), k=t(1, (*krows, hk, d)), v=t(2, (*krows, hk, d)), out=t(3, (*rows, h, d)),
                dout=t(4, (*rows, h, d)), lse=lse, dq=t(6, (*rows, h, d)), dk=t(7, (*krows, hk, d)),
                dv=t(8, (*krows, hk, d)))  # fmt: skip


def _bwd(rt, a, **kw):
    return fa4aot.flash_attn_backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], dq=a["dq"], dk=a["dk"],
                                      dv=a["dv"], runtime=rt, **kw)  # fmt: skip


def test_backward_launch_sequence_gqa(sm90):
    rt, drv = sm90
    a = _args(2, 1000, 16, 4, 128)
    res = _bwd(rt, a, causal=True, stream=7)
    assert res == (a["dq"], a["dk"], a["dv"])
    names = [drv.kernel_names[launch.kernel] for launch in drv.launches]
    kinds = ["Preprocess", "BackwardSm90", "Postprocess", "Postprocess", "Postprocess"]
    assert all(k in n for k, n in zip(kinds, names)) and len(names) == 5, names
    pre, main, post_dq, post_dk, post_dv = drv.launches
    # FA4's grids: the main kernel over (KV blocks, heads, batch) of its 64 x 128 causal tile,
    # the postprocess over (Q or KV blocks, heads, batch)
    assert main.grid == (8, 16, 2) and main.block == (384, 1, 1)
    assert post_dq.grid == (16, 16, 2) and post_dk.grid == (8, 4, 2)
    assert {launch.stream for launch in drv.launches} == {7}
    # the GQA dK / dV accumulators (batch, kv heads, 1024 padded rows * 128) are zeroed, in one
    # memset on the stream before the kernels
    assert [m[1:] for m in drv.memsets] == [(0, 2 * (2 * 4 * 1024 * 128), 7)]
    # the scratch is the runtime's workspace for this stream, reused by the next call
    (ws,) = drv.allocs
    _bwd(rt, a, causal=True, stream=7)
    assert list(drv.allocs) == [ws]


def test_sm120_backward_launch_sequence_gqa(built_cache):
    """On SM120 the runtime launches FA4's SM120 backward (the SM80 kernel) with its preprocess and
    postprocesses: grids from FA4's single-tile scheduler over (KV blocks of 64, heads, batch), no
    tensor-map workspace; a deterministic call, which FA4 refuses on SM120, is refused before
    any launch."""
    from fa4aot.core.variant import SMEM_OPTIN_BYTES

    drv = FakeDriver(cc=(12, 0), num_sms=188, smem_optin=SMEM_OPTIN_BYTES["sm_120a"])
    rt = Runtime(built_cache, driver=drv)
    a = _args(2, 1000, 16, 4, 128)
    assert _bwd(rt, a, causal=True, stream=5) == (a["dq"], a["dk"], a["dv"])
    names = [drv.kernel_names[launch.kernel] for launch in drv.launches]
    kinds = ["Preprocess", "BackwardSm", "Postprocess", "Postprocess", "Postprocess"]
    assert all(k in n for k, n in zip(kinds, names)) and len(names) == 5, names
    assert not any("Sm90" in n or "Sm100" in n for n in names), names
    pre, main, post_dq, post_dk, post_dv = drv.launches
    assert main.grid == (16, 16, 2) and main.block == (128, 1, 1)  # ceil(1000 / 64) KV blocks
    assert post_dq.grid == (16, 16, 2) and post_dk.grid == (16, 4, 2)
    n = len(drv.launches)
    with pytest.raises(ArgumentError, match="SM120 backward is not deterministic"):
        _bwd(rt, a, causal=True, deterministic=True)
    assert len(drv.launches) == n


def test_backward_mha_writes_dk_dv_directly(sm90):
    rt, drv = sm90
    a = _args(2, 1000, 16, 16, 128)
    _bwd(rt, a, causal=True)
    assert len(drv.launches) == 3 and not drv.memsets
    main = drv.launches[1]
    assert main.grid == (8, 16, 2)


def test_backward_errors_before_any_launch(sm90, tmp_path):
    rt, drv = sm90
    a = _args(2, 1000, 16, 16, 128)
    causal = dict(causal=True)
    bad = [
        (dict(a, lse=t(5, (2, 16, 999), "fp32")), {}, "lse: expected shape"),
        (dict(a, dout=t(4, (2, 1000, 16, 128), "fp16")), {}, "dout: dtype"),
        (dict(a, dq=t(6, (2, 1000, 16, 64))), {}, "dq: expected shape"),
        (a, dict(softmax_scale=float("inf")), "softmax_scale"),
        (a, dict(softcap=-1.0), "softcap"),
        (a, dict(deterministic=1), "deterministic"),
        (a, dict(seqused_q=t(9, (3,), "int32")), "seqused_q"),  # one length per batch entry
        (dict(a, dq=None), {}, "raw-pointer inputs need every output"),
    ]
    for args, kw, what in bad:
        with pytest.raises(ArgumentError, match=what):
            _bwd(rt, args, **causal, **kw)
    # a call whose kernels are not cached: the error names the manifest group to add
    with pytest.raises(VariantNotFoundError, match=r"families\.bwd_sm90: - \{.*head_dims: \[\[96, 96\]\]"):
        _bwd(rt, _args(2, 100, 4, 4, 96))
    assert not drv.launches and not drv.memsets and not drv.allocs


def test_backward_varlen_sinks_and_dlse_launch(sm90):
    rt, drv = sm90
    b, s, h, hk, d = 3, 200, 16, 2, 64
    a = _args(b, s, h, hk, d, varlen=True)
    cu = t(9, (b + 1,), "int32")
    with pytest.raises(ArgumentError, match="learnable_sink: fa4aot allocates dsink"):
        _bwd(rt, a, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, learnable_sink=t(10, (h,)))
    assert not drv.launches
    _bwd(rt, a, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, dlse=t(11, (h, b * s), "fp32"))
    pre = drv.launches[0]
    assert "Preprocess" in drv.kernel_names[pre.kernel] and len(drv.launches) == 5


def test_empty_problem_zeroes_gradients(sm90):
    rt, drv = sm90
    a = _args(2, 0, 16, 16, 128)  # no queries and no keys: nothing to compute or write
    _bwd(rt, a)
    assert not drv.launches and not drv.memsets
    a = dict(_args(2, 64, 16, 16, 128))
    a.update(k=t(1, (2, 0, 16, 128)), v=t(2, (2, 0, 16, 128)), dk=t(7, (2, 0, 16, 128)), dv=t(8, (2, 0, 16, 128)))
    drv.memsets.clear()
    _bwd(rt, a)
    assert not drv.launches and len(drv.memsets) == 1 and drv.memsets[0][0] == a["dq"].ptr


# -- byte identity with FA4's JIT -----------------------------------------------------------------


@pytest.mark.slow
@needs_dsl
def test_every_backward_entry_is_byte_identical_to_fa4s_jit(ci_cache):
    """Every backward kernel of the CI cache (SM90 and SM100 main kernels, preprocess and
    postprocess) compiled through FA4's _flash_attn_bwd: byte-identical cubins."""
    from fa4aot.tools.against_fa4 import compare

    cache = Cache(ci_cache)
    entries = [e for e in cache.entries() if e.variant.family.startswith("bwd_")]
    results = compare(cache, entries)
    assert {r.status for r in results} == {"identical"}, [
        (r.entry.variant.label(), r.status, r.detail) for r in results
    ]
    assert {(r.entry.variant.family, r.entry.target.arch) for r in results} >= {
        ("bwd_sm90", "sm_90a"), ("bwd_pre", "sm_90a"), ("bwd_post", "sm_90a"),
        ("bwd_sm100", "sm_100a"), ("bwd_pre", "sm_100a"), ("bwd_post", "sm_100a"),
    }  # fmt: skip


def test_runtime_never_imports_build_or_torch_for_backward():
    assert_imports_none_of(
        "import fa4aot; fa4aot.flash_attn_backward; import fa4aot.runtime.backward",
        ("torch", "cutlass", "flash_attn", "tvm_ffi"),
        ("fa4aot.compile", "fa4aot.tools"),
    )


# -- the PyTorch ops without a GPU (meta tensors: shapes and the autograd wiring) --------------------


def test_torch_ops_wire_autograd_on_meta_tensors():
    torch = pytest.importorskip("torch")
    import fa4aot.torch as ft

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=True)

    q, k, v = leaf(2, 100, 8, 128), leaf(2, 120, 2, 128), leaf(2, 120, 2, 64)
    out, lse = ft.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert out.shape == (2, 100, 8, 64) and lse.shape == (2, 8, 100) and lse.dtype == torch.float32
    (out.sum() + lse.sum()).backward()
    assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)
    out, lse = ft.flash_attn_func(q, k, v)
    assert lse is None
    # varlen with a learnable sink: the sink gets a gradient too
    sink = leaf(8, dtype=torch.float32)
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out, _ = ft.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=60,
                                       max_seqlen_k=60, learnable_sink=sink)  # fmt: skip
    assert out.shape == (100, 8, 64)
    out.sum().backward()
    assert sink.grad.shape == (8,)


def test_torch_api_refuses_what_fa4aot_does_not_build():
    torch = pytest.importorskip("torch")
    import fa4aot.torch as ft

    q = torch.empty(1, 8, 2, 64, device="meta", dtype=torch.bfloat16)
    for kw, name in ((dict(qv=q), "qv"), (dict(score_mod=abs), "score_mod")):
        with pytest.raises(ArgumentError, match=name):
            ft.flash_attn_func(q, q, q, **kw)
    with pytest.raises(ArgumentError, match="page_table"):
        ft.flash_attn_varlen_func(q[0], q[0], q[0], page_table=torch.empty(1, 1, dtype=torch.int32))


def test_fa4aot_torch_imports_no_build_stack():
    pytest.importorskip("torch")
    assert_imports_none_of(
        "import fa4aot.torch", ("cutlass", "flash_attn", "tvm_ffi"), ("fa4aot.compile", "fa4aot.tools")
    )


def test_check_plans_runs_every_backward_plan(built_cache):
    """FA4's host code of every backward kernel in the CI cache on random calls: block, smem,
    cluster and the grid against FA4's scheduler formulas (the backward home's backward_grid)."""
    from fa4aot.core.families import BACKWARD, of_stage
    from fa4aot.tools.plancheck import check_cache

    reports = check_cache(Cache(built_cache), 25, families=of_stage(BACKWARD))
    assert {(r.entry.variant.family, r.entry.target.arch) for r in reports} >= {
        ("bwd_sm90", "sm_90a"), ("bwd_pre", "sm_90a"), ("bwd_post", "sm_90a"), ("bwd_sm100", "sm_100a"),
    }  # fmt: skip
    assert all(r.runs == 25 for r in reports)
    assert not [p for r in reports for p in r.problems]


def test_deterministic_backward_zeroes_its_semaphores(sm90):
    rt, drv = sm90
    a = _args(2, 1000, 16, 4, 128)
    _bwd(rt, a, causal=True, deterministic=True, stream=3)
    main = drv.launches[1]
    # FA4's deterministic scheduler (SingleTileLPTBwdScheduler): one flat grid of blocks * heads * batch
    assert main.grid == (8 * 16 * 2, 1, 1)
    # zeroed before the kernels, in one memset: the dK/dV accumulators, then the dQ semaphore
    # (batch, heads, 64-row Q blocks, 1) and the dK/dV ones (batch, kv heads, K blocks, 2)
    ((_, value, words, stream),) = drv.memsets
    assert (value, stream) == (0, 3)
    assert words == 2 * (2 * 4 * 1024 * 128) + 2 * 16 * 16 * 1 + 2 * (2 * 4 * 8 * 2)


def test_backward_plan_check_catches_a_wrong_grid(built_cache, monkeypatch):
    """The backward grid check can fail: with a wrong oracle it reports every call."""
    from fa4aot.core.families import FAMILIES
    from fa4aot.tools import plancheck

    wrong = dataclasses.replace(FAMILIES["bwd_sm90"], grid=lambda f, sizes, num_sms: (1, 1, 1))
    monkeypatch.setitem(FAMILIES, "bwd_sm90", wrong)
    cache = Cache(built_cache)
    e = next(e for e in cache.entries() if e.variant.family == "bwd_sm90")
    assert len(plancheck.check_entry(cache, e, n=5).problems) == 5


def test_a_backward_miss_is_logged_as_its_group_and_from_misses_asks_for_every_kernel(built_cache, tmp_path):
    from helpers import run_cli

    from fa4aot.compile import manifest

    log = tmp_path / "miss.jsonl"
    rt = Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=132), miss_log=log)
    with pytest.raises(VariantNotFoundError):
        _bwd(rt, _args(2, 100, 8, 2, 64), causal=True)
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert "families.bwd_sm90" in line["manifest"]
    out = tmp_path / "m.yaml"
    run_cli("manifest", "from-misses", str(log), "-o", str(out))
    want = {
        rt.variant_for(p.family, **p.field_dict).variant_id
        for p in parts("bwd_sm90", call(head_dim=64, head_dim_v=64, qhead_per_kvhead=4, causal=True))
    }
    assert {pv.variant.variant_id for pv in manifest.load(out).variants} == want


def test_prepared_backward_launches_what_the_call_launches(sm90):
    """fa4aot.prepare_backward: the launches and the zeroing of the plain backward (same kernels,
    grids, blocks, streams; GQA's accumulators zeroed first), with new addresses followed, the
    scratch owned by the call (nothing allocated per call), other shapes refused before launching."""
    rt, drv = sm90
    a = _args(2, 1000, 16, 4, 128)
    _bwd(rt, a, causal=True, stream=7)
    plain, plain_memsets = list(drv.launches), [m[1:] for m in drv.memsets]
    drv.launches.clear(), drv.memsets.clear()
    order = ("dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv")
    n_allocs = len(drv.allocs)
    run = fa4aot.prepare_backward(*(a[n] for n in order), causal=True, runtime=rt)
    assert run.arg_names == order and [v.family for v in run.variants][:2] == ["bwd_pre", "bwd_sm90"]
    assert len(drv.allocs) == n_allocs + 1 and not drv.launches  # its scratch; nothing launched yet
    run(*(a[n] for n in order), stream=7)
    key = [(x.kernel, x.grid, x.block, x.stream) for x in plain]
    assert [(x.kernel, x.grid, x.block, x.stream) for x in drv.launches] == key
    assert [m[1:] for m in drv.memsets] == plain_memsets  # the dK/dV accumulators, zeroed per call
    b2 = dict(a, q=t(20, a["q"].shape), dq=t(21, a["dq"].shape))
    run(*(b2[n] for n in order), stream=8)
    assert len(drv.allocs) == n_allocs + 1 and [x.stream for x in drv.launches[len(key) :]] == [8] * len(key)
    launches = len(drv.launches)
    with pytest.raises(ArgumentError, match="q: shape"):
        run(*(dict(a, q=t(20, (2, 999, 16, 128)))[n] for n in order))
    assert len(drv.launches) == launches
    with pytest.raises(TypeError, match="learnable_sink"):  # not prepared: FA4 allocates dsink per call
        fa4aot.prepare_backward(*(a[n] for n in order), learnable_sink=t(10, (16,)), runtime=rt)
    run.close()
    assert len(drv.allocs) == n_allocs
