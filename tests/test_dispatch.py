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
import re
import subprocess
import sys

import pytest
from helpers import needs_dsl

import fa4aot
from fa4aot.core import selector
from fa4aot.core.fa4_interface import resolve_window
from fa4aot.core.fwd import companions
from fa4aot.core.variant import FORWARD_FAMILY, Variant
from fa4aot.tools import fa4_keys
from fa4aot.tools.fa4_calls import decide, facts

TESTS = os.path.dirname(os.path.abspath(__file__))

ORACLE = r"""
import json, os, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
from fa4aot.tools.fa4_calls import fa4_forward
from fa4aot.tools.fa4_keys import KEYED, key_names, name_key, plain
names = key_names(open(I.__file__).read())
caches = {id(getattr(I, fn).compile_cache): (kind, names[fn]) for fn, kind in KEYED.items() if fn in names}
others = {id(f.compile_cache): n for n, f in vars(I).items() if hasattr(getattr(f, "compile_cache", None), "get")}
out = []
for case in json.loads(sys.stdin.read()):
    misses = set()
    token = I._compile_misses.set(misses)
    try:
        with FakeTensorMode():
            fa4_forward(I, torch, case)
        err = None
    except Exception as e:
        err = f"{type(e).__name__}: {e}"[:300]
    finally:
        I._compile_misses.reset(token)
    keys = {}
    for cache_id, key in misses:
        if cache_id not in caches:  # a kernel fa4aot does not model: listed by its function's name
            keys.setdefault(others.get(cache_id, "unknown"), []).append({"key": plain(key)})
            continue
        kind, kn = caches[cache_id]
        keys.setdefault(kind, []).append({k: plain(v) for k, v in name_key(kn, key).items()})
    out.append({"error": err, "keys": keys})
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
        [sys.executable, "-c", ORACLE], input=json.dumps(cases), capture_output=True, text=True, env=env, timeout=3000
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(arch: str, num_sms: int, case: dict) -> dict[str, list[dict]] | str:
    """The compile keys of the kernels fa4aot runs for ``case`` (forward, and the combine and
    prepare kernels its plan adds), as FA4 names them; or why fa4aot refuses the call."""
    try:
        d = decide(arch, num_sms, case)
    except (fa4aot.ArgumentError, ValueError, AssertionError) as e:
        return f"{type(e).__name__}: {e}"
    v = Variant.make(FORWARD_FAMILY[arch], arch, num_sms, **d.fields)
    keys = {"fwd": [fa4_keys.fwd_key(v)]}
    predict = {"combine": fa4_keys.combine_key, "prepare": fa4_keys.prepare_key}
    for family, fields in companions(selector.installed(), facts(arch, num_sms, case), d):
        keys.setdefault(family, []).append(predict[family](Variant.make(family, arch, num_sms, **fields)))
    return keys


#: FA4's batch-lookup aid (interface.py 1145-1185): above BIN_BATCH_SEARCH_THRESH varlen-Q batches
#: FA4 runs two small kernels (_compute_tile_cumsum, _compute_blocks_to_batch) and passes their
#: output to the forward; fa4aot runs the same forward kernel family without them (FA4's kernel
#: for smaller batches). The test pins exactly when FA4 adds it, so the deviation cannot grow.
AID = ("_compute_tile_cumsum", "_compute_blocks_to_batch")


def _without_batch_lookup_aid(case: dict, fa4: dict, bad: list[str]) -> dict:
    from fa4aot.core.fa4_interface import BIN_BATCH_SEARCH_THRESH

    keys = fa4["keys"]
    has_aid = any(k in keys for k in AID)
    fwd = keys.get("fwd", [{}])[0]
    expected = (
        bool(case.get("varlen") or case.get("varlen_q"))
        and case["batch"] > BIN_BATCH_SEARCH_THRESH
        and not fwd.get("tile_count_semaphore is not None", True)
        and not (fwd.get(fa4_keys.FWD_CONFIG) or {}).get("use_swapab")
    )
    if has_aid != expected:
        bad.append(f"batch-lookup aid: FA4 {has_aid}, expected {expected}")
    if not has_aid:
        return fa4
    fwd = dict(fwd, **{"cu_total_m_blocks is not None": False, "blocks_to_batch_idx is not None": False})
    return dict(fa4, keys={**{k: v for k, v in keys.items() if k not in AID}, "fwd": [fwd]})


def _mismatches(arch: str, num_sms: int, case: dict, fa4: dict) -> list[str]:
    """Where fa4aot's kernels for ``case`` differ from the ones FA4 compiles (FA4's answer
    ``fa4``: its error, or its named keys per kind)."""
    ours = predicted(arch, num_sms, case)
    if fa4["error"] is None and isinstance(ours, str) and arch == "sm_120a" and SM120_KERNEL_REFUSALS.search(ours):
        return []  # FA4 accepts it in fake mode but its SM120 kernel cannot compile it (see below)
    if fa4["error"] is not None or isinstance(ours, str):
        if fa4["error"] is not None and isinstance(ours, str):
            return []  # both refuse it
        return [f"FA4: {fa4['error'] or 'runs it'}; fa4aot: {ours if isinstance(ours, str) else 'runs it'}"]
    bad = []
    fa4 = _without_batch_lookup_aid(case, fa4, bad)
    for kind in sorted(set(fa4["keys"]) | set(ours)):
        got, want = fa4["keys"].get(kind, []), ours.get(kind, [])
        if len(got) != len(want):
            bad.append(f"{kind}: FA4 compiles {len(got)} kernel(s), fa4aot {len(want)}")
            continue
        unmodeled = fa4_keys.FWD_UNMODELED if kind == "fwd" else ()
        for g, w in zip(got, want):
            bad += [f"{kind} {x}" for x in fa4_keys.differences(g, w, unmodeled)]
    return bad


def _parity(arch: str, num_sms: int, cases: list[dict]) -> None:
    got = _oracle(arch, num_sms, cases)
    bad = [(case, m) for case, fa4 in zip(cases, got) if (m := _mismatches(arch, num_sms, case, fa4))]
    assert not bad, f"{len(bad)} of {len(cases)} calls differ from FA4, e.g. {bad[:2]}"


@needs_dsl
def test_sm100_dispatch_matches_fa4():
    _parity("sm_100a", 148, SM100_CASES + ENGINE_CASES + DECODE_CASES)


@needs_dsl
def test_sm90_dispatch_matches_fa4():
    _parity("sm_90a", 132, SM90_CASES + [c for c in ENGINE_CASES if "num_splits" not in c])


@needs_dsl
def test_sm103_dispatch_matches_fa4():
    """B300 (sm_103a) takes FA4's SM100 path with its own SM count (148 on B300)."""
    _parity("sm_103a", 148, SM100_CASES + ENGINE_CASES + DECODE_CASES)


