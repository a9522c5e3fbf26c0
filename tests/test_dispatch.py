"""Dispatch picks the kernels FA4 itself would compile. The oracle is FA4: its interface runs in
torch fake-tensor mode on the CPU under ``interface._compile_misses`` (FA4's own probe), which
records the compile key of every kernel a call needs - forward, split-KV combine, scheduler
prepare - without compiling. fa4aot's decision for the same call (FA4's selector from its
config.py, plus the interface glue fa4aot restates) must predict each of those keys
(:mod:`fa4aot.tools.fa4_keys`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from helpers import needs_dsl

import fa4aot
from fa4aot.core import selector
from fa4aot.core.fa4_interface import resolve_window
from fa4aot.core.targets import ARCHES as TARGET_ARCHES
from fa4aot.core.variant import FORWARD_FAMILY, Variant
from fa4aot.tools import fa4_keys, fa4_parity
from fa4aot.tools.fa4_calls import decide, facts

TESTS = os.path.dirname(os.path.abspath(__file__))

SM100_CASES = [
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=4, seqlen_q=200, seqlen_k=900, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=3, seqlen_q=200, seqlen_k=900, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128),
    dict(batch=64, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         seqused_k=True),
    dict(batch=8, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         seqused_k=True, num_splits=8),
    dict(batch=1, seqlen_q=1, seqlen_k=32768, nheads=8, nheads_kv=1, head_dim=128, head_dim_v=128, causal=True,
         num_splits=0),
    dict(batch=5, seqlen_q=3000, seqlen_k=3000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True,
         varlen=True, total_q=9000, total_k=9000),
    dict(batch=300, seqlen_q=100, seqlen_k=4000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         varlen=True, total_q=20000, total_k=600000),
    dict(batch=16, seqlen_q=1, seqlen_k=4000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         varlen=True, total_q=16, total_k=40000, num_splits=8),
    dict(batch=16, seqlen_q=300, seqlen_k=9000, nheads=32, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True,
         varlen=True, total_q=2000, total_k=90000, num_splits=16),
    dict(batch=2, seqlen_q=4096, seqlen_k=4096, nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128),
    dict(batch=2, seqlen_q=4096, seqlen_k=4096, nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128, causal=True),
    dict(batch=2, seqlen_q=512, seqlen_k=512, nheads=8, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True),
    dict(batch=2, seqlen_q=100, seqlen_k=1000, nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, wl=256, wr=0),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, return_lse=True),
    dict(batch=2, seqlen_q=64, seqlen_k=65536, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, num_splits=4),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=12, nheads_kv=4, head_dim=128, head_dim_v=128),
]  # fmt: skip

SM90_CASES = [
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=96, head_dim_v=96),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=96, head_dim_v=96, causal=True),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=256, head_dim_v=256, wl=64, wr=64),
    dict(batch=4, seqlen_q=700, seqlen_k=900, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         varlen=True, total_q=2000, total_k=3000),
    dict(batch=8, seqlen_q=1, seqlen_k=4096, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         seqused_k=True),
]  # fmt: skip


#: Serving-engine calls: paged KV (TMA when the page size is tile_n, cp.async otherwise), vLLM's
#: pattern (cu_seqlens_q + seqused_k + page_table), learnable sinks with and without a window,
#: softcap (the SM100 and SM90 lists both get them).
ENGINE_CASES = [
    dict(batch=64, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, seqused_k=True, page_size=128),
    dict(batch=64, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, seqused_k=True, page_size=16),
    dict(batch=8, seqlen_q=1, seqlen_k=30000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, seqused_k=True, page_size=128, num_splits=0),
    dict(batch=8, seqlen_q=1, seqlen_k=30000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, seqused_k=True, page_size=64, num_splits=0, num_pages=5000),
    dict(batch=12, seqlen_q=700, seqlen_k=4000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, varlen_q=True, total_q=3000, seqused_k=True, page_size=128),
    dict(batch=12, seqlen_q=700, seqlen_k=4000, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, varlen_q=True, total_q=3000, seqused_k=True, page_size=16, return_lse=True),
    dict(batch=4, seqlen_q=300, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128,
         page_size=32),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64,
         causal=True, wl=128, wr=0, learnable_sink="bf16"),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64,
         causal=True, learnable_sink="fp32"),
    dict(batch=3, seqlen_q=500, seqlen_k=1500, nheads=16, nheads_kv=2, head_dim=64, head_dim_v=64,
         varlen=True, total_q=1200, total_k=3000, wl=128, wr=0, learnable_sink="fp16"),
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, softcap=50.0),
    dict(batch=2, seqlen_q=1, seqlen_k=4096, nheads=16, nheads_kv=8, head_dim=128, head_dim_v=128,
         causal=True, softcap=30.0, seqused_k=True, page_size=16),
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=8, nheads_kv=8, head_dim=64, head_dim_v=64,
         softcap=50.0, learnable_sink="bf16", wl=256, wr=256),
]  # fmt: skip


#: Decode calls (one query per sequence): FA4's SwapAB kernel where it admits them (and its
#: per-sequence split counts from the prepare kernel for long seqused_k capacities), the standard
#: kernel where FA4 measured SwapAB slower (many short sequences) or cannot run it.
DECODE_CASES = [
    dict(batch=8, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, seqused_k=True),
    dict(batch=64, seqlen_q=1, seqlen_k=32768, nheads=64, nheads_kv=8, head_dim=128, head_dim_v=128,
         seqused_k=True, num_splits=0),
    dict(batch=4, seqlen_q=1, seqlen_k=65536, nheads=32, nheads_kv=4, head_dim=64, head_dim_v=64, num_splits=0,
         page_size=128, seqused_k=True),
    dict(batch=16, seqlen_q=1, seqlen_k=40000, nheads=16, nheads_kv=2, head_dim=256, head_dim_v=256,
         num_splits=0, seqused_k=True),
    dict(batch=8, seqlen_q=1, seqlen_k=4096, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, varlen_q=True,
         total_q=8, seqused_k=True, page_size=256, num_splits=0, causal=True),
    dict(batch=256, seqlen_q=1, seqlen_k=512, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, seqused_k=True),
    dict(batch=2, seqlen_q=1, seqlen_k=2048, nheads=64, nheads_kv=1, head_dim=128, head_dim_v=128, num_splits=4),
    dict(batch=3, seqlen_q=1, seqlen_k=3000, nheads=24, nheads_kv=4, head_dim=96, head_dim_v=96, causal=True,
         return_lse=True),
]  # fmt: skip


#: FA4's FP8 forward (TensorwiseScales in every layout fa4aot builds, SwapAB-shaped decode, split
#: KV) and MXFP8 (QK and native PV, and the shapes it refuses); SM90 and SM120 refuse them all.
FP8_CASES = [
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True,
         dtype="e4m3", descales="full,full,full"),
    dict(batch=3, seqlen_q=700, seqlen_k=3000, nheads=8, nheads_kv=2, head_dim=64, head_dim_v=64, dtype="e5m2",
         descales="per_head,full,none", varlen=True, total_q=1500, total_k=7000),
    dict(batch=8, seqlen_q=1, seqlen_k=8192, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, seqused_k=True,
         dtype="e4m3", descales="full,full,full", num_splits=0),
    dict(batch=2, seqlen_q=512, seqlen_k=2048, nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128,
         dtype="e4m3"),
    dict(batch=2, seqlen_q=1, seqlen_k=4096, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, page_size=128,
         seqused_k=True, dtype="e4m3", descales="none,none,per_head"),
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True,
         dtype="e4m3", mxfp8="qk"),
    dict(batch=2, seqlen_q=1024, seqlen_k=2048, nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64, dtype="e4m3",
         mxfp8="pv"),
    dict(batch=2, seqlen_q=1024, seqlen_k=2048, nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64, dtype="e4m3",
         mxfp8="pv", causal=True),
    dict(batch=2, seqlen_q=256, seqlen_k=256, nheads=8, nheads_kv=8, head_dim=96, head_dim_v=96, dtype="e4m3",
         mxfp8="qk"),
]  # fmt: skip


def _parity(arch: str, num_sms: int, cases: list[dict]) -> None:
    bad = fa4_parity.parity(arch, num_sms, cases, pythonpath=TESTS)
    assert not bad, f"{len(bad)} of {len(cases)} calls differ from FA4, e.g. {bad[:2]}"


@needs_dsl
def test_sm100_dispatch_matches_fa4():
    _parity("sm_100a", 148, SM100_CASES + ENGINE_CASES + DECODE_CASES + FP8_CASES)


@needs_dsl
def test_sm90_dispatch_matches_fa4():
    _parity("sm_90a", 132, SM90_CASES + [c for c in ENGINE_CASES if "num_splits" not in c] + FP8_CASES[:2])


@pytest.mark.slow  # the fast tier's fixed sample covers sm_103a too
@needs_dsl
def test_sm103_dispatch_matches_fa4():
    """B300 (sm_103a) takes FA4's SM100 path with its own SM count (148 on B300)."""
    _parity("sm_103a", 148, SM100_CASES + ENGINE_CASES + DECODE_CASES + FP8_CASES)


