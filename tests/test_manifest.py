"""Manifest validation and expansion (pure Python, no compiler)."""

from __future__ import annotations

import copy

import pytest
import yaml

from fa4aot.compile import manifest
from fa4aot.core.errors import ManifestError
from fa4aot.core.families import FAMILIES

BASE = {
    "target": {"name": "b200", "arch": "sm_100a", "num_sms": 148},
    "families": {"combine": [{"head_dim": 128}]},
}


def expand(doc):
    return manifest.expand(copy.deepcopy(doc))


def error_field(doc) -> str:
    with pytest.raises(ManifestError) as ei:
        expand(doc)
    return ei.value.field


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("target"), "target"),
        (lambda d: d["target"].update(arch="sm_80"), "target.arch"),
        (lambda d: d["target"].update(num_sms=0), "target.num_sms"),
        (lambda d: d["target"].update(num_sms="148"), "target.num_sms"),
        (lambda d: d["target"].update(colour="red"), "target.colour"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["families"].update(fwd_sm90=[{"head_dims": [[128, 128]]}]), "families.fwd_sm90"),
        (lambda d: d["families"].update(nope=[{}]), "families.nope"),
        (lambda d: d["families"]["combine"][0].update(head_dimm=128), "families.combine[0].head_dimm"),
        (lambda d: d["families"]["combine"][0].update(head_dim=[64, "x"]), "families.combine[0].head_dim[1]"),
        (lambda d: d["families"]["combine"][0].update(max_splits=1000), "families.combine[0].max_splits"),
        (lambda d: d["families"].update(combine=[]), "families.combine"),
        (lambda d: d["target"].update(host_arch="arm64"), "target.host_arch"),
        (lambda d: d["target"].update(host_arch=["x86_64", "ppc64le"]), "target.host_arch[1]"),
        (lambda d: d["target"].update(host_arch=[]), "target.host_arch"),
        (lambda d: d["target"].update(host_arch=["aarch64", "aarch64"]), "target.host_arch"),
        (lambda d: d["target"].update(host_arch=64), "target.host_arch"),
        (lambda d: d["families"].update(fwd_sm120=[{}]), "families.fwd_sm120"),
    ],
)
def test_errors_name_the_field(mutate, field):
    doc = copy.deepcopy(BASE)
    mutate(doc)
    assert error_field(doc) == field


def test_explicit_combination_fa4_cannot_build_is_an_error():
    doc = copy.deepcopy(BASE)
    doc["families"] = {"fwd_sm100": [{"head_dims": [[192, 192]]}]}
    with pytest.raises(ManifestError) as ei:
        expand(doc)
    assert ei.value.field == "families.fwd_sm100[0].head_dims"
    assert "not supported on SM100" in ei.value.reason


def test_listed_value_no_combination_uses_is_an_error():
    doc = copy.deepcopy(BASE)
    doc["families"] = {"fwd_sm100": [{"causal": [True], "two_cta": [False, True], "batch": 4, "seqlen_q": 4096}]}
    with pytest.raises(ManifestError) as ei:
        expand(doc)
    assert ei.value.field == "families.fwd_sm100[0].two_cta[1]"
    assert "no config with two_cta True" in ei.value.reason


def test_a_forward_group_holds_what_fa4_selects_for_every_call_in_its_shapes():
    """A forward group is a call class over a shape domain: for random calls of the class whose
    shapes are in the domain, the variant FA4's selector picks (computed call by call) is in the
    plan, and the plan holds nothing else than such variants (each one distinct)."""
    import random

    from fa4aot.core.variant import Variant
    from fa4aot.tools.fa4_calls import decide

    doc = copy.deepcopy(BASE)
    dom = dict(batch=[1, 4, 64], seqlen_q=[1, 128, 4096], seqlen_k=[512, 8192, 65536], nheads_kv=[1, 8])
    doc["families"] = {"fwd_sm100": [{"causal": [False, True], "qhead_per_kvhead": [1, 4], "seqused_k": True, **dom}]}
    plan = expand(doc)
    ids = [pv.variant.variant_id for pv in plan.variants]
    assert len(set(ids)) == len(ids) >= 4
    rng = random.Random(5)
    picked = set()
    for _ in range(300):
        causal, qh = rng.choice([False, True]), rng.choice([1, 4])
        hk = rng.choice(dom["nheads_kv"])
        case = dict(batch=rng.choice(dom["batch"]), seqlen_q=rng.choice(dom["seqlen_q"]),
                    seqlen_k=rng.choice(dom["seqlen_k"]), nheads=hk * qh, nheads_kv=hk, head_dim=128,
                    head_dim_v=128, causal=causal, seqused_k=True)  # fmt: skip
        v = Variant.make("fwd_sm100", "sm_100a", 148, **decide("sm_100a", 148, case).fields)
        assert v.variant_id in ids, case
        picked.add(v.variant_id)
    assert len(picked) >= len(ids) // 2  # the sample reaches most of what the group built


