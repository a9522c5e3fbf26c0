"""The Python examples of README.md and docs/*.md marked ``<!-- doc-test: gpu (...) -->``, run as
written, each in a fresh process, on the GPU cache (FA4AOT_GPU_CACHE). An example that ends by
printing ``max ...: <error>`` must print an error below 0.05 (bf16 / fp16 against a float32 or
SDPA reference)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from test_docs import gpu_blocks

BLOCKS = [b for b in gpu_blocks() if b.lang == "python"]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_gpu_example_runs(gpu_cache, block, tmp_path):
    for module in ("cupy", "cuda.bindings"):
        if re.search(rf"^\s*(import|from) {re.escape(module)}\b", block.text, re.M) and not importlib.util.find_spec(
            module.split(".")[0]
        ):
            pytest.skip(f"{block.where} needs {module}")
    env = dict(os.environ, FA4AOT_CACHE=str(gpu_cache.resolve()))
    out = subprocess.run(
        [sys.executable, "-c", block.text], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, f"{block.where}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    m = re.match(r"max .*:\s*(\S+)$", last)
    if m:
        assert float(m[1]) < 0.05, f"{block.where}: {last}"
