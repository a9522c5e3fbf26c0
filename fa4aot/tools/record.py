"""Learning a manifest from a workload: ``fa4aot record`` and ``fa4aot manifest from-misses``.

``record`` runs a command with two recorders on: fa4aot's runtime appends every variant a call
asks for (``$FA4AOT_RECORD``), and a hook (:mod:`fa4aot.tools.record_hook`) appends every compile
key FA4's own interface looks up. This module maps FA4's keys to fa4aot variants - or to the
reason fa4aot cannot build them - and writes the manifest (:mod:`fa4aot.core.manifest_text`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.core.backward import BACKWARD_FAMILY, CALL_FIELDS, check_call
from fa4aot.core.env import child_environ
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.fa4_interface import FwdFacts, PrepareOptions, codegen_fields, kernel_takes_metadata
from fa4aot.core.families import FAMILIES
from fa4aot.core.fwd import call_group
from fa4aot.core.manifest_text import render_manifest
from fa4aot.core.targets import ARCHES, MODELS, arch_of_compute_capability
from fa4aot.core.variant import FORWARD_FAMILY, Variant
from fa4aot.tools import fa4_keys, record_hook

#: SKUs ``--target`` knows: name -> (arch, SM count).
TARGETS = {m.name: (m.arch, m.num_sms) for m in MODELS.values()}
#: The target a recorded arch maps to without ``--target``.
DEFAULT_TARGET = {a.name: a.default_model for a in ARCHES.values()}
_DTYPES = {
    "BFloat16": "bf16",
    "Float16": "fp16",
    "Float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "Float8E4M3FN": "e4m3",
    "Float8E5M2": "e5m2",
    "float8_e4m3fn": "e4m3",
    "float8_e5m2": "e5m2",
}


class RecordError(Fa4aotError):
    """A record or miss log is unreadable, or names something fa4aot cannot turn into a manifest."""


def _arch(value: Any) -> str | None:
    try:
        major_minor = int(value)  # FA4 keys its compiles on the arch as 10 * major + minor
    except (TypeError, ValueError):
        return None
    return arch_of_compute_capability(divmod(major_minor, 10))


def _dtype(value: Any) -> str | None:
    return _DTYPES.get(str(value).split(".")[-1]) if value is not None else None


def _first(key: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in key:
            return key[n]
    return None


def _unsupported_fwd(k: dict[str, Any], softcap: float | None) -> str | None:
    checks = [
        (
            k.get("qv is not None") or k.get("num_head_kv if qv is not None else None") is not None,
            "FA4's MLA path (qv)",
        ),
        (k.get("mask_mod_hash"), "a mask_mod"),  # False when there is none
        (k.get("score_mod_hash") and softcap is None, "a score_mod other than softcap"),
        (k.get("use_block_sparsity"), "block sparsity"),
        (
            k.get("o_lo is not None") or k.get("virtual_batch_idx is not None"),
            "FA4's internal MLA/virtual-batch buffers",
        ),
        (k.get("gather_kv_length") is not None or k.get("sparse_kv"), "sparse / gathered K/V"),
        (k.get("p is not None") or k.get("row_max is not None"), "FA4's P/row-max outputs"),
        (k.get("seqlen_k_per_split") is not None, "a fixed seqlen_k_per_split"),
    ]
    for hit, why in checks:
        if hit:
            return why
    return None


def fwd_fields(rec: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """(family, fa4aot fields) for a recorded FA4 forward key (4.0.0b40: its FwdConfig first, then
    the call's features; :func:`fa4aot.tools.fa4_keys.fwd_key` is the inverse), or why fa4aot
    cannot build it."""
    k, softcap = rec["key"], rec.get("softcap")
    arch = _arch(k.get("arch"))
    if arch is None:
        return f"arch {k.get('arch')}: fa4aot builds FA4's SM90, SM100/SM103 and SM120 forwards"
    if why := _unsupported_fwd(k, softcap):
        return why
    config = k.get(fa4_keys.FWD_CONFIG)
    if not isinstance(config, dict):
        return "a forward key without FA4's FwdConfig (recorded from another FA4 than 4.0.0b40)"
    dtype = _dtype(k.get("dtype"))
    if dtype not in ("bf16", "fp16", "e4m3", "e5m2"):
        return f"dtype {k.get('dtype')}: fa4aot builds bf16, fp16, e4m3 and e5m2"
    sink = _first(k, *[n for n in k if n.startswith("torch2cute_dtype_map[learnable_sink.dtype]")])
    paged = bool(k["page_table is not None"])
    f = codegen_fields(config)
    f.update(
        dtype=dtype,
        head_dim=int(k["head_dim"]),
        head_dim_v=int(k["head_dim_v"]),
        qhead_per_kvhead=int(k["qhead_per_kvhead"]),
        causal=bool(k["causal"]),
        local=bool(k.get("window_size_left is not None") or k.get("window_size_right is not None")),
        varlen_q=not k["cu_seqlens_q is None"],
        varlen_k=not k["cu_seqlens_k is None"],
        seqused_q=not k["seqused_q is None"],
        seqused_k=not k["seqused_k is None"],
        has_lse=not k["lse is None"],
        paged_kv=("tma" if k.get("paged_kv_tma") else "cpasync") if paged else "none",
        learnable_sink=_dtype(sink) if sink is not None else "none",
        softcap=float(softcap or 0.0),
        num_splits_dynamic=bool(k["num_splits_dynamic is not None"]),
        tile_count_semaphore=bool(k["tile_count_semaphore is not None"]),
        num_nheads_in_l2=bool(k["num_nheads_in_l2 is not None"]),
    )
    if not kernel_takes_metadata(ARCHES[arch].compute_capability[0]):  # FA4's key names what its kernel ignores
        f.update(num_splits_dynamic=False, tile_count_semaphore=False, num_nheads_in_l2=False)
    f.update(_scales_fields(k, dtype))
    return FORWARD_FAMILY[arch], f


#: Where FA4's forward key's ``tensor_broadcast_patterns`` holds the descales' patterns (after
#: q, k, v, qv and page_table: interface.py 1186-1197).
DESCALE_PATTERN_AT = 5


def _scales_fields(k: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The ``descales`` / ``mxfp8`` fields of an FP8 or MXFP8 forward key (fa4_keys.fwd_key)."""
    if k.get("+0") == "mxfp8_qk":
        return {"mxfp8": "pv" if k.get("+2") else "qk"}
    if dtype not in ("e4m3", "e5m2"):
        return {}
    patterns = k.get("tensor_broadcast_patterns") or []
    layouts = []
    for i in range(3):
        if not k.get(f"*(t is not None for t in descales)[{i}]"):
            layouts.append("none")
            continue
        at = DESCALE_PATTERN_AT + i
        pattern = patterns[at] if at < len(patterns) else None
        layouts.append("per_head" if pattern and pattern[0] else "full")
    return {"descales": ",".join(layouts)}


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
    if odd or k.get("sort") or k.get("enable_pdl"):
        return "scheduler metadata with " + (", ".join(odd) or "sorting or PDL")
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
        **_prepare_options(k).fields(),
        _arch=_arch(rec.get("device_arch")),
    )


