"""Shared build-time helpers: the target-hardware stand-in, fake tensors, the ``@cute.jit`` entry
generated from them, and the entry record."""

from __future__ import annotations

import hashlib
import linecache
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from fa4aot.core.signature import COMPACT, Arg, ScalarArg, StreamArg, TensorArg

CUTLASS_DTYPES = {
    "bf16": cutlass.BFloat16,
    "fp16": cutlass.Float16,
    "fp32": cutlass.Float32,
    "int32": cutlass.Int32,
    "int64": cutlass.Int64,
    "e4m3": cutlass.Float8E4M3FN,
    "e5m2": cutlass.Float8E5M2,
    "e8m0": cutlass.Float8E8M0FNU,
}


class TargetHardwareInfo:
    """Stand-in for ``cutlass.utils.HardwareInfo`` that answers with the manifest target.

    FA4 asks for the SM count while tracing (persistent schedulers, the prepare kernel) and bakes
    it into host-side grids; on a build machine without a GPU the real class fails, and on one
    with a different GPU it would silently build for the wrong SKU.
    """

    num_sms: int = 0

    def __init__(self, device_id: int = 0):
        self.device_id = device_id

    def get_device_multiprocessor_count(self) -> int:
        return type(self).num_sms

    def get_max_active_clusters(self, cluster_size: int, stream: Any = None) -> int:
        return type(self).num_sms // cluster_size


def install_target_hardware(num_sms: int) -> None:
    """Make every HardwareInfo lookup FA4 does answer ``num_sms`` (idempotent)."""
    import cutlass.utils
    import cutlass.utils.hardware_info as hardware_info

    TargetHardwareInfo.num_sms = num_sms
    cutlass.utils.HardwareInfo = TargetHardwareInfo
    hardware_info.HardwareInfo = TargetHardwareInfo
    import flash_attn.cute.tile_scheduler as tile_scheduler

    tile_scheduler.HardwareInfo = TargetHardwareInfo


@dataclass
class KernelEntry:
    """What the build compiles for one variant.

    ``fn`` is a ``@cute.jit`` function whose parameters are exactly ``args`` (tensors, scalars,
    the stream), compiled with ``compile_args`` (fake tensors etc.); ``options`` are extra
    ``cute.compile`` options (e.g. ptxas flags the FA4 class asks for).
    """

    fn: Callable[..., Any]
    compile_args: list[Any]
    args: list[Arg]
    options: str = ""


#: The annotation of an entry parameter of each scalar type (what the DSL traces it as).
SCALAR_ANNOTATIONS = {"f32": "Float32", "i32": "Int32"}

#: What the annotations of a generated entry (:meth:`Signature.entry`) name.
_ANNOTATION_SCOPE = {"cute": cute, "cuda": cuda, "Optional": Optional, "Float32": Float32, "Int32": Int32}

#: ``__module__`` of the generated entries: no real module, so ``inspect`` can only find their
#: source in linecache (a real one's loader would hand it the module file instead).
_GENERATED_MODULE = "fa4aot_kernels.generated"


class EntryArgs:
    """An entry's traced arguments by parameter name (None where absent), in the
    :class:`Signature`'s order, which is FA4's: a kernel call is mostly spans of them."""

    def __init__(self, names: Sequence[str], values: Sequence[Any]) -> None:
        self._values = dict(zip(names, values, strict=True))

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def span(self, first: str, last: str) -> tuple[Any, ...]:
        """The arguments from ``first`` to ``last``, both included."""
        names = list(self._values)
        return tuple(self._values[n] for n in names[names.index(first) : names.index(last) + 1])


#: The per-sequence int32 vectors FA4's forward, backward and prepare kernels take, in its
#: order, with the variant field that says whether a call passes each.
SEQLEN_VECTORS = (
    ("cu_seqlens_q", "varlen_q"),
    ("cu_seqlens_k", "varlen_k"),
    ("seqused_q", "seqused_q"),
    ("seqused_k", "seqused_k"),
)


