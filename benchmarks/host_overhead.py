"""Host microseconds per forward call through fa4aot, against the launch floor (GPU).

    python benchmarks/host_overhead.py --cache CACHE [--old-src DIR --old-cache DIR] \\
        [--json out.json] [--plot out.png]

Rows (PyTorch tensors, ``out`` given, torch's current stream, bf16, causal, head_dim 128):

* floor, cuda.bindings: ``cuLaunchKernelEx`` from Python on a prepacked parameter buffer and a
  prebuilt config (what any Python launcher pays the driver);
* floor, C: the shim relaunching a recorded launch (one ctypes call, no FA4 host code);
* batched forward, same shapes (b1 s128 h16);
* varlen forward, same shapes (batch 8, GQA 4: 32 query / 8 KV heads, 64 tokens each);
* varlen forward with max_seqlen_q/k changing on every call (the serving case);
* prepared calls (``fa4aot.prepare_forward``), batched and varlen, checked and through
  ``launch_ptrs`` (unchecked), and ``varying=True`` with the varlen row's batch and max_seqlen
  changing on every call;
* interleaved: the floors, the plain rows issue 27 sets goals for (``_plain_calls.GOAL_ROWS``)
  and the prepared rows timed again together in one process, each repeat one batch of every row
  in rotating order (``_common.medians_interleaved``), so their ratios hold on a noisy host;
* with ``--old-src``/``--old-cache``: the same plain calls through another fa4aot checkout (run in
  a subprocess, e.g. the commit before the runtime redesign) - the baseline, measured in this run.

Each number is the median over ``--repeats`` batches of ``--inner`` back-to-back calls. Before
each batch a sleep kernel (``torch.cuda._sleep``) occupies the stream, so the batch is only
enqueued while the GPU is busy: the time is the host's cost of making the calls, never the
kernels' run time (the launch queue holds far more than one batch). The GPU is synchronised
between batches, outside the timed region. ``gpu_us`` in the JSON is each kernel's own time
(CUDA events), for reference. A cProfile of the varlen call is saved too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import _common
import _plain_calls

from fa4aot.plan.abi import ATTR_NAMES

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))

PLAIN_CALLS = r"""
import json, sys
import torch
import fa4aot
sys.path.append(sys.argv[5])  # benchmarks/, for _common (standard library only): fa4aot is still the checkout's
from _common import median_us as timed
inner, repeats = int(sys.argv[2]), int(sys.argv[3])
rt = fa4aot.open_runtime(sys.argv[1])
def median_us(fn):  # batches enqueued behind a sleep kernel: see SLEEP_CYCLES
    hold = lambda: torch.cuda._sleep(int(sys.argv[4]))
    return timed(fn, inner, repeats, warmup=50, sync=torch.cuda.synchronize, before_batch=hold)
from _plain_calls import calls as make_calls
calls = make_calls(fa4aot, torch)
def snap():
    try:  # (a baseline checkout may have no stats() or other counters)
        return dict(fa4aot.stats().as_dict())
    except Exception:
        return {}
rows, diag = {}, {}
for name, fn in calls.items():
    # each row on its own: the fast path's state (and its pause) starts afresh, as in a process
    # running that workload alone
    fast = sys.modules.get("fa4aot.runtime.fastpath")
    if fast is not None:
        fast.clear(rt)
    s0 = snap()
    rows[name] = median_us(fn)
    s1 = snap()
    diag[name] = {k: s1[k] - s0.get(k, 0) for k in ("fast_calls", "decisions_traced", "decisions_reused") if k in s1}
    diag[name]["calls"] = 50 + repeats * inner