#: SM120 calls: the SM90 and serving lists (FA4 refuses page tables and split-KV there: both must
#: refuse them), head dims across its two tilings and the edges of what it takes.
SM120_CASES = SM90_CASES + ENGINE_CASES + [
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


#: Refusals of calls FA4's interface accepts on SM120 that its kernel cannot run (FA4 does not
#: check ``can_implement`` there): proven against FA4 itself below.
SM120_KERNEL_REFUSALS = re.compile(
    r"SM120 forward \(its SM80 kernel\) takes no learnable sink|is not supported on SM120|FlashAttentionForwardSm120"
)


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
        c for c in SM120_CASES if isinstance(p := predicted("sm_120a", 188, c), str) and SM120_KERNEL_REFUSALS.search(p)
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
    from fa4aot.core import selector
    from fa4aot.runtime.dispatch import ForwardRule, Shape, StaticCall

    s = StaticCall("sm_120a", 188, "bf16", 128, 128, 8, 8, False, paged=page_size is not None)
    shape = Shape(2, 128, 128, 128, 128, 64, 64, None, None, page_size, num_splits)
    with pytest.raises(fa4aot.ArgumentError, match=why):
        ForwardRule(s, selector.installed(), fa4aot.core.fa4_interface.NO_KNOBS).decision(shape)


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


#: Per arch, the SM count and the static configurations the random calls mix (SM120 has no
#: page table, sink or split-KV in FA4).
ARCHES = {"sm_100a": 148, "sm_103a": 148, "sm_90a": 132, "sm_120a": 188}


def _configs(arch: str) -> list[dict]:
    if arch == "sm_120a":
        return [
            dict(c) for a, _, c in SCALE_CONFIGS if a == "sm_90a" and not (c.get("paged") or c.get("learnable_sink"))
        ]
    src = "sm_90a" if arch == "sm_90a" else "sm_100a"
    return [dict(c) for a, _, c in SCALE_CONFIGS if a == src]


def _scale_cases(n: int, seed: int = 1234, arches: tuple[str, ...] = tuple(ARCHES)) -> list[tuple[str, int, dict]]:
    """``n`` random calls per arch: random batch and max_seqlen_q/k, a third of them decode shapes
    (one query per sequence)."""
    rng = random.Random(seed)
    out = []
    for arch in arches:
        configs = _configs(arch)
        for _ in range(n):
            static = rng.choice(configs)
            batch = int(2 ** rng.uniform(0, 8))
            sq = 1 if rng.random() < 0.33 else int(2 ** rng.uniform(0, 14))
            sk = int(2 ** rng.uniform(0, 15))
            case = dict(static, batch=batch, seqlen_q=sq, seqlen_k=sk)
            if case.pop("paged", False):
                case["page_size"] = rng.choice(PAGE_SIZES)
            if static.get("varlen") or static.get("varlen_q"):
                case.update(total_q=max(sq, batch), total_k=max(sk, batch))
            if arch == "sm_90a" or arch == "sm_120a":
                case.pop("num_splits", None)  # FA4 has no split-KV there
            out.append((arch, ARCHES[arch], case))
    return out


def _fa4aot_call(rt, case, missing: list | None = None) -> Variant | str:
    """Run the case through the real API (fake driver): the forward variant the runtime picked, or
    why it refused the call; a variant the cache lacks is also appended to ``missing``."""
    from fa4aot.core.errors import Fa4aotError, VariantNotFoundError
    from fa4aot.runtime import forward as fwd_mod
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
        fa4[arch] = iter(_oracle(arch, sms, [c for a, _, c in cases if a == arch]))
    cc = {"sm_100a": (10, 0), "sm_103a": (10, 3), "sm_90a": (9, 0), "sm_120a": (12, 0)}
    runtimes = {a: Runtime(cache, driver=FakeDriver(cc=cc[a], num_sms=ARCHES[a])) for a in {a for a, _, _ in cases}}
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


@needs_dsl
def test_a_fixed_sample_of_calls_decides_like_fa4(built_cache):
    """100 calls per arch with random batch and max_seqlen (a fixed seed) through the API: every
    forward kernel the runtime picks is the one FA4 compiles; the fast tier's cache holds the
    variants of the calls that launch."""
    launched = _calls_decide_like_fa4(built_cache, _scale_cases(100, seed=2026))
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

    cases = _scale_cases(10_000)
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
    from fa4aot.build import manifest
    from fa4aot.core.families import describe_missing
    from fa4aot.tools.fa4_calls import facts

    rng = random.Random(7)
    checked = 0
    for arch, sms, case in rng.sample(_scale_cases(60, seed=11), 40):
        try:
            d = decide(arch, sms, case)
        except (fa4aot.ArgumentError, ValueError, AssertionError):
            continue
        v = Variant.make(FORWARD_FAMILY[arch], arch, sms, **d.fields)
        from fa4aot.core import fwd

        line = describe_missing(v, fwd.call_group(facts(arch, sms, case)))
        group = line.split(": - ", 1)[1].rsplit("  (target", 1)[0]
        doc = (
            f"target: {{name: t, arch: {arch}, num_sms: {sms}}}\nfamilies:\n  {FORWARD_FAMILY[arch]}:\n    - {group}\n"
        )
        ids = {pv.variant.variant_id for pv in manifest.expand(manifest.parse_yaml(doc.encode())).variants}
        assert v.variant_id in ids, (case, line)
        checked += 1
    assert checked >= 20
