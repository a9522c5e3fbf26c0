"""Tuned dispatch on the CPU: the table format and its hash, lookup and fallback in the runtime
(fake driver), corrupt / stale / foreign tables, SM90 candidate rules against FA4's own plans,
candidate selection and winner picking, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from fake_driver import FakeDriver
from helpers import run_cli
from test_plans import entries, load_plan

import fa4aot
from fa4aot.core import samples
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.families import dims_for, is_tuning_candidate
from fa4aot.core.fwd import sm90_smem_bytes
from fa4aot.core.tuning import (
    TuningEntry,
    TuningTable,
    TuningTableError,
    bucket,
    bucket_range,
    result_class_difference,
    table_filename,
)
from fa4aot.core.variant import Target, Variant
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor
from fa4aot.tools import tune
from fa4aot.tools.fa4_calls import decide

B = 0x7F30_0000_0000
H100 = Target("h100", "sm_90a", 132)


def t(i, shape, dtype="bf16"):
    return RawTensor(B + i * (1 << 36), tuple(shape), dtype)


#: The call tests/fast.yaml's SM90 groups pin: d128 MHA, batch 2, 1024 tokens, 16 heads.
BASE_CALL = dict(batch=2, seqlen_q=1024, seqlen_k=1024, nheads=16, nheads_kv=16, head_dim=128, head_dim_v=128)


def sm90(tile_n: int | None = None, qhead_per_kvhead: int = 1, has_lse: bool = False, paged_kv: str = "none",
         **call) -> Variant:  # fmt: skip
    """The SM90 forward FA4 selects for BASE_CALL changed by ``call`` (``tile_n``: FA4's tile_mn
    request (128, tile_n), a tuning candidate's tiling)."""
    case = dict(BASE_CALL, **call, return_lse=has_lse)
    case["nheads"] = case["nheads_kv"] * qhead_per_kvhead
    if tile_n is not None:
        case["tile_mn"] = (128, tile_n)
    if paged_kv != "none":
        case.update(page_size=128 if paged_kv == "tma" else 16, seqused_k=True)
    return Variant.make("fwd_sm90", "sm_90a", 132, **decide("sm_90a", 132, case).fields)


DEFAULT = sm90()  # FA4's choice for d128 MHA non-causal on SM90
CANDIDATE = sm90(tile_n=176)  # the tuning candidate manifests/ci.yaml builds
CAUSAL = sm90(causal=True)
BUCKET = bucket(2, 4, 1024, 1024)


def table(entries_, device="Fake GPU", arch="sm_90a", sms=132) -> TuningTable:
    return TuningTable(arch, sms, device, tuple(entries_), created="2026-11-26T00:00:00Z", tool="test")


def entry(choice=CANDIDATE, default=DEFAULT, b=BUCKET) -> TuningEntry:
    return TuningEntry(default.variant_id, b, choice.variant_id, 1.0, 0.9, 0.01, "dense d128 full b2 s1024 h4/4")


# --- the table ------------------------------------------------------------------------------


def test_table_round_trips_and_its_hash_covers_every_field():
    tb = dataclasses.replace(table([entry()]), measured=({"shape": "x", "speedup": 1.1},))
    data = tb.to_bytes()
    assert TuningTable.from_bytes(data) == tb
    doc = json.loads(data)
    assert doc["sha256"] == tb.sha256 and doc["format"] == "fa4aot-tuning/1"
    for path in (("entries", 0, "choice_ms"), ("device_name",), ("measured", 0, "speedup"), ("num_sms",)):
        d = json.loads(data)
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = node[path[-1]] * 2 if not isinstance(node[path[-1]], str) else node[path[-1]] + "x"
        with pytest.raises(TuningTableError, match="sha256"):
            TuningTable.from_bytes(json.dumps(d).encode())


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d[: len(d) // 2], "not a JSON"),
        (lambda d: b"\xff" + d, "not a JSON"),
        (lambda d: b"[]", "not a JSON object"),
        (lambda d: d.replace(b"fa4aot-tuning/1", b"fa4aot-tuning/9"), "format"),
    ],
)
def test_damaged_tables_are_typed_errors(damage, match):
    with pytest.raises(TuningTableError, match=match):
        TuningTable.from_bytes(damage(table([entry()]).to_bytes()))


