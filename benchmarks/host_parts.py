"""Where a served plain call's host time goes on a GPU host (issue 27): the three goal rows timed
alone and interleaved, then vLLM's paged decode call (``_flash_attn_fwd``) taken apart - its
served function called directly, torch's check of its five tensors, the sequence length read,
torch's current stream, the hop's alignment check, the prepared form's launch, the prepared
call, ``launch_ptrs``, and the public function's own cost with the served function answering at
once.

    python benchmarks/host_parts.py CACHE > parts.json     # from the repository root, on a GPU

CACHE: built from manifests/h100.yaml. Host microseconds per call: medians of 30 x 100 calls
behind a sleep kernel (as host_overhead.py) for rows that launch, timeit medians for the parts
that do not. A diagnostic beside ``host_overhead.py``, which holds the goal table.
"""

import json
import sys
import timeit

import _common
import _plain_calls
from host_overhead import SLEEP_CYCLES, median_us

#: calls of one ``timeit`` batch for the parts that do not launch
PART_CALLS = 20000


def launched(fn) -> float:
    """Host us per call of a row that launches (host_overhead.py's median: 30 x 100 calls)."""
    import torch

    return median_us(fn, 100, 30, torch.cuda.synchronize)


def part(fn, n: int = PART_CALLS) -> float:
    """Host us per call of a part that does not launch (median of 9 timeit batches)."""
    return sorted(timeit.repeat(fn, number=n, repeat=9))[4] / n * 1e6


def goal_rows(fa4aot, torch, rt, fastpath) -> dict[str, float]:
    """The goal rows each alone (the fast path cleared first), then interleaved with each other."""
    calls = _plain_calls.calls(fa4aot, torch)
    out = {}
    for name in _plain_calls.GOAL_ROWS:
        fastpath.clear(rt)
        out["seq: " + name] = launched(calls[name])
    inter = _common.medians_interleaved(
        {k: calls[k] for k in _plain_calls.GOAL_ROWS}, 100, 30, warmup=50, sync=torch.cuda.synchronize,
        before_batch=lambda: torch.cuda._sleep(SLEEP_CYCLES),
    )  # fmt: skip
    out.update({"inter3: " + k: v for k, v in inter.items()})
    return out


def paged_parts(fa4aot, torch, rt, fastpath) -> dict[str, float]:
    """vLLM's paged decode call (``_plain_calls``' shapes) and its parts."""
    from fa4aot.interface import _flash_attn_fwd

    bf = torch.bfloat16
    qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=bf)
    od = torch.empty_like(qd)
    pool = torch.randn(64, 16, 8, 128, device="cuda", dtype=bf)
    pt = torch.arange(64, dtype=torch.int32, device="cuda").reshape(8, 8)
    used = torch.full((8,), 100, dtype=torch.int32, device="cuda")

    def paged():
        _flash_attn_fwd(qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=128, page_table=pt, causal=True,
                        out=od)  # fmt: skip

    fastpath.clear(rt)
    for _ in range(10):
        paged()
    torch.cuda.synchronize()
    serve = fastpath.calls_of(rt).fwd  # (the served function of the call's key, generated Python)
    win = (None, None)

    def direct():
        serve(qd, pool, pool, od, None, None, None, used, pt, None, 1, 128, None, True, win, None, 1, None)

    out = {"paged: full call": launched(paged), "paged: serve direct": launched(direct)}
    g = serve.__globals__
    last = g["_F"].last  # (batch, max_seqlens) -> the decision's prepared form and per-call values
    cur = g["_cur"]
    out["paged: guard (5 tensors)"] = part(lambda: g["_G"](qd, pool, od, used, pt))
    out["paged: numel"] = part(lambda: used.numel())
    out["paged: current stream"] = part(lambda: cur(0))
    out["paged: aligned"] = part(lambda: g["_A"](g["_mk"], qd, pool, pool, od, used, pt))
    st = cur(0)
    out["paged: launch_tensors direct"] = launched(lambda: last[1].launch_tensors(qd, pool, pool, od, used, pt, st,
                                                                                 *last[2]))  # fmt: skip
    pp = fa4aot.prepare_forward(qd, pool, pool, od, seqused_k=used, page_table=pt, max_seqlen_k=128, causal=True,
                                runtime=rt)  # fmt: skip
    out["paged: prepared"] = launched(lambda: pp(qd, pool, pool, od, used, pt))
    ptrs = [t.data_ptr() for t in (qd, pool, pool, od, used, pt)]
    out["paged: prepared launch_ptrs"] = launched(lambda: pp.launch_ptrs(*ptrs, stream=st))
    calls = fastpath.calls_of(rt)
    calls.fwd = lambda *a: 1  # the public function alone: its served function answers at once
    out["paged: mirror only (serve returns 1)"] = part(paged)
    calls.fwd = serve
    # (launching back to back, no sleep kernel: the GPU drains as the host issues)
    out["paged: serve direct, no GPU (timeit)"] = part(direct, 5000)
    return out


def main() -> None:
    import torch

    import fa4aot
    from fa4aot.runtime import fastpath

    rt = fa4aot.open_runtime(sys.argv[1])
    out = goal_rows(fa4aot, torch, rt, fastpath)
    out.update(paged_parts(fa4aot, torch, rt, fastpath))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
