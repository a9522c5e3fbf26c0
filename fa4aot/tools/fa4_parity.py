"""Fake-mode decision parity with FA4: its interface runs on fake tensors (no GPU) under its own
probe, ``interface._compile_misses``, which records the compile key of every kernel a call needs -
forward, split-KV combine, scheduler prepare - without compiling. fa4aot's decision for the same
call (FA4's selector from its config.py plus the glue fa4aot restates) must predict each key
(:mod:`fa4aot.tools.fa4_keys`). The tests run it against the pinned FA4; ``fa4_upgrade`` runs it
against another FA4 (its package root on ``PYTHONPATH``, its config.py as the selector).

Two differences are by design and pinned here, so they cannot grow unnoticed: FA4's batch-lookup
aid for large varlen batches (two helper kernels fa4aot does not run), and SM120 calls FA4's
interface accepts that its kernel cannot run (fa4aot refuses them up front).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from typing import Any

from fa4aot.core.env import child_environ, with_path_first
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.targets import ARCHES as TARGET_ARCHES
from fa4aot.core.targets import MODELS
from fa4aot.core.variant import FORWARD_FAMILY, Variant
from fa4aot.tools import fa4_keys

#: Runs in a subprocess: FA4's forward on fake tensors for each case (JSON on stdin) under its
#: _compile_misses probe; prints, per case, FA4's error or its named keys per kind of kernel.
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

#: FA4's batch-lookup aid (interface.py 1145-1185): above BIN_BATCH_SEARCH_THRESH varlen-Q
#: batches FA4 runs two small kernels and passes their output to the forward; fa4aot runs the
#: same forward kernel family without them (FA4's kernel for smaller batches).
AID = ("_compute_tile_cumsum", "_compute_blocks_to_batch")
#: fa4aot's refusals of SM120 calls FA4's interface accepts but its kernel cannot run (FA4 does
#: not check ``can_implement`` there; tests/test_dispatch.py proves these against FA4 itself).
SM120_KERNEL_REFUSALS = re.compile(
    r"SM120 forward \(its SM80 kernel\) takes no learnable sink|is not supported on SM120|FlashAttentionForwardSm120"
)


def fa4_answers(arch: str, num_sms: int, cases: list[dict], pythonpath: str | None = None) -> list[dict]:
    """FA4's answer for each case (its error, or its named keys per kind), from a subprocess
    with ``pythonpath`` (another FA4's package root) first on its path."""
    env = child_environ(FLASH_ATTENTION_ARCH=arch, CUTE_DSL_ARCH=arch, FLASH_ATTENTION_NUM_SMS=str(num_sms),
                        CUTE_DSL_LOG_LEVEL="0", PYTHONPATH=with_path_first(pythonpath or ""))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", ORACLE], input=json.dumps(cases), capture_output=True, text=True,
                          env=env, timeout=3600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"FA4's fake-mode run failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predicted(arch: str, num_sms: int, case: dict, sel: Any = None) -> dict[str, list[dict]] | str:
    """The compile keys of the kernels fa4aot runs for ``case`` (forward, and the combine and
    prepare kernels FA4's plan adds), as FA4 names them; or why fa4aot refuses the call.
    ``sel``: FA4's selector module (default: the installed FA4's)."""
    from fa4aot.core import selector
    from fa4aot.core.fwd import companions
    from fa4aot.tools.fa4_calls import decide, facts

    sel = sel or selector.installed()
    try:
        d = decide(arch, num_sms, case, sel=sel)
    except (Fa4aotError, ValueError, AssertionError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    v = Variant.make(FORWARD_FAMILY[arch], arch, num_sms, **d.fields)
    keys = {"fwd": [fa4_keys.fwd_key(v, sel=sel)]}
    predict = {"combine": fa4_keys.combine_key, "prepare": fa4_keys.prepare_key}
    for family, fields in companions(sel, facts(arch, num_sms, case), d):
        keys.setdefault(family, []).append(predict[family](Variant.make(family, arch, num_sms, **fields)))
    return keys


def _without_batch_lookup_aid(case: dict, fa4: dict, bad: list[str]) -> dict:
    """FA4's answer without its batch-lookup aid; ``bad`` gets a line if FA4 adds the aid where
    its rule (restated here) says it would not, or the reverse."""
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


def mismatches(arch: str, num_sms: int, case: dict, fa4: dict, sel: Any = None) -> list[str]:
    """Where fa4aot's kernels for ``case`` differ from the ones FA4 compiles (FA4's answer
    ``fa4``: its error, or its named keys per kind)."""
    ours = predicted(arch, num_sms, case, sel)
    if fa4["error"] is None and isinstance(ours, str) and arch == "sm_120a" and SM120_KERNEL_REFUSALS.search(ours):
        return []
    if fa4["error"] is not None or isinstance(ours, str):
        if fa4["error"] is not None and isinstance(ours, str):
            return []  # both refuse it
        return [f"FA4: {fa4['error'] or 'runs it'}; fa4aot: {ours if isinstance(ours, str) else 'runs it'}"]
    bad: list[str] = []
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


def parity(
    arch: str, num_sms: int, cases: list[dict], sel: Any = None, pythonpath: str | None = None
) -> list[tuple[dict, list[str]]]:
    """The cases whose kernels differ from FA4's, with the differences."""
    answers = fa4_answers(arch, num_sms, cases, pythonpath)
    return [(c, m) for c, a in zip(cases, answers) if (m := mismatches(arch, num_sms, c, a, sel))]


# --------------------------------------------------------------------------------------------
# Random calls
# --------------------------------------------------------------------------------------------

#: Static configurations the random calls mix (per call: random batch and max_seqlen_q/k): FA4's
#: SM100 and SM90 forwards over head dims, masks, varlen, split-KV requests, paged KV (a random
#: page size per call), vLLM's varlen-q pattern, sinks, softcap, FP8 with descales and MXFP8
#: (SM100; refused on the others); decode calls (a third) reach FA4's SwapAB kernel on SM100.
SCALE_CONFIGS = [
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, varlen=True)),
    ("sm_100a", dict(nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128)),
    ("sm_100a", dict(nheads=32, nheads_kv=4, head_dim=64, head_dim_v=64, causal=True, num_splits=0)),
    ("sm_100a", dict(nheads=16, nheads_kv=16, head_dim=192, head_dim_v=128, num_splits=0)),
    ("sm_100a", dict(nheads=12, nheads_kv=4, head_dim=256, head_dim_v=256)),
    ("sm_100a", dict(nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, wl=256, wr=0)),
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True, num_splits=0)),
    ("sm_100a", dict(nheads=64, nheads_kv=8, head_dim=128, head_dim_v=128, seqused_k=True)),
    ("sm_100a", dict(nheads=16, nheads_kv=2, head_dim=128, head_dim_v=128, causal=True, varlen=True, num_splits=0)),
    ("sm_100a", dict(nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True)),
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True, paged=True,
                     num_splits=0)),
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True, paged=True,
                     varlen_q=True)),
    ("sm_100a", dict(nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True, wl=128, wr=0,
                     learnable_sink="bf16")),
    ("sm_100a", dict(nheads=16, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, softcap=50.0)),
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, dtype="e4m3",
                     descales="full,full,full")),
    ("sm_100a", dict(nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64, varlen=True, dtype="e5m2",
                     descales="per_head,per_head,none", num_splits=0)),
    ("sm_100a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True,
                     dtype="e4m3", descales="full,full,full", num_splits=0)),
    ("sm_100a", dict(nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, dtype="e4m3", mxfp8="qk")),
    ("sm_100a", dict(nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64, dtype="e4m3", mxfp8="pv")),
    ("sm_90a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, varlen=True)),
    ("sm_90a", dict(nheads=16, nheads_kv=16, head_dim=64, head_dim_v=64)),
    ("sm_90a", dict(nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True)),
    ("sm_90a", dict(nheads=8, nheads_kv=8, head_dim=128, head_dim_v=128)),
    ("sm_90a", dict(nheads=32, nheads_kv=8, head_dim=128, head_dim_v=128, causal=True, seqused_k=True, paged=True,
                    varlen_q=True)),
    ("sm_90a", dict(nheads=64, nheads_kv=8, head_dim=64, head_dim_v=64, causal=True, wl=128, wr=0,
                    learnable_sink="fp32", softcap=30.0)),
    ("sm_90a", dict(nheads=16, nheads_kv=4, head_dim=128, head_dim_v=128, causal=True, dtype="e4m3",
                    descales="full,full,full")),  # FA4 and fa4aot both refuse FP8 here
]  # fmt: skip

