"""Test helpers. The session's caches: ``built_cache`` (tests/fast.yaml, the fast tier's: about 40
seconds of compiling on 2 cores) and ``ci_cache`` (manifests/ci.yaml, for the full tier, built with
``--reuse`` of the first). Set FA4AOT_TEST_CACHE_DIR to keep them between runs: a later run finds
their entries cached (keys include the toolchain and the kernel sources, so edits rebuild)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_MANIFEST = ROOT / "manifests" / "ci.yaml"
FAST_MANIFEST = ROOT / "tests" / "fast.yaml"
HAS_DSL = importlib.util.find_spec("cutlass") is not None and importlib.util.find_spec("flash_attn") is not None

needs_dsl = pytest.mark.skipif(not HAS_DSL, reason="needs the build extra (CUTLASS DSL + flash-attn-4)")


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the fa4aot CLI in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fa4aot.tools.cli", *args], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"fa4aot {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def build_session_cache(tmp_path_factory, name: str, manifest: Path, reuse: tuple[Path, ...] = ()) -> Path:
    """A cache holding every variant of ``manifest``, compiled by the CLI (entries another session
    cache holds under the same key are copied with ``--reuse``)."""
    if not HAS_DSL:
        pytest.skip("needs the build extra (CUTLASS DSL + flash-attn-4) to compile kernels")
    keep = os.environ.get("FA4AOT_TEST_CACHE_DIR")
    path = Path(keep) / name if keep else tmp_path_factory.mktemp(name)
    args = [arg for r in reuse for arg in ("--reuse", str(r))]
    proc = run_cli("build", str(manifest), "--cache", str(path), "-q", *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path
