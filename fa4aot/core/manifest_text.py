"""Writing manifests: the readable YAML that builds a given set of variants.

Pure functions (no YAML library), shared by ``fa4aot record``, ``fa4aot manifest from-misses``
and the runtime's miss log. Each variant starts as the group that builds exactly it
(:func:`fa4aot.core.families.group_for`); axes whose single default builds the same are dropped;
groups that differ in one axis are merged into a list when the merged group's expansion is
exactly the union (checked by expanding it). The prepare kernel's ``max_batch`` axis builds every
batch bucket up to it, so a prepare variant's group also builds the smaller buckets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fa4aot.core.families import FAMILIES, group_for, product, resolve_fields
from fa4aot.core.targets import model_name
from fa4aot.core.variant import Variant

#: Axes merged into lists, in this order (the rest stay one value per group).
MERGE_AXES = ("qhead_per_kvhead", "causal", "head_dims", "dtype", "return_lse", "heads", "num_head")


def expand(family: str, arch: str, num_sms: int, group: dict[str, list[Any]]) -> set[str]:
    """Variant ids a manifest group builds (missing axes take their defaults)."""
    fam = FAMILIES[family]
    values = {a.name: list(group.get(a.name, a.default)) for a in fam.axes}
    out = set()
    for raw, _ in product(fam.axes, values):
        for fields in resolve_fields(family, raw):
            if fam.check(fields) is None:
                out.add(Variant.make(family, arch, num_sms, **fields).variant_id)
    return out


def minimal_group(v: Variant, shapes: dict[str, list[Any]] | None = None) -> dict[str, list[Any]]:
    """The group building ``v`` (and, for prepare, its smaller batch buckets), without the axes
    whose single default builds the same. A forward variant's group pins FA4's config; forward
    and backward groups pin the ``shapes`` of the calls they served (when known)."""
    fam = FAMILIES[v.family]
    if fam.selected:  # a forward variant: its call's axes, FA4's config, shapes; defaults dropped
        group = dict(group_for(v), **(shapes or {}))
        return {k: x for k, x in group.items() if not ((a := fam.axis(k)) and list(a.default) == x)}
    group = group_for(v)
    if shapes and fam.parts is not None:  # a backward call: FA4 selects its configs by the shapes it served
        group = dict(group, **shapes)
    want = expand(v.family, v.arch, v.num_sms, group)
    for axis in FAMILIES[v.family].axes:
        if len(axis.default) != 1 or axis.name not in group:
            continue
        trial = {k: x for k, x in group.items() if k != axis.name}
        if expand(v.family, v.arch, v.num_sms, trial) == want:
            group = trial
    return group


def _key(group: dict[str, list[Any]], skip: str) -> str:
    return json.dumps({k: x for k, x in group.items() if k != skip}, sort_keys=True)


def merge_groups(
    family: str, arch: str, num_sms: int, groups: list[dict[str, list[Any]]]
) -> list[dict[str, list[Any]]]:
    """Merge groups that differ in one :data:`MERGE_AXES` axis, when the result builds exactly
    what the parts build."""
    fam = FAMILIES[family]
    if fam.selected:  # FA4 selects per shape: merged call classes could select other configs
        return groups
    for axis in MERGE_AXES:
        spec = fam.axis(axis)
        if spec is None:
            continue
        default = list(spec.default) if len(spec.default) == 1 else None
        buckets: dict[str, list[dict[str, list[Any]]]] = {}
        for g in groups:
            buckets.setdefault(_key(g, axis), []).append(g)
        merged = []
        for parts in buckets.values():
            if len(parts) == 1 or any(axis not in p and default is None for p in parts):
                merged.extend(parts)
                continue
            values: list[Any] = []
            for p in parts:
                values.extend(x for x in p.get(axis, default) if x not in values)
            cand = dict(parts[0], **{axis: sorted(values, key=lambda x: (type(x).__name__, x))})
            union: set[str] = set()
            for p in parts:
                union |= expand(family, arch, num_sms, p)
            merged.extend([cand] if expand(family, arch, num_sms, cand) == union else parts)
        groups = merged
    return groups


def yaml_value(v: Any) -> str:
    """A flow-style YAML value for the scalars and lists manifests use."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(yaml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v) if v != int(v) else str(int(v))
    return str(v)


def _pair_axis(family: str, axis: str) -> bool:
    try:
        return len(FAMILIES[family].axis(axis).parse([11, 22])) == 2
    except (ValueError, AttributeError, TypeError):
        return False


