"""examples/cuda_core_forward.py on the GPU: FA4's forward with cuda.core and NumPy only, in a
process where importing torch or CuPy fails (``sys.modules[name] = None``); its output checked
against NumPy here. Also times spawn-to-first-output of that process and of the same forward in a
CuPy process, and prints both (the test asserts correctness only).

    FA4AOT_GPU_CACHE=cache python -m pytest -q -s tests/gpu/test_cuda_core.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "cuda_core_forward.py"

#: Runs the example with torch and CuPy made unimportable, then reports what got imported.
BLOCKED = """
import json, runpy, sys
sys.modules["torch"] = None
sys.modules["cupy"] = None
sys.argv = [{example!r}, "--cache", {cache!r}, "--save", {save!r}]
runpy.run_path({example!r}, run_name="__main__")
heavy = ("torch", "cupy", "cutlass", "flash_attn", "tvm_ffi")
print(json.dumps({{"imported": sorted(m for m in heavy if sys.modules.get(m) is not None)}}))
"""

#: The same forward from a CuPy process (for the start-up comparison).
CUPY = """
import json, sys, time
t0 = time.perf_counter()
import cupy as cp
import fa4aot
fa4aot.open_runtime(sys.argv[1])
rng = cp.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 256, 16, 128), dtype=cp.float32).astype(cp.float16) for _ in range(3))
out, _ = fa4aot.flash_attn_func(q, k, v, causal=True)
host = cp.asnumpy(out)
print(json.dumps({"ms": {"start to first output": round((time.perf_counter() - t0) * 1e3, 3)}, "finite": bool((host == host).all())}))
"""


def _has_cuda_core() -> bool:
    for name in ("cuda.core", "cuda.core.experimental"):
        try:
            __import__(name)
            return True
        except ImportError:
            continue
    return False


def first_line(cmd: list[str], env: dict[str, str]) -> tuple[str, float, subprocess.CompletedProcess]:
    """The process's first stdout line, seconds from spawn to it, and the finished process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - t0
    rest, err = proc.communicate(timeout=600)
    return line, seconds, subprocess.CompletedProcess(cmd, proc.returncode, line + rest, err)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention of the inputs cast to float32: the test's own, not the example's function
    (the example's check is not its own reference), with the same arithmetic in the same order
    (so both find the same error)."""
    qf, kf, vf = (x.astype(np.float32) for x in (q, k, v))
    future = np.triu(np.ones((q.shape[1],) * 2, dtype=bool), k=1)  # keys after each query
    scores = np.where(future, -np.inf, np.einsum("bqhd,bkhd->bhqk", qf, kf) / np.sqrt(q.shape[-1]))
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, vf)


@pytest.mark.skipif(not _has_cuda_core(), reason="needs cuda.core (pip install cuda-core)")
def test_cuda_core_example_without_torch_or_cupy(gpu_cache, tmp_path):
    save = tmp_path / "out.npz"
    code = BLOCKED.format(example=str(EXAMPLE), cache=str(gpu_cache), save=str(save))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    line, seconds, proc = first_line([sys.executable, "-c", code], env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(line)
    imported = json.loads(proc.stdout.splitlines()[-1])["imported"]
    assert imported == [], f"the example imported {imported}"
    data = np.load(save)
    err = float(np.abs(data["out"].astype(np.float32) - reference(data["q"], data["k"], data["v"])).max())
    assert err < 2e-2, err  # fp16 output against a float32 reference
    assert abs(err - result["max_abs_err"]) < 1e-6  # the example's own check saw the same output
    print(f"\ncuda.core + fa4aot: spawn to first output {seconds * 1e3:.0f} ms; phases (ms): {result['ms']}")
    cupy = pytest.importorskip("cupy", reason="no CuPy for the start-up comparison")
    line, cupy_seconds, proc = first_line([sys.executable, "-c", CUPY, str(gpu_cache)], env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(line)["finite"], "the CuPy forward's output has NaNs"
    print(f"CuPy + fa4aot:      spawn to first output {cupy_seconds * 1e3:.0f} ms (cupy {cupy.__version__})")