#: SM120 calls: the SM90 and serving lists (FA4 refuses page tables and split-KV there: both must
#: refuse them), head dims across its two tilings and the edges of what it takes.
SM120_CASES = SM90_CASES + ENGINE_CASES + FP8_CASES[:2] + [
    dict(batch=3, seqlen_q=333, seqlen_k=777, nheads=8, nheads_kv=2, head_dim=32, head_dim_v=32, causal=True),
    dict(batch=2, seqlen_q=100, seqlen_k=500, nheads=6, nheads_kv=6, head_dim=192, head_dim_v=192, wl=64, wr=0),
    dict(batch=2, seqlen_q=1, seqlen_k=4096, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, num_splits=0,
         seqused_k=True, causal=True),
    dict(batch=2, seqlen_q=512, seqlen_k=512, nheads=16, nheads_kv=4, head_dim=80, head_dim_v=80, pack_gqa=False,
         dtype="fp16", return_lse=True),
    dict(batch=2, seqlen_q=64, seqlen_k=64, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, num_splits=4),
    dict(batch=2, seqlen_q=64, seqlen_k=64, nheads=8, nheads_kv=8, head_dim=256, head_dim_v=256),
    dict(batch=2, seqlen_q=64, seqlen_k=64, nheads=8, nheads_kv=8, head_dim=100, head_dim_v=100),
]  # fmt: skip


