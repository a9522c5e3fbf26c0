"""``fa4aot verify``: re-check every cache entry against its recorded metadata.

For each entry: the key recomputes from the recorded variant, toolchain and host arch; every blob
has its recorded size and sha256; the cubin (inside the plan) has its own recorded sha256, parses, is for the entry's arch, and its kernels'
parameter tables, parameter buffer sizes and block sizes equal the metadata; and (where the plan
was built for this CPU) the launch plan loads and, called on sample shapes, launches the cubin's
kernel with its block size and parameter table.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from fa4aot.core import cubin as cubin_reader
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.index import Cache, Entry, cubin_of
from fa4aot.core.variant import Variant, cache_key


@dataclass(frozen=True)
class Problem:
    key: str
    label: str
    what: str


def verify(cache: Cache, run_plans: bool = True) -> tuple[int, list[Problem]]:
    """(entries checked, problems found)."""
    problems: list[Problem] = []
    n = 0
    for key, text in cache.records():
        n += 1
        try:
            entry = Entry.from_json(key, text)
        except Fa4aotError as e:
            problems.append(Problem(key, "?", str(e)))
            continue
        problems.extend(verify_entry(cache, entry, run_plans))
    problems.extend(verify_packed(cache))
    return n, problems


def verify_packed(cache: Cache) -> list[Problem]:
    """Each packed index opens (header hash), every record in it hashes and names an entry of the
    full index with the same metadata."""
    out = []
    for key in cache.packed_targets():
        where = f"packed/{key.filename}"
        try:
            packed = cache.open_packed(key)
        except Fa4aotError as e:
            out.append(Problem(where, "packed index", str(e)))
            continue
        for vid in packed.records:
            try:
                e = packed.entry(vid)
            except Fa4aotError as err:
                out.append(Problem(where, vid, str(err)))
                continue
            full = cache.get(e.key)
            if full is None or full.meta != e.meta:
                out.append(Problem(where, vid, "record differs from the full index; run `fa4aot reindex`"))
        packed.close()
    return out


def verify_entry(cache: Cache, entry: Entry, run_plans: bool = True) -> list[Problem]:
    label = entry.variant.label()
    out: list[Problem] = []

    def bad(what: str) -> None:
        out.append(Problem(entry.key, label, what))

    meta = entry.meta
    try:
        recomputed = cache_key(Variant.from_dict(meta["variant"]), meta["toolchain"], meta["host_arch"])
        if recomputed != entry.key:
            bad(f"key does not match the recorded variant/toolchain (recomputes to {recomputed})")
    except (KeyError, TypeError) as e:
        bad(f"metadata lacks {e}")
        return out
    blobs: dict[str, bytes] = {}
    for role in ("plan", "header"):
        try:
            blobs[role] = cache.read_blob(entry, role)
        except Fa4aotError as e:
            bad(str(e))
    if "plan" in blobs:
        try:
            cubin = cubin_of(entry, blobs["plan"])
            parsed = cubin_reader.parse(cubin)
        except Fa4aotError as e:
            bad(f"cubin: {e}")
        else:
            if parsed.arch != meta.get("cubin_arch") or parsed.arch != entry.target.arch:
                bad(f"cubin is for {parsed.arch}; metadata says {meta.get('cubin_arch')}, target {entry.target.arch}")
            for k in meta.get("kernels", []):
                pk = parsed.kernels.get(k["symbol"])
                if pk is None:
                    bad(f"kernel {k['symbol'][:60]}... is not in the cubin")
                    continue
                if pk.param_table() != k["params"]:
                    bad(f"parameter table of {k['symbol'][:40]}... differs from the metadata")
                if pk.cbank_param_size != k["cbank_param_size"]:
                    bad(f"parameter buffer size {pk.cbank_param_size} != recorded {k['cbank_param_size']}")
                if (list(pk.reqntid) if pk.reqntid else None) != k["reqntid"]:
                    bad(f"block size {pk.reqntid} != recorded {k['reqntid']}")
    if run_plans and "plan" in blobs and meta.get("host_arch") == platform.machine():
        out.extend(Problem(entry.key, label, w) for w in check_plan(entry, blobs["plan"]))
    return out


def check_plan(entry: Entry, plan_bytes: bytes) -> list[str]:
    """Load the plan and call it on sample shapes; returns what is wrong (empty if fine)."""
    from fa4aot.core import samples
    from fa4aot.plan.library import open_plan, target_answers

    meta = entry.meta
    problems = []
    try:
        plan = open_plan(plan_bytes, meta)
        dev, ker = target_answers(entry.target.optin_smem())
        plan.load(list(range(1, len(plan.kernels) + 1)), dev, ker)
        launches = plan.plan(plan.order(samples.named_args(entry.variant)))
    except Fa4aotError as e:
        return [f"launch plan fails: {e}"]
    symbols = {k["symbol"]: k for k in meta["kernels"]}
    if not launches:
        problems.append("launch plan recorded no launch")
    for launch in launches:
        k = symbols.get(launch.kernel)
        if k is None:
            problems.append(f"plan launched an unknown kernel {launch.kernel[:60]}")
            continue
        if k["reqntid"] and list(launch.block) != k["reqntid"]:
            problems.append(f"plan launches block {launch.block}, the cubin requires {k['reqntid']}")
        if len(launch.param_bytes) != k["cbank_param_size"]:
            problems.append("plan's parameter buffer size differs from the cubin's")
    return problems