def _resigned(doc: dict) -> bytes:
    from fa4aot.core.variant import canonical_json, sha256_hex

    doc.pop("sha256", None)
    return json.dumps({"sha256": sha256_hex(canonical_json(doc)), **doc}).encode()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e: e.update(bucket=[1, 2]), "bucket"),
        (lambda e: e.update(bucket=[1, 2, 3, -1]), "bucket"),
        (lambda e: e.update(choice="../../etc/passwd"), "variant id"),
        (lambda e: e.update(choice_ms=float("nan")), "finite"),
        (lambda e: e.pop("default"), "malformed"),
    ],
)
def test_well_signed_but_invalid_entries_are_typed_errors(edit, match):
    doc = json.loads(table([entry()]).to_bytes())
    edit(doc["entries"][0])
    with pytest.raises(TuningTableError, match=match):
        TuningTable.from_bytes(_resigned(doc))


def test_two_entries_for_one_bucket_are_refused():
    doc = json.loads(table([entry()]).to_bytes())
    doc["entries"].append(dict(doc["entries"][0]))
    with pytest.raises(TuningTableError, match="two entries"):
        TuningTable.from_bytes(_resigned(doc))


def test_buckets_are_log2_classes():
    assert bucket(1, 1, 1, 1) == (1, 1, 1, 1)
    assert bucket(2, 3, 1024, 1025) == (2, 2, 11, 11)
    assert bucket(4, 32, 2047, 2048) == (3, 6, 11, 12)
    for b in range(1, 40):
        lo, hi = bucket_range(b)
        assert bucket(lo, 1, 1, 1)[0] == bucket(hi, 1, 1, 1)[0] == b and bucket(hi + 1, 1, 1, 1)[0] == b + 1


def test_only_launch_fields_may_differ():
    assert result_class_difference("fwd_sm90", DEFAULT.fields, CANDIDATE.fields) is None
    assert result_class_difference("fwd_sm90", DEFAULT.fields, sm90(pack_gqa=True).fields) is None
    for other in (CAUSAL, sm90(has_lse=True), sm90(dtype="fp16"), sm90(softcap=50.0), sm90(paged_kv="tma")):
        assert "differs" in result_class_difference("fwd_sm90", DEFAULT.fields, other.fields)
    assert "not tuned" in result_class_difference("combine", {}, {})


# --- SM90 candidates --------------------------------------------------------------------------


def test_sm90_smem_rule_matches_what_fa4s_host_code_asks_for(built_cache):
    """The smem the candidate rule budgets is what FA4's own host code records, for every SM90
    variant of the CI cache (FA4's tiles, head dims 64/128/256, and the 128x176 candidate)."""
    cache, es = entries(built_cache, "fwd_sm90")
    seen = set()
    for e in es:
        f = e.variant.fields
        (launch,) = load_plan(cache, e).plan(
            load_plan(cache, e).order(samples.named_args(e.variant, dims_for(e.variant, batch=2)))
        )
        assert launch.smem == sm90_smem_bytes(
            f["tile_m"], f["tile_n"], f["head_dim"], f["head_dim_v"], f["mma_pv_is_rs"]
        ), e.variant.label()
        seen.add((f["head_dim"], f["tile_m"], f["tile_n"]))
    assert {(128, 128, 176), (64, 192, 128), (256, 128, 80)} <= seen


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(tile_m=192), "tile_m 192 is FA4's SM90 tile only up to head_dim 96"),
        (dict(head_dim=64, head_dim_v=64, tile_m=192, tile_n=256), "S and O accumulators"),
        (dict(tile_n=120), "multiple of 16"),
        (dict(tile_m=64), "tile_m must be one of"),
        (dict(head_dim=256, head_dim_v=256, tile_n=128, tile_m=128), "shared memory"),
        (dict(tile_n=176, mma_pv_is_rs=False), "needs 259072 bytes of shared memory"),
    ],
)
def test_sm90_candidates_fa4s_kernel_cannot_run_are_refused_naming_the_reason(fields, match):
    """FA4's validate_fwd_config checks no shared memory or registers on SM90: fa4aot's own
    rule refuses the requested tilings its kernel cannot run (tiles FA4 never picks itself)."""
    from fa4aot.core import selector
    from fa4aot.core.fwd import candidate_problem

    f = dict(DEFAULT.fields, **fields)
    assert match in candidate_problem(selector.installed(), "sm_90a", f)
    assert candidate_problem(selector.installed(), "sm_90a", DEFAULT.fields) is None  # FA4's own choice


