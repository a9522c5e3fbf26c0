"""JAX arrays through DLPack (in a fresh process: JAX must not preallocate beside torch)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

JAX_RUN = r"""
import sys, math
import numpy as np
import jax, jax.numpy as jnp
from cuda.bindings import driver as cu
import fa4aot
fa4aot.open_runtime(sys.argv[1])
b, s, h, d = 2, 257, 16, 128
key = jax.random.PRNGKey(0)
q, k, v = (jax.random.normal(kk, (b, s, h, d), dtype=jnp.bfloat16) for kk in jax.random.split(key, 3))
out, lse = fa4aot.flash_attn_func(q, k, v, causal=True, return_lse=True)  # out/lse allocated by JAX
cu.cuCtxSynchronize()  # fa4aot wrote into JAX buffers on its own stream: sync before JAX reads them
qf, kf, vf = (np.asarray(x, dtype=np.float32) for x in (q, k, v))
sc = np.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(d)
sc = np.where(np.tril(np.ones((s, s), dtype=bool)), sc, -np.inf)
ref_lse = np.log(np.exp(sc - sc.max(-1, keepdims=True)).sum(-1)) + sc.max(-1)
p = np.exp(sc - ref_lse[..., None])
ref = np.einsum("bhqk,bkhd->bqhd", p, vf)
err = float(np.abs(np.asarray(out, dtype=np.float32) - ref).max())
lse_err = float(np.abs(np.asarray(lse) - ref_lse).max())
print(type(out).__module__, out.shape, f"{err:.3e}", f"{lse_err:.3e}")
assert err < 3e-2 and lse_err < 1e-3, (err, lse_err)
print("JAX OK")
"""


def test_jax_arrays(gpu_cache):
    pytest.importorskip("jax")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = subprocess.run(
        [sys.executable, "-c", JAX_RUN, str(gpu_cache)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("JAX OK"), out.stdout
