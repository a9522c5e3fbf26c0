"""What a kernel family is: the record each family home fills in (:mod:`fa4aot.core.families`).

A family's home module owns everything fa4aot knows about that kind of kernel and states it once:
its manifest axes and FA4's validity rules, the tensors and scalars its kernels take (FA4's
layouts), representative sample sizes, the kernel's name in FA4's cubins, and an independent
oracle for the grid FA4's host code computes. The build, runtime, tools and tests iterate the one
table of these records instead of naming families.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fa4aot.core.families.axes import Axis
from fa4aot.core.layouts import Dims, TensorLayout
from fa4aot.core.variant import Variant

#: ``Family.stage``: a forward kernel, a kernel a forward runs beside it, a backward kernel.
FORWARD, COMPANION, BACKWARD = "forward", "companion", "backward"

Fields = dict[str, Any]
Grid = tuple[int, int, int]


def one(f: Fields) -> list[Fields]:
    """A product point that stands for one variant as it is."""
    return [f]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def packed(total: int | None, batch: int, seqlen: int) -> int:
    """Packed varlen length; None means every sequence is full, as in ``core.layouts``."""
    return batch * seqlen if total is None else total


@dataclass(frozen=True)
class Family:
    """A kernel family: name, the arches it builds for, its axes and its validity rule, and the
    per-variant knowledge its home states (all pure functions of a variant).

    ``parts`` (backward groups): the kernel variants one valid field set stands for; a family
    without it is one kernel per field set."""

    name: str
    arches: tuple[str, ...]
    axes: tuple[Axis, ...]
    check: Callable[[Fields], str | None]
    doc: str
    stage: str
    #: the tensors of one call (FA4's layouts) for a variant, sizes and the SM count
    tensors: Callable[[Variant, Dims, int | None], dict[str, TensorLayout]]
    #: representative sample sizes of a variant (head dims, head counts; Dims fields)
    dims: Callable[[Variant], dict[str, Any]]
    #: the scalars of one sample call (name -> value), for sizes
    scalars: Callable[[Variant, Dims], dict[str, Any]]
    #: how a variant's kernel is named in FA4's cubins, a prefix (an FA4 call may compile several
    #: kernels: this picks the variant's)
    fa4_kernel: Callable[[Fields], str]
    #: the grid FA4's scheduler gives a call, re-derived by hand (None: not checked); called with
    #: the variant fields, the call's sizes (``fa4aot.tools.plancheck``) and the SM count
    grid: Callable[[Fields, dict[str, int], int], Grid] | None = None
    #: the launch cluster FA4 uses for a variant (None: no cluster)
    cluster: Callable[[Fields], tuple[int, ...] | None] = lambda f: None
    #: the addresses a kernel parameter holds as they are (others live in TMA descriptors): the
    #: variant fields and a call's named arguments -> {tensor name: address}
    pointers: Callable[[Fields, dict[str, Any]], dict[str, int]] = lambda f, named: {}
    #: one product point of axis values -> the concrete field dicts it stands for
    resolve: Callable[[Fields], list[Fields]] = one
    parts: Callable[[Fields], list[tuple[str, Fields]]] | None = None
    #: selector families: the shape axes (not a product: the domain FA4's selector runs over)
    #: and the filter axes (keep what FA4 selects with these values)
    domain_axes: tuple[Axis, ...] = ()
    filter_axes: tuple[Axis, ...] = ()
    #: a call for which FA4's JIT compiles exactly this variant (``fa4aot verify --against-fa4``;
    #: None: the tool derives the forward's and backward's from FA4's selector)
    fa4_case: Callable[[Variant], dict[str, Any] | None] | None = None
    #: selector families: the manifest group that builds a variant (for error messages)
    group: Callable[[Variant, dict[str, list[Any]] | None], dict[str, Any]] | None = None

    def axis(self, name: str) -> Axis | None:
        return next((a for a in self.axes if a.name == name), None)

    def domain_axis(self, name: str) -> Axis | None:
        return next((a for a in self.domain_axes if a.name == name), None)

    def filter_axis(self, name: str) -> Axis | None:
        return next((a for a in self.filter_axes if a.name == name), None)

    @property
    def selected(self) -> bool:
        """Its variants come from FA4's selector one per config (forward families; the backward
        ones select too, but a config stands for several kernels: ``parts``)."""
        return bool(self.domain_axes) and self.parts is None
