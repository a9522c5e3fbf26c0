"""Dispatch picks the variant FA4 itself would run. The oracle is FA4: its interface runs in
torch fake-tensor mode on the CPU, and the forward kernel's constructor is intercepted to read
the decisions (tile, q_stage, 2-CTA, scheduler, split, S ping-pong, ...) it made."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from fa4_cases import fa4aot_call
from helpers import needs_dsl

import fa4aot
from fa4aot.core.rules import resolve_window
from fa4aot.runtime.dispatch import decide

TESTS = os.path.dirname(os.path.abspath(__file__))

ORACLE = r"""
import json, os, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
from fa4_cases import fa4_forward
arch = os.environ["FLASH_ATTENTION_ARCH"]
sm100 = arch in ("sm_100a", "sm_103a")
cls = {"sm_90a": I.FlashAttentionForwardSm90, "sm_120a": I.FlashAttentionForwardSm120}.get(arch, I.FlashAttentionForwardSm100)
class Stop(Exception):
    pass
seen = {}
OWN = ("intra_wg_overlap", "mma_pv_is_rs", "paged_kv_non_tma")  # SM90's own; the rest go to its base
def spy(self, *args, **kw):
    import inspect
    if sm100:
        bound = inspect.signature(orig).bind(self, *args, **kw)
    else:
        seen.update({k: kw.pop(k) for k in OWN if k in kw})
        bound = inspect.signature(cls.__mro__[1].__init__).bind(self, *args, **kw)
    bound.apply_defaults()
    seen.update({k: v for k, v in bound.arguments.items() if k != "self"})
    raise Stop()
orig = cls.__init__
cls.__init__ = spy
make_softcap = I.utils.create_softcap_scoremod
def softcap_spy(value):
    seen["softcap_value"] = value  # the value FA4 bakes into the score_mod it compiles
    return make_softcap(value)
I.utils.create_softcap_scoremod = softcap_spy
out = []
for case in json.loads(sys.stdin.read()):
    seen.clear()
    with FakeTensorMode():
        try:
            fa4_forward(I, torch, case)
        except Stop:
            pass
    out.append({k: (v if isinstance(v, (int, float, bool, type(None))) else str(v)) for k, v in seen.items()})
