"""The build toolchain fingerprint: everything that changes the bytes a build produces.

Read from package metadata and source files only (no DSL import), so computing keys for a
rebuild that finds everything cached stays cheap.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import shutil
import subprocess
from pathlib import Path

from fa4aot.core import env

#: Distributions whose versions change generated code.
PACKAGES = ("nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "flash-attn-4", "quack-kernels")
#: The versions of FA4 and the CUTLASS DSL this fa4aot builds with: the build extra's pins in
#: pyproject.toml (tests/test_cli.py checks they agree), which `fa4aot --version` prints.
PINNED = {"flash-attn-4": "4.0.0b40", "nvidia-cutlass-dsl": "4.8.1"}

_PKG_ROOT = Path(__file__).resolve().parent.parent  # fa4aot/


def kernels_dir() -> Path:
    """Directory of the ``fa4aot_kernels`` sources (installed or in the checkout)."""
    import fa4aot_kernels

    return Path(fa4aot_kernels.__file__).resolve().parent


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def c_compiler() -> str:
    """The C compiler used to link launch plans ($CC, else cc/gcc/clang on PATH)."""
    for cand in (env.get(env.CC), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    from fa4aot.core.errors import ToolchainError

    raise ToolchainError(
        "no C compiler found (set $CC or install gcc/clang): launch plans are linked with the system C toolchain"
    )


#: Cross C compilers per host arch (Debian's gcc-<triple>-linux-gnu packages).
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc", "x86_64": "x86_64-linux-gnu-gcc"}


def c_compiler_for(host_arch: str) -> str:
    """The C compiler that builds code for ``host_arch`` ($CC_<ARCH>, else the native cc or the
    Debian cross compiler)."""
    chosen = env.cc_for(host_arch)
    if chosen:
        return chosen
    if host_arch == host_arch_here():
        return c_compiler()
    cc = CROSS_CC.get(host_arch)
    if cc and shutil.which(cc):
        return cc
    from fa4aot.core.errors import ToolchainError

    raise ToolchainError(
        f"no C compiler for {host_arch} hosts: install Debian's gcc-{host_arch.replace('_', '-')}-linux-gnu "
        f"(apt-get install gcc-{host_arch.replace('_', '-')}-linux-gnu) or set $CC_{host_arch.upper()}"
    )


@functools.lru_cache(maxsize=4)
def fingerprint(host: str | None = None) -> dict[str, str]:
    """Versions and source hashes that go into every cache key of plans for ``host`` hosts
    (default: this machine's): the C compiler is the one that links them."""
    from fa4aot.core.errors import ToolchainError

    out: dict[str, str] = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            raise ToolchainError(
                f"{pkg} is not installed: install fa4aot's build extra (pip install -e '.[build]' in its checkout)"
            ) from None
    out["cuda-libs"] = _dsl_cuda_flavor()
    out["kernels-src"] = _hash_files(list(kernels_dir().glob("*.py")))
    out["plan-shim"] = _hash_files([_PKG_ROOT / "plan" / "shim.c"])
    cc = c_compiler() if host in (None, host_arch_here()) else c_compiler_for(host)
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError as e:
        raise ToolchainError(f"cannot run the C compiler {cc}: {e}") from None
    out["cc"] = ver.splitlines()[0] if ver else cc
    return out


def _dsl_cuda_flavor() -> str:
    """Which CUDA libs flavour of the DSL is installed (cu13 wins, as the DSL itself picks)."""
    for flavour in ("cu13", "cu12"):
        try:
            return f"{flavour}:{importlib.metadata.version(f'nvidia-cutlass-dsl-libs-{flavour}')}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def host_arch_here() -> str:
    """This machine's CPU architecture."""
    return platform.machine()


def host_arch() -> str:
    """CPU architecture launch plans are built for (the machine running the build)."""
    return platform.machine()