class Signature:
    """Collects fake compile-time arguments together with their :mod:`fa4aot.core.signature`
    records, and the typed parameter list of the ``@cute.jit`` entry that takes them."""

    def __init__(self) -> None:
        self.compile_args: list[Any] = []
        self.args: list[Arg] = []
        #: (name, annotation source) of every entry parameter: one per compile argument, absent
        #: ones included (the DSL compiles those as None; ``args`` has no record of them).
        self.params: list[tuple[str, str]] = []

    def _param(self, name: str, annotation: str, optional: bool) -> None:
        self.params.append((name, f"Optional[{annotation}]" if optional else annotation))

    def tensor(
        self,
        name: str,
        dtype: str,
        shape: tuple[Any, ...],
        *,
        leading_dim: int | None = -1,
        align: int = 16,
        stride_divisibility: int = 1,
        zero_strides: tuple[int, ...] = (),
        optional: bool = False,
    ) -> Any:
        """Add a fake tensor. ``shape`` items are ints (static) or SymInts (dynamic); every
        stride is dynamic except ``leading_dim``'s, which is 1 (FA4's ``mark_layout_dynamic``),
        and the broadcast modes ``zero_strides``, which CuTe keeps static at 0. ``optional``:
        the parameter is ``Optional`` (other variants of the family compile it as None)."""
        rank = len(shape)
        if leading_dim is not None and leading_dim < 0:
            leading_dim += rank
        stride = tuple(
            1 if i == leading_dim else 0 if i in zero_strides else cute.sym_int64(divisibility=stride_divisibility)
            for i in range(rank)
        )
        fake = cute.runtime.make_fake_tensor(CUTLASS_DTYPES[dtype], shape, stride=stride, assumed_align=align)
        self.compile_args.append(fake)
        self.args.append(
            TensorArg(
                name,
                dtype,
                tuple(s if isinstance(s, int) else None for s in shape),
                tuple(1 if i == leading_dim else 0 if i in zero_strides else None for i in range(rank)),
                align,
            )
        )
        self._param(name, "cute.Tensor", optional)
        return fake

    def optional_tensor(self, name: str, present: bool, dtype: str, shape: tuple[Any, ...], **layout: Any) -> None:
        """A tensor only some variants of the family take: an ``Optional`` :meth:`tensor` where
        ``present``, else :meth:`absent` (``dtype`` and ``shape`` unused)."""
        if present:
            self.tensor(name, dtype, shape, optional=True, **layout)
        else:
            self.absent(name)

    def compact_tensor(
        self, name: str, dtype: str, shape: tuple[Any, ...], align: int, *, optional: bool = False
    ) -> Any:
        """Add a row-major compact fake tensor: its strides follow from the (dynamic or static)
        extents, as ``mark_compact_shape_dynamic`` makes them (FA4's semaphores)."""
        rank = len(shape)
        fake = cute.runtime.make_fake_compact_tensor(
            CUTLASS_DTYPES[dtype], shape, stride_order=tuple(range(rank - 1, -1, -1)), assumed_align=align
        )
        self.compile_args.append(fake)
        strides = []
        for i in range(rank):  # static where every inner extent is, else a field checked compact
            inner = shape[i + 1 :]
            strides.append(math.prod(inner) if all(isinstance(x, int) for x in inner) else COMPACT)
        self.args.append(
            TensorArg(name, dtype, tuple(s if isinstance(s, int) else None for s in shape), tuple(strides), align)
        )
        self._param(name, "cute.Tensor", optional)
        return fake

    def scalar(self, name: str, ctype: str, *, optional: bool = False) -> Any:
        """Add a dynamic scalar (``f32`` or ``i32``)."""
        value = cutlass.Float32(1.0) if ctype == "f32" else cutlass.Int32(1)
        self.compile_args.append(value)
        self.args.append(ScalarArg(name, ctype))
        self._param(name, SCALAR_ANNOTATIONS[ctype], optional)
        return value

    def absent(self, name: str, ctype: str = "tensor") -> None:
        """An optional argument (a tensor, or an ``i32`` / ``f32`` scalar) the variant does not
        take: compiled as None, dropped from C."""
        self.compile_args.append(None)
        self._param(name, "cute.Tensor" if ctype == "tensor" else SCALAR_ANNOTATIONS[ctype], optional=True)

    def stream(self) -> Any:
        """Add the CUDA stream (the last argument of every entry)."""
        s = cute.runtime.make_fake_stream()
        self.compile_args.append(s)
        self.args.append(StreamArg())
        self._param("stream", "cuda.CUstream", optional=False)
        return s

    def seqlen_vectors(self, f: dict) -> None:
        """cu_seqlens_q / _k and seqused_q / _k (1-D int32, 4-byte aligned), each where the
        variant takes it (:data:`SEQLEN_VECTORS`)."""
        for name, field in SEQLEN_VECTORS:
            self.optional_tensor(name, f[field], "int32", (sym(),), leading_dim=0, align=4)

    def window_sizes(self, f: dict) -> None:
        """window_size_left / _right: i32 scalars of local (sliding-window) variants, else absent."""
        for name in ("window_size_left", "window_size_right"):
            if f["local"]:
                self.scalar(name, "i32", optional=True)
            else:
                self.absent(name, "i32")

    def entry(self, name: str, call: Callable[[EntryArgs], None]) -> KernelEntry:
        """The variant's entry: a ``@cute.jit`` function ``name`` whose typed parameters are
        :attr:`params`, handing them to ``call`` (a plain function that calls the FA4 kernel)."""
        return KernelEntry(jit_entry(name, self.params, call), self.compile_args, self.args)