def render_group(family: str, group: dict[str, list[Any]], name: str, indent: str) -> str:
    """One group as YAML lines (``- name: ...`` then its axes); one-value lists become scalars,
    except pair axes (``head_dims: [[128, 128]]``)."""
    lines = [f"{indent}- name: {name}"]
    fam = FAMILIES[family]
    order = [a.name for a in fam.axes + tuple(fam.domain_axes or ()) + tuple(fam.filter_axes or ())]
    for axis in sorted(group, key=order.index):
        vals = group[axis]
        text = yaml_value(vals) if len(vals) > 1 or _pair_axis(family, axis) else yaml_value(vals[0])
        lines.append(f"{indent}  {axis}: {text}")
    return "\n".join(lines)


def target_name(arch: str, num_sms: int) -> str:
    return model_name(arch, num_sms)


def render_manifest(
    variants: Iterable[Variant],
    *,
    header: str = "",
    names: dict[tuple[str, int], str] | None = None,
    notes: Iterable[str] = (),
    group_prefix: str = "recorded",
    shapes: dict[str, dict[str, list[Any]]] | None = None,
    groups: Iterable[tuple[str, int, str, dict[str, list[Any]]]] = (),
) -> str:
    """A manifest (``targets:`` form) building ``variants``: one target per (arch, SM count),
    grouped and merged; ``notes`` become trailing comments; ``shapes``: per forward or backward
    variant id, the shapes (and requests) of the calls it served, pinned in its group;
    ``groups``: (arch, SM count, family, group) kept as they are (the groups of a manifest
    merged into: re-rendering them from their expansion would lose their shapes)."""
    by_target: dict[tuple[str, int], dict[str, list[Variant]]] = {}
    for v in {v.variant_id: v for v in variants}.values():
        by_target.setdefault((v.arch, v.num_sms), {}).setdefault(v.family, []).append(v)
    kept: dict[tuple[str, int, str], list[dict[str, list[Any]]]] = {}
    for arch, sms, family, group in groups:
        by_target.setdefault((arch, sms), {}).setdefault(family, [])
        kept.setdefault((arch, sms, family), []).append(group)
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    out.append("targets:" if by_target else "targets: []")
    for arch, sms in sorted(by_target):
        tname = (names or {}).get((arch, sms)) or target_name(arch, sms)
        out.append(f"  - target: {{name: {tname}, arch: {arch}, num_sms: {sms}}}")
        out.append("    families:")
        for family in sorted(by_target[(arch, sms)]):
            vs = sorted(by_target[(arch, sms)][family], key=lambda v: v.label())
            made = kept.get((arch, sms, family), []) + [minimal_group(v, (shapes or {}).get(v.variant_id)) for v in vs]
            unique = list({json.dumps(g, sort_keys=True): g for g in made}.values())
            merged = merge_groups(family, arch, sms, unique)
            out.append(f"      {family}:")
            for i, g in enumerate(sorted(merged, key=lambda g: json.dumps(g, sort_keys=True))):
                out.append(render_group(family, g, f"{group_prefix}-{i + 1}", "        "))
    for n in notes:
        out.append(f"# {n}")
    return "\n".join(out) + "\n"


def kept_groups(doc: Any) -> list[tuple[str, int, str, dict[str, list[Any]]]]:
    """The groups of a parsed manifest (``target:`` or ``targets:`` form), as
    :func:`render_manifest` keeps them: (arch, SM count, family, axis -> values)."""
    targets = doc.get("targets") or [doc] if isinstance(doc, dict) else []
    out = []
    for t in targets:
        target = t.get("target") or {}
        for family, groups in (t.get("families") or {}).items():
            if family not in FAMILIES:
                continue
            for g in groups if isinstance(groups, list) else [groups]:
                axes = {k: v for k, v in g.items() if k != "name"}
                out.append(
                    (target["arch"], target["num_sms"], family, {k: _values(family, k, v) for k, v in axes.items()})
                )
    return out


def _values(family: str, axis: str, v: Any) -> list[Any]:
    """A group's axis value as the list of its values (a pair axis's scalar is one pair)."""
    if not isinstance(v, list) or (_pair_axis(family, axis) and v and not isinstance(v[0], list)):
        return [v]
    return v


def describe_missing(variant: Variant, shapes: dict[str, list[Any]] | None = None) -> str:
    """One-line YAML the user can add under ``families:`` to build ``variant`` (``shapes``: the
    call's, for a forward variant)."""
    items = ", ".join(f"{k}: {yaml_value(v)}" for k, v in group_for(variant, shapes).items())
    note = ""
    if variant.fields.get("paged_kv") == "cpasync":
        note = f"; any page size but {variant.fields['tile_n']} builds this cp.async variant"
    return f"families.{variant.family}: - {{{items}}}  (target arch {variant.arch}, num_sms {variant.num_sms}{note})"