@needs_dsl
def test_sm120_dispatch_matches_fa4():
    _parity("sm_120a", 188, SM120_CASES)


COMPILE = r"""
import json, os, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
from fa4aot.tools.fa4_calls import fa4_forward
out = []
for case in json.loads(sys.stdin.read()):
    try:
        with FakeTensorMode():
            fa4_forward(I, torch, case)  # compiles (fake tensors launch nothing)
        out.append(None)
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}"[:300])
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_dsl
def test_what_fa4aot_refuses_on_sm120_fa4s_kernel_cannot_run():
    """The SM120 calls fa4aot refuses although FA4's interface accepts them: a sink fails FA4's
    own compile; the others fail its kernel's ``can_implement`` (head dims, shared memory)."""
    import cutlass
    from flash_attn.cute.flash_fwd_sm120 import FlashAttentionForwardSm120

    from fa4aot.core.fa4_interface import SM120_STAGES, SM120_THREADS

    refused = [
        c
        for c in SM120_CASES
        if isinstance(p := fa4_parity.predicted("sm_120a", 188, c), str) and fa4_parity.SM120_KERNEL_REFUSALS.search(p)
    ]
    sinks = [c for c in refused if c.get("learnable_sink")]
    others = [c for c in refused if not c.get("learnable_sink")]
    assert sinks and len(others) >= 2, refused
    for c in others:
        tile_m, tile_n = (128, 128) if c["head_dim"] <= 64 else (128, 64)  # FA4's SM120 tiles (config.py 687)
        ok = FlashAttentionForwardSm120.can_implement(cutlass.BFloat16, c["head_dim"], c["head_dim_v"], tile_m, tile_n,
                                                      SM120_STAGES, SM120_THREADS, c.get("causal", False))  # fmt: skip
        assert not ok, c
    env = dict(os.environ, FLASH_ATTENTION_ARCH="sm_120a", CUTE_DSL_ARCH="sm_120a", FLASH_ATTENTION_NUM_SMS="188",
               CUTE_DSL_LOG_LEVEL="0", PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    served = dict(batch=2, seqlen_q=64, seqlen_k=64, nheads=8, nheads_kv=8, head_dim=64, head_dim_v=64)
    proc = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps([sinks[0], served]), capture_output=True,
                          text=True, env=env, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    sink_error, ok = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sink_error and "sink" in sink_error, sink_error
    assert ok is None, ok


@pytest.mark.parametrize("page_size, num_splits, why", [(16, 1, "paged KV"), (None, 4, "num_splits=1")])
def test_sm120_refusals_are_typed_errors(page_size, num_splits, why):
    """What FA4 refuses on SM120 (the parity test checks FA4 refuses these too) reaches the
    caller as fa4aot's ArgumentError with FA4's reason."""
    from fa4aot.runtime.dispatch import ForwardRule, Shape, StaticCall

    s = StaticCall("sm_120a", 188, "bf16", 128, 128, 8, 8, False, paged=page_size is not None)
    shape = Shape(2, 128, 128, 128, 128, 64, 64, None, None, page_size, num_splits)
    with pytest.raises(fa4aot.ArgumentError, match=why):
        ForwardRule(s, selector.installed(), fa4aot.core.fa4_interface.NO_KNOBS).decision(shape)


def _fa4aot_call(rt, case, missing: list | None = None) -> Variant | str:
    """Run the case through the real API (fake driver): the forward variant the runtime picked, or
    why it refused the call; a variant the cache lacks is also appended to ``missing``."""
    from fa4aot.core.errors import Fa4aotError, VariantNotFoundError
    from fa4aot.core.fa4_interface import mxfp8_scale_count, out_dtype
    from fa4aot.runtime import forward as fwd_mod
    from fa4aot.runtime.tensors import RawTensor

    dt = case.get("dtype", "bf16")
    vdt = "bf16" if case.get("mxfp8") == "qk" else dt
    odt = out_dtype(dt, case.get("mxfp8"))

    def raw(i, shape, dtype=dt, strides=None):
        return RawTensor(0x7F40_0000_0000 + i * (1 << 40), shape, dtype, strides)

    b, h, hk, d, dv = (case[k] for k in ("batch", "nheads", "nheads_kv", "head_dim", "head_dim_v"))
    sq, sk = case["seqlen_q"], case["seqlen_k"]
    kw = dict(
        causal=case.get("causal", False),
        window_size=(case.get("wl"), case.get("wr")),
        num_splits=case.get("num_splits", 1),
        softcap=case.get("softcap", 0.0),
        runtime=rt,
    )
    if case.get("varlen") or case.get("varlen_q"):
        tq = case["total_q"]
        q, o = raw(0, (tq, h, d)), raw(3, (tq, h, dv), odt)
        kw.update(cu_seqlens_q=raw(4, (b + 1,), "int32"), max_seqlen_q=sq)
    else:
        q, o = raw(0, (b, sq, h, d)), raw(3, (b, sq, h, dv), odt)
    if case.get("page_size"):
        ps = case["page_size"]
        pages = -(-sk // ps)
        k, v = raw(1, (b * pages, ps, hk, d)), raw(2, (b * pages, ps, hk, dv), vdt)
        kw.update(page_table=raw(7, (b, pages), "int32"), max_seqlen_k=sk)
    elif case.get("varlen"):
        tk = case["total_k"]
        k, v = raw(1, (tk, hk, d)), raw(2, (tk, hk, dv), vdt)
        kw.update(cu_seqlens_k=raw(5, (b + 1,), "int32"), max_seqlen_k=sk)
    else:
        k, v = raw(1, (b, sk, hk, d)), raw(2, (b, sk, hk, dv), vdt)
    if case.get("descales"):  # FA4's TensorwiseScales: a per_head descale broadcast over the batch
        made = []
        for i, layout in enumerate(case["descales"].split(",")):
            strides = (0, 1) if layout == "per_head" else None
            made.append(None if layout == "none" else raw(10 + i, (b, hk), "fp32", strides))
        kw["scales"] = fa4aot.TensorwiseScales(*made)
    if case.get("mxfp8"):  # FA4's BlockScales: interleave_sf buffers
        sf_v = raw(15, (mxfp8_scale_count(b, hk, dv, sk),), "e8m0") if case["mxfp8"] == "pv" else None
        sf_q = raw(13, (mxfp8_scale_count(b, h, sq, d),), "e8m0")
        kw["scales"] = fa4aot.BlockScales(sf_q, raw(14, (mxfp8_scale_count(b, hk, sk, d),), "e8m0"), sf_v)
    if case.get("seqused_k"):
        kw["seqused_k"] = raw(6, (b,), "int32")
    if case.get("learnable_sink"):
        kw["learnable_sink"] = raw(8, (h,), case["learnable_sink"])
    if case.get("config"):
        kw["config"] = case["config"]  # FA4's FwdConfig fields (fa4aot takes them as a mapping)
    picked: list = []
    real = fwd_mod.analyse

    def spy(*args, **kwargs):
        fc = real(*args, **kwargs)
        picked.append(fc.lv.variant)
        return fc

    fwd_mod.analyse = spy
    try:
        fa4aot.flash_attn_varlen_func(q, k, v, out=o, **kw)
    except VariantNotFoundError as e:
        if missing is not None:
            missing.append(e.variant)
        return e.variant
    except Fa4aotError as e:
        if not picked:
            return f"{type(e).__name__}: {e}"
    finally:
        fwd_mod.analyse = real
    return picked[0]


def _calls_decide_like_fa4(cache, cases, on_call=None) -> int:
    """Run ``cases`` through the API (fake-driver runtimes over ``cache``): the forward kernel the
    runtime picks must be the one FA4 compiles for the call (its compile key), and a call FA4
    refuses must be refused. Returns how many calls launched (the rest pick variants ``cache``
    does not hold). ``on_call(i, runtimes)`` runs before call i."""
    from fake_driver import FakeDriver

    from fa4aot.runtime.loader import Runtime

    fa4 = {}
    for arch, sms in {(a, s) for a, s, _ in cases}:
        fa4[arch] = iter(fa4_parity.fa4_answers(arch, sms, [c for a, _, c in cases if a == arch], TESTS))
    cc = {a.name: a.compute_capability for a in TARGET_ARCHES.values()}
    runtimes = {
        a: Runtime(cache, driver=FakeDriver(cc=cc[a], num_sms=fa4_parity.ARCHES[a])) for a in {a for a, _, _ in cases}
    }
    bad = []
    launched = 0
    for i, (arch, _, case) in enumerate(cases):
        if on_call:
            on_call(i, runtimes)
        rt = runtimes[arch]
        got = _fa4aot_call(rt, case)
        launched += bool(rt.driver.launches)
        rt.driver.launches.clear()
        want = next(fa4[arch])
        if want["error"] is None and isinstance(got, str) and fa4_parity.SM120_KERNEL_REFUSALS.search(got):
            continue  # FA4's SM120 kernel cannot run it (test_what_fa4aot_refuses_on_sm120_...)
        if isinstance(got, str) or want["error"] is not None:
            if not (isinstance(got, str) and want["error"] is not None):
                bad.append(
                    (
                        arch,
                        case,
                        f"FA4: {want['error'] or 'runs it'}; fa4aot: {got if isinstance(got, str) else 'runs it'}",
                    )
                )
            continue
        problems = fa4_keys.differences(want["keys"]["fwd"][0], fa4_keys.fwd_key(got), fa4_keys.FWD_UNMODELED)
        if problems:
            bad.append((arch, case, problems[:3]))
    assert not bad, f"{len(bad)} of {len(cases)} calls differ from FA4, e.g. {bad[:3]}"
    return launched


@pytest.mark.slow  # 20 s: FA4's interface in fake mode over 5 arches (the fixed lists above run fast)
@needs_dsl
def test_a_fixed_sample_of_calls_decides_like_fa4(built_cache):
    """30 calls per arch with random batch and max_seqlen (a fixed seed) through the API: every
    forward kernel the runtime picks is the one FA4 compiles; the fast tier's cache holds the
    variants of the calls that launch."""
    launched = _calls_decide_like_fa4(built_cache, fa4_parity.sample_cases(30, seed=2026))
    assert launched >= 1, launched


@pytest.mark.slow
@needs_dsl
def test_ten_thousand_calls_per_arch_decide_like_fa4_with_flat_memory(ci_cache):
    """10,000 calls per arch (sm_100a, sm_103a, sm_90a, sm_120a; a third of them decode shapes)
    through the API: every forward kernel equals FA4's, and the runtime's memory and cache sizes
    stay flat once its configurations are known."""
    import gc
    import tracemalloc

    snap: dict = {}
    warm = 4000  # the first calls of each arch's 10,000 fill the rules' memos

    def at(i, runtimes):
        if i == warm:
            tracemalloc.start()
            gc.collect()  # failed calls leave exception/frame cycles for the collector
            snap["before"] = tracemalloc.take_snapshot()

    cases = fa4_parity.sample_cases(10_000)
    cases.sort(key=lambda c: c[0] != "sm_90a")  # the memory window covers SM90 calls (those launch here)
    launched = _calls_decide_like_fa4(ci_cache, cases, on_call=at)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert launched >= 500, launched  # the rest pick variants manifests/ci.yaml does not build
    mine = [tracemalloc.Filter(True, "*/fa4aot/*")]
    before = snap["before"]
    grown = sum(s.size_diff for s in after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename"))
    top = after.filter_traces(mine).compare_to(before.filter_traces(mine), "lineno")[:8]
    # bounded memos: a rule remembers at most MAX_RULE_SHAPES shapes, the runtime MAX_FORWARD_RULES rules
    assert grown < 4 * 1024 * 1024, f"fa4aot's own allocations grew by {grown} bytes: {top}"


@pytest.mark.parametrize(
    "args, want",
    [
        ((True, None, None), (True, False, None, None)),
        ((False, None, 0), (True, False, None, None)),
        ((False, 128, 0), (False, True, 128, 0)),
        ((True, 64, None), (False, True, 64, 0)),
        ((False, -1, -1), (False, False, None, None)),
    ],
)
def test_window_resolution(args, want):
    assert resolve_window(*args) == want


def test_a_miss_names_a_manifest_line_that_builds_the_variant():
    """For random calls, the manifest line a miss names (the call's features and shapes) expands
    through FA4's selector to a plan holding exactly the variant the call needs."""
    from fa4aot.compile import manifest
    from fa4aot.core.manifest_text import describe_missing

    rng = random.Random(7)
    checked = 0
    for arch, sms, case in rng.sample(fa4_parity.sample_cases(60, seed=11), 40):
        try:
            d = decide(arch, sms, case)
        except (fa4aot.ArgumentError, ValueError, AssertionError):
            continue
        v = Variant.make(FORWARD_FAMILY[arch], arch, sms, **d.fields)
        from fa4aot.core import fwd

        # as the runtime does (dispatch._pick): an explicit config= is part of the line
        line = describe_missing(
            v, fwd.call_group(facts(arch, sms, case), config=d.config if "config" in case else None)
        )
        group = line.split(": - ", 1)[1].rsplit("  (target", 1)[0]
        doc = (
            f"target: {{name: t, arch: {arch}, num_sms: {sms}}}\nfamilies:\n  {FORWARD_FAMILY[arch]}:\n    - {group}\n"
        )
        ids = {pv.variant.variant_id for pv in manifest.expand(manifest.parse_yaml(doc.encode())).variants}
        assert v.variant_id in ids, (case, line)
        checked += 1
    assert checked >= 20
