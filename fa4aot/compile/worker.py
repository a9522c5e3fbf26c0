"""Compile one variant (runs in a build worker process; imports the CUTLASS DSL and FA4).

One ``cute.compile`` without ``--enable-tvm-ffi`` yields both the cubin and, through
``export_to_c``, FA4's host code as an object file; the object is linked with the shim into the
variant's launch plan, which is then called once on sample shapes as a self-test and to record
what the launch looks like (block, cluster, dynamic smem).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.compile.header import check_against, parse_header
from fa4aot.compile.link import link_plan
from fa4aot.compile.toolchain import c_compiler_for, host_arch_here
from fa4aot.core import cubin as cubin_reader
from fa4aot.core.errors import ToolchainError
from fa4aot.core.variant import Target, Variant, sha256_hex
from fa4aot.plan.library import SHIM_ABI


@dataclass
class BuildOutput:
    """Result of compiling one variant: blob bytes by role plus metadata (or an error)."""

    variant: Variant
    ok: bool
    blobs: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


_CONFIGURED: tuple[str, int] | None = None


def configure(target: Target) -> None:
    """Per-process set-up for a target: DSL arch and the SM-count stand-in.

    Must run before the DSL is imported in this process (the arch is read from the environment
    when the DSL initialises), so build workers call it from their pool initializer.
    """
    global _CONFIGURED
    if _CONFIGURED == (target.arch, target.num_sms):
        return
    if _CONFIGURED is not None and _CONFIGURED[0] != target.arch:
        raise RuntimeError("a build worker serves one target arch; start a new pool per target")
    os.environ["CUTE_DSL_ARCH"] = target.arch
    os.environ.setdefault("CUTE_DSL_LOG_LEVEL", "0")
    from fa4aot_kernels.common import install_target_hardware

    install_target_hardware(target.num_sms)
    _CONFIGURED = (target.arch, target.num_sms)


def build_variant(variant: Variant, target: Target, host_arch: str | None = None) -> BuildOutput:
    """Compile ``variant`` for ``target``, its launch plan for ``host_arch`` hosts (default: this
    machine's); never raises (errors are returned)."""
    t0 = time.perf_counter()
    try:
        configure(target)
        blobs, meta = _build(variant, target, host_arch or host_arch_here())
        out = BuildOutput(variant, True, blobs, meta)
    except Exception as e:  # one failing variant must not stop the build
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        out = BuildOutput(variant, False, error=detail)
        out.meta["traceback"] = traceback.format_exc(limit=8)
    out.seconds = time.perf_counter() - t0
    out.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


#: The CuTe DSL's host-target preset per host arch (``--host-target``; the DSL cross-compiles
#: its host code for AArch64 only).
DSL_HOST_TARGETS = {"aarch64": "linux-aarch64"}


def check_cross_host(host: str) -> None:
    """Raise :class:`ToolchainError` unless this machine can build and test launch plans for
    ``host`` hosts: the DSL must export host code for it, and a plan is stored only after it ran,
    here under emulation."""
    if host not in DSL_HOST_TARGETS:
        raise ToolchainError(
            f"launch plans for {host} hosts cannot be built on {host_arch_here()}: the CuTe DSL exports "
            f"host code for {sorted(DSL_HOST_TARGETS)} only (build them on a {host} machine)"
        )
    from fa4aot.compile.emulate import emulation_available

    if why := emulation_available(host):
        raise ToolchainError(f"cannot test {host} launch plans on this machine: {why}")


def _build(variant: Variant, target: Target, host: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    import cutlass.cute as cute
    from fa4aot_kernels import module_for

    native = host == host_arch_here()
    if not native:
        check_cross_host(host)
    entry = module_for(variant.family).make_entry(variant, target)
    prefix = "fa4aot_" + variant.variant_id[:12]
    with tempfile.TemporaryDirectory(prefix="fa4aot-build-") as tmp:
        tmpd = Path(tmp)
        # --keep-cubin writes <dump-dir>/<function name>.<arch>.cubin and reads it back; the name
        # does not depend on the variant, so every compile needs its own dump dir (a shared one
        # races between workers and hands one variant another's cubin).
        dump = tmpd / "dump"
        dump.mkdir()
        options = f"--gpu-arch {target.arch} --keep-cubin --dump-dir {dump}"
        if not native:  # FA4's host code for the other CPU; the cubin does not change
            options += f" --host-target {DSL_HOST_TARGETS[host]}"
        if entry.options:
            options += " " + entry.options
        t0 = time.perf_counter()
        compiled = cute.compile(entry.fn, *entry.compile_args, options=options)
        compile_s = time.perf_counter() - t0
        cubin_bytes = compiled.artifacts.CUBIN
        if not cubin_bytes:
            raise RuntimeError("the DSL produced no cubin (was --keep-cubin honoured?)")
        compiled.export_to_c(str(tmpd), "plan", prefix)
        header_text = (tmpd / "plan.h").read_text()
        host_object = (tmpd / "plan.o").read_bytes()
        if cubin_bytes not in host_object:
            raise RuntimeError("the cubin is not the one embedded in the exported host object")
        header = parse_header(header_text)
        check_against(header, entry.args)
        link_plan(tmpd / "plan.o", tmpd / "plan.so", cc=c_compiler_for(host))
        plan_bytes = (tmpd / "plan.so").read_bytes()
        # The plan embeds the cubin verbatim: record where, and store the cubin only there.
        cubin_offset = plan_bytes.find(cubin_bytes)
        if cubin_offset < 0 or plan_bytes.find(cubin_bytes, cubin_offset + 1) >= 0:
            raise RuntimeError("the linked plan does not hold the cubin exactly once")
        parsed = cubin_reader.parse(cubin_bytes)
        kernel_names = list(compiled.kernel_info.keys())
        kernels = []
        for name in kernel_names:
            k = parsed.kernels.get(name)
            if k is None:
                raise RuntimeError(f"kernel {name} reported by the DSL is not in the cubin")
            if k.cbank_param_size is None or not k.params:
                raise RuntimeError(f"kernel {name} has no parameter table in .nv.info")
            kernels.append(
                {
                    "symbol": name,
                    "params": k.param_table(),
                    "cbank_param_size": k.cbank_param_size,
                    "reqntid": list(k.reqntid) if k.reqntid else None,
                    "registers": k.registers,
                }
            )
        meta: dict[str, Any] = {
            "cubin_arch": parsed.arch,
            "cubin_sm": parsed.sm,
            "cubin_toolkit": parsed.toolkit,
            "cubin": {"offset": cubin_offset, "size": len(cubin_bytes), "sha256": sha256_hex(cubin_bytes)},
            "kernels": kernels,
            "signature": {
                "prefix": header.prefix,
                "entry": header.entry_symbol,
                "init": header.init_symbol,
                "load": header.load_symbol,
                "args": [a.to_dict() for a in entry.args],
            },
            "compile_seconds": round(compile_s, 3),
            "shim_abi": SHIM_ABI,
        }
        meta["launch"] = _self_test(plan_bytes, meta, variant, target, host)
    # the cubin is stored once, as its own blob; the plan without it (see core.index)
    hollow = plan_bytes[:cubin_offset] + plan_bytes[cubin_offset + len(cubin_bytes) :]
    blobs = {"cubin": cubin_bytes, "plan": hollow, "header": header_text.encode()}
    # FA4's selector (its host-only config.py), which the runtime evaluates to pick among these
    # entries: FA4's host code, stored like the plans (one shared blob per FA4 version)
    from fa4aot.core import selector

    blobs["selector"] = selector.installed_source()[0]
    return blobs, meta


def _self_test(plan_bytes: bytes, meta: dict[str, Any], variant: Variant, target: Target, host: str) -> dict[str, Any]:
    """Call the new plan on sample shapes (in this process, or under emulation for another host
    CPU): proves it runs, and records what the launch is."""
    from fa4aot.core import samples
    from fa4aot.plan.library import module_load_of, open_plan, target_answers

    args = samples.named_args(variant)
    if host == host_arch_here():
        plan = open_plan(plan_bytes, meta)
        load = plan.load(list(range(1, len(meta["kernels"]) + 1)), *target_answers(target.optin_smem()))
        launches = plan.plan(plan.order(args))
    else:
        from fa4aot.compile.emulate import fake_handles, run_states
        from fa4aot.plan.library import launch_of

        run = run_states(plan_bytes, meta, target.optin_smem(), [args], host)
        names = dict(zip(fake_handles(len(meta["kernels"])), (k["symbol"] for k in meta["kernels"])))
        rc, state, _ = run.calls[0]
        if run.load_rc or rc:
            raise RuntimeError(f"the {host} plan failed under emulation (cuda error {run.load_rc or rc})")
        load = module_load_of(run.load, names)
        launches = [launch_of(state.launches[i], names) for i in range(state.n_launches)]
    if not launches:
        raise RuntimeError("the plan recorded no launch for the sample call")
    first = launches[0]
    return {
        "block": list(first.block),
        "smem": first.smem,
        "cluster": list(first.cluster) if first.cluster else None,
        "attributes": {k: v for k, v in first.attribute_values().items()},
        "launches_per_call": len(launches),
        "module_load_set_attributes": [list(x) for x in load.set_attributes],
        "sample_grid": list(first.grid),
        "sample": samples.describe(variant),
    }
