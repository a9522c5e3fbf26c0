"""The README's runtime examples, run exactly as written (each in a fresh process)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.split("\n")[0][:30] for b in BLOCKS])
def test_readme_example_runs(gpu_cache, index):
    code = BLOCKS[index]
    if "cupy" in code:
        pytest.importorskip("cupy")
    env = dict(os.environ, FA4AOT_CACHE=str(gpu_cache.resolve()))
    probe = "\nimport sys\nprint('torch imported:', 'torch' in sys.modules)\n"  # appended, example unchanged
    out = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    err = float(lines[-2].split(":")[-1])
    assert err < 0.05, out.stdout
    if "import torch" not in code:  # the CuPy and raw-pointer examples never load torch
        assert lines[-1] == "torch imported: False"