print(json.dumps(out))
"""

SM100_CASES = [
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=4, seqlen_q=200, seqlen_k=900, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=3, seqlen_q=200, seqlen_k=900, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128),
    dict(
        batch=64,
        seqlen_q=1,
        seqlen_k=8192,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        seqused_k=True,
    ),
    dict(
        batch=8,
        seqlen_q=1,
        seqlen_k=8192,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        seqused_k=True,
        num_splits=8,
    ),
    dict(
        batch=1,
        seqlen_q=1,
        seqlen_k=32768,
        nheads=8,
        nheads_kv=1,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        num_splits=0,
    ),
    dict(
        batch=5,
        seqlen_q=3000,
        seqlen_k=3000,
        nheads=16,
        nheads_kv=16,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        varlen=True,
        total_q=9000,
        total_k=9000,
    ),
    dict(
        batch=300,
        seqlen_q=100,
        seqlen_k=4000,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        varlen=True,
        total_q=20000,
        total_k=600000,
    ),
    dict(
        batch=16,
        seqlen_q=1,
        seqlen_k=4000,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        varlen=True,
        total_q=16,
        total_k=40000,
        num_splits=8,
    ),
    dict(
        batch=16,
        seqlen_q=300,
        seqlen_k=9000,
        nheads=32,
        nheads_kv=4,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        varlen=True,
        total_q=2000,
        total_k=90000,
        num_splits=16,
    ),
    dict(batch=2, seqlen_q=4096, seqlen_k=4096, nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128),
    dict(batch=2, seqlen_q=4096, seqlen_k=4096, nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128, causal=True),
    dict(batch=2, seqlen_q=512, seqlen_k=512, nheads=8, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True),
    dict(batch=2, seqlen_q=100, seqlen_k=1000, nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, wl=256, wr=0),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, return_lse=True),
    dict(batch=2, seqlen_q=64, seqlen_k=65536, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, num_splits=4),
    dict(batch=2, seqlen_q=2048, seqlen_k=2048, nheads=12, nheads_kv=4, head_dim=128, head_dim_v=128),
]

SM90_CASES = [
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128, causal=True),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=96, head_dim_v=96),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=96, head_dim_v=96, causal=True),
    dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=256, head_dim_v=256, wl=64, wr=64),
    dict(
        batch=4,
        seqlen_q=700,
        seqlen_k=900,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        varlen=True,
        total_q=2000,
        total_k=3000,
    ),
    dict(
        batch=8,
        seqlen_q=1,
        seqlen_k=4096,
        nheads=32,
        nheads_kv=8,
        head_dim=128,
        head_dim_v=128,
        causal=True,
        seqused_k=True,
    ),
]


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


def _oracle(arch: str, num_sms: int, cases: list[dict]) -> list[dict]:
    env = dict(
        os.environ,
        FLASH_ATTENTION_ARCH=arch,
        CUTE_DSL_ARCH=arch,
        FLASH_ATTENTION_NUM_SMS=str(num_sms),
        CUTE_DSL_LOG_LEVEL="0",
        PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", ORACLE], input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SM100_KEYS = (
    "head_dim",
    "head_dim_v",
    "qhead_per_kvhead",
    "is_causal",
    "is_local",
    "is_split_kv",
    "pack_gqa",
    "m_block_size",
    "n_block_size",
    "q_stage",
    "use_2cta_instrs",
    "use_clc_scheduler",
    "has_tile_count_semaphore",
    "use_s_ping_pong",
    "is_varlen_q",
    "paged_kv_non_tma",
)
SM90_KEYS = (
    "head_dim",
    "head_dim_v",
    "qhead_per_kvhead",
    "is_causal",
    "is_local",
    "pack_gqa",
    "tile_m",
    "tile_n",
    "num_stages",
    "num_threads",
    "intra_wg_overlap",
    "mma_pv_is_rs",
    "paged_kv_non_tma",
)


#: FA4's SM120 forward takes the SM80 base arguments: SM90's without its own three, plus Q_in_regs.
SM120_KEYS = SM90_KEYS[:10] + ("Q_in_regs",)


def _mismatches(arch: str, fields: dict, fa4: dict) -> list[str]:
    """Constructor arguments where fa4aot's variant fields and FA4's own choice differ."""
    if arch == "sm_120a":
        from fa4aot_kernels.fwd_sm120 import constructor_kwargs

        ours = constructor_kwargs(fields)
        bad = [k for k in SM120_KEYS if ours[k] != fa4[k]]
        if str(ours["dtype"]) != fa4["dtype"]:
            bad.append("dtype")
    elif arch in ("sm_100a", "sm_103a"):
        from fa4aot_kernels.fwd_sm100 import constructor_kwargs

        ours = constructor_kwargs(fields)
        bad = [k for k in SM100_KEYS if ours[k] != fa4[k]]
        # the dynamic scheduler overrides static persistence
        if not ours["has_tile_count_semaphore"] and ours["is_static_persistent"] != fa4["is_static_persistent"]:
            bad.append("is_static_persistent")
    else:
        from fa4aot_kernels.fwd_sm90 import constructor_kwargs

        ours = constructor_kwargs(fields)
        bad = [k for k in SM90_KEYS if ours[k] != fa4[k]]
        if str(ours["dtype"]) != fa4["dtype"]:
            bad.append("dtype")
    # a softcap is a score_mod compiled with its value
    if (ours["score_mod"] is None) != (fa4["score_mod"] is None):
        bad.append("score_mod")
    if fields["softcap"] != (fa4.get("softcap_value") or 0.0):
        bad.append("softcap")
    ours["softcap"] = fields["softcap"]
    fa4 = dict(fa4, softcap=fa4.get("softcap_value"))
    return [f"{k}: ours={ours.get(k)} FA4={fa4.get(k)}" for k in bad]


@needs_dsl
def test_sm100_dispatch_matches_fa4():
    cases = SM100_CASES + ENGINE_CASES
    got = _oracle("sm_100a", 148, cases)
    for case, fa4 in zip(cases, got):
        assert not _mismatches("sm_100a", decide(fa4aot_call("sm_100a", 148, case)).fields, fa4), case


@needs_dsl
def test_sm90_dispatch_matches_fa4():
    cases = SM90_CASES + [c for c in ENGINE_CASES if "num_splits" not in c]  # FA4 has no split-KV on SM90
    got = _oracle("sm_90a", 132, cases)
    for case, fa4 in zip(cases, got):
        assert not _mismatches("sm_90a", decide(fa4aot_call("sm_90a", 132, case)).fields, fa4), case


@needs_dsl
def test_sm103_dispatch_matches_fa4():
    """B300 (sm_103a) takes FA4's SM100 path with its own SM count (148 on B300)."""
    cases = SM100_CASES + ENGINE_CASES
    got = _oracle("sm_103a", 148, cases)
    for case, fa4 in zip(cases, got):
        assert not _mismatches("sm_103a", decide(fa4aot_call("sm_103a", 148, case)).fields, fa4), case


