"""The pure-Python cubin reader, on cubins the build produced."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fa4aot.core import cubin
from fa4aot.core.index import Cache
from fa4aot.core.targets import ARCHES


def _cubins(built_cache):
    cache = Cache(built_cache)
    return [(e, cache.read_cubin(e)) for e in cache.entries()]


def test_reader_on_built_cubins(built_cache):
    seen_arches = set()
    for entry, data in _cubins(built_cache):
        c = cubin.parse(data)
        assert c.arch == entry.target.arch
        seen_arches.add(c.arch)
        # e_flags carries the SM number independently of the ptxas command line
        assert c.sm == int(entry.target.arch[3:-1])
        assert c.toolkit and c.toolkit.startswith("13.")
        (k,) = [k for k in c.kernels.values() if k.name in {m["symbol"] for m in entry.meta["kernels"]}]
        ordinals = [p.ordinal for p in k.params]
        assert sorted(ordinals) == list(range(len(ordinals)))
        # parameters are disjoint and inside the parameter buffer
        spans = sorted((p.offset, p.offset + p.size) for p in k.params)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] <= k.cbank_param_size
        assert k.reqntid and k.reqntid[0] % 32 == 0
        assert k.registers and 16 <= k.registers <= 255
    assert seen_arches == set(ARCHES)  # every arch of fa4aot's table


def test_sm100_forward_kernel_facts(built_cache):
    for entry, data in _cubins(built_cache):
        f = entry.variant.fields
        if entry.variant.family == "fwd_sm100" and f["use_2cta_instrs"] and not f["has_lse"]:
            (k,) = cubin.parse(data).kernels.values()
            assert k.reqntid == (512, 1, 1)
            # four 128-byte TMA descriptors (q, k, v, o)
            assert sum(p.size == 128 for p in k.params) == 4
            return
    pytest.fail("ci.yaml has no 2CTA SM100 forward")


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="cuobjdump (CUDA toolkit) not installed")
def test_reader_matches_cuobjdump(built_cache, tmp_path):
    """An independent oracle: NVIDIA's cuobjdump reads the same parameter tables."""
    checked = 0
    for _entry, data in _cubins(built_cache)[:6]:
        path = tmp_path / "k.cubin"
        path.write_bytes(data)
        out = subprocess.run(["cuobjdump", "-elf", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cuobjdump cannot read these cubins: {out.stderr.strip()[:200]}")
        found = {
            (int(o, 16), int(off, 16), int(sz, 16))
            for o, off, sz in re.findall(
                r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*(0x[0-9a-f]+)\s+Size\s*:\s*(0x[0-9a-f]+)", out.stdout
            )
        }
        ours = {(p.ordinal, p.offset, p.size) for k in cubin.parse(data).kernels.values() for p in k.params}
        assert found == ours
        checked += 1
    assert checked


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:40],  # truncated header
        lambda b: b[: len(b) // 2],  # truncated body
        lambda b: b"\x7fELF" + b"\x01" + b[5:],  # 32-bit class
        lambda b: b[:0x12] + b"\x3e\x00" + b[0x14:],  # x86-64 machine
        lambda b: b"MZ" + b[2:],
    ],
)
def test_reader_rejects_malformed(built_cache, mangle):
    _, data = _cubins(built_cache)[0]
    with pytest.raises(cubin.CubinError):
        cubin.parse(mangle(data))
