"""Hostile manifests: every one ends in a ManifestError that names a field, or in a valid plan;
never a traceback, a hang, a misread value or a file written."""

from __future__ import annotations

import copy
import os
import random
import re
import time
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from fa4aot.compile import manifest
from fa4aot.core.errors import ManifestError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "manifests").glob("*.yaml"))

HOSTILE_VALUES = [
    2**70, 2**64, -5, 0, -1, 1 << 31, 3.5, float("nan"), float("inf"), 1e308, True, False, None,
    "", "../etc", "a/b", "x\ny", "nul\x00", "2:12", "yes", "0x10", "\u202e", "a" * 500,
    [], [[]], [1, 1], [[128, 128], [128, 128]], {"a": 1}, [[[[[1]]]]], {1: 2}, [None], ["bf16", 7],
]  # fmt: skip


def _paths(doc, prefix=()):
    """Every (path, container) in a parsed document, for mutation."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield prefix + (k,), doc
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield prefix + (i,), doc
            yield from _paths(v, prefix + (i,))


def _mutate(doc, rng: random.Random):
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        spots = list(_paths(doc))
        if not spots:
            return doc
        path, parent = rng.choice(spots)
        key = path[-1]
        op = rng.random()
        if op < 0.55:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
        elif op < 0.65 and isinstance(parent, dict):
            parent[rng.choice(["bogus", "name", "Target", "families", "max_batch", "num_head"])] = rng.choice(
                HOSTILE_VALUES
            )
        elif op < 0.75 and isinstance(parent, dict):
            del parent[key]
        elif op < 0.85 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif op < 0.92:
            nested = parent[key]
            for _ in range(rng.randint(5, 60)):
                nested = [nested]
            parent[key] = nested
        elif isinstance(parent, dict):
            parent[rng.choice([1, True, None, 2.5])] = parent.pop(key)
    return doc


def _text_attacks(rng: random.Random, text: str) -> bytes:
    """Attacks on the text itself: what a YAML serializer would never write."""
    choice = rng.randrange(8)
    if choice == 0:  # a duplicate key
        return (text + "\ntarget: {name: x, arch: sm_90a, num_sms: 1}\n").encode()
    if choice == 1:  # YAML 1.1 sexagesimal and yes/no
        return text.replace("num_sms: 132", "num_sms: 2:12").replace("num_sms: 148", "num_sms: yes").encode()
    if choice == 2:  # not UTF-8
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = 0xFF
        return bytes(raw)
    if choice == 3:  # very deep nesting
        return ("a: " + "[" * rng.randint(500, 5000) + "1" + "]" * 10).encode()
    if choice == 4:  # a billion laughs
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
        return ("\n".join(lines) + "\ntarget: *a8\n").encode()
    if choice == 5:  # a NUL byte
        return text.encode().replace(b"\n", b"\n\x00", 1)
    if choice == 6:  # truncated
        return text.encode()[: rng.randrange(1, len(text))]
    return b"\t\t: : ]\n{{{"  # garbage


#: CPU seconds one mutated manifest may take: manifests/h100.yaml, the largest shipped, expands in
#: about 8 on the 2-core CI box, and a mutation may repeat one of its groups. CPU time, not wall
#: time, so that the fast cache's build running beside the tests does not count.
CPU_SECONDS_PER_MANIFEST = 30


def _check(raw: bytes) -> str:
    """'ok', or the ManifestError message; any other exception fails the test."""
    t0 = time.process_time()
    try:
        plan = manifest.expand(manifest.parse_yaml(raw, "m.yaml"))
        assert plan.variants, "a valid plan builds something"
        result = "ok"
    except ManifestError as e:
        assert e.field and e.reason, e
        result = str(e)
    spent = time.process_time() - t0
    assert spent < CPU_SECONDS_PER_MANIFEST, f"took {spent:.1f} CPU s: {raw[:200]!r}"
    return result


@pytest.mark.parametrize("count", [6, pytest.param(600, marks=pytest.mark.slow)])
def test_generated_hostile_manifests_end_in_typed_errors_or_plans(tmp_path, monkeypatch, count):
    """``count`` mutated shipped manifests (6 in the fast tier, 600 in the full one)."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(20261126)
    docs = [(p, yaml.safe_load(p.read_text())) for p in SHIPPED]
    before = sorted(os.listdir(tmp_path))
    outcomes = {"ok": 0, "error": 0}
    for i in range(count):
        path, doc = rng.choice(docs)
        if i % 5 == 4:
            raw = _text_attacks(rng, path.read_text())
        else:
            try:
                raw = yaml.safe_dump(_mutate(doc, rng), allow_unicode=True).encode()
            except yaml.YAMLError:
                continue
        outcomes["ok" if _check(raw) == "ok" else "error"] += 1
    assert outcomes["error"] > count // 2 and sum(outcomes.values()) >= count * 5 // 6, outcomes
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.parametrize(
    "text, field, reason",
    [
        ("target: {name: h, arch: sm_90a, num_sms: 2:12}\nfamilies: {combine: [{}]}", "target.num_sms", "got '2:12'"),
        ("target: {name: h, arch: sm_90a, num_sms: 132, l2_bytes: 1180591620717411303424}\nfamilies: {combine: [{}]}", "target.l2_bytes", "1..2147483648"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\nfamilies: {prepare: [{max_batch: 18446744073709551616}]}", "families.prepare[0].max_batch", "1..2147483647"),
        ("target: {name: ../x, arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{}]}", "target.name", "A-Z a-z 0-9"),
        ("target: {name: 'a/b', arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{}]}", "target.name", "A-Z"),
        ("target: {name: \"a\\nb\", arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{}]}", "target.name", "A-Z"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{name: 'x y', head_dim: 128}]}", "families.combine[0].name", "A-Z"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{num_head: [16, 16]}]}", "families.combine[0].num_head[1]", "listed twice"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\ntarget: {name: b, arch: sm_100a, num_sms: 148}\nfamilies: {}", "line 2", "appears twice"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{varlen: no}]}", "families.combine[0].varlen", "got 'no'"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\n1: 2\nfamilies: {combine: [{}]}", "<manifest>.1", "keys must be strings"),
        ("a: " + "[" * 3000 + "]" * 3000, "m.yaml", "nested too deeply"),
        ("target: {name: h, arch: sm_90a, num_sms: 132}\nfamilies: {combine: [{num_head: [" + ", ".join(map(str, range(1, 1001))) + "], head_dim: [8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 136, 144, 152, 160, 168, 176, 184, 192, 200, 208, 216, 224, 232, 240, 248, 256], varlen: [false, true], return_lse: [false, true]}]}", "families.combine[0]", "combinations"),
    ],
)  # fmt: skip
def test_each_listed_manifest_failure_names_its_field(text, field, reason):
    with pytest.raises(ManifestError) as err:
        manifest.expand(manifest.parse_yaml(text.encode(), "m.yaml"))
    assert err.value.field == field, err.value
    assert reason in err.value.reason, err.value


