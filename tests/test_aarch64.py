"""Launch plans for aarch64 hosts (Grace: GB200 / GB300), built on this x86_64 box and checked
under qemu-aarch64.

The CuTe DSL exports FA4's host code for the aarch64 triple (``--host-target linux-aarch64``),
Debian's cross gcc links it with the shim, and ``plan/runner.c`` runs it under emulation. Every
ci.yaml variant is built for both host archs; for each, both plans run on the same argument bytes
(30 sets) and must record the same launches: kernel, grid, block, cluster and the other launch
attributes, smem and every parameter byte the host code writes. The cubin is shared."""

from __future__ import annotations

import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import CI_MANIFEST, needs_dsl, run_cli

from fa4aot.build.emulate import emulation_available, run_plan, same_launches
from fa4aot.core import samples
from fa4aot.core.errors import DeviceMismatchError
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import Runtime
from fa4aot.tools.plancheck import random_call

why = emulation_available("aarch64")
needs_emulation = pytest.mark.skipif(why is not None, reason=f"aarch64 emulation unavailable: {why}")
CALLS = 30


@pytest.fixture(scope="module")
def both_hosts(built_cache, tmp_path_factory) -> Path:
    """The CI cache plus the plans of every ci.yaml variant but the SM100 backward for aarch64 hosts."""
    root = tmp_path_factory.mktemp("both-hosts")
    manifest = root / "ci-both.yaml"
    text = CI_MANIFEST.read_text()
    # the SM100 backward group is left out to keep the suite's time (the SM90 backward kernels
    # stand for the backward families: their plans take the same kinds of arguments)
    text = re.sub(r"\n      bwd_sm100:\n(        .*\n)+", "\n", text)
    assert "bwd_sm100" not in text and "bwd_sm90" in text
    manifest.write_text(re.sub(r"num_sms: (\d+)\}", r"num_sms: \1, host_arch: [x86_64, aarch64]}", text))
    shutil.copytree(built_cache, root / "cache")
    run_cli("build", str(manifest), "--cache", str(root / "cache"), "-q", timeout=3600)  # exit 0: none failed
    return root / "cache"


def _pairs(cache: Cache) -> list:
    by_host: dict[str, dict] = {"x86_64": {}, "aarch64": {}}
    for e in cache.entries():
        by_host.setdefault(e.host_arch, {})[e.variant_id] = e
    return [(by_host["x86_64"][vid], a) for vid, a in sorted(by_host["aarch64"].items()) if vid in by_host["x86_64"]]


@needs_dsl
@needs_emulation
def test_every_ci_variant_records_the_same_launches_on_both_host_archs(both_hosts):
    cache = Cache(both_hosts)
    pairs = _pairs(cache)
    assert len(pairs) == len({e.variant_id for e in cache.entries() if e.host_arch == "aarch64"}) >= 40
    bad = []
    for x, a in pairs:
        assert a.meta["launch"] == x.meta["launch"], a.variant.label()  # the build's emulated self-test
        rng = random.Random(f"aarch64:{x.variant_id}")
        if x.variant.family.startswith("fwd_"):
            calls = [random_call(x, rng)[0] for _ in range(CALLS)]
        else:
            calls = [samples.named_args(x.variant, samples.dims_for(x.variant, batch=b)) for b in range(1, CALLS + 1)]
        rc_x, here = run_plan(cache.read_plan(x), x.meta, x.target.optin_smem(), calls, "x86_64")
        rc_a, there = run_plan(cache.read_plan(a), a.meta, a.target.optin_smem(), calls, "aarch64")
        assert rc_x == rc_a == 0 and all(r.rc == 0 and r.launches for r in here), x.variant.label()
        diff = [i for i, (p, q) in enumerate(zip(here, there)) if not same_launches(p, q)]
        if diff:
            bad.append((x.variant.label(), diff[:3]))
    assert not bad, bad


