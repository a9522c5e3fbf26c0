"""The arguments of an exported launch-plan entry, as data.

The CuTe DSL's ``export_to_c`` writes a host entry that takes, in order, one struct per tensor
argument ``{void *data; int32_t dynamic_shapes[n]; int64_t dynamic_strides[m];}`` (static modes
dropped), one value per scalar (``float``, ``int32_t``) and the stream. The build records that
list (:mod:`fa4aot.compile.header` cross-checks it with the header) as JSON, so the runtime never
parses C; :class:`TensorDesc` is how a tensor is handed to a plan.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fa4aot.core.errors import PlanError

#: ``TensorArg.stride`` entry of a mode whose stride is a struct field that must equal the
#: row-major product of the inner extents (a compact layout with dynamic extents: FA4's
#: deterministic-backward semaphores).
COMPACT = -1


class TensorArg(NamedTuple):
    """A tensor argument: rank, which modes are dynamic, element type and assumed alignment.

    ``shape[i]``/``stride[i]`` is None where the mode is dynamic (a field of the C struct) and
    the compile-time value where it is static (the runtime checks the caller's value equals it).
    """

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    stride: tuple[int | None, ...]
    align: int
    shape_bits: int = 32
    stride_bits: int = 64

    kind = "tensor"

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def n_dyn_shapes(self) -> int:
        return sum(s is None for s in self.shape)

    @property
    def n_dyn_strides(self) -> int:
        return sum(s is None or s == COMPACT for s in self.stride)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "tensor",
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "stride": list(self.stride),
            "align": self.align,
            "shape_bits": self.shape_bits,
            "stride_bits": self.stride_bits,
        }


class ScalarArg(NamedTuple):
    """A scalar argument passed by value (``f32`` or ``i32``)."""

    name: str
    ctype: str

    kind = "scalar"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "scalar", "name": self.name, "ctype": self.ctype}


class StreamArg(NamedTuple):
    """The CUDA stream (a ``cudaStream_t``, passed by value)."""

    name: str = "stream"

    kind = "stream"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "name": self.name}


Arg = TensorArg | ScalarArg | StreamArg


def arg_from_dict(d: dict[str, Any]) -> Arg:
    """Inverse of ``Arg.to_dict``; raises PlanError on a malformed record."""
    try:
        kind = d["kind"]
        if kind == "tensor":
            return TensorArg(
                d["name"],
                d["dtype"],
                tuple(d["shape"]),
                tuple(d["stride"]),
                int(d["align"]),
                int(d.get("shape_bits", 32)),
                int(d.get("stride_bits", 64)),
            )
        if kind == "scalar":
            if d["ctype"] not in ("f32", "i32"):
                raise ValueError(d["ctype"])
            return ScalarArg(d["name"], d["ctype"])
        if kind == "stream":
            return StreamArg(d["name"])
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"malformed argument record {d!r}: {e}") from None
    raise PlanError(f"unknown argument kind in {d!r}")


class TensorDesc(NamedTuple):
    """A tensor as a plan sees it: device address, shape and strides in elements."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
