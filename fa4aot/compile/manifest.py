"""Manifest: the YAML file that says which variants a cache must hold.

Schema (every key below ``families.<family>[i]`` is an axis; see ``fa4aot axes``)::

    target:                 # the GPU SKU the cache is for (or ``targets:``, a list of
                            # {target, families} mappings, for a cache serving several SKUs)
      name: b200
      arch: sm_100a         # sm_90a, sm_100a, sm_103a or sm_120a
      num_sms: 148          # baked into FA4's grids; the runtime refuses another SM count
      l2_bytes: 132120576   # optional, informational
      smem_optin_bytes: 232448  # optional; default per arch
      host_arch: [x86_64, aarch64]  # optional: CPUs of the hosts (default: the build machine's)
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

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fa4aot.core.errors import Fa4aotError, ManifestError
from fa4aot.core.families import FAMILIES, Family, product, resolve_fields
from fa4aot.core.variant import SMEM_OPTIN_BYTES, Target, Variant

ARCHES = tuple(SMEM_OPTIN_BYTES)
_TARGET_KEYS = {"name", "arch", "num_sms", "l2_bytes", "smem_optin_bytes", "host_arch"}
#: Host CPU archs launch plans can be built for: x86_64 natively on x86_64, aarch64 (Grace:
#: GB200 / GB300) natively or, from x86_64, with the DSL's aarch64 host target, a cross linker and
#: qemu to test them.
HOST_ARCHES = ("x86_64", "aarch64")
#: Target and group names end up in file names, logs and shell lines: a safe character set only.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SAFE_NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ - (not starting with . _ -)"
#: Hardware bounds for targets (well above any GPU so far: B200 has 148 SMs, 126 MiB of L2 and
#: 227 KiB of opt-in shared memory per block).
MAX_SMS = 1024
MAX_L2_BYTES = 1 << 31
MAX_SMEM_OPTIN_BYTES = 1 << 20
#: A group's axes may expand to at most this many combinations, a manifest to this many variants
#: (a typo such as a 1000-long list must fail fast, not expand for minutes).
MAX_COMBINATIONS_PER_GROUP = 100_000
#: A forward group's shape axis may list at most this many values (the selector runs on their
#: product).
MAX_SHAPE_VALUES = 64
#: ... and its shapes at most this many points (about 35 us of FA4's selector each).
MAX_DOMAIN_POINTS = 100_000
#: FA4 selections one forward group may ask for (its call classes times its shapes): about 40 us
#: each, so a group expands in at most ~20 s.
MAX_SELECTIONS = 500_000
#: ... and a whole manifest (manifests/h100.yaml, the largest shipped, asks for about 300,000), so
#: that many groups each under the limit still expand in minutes, not hours.
MAX_MANIFEST_SELECTIONS = 2_000_000
MAX_VARIANTS = 20_000


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
    #: per target (by :meth:`Target.identity` arch and SM count), the host CPU archs whose launch
    #: plans to build; empty: the build machine's
    host_arches: dict[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)

    def hosts(self, target: Target, default: str) -> tuple[str, ...]:
        """The host archs to build ``target``'s plans for (``default``: the build machine's)."""
        return self.host_arches.get((target.arch, target.num_sms)) or (default,)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pv in self.variants:
            out[pv.variant.family] = out.get(pv.variant.family, 0) + 1
        return out


def load(path: str | Path) -> Plan:
    """Read and expand a manifest file; raises :class:`ManifestError` naming the bad field."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(str(path), f"cannot read manifest: {e.strerror or e}") from None
    return expand(parse_yaml(raw, str(path)))


def parse_yaml(raw: bytes, where: str = "<manifest>") -> Any:
    """The YAML document in ``raw`` under the YAML 1.2 core schema: ``true``/``false`` are the only
    booleans and integers are decimal, 0o or 0x (YAML 1.1 would read ``2:12`` as 132 and ``no`` as
    false); a key given twice in one mapping is an error."""
    import yaml  # local import: the runtime path never needs YAML

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(where, f"not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
    if "\0" in text:
        raise ManifestError(where, "contains a NUL character")
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except ManifestError:
        raise
    except yaml.YAMLError as e:
        raise ManifestError(where, f"not valid YAML: {e}") from None
    except RecursionError:
        raise ManifestError(where, "nested too deeply") from None


_LOADER: Any = None
_CORE_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _strict_loader() -> Any:
    """A SafeLoader with YAML 1.2 core-schema scalars and duplicate-key detection (made once)."""
    global _LOADER
    if _LOADER is not None:
        return _LOADER
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    hash(key)
                except TypeError:
                    raise ManifestError(f"line {line}", "a mapping key must be a plain value") from None
                if key in seen:
                    raise ManifestError(
                        f"line {line}", f"key {key!r} appears twice in one mapping (also on line {seen[key]})"
                    )
                seen[key] = line
            return super().construct_mapping(node, deep)

    # Keep the other resolvers (null, timestamps, ...); replace YAML 1.1's bool/int/float with 1.2 core's.
    StrictLoader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in _CORE_TAGS]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
    )
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+.0123456789"),
    )

    def construct_int(loader: Any, node: Any) -> int:
        value = loader.construct_scalar(node)
        return int(value, 0) if value.startswith(("0o", "0x")) else int(value)

    StrictLoader.add_constructor("tag:yaml.org,2002:int", construct_int)
    _LOADER = StrictLoader
    return _LOADER