@needs_dsl
@needs_emulation
def test_the_cubin_is_stored_once_and_only_the_plans_differ(both_hosts):
    cache = Cache(both_hosts)
    for x, a in _pairs(cache):
        assert a.blobs["cubin"] == x.blobs["cubin"], a.variant.label()
        assert a.blobs["plan"].sha256 != x.blobs["plan"].sha256
        assert cache.read_plan(a)[18] == 0xB7 and cache.read_plan(x)[18] == 0x3E  # e_machine: AArch64, x86-64
    cubins = {e.blobs["cubin"].sha256 for e in cache.entries()}
    assert len(list((both_hosts / "blobs").rglob("*.cubin"))) == len(cubins)


@needs_dsl
@needs_emulation
def test_verify_runs_the_aarch64_plans_under_emulation_and_ls_shows_both(both_hosts):
    out = run_cli("verify", "--cache", str(both_hosts))
    assert "0 bad" in out.stdout and "SKIPPED" not in out.stderr
    ls = run_cli("ls", "--cache", str(both_hosts)).stdout
    assert "aarch64" in ls and "x86_64" in ls


@needs_dsl
@needs_emulation
def test_verify_says_it_skipped_the_aarch64_plans_without_emulation(both_hosts):
    no_qemu = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no qemu-aarch64 on the PATH
    out = run_cli("verify", "--cache", str(both_hosts), env=no_qemu)
    assert "SKIPPED running the aarch64 launch plans" in out.stderr and "qemu" in out.stderr
    assert "0 bad" in out.stdout


@needs_dsl
@needs_emulation
def test_an_aarch64_host_gets_the_aarch64_entries_and_an_x86_only_cache_is_refused(
    both_hosts, built_cache, monkeypatch
):
    monkeypatch.setattr("fa4aot.runtime.loader.host_arch", lambda: "aarch64")
    rt = Runtime(both_hosts, driver=FakeDriver(cc=(9, 0), num_sms=132))
    vid = next(iter(rt.index.records))
    assert rt.index.entry(vid).host_arch == "aarch64"
    with pytest.raises(DeviceMismatchError, match=r"x86_64 host.*this host is aarch64"):
        Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=132))


@needs_dsl
@needs_emulation
def test_pack_for_aarch64_hosts_installs_on_one(both_hosts, tmp_path):
    """`pack --host-arch aarch64` on the x86_64 build box gives the archive a Grace node installs
    (read here as an aarch64 host would); an x86_64 host refuses it."""
    from fa4aot.build.archive import ArchiveError, install, read_archive

    out = tmp_path / "gb.fa4"
    run_cli("pack", "--cache", str(both_hosts), "--host-arch", "aarch64", "-o", str(out))
    with open(out, "rb") as f:
        archive = read_archive(f, host_arch="aarch64")
    assert archive.entries and {e.host_arch for e in archive.entries} == {"aarch64"}
    res = install(tmp_path / "node", archive)
    assert len(res.added) == len(archive.entries)
    node = Cache(tmp_path / "node")
    assert all(node.read_plan(e)[18] == 0xB7 for e in node.entries())
    with open(out, "rb") as f, pytest.raises(ArchiveError, match="aarch64"):
        read_archive(f, host_arch="x86_64")


@needs_dsl
def test_a_build_for_aarch64_without_emulation_fails_before_writing_anything(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(
        "target: {name: gb200, arch: sm_100a, num_sms: 152, host_arch: aarch64}\n"
        "families:\n  combine:\n    - {head_dim: 64, num_head: 4, max_splits: 32}\n"
    )
    no_qemu = dict(os.environ, PATH=str(Path(sys.executable).parent))
    out = run_cli("build", str(m), "--cache", str(tmp_path / "c"), env=no_qemu, check=False)
    assert out.returncode == 1 and "qemu-user" in out.stderr and "aarch64" in out.stderr
    assert not (tmp_path / "c").exists()