#: SM120 calls: FA4 runs them without a page table, split-KV or sinks; head dims across its two
#: tilings (<= 64: 128x128, else 128x64) up to the 99 KiB shared-memory limit (192).
SM120_CASES = [
    c
    for c in SM90_CASES + ENGINE_CASES
    if not (c.get("page_size") or c.get("learnable_sink") or c.get("num_splits", 1) != 1 or c["head_dim"] > 192)
] + [
    dict(batch=3, seqlen_q=333, seqlen_k=777, nheads=8, nheads_kv=2, head_dim=32, head_dim_v=32, causal=True),
    dict(batch=2, seqlen_q=100, seqlen_k=500, nheads=6, nheads_kv=6, head_dim=192, head_dim_v=192, wl=64, wr=0),
    dict(batch=2, seqlen_q=1, seqlen_k=4096, nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, num_splits=0,
         seqused_k=True, causal=True),
    dict(batch=2, seqlen_q=512, seqlen_k=512, nheads=16, nheads_kv=4, head_dim=80, head_dim_v=80, pack_gqa=False,
         dtype="fp16", return_lse=True),
]  # fmt: skip


@needs_dsl
def test_sm120_dispatch_matches_fa4():
    got = _oracle("sm_120a", 188, SM120_CASES)
    for case, fa4 in zip(SM120_CASES, got):
        assert not _mismatches("sm_120a", decide(fa4aot_call("sm_120a", 188, case)).fields, fa4), case


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(page_size=16), "paged KV"),
        (dict(learnable_sink="bf16"), "learnable_sink"),
        (dict(num_splits=4), "num_splits=1"),
        (dict(head_dim=256, head_dim_v=256), "shared memory"),
        (dict(head_dim=100, head_dim_v=100), "multiples of 8"),
    ],
)
def test_sm120_rejects_what_fa4_rejects_there(change, why):
    case = {**dict(batch=2, seqlen_q=64, seqlen_k=64, nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128), **change}
    with pytest.raises(fa4aot.ArgumentError, match=why):
        decide(fa4aot_call("sm_120a", 188, case))


#: Static configurations the 10,000-call test mixes (per call: random batch and max_seqlen_q/k).
SCALE_CONFIGS = [
    ("sm_100a", 148, dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, varlen=True)),
    ("sm_100a", 148, dict(nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128)),
    ("sm_100a", 148, dict(nheads=32, nheads_kv=4, head_dim=64, head_dim_v=64, causal=True, num_splits=0)),
    ("sm_100a", 148, dict(nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128, num_splits=0)),
    ("sm_100a", 148, dict(nheads=12, nheads_kv=4, head_dim=256, head_dim_v=256)),
    ("sm_100a", 148, dict(nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, wl=256, wr=0)),
    (
        "sm_100a",
        148,
        dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True, num_splits=0),
    ),
    (
        "sm_100a",
        148,
        dict(nheads=16, nheads_kv=2, head_dim=128, head_dim_v=128, causal=True, varlen=True, num_splits=0),
    ),
    ("sm_90a", 132, dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, varlen=True)),
    ("sm_90a", 132, dict(nheads=16, nheads_kv=16, head_dim=64, head_dim_v=64)),
    # configurations manifests/ci.yaml builds, so that many calls launch for real (fake driver)
    ("sm_90a", 132, dict(nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True)),
    ("sm_90a", 132, dict(nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128)),
    ("sm_100a", 148, dict(nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True)),
    # serving calls: a random page size per call (paged), vLLM's varlen-q pattern, sinks, softcap
    ("sm_100a", 148, dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True,
                          paged=True, num_splits=0)),
    ("sm_100a", 148, dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True,
                          paged=True, varlen_q=True)),
    ("sm_100a", 148, dict(nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True, wl=128, wr=0,
                          learnable_sink="bf16")),
    ("sm_100a", 148, dict(nheads=16, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, softcap=50.0)),
    ("sm_90a", 132, dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True,
                         paged=True, varlen_q=True)),
    ("sm_90a", 132, dict(nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True, wl=128, wr=0,
                         learnable_sink="fp32", softcap=30.0)),
]  # fmt: skip

