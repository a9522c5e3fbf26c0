"""Manifest: the YAML file that says which variants a cache must hold.

Schema (every key below ``families.<family>[i]`` is an axis; see ``fa4aot axes``)::

    target:                 # the GPU SKU the cache is for (or ``targets:``, a list of
                            # {target, families} mappings, for a cache serving several SKUs)
      name: b200
      arch: sm_100a         # sm_100a or sm_90a
      num_sms: 148          # baked into FA4's grids; the runtime refuses another SM count
      l2_bytes: 132120576   # optional, informational
      smem_optin_bytes: 232448  # optional; default per arch
    families:
      fwd_sm100:            # a family: a list of groups
        - name: prefill     # optional label
          head_dims: [[128, 128]]
          causal: [false, true]
      combine:
        - head_dim: 128     # a scalar is one explicit value, a list an axis to expand

A group expands to the product of its axes (missing axes take their defaults) and keeps the
combinations FA4 can build and would pick; the rest are reported as skipped with FA4's reason.
A value the manifest names that no valid combination uses, or a fully explicit group FA4 cannot
build, is an error naming the field. :func:`expand` is pure and does no compilation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.core.errors import ManifestError
from fa4aot.core.families import FAMILIES, Family, product, resolve_fields
from fa4aot.core.variant import SMEM_OPTIN_BYTES, Target, Variant

ARCHES = tuple(SMEM_OPTIN_BYTES)
_TARGET_KEYS = {"name", "arch", "num_sms", "l2_bytes", "smem_optin_bytes"}


@dataclass(frozen=True)
class PlannedVariant:
    """A variant the manifest asks for, with its target and the group it came from."""

    variant: Variant
    target: Target
    origin: str


@dataclass(frozen=True)
class Skipped:
    """A combination of axis values that was not built, and why."""

    origin: str
    axes: dict[str, Any]
    reason: str


@dataclass
class Plan:
    """Result of expanding a manifest: the targets, the variants to build and what was skipped."""

    targets: list[Target]
    variants: list[PlannedVariant] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pv in self.variants:
            out[pv.variant.family] = out.get(pv.variant.family, 0) + 1
        return out


def load(path: str | Path) -> Plan:
    """Read and expand a manifest file; raises :class:`ManifestError` naming the bad field."""
    import yaml  # local import: the runtime path never needs YAML

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(str(path), f"cannot read manifest: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(str(path), f"not valid YAML: {e}") from None
    return expand(doc)


def parse_target(doc: Any, path: str = "target") -> Target:
    """Validate a ``target`` mapping."""
    if not isinstance(doc, Mapping):
        raise ManifestError(path, "missing or not a mapping (needs name, arch, num_sms)")
    unknown = set(doc) - _TARGET_KEYS
    if unknown:
        raise ManifestError(f"{path}.{sorted(unknown)[0]}", f"unknown key; known: {sorted(_TARGET_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{path}.name", "required, a non-empty string (the GPU SKU, e.g. b200)")
    arch = doc.get("arch")
    if arch not in ARCHES:
        raise ManifestError(f"{path}.arch", f"must be one of {list(ARCHES)}, got {arch!r}")
    num_sms = doc.get("num_sms")
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or not 1 <= num_sms <= 1024:
        raise ManifestError(f"{path}.num_sms", f"required, an integer in 1..1024, got {num_sms!r}")
    for key in ("l2_bytes", "smem_optin_bytes"):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ManifestError(f"{path}.{key}", f"must be a positive integer, got {v!r}")
    return Target(name, arch, num_sms, doc.get("l2_bytes"), doc.get("smem_optin_bytes"))


def expand(doc: Any) -> Plan:
    """Expand a parsed manifest document into a :class:`Plan`."""
    if not isinstance(doc, Mapping):
        raise ManifestError("<manifest>", "the document must be a mapping with target and families")
    if "targets" in doc:
        unknown = set(doc) - {"targets"}
        if unknown:
            raise ManifestError(sorted(unknown)[0], "with targets:, every target carries its own families")
        sections = doc["targets"]
        if not isinstance(sections, list) or not sections:
            raise ManifestError("targets", "must be a non-empty list of {target, families} mappings")
        prefixes = [f"targets[{i}]." for i in range(len(sections))]
    else:
        sections, prefixes = [doc], [""]
    plan = Plan([])
    seen: set[str] = set()
    for section, prefix in zip(sections, prefixes):
        if not isinstance(section, Mapping):
            raise ManifestError(prefix.rstrip("."), "must be a mapping with target and families")
        unknown = set(section) - {"target", "families"}
        if unknown:
            raise ManifestError(prefix + sorted(unknown)[0], "unknown key; known: target, families")
        target = parse_target(section.get("target"), prefix + "target")
        if any(t.identity() == target.identity() for t in plan.targets):
            raise ManifestError(prefix + "target", f"{target.arch} with {target.num_sms} SMs is listed twice")
        plan.targets.append(target)
        _expand_families(section.get("families"), prefix, target, plan, seen)
    return plan


def _expand_families(fams: Any, prefix: str, target: Target, plan: Plan, seen: set[str]) -> None:
    if not isinstance(fams, Mapping) or not fams:
        raise ManifestError(prefix + "families", "required, a mapping of family name to a list of groups")
    for fam_name, groups in fams.items():
        path = f"{prefix}families.{fam_name}"
        family = FAMILIES.get(fam_name)
        if family is None:
            raise ManifestError(path, f"unknown family; known: {sorted(FAMILIES)}")
        if target.arch not in family.arches:
            raise ManifestError(path, f"builds for {list(family.arches)}, but {prefix}target.arch is {target.arch}")
        if isinstance(groups, Mapping):
            groups = [groups]
        if not isinstance(groups, list) or not groups:
            raise ManifestError(path, "must be a non-empty list of groups (mappings of axes)")
        for i, group in enumerate(groups):
            _expand_group(family, f"{path}[{i}]", group, target, plan, seen)


def _expand_group(family: Family, path: str, group: Any, target: Target, plan: Plan, seen: set[str]) -> None:
    if not isinstance(group, Mapping):
        raise ManifestError(path, "a group must be a mapping of axis name to value(s)")
    label = group.get("name")
    if label is not None and not isinstance(label, str):
        raise ManifestError(f"{path}.name", "must be a string")
    origin = f"{path} ({label})" if label else path
    values: dict[str, list[Any]] = {}
    explicit: dict[str, bool] = {}
    for key, value in group.items():
        if key == "name":
            continue
        axis = family.axis(key)
        if axis is None:
            raise ManifestError(
                f"{path}.{key}", f"unknown axis for {family.name}; known: {[a.name for a in family.axes]}"
            )
        items = value if isinstance(value, list) and not _is_pair_scalar(key, value) else [value]
        if not items:
            raise ManifestError(f"{path}.{key}", "empty list")
        for j, item in enumerate(items):
            try:
                axis.parse(item)
            except ValueError as e:
                listed = isinstance(value, list) and not _is_pair_scalar(key, value)
                where = f"{path}.{key}[{j}]" if listed else f"{path}.{key}"
                raise ManifestError(where, str(e)) from None
        values[key] = items
        explicit[key] = True
    for axis in family.axes:
        if axis.name not in values:
            values[axis.name] = list(axis.default)
            explicit[axis.name] = False

    used: dict[tuple[str, int], bool] = {}
    first_reason: dict[tuple[str, int], str] = {}
    n_valid = 0
    all_scalar = all(len(v) == 1 for k, v in values.items() if explicit[k]) and any(explicit.values())
    for raw, picked in product(family.axes, values):
        for fields in resolve_fields(family.name, raw):
            reason = family.check(fields)
            idx = {k: _index(values[k], picked[k]) for k in picked}
            if reason is None:
                n_valid += 1
                for k, j in idx.items():
                    used[(k, j)] = True
                variant = Variant.make(family.name, target.arch, target.num_sms, **fields)
                if variant.variant_id not in seen:
                    seen.add(variant.variant_id)
                    plan.variants.append(PlannedVariant(variant, target, origin))
            else:
                for k, j in idx.items():
                    first_reason.setdefault((k, j), reason)
                plan.skipped.append(Skipped(origin, dict(picked), reason))
    if n_valid == 0:
        reason = plan.skipped[-1].reason if plan.skipped else "expands to nothing"
        # Blame the axis whose explicit values make everything invalid: the one that, set back
        # to its default, admits a valid combination.
        culprit = None
        for key in (k for k, e in explicit.items() if e):
            trial = dict(values, **{key: list(family.axis(key).default)})
            if _any_valid(family, trial):
                culprit = key
                break
        where = f"{path}.{culprit}" if culprit else path
        if all_scalar:
            raise ManifestError(where, f"FA4 cannot build this combination: {reason}")
        raise ManifestError(where, f"no combination of this group is valid: {reason}")
    for key, items in values.items():
        if not explicit[key]:
            continue
        for j, _ in enumerate(items):
            if not used.get((key, j)):
                where = f"{path}.{key}[{j}]" if len(items) > 1 else f"{path}.{key}"
                raise ManifestError(
                    where,
                    f"no valid combination uses {items[j]!r}: {first_reason.get((key, j), 'invalid')}",
                )


def _any_valid(family: Family, values: dict[str, list[Any]]) -> bool:
    return any(
        family.check(fields) is None
        for raw, _ in product(family.axes, values)
        for fields in resolve_fields(family.name, raw)
    )


def _is_pair_scalar(key: str, value: list[Any]) -> bool:
    """``head_dims: [128, 128]`` is one pair, not a list of two head dims."""
    return (
        key in ("head_dims", "tiles", "heads")
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    )


def _index(items: list[Any], item: Any) -> int:
    for i, x in enumerate(items):
        if x is item or x == item:
            return i
    return -1
