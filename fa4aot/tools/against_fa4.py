"""``fa4aot verify --against-fa4``: for each forward entry, a call that makes FA4 itself pick that
configuration, run through FA4's own interface (fake tensors, CPU, the target arch and SM count
handed over as the build does), and its cubin compared byte for byte with the cache's.

The call is found by searching a grid of shapes with fa4aot's dispatch (which restates FA4's
decisions and is tested against FA4) for one whose decision is the entry's variant; a combine
entry is compiled through FA4's ``_flash_attn_fwd_combine`` and a prepare entry through its
``_get_scheduler_metadata`` (what FA4's split-KV forward calls). A backward entry (main kernel,
preprocess or postprocess) is compiled through ``_flash_attn_bwd`` for a call of the backward
group it belongs to; each of that call's kernels is set aside as it is compiled (the dQ, dK and
dV postprocess kernels share one name); the backward entries are grouped into as few calls as
cover them all. Tuning candidates (tilings FA4 never picks) have no such call and are reported
as such.
"""

from __future__ import annotations

import glob
import itertools
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.core import fwd
from fa4aot.core.backward import BACKWARD_FAMILIES
from fa4aot.core.env import child_environ
from fa4aot.core.errors import ArgumentError, Fa4aotError
from fa4aot.core.families import BACKWARD, FAMILIES, is_tuning_candidate
from fa4aot.core.index import Cache, Entry
from fa4aot.core.variant import FORWARD_FAMILIES, Variant
from fa4aot.tools.fa4_calls import decide

#: Shapes the search tries, smallest first (FA4's shape-dependent choices: q_stage, splits,
#: 2-CTA, scheduler, S ping-pong, pack_gqa for head dim 256).
BATCHES = (2, 1, 8, 64)
SEQLENS_Q = (1024, 1, 64, 4096, 200, 100, 24, 16)
SEQLENS_K = (1024, 8192, 65536)
SPLITS = (1, 0, 8)
KV_HEADS = (4, 1, 8)

_FA4_SCRIPT = r"""
import glob, json, os, sys
arch, sms, cases, dump = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
os.environ.update(FLASH_ATTENTION_ARCH=arch, CUTE_DSL_ARCH=arch, FLASH_ATTENTION_NUM_SMS=sms,
                  CUTE_DSL_KEEP="cubin", CUTE_DSL_DUMP_DIR=dump, CUTE_DSL_LOG_LEVEL="0")
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(sms))
from flash_attn.cute import interface as I
from fa4aot.tools.fa4_calls import fa4_backward, fa4_combine, fa4_forward, fa4_prepare
# every case compiles from scratch: a kernel FA4 already compiled for an earlier case in this
# process (a split-KV forward compiles the combine and prepare kernels too) writes no cubin
jit_caches = [f.compile_cache for f in vars(I).values() if hasattr(getattr(f, "compile_cache", None), "clear")]
# one FA4 call may compile several kernels of one name (a backward's dQ, dK and dV postprocess):
# set each compile's cubins aside before the next one overwrites them
import cutlass.cute as cute
_compile, _n = cute.compile, [0]
def _compile_and_keep(*a, **k):
    out = _compile(*a, **k)
    for p in glob.glob(dump + "/*.cubin"):
        _n[0] += 1
        os.rename(p, f"{dump}/{_n[0]:04d}-{os.path.basename(p)}")
    return out
cute.compile = _compile_and_keep
# FA4's deterministic backward describes its semaphores with DLPack (convert_from_dlpack_leading_static),
# which a fake CUDA tensor cannot export: hand FA4's own function a CPU tensor of the same shape
# and strides (the layout it marks, not the memory, is what the compile sees)
from flash_attn.cute import utils as _fa4_utils
from torch._subclasses.fake_tensor import unset_fake_temporarily
_leading_static = _fa4_utils.convert_from_dlpack_leading_static
def _leading_static_cpu(x, *a, **k):
    with unset_fake_temporarily():
        real = torch.zeros(tuple(x.shape), dtype=x.dtype).as_strided(tuple(x.shape), tuple(x.stride()))
        return _leading_static(real, *a, **k)
_fa4_utils.convert_from_dlpack_leading_static = _leading_static_cpu
for i, case in enumerate(cases):
    for c in jit_caches:
        c.clear()
    try:
        with FakeTensorMode():
            calls = {"combine": fa4_combine, "prepare": fa4_prepare, "backward": fa4_backward}
            calls.get(case.get("kind"), fa4_forward)(I, torch, case)
        err = None
    except Exception as e:
        err = f"{type(e).__name__}: {e}"[:300]
    os.makedirs(f"{dump}/{i}")
    for p in glob.glob(dump + "/*.cubin"):
        os.rename(p, f"{dump}/{i}/{os.path.basename(p)}")
    print(json.dumps({"i": i, "error": err}), flush=True)
"""


