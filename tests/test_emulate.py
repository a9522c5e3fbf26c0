"""Launch plans for aarch64 hosts (Grace: GB200 / GB300), built on this x86_64 box and run under
qemu-aarch64: the CuTe DSL exports FA4's host code for the aarch64 triple (``--host-target
linux-aarch64``), Debian's cross gcc links it with the shim, and the plan runner runs both plans
on the same argument bytes. The recorded launches (kernel, grid, block, cluster and the other
attributes, smem, every parameter byte the host code writes) must be identical, and the cubin
must be the native build's."""

from __future__ import annotations

import random

import pytest
from helpers import needs_dsl

from fa4aot.core import samples
from fa4aot.core.index import Cache
from fa4aot.tools.emulate import emulation_available, run_plan, same_launches
from fa4aot.tools.plancheck import random_call

why = emulation_available("aarch64")
needs_emulation = pytest.mark.skipif(why is not None, reason=f"aarch64 emulation unavailable: {why}")
CALLS = 30


@needs_dsl
@needs_emulation
@pytest.mark.parametrize("family", ["fwd_sm100", "fwd_sm90", "fwd_sm120", "combine", "prepare"])
def test_aarch64_plans_record_the_launches_of_the_x86_64_plans(built_cache, family):
    from fa4aot.build.toolchain import fingerprint
    from fa4aot.build.worker import build_cross_plan

    cache = Cache(built_cache)
    entries = [e for e in cache.entries() if e.variant.family == family and e.meta.get("toolchain") == fingerprint()]
    # the variant with the most parameters: the most host code (TMA descriptors, divmods, grids)
    e = max(entries, key=lambda e: (len(e.meta["kernels"][0]["params"]), e.variant_id))
    cubin, plan = build_cross_plan(e.variant, e.target, "aarch64")
    assert cubin == cache.read_cubin(e)
    assert plan[18] == 0xB7  # ELF e_machine EM_AARCH64
    rng = random.Random(f"aarch64:{e.variant_id}")
    if family.startswith("fwd_"):
        calls = [random_call(e, rng)[0] for _ in range(CALLS)]
    else:
        calls = [samples.named_args(e.variant, samples.dims_for(e.variant, batch=b)) for b in range(1, CALLS + 1)]
    rc_x, here = run_plan(cache.read_blob(e, "plan"), e.meta, e.target.optin_smem(), calls, "x86_64")
    rc_a, there = run_plan(plan, e.meta, e.target.optin_smem(), calls, "aarch64")
    assert rc_x == rc_a == 0
    assert all(r.rc == 0 and r.launches for r in here)
    bad = [i for i, (x, a) in enumerate(zip(here, there)) if not same_launches(x, a)]
    assert not bad, f"{len(bad)} of {CALLS} calls record different launches, e.g. call {bad[0]}"
