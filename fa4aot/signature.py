"""The C signature of an exported launch-plan entry, as data.

The CuTe DSL's ``export_to_c`` writes a header whose host entry takes, in order, one struct per
tensor argument ``{void *data; int32_t dynamic_shapes[n]; int64_t dynamic_strides[m];}`` (static
modes dropped), one value per scalar (``float``, ``int32_t``) and the stream. At build time
:func:`parse_header` reads that header once and :func:`check_against` cross-checks it with what
the kernel module declared; the result is stored as JSON so the runtime never parses C.

:func:`struct_layout` gives each argument's byte layout (natural C alignment, padded to 8), which
the runtime packs with one precompiled :class:`struct.Struct`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fa4aot.errors import PlanError

#: Element types by name, with their size in bytes.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int32": 4, "fp8e4m3": 1, "fp8e5m2": 1}


@dataclass(frozen=True)
class TensorArg:
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
        return sum(s is None for s in self.stride)

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


@dataclass(frozen=True)
class ScalarArg:
    """A scalar argument passed by value (``f32`` or ``i32``)."""

    name: str
    ctype: str

    kind = "scalar"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "scalar", "name": self.name, "ctype": self.ctype}


@dataclass(frozen=True)
class StreamArg:
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


# ---------------------------------------------------------------- header parsing (build time)

_STRUCT_RE = re.compile(
    r"typedef struct \{\s*void \*data;\s*(?P<body>.*?)\}\s*(?P<tname>\w+)_Tensor_(?P<arg>\w+)_t;",
    re.S,
)
_FIELD_RE = re.compile(r"(int32_t|int64_t)\s+(dynamic_shapes|dynamic_strides)\[(\d+)\];")
_WRAPPER_RE = re.compile(r"static inline int32_t cute_dsl_(?P<prefix>\w+)_wrapper\((?P<params>[^)]*)\)")
_CALL_RE = re.compile(r"(?P<sym>_mlir_\w+__mlir_ciface_\w+)\(args, (?P<n>\d+)\);")


@dataclass(frozen=True)
class HeaderSignature:
    """What the exported header says: the entry symbol and each argument's C shape."""

    prefix: str
    entry_symbol: str
    params: tuple[tuple[str, str, tuple[int, int, int, int] | None], ...]
    # (name, ctype, (n_shapes, shape_bits, n_strides, stride_bits) for tensors)

    @property
    def init_symbol(self) -> str:
        return f"_mlir_{self.prefix}_cuda_init"

    @property
    def load_symbol(self) -> str:
        return f"_mlir_{self.prefix}_cuda_load_to_device"


def parse_header(text: str) -> HeaderSignature:
    """Parse a header written by ``export_to_c``; raises PlanError if it has an unknown shape."""
    structs: dict[str, tuple[int, int, int, int]] = {}
    for m in _STRUCT_RE.finditer(text):
        n_sh = n_st = 0
        sh_bits, st_bits = 32, 64
        for fm in _FIELD_RE.finditer(m.group("body")):
            bits = 32 if fm.group(1) == "int32_t" else 64
            if fm.group(2) == "dynamic_shapes":
                n_sh, sh_bits = int(fm.group(3)), bits
            else:
                n_st, st_bits = int(fm.group(3)), bits
        structs[f"{m.group('tname')}_Tensor_{m.group('arg')}_t"] = (n_sh, sh_bits, n_st, st_bits)
    wm = _WRAPPER_RE.search(text)
    cm = _CALL_RE.search(text)
    if not wm or not cm:
        raise PlanError("exported header has no cute_dsl_*_wrapper / _mlir_*_ciface_* entry")
    params = []
    for i, raw in enumerate(p.strip() for p in wm.group("params").split(",")):
        if i == 0:
            continue  # the Kernel_Module_t*; the entry itself does not take it
        ctype, name = raw.rsplit(" ", 1)
        if name.startswith("*"):
            ctype, name = ctype + "*", name[1:]
        ctype = ctype.strip()
        if ctype.endswith("*"):
            tname = ctype.rstrip("*").strip()
            if tname not in structs:
                raise PlanError(f"header parameter {name} has unknown struct type {tname}")
            params.append((name, "tensor", structs[tname]))
        elif ctype in ("float", "int32_t", "cudaStream_t"):
            params.append((name, ctype, None))
        else:
            raise PlanError(f"header parameter {name} has unsupported C type {ctype!r}")
    n_args = int(cm.group("n"))
    if n_args != len(params) + 1:  # + the int32 return slot
        raise PlanError(f"header entry takes {n_args} args but the wrapper lists {len(params)} + ret")
    return HeaderSignature(wm.group("prefix"), cm.group("sym"), tuple(params))


def check_against(header: HeaderSignature, args: Sequence[Arg]) -> None:
    """Raise PlanError unless the header's parameters are exactly ``args`` (order, kinds, sizes)."""
    present = list(args)
    if len(header.params) != len(present):
        raise PlanError(
            f"header has {len(header.params)} parameters {[p[0] for p in header.params]}, "
            f"the kernel declared {len(present)} {[a.name for a in present]}"
        )
    for (name, ctype, dims), arg in zip(header.params, present):
        if name != arg.name:
            raise PlanError(f"header parameter {name} where the kernel declared {arg.name}")
        if isinstance(arg, TensorArg):
            want = (arg.n_dyn_shapes, arg.shape_bits, arg.n_dyn_strides, arg.stride_bits)
            got = dims
            # A struct with zero dynamic shapes or strides omits the field; bits are then moot.
            if (
                got is None
                or (got[0], got[2]) != (want[0], want[2])
                or (got[0] and got[1] != want[1])
                or (got[2] and got[3] != want[3])
            ):
                raise PlanError(f"tensor {name}: header has {got}, kernel declared {want}")
        elif isinstance(arg, ScalarArg):
            if {"f32": "float", "i32": "int32_t"}[arg.ctype] != ctype:
                raise PlanError(f"scalar {name}: header has {ctype}, kernel declared {arg.ctype}")
        elif ctype != "cudaStream_t":
            raise PlanError(f"{name}: header has {ctype}, expected cudaStream_t")


# ---------------------------------------------------------------- packing layout (run time)


def tensor_struct_format(arg: TensorArg) -> str:
    """``struct`` format of one tensor struct (native alignment, trailing pad to 8)."""
    fmt = "P"
    fmt += ("i" if arg.shape_bits == 32 else "q") * arg.n_dyn_shapes
    if arg.n_dyn_strides:
        if arg.stride_bits == 64 and arg.shape_bits == 32 and arg.n_dyn_shapes % 2:
            fmt += "x" * 4  # align the int64 strides
        fmt += ("q" if arg.stride_bits == 64 else "i") * arg.n_dyn_strides
    size = struct.calcsize("@" + fmt)
    if size % 8:
        fmt += "x" * (8 - size % 8)
    return fmt


def struct_layout(args: Sequence[Arg]) -> tuple[str, list[int]]:
    """One ``struct`` format for all argument storage, and each argument's byte offset in it.

    Tensors are their C struct; scalars a 4-byte slot; the stream an 8-byte slot; every slot
    starts 8-aligned so the entry can read it through a plain pointer.
    """
    fmt = "@"
    offsets = []
    pos = 0
    for a in args:
        offsets.append(pos)
        if isinstance(a, TensorArg):
            part = tensor_struct_format(a)
        elif isinstance(a, ScalarArg):
            part = ("f" if a.ctype == "f32" else "i") + "xxxx"
        else:
            part = "P"
        fmt += part
        pos = struct.calcsize(fmt)
    return fmt, offsets
