"""Exercise forward and backward launch plans on random arguments, on the CPU.

For every forward variant in a cache: ``n`` random argument sets that fit the variant (batch
1..64, seqlens 1..16k including non-multiples of the tile, its GQA ratio, varlen with empty
sequences, padded (non-contiguous) batch/seq/head strides, decode shapes for SwapAB and q_stage 1), each run
through FA4's exported host code, with checks that can fail:

* block equals the cubin's REQNTID; dynamic smem equals the build's record and fits the target;
* the grid equals FA4's scheduler formula (the family home's ``grid``, derived independently);
* the cluster is the home's (2,1,1) exactly for 2CTA variants;
* the addresses the home says a kernel takes as they are (a forward's Q, K, V, O bases) each start
  a kernel parameter of the cubin's table.

Backward kernels (main, preprocess, postprocess) get random calls of their own (FA4's padded
scratch layouts, :func:`fa4aot.core.families.backward.backward_tensors`) with the same checks.

``fa4aot check-plans --cache DIR`` runs it; tests run it on manifests/ci.yaml.
"""

from __future__ import annotations

import platform
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from fa4aot.core.errors import CacheError
from fa4aot.core.families import BACKWARD, FAMILIES, FORWARD, of_stage, sample_scalars, tensors_for
from fa4aot.core.index import Cache, Entry
from fa4aot.core.layouts import Dims
from fa4aot.core.records import record_problems
from fa4aot.core.samples import fake_pointer
from fa4aot.core.signature import TensorDesc
from fa4aot.core.variant import Target, Variant
from fa4aot.plan.library import open_plan, target_answers

#: a launch's cluster of one CTA, which is none (FA4's SwapAB kernel states it)
NO_CLUSTER = (1, 1, 1)
#: what ``fa4aot check-plans`` exercises by default
CHECKED = of_stage(FORWARD) + of_stage(BACKWARD)


@dataclass
class VariantReport:
    entry: Entry
    runs: int = 0
    problems: list[str] = field(default_factory=list)


