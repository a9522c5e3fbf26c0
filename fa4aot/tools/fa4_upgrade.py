"""The upgrade report: what fa4aot would have to handle to move to another FA4.

    python -m fa4aot.tools.fa4_upgrade NEW [--calls N] [--cubins] [--json OUT]

NEW is the FA4 to compare with the pinned one (the installed flash-attn-4): a directory that holds
the ``flash_attn`` package (an unpacked wheel, a source checkout), a ``.whl`` file, or a version
such as ``4.0.0b41`` (pip downloads its wheel). The report lists, so that a port starts from it:

1. entry points - the parameters of the FA4 functions fa4aot mirrors (``flash_attn_func``,
   ``flash_attn_varlen_func``, ``_flash_attn_fwd``, ``_flash_attn_bwd``,
   ``_get_scheduler_metadata``, ``_flash_attn_fwd_combine``) that NEW adds, drops, moves or gives
   another default, and where fa4aot's own signatures no longer match NEW's positional order;
2. compile keys - the elements of each JIT cache key that NEW adds or drops, and the forward,
   combine and prepare key names fa4aot's prediction does not model;
3. selector - whether NEW's config.py loads as fa4aot's selector (import allow-list, the names
   fa4aot reads) and the fields its config and heuristic-input types add or drop;
4. parity - ``--calls`` random calls per arch (sm_90a, sm_100a, sm_103a, sm_120a) through NEW's
   interface in fake mode against fa4aot's decision with NEW's selector: the kernel choices that
   differ, grouped by their first difference;
5. cubins (``--cubins``) - manifests/ci.yaml built against NEW and ``verify --against-fa4``: the
   cubins that are not byte-identical to NEW's own JIT (minutes of compiling).

It writes nothing outside a temporary directory and always exits 0 unless it cannot read NEW.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fa4aot.core import fa4_args
from fa4aot.core.env import child_environ, with_path_first

#: The selector types whose fields fa4aot reads or builds.
SELECTOR_TYPES = ("FwdConfig", "FwdHeuristicInputs", "BwdConfig", "BwdHeuristicInputs")
#: Report lines per section before "... and N more".
MAX_LINES = 12


def fa4_root(new: str, tmp: Path) -> Path:
    """The directory holding NEW's ``flash_attn`` package (unpacking or downloading it)."""
    p = Path(new)
    if p.is_dir():
        for root in (p, p / "src"):
            if (root / "flash_attn" / "cute" / "interface.py").is_file():
                return root
        raise SystemExit(f"{new}: no flash_attn/cute/interface.py under it")
    if p.suffix == ".whl" and p.is_file():
        with zipfile.ZipFile(p) as z:
            z.extractall(tmp / "fa4")
        return fa4_root(str(tmp / "fa4"), tmp)
    if p.exists():
        raise SystemExit(f"{new}: not a directory or a .whl")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp / "dl"),
           f"flash-attn-4=={new}"]  # fmt: skip
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"cannot download flash-attn-4=={new} (give a directory or a .whl instead)")
    (wheel,) = (tmp / "dl").glob("*.whl")
    return fa4_root(str(wheel), tmp)