def _prepare_options(key: dict[str, Any]) -> PrepareOptions:
    """The prepare options a recorded FA4 key holds under FA4's names (JSON turned the floor's
    tuple into a list; a key of an older FA4 may lack one: FA4's default)."""
    given = {n: key[n] for n in PrepareOptions._fields if n in key}
    if given.get("min_blocks_floor") is not None:
        given["min_blocks_floor"] = tuple(int(x) for x in given["min_blocks_floor"])
    return PrepareOptions(**given)


def bwd_fields(rec: dict[str, Any]) -> tuple[str, dict[str, Any]] | str:
    """(family, fields) of a recorded FA4 backward call (:func:`fa4aot.tools.record_hook.backward_record`:
    fa4aot's call fields already), or why fa4aot cannot build it."""
    if rec.get("refused"):
        return "FA4's backward with " + ", ".join(rec["refused"])
    arch = _arch(rec.get("device_arch"))
    family = BACKWARD_FAMILY.get(arch or "")
    if family is None:
        return (
            f"FA4's backward on arch {rec.get('device_arch')}: fa4aot builds backwards for {', '.join(BACKWARD_FAMILY)}"
        )
    fields = dict(rec["key"])
    if sorted(fields) != sorted(CALL_FIELDS):
        return "a backward record of another fa4aot version"
    if why := check_call(family, fields):
        return why
    return family, dict(fields, _arch=arch)