def test_candidates_are_marked_and_plan_lists_them():
    assert is_tuning_candidate("fwd_sm90", CANDIDATE.fields) and not is_tuning_candidate("fwd_sm90", DEFAULT.fields)
    assert not is_tuning_candidate("fwd_sm90", sm90(pack_gqa=True, qhead_per_kvhead=4).fields)
    out = run_cli("plan", "manifests/ci.yaml", cwd=Path(__file__).parent.parent).stdout
    marked = [ln for ln in out.splitlines() if ln.startswith(" T")]
    # 128x176 with P in shared memory would need 259 KB of it: the manifest skips it
    assert len(marked) == 2 and sum("tile_n=176 " in ln + " " for ln in marked) == 1
    assert sum("mma_pv_is_rs" not in ln for ln in marked) == 1  # P through shared memory
    assert "2 variants marked T exist only as tuning candidates" in out
    doc = json.loads(run_cli("plan", "manifests/ci.yaml", "--json", cwd=Path(__file__).parent.parent).stdout)
    assert sorted(v["params"]["tile_n"] for v in doc["variants"] if v["tuning_candidate"]) == [128, 176]


def test_candidates_for_a_call_share_its_result_class():
    pool = [CANDIDATE, CAUSAL, sm90(tile_n=160), sm90(has_lse=True, tile_n=176), DEFAULT]
    assert tune.candidates(DEFAULT, pool) == sorted([CANDIDATE, sm90(tile_n=160)], key=lambda v: v.label())
    shape = tune.parse_shape("b=2,s=1024,h=4,d=128")
    assert tune.default_variant(shape, H100) == DEFAULT


# --- winner picking and shapes -------------------------------------------------------------------


def test_a_win_must_beat_the_noise():
    d, c = DEFAULT.variant_id, CANDIDATE.variant_id
    quiet = [1.0, 1.0, 1.001, 0.999, 1.0, 1.0]
    assert tune.pick_winner({d: quiet, c: [x * 0.9 for x in quiet]}, d) == (c, 0.01)
    assert tune.pick_winner({d: quiet, c: [x * 0.995 for x in quiet]}, d)[0] == d  # under MIN_GAIN
    noisy = [1.0, 0.85, 1.15, 1.0, 0.9, 1.1, 1.0, 1.05]  # ~15% spread: a 5% gain is noise
    winner, noise = tune.pick_winner({d: noisy, c: [x * 0.95 for x in noisy]}, d)
    assert winner == d and noise > 0.05
    assert tune.pick_winner({d: quiet, c: quiet}, d)[0] == d  # a tie keeps FA4's choice


@pytest.mark.slow  # (expands the shipped h100.yaml: ~8 s)
def test_every_sweep24_shape_is_tunable_with_the_shipped_h100_manifest():
    """`fa4aot tune manifests/h100.yaml` (the README's recipe) measures every shape of the sweep:
    the manifest builds the variant FA4 runs for it and at least two other tilings to time
    against it (4-5 a shape: other tiles, P through shared memory, unpacked GQA); varlen shapes have sequences of several
    lengths, the longest the shape's max_seqlen."""
    from helpers import ROOT

    from fa4aot.compile import manifest

    pool = [pv.variant for pv in manifest.load(ROOT / "manifests" / "h100.yaml").variants]
    ids = {v.variant_id for v in pool}
    assert len(set(tune.SWEEP24)) == len(tune.SWEEP24) == len(tune.parse_shapes("sweep24")) == 24
    for shape in tune.SWEEP24:
        default = tune.default_variant(shape, H100)
        assert default.variant_id in ids, shape
        assert 2 <= len(tune.candidates(default, pool)) <= 5, shape
        if shape.varlen:
            lens = shape.seqlens()
            assert max(lens) == shape.seqlen_q and len(set(lens)) > 1 and shape.rows == sum(lens), shape


@pytest.mark.parametrize(
    "spec, match",
    [
        ("b=0,s=1,h=1,d=64", "positive"),
        ("b=1,s=1,h=6,hk=4,d=64", "multiple"),
        ("b=1,s=1,h=1", "missing head_dim"),
        ("b=1,s=x,h=1,d=64", "integer"),
        ("b=1,s=1,h=1,d=64,zz=3", "unknown key"),
        ("b=1,sq=1,sk=2,h=1,d=64,varlen=1", "prefill"),
        ("b=1,s=1,h=1,d=64,causal=yes", "0 or 1"),
    ],
)
def test_bad_shape_specs_are_typed_errors(spec, match):
    with pytest.raises(Fa4aotError, match=match):
        tune.parse_shape(spec)


# --- the runtime applies a table ----------------------------------------------------------------


@pytest.fixture
def cache(built_cache, tmp_path):
    """A private copy of the CI cache (tests write tuning tables into it)."""
    dst = tmp_path / "cache"
    shutil.copytree(built_cache, dst, ignore=shutil.ignore_patterns("tuning", "LOCK"))
    return dst


