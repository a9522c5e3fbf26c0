"""Training start-up: from process start to the end of the first training step, fa4aot against
FA4's JIT (empty and warm FA4 disk cache), for 1 and for N concurrent processes on one GPU.

    python benchmarks/train_startup.py --cache CACHE [--procs 1 8] [--json out.json] [--md out.md]

Each process imports torch, builds a 2-layer attention model (d128, 8 query heads, 2 KV heads,
causal, bf16, batch 2 x 2048 tokens), and runs one step (forward, loss, backward, SGD update,
synchronised). Reported per process: ``total`` (spawn to the end of the step) and the attention
library's own share: for fa4aot its import and ``open_runtime`` plus the host time of its forward
and backward calls in the step (validation, loading the kernels from the cache, launches); for
FA4 its import and the host time of its ``_flash_attn_fwd`` / ``_flash_attn_bwd`` calls (compiles
or disk-cache loads included). One unreported warm-up process runs first.
Medians and maxima over the processes of a run. fa4aot is byte-compiled first, as an installed
package is. Needs FA4 importable for the FA4 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = r"""
import json, sys, time
t_spawn, impl, cache = float(sys.argv[1]), sys.argv[2], sys.argv[3]
import torch
torch.cuda.init(); torch.empty(1, device="cuda")
share = [0.0]
import functools
def timed(f):
    @functools.wraps(f)  # keeps FA4's compile_cache attribute reachable
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            share[0] += time.perf_counter() - t
    return g
if impl == "fa4aot":
    t = time.perf_counter()
    import fa4aot, fa4aot.torch as ft
    fa4aot.open_runtime(cache)
    t_open = time.perf_counter() - t
    share[0] += t_open
    ft.forward, ft.flash_attn_backward = timed(ft.forward), timed(ft.flash_attn_backward)
    attn = ft.flash_attn_func
else:
    t = time.perf_counter()
    from flash_attn.cute import interface as I
    share[0] += time.perf_counter() - t
    I._flash_attn_fwd, I._flash_attn_bwd = timed(I._flash_attn_fwd), timed(I._flash_attn_bwd)
    attn = I.flash_attn_func

class Model(torch.nn.Module):
    def __init__(self, dim=1024, h=8, hk=2, layers=2):
        super().__init__()
        self.h, self.hk, self.d = h, hk, dim // h
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, (h + 2 * hk) * self.d, bias=False) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(layers))
    def forward(self, x):
        b, s, _ = x.shape
        for qkv, proj in zip(self.qkv, self.proj):
            q, k, v = qkv(x).split([self.h * self.d, self.hk * self.d, self.hk * self.d], dim=-1)
            o, _ = attn(q.view(b, s, self.h, self.d), k.view(b, s, self.hk, self.d), v.view(b, s, self.hk, self.d),
                        causal=True)
            x = x + proj(o.reshape(b, s, -1))
        return x

torch.manual_seed(0)
model = Model().cuda().to(torch.bfloat16)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(2, 2048, 1024, device="cuda", dtype=torch.bfloat16)
loss = model(x).float().pow(2).mean()
loss.backward()
opt.step()
torch.cuda.synchronize()
t_end = time.time()
extra = {}
if impl == "fa4aot":
    rt = fa4aot.default_runtime()
    for lv in rt._loaded.values():
        for k, v in lv.load_seconds.items():
            extra[k] = extra.get(k, 0.0) + v
    extra = {"loaded": len(rt._loaded), "import_open_s": t_open, **extra}
print(json.dumps({"total_s": t_end - t_spawn, "share_s": share[0], "loss": loss.item(), **extra}))
"""


def run_procs(impl: str, n: int, cache: str, env: dict) -> list[dict]:
    procs = []
    for _ in range(n):
        t = time.time()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", STEP, repr(t), impl, cache],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
        )
    out = []
    for p in procs:
        so, se = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{impl}: a process failed: {se[-2000:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def summarise(name: str, n: int, res: list[dict]) -> dict:
    tot = [r["total_s"] for r in res]
    share = [r["share_s"] for r in res]
    out = dict(config=name, procs=n, total_median_s=statistics.median(tot), total_max_s=max(tot),
               share_median_ms=statistics.median(share) * 1e3, share_max_ms=max(share) * 1e3)  # fmt: skip
    # fa4aot's share, phase by phase (medians, ms): import + open_runtime, and kernel loading
    for k in ("import_open_s", "read_and_hash", "cubin_load", "plan_dlopen", "module_load", "launcher"):
        if k in res[0]:
            out[f"{k.removesuffix('_s')}_ms"] = statistics.median(r[k] for r in res) * 1e3
    out["per_process"] = res  # every process's own numbers (seconds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-fa4", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    # byte-compile fa4aot as installing it does (pip writes .pyc; torch's and FA4's installs have
    # theirs), so a source checkout run under PYTHONDONTWRITEBYTECODE does not recompile per process
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "fa4aot")], check=True)
    run_procs("fa4aot", 1, a.cache, env)  # warm-up (page cache of torch and CUDA): not reported
    rows = []
    for n in a.procs:
        rows.append(summarise("fa4aot", n, run_procs("fa4aot", n, a.cache, env)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_process"}), flush=True)
        if a.no_fa4:
            continue
        with tempfile.TemporaryDirectory() as d:  # FA4's opt-in disk cache, empty then warm
            fenv = dict(env, FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED="1", FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=d)
            rows.append(summarise("FA4, empty cache", n, run_procs("fa4", n, a.cache, fenv)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_process"}), flush=True)
            rows.append(summarise("FA4, warm cache", n, run_procs("fa4", n, a.cache, fenv)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_process"}), flush=True)
    import torch

    res = {"gpu": torch.cuda.get_device_name(), "rows": rows}
    lines = [
        f"# Training start-up on {res['gpu']}: spawn to the end of the first step (2-layer GQA model)",
        "",
        "| library | processes | total median s | total max s | library's own share median ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['procs']} | {r['total_median_s']:.2f} | {r['total_max_s']:.2f} "
            f"| {r['share_median_ms']:.1f} | {r['share_max_ms']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