def pinned_root() -> Path:
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the pinned flash-attn-4 is not installed here (install fa4aot's build extra)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def _version(root: Path) -> str:
    for meta in root.glob("flash_attn_4-*.dist-info/METADATA"):
        for line in meta.read_text().splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown version"


# --------------------------------------------------------------------------------------------
# 1. entry points
# --------------------------------------------------------------------------------------------


def signatures(source: str) -> dict[str, dict[str, Any]]:
    """Per top-level function: positional parameter names in order, keyword-only names, and each
    parameter's default as source text."""
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef):
            continue
        a = node.args
        pos = [x.arg for x in a.posonlyargs + a.args]
        defaults = {x.arg: ast.unparse(d) for x, d in zip((a.posonlyargs + a.args)[-len(a.defaults) :], a.defaults)}
        defaults.update({x.arg: ast.unparse(d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
        out[node.name] = {"positional": pos, "keyword_only": [x.arg for x in a.kwonlyargs], "defaults": defaults}
    return out


def _signature_changes(name: str, old: dict | None, new: dict | None) -> list[str]:
    if new is None:
        return [f"{name}: gone"]
    if old is None:
        return [f"{name}: new"]
    out = []
    op, np_ = old["positional"], new["positional"]
    for p in np_:
        if p not in op and p not in old["keyword_only"]:
            out.append(f"{name}: adds {p} (positional {np_.index(p) + 1})")
    for p in op:
        if p not in np_ and p not in new["keyword_only"]:
            out.append(f"{name}: drops {p}")
        elif p in np_ and op.index(p) != np_.index(p):
            out.append(f"{name}: {p} moves from position {op.index(p) + 1} to {np_.index(p) + 1}")
    for p in new["keyword_only"]:
        if p not in old["keyword_only"]:
            out.append(f"{name}: adds keyword-only {p}" + (" (was positional)" if p in op else ""))
    for p, d in new["defaults"].items():
        if p in old["defaults"] and old["defaults"][p] != d:
            out.append(f"{name}: {p} default {old['defaults'][p]} -> {d}")
    return out


def _table_mismatch(fn: str, new: dict) -> list[str]:
    """Where NEW's ``fn`` departs from fa4aot's table of FA4's arguments (fa4aot.core.fa4_args),
    which every mirror and refusal is checked against: the parameters to add or move there."""
    table = fa4_args.ENTRY_POINTS[fn]
    mine = [p.name for p in table if not p.keyword_only]
    theirs = new["positional"]
    out = []
    if mine != theirs:
        i = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        here = mine[i] if i < len(mine) else "nothing"
        there = theirs[i] if i < len(theirs) else "nothing"
        out.append(f"fa4_args.{fn}: positional parameter {i + 1} is {here}, NEW's has {there} there")
    missing = set(new["keyword_only"]) - {p.name for p in table if p.keyword_only}
    out += [f"fa4_args.{fn}: lacks NEW's keyword-only {n}" for n in sorted(missing)]
    return out


def entry_points(old_src: str, new_src: str) -> list[str]:
    old, new = signatures(old_src), signatures(new_src)
    out = []
    for fn in fa4_args.ENTRY_POINTS:
        out += _signature_changes(fn, old.get(fn), new.get(fn))
        if fn in new:
            out += _table_mismatch(fn, new[fn])
    return out


# --------------------------------------------------------------------------------------------
# 2. compile keys, 3. selector
# --------------------------------------------------------------------------------------------


def _modeled_names() -> dict[str, set[str]]:
    """The key element names fa4aot's predictions produce (fwd, combine, prepare)."""
    from fa4aot.core.fa4_interface import DEFAULT_PREPARE_OPTIONS, prepare_fields
    from fa4aot.core.variant import Variant
    from fa4aot.tools import fa4_keys
    from fa4aot.tools.fa4_calls import decide

    case = dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128)
    v = Variant.make("fwd_sm100", "sm_100a", 148, **decide("sm_100a", 148, case).fields)
    fwd = set(fa4_keys.fwd_key(v)) | set(fa4_keys.FWD_UNMODELED)
    comb = Variant.make("combine", "sm_100a", 148, dtype="bf16", head_dim=128, num_head=16, log_max_splits=5,
                        varlen=False, seqused=False, has_lse=False, num_splits_dynamic=False)  # fmt: skip
    one = prepare_fields(1, (16, 16), (128, 128), (128, 128), False, False, True, DEFAULT_PREPARE_OPTIONS)
    prep = Variant.make("prepare", "sm_100a", 148, **one, varlen_q=True, seqused_q=False, varlen_k=True,
                        seqused_k=False)  # fmt: skip
    return {"fwd": fwd, "combine": set(fa4_keys.combine_key(comb)), "prepare": set(fa4_keys.prepare_key(prep))}


def compile_keys(old_src: str, new_src: str) -> list[str]:
    from fa4aot.tools import fa4_keys

    old, new = fa4_keys.key_names(old_src), fa4_keys.key_names(new_src)
    out = []
    for fn in fa4_keys.KEYED:
        o, n = old.get(fn), new.get(fn)
        if n is None:
            out.append(f"{fn}: no compile key found in NEW" if o is not None else f"{fn}: absent in both")
            continue
        for name in n:
            if o is None or name not in o:
                out.append(f"{fn} key: adds {name}")
        for name in o or []:
            if name not in n:
                out.append(f"{fn} key: drops {name}")
    try:
        modeled = _modeled_names()
    except Exception as e:  # the pinned selector is needed to build a sample prediction
        return out + [f"(fa4aot's predicted key names unavailable: {type(e).__name__}: {e})"]
    for fn, kind in (("_flash_attn_fwd", "fwd"), ("_flash_attn_fwd_combine", "combine"),
                     ("_get_scheduler_metadata", "prepare")):  # fmt: skip
        missing = [n for n in new.get(fn, []) if n not in modeled[kind] and not n.startswith("*")]
        out += [f"{fn} key: {n} is not modeled by fa4aot" for n in missing]
    return out


def selector_report(old_root: Path, new_root: Path) -> tuple[list[str], Any]:
    """Selector differences, and NEW's selector module (None when it does not load)."""
    from fa4aot.core import selector

    path = new_root.joinpath("flash_attn", *selector.CONFIG_PATH)
    if not path.is_file():
        return [f"NEW has no flash_attn/{'/'.join(selector.CONFIG_PATH)}: no host-only selector to load"], None
    out = []
    try:
        new = selector.load(path.read_bytes(), str(path))
    except selector.SelectorError as e:
        out.append(f"does not load as fa4aot's selector: {e}")
        new = None
    old = selector.installed()
    if new is not None:
        for t in SELECTOR_TYPES:
            of = set(_fields(getattr(old, t)))
            nf = set(_fields(getattr(new, t)))
            out += [f"{t}: adds field {f}" for f in sorted(nf - of)]
            out += [f"{t}: drops field {f}" for f in sorted(of - nf)]
    return out, new


def _fields(cls: Any) -> list[str]:
    if hasattr(cls, "__dataclass_fields__"):
        return list(cls.__dataclass_fields__)
    return list(getattr(cls, "_fields", ()))


# --------------------------------------------------------------------------------------------
# 4. parity, 5. cubins
# --------------------------------------------------------------------------------------------


def parity_report(new_root: Path, sel: Any, calls: int, seed: int) -> list[str]:
    from fa4aot.tools import fa4_parity

    if sel is None:
        return ["not run: NEW's selector does not load"]
    out = []
    for arch, sms in fa4_parity.ARCHES.items():
        cases = [c for _, _, c in fa4_parity.sample_cases(calls, seed, (arch,), sel=sel)]
        try:
            bad = fa4_parity.parity(arch, sms, cases, sel=sel, pythonpath=str(new_root))
        except RuntimeError as e:
            out.append(f"{arch}: NEW's interface did not run in fake mode: {str(e).splitlines()[-1]}")
            continue
        first = collections.Counter(m[0].split(":")[0] for _, m in bad)
        out.append(f"{arch}: {len(cases) - len(bad)} of {len(cases)} calls choose the kernels NEW's FA4 compiles")
        for what, n in first.most_common(MAX_LINES):
            example = next(c for c, m in bad if m[0].split(":")[0] == what)
            out.append(f"  {n} x {what}, e.g. {json.dumps(example)}")
    return out


def cubin_report(new_root: Path, tmp: Path) -> list[str]:
    """Build manifests/ci.yaml against NEW and run verify --against-fa4 on it."""
    manifest = Path(__file__).resolve().parents[2] / "manifests" / "ci.yaml"
    env = child_environ(PYTHONPATH=with_path_first(str(new_root)))
    cache = tmp / "cache"
    cli = [sys.executable, "-m", "fa4aot.tools.cli"]
    build = subprocess.run([*cli, "build", str(manifest), "--cache", str(cache), "-q"], env=env, capture_output=True,
                           text=True)  # fmt: skip
    out = [f"build: {line}" for line in build.stdout.splitlines() if line.startswith("total")]
    if build.returncode != 0:
        out += [f"build exited {build.returncode}: {build.stderr.strip().splitlines()[-1:]}"]
    verify = subprocess.run([*cli, "verify", "--cache", str(cache), "--against-fa4"], env=env, capture_output=True,
                            text=True)  # fmt: skip
    lines = [ln for ln in (verify.stdout + verify.stderr).splitlines() if ln.strip()]
    return out + [f"verify: {ln}" for ln in lines if "identical" in ln or "differ" in ln or "FAILED" in ln][-MAX_LINES:]


# --------------------------------------------------------------------------------------------


def report(new: str, calls: int = 300, seed: int = 1, cubins: bool = False) -> dict[str, Any]:
    """The upgrade report for NEW against the pinned FA4, as sections of lines."""
    with tempfile.TemporaryDirectory(prefix="fa4aot-upgrade-") as t:
        tmp = Path(t)
        new_root, old_root = fa4_root(new, tmp), pinned_root()
        old_src = (old_root / "flash_attn" / "cute" / "interface.py").read_text()
        new_src = (new_root / "flash_attn" / "cute" / "interface.py").read_text()
        sel_lines, sel = selector_report(old_root, new_root)
        out = {
            "pinned": _version(old_root),
            "new": _version(new_root) if _version(new_root) != "unknown version" else str(new),
            "entry points": entry_points(old_src, new_src),
            "compile keys": compile_keys(old_src, new_src),
            "selector": sel_lines,
            "parity": parity_report(new_root, sel, calls, seed),
        }
        if cubins:
            out["cubins"] = cubin_report(new_root, tmp)
    return out


def render(rep: dict[str, Any]) -> str:
    lines = [f"FA4 upgrade report: pinned {rep['pinned']} -> {rep['new']}"]
    for section, items in rep.items():
        if not isinstance(items, list):
            continue
        lines.append(f"\n{section} ({len(items)}):" if items else f"\n{section}: no differences")
        lines += [f"  {x}" for x in items[: MAX_LINES * 4]]
        if len(items) > MAX_LINES * 4:
            lines.append(f"  ... and {len(items) - MAX_LINES * 4} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fa4aot.tools.fa4_upgrade", description=__doc__.split("\n\n")[0])
    ap.add_argument("new", help="the FA4 to compare: a directory holding flash_attn/, a .whl, or a version")
    ap.add_argument("--calls", type=int, default=300, help="random calls per arch for the parity check [300]")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random calls [1]")
    ap.add_argument("--cubins", action="store_true", help="also build manifests/ci.yaml against NEW and verify it")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    rep = report(args.new, args.calls, args.seed, args.cubins)
    print(render(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")


if __name__ == "__main__":
    main()
