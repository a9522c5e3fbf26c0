"""GPU tests: need a CUDA GPU and a cache built for it (``FA4AOT_GPU_CACHE``, default ./cache,
e.g. ``fa4aot build manifests/h100.yaml``). Skipped, with the reason, where either is missing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _gpu_reason() -> str | None:
    try:
        from cuda.bindings import driver
    except ImportError:
        return "cuda-python is not installed"
    try:
        if int(driver.cuInit(0)[0]) != 0:
            return "no CUDA driver or GPU (cuInit failed)"
    except Exception as e:  # cuda-python raises when libcuda is absent
        return f"no CUDA driver ({type(e).__name__})"
    err, n = driver.cuDeviceGetCount()
    if int(err) != 0 or n == 0:
        return "no CUDA GPU"
    return None


REASON = _gpu_reason()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)
            if REASON:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {REASON}"))


@pytest.fixture(scope="session")
def gpu_cache() -> Path:
    path = Path(os.environ.get("FA4AOT_GPU_CACHE", "cache"))
    if not (path / "index" / "cache.db").exists():
        pytest.fail(f"no fa4aot cache at {path}: build manifests/h100.yaml and set FA4AOT_GPU_CACHE")
    return path


@pytest.fixture(scope="session")
def runtime(gpu_cache):
    import torch

    torch.cuda.init()
    torch.empty(1, device="cuda")  # make torch's primary context current
    from fa4aot.runtime.loader import Runtime

    return Runtime(gpu_cache)