def parse_target(doc: Any, path: str = "target") -> Target:
    """Validate a ``target`` mapping."""
    if not isinstance(doc, Mapping):
        raise ManifestError(path, "missing or not a mapping (needs name, arch, num_sms)")
    _string_keys(doc, path)
    unknown = set(doc) - _TARGET_KEYS
    if unknown:
        raise ManifestError(f"{path}.{sorted(unknown)[0]}", f"unknown key; known: {sorted(_TARGET_KEYS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ManifestError(f"{path}.name", f"required: the GPU SKU (e.g. b200), {SAFE_NAME_RULE}; got {name!r}")
    arch = doc.get("arch")
    if arch not in ARCHES:
        raise ManifestError(f"{path}.arch", f"must be one of {list(ARCHES)}, got {arch!r}")
    num_sms = doc.get("num_sms")
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or not 1 <= num_sms <= MAX_SMS:
        raise ManifestError(f"{path}.num_sms", f"required, an integer in 1..{MAX_SMS}, got {num_sms!r}")
    for key, hi in (("l2_bytes", MAX_L2_BYTES), ("smem_optin_bytes", MAX_SMEM_OPTIN_BYTES)):
        v = doc.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi):
            raise ManifestError(f"{path}.{key}", f"must be an integer in 1..{hi}, got {v!r}")
    return Target(name, arch, num_sms, doc.get("l2_bytes"), doc.get("smem_optin_bytes"))


def parse_host_arches(doc: Any, path: str = "target") -> tuple[str, ...]:
    """A target's ``host_arch``: one arch or a list of them (empty: the build machine's)."""
    raw = doc.get("host_arch") if isinstance(doc, Mapping) else None
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ManifestError(f"{path}.host_arch", f"an empty list; give one or more of {list(HOST_ARCHES)}")
    for i, item in enumerate(items):
        if item not in HOST_ARCHES:
            where = f"{path}.host_arch" + (f"[{i}]" if isinstance(raw, list) else "")
            raise ManifestError(where, f"must be one of {list(HOST_ARCHES)}, got {item!r}")
    if len(set(items)) != len(items):
        raise ManifestError(f"{path}.host_arch", f"lists an arch twice: {items}")
    return tuple(items)


def _string_keys(doc: Mapping[Any, Any], path: str) -> None:
    for key in doc:
        if not isinstance(key, str):
            raise ManifestError(f"{path}.{key!r}", "keys must be strings")


def expand(doc: Any) -> Plan:
    """Expand a parsed manifest document into a :class:`Plan`."""
    if not isinstance(doc, Mapping):
        raise ManifestError("<manifest>", "the document must be a mapping with target and families")
    _string_keys(doc, "<manifest>")
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
    _check_selection_budget(sections, prefixes)
    plan = Plan([])
    seen: set[str] = set()
    for section, prefix in zip(sections, prefixes):
        if not isinstance(section, Mapping):
            raise ManifestError(prefix.rstrip("."), "must be a mapping with target and families")
        _string_keys(section, prefix.rstrip(".") or "<manifest>")
        unknown = set(section) - {"target", "families"}
        if unknown:
            raise ManifestError(prefix + sorted(unknown)[0], "unknown key; known: target, families")
        target = parse_target(section.get("target"), prefix + "target")
        if any(t.identity() == target.identity() for t in plan.targets):
            raise ManifestError(prefix + "target", f"{target.arch} with {target.num_sms} SMs is listed twice")
        plan.targets.append(target)
        if hosts := parse_host_arches(section.get("target"), prefix + "target"):
            plan.host_arches[(target.arch, target.num_sms)] = hosts
        _expand_families(section.get("families"), prefix, target, plan, seen)
    return plan


