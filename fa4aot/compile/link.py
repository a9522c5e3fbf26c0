"""Link an exported host object with fa4aot's shim into a launch-plan shared library."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fa4aot.compile.toolchain import c_compiler
from fa4aot.core.errors import ToolchainError

SHIM_SOURCE = Path(__file__).resolve().parent.parent / "plan" / "shim.c"


def link_plan(host_object: Path, out: Path, cc: str | None = None) -> None:
    """Compile the shim and link it with ``host_object`` into ``out`` (a .so), with ``cc`` (a
    cross compiler for another host arch) or the build host's C compiler.

    The shim's CUDA-shaped symbols are hidden, so the exported object binds to them at link
    time and never to a real CUDA runtime loaded in the same process; ``-z defs`` makes any other
    undefined symbol a link error instead of a load-time surprise.
    """
    cc = cc or c_compiler()
    cmd = [
        cc,
        "-shared",
        "-fPIC",
        "-O2",
        "-fvisibility=hidden",
        "-std=c11",
        "-Wl,-z,defs",
        "-Wl,-Bsymbolic",
        "-Wl,--build-id=none",
        "-o",
        str(out),
        str(SHIM_SOURCE),
        str(host_object),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise ToolchainError(f"cannot run the C compiler {cc}: {e}") from None
    if proc.returncode != 0:
        raise ToolchainError(f"linking the launch plan failed:\n{' '.join(cmd)}\n{proc.stderr.strip()}")
