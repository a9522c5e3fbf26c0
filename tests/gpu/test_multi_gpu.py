"""Two GPUs: a runtime bound to one device refuses tensors of the other whatever protocol they
come through (torch, CuPy, __cuda_array_interface__, raw pointers), launches nothing and leaves
outputs untouched; a runtime bound to the second device computes what the first does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

if torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs (the device tool's nvidia-h100-x2)", allow_module_level=True)

import fa4aot  # noqa: E402
from fa4aot.core.errors import ArgumentError  # noqa: E402
from fa4aot.runtime.loader import Runtime  # noqa: E402
from fa4aot.runtime.tensors import RawTensor  # noqa: E402


class _CAI:
    def __init__(self, t):
        self.__cuda_array_interface__ = {
            "data": (t.data_ptr(), False),
            "shape": tuple(t.shape),
            "typestr": "<f2",
            "strides": None,
            "version": 3,
        }


def test_tensors_of_another_gpu_are_refused_whatever_the_protocol(gpu_cache):
    torch.cuda.set_device(0)
    torch.empty(1, device="cuda:0")
    rt0 = Runtime(gpu_cache)
    assert rt0.device == 0
    shape = (1, 128, 8, 128)
    q0 = torch.randn(shape, device="cuda:0", dtype=torch.float16)
    q1 = torch.randn(shape, device="cuda:1", dtype=torch.float16)
    out = torch.full(shape, 7.0, device="cuda:0", dtype=torch.float16)
    with pytest.raises(ArgumentError, match="q: is on cuda:1"):
        fa4aot.flash_attn_func(q1, q0, q0, out=out, runtime=rt0)
    with pytest.raises(ArgumentError, match="q: is on cuda:1"):
        fa4aot.flash_attn_func(_CAI(q1), _CAI(q0), _CAI(q0), out=_CAI(out), runtime=rt0)
    lying = RawTensor(q1.data_ptr(), shape, "fp16", device=0)
    with pytest.raises(ArgumentError, match="q: is declared on cuda:0 but its memory is on cuda:1"):
        fa4aot.flash_attn_func(lying, q0, q0, out=out, runtime=rt0)
    with pytest.raises(ArgumentError, match="out: is on cuda:1"):
        fa4aot.flash_attn_func(q0, q0, q0, out=torch.empty_like(q1), runtime=rt0)
    cp = pytest.importorskip("cupy")
    with cp.cuda.Device(1):
        c1 = cp.asarray(q1.cpu().numpy())
    with pytest.raises(ArgumentError, match="q: is on cuda:1"):
        fa4aot.flash_attn_func(c1, q0, q0, out=out, runtime=rt0)
    torch.cuda.synchronize(0)
    assert (out == 7.0).all()  # nothing ran


def test_a_runtime_on_the_second_gpu_computes_what_the_first_does(gpu_cache):
    shape = (2, 300, 16, 128)
    q0 = torch.randn(shape, device="cuda:0", dtype=torch.bfloat16)
    rt0 = Runtime(gpu_cache)
    want, _ = fa4aot.flash_attn_func(q0, q0, q0, causal=True, runtime=rt0)
    torch.cuda.set_device(1)
    try:
        torch.empty(1, device="cuda:1")
        rt1 = Runtime(gpu_cache)
        assert rt1.device == 1
        q1 = q0.to("cuda:1")
        got, _ = fa4aot.flash_attn_func(q1, q1, q1, causal=True, runtime=rt1)
        torch.cuda.synchronize(1)
        assert torch.equal(got.cpu(), want.cpu())
    finally:
        torch.cuda.set_device(0)