def _write(cache: Path, data: bytes, device="Fake GPU") -> Path:
    d = cache / "tuning"
    d.mkdir(exist_ok=True)
    p = d / table_filename("sm_90a", 132, device)
    p.write_bytes(data)
    return p


def _call(rt, b=2, s=1024, h=4, causal=False):
    q = t(0, (b, s, h, 128))
    fa4aot.flash_attn_func(q, t(1, (b, s, h, 128)), t(2, (b, s, h, 128)), causal=causal, out=t(3, q.shape), runtime=rt)
    return rt.driver.launches[-1].kernel


def _kernel(rt, v: Variant) -> int:
    return rt._load_id(v.variant_id).kernels[0]


def _runtime(cache, **kw):
    return Runtime(cache, driver=FakeDriver(cc=(9, 0), num_sms=132), **kw)


def test_the_runtime_launches_the_tuned_choice_in_its_bucket_only(cache):
    write = tune.write_table(cache, table([entry()]))
    assert write == cache / "tuning" / table_filename("sm_90a", 132, "Fake GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rt = _runtime(cache)
    assert rt.tuning == {DEFAULT.variant_id: {BUCKET: CANDIDATE.variant_id}}
    assert _call(rt) == _kernel(rt, CANDIDATE)
    assert _call(rt, b=3) == _kernel(rt, CANDIDATE)  # same bucket (2..3)
    assert _call(rt, b=4) == _kernel(rt, DEFAULT)  # next batch bucket: FA4's choice
    assert _call(rt, s=300) == _kernel(rt, DEFAULT)
    assert _call(rt, causal=True) == _kernel(rt, CAUSAL)  # another default variant: untouched
    # prepared calls go through the same dispatch
    q, k, v, o = (t(i, (2, 1024, 4, 128)) for i in range(4))
    run = fa4aot.prepare_forward(q, k, v, o, runtime=rt)
    assert run.variants == (CANDIDATE,)
    run(q, k, v, o)
    assert rt.driver.launches[-1].kernel == _kernel(rt, CANDIDATE)


def test_tuning_can_be_turned_off(cache, monkeypatch):
    tune.write_table(cache, table([entry()]))
    assert _call(_runtime(cache, tuned=False)) == _kernel(_runtime(cache, tuned=False), DEFAULT)
    monkeypatch.setenv("FA4AOT_TUNING", "0")
    rt = _runtime(cache)
    assert rt.tuning == {} and _call(rt) == _kernel(rt, DEFAULT)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: table([entry()]).to_bytes()[:-40], "not a JSON"),
        (lambda: table([entry()]).to_bytes().replace(b'"choice_ms": 0.9', b'"choice_ms": 0.5'), "sha256"),
        (lambda: table([entry()], device="NVIDIA H200").to_bytes(), "made for NVIDIA H200"),
        (lambda: table([entry()], sms=114).to_bytes(), "114 SMs"),
    ],
)
def test_a_corrupt_or_foreign_table_is_ignored_with_a_warning(cache, make, match):
    _write(cache, make())
    with pytest.warns(UserWarning, match=match):
        rt = _runtime(cache)
    assert rt.tuning == {} and rt.tuning_table is None
    assert _call(rt) == _kernel(rt, DEFAULT)


def test_a_table_that_is_not_a_regular_file_never_blocks(cache):
    d = cache / "tuning"
    d.mkdir()
    os.mkfifo(d / table_filename("sm_90a", 132, "Fake GPU"))  # reading a FIFO would block
    with pytest.warns(UserWarning, match="ignored"):
        rt = _runtime(cache)
    assert rt.tuning == {}


@pytest.mark.parametrize(
    "bad, match",
    [
        (entry(choice=sm90(tile_n=144)), "the cache has no variant"),  # not built: never selected
        (entry(default=sm90(tile_n=144)), "the cache has no variant"),
        (entry(choice=CAUSAL), "causal differs"),  # in the cache, but another result
    ],
)
def test_stale_entries_are_ignored_and_good_ones_kept(cache, bad, match):
    good = entry(b=bucket(8, 4, 1024, 1024))
    tune.write_table(cache, table([good, bad]))
    with pytest.warns(UserWarning, match=match):
        rt = _runtime(cache)
    assert rt.tuning == {DEFAULT.variant_id: {good.bucket: CANDIDATE.variant_id}}
    assert _call(rt) == _kernel(rt, DEFAULT) and _call(rt, b=8) == _kernel(rt, CANDIDATE)
    assert all(lv.variant.variant_id != sm90(tile_n=144).variant_id for lv in rt._loaded.values())


# --- CLI ----------------------------------------------------------------------------------------


