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

sys.path.insert(0, "benchmarks")
import torch
from _common import median_us as timed
from _common import medians_interleaved
from _plain_calls import calls as make_calls

import fa4aot
from fa4aot.interface import _flash_attn_fwd
from fa4aot.runtime import fastpath

rt = fa4aot.open_runtime(sys.argv[1])
SLEEP = 20_000_000


def med(fn, inner=100, repeats=30):
    return timed(
        fn, inner, repeats, warmup=50, sync=torch.cuda.synchronize, before_batch=lambda: torch.cuda._sleep(SLEEP)
    )


def ti(fn, n=20000):
    return sorted(timeit.repeat(fn, number=n, repeat=9))[4] / n * 1e6


out = {}
calls = make_calls(fa4aot, torch)
for name in (
    "batched forward, same shapes",
    "varlen forward, max_seqlen and batch changing",
    "paged decode, _flash_attn_fwd",
):
    fastpath.clear(rt)
    out["seq: " + name] = med(calls[name])
# interleaved, the three rows alone
out.update(
    {
        "inter3: " + k: v
        for k, v in medians_interleaved(
            {
                k: calls[k]
                for k in (
                    "batched forward, same shapes",
                    "varlen forward, max_seqlen and batch changing",
                    "paged decode, _flash_attn_fwd",
                )
            },
            100,
            30,
            warmup=50,
            sync=torch.cuda.synchronize,
            before_batch=lambda: torch.cuda._sleep(SLEEP),
        ).items()
    }
)
# paged decode pieces
bf = torch.bfloat16
qd = torch.randn(8, 1, 32, 128, device="cuda", dtype=bf)
od = torch.empty_like(qd)
pool = torch.randn(64, 16, 8, 128, device="cuda", dtype=bf)
pt = torch.arange(64, dtype=torch.int32, device="cuda").reshape(8, 8)
used = torch.full((8,), 100, dtype=torch.int32, device="cuda")


def paged():
    _flash_attn_fwd(
        qd, pool, pool, seqused_k=used, max_seqlen_q=1, max_seqlen_k=128, page_table=pt, causal=True, out=od
    )


fastpath.clear(rt)
for _ in range(10):
    paged()
torch.cuda.synchronize()
serve = fastpath.calls_of(rt).fwd
win = (None, None)


def direct():
    serve(qd, pool, pool, od, None, None, None, used, pt, None, 1, 128, None, True, win, None, 1, None)


out["paged: full call"] = med(paged)
out["paged: serve direct"] = med(direct)
g = serve.__globals__
fam = g["_F"]
e = fam.last[1]
vals = fam.last[2]
G = g["_G"]
cur = g["_cur"]
A = g["_A"]
mk = g["_mk"]
out["paged: guard (5 tensors)"] = ti(lambda: G(qd, pool, od, used, pt))
out["paged: numel"] = ti(lambda: used.numel())
out["paged: current stream"] = ti(lambda: cur(0))
out["paged: aligned"] = ti(lambda: A(mk, qd, pool, pool, od, used, pt))
st = cur(0)
lt = e.launch_tensors
out["paged: launch_tensors direct"] = med(lambda: lt(qd, pool, pool, od, used, pt, st, *vals))
pp = fa4aot.prepare_forward(
    qd, pool, pool, od, seqused_k=used, page_table=pt, max_seqlen_k=128, causal=True, runtime=rt
)
out["paged: prepared"] = med(lambda: pp(qd, pool, pool, od, used, pt))
ptrs = [t.data_ptr() for t in (qd, pool, pool, od, used, pt)]
out["paged: prepared launch_ptrs"] = med(lambda: pp.launch_ptrs(*ptrs, stream=st))
# the mirror with the serve answering at once
calls_obj = fastpath.calls_of(rt)
calls_obj.fwd = lambda *a: 1
out["paged: mirror only (serve returns 1)"] = ti(paged)
calls_obj.fwd = serve
out["paged: serve direct, no GPU (timeit)"] = ti(direct, 5000)
print(json.dumps(out, indent=1))