import cProfile, io, pstats
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    calls["varlen forward, max_seqlen and batch changing"]()
prof.disable()
torch.cuda.synchronize()
buf = io.StringIO()
pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
diag["profile: varlen forward, max_seqlen and batch changing"] = buf.getvalue()
print(json.dumps(rows))
print(json.dumps(diag), file=sys.stderr)
"""


#: Cycles of the sleep kernel that keeps the GPU busy while a batch is enqueued (~12 ms at
#: 1.7 GHz: far longer than a batch of calls takes the host, so no kernel of the batch runs while
#: it is being enqueued).
SLEEP_CYCLES = 20_000_000


def median_us(fn, inner: int, repeats: int, sync, sleep: int = SLEEP_CYCLES) -> float:
    """_common.median_us of 50 warm-up calls, each batch enqueued behind a sleep kernel of ``sleep`` cycles."""
    import torch

    return _common.median_us(fn, inner, repeats, warmup=50, sync=sync, before_batch=lambda: torch.cuda._sleep(sleep))


def varying_call(qv, kv, ov, cu, raw: bool = False):
    """A ``prepare_forward(varying=True)`` call taking the varlen row's arguments that change on
    every call (PLAIN_CALLS' ``varlen_batch_changing``: batch 1-128, max_seqlen_q/k changing);
    ``raw``: the same tensors as raw device pointers (another framework's call), on torch's
    current stream read once."""
    import itertools

    import torch

    import fa4aot
    from fa4aot.runtime.tensors import RawTensor

    def as_given(t):
        dtype = "int32" if t.dtype == torch.int32 else "bf16"
        return RawTensor(t.data_ptr(), tuple(t.shape), dtype, device=t.get_device()) if raw else t

    qv, kv, ov, cu = (as_given(t) for t in (qv, kv, ov, cu))
    cus = [as_given(torch.arange(0, 513, 512 // b, dtype=torch.int32, device="cuda")) for b in (1, 2, 4, 8, 16, 32, 64,
                                                                                                 128)]  # fmt: skip
    _KEEP.append(cus)
    steps = itertools.cycle([(cus[i % 8], 512 // (cus[i % 8].shape[0] - 1) + i % 997, i % 13) for i in range(8 * 997)])
    run = fa4aot.prepare_forward(
        qv, kv, kv, ov, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True, varying=True
    )
    stream = torch_stream() if raw else None

    def call() -> None:
        c, m, dk = next(steps)
        run(qv, kv, kv, ov, c, c, max_seqlen_q=m, max_seqlen_k=m + dk, stream=stream)

    return call


#: The floors' calls by row name (floors() fills it): the interleaved rows time them again.
FLOOR_CALLS: dict[str, object] = {}
#: what the floors' calls read (parameter buffers, bound calls, workspaces), kept alive with them
_KEEP: list[object] = []
FLOOR = "floor: cuLaunchKernelEx via cuda.bindings, prepacked"
#: a prepared row's words -> its kernel's cuda.bindings floor row
_KERNEL_FLOORS = {
    "varlen": "floor (varlen kernel): cuLaunchKernelEx via cuda.bindings, prepacked",
    "paged decode": "floor (paged decode kernel): cuLaunchKernelEx via cuda.bindings, prepacked",
}


def interleaved(calls: dict[str, object], inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """The floors and ``calls`` (plain and prepared rows) timed again together, interleaved
    (:func:`_common.medians_interleaved`): a noisy host's slow spells fall on every row alike, so
    the ratios issue 27's goal is about hold within one pass."""
    import torch

    rows = {name: call for name, call in FLOOR_CALLS.items() if "cuda.bindings" in name or name.startswith("floor:")}
    rows.update(calls)
    return _common.medians_interleaved(
        rows, inner, repeats, warmup=50, sync=sync, before_batch=lambda: torch.cuda._sleep(sleep)
    )


def floors(rt, fc, named, label: str, inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """The two launch floors of one call's kernel (``fc``: its analysed call, ``named``: its plan
    arguments): cuda.bindings' cuLaunchKernelEx on prepacked parameters, and the shim relaunching
    the launch it recorded."""
    from cuda.bindings import driver as d

    plan = fc.lv.plan
    stream = named["stream"]
    rec = plan.call(plan.pack(named)).launches[0]
    k = fc.lv.entry.meta["kernels"][0]
    params = (ctypes.c_uint8 * rec.param_bytes).from_buffer_copy(bytes(rec.params[: rec.param_bytes]))
    offsets = [off for _, off, _ in sorted(k["params"])]
    argv = (ctypes.c_void_p * len(offsets))(*(ctypes.addressof(params) + off for off in offsets))
    cfg = d.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = tuple(rec.grid)
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = tuple(rec.block)
    cfg.sharedMemBytes = rec.smem
    cfg.hStream = d.CUstream(stream)
    fn = d.CUfunction(fc.lv.kernels[0])
    argv_addr = ctypes.addressof(argv)
    bound = plan.bind(named)
    s = bound.scratch()
    ptrs = [named[n][0] for n in bound.tensor_names]
    bound(ptrs, stream)  # records the launch; later calls with these addresses relaunch it
    run, addr = bound.run, s.addr
    calls = {
        f"floor{label}: cuLaunchKernelEx via cuda.bindings, prepacked": lambda: d.cuLaunchKernelEx(
            cfg, fn, argv_addr, 0
        ),
        f"floor{label}: C relaunch of a recorded launch (1 ctypes call)": lambda: run(addr),
    }
    FLOOR_CALLS.update(calls)
    _KEEP.append((params, argv, cfg, fn, bound, s, named))  # (the calls hold only their addresses)
    rows = {name: median_us(call, inner, repeats, sync, sleep) for name, call in calls.items()}
    if not label:
        rows.update(attribute_floors(rec, fc.lv.kernels[0], argv_addr, stream, inner, repeats, sync, sleep))
    return rows


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute (cuda.h)
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("val", ctypes.c_uint8 * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [("dims", ctypes.c_uint32 * 7), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint32)]  # fmt: skip


def attribute_floors(rec, function: int, argv_addr: int, stream: int, inner: int, repeats: int, sync,
                     sleep: int) -> dict[str, float]:  # fmt: skip
    """What the driver's launch costs with the launch attributes FA4's host code set (recorded
    in ``rec``; on SM90 cooperative and programmatic stream serialization, both 0: the
    defaults), without them, and through cuLaunchKernel - each one ctypes call into libcuda,
    so the differences are the driver's."""
    cuda = ctypes.CDLL("libcuda.so.1")
    ex, plain = cuda.cuLaunchKernelEx, cuda.cuLaunchKernel
    ex.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    plain.argtypes = [ctypes.c_void_p, *[ctypes.c_uint32] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    attrs = (_LaunchAttribute * max(rec.n_attrs, 1))()
    for i in range(rec.n_attrs):
        attrs[i].id = rec.attr_id[i]
        ctypes.memmove(attrs[i].val, rec.attr_val[i], 64)
    dims = (*rec.grid, *rec.block, rec.smem)
    with_attrs = _LaunchConfig((ctypes.c_uint32 * 7)(*dims), stream, attrs, rec.n_attrs)
    without = _LaunchConfig((ctypes.c_uint32 * 7)(*dims), stream, attrs, 0)
    names = ", ".join(f"{ATTR_NAMES.get(rec.attr_id[i], rec.attr_id[i])}={bytes(rec.attr_val[i][:4]).hex()}"
                      for i in range(rec.n_attrs))  # fmt: skip
    p_with, p_without = ctypes.byref(with_attrs), ctypes.byref(without)
    return {
        f"attributes: cuLaunchKernelEx via ctypes, FA4's attributes ({names})": median_us(
            lambda: ex(p_with, function, argv_addr, None), inner, repeats, sync, sleep
        ),
        "attributes: cuLaunchKernelEx via ctypes, no attributes": median_us(
            lambda: ex(p_without, function, argv_addr, None), inner, repeats, sync, sleep
        ),
        "attributes: cuLaunchKernel via ctypes": median_us(
            lambda: plain(function, *dims, stream, argv_addr, None), inner, repeats, sync, sleep
        ),
    }


def batched_floors(rt, q, o, inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """The floors of the batched forward's own kernel and launch."""
    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.tensors import as_device_tensor

    fc = analyse(rt, q, q, q, None, None, None, None, None, None, None, True, (None, None), 1, None, False, False)
    named = dict(q=fc.q, k=fc.k, v=fc.v, out=as_device_tensor(o, "out"), softmax_scale=fc.scale, stream=torch_stream())
    return floors(rt, fc, named, "", inner, repeats, sync, sleep)


def varlen_floors(rt, qv, kv, ov, cu, inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """The floors of the varlen forward's kernel (its tensor-map workspace allocated once)."""
    import torch

    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.tensors import as_device_tensor
    from fa4aot.runtime.workspaces import workspace_slots

    fc = analyse(rt, qv, kv, kv, cu, cu, 64, 64, None, None, None, True, (None, None), 1, None, False, False)
    named = dict(q=fc.q, k=fc.k, v=fc.v, out=as_device_tensor(ov, "out"), softmax_scale=fc.scale,
                 cu_seqlens_q=fc.cu_q, cu_seqlens_k=fc.cu_k, stream=torch_stream())  # fmt: skip
    if fc.plan.tensormap_workspace:
        ws = torch.empty((workspace_slots(rt, fc), 16), dtype=torch.int64, device="cuda")
        named["tensormap_workspace"] = as_device_tensor(ws, "tensormap_workspace")
        _KEEP.append(ws)  # (the floors launch on it after this returns)
    return floors(rt, fc, named, " (varlen kernel)", inner, repeats, sync, sleep)


def paged_floors(rt, qd, pool, od, used, pt, inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """The floors of the paged decode's kernel: its launch costs more than the batched one's
    (compare the prepared rows), and these say whether the driver or fa4aot adds it."""
    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.tensors import as_device_tensor

    fc = analyse(
        rt, qd, pool, pool, None, None, 1, 128, None, used, None, True, (None, None), 1, None, False, False, pt
    )
    named = dict(q=fc.q, k=fc.k, v=fc.v, out=as_device_tensor(od, "out"), softmax_scale=fc.scale,
                 seqused_k=fc.su_k, page_table=fc.page_table, stream=torch_stream())  # fmt: skip
    return floors(rt, fc, named, " (paged decode kernel)", inner, repeats, sync, sleep)


def breakdown(rt, q, o, inner: int, repeats: int, sync, sleep: int) -> dict[str, float]:
    """Where the batched plain call's host time goes: each step timed on its own."""
    from fa4aot.runtime import validate
    from fa4aot.runtime.forward import analyse
    from fa4aot.runtime.frameworks import default_stream
    from fa4aot.runtime.tensors import as_device_tensor

    def args():
        return (rt, q, q, q, None, None, None, None, None, None, None, True, (None, None), 1, None, False, False)

    a = args()
    fc = analyse(*a)
    od = as_device_tensor(o, "out")
    launch = fc.lv.launch
    stream = default_stream(q)

    def run_launcher():
        # FA4's launch order (loader.FORWARD_ORDER); a dense call has no scheduler buffers or workspace
        launch(fc.q, fc.k, fc.v, od, None, fc.cu_q, fc.cu_k, fc.su_q, fc.su_k, fc.page_table, None, None, None,
               fc.scale, fc.wl, fc.wr, fc.learnable_sink, fc.max_q, None, *fc.scales, stream)  # fmt: skip

    return {
        "describe one torch tensor": median_us(lambda: as_device_tensor(q, "q"), inner, repeats, sync, sleep),
        "check one q/k/v/out tensor": median_us(
            lambda: validate.io(od, "out", 4, rt.device, rt), inner, repeats, sync, sleep
        ),
        "analyse (describe + check q, k, v; dispatch)": median_us(lambda: analyse(*a), inner, repeats, sync, sleep),
        "current stream": median_us(lambda: default_stream(q), inner, repeats, sync, sleep),
        "launcher (pack, FA4 host code, cuLaunchKernelEx)": median_us(run_launcher, inner, repeats, sync, sleep),
    }


def churn(rt, qv, kv, calls: int = 1000, sizes: int = 50) -> dict[str, object]:
    """``calls`` varlen calls cycling through ``sizes`` batch sizes (automatic scheduler metadata
    where the arch uses it): device allocations by fa4aot's driver after one warm-up cycle, and a
    CUDA graph of one cycle replayed against the eager outputs (bitwise)."""
    import torch

    import fa4aot
    from fa4aot.core.targets import ARCHES

    lens = [qv.shape[0] // b for b in range(1, sizes + 1)]
    cus = [torch.arange(0, b * n + 1, n, dtype=torch.int32, device="cuda") for b, n in enumerate(lens, 1)]
    outs = [torch.zeros_like(qv) for _ in cus]

    def one(i: int) -> None:
        c = cus[i % sizes]
        fa4aot.flash_attn_varlen_func(
            qv, kv, kv, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=lens[i % sizes], max_seqlen_k=lens[i % sizes],
            causal=True, num_splits=0, out=outs[i % sizes], runtime=rt,
        )  # fmt: skip

    for i in range(sizes):  # warm-up: every size once
        one(i)
    torch.cuda.synchronize()
    allocs = []
    real_alloc = rt.driver.alloc
    rt.driver.alloc = lambda n: allocs.append(n) or real_alloc(n)
    try:
        for i in range(calls):
            one(i)
        torch.cuda.synchronize()
    finally:
        del rt.driver.alloc
    eager = [o.clone() for o in outs]
    for o in outs:
        o.zero_()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):  # capture on a side stream, as torch.cuda.graph does
        with torch.cuda.graph(graph, stream=s):
            for i in range(sizes):
                one(i)
    graph.replay()
    torch.cuda.synchronize()
    return {
        "calls": calls,
        "batch_sizes": sizes,
        "device_allocations_after_warmup": len(allocs),
        "graph_replay_equals_eager": all(torch.equal(a, b) for a, b in zip(outs, eager)),
        "arch_uses_scheduler_metadata": ARCHES[rt.target.arch].scheduler_metadata,
    }


def gpu_time_us(fn, n: int = 200) -> float:
    """Device time per call (CUDA events around n back-to-back calls)."""
    import torch

    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def torch_stream() -> int:
    import torch

    return torch.cuda.current_stream().cuda_stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("FA4AOT_CACHE", "cache"))
    ap.add_argument("--old-src", default=None, help="another fa4aot checkout to measure as the baseline")
    ap.add_argument("--old-cache", default=None, help="a cache that checkout built (manifests/h100.yaml)")
    ap.add_argument("--inner", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sleep-cycles", type=int, default=SLEEP_CYCLES)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()

    import torch

    import fa4aot

    rt = fa4aot.open_runtime(args.cache)
    src = os.path.dirname(os.path.dirname(os.path.abspath(fa4aot.__file__)))  # (the plain rows' subprocess: the same)
    sync = torch.cuda.synchronize
    bf = torch.bfloat16
    q = torch.randn(1, 128, 16, 128, device="cuda", dtype=bf)
    o = torch.empty_like(q)
    qv = torch.randn(512, 32, 128, device="cuda", dtype=bf)
    kv = torch.randn(512, 8, 128, device="cuda", dtype=bf)
    ov = torch.empty_like(qv)
    cu = torch.arange(0, 513, 64, dtype=torch.int32, device="cuda")
    rows: dict[str, float] = {}
    rows.update(batched_floors(rt, q, o, args.inner, args.repeats, sync, args.sleep_cycles))
    plain_args = [str(args.inner), str(args.repeats), str(args.sleep_cycles), BENCHMARKS]  # PLAIN_CALLS' argv[2:]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_CALLS, args.cache, *plain_args],
        capture_output=True,
        text=True,
        check=True,
        cwd=src,
        env=dict(os.environ, PYTHONPATH=src),
    )
    rows.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    try:  # per row: calls, those the fast path served, decisions traced / reused by region
        by_row = json.loads(proc.stderr.strip().splitlines()[-1])
    except (ValueError, IndexError):
        by_row = {"error": proc.stderr[-2000:]}
    run_b = fa4aot.prepare_forward(q, q, q, o, causal=True)
    run_v = fa4aot.prepare_forward(
        qv, kv, kv, ov, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True
    )
    gpu_us = {
        "batched forward kernel": gpu_time_us(lambda: fa4aot.flash_attn_func(q, q, q, causal=True, out=o)),
        "varlen forward kernel": gpu_time_us(
            lambda: fa4aot.flash_attn_varlen_func(
                qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True, out=ov
            )
        ),
    }
    parts = breakdown(rt, q, o, args.inner, args.repeats, sync, args.sleep_cycles)
    rows["prepared call, batched"] = median_us(
        lambda: run_b(q, q, q, o), args.inner, args.repeats, sync, args.sleep_cycles
    )
    rows["prepared call, varlen"] = median_us(
        lambda: run_v(qv, kv, kv, ov, cu, cu), args.inner, args.repeats, sync, args.sleep_cycles
    )
    rows["prepared call, varying=True, batch and max_seqlen changing"] = median_us(
        varying_call(qv, kv, ov, cu), args.inner, args.repeats, sync, args.sleep_cycles
    )
    qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=bf)
    od = torch.empty_like(qd)
    pool = torch.randn(64, 16, 8, 128, device="cuda", dtype=bf)
    pt = torch.arange(64, dtype=torch.int32, device="cuda").reshape(8, 8)
    used = torch.full((8,), 100, dtype=torch.int32, device="cuda")
    run_d = fa4aot.prepare_forward(qd, pool, pool, od, seqused_k=used, page_table=pt, max_seqlen_k=128, causal=True)
    rows["prepared call, paged decode"] = median_us(
        lambda: run_d(qd, pool, pool, od, used, pt), args.inner, args.repeats, sync, args.sleep_cycles
    )
    ptrs_d = [t.data_ptr() for t in (qd, pool, pool, od, used, pt)]
    stream = torch_stream()  # (read once: the unchecked rows time the launch, not torch's stream lookup)
    rows["prepared call, paged decode, launch_ptrs (unchecked)"] = median_us(
        lambda: run_d.launch_ptrs(*ptrs_d, stream=stream), args.inner, args.repeats, sync, args.sleep_cycles
    )
    for kernel_floors, kernel_args in ((paged_floors, (qd, pool, od, used, pt)), (varlen_floors, (qv, kv, ov, cu))):
        try:
            rows.update(kernel_floors(rt, *kernel_args, args.inner, args.repeats, sync, args.sleep_cycles))
        except Exception as e:  # noqa: BLE001 - a diagnostic row: the table still prints
            print(f"{kernel_floors.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
    # the unchecked entry (engines that validate their own buffers): addresses and a stream handle
    ptrs_b = [t.data_ptr() for t in (q, q, q, o)]
    ptrs_v = [t.data_ptr() for t in (qv, kv, kv, ov, cu, cu)]
    rows["prepared call, batched, launch_ptrs (unchecked)"] = median_us(
        lambda: run_b.launch_ptrs(*ptrs_b, stream=stream), args.inner, args.repeats, sync, args.sleep_cycles
    )
    rows["prepared call, varlen, launch_ptrs (unchecked)"] = median_us(
        lambda: run_v.launch_ptrs(*ptrs_v, stream=stream), args.inner, args.repeats, sync, args.sleep_cycles
    )
    plain = _plain_calls.calls(fa4aot, torch)  # (this checkout's, in this process: interleaved with the floor)
    inter = interleaved(
        {
            **{k: plain[k] for k in _plain_calls.GOAL_ROWS},
            "prepared call, varying=True, batch and max_seqlen changing": varying_call(qv, kv, ov, cu),
            "prepared call, varying=True, raw pointers, batch and max_seqlen changing": varying_call(
                qv, kv, ov, cu, True
            ),
            "prepared call, batched": lambda: run_b(q, q, q, o),
            "prepared call, varlen": lambda: run_v(qv, kv, kv, ov, cu, cu),
            "prepared call, paged decode": lambda: run_d(qd, pool, pool, od, used, pt),
            "prepared call, batched, launch_ptrs (unchecked)": lambda: run_b.launch_ptrs(*ptrs_b, stream=stream),
            "prepared call, varlen, launch_ptrs (unchecked)": lambda: run_v.launch_ptrs(*ptrs_v, stream=stream),
            "prepared call, paged decode, launch_ptrs (unchecked)": lambda: run_d.launch_ptrs(*ptrs_d, stream=stream),
        },
        args.inner,
        args.repeats,
        sync,
        args.sleep_cycles,
    )
    try:
        churned = churn(rt, qv, kv)
    except Exception as e:  # noqa: BLE001 - reported with the table, the rows still print
        churned = {"error": f"{type(e).__name__}: {e}"}
    old: dict[str, float] = {}
    if args.old_src and args.old_cache:
        proc = subprocess.run(
            [sys.executable, "-c", PLAIN_CALLS, args.old_cache, *plain_args],
            capture_output=True,
            text=True,
            cwd=args.old_src,  # `python -c` puts the working directory first on sys.path
            env=dict(os.environ, PYTHONPATH=args.old_src),
        )
        if proc.returncode == 0:
            old = {
                f"baseline ({os.path.basename(args.old_src.rstrip('/'))}): {k}": v
                for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()
            }
        else:
            print("baseline run failed:", proc.stderr[-2000:], file=sys.stderr)

    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        fa4aot.flash_attn_varlen_func(
            qv, kv, kv, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True, out=ov
        )
    prof.disable()
    sync()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)

    from fa4aot.plan import library
    from fa4aot.runtime.driver import CudaDriver

    gpu = CudaDriver().device_info(rt.device).name
    hop = "compiled hop (fa4aot/plan/_hop.c)" if library.HOP is not None else "ctypes"
    print(f"GPU: {gpu}; host microseconds per call, median of {args.repeats} x {args.inner} back-to-back calls")
    print(f"launches through: {hop}")
    floor = rows[FLOOR]
    print(f"{'call':<62} {'us/call':>8} {'x floor':>8}")
    for k, v in {**rows, **old}.items():
        print(f"{k:<62} {v:>8.2f} {v / floor:>8.2f}")
    print("interleaved (every row once per repeat, in rotating order; x its own kernel's floor, same pass):")
    for k, v in inter.items():
        own = (
            inter[FLOOR]
            if k.startswith(("floor:", "prepared call, batched"))
            else next((inter.get(f, inter[FLOOR]) for label, f in _KERNEL_FLOORS.items() if label in k), inter[FLOOR])
        )
        print(f"  {k:<60} {v:>8.2f} {v / inter[FLOOR]:>8.2f} {v / own:>8.2f}")
    for k, v in gpu_us.items():
        print(f"(device time per call, {k}: {v:.2f} us)")
    print(f"varlen calls cycling through batch sizes: {churned}")
    print(f"fast path per row: {json.dumps(by_row)}")
    print("where the batched plain call's host time goes:")
    for k, v in parts.items():
        print(f"  {k:<60} {v:>8.2f}")
    result = {
        "gpu": gpu,
        "launch_hop": hop,
        "inner": args.inner,
        "repeats": args.repeats,
        "host_us": rows,
        "interleaved_us": inter,
        "baseline_us": old,
        "gpu_us": gpu_us,
        "breakdown_us": parts,
        "churn": churned,
        "fast_path_by_row": by_row,
        "profile_varlen": buf.getvalue(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        items = list({**rows, **old}.items())
        colors = ["#888" if k.startswith("floor") else "#c66" if k.startswith("baseline") else "#36c" for k, _ in items]
        title = f"fa4aot forward host overhead, {gpu}"
        _common.plot_host_us(args.plot, dict(items[::-1]), colors[::-1], title, (9, 0.45 * len(items) + 1))


if __name__ == "__main__":
    main()