def test_non_utf8_and_nul_input_are_typed_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_bytes(b"target: {name: h\xff, arch: sm_90a, num_sms: 132}\n")
    out = run_cli("plan", str(bad), check=False)
    assert out.returncode == 1 and "not UTF-8" in out.stderr and "Traceback" not in out.stderr
    bad.write_bytes(b"target: {name: h, arch: sm_90a, num_sms: 132}\x00\n")
    out = run_cli("plan", str(bad), check=False)
    assert out.returncode == 1 and "NUL" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_hostile_manifests_through_the_cli_write_nothing(tmp_path):
    rng = random.Random(7)
    docs = [yaml.safe_load(p.read_text()) for p in SHIPPED]
    work = tmp_path / "w"
    work.mkdir()
    for i in range(12):
        m = work / f"m{i}.yaml"
        m.write_text(yaml.safe_dump(_mutate(rng.choice(docs), rng), allow_unicode=True))
        out = run_cli("plan", str(m), check=False, cwd=work)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted(f"m{i}.yaml" for i in range(12))


SM90 = {"name": "h", "arch": "sm_90a", "num_sms": 132}
WIDE_GROUP = {
    "head_dims": [64, 96, 128],
    "dtype": ["bf16", "fp16"],
    "causal": [False, True],
    "qhead_per_kvhead": [1, 2, 4, 8],
}


@pytest.mark.parametrize(
    "groups, field, reason",
    [
        ([dict(WIDE_GROUP, batch=list(range(1, 65)), seqlen_q=list(range(1, 65)))], r"families\.fwd_sm90\[0\]",
         "points (at most 100000)"),
        ([dict(WIDE_GROUP, batch=list(range(1, 30)))], r"families\.fwd_sm90\[0\]", "calls (at most 500000)"),
        ([dict(WIDE_GROUP, name=f"g{i}", batch=[1, 2, 3, 4, 5 + i]) for i in range(80)],
         r"families\.fwd_sm90\[[1-7]\d\]", "calls (at most 2000000): split it"),
    ],
)  # fmt: skip
def test_selection_limits_refuse_before_expanding(groups, field, reason):
    """A forward group, or a whole manifest, that would ask FA4's selector about too many calls
    is refused before any is asked (in milliseconds), naming the group where the limit is crossed."""
    t0 = time.process_time()
    with pytest.raises(ManifestError) as e:
        manifest.expand({"target": SM90, "families": {"fwd_sm90": groups}})
    assert time.process_time() - t0 < 1
    assert re.fullmatch(field, e.value.field) and reason in e.value.reason, e.value
