"""A workload for compute-sanitizer: every kernel family an H100 cache built from
manifests/h100.yaml holds, launched through the fa4aot runtime (forward batched / varlen / decode /
with LSE, in bf16 and fp16, d64 and d128, MHA and GQA, causal or not; combine batched and varlen,
with LSE and per-batch split counts; the prepare kernel with every flag mix), plus prepared calls.

    compute-sanitizer --tool memcheck --report-api-errors all python3 tests/gpu/sanitize_workload.py CACHE

Memory comes from the CUDA driver through ctypes and inputs are filled from the host, so nothing
but fa4aot (and libcuda) makes CUDA API calls: whatever API errors the sanitizer reports are
fa4aot's own. Prints a line per launch group and "WORKLOAD OK" at the end.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

import fa4aot
from fa4aot import RawTensor

_cuda = ctypes.CDLL("libcuda.so.1")
_cuda.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
_cuda.cuCtxSynchronize.argtypes = []

rt = fa4aot.open_runtime(sys.argv[1])
drv = rt.driver
rng = np.random.default_rng(0)
ITEM = {"bf16": 2, "fp16": 2, "fp32": 4, "int32": 4}


def tensor(shape, dtype, values=None, strides=None):
    """A device tensor filled from the host (random unless ``values``)."""
    n = int(np.prod(shape))
    if values is None:
        if dtype == "int32":
            values = np.zeros(n, dtype=np.int32)
        elif dtype == "fp32":
            values = rng.standard_normal(n).astype(np.float32)
        else:  # bf16 / fp16 as their bits: round fp32 through numpy's float16 either way
            values = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    host = np.ascontiguousarray(values)
    ptr = drv.alloc(max(host.nbytes, 16))
    check(_cuda.cuMemcpyHtoD_v2(ptr, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")
    return RawTensor(ptr, tuple(shape), dtype, strides)


def check(rc, what):
    if rc:
        raise RuntimeError(f"{what} failed: CUresult {rc}")


def sync(what):
    check(_cuda.cuCtxSynchronize(), what)
    print("ok:", what, flush=True)


def forward(b, s_q, s_k, h, hk, d, dtype, causal, *, lse=False):
    q, k, v = tensor((b, s_q, h, d), dtype), tensor((b, s_k, hk, d), dtype), tensor((b, s_k, hk, d), dtype)
    out = tensor((b, s_q, h, d), dtype)
    if lse:  # return_lse allocates through the caller's framework; raw pointers use a prepared call
        lse_t = tensor((b, h, s_q), "fp32")
        fa4aot.prepare_forward(q, k, v, out, lse=lse_t, causal=causal)(q, k, v, out, lse_t)
    else:
        fa4aot.flash_attn_func(q, k, v, causal=causal, out=out)
        fa4aot.prepare_forward(q, k, v, out, causal=causal)(q, k, v, out)
    sync(f"forward b{b} sq{s_q} sk{s_k} h{h}/{hk} d{d} {dtype} causal={causal} lse={lse}")


def varlen(lens_q, lens_k, h, hk, d, causal):
    cu_q = tensor((len(lens_q) + 1,), "int32", np.cumsum([0, *lens_q]).astype(np.int32))
    cu_k = tensor((len(lens_k) + 1,), "int32", np.cumsum([0, *lens_k]).astype(np.int32))
    q, k, v = (
        tensor((sum(lens_q), h, d), "bf16"),
        tensor((sum(lens_k), hk, d), "bf16"),
        tensor((sum(lens_k), hk, d), "bf16"),
    )
    out = tensor((sum(lens_q), h, d), "bf16")
    fa4aot.flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        causal=causal,
        out=out,
    )
    sync(f"varlen forward {lens_q}/{lens_k} h{h}/{hk} d{d} causal={causal}")


def decode(b, s_k, h, hk, d):
    used = tensor((b,), "int32", rng.integers(1, s_k + 1, b).astype(np.int32))
    q, k, v = tensor((b, 1, h, d), "bf16"), tensor((b, s_k, hk, d), "bf16"), tensor((b, s_k, hk, d), "bf16")
    out = tensor((b, 1, h, d), "bf16")
    fa4aot.flash_attn_varlen_func(q, k, v, seqused_k=used, causal=True, out=out)
    sync(f"decode b{b} sk{s_k} h{h}/{hk} d{d}")


def combine(b, s, h, d, splits, dtype, *, varlen_=False, with_lse=False, with_nsd=False):
    rows = (b * s,) if varlen_ else (b, s)
    op = tensor((splits, *rows, h, d), "fp32")
    lse_rows = (h, b * s) if varlen_ else (b, h, s)
    lp_t = tensor((splits, *lse_rows), "fp32")
    lp = RawTensor(lp_t.ptr, (splits, *rows, h), "fp32", _swap_last_strides((splits, *lse_rows)))
    out = tensor((*rows, h, d), dtype)
    lse = None
    if with_lse:
        l_t = tensor(lse_rows, "fp32")
        lse = RawTensor(l_t.ptr, (*rows, h), "fp32", _swap_last_strides(lse_rows))
    cu = tensor((b + 1,), "int32", (np.arange(b + 1) * s).astype(np.int32)) if varlen_ else None
    nsd = tensor((b,), "int32", rng.integers(1, splits + 1, b).astype(np.int32)) if with_nsd else None
    fa4aot.combine(op, lp, out, lse, cu_seqlens=cu, num_splits_dynamic=nsd)
    sync(f"combine b{b} s{s} h{h} d{d} splits{splits} {dtype} varlen={varlen_} lse={with_lse} nsd={with_nsd}")


def _swap_last_strides(shape):
    """Strides of a contiguous ``shape`` seen with its last two dimensions swapped."""
    st = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        st[i] = st[i + 1] * shape[i + 1]
    st[-1], st[-2] = st[-2], st[-1]
    return tuple(st)


def prepare(b, h, hk, d, causal, pack_gqa):
    lens = rng.integers(1, 300, b)
    cu_q = tensor((b + 1,), "int32", np.cumsum([0, *lens]).astype(np.int32))
    cu_k = tensor((b + 1,), "int32", np.cumsum([0, *(lens * 3)]).astype(np.int32))
    md = fa4aot.SchedulerMetadata(b, h, hk, d, causal=causal, pack_gqa=pack_gqa)
    md.compute(
        max_seqlen_q=int(lens.max()),
        max_seqlen_k=int(lens.max() * 3),
        num_splits=4,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
    )
    md.reset_semaphore()
    sync(f"prepare b{b} h{h}/{hk} causal={causal} pack_gqa={pack_gqa}")


for dtype in ("bf16", "fp16"):
    for d in (64, 128):
        for h, hk in ((4, 4), (8, 2)):
            forward(1, 200, 333, h, hk, d, dtype, causal=False)
            forward(2, 130, 130, h, hk, d, dtype, causal=True)
forward(1, 100, 260, 4, 4, 128, "bf16", causal=True, lse=True)
forward(1, 100, 260, 4, 4, 128, "bf16", causal=False, lse=True)
for causal in (False, True):
    varlen([5, 0, 129, 1], [40, 7, 300, 129], 8, 2, 128, causal)
    varlen([64, 17], [64, 200], 4, 4, 64, causal)
decode(3, 500, 8, 2, 128)
for dtype in ("bf16", "fp16"):
    for d in (64, 128):
        combine(2, 8, 16, d, 5, dtype)
        combine(2, 8, 16, d, 3, dtype, varlen_=True, with_lse=True, with_nsd=True)
combine(1, 4, 16, 128, 4, "bf16", with_lse=True)
for causal in (False, True):
    for (h, hk), pack in (((16, 16), False), ((16, 4), False), ((16, 4), True)):
        prepare(40, h, hk, 128, causal, pack)
print("WORKLOAD OK", flush=True)
