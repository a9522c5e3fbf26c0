"""Learning manifests (CPU): `fa4aot record` over FA4's own interface in fake mode and over
fa4aot's API, merge, the runtime miss log and `manifest from-misses`, coverage (`plan
--against`) and strict mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from fake_driver import FakeDriver
from helpers import FAST_MANIFEST, ROOT, needs_dsl, run_cli
from test_dispatch import _fa4aot_call

from fa4aot.compile import manifest
from fa4aot.core import selector
from fa4aot.core.errors import VariantNotFoundError
from fa4aot.core.fwd import companions
from fa4aot.core.variant import Variant
from fa4aot.runtime.loader import Runtime
from fa4aot.tools import fa4_keys
from fa4aot.tools.fa4_calls import decide, facts
from fa4aot.tools.record import fwd_fields, read_log

WORKLOAD = str(ROOT / "tests" / "record_workload.py")
SM100 = dict(
    FLASH_ATTENTION_ARCH="sm_100a", CUTE_DSL_ARCH="sm_100a", FLASH_ATTENTION_NUM_SMS="148", CUTE_DSL_LOG_LEVEL="0"
)


#: A model's attention calls at head dims 128 and 64: varlen GQA-8 prefill, then decode over a KV
#: cache with seqused_k, split 8 ways (forward + combine). The README's record example uses it too.
CASES = json.loads((ROOT / "tests" / "record_cases.json").read_text())


def expected(cases: list[dict]) -> set[str]:
    """The variants fa4aot's dispatch picks for ``cases``: each forward, and the combine and
    prepare kernels FA4 runs around it."""
    out = set()
    for c in cases:
        d = decide("sm_100a", 148, c)
        out.add(Variant.make("fwd_sm100", "sm_100a", 148, **d.fields).variant_id)
        for family, fields in companions(selector.installed(), facts("sm_100a", 148, c), d):
            out.add(Variant.make(family, "sm_100a", 148, **fields).variant_id)
    return out


def ids(path: Path) -> set[str]:
    return {pv.variant.variant_id for pv in manifest.load(path).variants}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """`fa4aot record --no-compile` over the scripted model run through FA4's interface in fake
    mode (FA4's _compile_misses probe: nothing compiles)."""
    pytest.importorskip("flash_attn")
    tmp = tmp_path_factory.mktemp("rec")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    out = tmp / "model.yaml"
    proc = run_cli(
        "record", "--no-compile", "-o", str(out), "--", sys.executable, WORKLOAD, "fa4", str(tmp / "cases.json"),
        env=dict(os.environ, **SM100), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, tmp


@needs_dsl
def test_record_of_fa4_writes_exactly_what_fa4aot_dispatch_picks(recorded):
    out, _ = recorded
    text = out.read_text()
    assert ids(out) == expected(CASES)
    # readable: a group per forward config (FA4's config and the calls' shapes) and combine
    assert text.count("- name:") <= 6 and text.count("config: {") == 4 and "seqlen_k: 8192" in text
    assert "variants:" in run_cli("plan", str(out)).stdout


@pytest.mark.slow  # FA4's interface runs the scripted model (about 12 s a record)
@needs_dsl
def test_the_recorded_manifest_builds_and_the_replay_finds_every_variant(recorded, built_cache):
    out, tmp = recorded
    cache = tmp / "cache"
    run_cli("build", str(out), "--cache", str(cache), "--reuse", str(built_cache), "-q")
    rt = Runtime(cache, driver=FakeDriver(cc=(10, 0), num_sms=148), miss_log=tmp / "misses.jsonl")
    missing: list = []
    for c in CASES:
        _fa4aot_call(rt, c, missing)  # raw pointers: a split call stops at its partials, so
        for family, fields in companions(selector.installed(), facts("sm_100a", 148, c), decide("sm_100a", 148, c)):
            v = Variant.make(family, "sm_100a", 148, **fields)  # its prepare / combine load here
            if rt.has(v):
                rt.load(v)
            else:
                missing.append(v)
    assert missing == [] and not (tmp / "misses.jsonl").exists()
    assert {lv.variant.variant_id for lv in rt._loaded.values()} == expected(CASES)


@pytest.mark.slow  # FA4's interface runs the scripted model (about 12 s a record)
@needs_dsl
def test_merge_adds_no_duplicate_groups(recorded, tmp_path):
    out, tmp = recorded
    first = [c for c in CASES if c["head_dim"] == 128]
    (tmp_path / "a.json").write_text(json.dumps(first))
    m = tmp_path / "m.yaml"
    env = dict(os.environ, **SM100)
    run_cli("record", "-o", str(m), "--", sys.executable, WORKLOAD, "fa4", str(tmp_path / "a.json"), env=env)
    groups = m.read_text().count("- name:")
    again = run_cli(
        "record", "--merge", "-o", str(m), "--", sys.executable, WORKLOAD, "fa4", str(tmp_path / "a.json"), env=env
    )
    assert "nothing new" in again.stdout and m.read_text().count("- name:") == groups
    (tmp_path / "b.json").write_text(json.dumps(CASES))
    run_cli("record", "--merge", "-o", str(m), "--", sys.executable, WORKLOAD, "fa4", str(tmp_path / "b.json"), env=env)
    assert ids(m) == expected(CASES) and m.read_text().count("- name:") <= out.read_text().count("- name:")


def test_fa4_configurations_fa4aot_cannot_build_become_comments(tmp_path):
    case = dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128)
    v = Variant.make("fwd_sm100", "sm_100a", 148, **decide("sm_100a", 148, case).fields)
    base = fa4_keys.plain(fa4_keys.fwd_key(v))  # the key FA4 compiles for it (checked by the parity tests)
    assert fwd_fields({"key": base}) == ("fwd_sm100", v.fields)
    cases = {
        "a mask_mod": dict(mask_mod_hash="abc"),
        "a score_mod other than softcap": dict(score_mod_hash="abc"),
        "MLA": {"qv is not None": True},
        "arch 80": dict(arch=80),
        "dtype Float8E4M3B11FNUZ": dict(dtype="Float8E4M3B11FNUZ"),
    }
    log = tmp_path / "log.jsonl"
    with open(log, "w") as f:
        for change in cases.values():
            f.write(json.dumps({"fa4": "fwd", "key": dict(base, **change)}) + "\n")
        f.write(json.dumps({"fa4": "fwd", "key": base}) + "\n")
    rec = read_log([log])
    assert len(rec.variants) == 1 and len(rec.unsupported) == len(cases)
    for why in cases:
        assert any(why in reason for _, reason in rec.unsupported), why
    out = tmp_path / "m.yaml"
    from fa4aot.tools.record import manifest_text

    out.write_text(manifest_text(rec, "t"))
    text = out.read_text()
    assert text.count("# not buildable by fa4aot:") == len(cases) and len(ids(out)) == 1


@pytest.mark.parametrize(
    "case, patterns",
    [
        (dict(dtype="e4m3", descales="full,per_head,none", causal=True), [[False, False], [True, False], None]),
        (dict(dtype="e5m2", descales="none,none,none"), [None, None, None]),
        (dict(dtype="e4m3", mxfp8="pv"), [None, None, None]),
        (dict(dtype="e4m3", mxfp8="qk", causal=True), [None, None, None]),
    ],
)
def test_fp8_and_mxfp8_keys_map_back_to_their_variants(case, patterns):
    """A recorded FP8 key (descale presence, and the broadcast pattern FA4 keys for each) or MXFP8
    key (its appended mxfp8 elements) maps back to the variant it was predicted from."""
    call = dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=4, head_dim=64, head_dim_v=64, **case)
    v = Variant.make("fwd_sm100", "sm_100a", 148, **decide("sm_100a", 148, call).fields)
    key = fa4_keys.plain(fa4_keys.fwd_key(v))
    key["tensor_broadcast_patterns"] = [[False] * 4, [False] * 4, [False] * 4, None, None, *patterns, None]
    assert fwd_fields({"key": key}) == ("fwd_sm100", v.fields)


