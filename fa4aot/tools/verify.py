"""``fa4aot verify``: re-check every cache entry against its recorded metadata.

For each entry: the key recomputes from the recorded variant, toolchain and host arch; every blob
has its recorded size and sha256; the cubin is the one the entry records, parses, is for the
entry's arch, and its kernels' parameter tables, parameter buffer sizes and block sizes equal the
metadata; and the launch plan loads and, called on sample shapes, launches the cubin's kernel with
its block size and parameter table. A plan built for another host CPU runs under user-mode
emulation (qemu) where it is available; where not, verify says it skipped those runs.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from fa4aot.core import cubin as cubin_reader
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.index import Cache, Entry, splice_plan
from fa4aot.core.records import key_problem, record_problems


@dataclass(frozen=True)
class Problem:
    key: str
    label: str
    what: str


def verify(cache: Cache, run_plans: bool = True, skipped: dict[str, str] | None = None) -> tuple[int, list[Problem]]:
    """(entries checked, problems found). Plans of a host arch that cannot run here are not run:
    ``skipped`` (if given) gets each such host arch and why."""
    problems: list[Problem] = []
    n = 0
    selectors: dict[str, str | None] = {}
    for key, text in cache.records():
        n += 1
        try:
            entry = Entry.from_json(key, text)
        except Fa4aotError as e:
            problems.append(Problem(key, "?", str(e)))
            continue
        problems.extend(verify_entry(cache, entry, run_plans, skipped, selectors))
    problems.extend(verify_packed(cache))
    return n, problems


def _check_selector(source: bytes, entry: Entry, loaded: dict[str, str | None], bad: Any) -> None:
    """Load the entry's FA4 selector module once per distinct blob (read_blob checked its hash)."""
    from fa4aot.core import selector

    digest = entry.blobs["selector"].sha256
    if digest not in loaded:
        try:
            selector.load(source, f"selector blob {digest[:16]}")
            loaded[digest] = None
        except Fa4aotError as e:
            loaded[digest] = str(e)
    if loaded[digest] is not None:
        bad(loaded[digest])


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


def verify_entry(
    cache: Cache,
    entry: Entry,
    run_plans: bool = True,
    skipped: dict[str, str] | None = None,
    selectors: dict[str, str | None] | None = None,
) -> list[Problem]:
    """The problems of one entry. ``selectors``: FA4 selector modules already loaded in this
    verification, by blob sha256 -> the load error or None (a cache's entries share one or two,
    and loading one compiles FA4's config.py: ~27 ms)."""
    label = entry.variant.label()
    out: list[Problem] = []

    def bad(what: str) -> None:
        out.append(Problem(entry.key, label, what))

    meta = entry.meta
    damaged = record_problems(meta)
    for what in damaged:
        bad(what)
    if damaged:
        return out  # the checks below read those fields
    wrong_key = key_problem(entry)
    if wrong_key:
        bad(wrong_key)
    blobs: dict[str, bytes] = {}
    for role in ("cubin", "plan", "header", "selector"):
        if role == "selector" and role not in entry.blobs:
            continue  # entries of FA4 versions before 4.0.0b40 carry no selector
        try:
            blobs[role] = cache.read_blob(entry, role)
        except Fa4aotError as e:
            bad(str(e))
    if "selector" in blobs:
        _check_selector(blobs["selector"], entry, {} if selectors is None else selectors, bad)
    ref = entry.cubin
    if "cubin" in blobs and (ref is None or ref.sha256 != entry.blobs["cubin"].sha256):
        bad("the cubin blob is not the cubin the entry records")
        del blobs["cubin"]
    if "cubin" in blobs:
        try:
            parsed = cubin_reader.parse(blobs["cubin"])
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
    if run_plans and "plan" in blobs and "cubin" in blobs:
        host = entry.host_arch
        why = None if host == platform.machine() else _emulation_problem(host)
        if why is None:
            try:
                plan_bytes = splice_plan(entry, blobs["plan"], blobs["cubin"])
            except Fa4aotError as e:
                bad(str(e))
            else:
                out.extend(Problem(entry.key, label, w) for w in check_plan(entry, plan_bytes))
        elif skipped is not None:
            skipped[host] = why
    return out


def _emulation_problem(host: str) -> str | None:
    from fa4aot.compile.emulate import emulation_available

    return emulation_available(host)


def check_plan(entry: Entry, plan_bytes: bytes) -> list[str]:
    """Load the plan (under emulation if it is for another host CPU) and call it on sample
    shapes; returns what is wrong (empty if fine)."""
    from fa4aot.core import samples

    meta = entry.meta
    problems = []
    try:
        launches = _sample_launches(entry, plan_bytes, samples.named_args(entry.variant))
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


def _sample_launches(entry: Entry, plan_bytes: bytes, named: dict) -> list:
    """The launches the plan records for ``named``: in this process for this CPU's plans, in the
    emulated plan runner for another host arch's."""
    from fa4aot.core.errors import PlanError
    from fa4aot.plan.library import launch_of, open_plan, target_answers

    meta = entry.meta
    if entry.host_arch == platform.machine():
        plan = open_plan(plan_bytes, meta)
        plan.load(list(range(1, len(plan.kernels) + 1)), *target_answers(entry.target.optin_smem()))
        return plan.plan(plan.order(named))
    from fa4aot.compile.emulate import fake_handles, run_states

    run = run_states(plan_bytes, meta, entry.target.optin_smem(), [named], entry.host_arch)
    if run.load_rc:
        raise PlanError(f"plan module load failed (cuda error {run.load_rc})")
    rc, state, _ = run.calls[0]
    if rc:
        raise PlanError(f"plan call failed (cuda error {rc}): {state.error_msg.decode()}")
    names = dict(zip(fake_handles(len(meta["kernels"])), (k["symbol"] for k in meta["kernels"])))
    return [launch_of(state.launches[i], names) for i in range(state.n_launches)]
