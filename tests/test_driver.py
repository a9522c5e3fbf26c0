"""The runtime's driver binding switch (FA4AOT_DRIVER): the default, the cuda.bindings one, and a
typed error for anything else - checked without a GPU."""

from __future__ import annotations

import pytest

from fa4aot.runtime.driver import CudaDriver, CudaError
from fa4aot.runtime.loader import make_driver


def test_an_unknown_driver_is_a_typed_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv("FA4AOT_DRIVER", "pycuda")
    with pytest.raises(CudaError, match="ctypes, cuda-bindings"):
        make_driver()


def test_the_default_is_the_ctypes_binding(monkeypatch):
    monkeypatch.delenv("FA4AOT_DRIVER", raising=False)
    try:
        drv = make_driver()
    except CudaError as e:  # no NVIDIA driver on this machine: the ctypes binding says so
        assert "driver" in str(e)
        return
    assert isinstance(drv, CudaDriver)


def test_cuda_bindings_is_chosen_by_name(monkeypatch):
    pytest.importorskip("cuda.bindings.driver", reason="cuda-python is not installed")
    from fa4aot.runtime.driver_bindings import BindingsDriver

    monkeypatch.setenv("FA4AOT_DRIVER", "cuda-bindings")
    try:
        drv = make_driver()
    except CudaError as e:  # cuInit fails without a GPU: a typed error, not cuda-python's
        assert "cuInit" in str(e)
        return
    assert isinstance(drv, BindingsDriver)


def test_the_autograd_backward_binds_a_context_on_its_thread(monkeypatch):
    """PyTorch runs a backward on its autograd thread, where the driver may have no current
    context (an H100 run failed with CUDA_ERROR_INVALID_CONTEXT there): fa4aot.torch's backward
    binds q's device's primary context before the runtime touches the driver."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    import fa4aot.torch as ft
    from fa4aot.runtime import loader

    bound = []
    monkeypatch.setattr(loader, "_DEFAULT", SimpleNamespace(driver=SimpleNamespace(ensure_context=bound.append)))
    monkeypatch.setattr(ft, "flash_attn_backward", lambda *a, **k: (a[1], a[2], a[3]))
    q = torch.zeros(1, 1, 1, 8)
    ft._bwd(
        q, q, q, q, q, q, None, None, None, None, None, None, None, 1.0, False, ft._NONE, ft._NONE, None, 0.0, False
    )
    assert bound == [q.get_device()]
