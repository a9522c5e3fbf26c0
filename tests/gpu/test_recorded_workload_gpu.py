"""`fa4aot record` end to end on the GPU: the manifest recorded from FA4's JIT running
tests/gpu/fa4_workload.py, built into the cache under test, serves the same workload
through fa4aot with zero misses and outputs bitwise equal to FA4's.

Needs FA4AOT_FA4_HASHES (the hashes the FA4 run wrote) and FA4AOT_GPU_CACHE built from the
recorded manifest (see the README's record loop)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")


def test_recorded_manifest_serves_the_workload_bitwise(gpu_cache, tmp_path, monkeypatch):
    path = os.environ.get("FA4AOT_FA4_HASHES")
    if not path:
        pytest.skip("needs FA4AOT_FA4_HASHES: the output hashes of the workload run through FA4's JIT")
    from fa4_workload import run

    miss = tmp_path / "misses.jsonl"
    monkeypatch.setenv("FA4AOT_MISS_LOG", str(miss))
    ours = run("fa4aot", str(gpu_cache))
    assert not miss.exists(), miss.read_text()
    assert ours == json.loads(open(path).read())