def _lens(rng: random.Random, batch: int, cap: int) -> list[int]:
    lens = [rng.randint(0, cap) for _ in range(batch)]
    for _ in range(rng.randint(0, max(1, batch // 4))):
        lens[rng.randrange(batch)] = 0  # empty sequences
    if max(lens) == 0:
        lens[0] = rng.randint(1, cap)
    return lens


def _padded(rng: random.Random, shape: tuple[int, ...], pad: bool) -> tuple[int, ...]:
    """Strides for ``shape`` with the innermost dim contiguous and, if ``pad``, every outer stride
    padded by a multiple of 8 elements (16 bytes: what TMA needs)."""
    strides = [1]
    acc = shape[-1]
    for n in reversed(shape[:-1]):
        acc += 8 * rng.randint(1, 4) if pad else 0
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def random_call(entry: Entry, rng: random.Random) -> tuple[dict[str, Any], dict[str, int]]:
    """Named plan arguments for one random call that fits ``entry``'s variant (FA4's layouts,
    :func:`fa4aot.core.families.forward.forward_tensors`, with padded strides), and its sizes."""
    v = entry.variant
    f = v.fields
    qh = f["qhead_per_kvhead"]
    hk = rng.choice([1, 2, 4, 8])
    batch = rng.randint(1, 64)
    # SwapAB takes decode calls (one query a sequence); a 1-stage SM100 variant often serves them
    small = f.get("use_swapab") or f.get("q_stage") == 1
    cap_q = max(1, 128 // (qh if f["pack_gqa"] else 1)) if small else 16384
    if f.get("use_swapab") or (small and rng.random() < 0.5):
        cap_q = 1
    if f["varlen_q"]:
        lens_q = _lens(rng, batch, min(cap_q, 4096))
        total_q, seqlen_q = sum(lens_q), max(lens_q)
    else:
        seqlen_q = rng.randint(1, cap_q) if cap_q > 1 else 1
        total_q = batch * seqlen_q
    if f["varlen_k"]:
        lens_k = _lens(rng, batch, 4096)
        total_k, seqlen_k = sum(lens_k), max(lens_k)
    else:
        seqlen_k = rng.randint(1, 16384)
        total_k = batch * seqlen_k
    paged = f.get("paged_kv", "none")
    page = num_pages = None
    if paged != "none":  # a page pool and a table: FA4's TMA path at tile_n, cp.async otherwise
        page = f["tile_n"] if paged == "tma" else rng.choice([s for s in (1, 8, 16, 32, 64, 256) if s != f["tile_n"]])
        num_pages = batch * (-(-seqlen_k // page) + rng.randint(0, 3)) + rng.randint(0, 64)
    split = f.get("num_splits", 1) > 1
    splits = rng.randint(2, 64) if split else 1
    d = Dims(batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, nheads=hk * qh, nheads_kv=hk,
             head_dim=f["head_dim"], head_dim_v=f["head_dim_v"], num_splits=splits,
             total_q=total_q if f["varlen_q"] else None, total_k=total_k if f["varlen_k"] else None,
             page_size=page, num_pages=num_pages)  # fmt: skip
    pad = rng.random() < 0.5
    named: dict[str, Any] = {}
    for i, (name, t) in enumerate(tensors_for(v, d, entry.target.num_sms).items()):
        padded = pad and (name in ("q", "k", "v") or (name == "out" and not split))
        strides = _padded(rng, t.shape, True) if padded else t.strides
        if name == "page_table":
            strides = (t.shape[1] + rng.randint(0, 8), 1)
        named[name] = TensorDesc(fake_pointer(i), t.shape, strides)
    named.update(_random_scalars(v, d, rng))
    sizes = dict(batch=batch, seqlen_q=seqlen_q, total_q=total_q, nheads=hk * qh, nheads_kv=hk, num_splits=splits)
    if page is not None:
        sizes["page_size"] = page
    return named, sizes


def random_backward_call(entry: Entry, rng: random.Random) -> tuple[dict[str, Any], dict[str, int]]:
    """Named plan arguments for one random call of a backward kernel, and its sizes."""
    v = entry.variant
    f = v.fields
    qh = f.get("qhead_per_kvhead", 1)
    hk = rng.choice([1, 2, 4, 8])
    if "scratch_heads" in f and f["pack_factor"] > 1:  # a fold's preprocess: built for its scratch heads
        qh, hk = f["scratch_heads"] * f["pack_factor"], 1
    batch = rng.randint(1, 64)
    varlen_q = f.get("varlen_q", f.get("varlen", False))
    varlen_k = f.get("varlen_k", False)
    sq, sk = rng.randint(1, 8192), rng.randint(1, 8192)
    tq = sum(_lens(rng, batch, 2048)) if varlen_q else None
    tk = sum(_lens(rng, batch, 2048)) if varlen_k else None
    hd = f["head_dim"]
    d = Dims(batch=batch, seqlen_q=sq, seqlen_k=sk, nheads=hk * qh, nheads_kv=hk, head_dim=hd,
             head_dim_v=f.get("head_dim_v", hd), total_q=tq, total_k=tk)  # fmt: skip
    named: dict[str, Any] = {}
    for i, (name, t) in enumerate(sorted(tensors_for(v, d).items())):
        named[name] = TensorDesc(fake_pointer(i), t.shape, t.strides)
    named.update(_random_scalars(v, d, rng))
    return named, dict(batch=batch, nheads=hk * qh, seqlen_q=sq, seqlen_k=sk, total_q=tq, total_k=tk)


def _random_scalars(v: Variant, d: Dims, rng: random.Random) -> dict[str, Any]:
    """A call's scalars (the family's sample scalars) with a random softmax scale and window."""
    out = sample_scalars(v, d)
    for name in ("softmax_scale", "scale"):
        if name in out:
            out[name] = rng.uniform(0.01, 1.0)
    if "window_size_left" in out:
        out["window_size_left"], out["window_size_right"] = rng.randint(0, 4096), rng.randint(0, 4096)
    out["stream"] = 0
    return out


def _start(cache: Cache, entry: Entry, seed: int) -> tuple[VariantReport, Any, dict, set[int], random.Random]:
    """An empty report, the entry's plan loaded with the target's answers, its first kernel's
    table, the offsets where that kernel's parameters start, and the entry's random source."""
    plan = open_plan(cache.read_plan(entry), entry.meta)
    plan.load(list(range(1, len(plan.kernels) + 1)), *target_answers(entry.target.optin_smem()))
    k = entry.meta["kernels"][0]
    starts = {off for _, off, _ in k["params"]}
    return VariantReport(entry), plan, k, starts, random.Random(f"{entry.variant_id}:{seed}")


def _runs(cache: Cache, entry: Entry, n: int, seed: int, draw: Any) -> tuple[VariantReport, set[int], Any]:
    """(the entry's report, where its first kernel's parameters start, ``n`` random calls): each
    call drawn by ``draw(entry, rng)``, run through the plan, its block and smem checked, and
    yielded as (named arguments, sizes, launch, where)."""
    report, plan, k, starts, rng = _start(cache, entry, seed)

    def runs() -> Any:
        for _ in range(n):
            named, sz = draw(entry, rng)
            (launch,) = plan.plan(plan.order(named))
            report.runs += 1
            where = f"sizes {sz}"
            _check_block_and_smem(report, launch, k, where)
            yield named, sz, launch, where

    return report, starts, runs()


def _check_block_and_smem(report: VariantReport, launch: Any, k: dict, where: str) -> None:
    """Block equals the cubin's REQNTID; dynamic smem equals the build's record and fits the target."""
    entry = report.entry
    if list(launch.block) != k["reqntid"]:
        report.problems.append(f"block {launch.block} != REQNTID {k['reqntid']} ({where})")
    if launch.smem != entry.meta["launch"]["smem"] or launch.smem > entry.target.optin_smem():
        report.problems.append(f"smem {launch.smem} != build's {entry.meta['launch']['smem']} ({where})")


def check_entry(cache: Cache, entry: Entry, n: int = 30, seed: int = 0) -> VariantReport:
    """``n`` random calls of an entry's plan, each checked against what its family's home says:
    block, smem, grid (FA4's scheduler formula), cluster, and that every address the kernel takes
    as is starts a kernel parameter."""
    fam = FAMILIES[entry.variant.family]
    draw = random_backward_call if fam.stage == BACKWARD else random_call
    report, starts, runs = _runs(cache, entry, n, seed, draw)
    f = entry.variant.fields
    for named, sz, launch, where in runs:
        want = fam.grid(f, sz, entry.target.num_sms)
        if launch.grid != want:
            report.problems.append(f"grid {launch.grid} != FA4 formula {want} ({where})")
        if (None if launch.cluster == NO_CLUSTER else launch.cluster) != fam.cluster(f):
            report.problems.append(f"cluster {launch.cluster or 'none'} for use_2cta_instrs={f.get('use_2cta_instrs')}")
        for name, base in fam.pointers(f, named).items():
            raw = struct.pack("<Q", base)
            if not any(launch.param_bytes[s : s + 8] == raw for s in starts):
                report.problems.append(f"&{name} starts no kernel parameter ({where})")
    return report


def check_cache(cache: Cache, n: int = 30, families: tuple[str, ...] = CHECKED) -> list[VariantReport]:
    """Check the plans of ``families`` built for this host CPU (other hosts' plans run under
    ``fa4aot verify``). An entry whose record lacks what a plan needs (its signature, kernels,
    launch) or does not parse is reported with those problems and no calls, not loaded."""
    here = platform.machine()
    reports = []
    for key, text in cache.records():
        try:
            e = Entry.from_json(key, text)
        except CacheError as err:  # not even a variant to filter on: reported, never loaded
            unknown = Entry(key, Variant("?", "?", 0), Target("?", "?", 0), {}, {})
            reports.append(VariantReport(unknown, problems=[str(err)]))
            continue
        if e.variant.family not in families or e.host_arch != here:
            continue
        damaged = record_problems(e.meta)
        reports.append(VariantReport(e, problems=damaged) if damaged else check_entry(cache, e, n))
    return reports
