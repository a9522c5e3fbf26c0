"""Kernel families: one home module per family, one table the build, runtime, tools and tests read.

A family's home states everything fa4aot knows about that kind of kernel (:class:`Family`): its
manifest axes and FA4's validity rules, its tensors and sample arguments, its kernel's name in
FA4's cubins and an independent oracle for its grid. Pure Python (no DSL, no torch), so the
manifest expander, the build, the runtime dispatcher and the tests share one definition of what a
variant of each family is. A forward family's variants are what FA4's own selector picks for a
group's calls over its shapes (:mod:`fa4aot.core.fwd`); the checks are the call combinations FA4's
interface refuses before it selects (:mod:`fa4aot.core.fa4_interface` restates them, naming FA4's
lines); each rejection carries a reason, so ``fa4aot plan`` can say why a combination was skipped.

Homes: :mod:`.forward` (fwd_sm90, fwd_sm100, fwd_sm120), :mod:`.combine`, :mod:`.prepare`,
:mod:`.backward` (bwd_sm90, bwd_sm100, bwd_sm120 and their helpers bwd_pre, bwd_post). A new
family is a row in its kind's home, or a new home module and its row in :data:`FAMILIES`
(docs/extending.md).
"""

from __future__ import annotations

from typing import Any

from fa4aot.core.families import backward, combine, forward, prepare
from fa4aot.core.families.axes import SINK_DTYPES, Axis, product
from fa4aot.core.families.base import BACKWARD, COMPANION, FORWARD, Family
from fa4aot.core.families.forward import is_tuning_candidate
from fa4aot.core.layouts import Dims, TensorLayout
from fa4aot.core.variant import Variant

__all__ = [
    "BACKWARD",
    "COMPANION",
    "FAMILIES",
    "FORWARD",
    "SINK_DTYPES",
    "Axis",
    "Family",
    "dims_for",
    "group_for",
    "is_tuning_candidate",
    "of_stage",
    "product",
    "resolve_fields",
    "sample_scalars",
    "tensors_for",
]

#: Every family fa4aot builds, by name: each home contributes its rows.
FAMILIES: dict[str, Family] = {
    f.name: f for f in (*forward.FAMILIES, combine.FAMILY, prepare.FAMILY, *backward.FAMILIES)
}


def of_stage(stage: str) -> tuple[str, ...]:
    """The names of the families of one stage (:data:`FORWARD`, :data:`COMPANION`, :data:`BACKWARD`)."""
    return tuple(name for name, f in FAMILIES.items() if f.stage == stage)


def resolve_fields(family: str, raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn one product point of axis values into the concrete field dicts it stands for.

    Resolves ``auto`` the way FA4 does; for axes that stand for several concrete variants (the
    prepare kernel's batch buckets) returns one dict per variant.
    """
    return FAMILIES[family].resolve(dict(raw))


def group_for(variant: Variant, shapes: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """The manifest group (axis -> [value]) that builds ``variant``; for error messages. A forward
    variant is what FA4 selects for a call (its home says the call's group); another family's
    group is each axis's item for the variant's fields."""
    fam = FAMILIES[variant.family]
    if fam.group is not None:
        return fam.group(variant, shapes)
    return {axis.name: [axis.item_of(variant.fields)] for axis in fam.axes}


def tensors_for(variant: Variant, d: Dims, num_sms: int | None = None) -> dict[str, TensorLayout]:
    """The tensors of one call of ``variant`` with sizes ``d`` (FA4's layouts), from its home."""
    return FAMILIES[variant.family].tensors(variant, d, num_sms)


def dims_for(variant: Variant, **overrides: Any) -> Dims:
    """Representative dims for a variant (its head dims and head counts), with overrides."""
    return Dims(**{**FAMILIES[variant.family].dims(variant), **overrides})


def sample_scalars(variant: Variant, d: Dims) -> dict[str, Any]:
    """The scalar arguments of one sample call of ``variant`` with sizes ``d``."""
    return FAMILIES[variant.family].scalars(variant, d)