MAPPERS = {"fwd": fwd_fields, "combine": combine_fields, "prepare": prepare_fields, "bwd": bwd_fields}


@dataclass
class Recording:
    """What a record log holds: variants (with their target) and configurations fa4aot cannot build."""

    variants: dict[str, Variant] = field(default_factory=dict)
    #: (configuration, why fa4aot cannot build it) -> how many distinct keys
    unsupported: dict[tuple[str, str], int] = field(default_factory=dict)
    fa4_keys: int = 0
    #: forward variant id -> the shapes and requests of the calls that compiled it (axis -> values)
    shapes: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    def add(self, v: Variant, call: dict[str, Any] | None = None) -> None:
        self.variants.setdefault(v.variant_id, v)
        if call:
            group = self.shapes.setdefault(v.variant_id, {})
            # a backward call's record holds its shapes only (record_hook.backward_shapes)
            axes = call if FAMILIES[v.family].parts is not None else _call_axes(call)
            for axis, value in axes.items():
                if value not in group.setdefault(axis, []):
                    group[axis].append(value)

    def refuse(self, what: str, why: str) -> None:
        self.unsupported[(what, why)] = self.unsupported.get((what, why), 0) + 1


#: FwdFacts fields a recorded call does not carry (its variant holds them; call_group reads none)
_NOT_RECORDED = dict(arch=0, num_sms=0, dtype="bf16", head_dim=0, head_dim_v=0, num_heads=0, total_k=0)


def _call_axes(call: dict[str, Any]) -> dict[str, Any]:
    """A recorded call's shapes and requests as forward manifest axes (one value each): the axes
    fa4aot's own miss lines name (:func:`fa4aot.core.fwd.call_group`)."""
    if "q_capacity" in call:  # record_hook.call_shapes: FwdFacts names
        f = FwdFacts(**_NOT_RECORDED, **{k: tuple(v) if isinstance(v, list) else v for k, v in call.items()})
        return {axis: values[0] for axis, values in call_group(f).items()}
    # the record format before fa4aot 0.1's FwdFacts names (a record log written by an older hook)
    out: dict[str, Any] = {k: call[k] for k in ("batch", "seqlen_q", "seqlen_k", "nheads_kv")}
    out["num_splits"] = "auto" if call.get("num_splits", 1) < 1 else call.get("num_splits", 1)
    out["pack_gqa"] = "auto" if call.get("pack_gqa") is None else bool(call["pack_gqa"])
    if call.get("page_size"):
        out["paged_kv"] = call["page_size"]
    if call.get("window"):  # an open side reaches past every sequence
        big = max(call["seqlen_q"], call["seqlen_k"])
        # FA4 takes a negative side (a window that stops short of the diagonal); the manifest's
        # window axis (sizes for FA4's selection; the kernel is the local one) takes 0 for it
        out["window"] = [max(0, x) if x is not None else big for x in call["window"]]
    return out


def _summary(rec: dict[str, Any]) -> str:
    k = rec["key"]
    parts = [f"{n}={k[n]}" for n in ("head_dim", "head_dim_v", "qhead_per_kvhead", "causal", "dtype") if n in k]
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
            if not fam.selected and (reason := fam.check(fields)):
                out.refuse(_summary(rec), reason)
                continue
            out.add(Variant.make(family, arch, sms, **fields), rec.get("call"))
    return out


def manifest_text(
    rec: Recording,
    header: str,
    target: str | None = None,
    kept: Iterable[tuple[str, int, str, dict[str, list[Any]]]] = (),
    have: Iterable[str] = (),
) -> str:
    """The manifest building everything recorded; unbuildable configurations become comments
    saying why. Merging: ``kept``, the groups of the manifest merged into, stay as written, and
    recorded variants among ``have`` (the ids those groups build) are not added again."""
    names = {}
    if target:
        names[TARGETS[target]] = target
    notes = [f"not buildable by fa4aot: {what}: {why}" for what, why in sorted(rec.unsupported)]
    have = set(have)
    variants = [v for v in rec.variants.values() if v.variant_id not in have]
    return render_manifest(variants, header=header, names=names, notes=notes, shapes=rec.shapes, groups=kept)


