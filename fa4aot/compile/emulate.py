"""Run a launch plan built for another host CPU under user-mode emulation.

A plan is FA4's host code linked for one host arch. On an x86_64 build host an aarch64 plan (for
Grace: GB200 / GB300) cannot be loaded, but it can run in a small C program (``plan/runner.c``)
under ``qemu-aarch64``: the runner loads the plan, runs its module load and calls it on argument
buffers packed here, exactly as the runtime packs them, and hands back the shim state after each
call. The same runner built for this host runs the host's own plan on the same bytes, so the two
recordings compare byte for byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fa4aot.compile.toolchain import c_compiler_for, host_arch_here
from fa4aot.core import env
from fa4aot.core.errors import ToolchainError
from fa4aot.core.signature import arg_from_dict
from fa4aot.plan.abi import State, struct_layout
from fa4aot.plan.library import KernelTable, _make_packer, state_template, target_answers

RUNNER_SOURCE = Path(__file__).resolve().parent.parent / "plan" / "runner.c"
#: User-mode emulators per host arch (Debian's qemu-user).
EMULATOR = {"aarch64": "qemu-aarch64", "x86_64": "qemu-x86_64"}
#: Where Debian's cross packages put the target's libc (qemu -L).
SYSROOT = {"aarch64": "/usr/aarch64-linux-gnu", "x86_64": "/usr/x86_64-linux-gnu"}


def emulation_available(host_arch: str) -> str | None:
    """None when plans for ``host_arch`` can run here (natively or emulated), else why not."""
    if host_arch == host_arch_here():
        return None
    if not shutil.which(EMULATOR.get(host_arch, "")):
        return f"no {EMULATOR.get(host_arch, 'emulator')} (apt-get install qemu-user)"
    if not Path(SYSROOT[host_arch], "lib").is_dir():
        return f"no {host_arch} C library at {SYSROOT[host_arch]} (apt-get install gcc-{host_arch}-linux-gnu)"
    try:
        c_compiler_for(host_arch)
    except ToolchainError as e:
        return str(e)
    return None


def runner(host_arch: str) -> list[str]:
    """The command that runs ``plan/runner.c`` for ``host_arch`` plans (compiled once per source)."""
    if why := emulation_available(host_arch):
        raise ToolchainError(f"cannot run {host_arch} launch plans here: {why}")
    src = RUNNER_SOURCE.read_bytes()
    tag = hashlib.sha256(src + host_arch.encode()).hexdigest()[:16]
    cache = Path(env.get(env.XDG_CACHE_HOME, str(Path.home() / ".cache"))) / "fa4aot"
    exe = cache / f"plan-runner-{host_arch}-{tag}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        cmd = [
            c_compiler_for(host_arch),
            "-O2",
            "-std=c11",
            "-D_GNU_SOURCE",
            "-o",
            str(tmp),
            str(RUNNER_SOURCE),
            "-ldl",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise ToolchainError(f"building the plan runner failed:\n{' '.join(cmd)}\n{proc.stderr.strip()}")
        os.replace(tmp, exe)
    if host_arch == host_arch_here():
        return [str(exe)]
    return [EMULATOR[host_arch], "-L", SYSROOT[host_arch], str(exe)]


@dataclass(frozen=True)
class Recorded:
    """What one plan call recorded: its return code, each launch as bytes, and per launch a mask
    of the bytes the host code never wrote (they differ between two calls with the stack filled
    with 0x00 and with 0xff: padding inside parameters and launch attributes)."""

    rc: int
    launches: tuple[bytes, ...]
    undefined: tuple[bytes, ...]


def same_launches(a: Recorded, b: Recorded) -> bool:
    """Equal return codes and launches, byte for byte, outside the bytes either side left undefined."""
    if a.rc != b.rc or len(a.launches) != len(b.launches):
        return False
    for x, y, mx, my in zip(a.launches, b.launches, a.undefined, b.undefined):
        if len(x) != len(y) or any(p != q for p, q, u, v in zip(x, y, mx, my) if not (u or v)):
            return False
    return True


def launch_bytes(st: State) -> tuple[bytes, ...]:
    """Every recorded launch as bytes: kernel, grid, block, smem, stream, the launch attributes
    (cluster etc.) and every parameter byte; nothing the call did not write."""
    out = []
    for i in range(st.n_launches):
        r = st.launches[i]
        head = struct.pack("<Q3I3IQQII", r.kernel, *r.grid, *r.block, r.smem, r.stream, r.n_attrs, r.param_bytes)
        attrs = b"".join(struct.pack("<I", r.attr_id[j]) + bytes(r.attr_val[j]) for j in range(r.n_attrs))
        out.append(head + attrs + bytes(r.params[: r.param_bytes]))
    return tuple(out)


#: Kernel handles the emulated runs hand the plan (any distinct non-zero values do).
def fake_handles(n: int) -> list[int]:
    return [0x1000 * (i + 1) for i in range(n)]


@dataclass
class EmulatedRun:
    """A plan run by the plan runner: the module load's rc and state, and per call the rc and the
    state after it, once with the stack filled with 0x00 and once with 0xff."""

    load_rc: int
    load: State
    calls: list[tuple[int, State, State]]


def run_states(
    plan_bytes: bytes, meta: Mapping[str, Any], smem_optin: int, calls: Sequence[Mapping[str, Any]], host_arch: str
) -> EmulatedRun:
    """Run a plan of ``host_arch`` (natively or emulated) on named argument sets, packed as the
    runtime packs them."""
    sig = [arg_from_dict(a) for a in meta["signature"]["args"]]
    fmt, offsets = struct_layout(sig)
    packer, layout = _make_packer(sig), struct.Struct(fmt)
    size = layout.size + (-layout.size % 8)  # the return slot follows, 8-byte aligned (as _Scratch)
    kernels = [KernelTable.from_meta(k) for k in meta["kernels"]]
    st = state_template(kernels, fake_handles(len(kernels)), *target_answers(smem_optin))
    order = [a.name for a in sig]
    payload = [struct.pack("<3I", ctypes.sizeof(State), len(sig), size), bytes(st)]
    payload.append(struct.pack(f"<{len(offsets)}I", *offsets))
    payload.append(struct.pack("<I", len(calls)))
    for named in calls:
        buf = bytearray(size)
        layout.pack_into(buf, 0, *packer({n: named.get(n) for n in order}))
        payload.append(bytes(buf))
    with tempfile.TemporaryDirectory(prefix="fa4aot-emu-") as tmp:
        path = Path(tmp) / "plan.so"
        path.write_bytes(plan_bytes)
        s = meta["signature"]
        proc = subprocess.run(
            [*runner(host_arch), str(path), s["entry"], s["init"], s["load"]],
            input=b"".join(payload),
            capture_output=True,
            timeout=600,
        )
    if proc.returncode:
        raise ToolchainError(f"the {host_arch} plan runner failed: {proc.stderr.decode(errors='replace')[-500:]}")
    out, pos, ss = proc.stdout, 0, ctypes.sizeof(State)
    if len(out) != (4 + ss) * (1 + 2 * len(calls)):
        raise ToolchainError(f"the {host_arch} plan runner wrote {len(out)} bytes, not a run's worth")

    def take() -> tuple[int, State]:
        nonlocal pos
        (rc,) = struct.unpack_from("<i", out, pos)
        state = State.from_buffer_copy(out, pos + 4)
        pos += 4 + ss
        return rc, state

    load_rc, load = take()
    runs = []
    for _ in calls:
        rc, one = take()
        rc2, two = take()
        if rc != rc2:
            raise ToolchainError(f"the {host_arch} plan returned {rc} and {rc2} on the same arguments")
        runs.append((rc, one, two))
    return EmulatedRun(load_rc, load, runs)


def run_plan(
    plan_bytes: bytes, meta: Mapping[str, Any], smem_optin: int, calls: Sequence[Mapping[str, Any]], host_arch: str
) -> tuple[int, list[Recorded]]:
    """Like :func:`run_states`; returns the module load's rc and what each call recorded."""
    run = run_states(plan_bytes, meta, smem_optin, calls, host_arch)
    recorded = []
    for rc, one_state, two_state in run.calls:
        one, two = launch_bytes(one_state), launch_bytes(two_state)
        if len(one) != len(two) or any(len(x) != len(y) for x, y in zip(one, two)):
            raise ToolchainError(f"the {host_arch} plan recorded different launches on the same arguments")
        undefined = tuple(bytes(int(p != q) for p, q in zip(x, y)) for x, y in zip(one, two))
        recorded.append(Recorded(rc, one, undefined))
    return run.load_rc, recorded