@pytest.mark.slow
def test_record_of_fa4aot_api_calls_and_the_miss_log_round_trip(built_cache, tmp_path):
    """fa4aot's API: record writes the variants calls asked for, present or not; the miss log
    names the absent ones once each; from-misses -> build -> the same calls miss nothing."""
    calls = [
        dict(
            batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128
        ),  # in tests/fast.yaml
        dict(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=16, nheads_kv=16, head_dim=64, head_dim_v=64, causal=True),
        dict(batch=2, seqlen_q=500, seqlen_k=900, nheads=16, nheads_kv=2, head_dim=64, head_dim_v=64),
    ]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    env = dict(
        os.environ,
        FLASH_ATTENTION_ARCH="sm_90a",
        FLASH_ATTENTION_NUM_SMS="132",
        FA4AOT_MISS_LOG=str(tmp_path / "miss.jsonl"),
    )
    out = tmp_path / "rec.yaml"
    args = ("--", sys.executable, WORKLOAD, "fa4aot", str(tmp_path / "calls.json"))
    p = run_cli("record", "-o", str(out), *args, str(built_cache), env=env)
    assert "3 recorded variants" in p.stdout
    lines = [json.loads(x) for x in (tmp_path / "miss.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all("families.fwd_sm90" in x["manifest"] for x in lines)
    assert {x["target"]["name"] for x in lines} == {"h100"}
    # the same misses from two nodes make one manifest
    other = tmp_path / "node2.jsonl"
    other.write_text((tmp_path / "miss.jsonl").read_text())
    m = tmp_path / "misses.yaml"
    run_cli("manifest", "from-misses", str(tmp_path / "miss.jsonl"), str(other), "-o", str(m))
    assert ids(m) == {x["id"] for x in lines} and ids(m) < ids(out)
    cache = tmp_path / "cache"
    run_cli("install", "--insecure", str(_pack(built_cache, tmp_path)), "--cache", str(cache))
    run_cli("build", str(m), "--cache", str(cache), "-q")
    (tmp_path / "miss.jsonl").unlink()
    run_cli("record", "-o", str(tmp_path / "again.yaml"), *args, str(cache), env=env)
    assert not (tmp_path / "miss.jsonl").exists()  # no misses any more
    assert ids(tmp_path / "again.yaml") == ids(out)


def _pack(cache: Path, tmp: Path) -> Path:
    p = tmp / "ci.fa4"
    run_cli("pack", "--cache", str(cache), "-o", str(p))
    return p


def test_coverage_and_strict_mode(built_cache, tmp_path):
    ci = str(FAST_MANIFEST)
    out = run_cli("plan", ci, "--against", str(built_cache)).stdout
    assert "target h100:" in out and "lacks" not in out
    more = tmp_path / "more.yaml"
    more.write_text(
        "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  fwd_sm90:\n    - head_dims: [[64, 64], [128, 128]]\n"
    )
    p = run_cli("plan", str(more), "--against", str(built_cache), check=False)
    assert p.returncode == 1 and "has 1 of 2 variants" in p.stdout and "lacks" in p.stdout and "head_dim=64" in p.stdout
    req = tmp_path / "req.json"
    run_cli("plan", ci, "--write-require", str(req))
    Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=132), require=req)  # complete: opens
    run_cli("plan", str(more), "--write-require", str(req))
    with pytest.raises(VariantNotFoundError, match="strict mode: .* lacks 1 of the 2 variants .*head_dim=64"):
        Runtime(built_cache, driver=FakeDriver(cc=(9, 0), num_sms=132), require=req)
    # the requirement is per device: a B200 runtime is not held to the H100's list
    Runtime(built_cache, driver=FakeDriver(cc=(10, 0), num_sms=148), require=req)