def _expand_families(fams: Any, prefix: str, target: Target, plan: Plan, seen: set[str]) -> None:
    if not isinstance(fams, Mapping) or not fams:
        raise ManifestError(prefix + "families", "required, a mapping of family name to a list of groups")
    _string_keys(fams, prefix + "families")
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
    """Add the variants one manifest group builds to ``plan`` (``seen``: the variant ids already
    there); ManifestError naming the field when the group is malformed or builds nothing."""
    origin, values, explicit, shapes, filters = _parse_group(family, path, group)
    combinations = 1
    for items in values.values():
        combinations *= len(items)
    if combinations > MAX_COMBINATIONS_PER_GROUP:
        raise ManifestError(
            path, f"expands to {combinations} combinations (at most {MAX_COMBINATIONS_PER_GROUP}); split it"
        )
    all_scalar = all(len(v) == 1 for k, v in values.items() if explicit[k]) and any(explicit.values())
    if family.selected:
        if _expand_selected(family, path, origin, values, explicit, shapes, filters, target, plan, seen):
            return
        _nothing_selected(family, path, origin, values, explicit, shapes, filters, target, plan)
    n_valid, used, first_reason = _expand_combinations(family, path, origin, values, shapes, target, plan, seen)
    if n_valid == 0:
        _nothing_valid(family, path, values, explicit, plan, all_scalar)
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


def _parse_group(family: Family, path: str, group: Any) -> tuple[str, dict, dict, dict, dict]:
    """(origin, values, explicit, shapes, filters) of a group: each axis's listed values (its
    default where absent) and whether the group set it, and the domain and filter axes' values."""
    if not isinstance(group, Mapping):
        raise ManifestError(path, "a group must be a mapping of axis name to value(s)")
    _string_keys(group, path)
    label = group.get("name")
    if label is not None and (not isinstance(label, str) or not SAFE_NAME.match(label)):
        raise ManifestError(f"{path}.name", f"must be {SAFE_NAME_RULE}; got {label!r}")
    origin = f"{path} ({label})" if label else path
    values: dict[str, list[Any]] = {}
    explicit: dict[str, bool] = {}
    shapes: dict[str, list[Any]] = {}
    filters: dict[str, list[Any]] = {}
    for key, value in group.items():
        if key == "name":
            continue
        axis = family.axis(key)
        side = family.domain_axis(key) or family.filter_axis(key)
        if axis is None and side is not None:
            (shapes if family.domain_axis(key) else filters)[key] = _side_values(side, path, key, value)
            continue
        if axis is None:
            known = [a.name for a in family.axes + family.domain_axes + family.filter_axes]
            raise ManifestError(f"{path}.{key}", f"unknown axis for {family.name}; known: {known}")
        values[key] = _axis_values(axis, path, key, value)
        explicit[key] = True
    for axis in family.axes:
        if axis.name not in values:
            values[axis.name] = list(axis.default)
            explicit[axis.name] = False
    return origin, values, explicit, shapes, filters


def _axis_values(axis: Any, path: str, key: str, value: Any) -> list[Any]:
    """The listed values of one axis, each parsed (a ManifestError names the bad or repeated one)."""
    listed = isinstance(value, list) and not _is_pair_scalar(key, value)
    items = value if listed else [value]
    _parse_each(items, f"{path}.{key}", listed, axis.parse)
    return items


def _add_variant(plan: Plan, seen: set[str], variant: Variant, target: Target, origin: str, path: str) -> None:
    """Plan ``variant`` once, within :data:`MAX_VARIANTS`."""
    if variant.variant_id in seen:
        return
    seen.add(variant.variant_id)
    plan.variants.append(PlannedVariant(variant, target, origin))
    if len(plan.variants) > MAX_VARIANTS:
        raise ManifestError(path, f"the manifest expands to more than {MAX_VARIANTS} variants")


