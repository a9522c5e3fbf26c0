"""Read the header ``export_to_c`` writes, and cross-check it with what a kernel module declared
(build time only: the runtime reads the recorded argument list, never C)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fa4aot.core.errors import PlanError
from fa4aot.core.signature import Arg, ScalarArg, TensorArg

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