@dataclass(frozen=True)
class Comparison:
    entry: Entry
    status: str  # identical, different, skipped, failed
    detail: str = ""


def _backward_calls(m: Variant) -> list[tuple[dict[str, Any], set[tuple[str, str]]]]:
    """Backward calls for which FA4 selects main kernel ``m`` (with and without a gradient on the
    LSE, without a sink and with each sink dtype, over the shape grid a group expands over): for
    each distinct set of kernels such a call compiles, one call's case and the (family, variant
    id) of its kernels."""
    from fa4aot.core import backward as bw
    from fa4aot.core import selector
    from fa4aot.core.families import SINK_DTYPES

    sel = selector.installed()
    mf = m.fields
    found: dict[frozenset, dict[str, Any]] = {}
    grid = list(itertools.product(bw.DEFAULT_BATCH, bw.DEFAULT_SEQLEN, bw.DEFAULT_SEQLEN, bw.DEFAULT_NHEADS_KV))
    for dlse, sink in itertools.product((False, True), ("none",) + SINK_DTYPES):
        call = {k: mf[k] for k in bw.CALL_FIELDS if k in mf}
        call.update(has_dlse=dlse, learnable_sink=sink)
        qh = call["qhead_per_kvhead"]
        for b, sq, sk, hk in grid:
            try:
                _, ps = bw.select(sel, m.family, call, bw.facts_for(m.arch, m.num_sms, call, b, sq, sk, hk))
            except (ValueError, AssertionError):
                continue
            kernels = frozenset(
                (p.family, Variant.make(p.family, m.arch, m.num_sms, **p.field_dict).variant_id) for p in ps
            )
            if (m.family, m.variant_id) not in kernels or kernels in found:
                continue
            case: dict[str, Any] = dict(
                kind="backward", batch=b, seqlen_q=sq, seqlen_k=sk, nheads=hk * qh, nheads_kv=hk,
                head_dim=call["head_dim"], head_dim_v=call["head_dim_v"], causal=call["causal"], dtype=call["dtype"],
                varlen_q=call["varlen_q"], varlen_k=call["varlen_k"], seqused_q=call["seqused_q"],
                seqused_k=call["seqused_k"], total_q=b * sq, total_k=b * sk, dlse=dlse, softcap=call["softcap"],
                deterministic=call["deterministic"],
            )  # fmt: skip
            if call["local"]:
                case.update(wl=128, wr=0)
            if sink != "none":
                case["learnable_sink"] = sink
            found[kernels] = case
    return [(case, set(kernels)) for kernels, case in found.items()]


def backward_case(v: Variant, mains: list[Variant]) -> dict[str, Any] | None:
    """A backward call for which FA4 compiles ``v`` (a main backward kernel, or a preprocess /
    postprocess one of the backward groups of ``mains``, the cache's main kernels), or None."""
    for m in [v] if v.family in BACKWARD_FAMILIES else mains:
        if (m.arch, m.num_sms) != (v.arch, v.num_sms):
            continue
        for case, kernels in _backward_calls(m):
            if (v.family, v.variant_id) in kernels:
                return case
    return None


