"""Learning a manifest from a workload: ``fa4aot record`` and ``fa4aot manifest from-misses``.

``record`` runs a command with two recorders on: fa4aot's runtime appends every variant a call
asks for (``$FA4AOT_RECORD``), and a hook (:mod:`fa4aot.tools.record_hook`) appends every compile
key FA4's own interface looks up. This module maps FA4's keys to fa4aot variants - or to the
reason fa4aot cannot build them - and writes the manifest (:mod:`fa4aot.core.manifest_text`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.core.errors import Fa4aotError
from fa4aot.core.families import FAMILIES
from fa4aot.core.manifest_text import render_manifest
from fa4aot.core.variant import Variant

#: SKUs ``--target`` knows: name -> (arch, SM count).
TARGETS = {
    "b200": ("sm_100a", 148),
    "gb200": ("sm_100a", 152),
    "b300": ("sm_103a", 148),
    "h100": ("sm_90a", 132),
    "h200": ("sm_90a", 132),
}
#: The target a recorded arch maps to without ``--target``.
DEFAULT_TARGET = {"sm_100a": "b200", "sm_103a": "b300", "sm_90a": "h100"}
_DTYPES = {
    "BFloat16": "bf16",
    "Float16": "fp16",
    "Float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
}


class RecordError(Fa4aotError):
    """A record or miss log is unreadable, or names something fa4aot cannot turn into a manifest."""


def _arch(value: Any) -> str | None:
    try:
        major_minor = int(value)
    except (TypeError, ValueError):
        return None
    # SM120's compile keys are not read yet: its calls are reported as unsupported
    return {90: "sm_90a", 100: "sm_100a", 103: "sm_103a"}.get(major_minor)


def _dtype(value: Any) -> str | None:
    return _DTYPES.get(str(value).split(".")[-1]) if value is not None else None


def _first(key: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in key:
            return key[n]
    return None


def _unsupported_fwd(k: dict[str, Any], softcap: float | None) -> str | None:
    checks = [
        (k.get("mla_1cta") or _first(k, "qv is not None"), "FA4's MLA path (qv)"),
        (k.get("mask_mod_hash"), "a mask_mod"),  # False when there is none
        (k.get("score_mod_hash") and softcap is None, "a score_mod other than softcap"),
        (k.get("use_block_sparsity"), "block sparsity"),
        (any(k.get(f"{t}_descale is not None") for t in "qkv"), "fp8 descales"),
        (
            k.get("o_lo is not None") or k.get("virtual_batch_idx is not None"),
            "FA4's internal MLA/virtual-batch buffers",
        ),
        (k.get("gather_kv_length") is not None or k.get("sparse_kv"), "sparse / gathered K/V"),
        (k.get("p is not None") or k.get("row_max is not None"), "FA4's P/row-max outputs"),
    ]
    for hit, why in checks:
        if hit:
            return why
    return None


def fwd_fields(rec: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """(family, fa4aot fields) for a recorded FA4 forward key, or why fa4aot cannot build it."""
    k, softcap = rec["key"], rec.get("softcap")
    arch = _arch(k.get("arch"))
    if arch is None:
        return f"arch {k.get('arch')}: fa4aot builds FA4's SM90 and SM100 forwards only"
    if why := _unsupported_fwd(k, softcap):
        return why
    dtype = _dtype(k.get("dtype"))
    if dtype not in ("bf16", "fp16"):
        return f"dtype {k.get('dtype')}: fa4aot builds bf16 and fp16"
    causal = bool(k["causal"])
    windowed = bool(k.get("window_size_left is not None") or k.get("window_size_right is not None"))
    sink = _first(k, *[n for n in k if n.startswith("torch2cute_dtype_map[learnable_sink.dtype]")])
    f: dict[str, Any] = dict(
        dtype=dtype,
        head_dim=int(k["head_dim"]),
        head_dim_v=int(k["head_dim_v"]),
        qhead_per_kvhead=int(k["nheads_per_kv"]),
        causal=causal,
        local=windowed and not causal,
        varlen_q=not k["cu_seqlens_q is None"],
        varlen_k=not k["cu_seqlens_k is None"],
        seqused_q=not k["seqused_q is None"],
        seqused_k=not k["seqused_k is None"],
        has_lse=not k["lse is None"],
        learnable_sink=_dtype(sink) if sink is not None else "none",
        softcap=float(softcap or 0.0),
        pack_gqa=bool(k["pack_gqa"]),
        tile_m=int(k["tile_m"]),
        tile_n=int(k["tile_n"]),
    )
    paged = bool(k["page_table is not None"])
    f["paged_kv"] = ("tma" if k.get("paged_kv_tma") else "cpasync") if paged else "none"
    if arch == "sm_90a":
        family = "fwd_sm90"
        f.update(mma_pv_is_rs=bool(k["mma_pv_is_rs"]), intra_wg_overlap=bool(k["intra_wg_overlap"]))
    else:
        family = "fwd_sm100"
        if k.get("use_clc_scheduler"):
            scheduler = "clc"
        elif k.get("tile_count_semaphore is not None"):
            scheduler = "dynamic"
        elif k.get("is_static_persistent"):
            scheduler = "static"
        else:
            scheduler = "single"
        f.update(
            split_kv=bool(k["is_split_kv"]),
            q_stage=int(k["q_stage"]),
            two_cta=bool(k["use_2cta_instrs"]),
            scheduler=scheduler,
            s_ping_pong=bool(k["use_s_ping_pong"]),
        )
    return family, f


def combine_fields(rec: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    k = rec["key"]
    if _first(k, "virtual_batch_idx is not None"):
        return "combine with FA4's virtual batches (MLA)"
    if _dtype(k.get("dtype_partial")) != "fp32":
        return f"combine with {k.get('dtype_partial')} partials"
    dtype = _dtype(k.get("dtype"))
    if dtype not in ("bf16", "fp16", "fp32"):
        return f"combine output dtype {k.get('dtype')}"
    arch = _arch(next((v for n, v in k.items() if "arch" in n), None))
    # fa4aot resets the scheduler semaphore itself, so FA4's semaphore_to_reset flag maps away
    return "combine", dict(
        dtype=dtype,
        head_dim=int(k["head_dim"]),
        num_head=int(k["num_head"]),
        log_max_splits=int(k["log_max_splits"]),
        varlen=bool(k["cu_seqlens is not None"]),
        seqused=bool(k["seqused is not None"]),
        has_lse=bool(k["lse is not None"]),
        num_splits_dynamic=bool(k["num_splits_dynamic_ptr is not None"]),
        _arch=arch,
    )


def prepare_fields(rec: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    k = rec["key"]
    odd = [
        n
        for n in (
            "cu_seqlens_k_new is not None",
            "leftpad_k is not None",
            "virtual_batch_idx is not None",
            "n_blocks_per_split is not None",
        )
        if k.get(n)
    ]
    if odd or k.get("sort") or k.get("enable_pdl") or not k.get("zfill_padded_output", True):
        return "scheduler metadata with " + (", ".join(odd) or "sorting, PDL or no zero-fill")
    return "prepare", dict(
        num_warps=int(k["num_warps"]),
        tile_m=int(k["tile_m"]),
        tile_n=int(k["tile_n"]),
        nheads=int(k["nheads"]),
        nheads_kv=int(k["nheads_kv"]),
        headdim=int(k["headdim"]),
        headdim_v=int(k["headdim_v"]),
        causal=bool(k["causal"]),
        pack_gqa=bool(k["pack_gqa"]),
        varlen_q=bool(k["cu_seqlens_q is not None"]),
        varlen_k=bool(k["cu_seqlens_k is not None"]),
        seqused_q=bool(k["seqused_q is not None"]),
        seqused_k=bool(k["seqused_k is not None"]),
        has_semaphore=bool(k["tile_count_semaphore is not None"]),
        _arch=_arch(rec.get("device_arch")),
    )


MAPPERS = {"fwd": fwd_fields, "combine": combine_fields, "prepare": prepare_fields}


@dataclass
class Recording:
    """What a record log holds: variants (with their target) and configurations fa4aot cannot build."""

    variants: dict[str, Variant] = field(default_factory=dict)
    #: (configuration, why fa4aot cannot build it) -> how many distinct keys
    unsupported: dict[tuple[str, str], int] = field(default_factory=dict)
    fa4_keys: int = 0

    def add(self, v: Variant) -> None:
        self.variants.setdefault(v.variant_id, v)

    def refuse(self, what: str, why: str) -> None:
        self.unsupported[(what, why)] = self.unsupported.get((what, why), 0) + 1


def _summary(rec: dict[str, Any]) -> str:
    k = rec["key"]
    parts = [f"{n}={k[n]}" for n in ("head_dim", "head_dim_v", "nheads_per_kv", "causal", "dtype") if n in k]
    return f"FA4 {rec['fa4']} " + " ".join(parts)


def read_log(paths: Iterable[Path], target: str | None = None) -> Recording:
    """Parse record / miss logs (JSON lines from the runtime and from the FA4 hook)."""
    out = Recording()
    want = TARGETS.get(target) if target else None
    if target and want is None:
        raise RecordError(f"--target {target!r}: known targets are {', '.join(sorted(TARGETS))}")
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RecordError(f"cannot read {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "variant" in rec:
                    out.add(Variant.from_dict(rec["variant"]))
                    continue
                kind = rec["fa4"]
                out.fa4_keys += 1
                mapped = MAPPERS[kind](rec)
            except (ValueError, KeyError, TypeError) as e:
                raise RecordError(f"{path}:{n}: not a record line ({type(e).__name__}: {e})") from None
            if isinstance(mapped, str):
                out.refuse(_summary(rec), mapped)
                continue
            family, fields = mapped
            arch = fields.pop("_arch", None) or fields.get("arch") or _arch(rec["key"].get("arch"))
            if arch is None:
                out.refuse(_summary(rec), "an arch fa4aot does not build")
                continue
            if want is not None and want[0] != arch:
                out.refuse(_summary(rec), f"recorded on {arch}, not --target {target}'s {want[0]}")
                continue
            sms = want[1] if want is not None else TARGETS[DEFAULT_TARGET[arch]][1]
            fam = FAMILIES[family]
            if reason := fam.check(fields):
                out.refuse(_summary(rec), reason)
                continue
            out.add(Variant.make(family, arch, sms, **fields))
    return out


def manifest_text(rec: Recording, header: str, target: str | None = None, existing: Iterable[Variant] = ()) -> str:
    """The manifest building ``existing`` plus everything recorded; unbuildable configurations
    become comments saying why."""
    names = {}
    if target:
        names[TARGETS[target]] = target
    notes = [f"not buildable by fa4aot: {what}: {why}" for what, why in sorted(rec.unsupported)]
    variants = list(existing) + list(rec.variants.values())
    return render_manifest(variants, header=header, names=names, notes=notes)


def run_recorded(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` with both recorders on; its exit code."""
    import fa4aot

    hook_dir = Path(tempfile.mkdtemp(prefix="fa4aot-record-"))
    (hook_dir / "sitecustomize.py").write_text("from fa4aot.tools import record_hook\n\nrecord_hook.install()\n")
    pkg_root = str(Path(fa4aot.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["FA4AOT_RECORD"] = str(log)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), pkg_root, env.get("PYTHONPATH", "")) if p)
    try:
        return subprocess.run(cmd, env=env).returncode
    except FileNotFoundError:
        raise RecordError(f"cannot run {cmd[0]!r}: not found") from None
    finally:
        (hook_dir / "sitecustomize.py").unlink(missing_ok=True)
        for p in hook_dir.glob("__pycache__/*"):
            p.unlink()
        for p in (hook_dir / "__pycache__", hook_dir):
            if p.exists():
                p.rmdir()


def python_cmd(cmd: list[str]) -> list[str]:
    """``python`` in a recorded command means this interpreter (so the hook's imports resolve)."""
    return [sys.executable, *cmd[1:]] if cmd and cmd[0] in ("python", "python3") else cmd