def _expand_combinations(
    family: Family, path: str, origin: str, values: dict, shapes: dict, target: Target, plan: Plan, seen: set[str]
) -> tuple[int, dict[tuple[str, int], bool], dict[tuple[str, int], str]]:
    """Every combination of an unselected family's axes: the valid ones planned (with the kernels
    a backward call runs), the others skipped with their reason. (valid count, which listed
    values a valid combination used, the first reason each value was refused)."""
    used: dict[tuple[str, int], bool] = {}
    first_reason: dict[tuple[str, int], str] = {}
    n_valid = 0
    for raw, picked in product(family.axes, values):
        for fields in resolve_fields(family.name, raw):
            reason = family.check(fields)
            idx = {k: _index(values[k], picked[k]) for k in picked}
            if reason is not None:
                for k, j in idx.items():
                    first_reason.setdefault((k, j), reason)
                plan.skipped.append(Skipped(origin, dict(picked), reason))
                continue
            n_valid += 1
            for k, j in idx.items():
                used[(k, j)] = True
            if family.parts:
                try:
                    domain = {k: tuple(v) for k, v in shapes.items()}
                    kernels = family.parts(dict(fields, _arch=target.arch, _num_sms=target.num_sms, _domain=domain))
                except ValueError as e:
                    raise ManifestError(path, f"FA4 cannot build this call: {e}") from None
            else:
                kernels = [(family.name, fields)]
            for fam_name, kfields in kernels:
                _add_variant(
                    plan, seen, Variant.make(fam_name, target.arch, target.num_sms, **kfields), target, origin, path
                )
    return n_valid, used, first_reason


def _nothing_selected(
    family: Family, path: str, origin: str, values: dict, explicit: dict, shapes: dict, filters: dict,
    target: Target, plan: Plan,
) -> None:  # fmt: skip
    """Raise for a selected group FA4 selects nothing in, blaming the explicit axis that, set back
    to its default, lets FA4 select something."""
    reason = plan.skipped[-1].reason if plan.skipped else "expands to nothing"
    culprit = None
    for key in (k for k, e in explicit.items() if e):
        trial = dict(values, **{key: list(family.axis(key).default)})
        scratch = Plan(targets=[], variants=[], skipped=[])
        if _expand_selected(family, path, origin, trial, dict(explicit, **{key: False}), shapes, filters,
                            target, scratch, set()):  # fmt: skip
            culprit = key
            break
    where = f"{path}.{culprit}" if culprit else path
    raise ManifestError(where, f"FA4 selects nothing this group can build: {reason}")


def _nothing_valid(family: Family, path: str, values: dict, explicit: dict, plan: Plan, all_scalar: bool) -> None:
    """Raise for a group with no valid combination, blaming the axis whose explicit values make
    everything invalid: the one that, set back to its default, admits a valid combination."""
    reason = plan.skipped[-1].reason if plan.skipped else "expands to nothing"
    culprit = None
    for key in (k for k, e in explicit.items() if e):
        if _any_valid(family, dict(values, **{key: list(family.axis(key).default)})):
            culprit = key
            break
    where = f"{path}.{culprit}" if culprit else path
    if all_scalar:
        raise ManifestError(where, f"FA4 cannot build this combination: {reason}")
    raise ManifestError(where, f"no combination of this group is valid: {reason}")


def _side_values(axis: Any, path: str, key: str, value: Any) -> list[Any]:
    """The parsed values of a domain or filter axis (a scalar is one value)."""
    items = value if isinstance(value, list) and not (key == "window" and _is_window(value)) else [value]
    if len(items) > MAX_SHAPE_VALUES:
        raise ManifestError(f"{path}.{key}", f"{len(items)} values (at most {MAX_SHAPE_VALUES})")
    indexed = len(items) > 1 or isinstance(value, list)
    return _parse_each(items, f"{path}.{key}", indexed, lambda item: axis.parse(item)["value"])


def _parse_each(items: list[Any], where: str, indexed: bool, parse: Callable[[Any], Any]) -> list[Any]:
    """Each of a key's listed ``items`` parsed, in order. A ManifestError at ``where`` (with the
    item's ``[j]`` when ``indexed``) names an empty list, a value ``parse`` refuses (its
    ValueError's text) or one parsing the same as an earlier one."""
    if not items:
        raise ManifestError(where, "empty list")
    out: list[Any] = []
    for j, item in enumerate(items):
        at = f"{where}[{j}]" if indexed else where
        try:
            parsed = parse(item)
        except ValueError as e:
            raise ManifestError(at, str(e)) from None
        if parsed in out:
            raise ManifestError(at, f"{item!r} is listed twice (also at [{out.index(parsed)}])")
        out.append(parsed)
    return out


def _is_window(value: list[Any]) -> bool:
    return len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _selections(domain: Any, values: dict[str, list[Any]], path: str) -> int:
    """How many calls FA4's selector is asked about to expand a forward group (its call classes
    times its shapes), within the per-group limits."""
    points = len(domain.batch) * len(domain.seqlen_q) * len(domain.seqlen_k) * len(domain.nheads_kv)
    if points * len(domain.window) > MAX_DOMAIN_POINTS:
        raise ManifestError(path, f"its shapes form {points} points (at most {MAX_DOMAIN_POINTS}); list fewer")
    calls = points * len(domain.window) * math.prod(len(v) for v in values.values())
    if calls > MAX_SELECTIONS:
        raise ManifestError(
            path, f"it asks FA4's selector about {calls} calls (at most {MAX_SELECTIONS}): list fewer values or shapes"
        )
    return calls