#: Page sizes the 10,000-call test draws for paged configurations (TMA at tile_n, cp.async else).
PAGE_SIZES = (16, 32, 64, 128, 256)


def _scale_cases(n: int, seed: int = 1234) -> list[tuple[str, int, dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        arch, sms, static = rng.choice(SCALE_CONFIGS)
        batch = int(2 ** rng.uniform(0, 8))
        sq, sk = int(2 ** rng.uniform(0, 14)), int(2 ** rng.uniform(0, 15))
        case = dict(static, batch=batch, seqlen_q=sq, seqlen_k=sk)
        if case.pop("paged", False):
            case["page_size"] = rng.choice(PAGE_SIZES)
        if static.get("varlen") or static.get("varlen_q"):
            case.update(total_q=max(sq, batch), total_k=max(sk, batch))
        out.append((arch, sms, case))
    return out


def _fa4aot_call(rt, case, recorded):
    """Run the case through the real API (fake driver); record the forward variant it picked."""
    from fa4aot.core.errors import Fa4aotError, VariantNotFoundError
    from fa4aot.runtime.tensors import RawTensor

    def raw(i, shape, dtype="bf16"):
        return RawTensor(0x7F40_0000_0000 + i * (1 << 40), shape, dtype)

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
        q, o = raw(0, (tq, h, d)), raw(3, (tq, h, dv))
        kw.update(cu_seqlens_q=raw(4, (b + 1,), "int32"), max_seqlen_q=sq)
    else:
        q, o = raw(0, (b, sq, h, d)), raw(3, (b, sq, h, dv))
    if case.get("page_size"):
        ps = case["page_size"]
        pages = -(-sk // ps)
        k, v = raw(1, (b * pages, ps, hk, d)), raw(2, (b * pages, ps, hk, dv))
        kw.update(page_table=raw(7, (b, pages), "int32"), max_seqlen_k=sk)
    elif case.get("varlen"):
        tk = case["total_k"]
        k, v = raw(1, (tk, hk, d)), raw(2, (tk, hk, dv))
        kw.update(cu_seqlens_k=raw(5, (b + 1,), "int32"), max_seqlen_k=sk)
    else:
        k, v = raw(1, (b, sk, hk, d)), raw(2, (b, sk, hk, dv))
    if case.get("seqused_k"):
        kw["seqused_k"] = raw(6, (b,), "int32")
    if case.get("learnable_sink"):
        kw["learnable_sink"] = raw(8, (h,), case["learnable_sink"])
    try:
        fa4aot.flash_attn_varlen_func(q, k, v, out=o, **kw)
    except VariantNotFoundError as e:
        if not recorded:
            recorded.append(e.variant)
    except Fa4aotError:
        pass  # after dispatch: split-KV on raw pointers has no framework to allocate partials


def _calls_decide_like_fa4(cache, cases, on_call=None) -> int:
    """Run ``cases`` through the API (fake driver, sm_100a and sm_90a runtimes over ``cache``): every
    forward variant picked must be FA4's choice for the call. Returns how many calls launched (the
    rest pick variants ``cache`` does not hold). ``on_call(i, runtimes)`` runs before call i."""
    from fake_driver import FakeDriver

    from fa4aot.runtime import forward as fwd
    from fa4aot.runtime.loader import Runtime

    fa4 = {}
    for arch, sms in {(a, s) for a, s, _ in cases}:
        mine = [c for a, _, c in cases if a == arch]
        fa4[arch] = iter(_oracle(arch, sms, mine))
    runtimes = {
        "sm_100a": Runtime(cache, driver=FakeDriver(cc=(10, 0), num_sms=148)),
        "sm_90a": Runtime(cache, driver=FakeDriver(cc=(9, 0), num_sms=132)),
    }
    recorded: list = []
    real_analyse = fwd.analyse

    def spy(*args, **kw):
        fc = real_analyse(*args, **kw)
        recorded.append(fc.lv.variant)
        return fc

    bad = []
    launched = 0
    fwd.analyse = spy
    try:
        for i, (arch, _, case) in enumerate(cases):
            if on_call:
                on_call(i, runtimes)
            recorded.clear()
            rt = runtimes[arch]
            _fa4aot_call(rt, case, recorded)
            launched += bool(rt.driver.launches)
            rt.driver.launches.clear()
            assert len(recorded) == 1, case
            if problems := _mismatches(arch, recorded[0].fields, next(fa4[arch])):
                bad.append((case, problems))
    finally:
        fwd.analyse = real_analyse
    assert not bad, f"{len(bad)} of {len(cases)} decisions differ from FA4, e.g. {bad[:3]}"
    return launched


@needs_dsl
def test_a_fixed_sample_of_calls_decides_like_fa4(built_cache):
    """400 calls with random batch and max_seqlen (a fixed seed) through the API: every decision
    equals FA4's; the fast tier's cache holds the variants of the calls that launch."""
    launched = _calls_decide_like_fa4(built_cache, _scale_cases(400, seed=2026))
    assert launched >= 20, launched


@pytest.mark.slow
@needs_dsl
def test_ten_thousand_calls_decide_like_fa4_with_flat_memory(ci_cache):
    """10,000 calls with random batch and max_seqlen through the API: every decision equals FA4's,
    and the runtime's memory and cache sizes stay flat once its configurations are known."""
    import gc
    import tracemalloc

    snap: dict = {}

    def at(i, runtimes):
        if i == 1000:
            tracemalloc.start()
            gc.collect()  # failed calls leave exception/frame cycles for the collector
            snap["before"] = tracemalloc.take_snapshot()
            snap["runtimes"] = runtimes
            snap[1000] = {a: rt.cache_sizes() for a, rt in runtimes.items()}

    launched = _calls_decide_like_fa4(ci_cache, _scale_cases(10_000), on_call=at)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    runtimes = snap["runtimes"]
    assert launched >= 1500, launched  # the rest pick variants manifests/ci.yaml does not build
    mine = [tracemalloc.Filter(True, "*/fa4aot/*")]
    before = snap["before"]
    grown = sum(s.size_diff for s in after.filter_traces(mine).compare_to(before.filter_traces(mine), "filename"))
    top = after.filter_traces(mine).compare_to(before.filter_traces(mine), "lineno")[:8]
    assert grown < 64 * 1024, f"fa4aot's own allocations grew by {grown} bytes over 9,000 calls: {top}"
    n_static = {a: len({tuple(sorted(c.items())) for x, _, c in SCALE_CONFIGS if x == a}) for a in runtimes}
    for arch, rt in runtimes.items():
        sizes = rt.cache_sizes()
        assert sizes["forward_rules"] == n_static[arch]
        assert sizes["forward_rules"] == snap[1000][arch]["forward_rules"]
        assert sizes["forward_rule_variants"] <= 64 * sizes["forward_rules"]
        assert sizes["auto_metadata"] <= 16


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


def test_every_variant_dispatch_picks_is_one_a_manifest_can_build():
    """Over the 10,000 random calls and the engine cases, the family rules accept every variant
    dispatch picks: nothing FA4 runs is outside what a manifest can name."""
    from fa4aot.core.errors import ArgumentError
    from fa4aot.core.families import check_fwd_sm90, check_fwd_sm100

    cases = _scale_cases(10_000) + [("sm_100a", 148, c) for c in SM100_CASES + ENGINE_CASES]
    cases += [("sm_90a", 132, c) for c in SM90_CASES + ENGINE_CASES if "num_splits" not in c]
    bad = []
    for arch, sms, case in cases:
        try:
            fields = decide(fa4aot_call(arch, sms, case)).fields
        except ArgumentError:
            continue  # FA4 rejects it as well (e.g. split-KV on SM90)
        check = check_fwd_sm100 if arch == "sm_100a" else check_fwd_sm90
        if reason := check(fields):
            bad.append((case, reason))
    assert not bad, f"{len(bad)} picked variants fail the family rules, e.g. {bad[:3]}"