def backward_cases(entries: list[Entry], mains: list[Variant]) -> tuple[list[tuple[dict, list[Entry]]], list[Entry]]:
    """Few FA4 backward calls that together compile every one of ``entries`` (backward kernels):
    greedily the call that compiles the most entries not yet covered. Returns (case, the entries
    it covers) pairs and the entries no call of ``mains``' groups compiles."""
    calls = [(case, kernels, (m.arch, m.num_sms)) for m in mains for case, kernels in _backward_calls(m)]
    left = list(entries)
    chosen: list[tuple[dict, list[Entry]]] = []
    while left:
        best, covered = None, []
        for case, kernels, target in calls:
            hit = [e for e in left if (e.target.arch, e.target.num_sms) == target
                   and (e.variant.family, e.variant_id) in kernels]  # fmt: skip
            if len(hit) > len(covered):
                best, covered = case, hit
        if best is None:
            break
        chosen.append((best, covered))
        left = [e for e in left if e not in covered]
    return chosen, left


def find_case(v: Variant, mains: list[Variant] = ()) -> dict[str, Any] | None:
    """A call description for which FA4 compiles exactly ``v`` (for a forward: one fa4aot's
    dispatch, which restates FA4's rules, maps to ``v``), or None. ``mains``: the main backward
    kernels of the cache (a backward helper kernel is found through the group it belongs to)."""
    f = v.fields
    fam = FAMILIES[v.family]
    if fam.fa4_case is not None:
        return fam.fa4_case(v)
    if fam.stage == BACKWARD:
        return backward_case(v, list(mains))
    if v.family not in FORWARD_FAMILIES or is_tuning_candidate(v.family, f):
        return None
    qh = f["qhead_per_kvhead"]
    base: dict[str, Any] = dict(
        head_dim=f["head_dim"], head_dim_v=f["head_dim_v"], causal=f["causal"], dtype=f["dtype"],
        return_lse=f["has_lse"], seqused_k=f["seqused_k"],
    )  # fmt: skip
    if f["local"]:
        base.update(wl=128, wr=0)
    for name in ("descales", "mxfp8"):  # FA4's scales= (FP8 descales, MXFP8 block scales)
        if f.get(name):
            base[name] = f[name]
    if f["learnable_sink"] != "none":
        base["learnable_sink"] = f["learnable_sink"]
    if f["softcap"]:
        base["softcap"] = f["softcap"]
    if f["seqused_q"]:
        return None  # FA4's interface passes seqused_q only with cu_seqlens_q, which the calls here model as varlen
    if f["pack_gqa"] != (qh > 1):
        base["pack_gqa"] = f["pack_gqa"]
    pages = [None]
    if f["paged_kv"] == "tma":
        pages = [f["tile_n"]]
    elif f["paged_kv"] == "cpasync":
        pages = [p for p in (16, 64, 128, 256) if p != f["tile_n"]]
    if f["varlen_k"] and not f["varlen_q"]:
        return None  # varlen K without varlen Q is not a call the interface's cases model
    splits = (0, 8, 2, 4, 16, 32) if f.get("num_splits", 1) > 1 else (1, 0)
    windows = ((128, 0), (1024, 0), (4096, 4096)) if f["local"] else ((None, None),)
    fills = (1.0, 0.125) if f["varlen_q"] else (1.0,)
    # the hand-picked shapes first, then the grid a manifest group expands over
    grids = [(BATCHES, SEQLENS_Q, SEQLENS_K, KV_HEADS)]
    grids.append((fwd.DEFAULT_BATCH, fwd.DEFAULT_SEQLEN_Q, fwd.DEFAULT_SEQLEN_K, fwd.DEFAULT_NHEADS_KV))
    for batches, seqlens_q, seqlens_k, kv_heads in grids:
        for b, sq, sk, n, hk, page, (wl, wr), fill in itertools.product(
            batches, seqlens_q, seqlens_k, splits, kv_heads, pages, windows, fills
        ):
            case = dict(base, batch=b, seqlen_q=sq, seqlen_k=sk, nheads=hk * qh, nheads_kv=hk, num_splits=n)
            if f["local"]:
                case.update(wl=wl, wr=wr)
            if page is not None:
                case["page_size"] = page
            total_q = max(b, int(b * sq * fill))
            if f["varlen_q"] and f["varlen_k"]:
                case.update(varlen=True, total_q=total_q, total_k=b * sk)
            elif f["varlen_q"]:
                case.update(varlen_q=True, total_q=total_q)
            try:
                d = decide(v.arch, v.num_sms, case)
            except (ArgumentError, Fa4aotError, ValueError, AssertionError):
                continue
            if Variant.make(v.family, v.arch, v.num_sms, **d.fields) == v:
                return case
    return None


