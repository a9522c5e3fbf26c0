"""Dispatch picks the variant FA4 itself would run. The oracle is FA4: its interface runs in
torch fake-tensor mode on the CPU, and the forward kernel's constructor is intercepted to read
the decisions (tile, q_stage, 2-CTA, scheduler, split, S ping-pong, ...) it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import needs_dsl

from fa4aot.runtime.dispatch import Call, decide, resolve_window

ORACLE = r"""
import json, os, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
arch = os.environ["FLASH_ATTENTION_ARCH"]
cls = I.FlashAttentionForwardSm100 if arch == "sm_100a" else I.FlashAttentionForwardSm90
class Stop(Exception):
    pass
seen = {}
OWN = ("intra_wg_overlap", "mma_pv_is_rs", "paged_kv_non_tma")  # SM90's own; the rest go to its base
def spy(self, *args, **kw):
    import inspect
    if arch == "sm_100a":
        bound = inspect.signature(orig).bind(self, *args, **kw)
    else:
        seen.update({k: kw.pop(k) for k in OWN if k in kw})
        bound = inspect.signature(cls.__mro__[1].__init__).bind(self, *args, **kw)
    bound.apply_defaults()
    seen.update({k: v for k, v in bound.arguments.items() if k != "self"})
    raise Stop()
orig = cls.__init__
cls.__init__ = spy
out = []
for case in json.loads(sys.argv[1]):
    seen.clear()
    dt = torch.bfloat16
    with FakeTensorMode():
        b, sq, sk, h, hk, d, dv = (case[k] for k in ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "head_dim", "head_dim_v"))
        kw = {}
        if case.get("varlen"):
            q = torch.empty(case["total_q"], h, d, dtype=dt, device="cuda")
            k = torch.empty(case["total_k"], hk, d, dtype=dt, device="cuda")
            v = torch.empty(case["total_k"], hk, dv, dtype=dt, device="cuda")
            kw.update(cu_seqlens_q=torch.empty(b + 1, dtype=torch.int32, device="cuda"),
                      cu_seqlens_k=torch.empty(b + 1, dtype=torch.int32, device="cuda"),
                      max_seqlen_q=sq, max_seqlen_k=sk)
        else:
            q = torch.empty(b, sq, h, d, dtype=dt, device="cuda")
            k = torch.empty(b, sk, hk, d, dtype=dt, device="cuda")
            v = torch.empty(b, sk, hk, dv, dtype=dt, device="cuda")
        if case.get("seqused_k"):
            kw["seqused_k"] = torch.empty(b, dtype=torch.int32, device="cuda")
        try:
            I._flash_attn_fwd(q, k, v, causal=case.get("causal", False), window_size_left=case.get("wl"),
                              window_size_right=case.get("wr"), num_splits=case.get("num_splits", 1),
                              pack_gqa=case.get("pack_gqa"), return_lse=case.get("return_lse", False), **kw)
        except Stop:
            pass
    out.append({k: (v if isinstance(v, (int, bool, type(None))) else str(v)) for k, v in seen.items()})
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


def _oracle(arch: str, num_sms: int, cases: list[dict]) -> list[dict]:
    env = dict(
        os.environ,
        FLASH_ATTENTION_ARCH=arch,
        CUTE_DSL_ARCH=arch,
        FLASH_ATTENTION_NUM_SMS=str(num_sms),
        CUTE_DSL_LOG_LEVEL="0",
    )
    proc = subprocess.run(
        [sys.executable, "-c", ORACLE, json.dumps(cases)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _call(arch: str, num_sms: int, case: dict) -> Call:
    return Call(
        arch,
        num_sms,
        "bf16",
        case["batch"],
        case["seqlen_q"],
        case["seqlen_k"],
        case["nheads"],
        case["nheads_kv"],
        case["head_dim"],
        case["head_dim_v"],
        case.get("causal", False),
        case.get("wl"),
        case.get("wr"),
        case.get("varlen", False),
        case.get("varlen", False),
        False,
        case.get("seqused_k", False),
        case.get("num_splits", 1),
        case.get("pack_gqa"),
        case.get("return_lse", False),
        False,
    )


@needs_dsl
def test_sm100_dispatch_matches_fa4():
    from fa4aot_kernels.fwd_sm100 import constructor_kwargs

    got = _oracle("sm_100a", 148, SM100_CASES)
    for case, fa4 in zip(SM100_CASES, got):
        d = decide(_call("sm_100a", 148, case))
        ours = constructor_kwargs(d.fields)
        for key in (
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
        ):
            assert ours[key] == fa4[key], f"{case}: {key} ours={ours[key]} FA4={fa4[key]}"
        if not ours["has_tile_count_semaphore"]:  # the dynamic scheduler overrides static persistence
            assert ours["is_static_persistent"] == fa4["is_static_persistent"], case


@needs_dsl
def test_sm90_dispatch_matches_fa4():
    from fa4aot_kernels.fwd_sm90 import constructor_kwargs

    got = _oracle("sm_90a", 132, SM90_CASES)
    for case, fa4 in zip(SM90_CASES, got):
        ours = constructor_kwargs(decide(_call("sm_90a", 132, case)).fields)
        for key in (
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
        ):
            assert ours[key] == fa4[key], f"{case}: {key} ours={ours[key]} FA4={fa4[key]}"
        assert str(ours["dtype"]) == fa4["dtype"]


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