#: Signals ``fa4aot record`` passes on to the workload's process group. The workload runs in a
#: session of its own, so a terminal's Ctrl-C reaches only record, which forwards it once.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: What the workload gets if ``fa4aot record`` dies without forwarding (SIGKILL): it is not left
#: running, orphaned.
PARENT_DEATH_SIGNAL = signal.SIGTERM
#: A process killed by signal N exits with status 128 + N, as shells report it.
SIGNAL_EXIT_BASE = 128
#: prctl(2) option: the signal the calling process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def exit_status(returncode: int) -> int:
    """A subprocess return code as an exit status: 128 + N for a process killed by signal N
    (``subprocess`` reports -N; ``sys.exit(-9)`` would exit 247)."""
    return SIGNAL_EXIT_BASE - returncode if returncode < 0 else returncode


def recorded_env(hook_dir: Path, log: Path, no_compile: bool) -> dict[str, str]:
    """The workload's environment: the record log, the session's marks and the generated
    ``sitecustomize`` first on ``PYTHONPATH`` (which processes it records:
    :mod:`fa4aot.tools.record_hook`)."""
    env = child_environ()
    env[record_hook.RECORD_ENV] = str(log)
    env[record_hook.HOOK_ENV] = str(hook_dir)
    env[record_hook.PREFIX_ENV] = sys.prefix
    if no_compile:
        env[record_hook.NO_COMPILE_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH", "")) if p)
    return env


def run_recorded(cmd: list[str], log: Path, no_compile: bool = False) -> int:
    """Run ``cmd`` with both recorders on; its exit status (128 + N if signal N killed it).
    ``no_compile``: the workload runs FA4 on fake tensors, and FA4's ``_compile_misses`` probe
    records instead of compiling.

    SIGINT, SIGTERM and SIGHUP sent to record go to the workload's whole process group, and
    record waits for it (a server stopped this way still has its record written); if record
    itself is killed, the workload gets SIGTERM. The generated ``sitecustomize`` is removed on
    every exit path."""
    hook_dir = Path(tempfile.mkdtemp(prefix="fa4aot-record-"))
    try:
        record_hook.write_sitecustomize(hook_dir)
        return exit_status(_run_forwarding(cmd, recorded_env(hook_dir, log, no_compile)))
    finally:
        shutil.rmtree(hook_dir, ignore_errors=True)


def _run_forwarding(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` in a new session and wait for it, forwarding :data:`FORWARDED_SIGNALS` to its
    process group; its return code."""
    started: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not started:
            pending.append(signum)  # before the workload exists: passed on once it does
            return
        if started[0].returncode is not None:
            return  # reaped: its pid (the group's id) may belong to another process by now
        with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
            os.killpg(started[0].pid, signum)

    main = threading.current_thread() is threading.main_thread()  # handlers: main thread only
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS} if main else {}
    try:
        try:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        except FileNotFoundError:
            raise RecordError(f"cannot run {cmd[0]!r}: not found") from None
        started.append(proc)
        for signum in pending:
            forward(signum, None)
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the workload :data:`PARENT_DEATH_SIGNAL` when
    record (``parent``) dies, or None where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(
            _PR_SET_PDEATHSIG,
            ctypes.c_ulong(PARENT_DEATH_SIGNAL),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
        if os.getppid() != parent:  # record died before the request took effect
            os._exit(SIGNAL_EXIT_BASE + PARENT_DEATH_SIGNAL)

    return preexec


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """While active (in the main thread), SIGTERM and SIGHUP end ``fa4aot record`` as Ctrl-C
    does: by an exception that unwinds, so temporary directories are removed, and with exit
    status 128 + N. :func:`run_recorded` forwards them instead while the workload runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(SIGNAL_EXIT_BASE + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def python_cmd(cmd: list[str]) -> list[str]:
    """``python`` in a recorded command means this interpreter (so the hook's imports resolve;
    Python processes of other environments are not recorded: :mod:`fa4aot.tools.record_hook`)."""
    return [sys.executable, *cmd[1:]] if cmd and cmd[0] in ("python", "python3") else cmd