def jit_entry(name: str, params: Sequence[tuple[str, str]], call: Callable[[EntryArgs], None]) -> Callable[..., Any]:
    """A ``@cute.jit`` function ``name(p1: A1, ..., pn: An)`` that calls ``call`` with its arguments.

    The DSL takes an entry's parameter list literally: the names become the exported C
    arguments (checked against the Signature's records), the annotations say how each argument
    is traced (``Optional`` ones may be None). So the function is generated from the parameter
    table rather than written out per kernel. Its AST preprocessor re-reads the source of a
    ``@cute.jit`` function: the generated source is registered in linecache under a name of its
    own (also what tracebacks show); it holds no control flow, which stays in ``call``.
    """
    names = [n for n, _ in params]
    source = "".join(
        [f"def {name}(\n", *(f"    {n}: {a},\n" for n, a in params), "):\n", f"    _call({', '.join(names)})\n"]
    )
    # one file name per text: entries of one family differ in annotations (bwd_post with a sink)
    filename = f"<fa4aot_kernels generated: {name} {hashlib.sha256(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)

    def _call(*values: Any) -> None:
        call(EntryArgs(names, values))

    scope = {**_ANNOTATION_SCOPE, "_call": _call, "__name__": _GENERATED_MODULE}
    exec(compile(source, filename, "exec"), scope)
    return cute.jit(scope[name])


def sym() -> Any:
    """A fresh dynamic int32 extent."""
    return cute.sym_int()


def softcap_score_mod(softcap: float) -> Callable[..., Any] | None:
    """FA4's softcap: a score_mod with the value baked in (``utils.create_softcap_scoremod``), or
    None for 0 (FA4 turns softcap 0.0 into None)."""
    if not softcap:
        return None
    from flash_attn.cute.utils import create_softcap_scoremod

    return create_softcap_scoremod(float(softcap))


def attention_kwargs(f: dict, *, dtype: bool, mask_mod: bool = True) -> dict[str, Any]:
    """The constructor arguments of FA4's attention classes (forward and backward, every arch)
    that the variant's fields give as they are: head dims, query heads per KV head, causal and
    local masking, the softcap ``score_mod``; the element ``dtype`` for the classes that take
    one (SM90, SM120); and, for those that take them (all but the SM120 backward), ``mask_mod``
    and ``has_aux_tensors``, which FA4's interface passes and fa4aot never builds (None / False).
    """
    kwargs: dict[str, Any] = {arg: f[field] for arg, field in _FIELD_ARGS}
    kwargs["score_mod"] = softcap_score_mod(f["softcap"])
    if dtype:
        kwargs["dtype"] = CUTLASS_DTYPES[f["dtype"]]
    if mask_mod:
        kwargs.update(mask_mod=None, has_aux_tensors=False)
    return kwargs


#: (FA4 constructor argument, variant field) of :func:`attention_kwargs`.
_FIELD_ARGS = (
    ("head_dim", "head_dim"),
    ("head_dim_v", "head_dim_v"),
    ("qhead_per_kvhead", "qhead_per_kvhead"),
    ("is_causal", "causal"),
    ("is_local", "local"),
)


def config_kwargs(config: Any, names: str, **renamed: str) -> dict[str, Any]:
    """Constructor arguments that are attributes of FA4's selected config: ``names``
    (space-separated) as they are, ``renamed`` as ``argument="attribute"``."""
    kwargs = {n: getattr(config, n) for n in names.split()}
    kwargs.update({arg: getattr(config, attr) for arg, attr in renamed.items()})
    return kwargs