#: Page sizes the random calls draw for paged configurations (TMA at tile_n, cp.async else).
PAGE_SIZES = (16, 32, 64, 128, 256)
#: Per arch, the SM count of its reference target.
ARCHES = {a.name: MODELS[a.default_model].num_sms for a in TARGET_ARCHES.values()}
#: The share of random calls that pass an explicit config= (FA4's selection for another shape of
#: the same call class, which FA4 then validates for this one).
EXPLICIT_CONFIG_SHARE = 0.1


def configs(arch: str) -> list[dict]:
    """The static configurations of ``arch``'s random calls: SM100's for an arch running FA4's
    SM100 forward, SM90's otherwise (SM120 takes SM90's)."""
    src = "sm_100a" if TARGET_ARCHES[arch].forward == "fwd_sm100" else "sm_90a"
    return [dict(c) for a, c in SCALE_CONFIGS if a == src]


def _shape(rng: random.Random, static: dict, arch: str) -> dict:
    batch = int(2 ** rng.uniform(0, 8))
    sq = 1 if rng.random() < 0.33 else int(2 ** rng.uniform(0, 14))
    sk = int(2 ** rng.uniform(0, 15))
    case = dict(static, batch=batch, seqlen_q=sq, seqlen_k=sk)
    if case.pop("paged", False):
        case["page_size"] = rng.choice(PAGE_SIZES)
    if static.get("varlen") or static.get("varlen_q"):
        case.update(total_q=max(sq, batch), total_k=max(sk, batch))
    if TARGET_ARCHES[arch].forward != "fwd_sm100":
        case.pop("num_splits", None)  # FA4 has no split-KV there
    return case


def sample_cases(n: int, seed: int = 1234, arches: tuple[str, ...] = tuple(ARCHES), sel: Any = None):
    """``n`` random calls per arch, as (arch, num_sms, case): random batch and max_seqlen_q/k, a
    third of them decode shapes, a tenth with an explicit ``config`` (``sel``: the selector that
    picks it, default the installed FA4's)."""
    from fa4aot.core import fa4_interface
    from fa4aot.tools.fa4_calls import decide

    rng = random.Random(seed)
    out = []
    for arch in arches:
        for _ in range(n):
            static = rng.choice(configs(arch))
            case = _shape(rng, static, arch)
            if rng.random() < EXPLICIT_CONFIG_SHARE:
                try:  # FA4's choice for another shape of the same class, passed as config=
                    other = decide(arch, ARCHES[arch], _shape(rng, static, arch), sel=sel)
                    case["config"] = fa4_interface.config_fields(other.config)
                except (Fa4aotError, ValueError, AssertionError):
                    pass
            out.append((arch, ARCHES[arch], case))
    return out