def test_a_workload_without_attention_calls_writes_nothing(tmp_path):
    out = tmp_path / "m.yaml"
    p = run_cli("record", "-o", str(out), "--", sys.executable, "-c", "print('no attention here')", check=False)
    assert p.returncode == 1 and "no attention call" in p.stderr and not out.exists()
    p = run_cli("record", "-o", str(out), "--", sys.executable, "-c", "raise SystemExit(3)", check=False)
    assert p.returncode == 3 and not out.exists()
    p = run_cli("record", "-o", str(out), "--", "no-such-command-fa4aot", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_a_negative_window_side_records_a_manifest_that_parses():
    """FA4 takes a window side below zero (a window short of the diagonal); the recorded manifest
    line names 0 there, which its window axis accepts (the kernel is the same local one)."""
    from fa4aot.tools.record import _call_axes

    call = dict(batch=2, seqlen_q=512, seqlen_k=1024, nheads_kv=4, window=[None, -215])
    assert _call_axes(call)["window"] == [1024, 0]


#: FA4's backward called on fake tensors: a batched GQA-4 causal call with seqused_q, and one with
#: a score_mod (which fa4aot does not build).
_BWD_WORKLOAD = r"""
import os, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from fa4aot_kernels.common import install_target_hardware
install_target_hardware(int(os.environ["FLASH_ATTENTION_NUM_SMS"]))
from flash_attn.cute import interface as I
with FakeTensorMode():
    q = torch.empty(2, 300, 16, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(2, 300, 4, 64, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(2, 16, 300, dtype=torch.float32, device="cuda")
    used = torch.empty(2, dtype=torch.int32, device="cuda")
    dq, dk, dv = I._flash_attn_bwd(q, k, k, q, q, lse, causal=True, seqused_q=used)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    I._flash_attn_bwd(q, k, k, q, q, lse, score_mod=lambda *a: a[0])
"""


@pytest.mark.slow  # FA4's interface on fake tensors (about 4 s)
def test_record_learns_fa4s_backward_calls(tmp_path):
    """`fa4aot record` learns each FA4 backward call as the bwd group fa4aot's runtime asks for
    (with the call's shapes, which FA4's SM100 selection reads); under --no-compile FA4's
    backward, which has no compile probe, is not run; what fa4aot does not build is a comment."""
    pytest.importorskip("flash_attn")
    script = tmp_path / "bwd.py"
    script.write_text(_BWD_WORKLOAD)
    out = tmp_path / "bwd.yaml"
    proc = run_cli("record", "--no-compile", "-o", str(out), "--", sys.executable, str(script),
                   env=dict(os.environ, **SM100), check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert "bwd_sm100:" in text and "not buildable by fa4aot: FA4 bwd" in text and "score_mod" in text
    (target,) = yaml.safe_load(text)["targets"]
    (group,) = target["families"]["bwd_sm100"]
    group = {k: v if isinstance(v, list) else [v] for k, v in group.items()}
    want = {"head_dims": [[64, 64]], "qhead_per_kvhead": [4], "causal": [True], "seqused_q": [True],
            "batch": [2], "seqlen_q": [300], "seqlen_k": [300], "nheads_kv": [4]}  # fmt: skip
    assert {k: group.get(k) for k in want} == want, group
    variants = manifest.load(out).variants
    mains = [pv.variant for pv in variants if pv.variant.family == "bwd_sm100"]
    assert mains and all(v.fields["seqused_q"] and not v.fields["varlen_q"] for v in mains)


@pytest.mark.slow  # three records (about 17 s)
def test_merge_keeps_backward_groups(recorded, tmp_path):
    """--merge into a manifest with backward groups keeps them as written (their expansion is
    kernels, not calls) and adds no duplicate when the same backward calls are recorded again."""
    script = tmp_path / "bwd.py"
    script.write_text(_BWD_WORKLOAD)
    m = tmp_path / "m.yaml"
    env = dict(os.environ, **SM100)
    run_cli("record", "--no-compile", "-o", str(m), "--", sys.executable, str(script), env=env)
    bwd = {pv.variant.variant_id for pv in manifest.load(m).variants}
    (tmp_path / "a.json").write_text(json.dumps(CASES))
    run_cli("record", "--merge", "-o", str(m), "--", sys.executable, WORKLOAD, "fa4", str(tmp_path / "a.json"), env=env)
    run_cli("record", "--merge", "--no-compile", "-o", str(m), "--", sys.executable, str(script), env=env)
    assert ids(m) == bwd | expected(CASES)
    assert (
        m.read_text().count("bwd_sm100:") == 1
        and yaml.safe_load(m.read_text())["targets"][0]["families"]["bwd_sm100"].__len__() == 1
    )