def _check_selection_budget(sections: list[Any], prefixes: list[str]) -> None:
    """Refuse, before expanding anything, a manifest whose forward groups together ask FA4's
    selector about more than :data:`MAX_MANIFEST_SELECTIONS` calls. Groups that do not parse are
    left to the expansion, which reports them in order."""
    from fa4aot.core import fwd

    total = 0
    for section, prefix in zip(sections, prefixes):
        fams = section.get("families") if isinstance(section, Mapping) else None
        for fam_name, groups in (fams or {}).items() if isinstance(fams, Mapping) else ():
            family = FAMILIES.get(fam_name)
            if family is None or not family.selected:
                continue
            for i, group in enumerate(groups if isinstance(groups, list) else [groups]):
                path = f"{prefix}families.{fam_name}[{i}]"
                try:
                    _, values, _, shapes, _ = _parse_group(family, path, group)
                    total += _selections(fwd.Domain(**{k: tuple(v) for k, v in shapes.items()}), values, path)
                except (ManifestError, TypeError):
                    continue
                if total > MAX_MANIFEST_SELECTIONS:
                    raise ManifestError(
                        path,
                        f"with the groups before it, the manifest asks FA4's selector about {total} calls "
                        f"(at most {MAX_MANIFEST_SELECTIONS}): split it into several manifests",
                    )


def _expand_selected(
    family: Family,
    path: str,
    origin: str,
    values: dict[str, list[Any]],
    explicit: dict[str, bool],
    shapes: dict[str, list[Any]],
    filters: dict[str, list[Any]],
    target: Target,
    plan: Plan,
    seen: set[str],
) -> int:
    """Expand a forward group through FA4's selector (:func:`fa4aot.core.fwd.expand`) over the
    group's shapes; returns how many product points gave variants. A product value that gives
    none, or a filter value no selected config has, is an error naming the field."""
    from fa4aot.core import fwd, selector

    try:
        sel = selector.installed()
    except Fa4aotError as e:
        raise ManifestError(path, f"expanding a {family.name} group runs FA4's selector: {e}") from None
    domain = fwd.Domain(**{k: tuple(v) for k, v in shapes.items()})
    _selections(domain, values, path)
    used: dict[tuple[str, int], bool] = {}
    first_reason: dict[tuple[str, int], str] = {}
    matched: dict[str, set[Any]] = {k: set() for k in filters}
    n_valid = 0
    for raw, picked in product(family.axes, values):
        idx = {k: _index(values[k], picked[k]) for k in picked}
        raw = dict(raw, _filters={k: tuple(v) for k, v in filters.items()})
        raw.setdefault("sm100_backend", None)
        raw.setdefault("mma_pv_is_rs", None)
        raw.setdefault("config", None)
        reason = family.check(raw)
        found: list[dict[str, Any]] = []
        around: list[tuple[str, dict[str, Any]]] = []
        if reason is None:
            found, around, reason = fwd.expand(sel, target.arch, target.num_sms, raw, domain)
        if not found:
            for k, j in idx.items():
                first_reason.setdefault((k, j), reason or "invalid")
            plan.skipped.append(Skipped(origin, dict(picked), reason or "invalid"))
            continue
        n_valid += 1
        for k, j in idx.items():
            used[(k, j)] = True
        for fields in found:
            for k in filters:
                matched[k].add(fwd.FILTERS[k](fields))
        for name, fields in [(family.name, f) for f in found] + around:
            _add_variant(plan, seen, Variant.make(name, target.arch, target.num_sms, **fields), target, origin, path)
    if not n_valid:
        return 0
    for key, items in values.items():
        for j, item in enumerate(items):
            if explicit[key] and not used.get((key, j)):
                where = f"{path}.{key}[{j}]" if len(items) > 1 else f"{path}.{key}"
                raise ManifestError(
                    where, f"no shape makes FA4 build {item!r}: {first_reason.get((key, j), 'invalid')}"
                )
    for key, wanted in filters.items():
        for j, value in enumerate(wanted):
            if value not in matched[key]:
                where = f"{path}.{key}[{j}]" if len(wanted) > 1 else f"{path}.{key}"
                raise ManifestError(
                    where, f"FA4 selects no config with {key} {value!r} for this group's calls and shapes"
                )
    return n_valid


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