def test_sm90_tiles_follow_fa4():
    """SM90 tiles depend on the head dims and the mask only: one variant per (head dims, causal)."""
    from fa4aot.core import selector

    doc = {
        "target": {"name": "h100", "arch": "sm_90a", "num_sms": 132},
        "families": {
            "fwd_sm90": [{"head_dims": [[64, 64], [96, 96], [128, 128], [256, 256]], "causal": [False, True]}]
        },
    }
    plan = expand(doc)
    assert len(plan.variants) == 8
    sel = selector.installed()
    for pv in plan.variants:
        f = pv.variant.fields
        want = sel.select_sm90_tile(f["head_dim"], f["head_dim_v"], f["causal"], False, None)
        assert (f["tile_m"], f["tile_n"], f["mma_pv_is_rs"], f["intra_wg_overlap"]) == want, f


def test_prepare_expands_to_warp_buckets():
    doc = copy.deepcopy(BASE)
    doc["families"] = {"prepare": [{"heads": [32, 8], "max_batch": 2000}]}
    plan = expand(doc)
    assert sorted(pv.variant.fields["num_warps"] for pv in plan.variants) == [1, 2, 4, 8, 16, 32]


def test_multi_target_and_duplicates():
    doc = {
        "targets": [
            {
                "target": {"name": "b200", "arch": "sm_100a", "num_sms": 148},
                "families": {"combine": [{"head_dim": 128}, {"head_dim": [128]}]},
            },
            {
                "target": {"name": "h100", "arch": "sm_90a", "num_sms": 132},
                "families": {"combine": [{"head_dim": 128}]},
            },
        ]
    }
    plan = expand(doc)
    assert [t.arch for t in plan.targets] == ["sm_100a", "sm_90a"]
    assert len(plan.variants) == 2  # the duplicate group adds nothing
    assert {pv.variant.arch for pv in plan.variants} == {"sm_100a", "sm_90a"}
    doc["targets"][1]["target"]["arch"] = "sm_100a"
    doc["targets"][1]["target"]["num_sms"] = 148
    assert error_field(doc) == "targets[1].target"


def _group_paths(doc: dict) -> list[str]:
    """The path of every group of a manifest document, as the expander names origins."""
    targets = doc.get("targets") or [{"target": doc["target"], "families": doc["families"]}]
    prefix = (lambda i: f"targets[{i}].") if "targets" in doc else (lambda i: "")
    return [
        f"{prefix(i)}families.{fam}[{j}]"
        for i, t in enumerate(targets)
        for fam, groups in t["families"].items()
        for j in range(len(groups))
    ]


def _only(doc: dict, group: str) -> dict:
    """``doc`` with ``group`` (a path from :func:`_group_paths`) its only group."""
    head, _, fam = group.rpartition("families.")
    fam, _, idx = fam.partition("[")
    i = int(idx.rstrip("]"))
    t = doc["targets"][int(head[len("targets[") :].split("]")[0])] if head else doc
    return {"target": t["target"], "families": {fam: [t["families"][fam][i]]}}


@pytest.mark.slow
def test_every_group_of_every_shipped_manifest_builds_what_its_family_accepts():
    """Each group of each manifest under manifests/ expands to at least one variant (a group whose
    every combination is skipped is a mistake in the file), every forward, combine and prepare
    variant passes its family's FA4 rules, and each target's arch serves its families."""
    from helpers import ROOT

    shipped = sorted((ROOT / "manifests").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"ci.yaml", "b200.yaml", "h100.yaml", "b300.yaml", "rtx-pro-6000.yaml",
                                        "gb200.yaml", "h100-train.yaml", "b200-train.yaml"}  # fmt: skip
    for path in shipped:
        doc = manifest.parse_yaml(path.read_bytes(), str(path))
        plan = manifest.expand(doc)
        for group in _group_paths(doc):  # alone, each group builds something (others may build it too)
            assert manifest.expand(_only(doc, group)).variants, (path.name, group)
        for pv in plan.variants:
            fam = FAMILIES[pv.variant.family]
            assert pv.variant.arch in fam.arches and pv.target.arch == pv.variant.arch, (path.name, pv.origin)
            # forward variants are FA4's selections (checked by the parity tests); backward
            # kernels are checked as the call they belong to
            if fam.parts is None and fam.axes and not fam.selected:
                assert fam.check(pv.variant.fields) is None, (path.name, pv.variant.label())


def test_host_arch_picks_the_plans_hosts():
    doc = copy.deepcopy(BASE)
    assert expand(doc).hosts(manifest.parse_target(doc["target"]), "x86_64") == ("x86_64",)  # the build machine's
    doc["target"]["host_arch"] = "aarch64"
    plan = expand(doc)
    assert plan.hosts(plan.targets[0], "x86_64") == ("aarch64",)
    doc["target"]["host_arch"] = ["x86_64", "aarch64"]
    plan = expand(doc)
    assert plan.hosts(plan.targets[0], "x86_64") == ("x86_64", "aarch64")
    gb200 = manifest.load(manifest_path("gb200.yaml"))
    assert [(t.arch, t.num_sms, gb200.hosts(t, "x86_64")) for t in gb200.targets] == [("sm_100a", 152, ("aarch64",))]


def manifest_path(name):
    from helpers import ROOT

    return ROOT / "manifests" / name


def test_load_reports_yaml_errors(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("target: [unclosed")
    with pytest.raises(ManifestError) as ei:
        manifest.load(p)
    assert "not valid YAML" in str(ei.value)
    p.write_text(yaml.safe_dump(BASE))
    assert manifest.load(p).variants
