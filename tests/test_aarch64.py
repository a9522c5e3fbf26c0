"""Launch plans for aarch64 hosts (Grace: GB200 / GB300), built on this x86_64 box and checked
under qemu-aarch64.

The CuTe DSL exports FA4's host code for the aarch64 triple (``--host-target linux-aarch64``),
Debian's cross gcc links it with the shim, and ``plan/runner.c`` runs it under emulation. A forward
and a combine kernel (fast tier) and every ci.yaml variant but the SM100 backward (full tier) are
built for both host archs; for each, both plans run on the same argument bytes (30 sets) and must
record the same launches: kernel, grid, block, cluster and the other launch attributes, smem and
every parameter byte the host code writes. The cubin is shared."""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import CI_MANIFEST, needs_dsl, run_cli

from fa4aot.compile.emulate import emulation_available, run_plan, same_launches
from fa4aot.core import samples
from fa4aot.core.errors import DeviceMismatchError
from fa4aot.core.index import Cache
from fa4aot.runtime.loader import Runtime
from fa4aot.tools.plancheck import random_call

why = emulation_available("aarch64")
needs_emulation = pytest.mark.skipif(why is not None, reason=f"aarch64 emulation unavailable: {why}")
CALLS = 30


def _build_both_hosts(manifest_text: str, reuse: Path, root: Path) -> Path:
    """Build ``manifest_text`` for x86_64 and aarch64 hosts into ``root/cache`` (the x86_64 entries
    are reused from ``reuse``; the aarch64 plans are compiled and self-tested under qemu)."""
    manifest = root / "both.yaml"
    manifest.write_text(re.sub(r"num_sms: (\d+)\}", r"num_sms: \1, host_arch: [x86_64, aarch64]}", manifest_text))
    run_cli("build", str(manifest), "--cache", str(root / "cache"), "--reuse", str(reuse), "-q", timeout=3600)
    return root / "cache"


#: The fast tier's both-host build: an SM90 forward and a combine kernel of tests/fast.yaml.
SMALL = (
    "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n"
    "  fwd_sm90:\n    - {head_dims: [[128, 128]], causal: true}\n"
    "  combine:\n    - {head_dim: 128, num_head: 16, max_splits: 128}\n"
)


@pytest.fixture(scope="module")
def both_hosts(built_cache, tmp_path_factory) -> Path:
    """SMALL for both host archs."""
    return _build_both_hosts(SMALL, built_cache, tmp_path_factory.mktemp("small-both-hosts"))


@pytest.fixture(scope="module")
def ci_both_hosts(ci_cache, tmp_path_factory) -> Path:
    """Every ci.yaml variant but the SM100 backward, for x86_64 and aarch64 hosts."""
    text = CI_MANIFEST.read_text()
    # the SM100 backward group is left out to keep the suite's time (the SM90 backward kernels
    # stand for the backward families: their plans take the same kinds of arguments)
    text = re.sub(r"\n      bwd_sm100:\n(        .*\n)+", "\n", text)
    assert "bwd_sm100" not in text and "bwd_sm90" in text
    return _build_both_hosts(text, ci_cache, tmp_path_factory.mktemp("both-hosts"))


def _pairs(cache: Cache) -> list:
    by_host: dict[str, dict] = {"x86_64": {}, "aarch64": {}}
    for e in cache.entries():
        by_host.setdefault(e.host_arch, {})[e.variant_id] = e
    return [(by_host["x86_64"][vid], a) for vid, a in sorted(by_host["aarch64"].items()) if vid in by_host["x86_64"]]


def _same_launches_on_both_hosts(cache_dir: Path, min_pairs: int) -> None:
    cache = Cache(cache_dir)
    pairs = _pairs(cache)
    assert len(pairs) == len({e.variant_id for e in cache.entries() if e.host_arch == "aarch64"}) >= min_pairs
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


@pytest.mark.slow
@needs_dsl
@needs_emulation
def test_a_forward_and_a_combine_record_the_same_launches_on_both_host_archs(both_hosts):
    _same_launches_on_both_hosts(both_hosts, 2)


@pytest.mark.slow
@needs_dsl
@needs_emulation
def test_every_ci_variant_records_the_same_launches_on_both_host_archs(ci_both_hosts):
    _same_launches_on_both_hosts(ci_both_hosts, 40)


@pytest.mark.slow  # (the both-host build: the full tier's; the fast tier keeps the no-emulation refusal)
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


@pytest.mark.slow
@needs_dsl
@needs_emulation
def test_verify_runs_the_aarch64_plans_under_emulation_and_ls_shows_both(both_hosts):
    out = run_cli("verify", "--cache", str(both_hosts))
    assert "0 bad" in out.stdout and "SKIPPED" not in out.stderr
    ls = run_cli("ls", "--cache", str(both_hosts)).stdout
    assert "aarch64" in ls and "x86_64" in ls


@pytest.mark.slow
@needs_dsl
@needs_emulation
def test_verify_says_it_skipped_the_aarch64_plans_without_emulation(both_hosts):
    no_qemu = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no qemu-aarch64 on the PATH
    out = run_cli("verify", "--cache", str(both_hosts), env=no_qemu)
    assert "SKIPPED running the aarch64 launch plans" in out.stderr and "qemu" in out.stderr
    assert "0 bad" in out.stdout


@pytest.mark.slow
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


@pytest.mark.slow
@needs_dsl
@needs_emulation
def test_pack_for_aarch64_hosts_installs_on_one(both_hosts, tmp_path):
    """`pack --host-arch aarch64` on the x86_64 build box gives the archive a Grace node installs
    (read here as an aarch64 host would); an x86_64 host refuses it."""
    from fa4aot.compile.archive import ArchiveError, install, read_archive

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