def test_show_tuning_prints_entries_and_flags_bad_tables(cache):
    assert "no tuning tables" in run_cli("show-tuning", "--cache", str(cache)).stdout
    tb = dataclasses.replace(
        table([entry()]), measured=({"shape": "dense d128 full b2 s1024 h4/4", "default": "a", "winner": "b", "speedup": 1.111, "tflops": 500.0},)
    )  # fmt: skip
    tune.write_table(cache, tb)
    out = run_cli("show-tuning", "--cache", str(cache)).stdout
    assert "Fake GPU (sm_90a, 132 SMs)" in out and "rows=2..3 nheads=4..7 seqlen_q=1024..2047" in out
    assert "tile_n=176" in out and "(1.111x" in out and "tuned 1.111x  500.0 TFLOP/s" in out
    assert json.loads(run_cli("show-tuning", "--cache", str(cache), "--json").stdout)["entries"][0]["choice"] == (
        CANDIDATE.variant_id
    )
    _write(cache, b"{}", device="Other GPU")
    p = run_cli("show-tuning", "--cache", str(cache), check=False)
    assert p.returncode == 1 and "other-gpu.json: ignored by the runtime: format" in p.stderr


def test_tune_dry_run_lists_defaults_and_candidates():
    out = run_cli(
        "tune",
        "manifests/ci.yaml",
        "--dry-run",
        "--shapes",
        "b=2,s=1024,h=4,d=128;b=2,s=64,h=8,hk=2,d=96",
        cwd=Path(__file__).parent.parent,
    ).stdout
    lines = out.splitlines()
    h100 = lines.index("target h100: sm_90a, 132 SMs")
    # the manifest's two candidates: 128x176, and 128x128 with P through shared memory
    assert "dense d128 full b2 s1024 h4/4" in lines[h100 + 1] and "FA4: 128x128, 2 candidates" in lines[h100 + 1]
    assert "(not in the manifest!)" in lines[h100 + 2]  # d96 is not built for the H100


@pytest.mark.parametrize("args, match", [(("--shapes", "b=1"), "missing"), (("--rounds", "1"), "--rounds")])
def test_tune_arguments_are_checked(args, match):
    p = run_cli("tune", "manifests/ci.yaml", *args, cwd=Path(__file__).parent.parent, check=False)
    assert p.returncode != 0 and match in p.stderr and "Traceback" not in p.stderr


def test_an_entry_measured_on_other_cubins_is_stale(cache):
    """Variant ids do not change with the toolchain; the cubins measured do. An entry whose
    kernels were rebuilt since `tune` measured them no longer applies."""
    from fa4aot.core.index import Cache

    sha = {e.variant_id: e.cubin.sha256 for e in Cache(cache).entries()}
    now = (sha[DEFAULT.variant_id], sha[CANDIDATE.variant_id])
    good = dataclasses.replace(entry(), cubins=now)
    old = dataclasses.replace(entry(b=bucket(8, 4, 1024, 1024)), cubins=(now[0], "0" * 64))
    tune.write_table(cache, table([good, old]))
    with pytest.warns(UserWarning, match="was rebuilt"):
        rt = _runtime(cache)
    assert rt.tuning == {DEFAULT.variant_id: {BUCKET: CANDIDATE.variant_id}}
    assert _call(rt) == _kernel(rt, CANDIDATE) and _call(rt, b=8) == _kernel(rt, DEFAULT)
    doc = json.loads(table([good]).to_bytes())
    doc["entries"][0]["cubins"] = ["x" * 64, ""]
    with pytest.raises(TuningTableError, match="cubins"):
        TuningTable.from_bytes(_resigned(doc))


def test_tune_decides_with_the_caches_selector_where_flash_attn_is_not_installed(monkeypatch):
    """`fa4aot tune` runs on GPU machines with the runtime and cli extras only: FA4's choice comes
    from the selector the cache holds (selector.using), not from an installed flash-attn-4."""
    from fa4aot.core import selector

    sel = selector.installed()  # stands in for a cache's copy (the same config.py)
    shape = tune.TuneShape(2, 1000, 1100, 16, 16, 128, False, False, "bf16")
    want = tune.default_variant(shape, H100)

    def not_installed():
        raise selector.SelectorError("flash-attn-4 is not installed")

    monkeypatch.setattr(selector, "_INSTALLED", [])
    monkeypatch.setattr(selector, "installed_source", not_installed)
    with pytest.raises(selector.SelectorError):
        tune.default_variant(shape, H100)
    with selector.using(sel):
        assert tune.default_variant(shape, H100) == want
