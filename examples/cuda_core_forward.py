"""FA4's forward from an fa4aot cache with cuda-python's ``cuda.core`` and NumPy only: no PyTorch,
no CuPy, no CUTLASS DSL, no JIT.

    python examples/cuda_core_forward.py [--cache CACHE] [--save out.npz]

``cuda.core`` makes device 0's primary context current, allocates the device buffers
(stream-ordered, on its own stream) and the pinned host buffers, and copies; fa4aot launches FA4's
kernel on that stream through ``fa4aot.RawTensor`` descriptors of the raw pointers. The result is
checked against a NumPy reference. Prints one JSON line: the error, and how long each phase took
from the script's start to the first output on the host.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

try:  # cuda.core left its experimental namespace in cuda-core 0.4
    from cuda.core import Device, LegacyPinnedMemoryResource
except ImportError:
    from cuda.core.experimental import Device, LegacyPinnedMemoryResource

import fa4aot  # noqa: E402
from fa4aot import RawTensor  # noqa: E402

T_IMPORTS = time.perf_counter()


def host_view(buf, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A NumPy array over a pinned (host-accessible) cuda.core buffer."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = (ctypes.c_char * n).from_address(int(buf.handle))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention in float32 with NumPy ((batch, seq, heads, dim) layout)."""
    q, k, v = (x.astype(np.float32) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    n = q.shape[1]
    s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", default=None, help="the fa4aot cache (default: $FA4AOT_CACHE, installed wheels, ./cache)"
    )
    ap.add_argument("--save", default=None, help="write q, k, v and out to this .npz")
    args = ap.parse_args()

    dev = Device(0)
    dev.set_current()  # the device's primary context, current on this thread
    stream = dev.create_stream()
    t_device = time.perf_counter()
    fa4aot.open_runtime(args.cache)
    t_open = time.perf_counter()

    b, s, h, d = 1, 256, 16, 128
    shape = (b, s, h, d)
    nbytes = b * s * h * d * 2  # fp16
    pinned = LegacyPinnedMemoryResource()
    hq, hk, hv, ho = (pinned.allocate(nbytes) for _ in range(4))
    rng = np.random.default_rng(0)
    for buf in (hq, hk, hv):
        host_view(buf, shape, np.float16)[...] = rng.standard_normal(shape).astype(np.float16)
    dq, dk, dv, do = (dev.allocate(nbytes, stream=stream) for _ in range(4))
    for dst, src in ((dq, hq), (dk, hk), (dv, hv)):
        dst.copy_from(src, stream=stream)

    def t(buf) -> RawTensor:
        return RawTensor(int(buf.handle), shape, "fp16", device=dev.device_id)

    t_inputs = time.perf_counter()
    fa4aot.flash_attn_func(t(dq), t(dk), t(dv), causal=True, out=t(do), stream=stream)
    do.copy_to(ho, stream=stream)
    stream.sync()
    t_out = time.perf_counter()

    q, k, v, out = (host_view(buf, shape, np.float16).copy() for buf in (hq, hk, hv, ho))
    err = float(np.abs(out.astype(np.float32) - reference(q, k, v)).max())
    if args.save:
        np.savez(args.save, q=q, k=k, v=v, out=out)
    ms = {
        "imports": T_IMPORTS - T0,
        "device and stream": t_device - T_IMPORTS,
        "open_runtime": t_open - t_device,
        "buffers and copies": t_inputs - t_open,
        "first forward to host output": t_out - t_inputs,
        "start to first output": t_out - T0,
    }
    print(json.dumps({"max_abs_err": err, "ms": {k: round(v * 1e3, 3) for k, v in ms.items()}}))
    for buf in (dq, dk, dv, do):
        buf.close(stream)
    stream.sync()


if __name__ == "__main__":
    main()
