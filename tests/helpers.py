"""Test helpers. ``build_ci_cache`` compiles manifests/ci.yaml once per session (about a minute
on 2 cores); set FA4AOT_TEST_CACHE to reuse a cache built earlier from the same sources."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_MANIFEST = ROOT / "manifests" / "ci.yaml"
HAS_DSL = importlib.util.find_spec("cutlass") is not None and importlib.util.find_spec("flash_attn") is not None

needs_dsl = pytest.mark.skipif(not HAS_DSL, reason="needs the build extra (CUTLASS DSL + flash-attn-4)")


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the fa4aot CLI in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fa4aot.tools.cli", *args], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"fa4aot {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def build_ci_cache(tmp_path_factory) -> Path:
    """A cache holding every variant of manifests/ci.yaml."""
    if not HAS_DSL:
        pytest.skip("needs the build extra (CUTLASS DSL + flash-attn-4) to compile kernels")
    path = Path(os.environ.get("FA4AOT_TEST_CACHE") or tmp_path_factory.mktemp("ci-cache"))
    proc = run_cli("build", str(CI_MANIFEST), "--cache", str(path), "-q", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path