def compare(
    cache: Cache,
    entries: list[Entry],
    timeout: float = 3600,
    progress: Callable[[int, int], None] | None = None,
) -> list[Comparison]:
    """Compile each entry's FA4 call (one FA4 process per target, one call per distinct case) and
    compare cubins. ``progress(done, total)``: entries compared (or skipped) so far, after each
    target's FA4 process."""
    total = len(entries)
    out: list[Comparison] = []
    by_target: dict[tuple[str, int], list[tuple[Entry, dict[str, Any]]]] = {}
    mains = [e.variant for e in cache.entries() if e.variant.family in BACKWARD_FAMILIES]
    # backward kernels: grouped into few calls, each of which compiles several of them
    backward = [e for e in entries if FAMILIES[e.variant.family].stage == BACKWARD]
    bwd_calls, uncovered = backward_cases(backward, mains)
    entries = [e for e in entries if FAMILIES[e.variant.family].stage != BACKWARD]
    for case, covered in bwd_calls:
        for e in covered:
            by_target.setdefault((e.target.arch, e.target.num_sms), []).append((e, case))
    for e in uncovered:
        out.append(Comparison(e, "skipped", f"{e.variant.family}: no FA4 backward call found that compiles it"))
    for e in entries:
        case = find_case(e.variant, mains)
        if case is None:
            why = (
                "a tuning candidate: FA4 never picks it"
                if is_tuning_candidate(e.variant.family, e.variant.fields)
                else f"{e.variant.family}: no FA4 call found that picks exactly this variant"
            )
            out.append(Comparison(e, "skipped", why))
            continue
        by_target.setdefault((e.target.arch, e.target.num_sms), []).append((e, case))
    for (arch, sms), items in by_target.items():
        if progress is not None:
            progress(len(out), total)
        # one FA4 call per distinct case: a backward call compiles every kernel of its group
        cases: list[dict[str, Any]] = []
        at: list[int] = []
        for _, case in items:
            if case not in cases:
                cases.append(case)
            at.append(cases.index(case))
        with tempfile.TemporaryDirectory(prefix="fa4aot-fa4-") as dump:
            proc = subprocess.run(
                [sys.executable, "-c", _FA4_SCRIPT, arch, str(sms), json.dumps(cases), dump],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=child_environ(),
            )
            results = {}
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    results[r["i"]] = r["error"]
            for (e, case), i in zip(items, at):
                if i not in results:
                    out.append(Comparison(e, "failed", f"FA4 did not get to this call: {proc.stderr[-300:]}"))
                    continue
                # a split-KV call also compiles the combine kernel: keep the cubin of the entry's kind
                kind = FAMILIES[e.variant.family].fa4_kernel(e.variant.fields)
                cubins = [
                    p for p in sorted(glob.glob(f"{dump}/{i}/*.cubin")) if _has_kernel(Path(p).read_bytes(), kind)
                ]
                # a GQA backward compiles up to three postprocess kernels (dQ, dK, dV): any may be this one
                many = e.variant.family == "bwd_post"
                if results[i] is not None or not cubins or (len(cubins) != 1 and not many):
                    out.append(Comparison(e, "failed", results[i] or f"FA4 compiled {len(cubins)} {kind} cubins"))
                    continue
                mine = cache.read_cubin(e)
                same = any(Path(c).read_bytes() == mine for c in cubins)
                shown = ("batch", "seqlen_q", "seqlen_k", "nheads", "num_splits")
                detail = json.dumps({k: case[k] for k in shown if k in case})
                out.append(Comparison(e, "identical" if same else "different", detail))
    if progress is not None:
        progress(len(out), total)
    return out


def _has_kernel(data: bytes, kind: str) -> bool:
    from fa4aot.core import cubin

    try:
        return any(kind in name for name in cubin.parse(data).kernels)
    except Fa4aotError:
        return False
