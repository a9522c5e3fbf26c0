"""Prepared calls: validate and dispatch once, then launch with one foreign call per kernel.

Serving engines call the same layer configuration thousands of times a second. FlashInfer's
``plan()``/``run()`` is the model: :func:`prepare_forward` / :func:`prepare_combine` take example
tensors and every other argument, validate all of it, pick the variant, load it, allocate what the
call owns (split-KV partials, scheduler metadata) and bind the plan's packed arguments. The
returned :class:`Prepared` object is then called with tensors of the same shapes, strides,
dtypes and devices (new addresses are fine) and an optional stream::

    run = fa4aot.prepare_forward(q, k, v, out, causal=True)
    for layer in layers:
        run(q[layer], k[layer], v[layer], out[layer])

Per call it checks each tensor's (shape, strides, dtype, device) against the bound ones (for
PyTorch tensors one accessor each; a tensor bound contiguous must be contiguous) and the base
alignment; a mismatch raises :class:`~fa4aot.ArgumentError` and
launches nothing. Then it writes the addresses and the stream into the bound call block and makes
one foreign call per kernel (FA4's host code, or its last launch again when the addresses did not
change, then ``cuLaunchKernelEx``). Nothing is allocated per call and nothing synchronises, so a
prepared call can be captured in a CUDA graph.

Host scalars (softmax_scale, window, max_seqlen_q/k) are fixed at bind time; prepare one call per
configuration (they are cheap to keep), or with ``varying=True`` (:mod:`fa4aot.runtime.varying`)
take the batch and max_seqlens per call. ``Prepared.launch_ptrs(*addresses, stream=)`` makes the same
launches from raw device addresses without any check, for engines that validate themselves. The per-call function is generated for the bound
tensors, with a fast path for PyTorch tensors (torch's own tensor check, then their accessors).
"""

from __future__ import annotations

import re
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from fa4aot.core import gencode
from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_interface import TENSORMAP_WORDS, forward_prepare_options
from fa4aot.plan.abi import CALL_PTRS_OFFSET
from fa4aot.plan.library import HOP, BoundCall, Plan
from fa4aot.runtime import combine as combine_mod
from fa4aot.runtime import loader, validate
from fa4aot.runtime.forward import analyse
from fa4aot.runtime.frameworks import alloc_like, default_stream, framework, transposed
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.metadata import SchedulerMetadata, check_metadata, metadata_kind
from fa4aot.runtime.scales import NAMES as SCALE_NAMES
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor, contiguous_strides, stream_handle
from fa4aot.runtime.workspaces import WORKSPACE_SLOT_BYTES, stream_workspace, workspace_slots

if TYPE_CHECKING:
    from fa4aot.runtime.varying import VaryingForward

#: Alignment of the buffers a prepared call owns (cuMemAlloc gives 256 B; keep sub-buffers so).
OWNED_ALIGN = 256


#: The per-call values a prepared call bound with ``varying=True`` takes beside the addresses,
#: and the plan arguments each sets (argument, dynamic extent or None for a scalar, expression).
PER_CALL = ("vb", "vq", "vk", "vs")  # batch, max_seqlen_q, max_seqlen_k, workspace slots
PER_CALL_WORDS = (
    ("cu_seqlens_q", 0, "vb + 1"),
    ("cu_seqlens_k", 0, "vb + 1"),
    ("seqused_q", 0, "vb"),
    ("seqused_k", 0, "vb"),
    ("tensormap_workspace", 0, "vs"),
    ("max_seqlen_q", None, "vq"),
    ("max_seqlen_k", None, "vk"),
)


class NeedsBuffers(Exception):
    """A call whose prepared form would own device buffers, asked for without them."""


#: a step's source that is a user tensor itself (p0, p1, ...)
_USER_TENSOR = re.compile(r"p\d+")


class _Steps:
    """The launches of one prepared call, as code: user tensors come in as p0, p1, ...; each step
    names, per plan tensor, either a user tensor index or a fixed address."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.scope: dict[str, Any] = {}
        #: the same launches with p0, p1, ... the tensor objects themselves, whose addresses the
        #: compiled hop reads (:func:`tensor_reader`); None where a step is not a compiled hop or computes
        #: an address from a tensor's
        self.tensor_lines: list[str] | None = [] if HOP is not None else None

    def bound(self, call: BoundCall, sources: dict[str, int | str], words: Sequence[str] = ()) -> None:
        """A plan call; ``words``: the expression of each of its per-call words (in the order
        it was bound with), over the call's per-call values (:data:`PER_CALL`)."""
        i = len(self.scope)
        self.scope.update({f"_b{i}": call, f"_l{i}": call._local})
        self.scope[f"_p{i}"] = call.plan  # its launch counter (Runtime.stats())
        exprs = [str(sources[n]) for n in call.tensor_names]
        exprs += [f"({w}) | {high}" if high else w for w, high in zip(words, call.word_highs)]
        ptrs = ", ".join(exprs)
        head = [f"    s_ = _l{i}.__dict__.get('s')", f"    if s_ is None: s_ = _b{i}.scratch()"]
        tail = ["    if rc: _check(rc, s_.state)", f"    _p{i}.launches += 1"]
        if call.hop is not None:  # one C call writes the words and launches
            self.scope.update({f"_h{i}": call.hop, f"_a{i}": call.run_addr})
            self.lines += [*head, f"    rc = _h{i}(_a{i}, s_.addr, {ptrs}, st)", *tail]
        else:
            self.scope.update({f"_pk{i}": call.pack_into, f"_r{i}": call.run})
            self.lines += [
                *head,
                f"    _pk{i}(s_.block, {CALL_PTRS_OFFSET}, {ptrs}, st)",
                f"    rc = _r{i}(s_.addr)",
                *tail,
            ]
        # (as objects only where every tensor word is a user tensor itself or a fixed address: an
        # expression over one, a sub-buffer of a scratch tensor, is an address computation)
        plain = all(isinstance(sources[n], int) or _USER_TENSOR.fullmatch(str(sources[n])) for n in call.tensor_names)
        if call.hop is not None and self.tensor_lines is not None and plain:
            self.scope[f"_ht{i}"] = HOP.launch_tensors
            self.tensor_lines += [*head, f"    rc = _ht{i}(_a{i}, s_.addr, {ptrs}, st)", *tail]
        else:
            self.tensor_lines = None

    def python(self, fn: Callable[..., None], args: str) -> None:
        i = len(self.scope)
        self.scope[f"_f{i}"] = fn
        self.lines.append(f"    _f{i}({args})")
        self.tensor_lines = None  # (it takes addresses)


class Prepared:
    """A prepared call: ``prepared(*tensors, stream=None)`` with tensors in :attr:`arg_names`
    order, shaped like the ones it was prepared with. ``close()`` frees the buffers it owns
    (after the work that uses them has finished)."""

    def __init__(
        self,
        rt: Runtime,
        names: Sequence[str],
        tensors: Sequence[DeviceTensor],
        aligns: Sequence[int],
        torch_keys: TorchKeys | None,
        steps: _Steps,
        owned: list[Any],
        per_call: dict[str, int] | None = None,
    ):
        self.runtime = rt
        self.arg_names = tuple(names)
        self._tensors = list(tensors)
        self._aligns = list(aligns)
        #: the variants this call launches, in order
        self.variants: tuple[Any, ...] = ()
        self._owned = owned
        self._lock = threading.Lock()
        #: the per-call values' bound defaults (``prepare_forward(varying=True)``), else None
        self.per_call = per_call
        run = self._generate(names, tensors, aligns, torch_keys, steps)
        #: ``launch_ptrs(*addresses, stream=0)``: the call with device addresses in :attr:`arg_names`
        #: order and a stream handle, *unchecked* - for engines that validate their buffers themselves
        #: (a wrong address or shape is undefined behaviour, as in a raw kernel launch)
        self.launch_ptrs: Callable[..., None] = self._generate_unchecked(len(names), steps)
        #: ``launch_ptrs`` taking the tensors themselves, their addresses read by the compiled hop
        #: (None without it, or where a step is Python): only for tensors torch's check passed -
        #: the fast path's served calls (its reader cannot report a tensor without storage)
        self.launch_tensors: Callable[..., None] | None = (
            self._generate_unchecked(len(names), steps, tensors=True) if steps.tensor_lines is not None else None
        )
        # Calls go straight to the generated function: a class of its own per prepared call
        # (Python looks __call__ up on the type), no forwarding frame.
        self.__class__ = type("Prepared", (Prepared,), {"__call__": staticmethod(run), "__slots__": ()})

    def __call__(self, *tensors: Any, stream: Any = None) -> None:
        """``prepared(*tensors, stream=None)`` (replaced per instance by the generated function)."""
        raise NotImplementedError

    def _generate(
        self,
        names: Sequence[str],
        tensors: Sequence[DeviceTensor],
        aligns: Sequence[int],
        torch_keys: TorchKeys | None,
        steps: _Steps,
    ) -> Callable[..., None]:
        n = len(names)
        args = [f"a{i}" for i in range(n)]
        scope: dict[str, Any] = dict(steps.scope)
        scope.update(
            _desc=as_device_tensor,
            _bad=self._mismatch,
            _misaligned=self._misaligned,
            _check=Plan._check,
            _stream=stream_handle,
            _default=default_stream,
        )
        lines = [f"def run({', '.join(args)}, stream=None):"]
        generic = []
        for i in range(n):
            t = tensors[i]
            scope[f"_g{i}"] = (t[1], t[2], t[3], t[4], t[5])
            generic += [
                f"        d = _desc(a{i}, {names[i]!r})",
                f"        if (d[1], d[2], d[3], d[4], d[5]) != _g{i}: _bad({i}, a{i})",
                f"        p{i} = d[0]",
            ]
        cur = _torch_current_stream(torch_keys)
        stream_line = (
            "    st = _cur(_dev) if stream is None else _stream(stream)"  # torch's current stream, read directly
            if cur is not None
            else "    st = _default(a0) if stream is None else _stream(stream)"
        )
        if cur is not None:
            scope["_cur"], scope["_dev"] = cur, torch_keys.metas[0][3]
        per_call = (
            [f"    {', '.join(self.per_call)} = {', '.join(map(repr, self.per_call.values()))}"]
            if self.per_call
            else []
        )
        lines += _tensor_path(args, aligns, torch_keys, steps, scope, [stream_line, *per_call])
        if torch_keys is not None:
            scope["_T"] = torch_keys.cls
            cond = " and ".join(f"a{i}.__class__ is _T" for i in range(n))
            if torch_keys.guard is not None:  # torch's own check of every tensor, in one C call
                lines.append(f"    if {torch_keys.guard.expression(args, scope, '_G')}:")
                alias = dict(torch_keys.guard.aliases)  # (the same object: its address read once)
                lines += [f"        p{i} = p{alias[i]}" if i in alias else f"        p{i} = a{i}.data_ptr()"
                          for i in range(n)]  # fmt: skip
                lines.append(f"    elif {cond}:")
            else:
                lines.append(f"    if {cond}:")
            for i in range(n):
                lines += [f"        if {torch_mismatch(f'a{i}', torch_keys.metas[i], f'_t{i}', scope)}: _bad({i}, a{i})",
                          f"        p{i} = a{i}.data_ptr()"]  # fmt: skip
            lines.append("    else:")
            lines += generic
        else:
            lines.append("    if True:")
            lines += generic
        ptrs = [f"p{i}" for i in range(n)]
        cond = misaligned_test(ptrs, [a - 1 for a in aligns])
        lines += [f"    if {cond}: _misaligned(({', '.join(ptrs)},))"] if cond else []
        lines += [stream_line, *per_call, *steps.lines]
        gencode.run("\n".join(lines), scope, "prepared call")
        return scope["run"]

    def _generate_unchecked(self, n: int, steps: _Steps, tensors: bool = False) -> Callable[..., None]:
        """The launches of :meth:`_generate` on addresses as given (no description, no check);
        ``tensors``: on tensors whose addresses the compiled hop reads (``steps.tensor_lines``)."""
        scope: dict[str, Any] = dict(steps.scope, _check=Plan._check, _struct_error=struct.error, _bad_word=_bad_word)
        args = ", ".join(
            [f"p{i}" for i in range(n)] + ["stream=0"] + [f"{k}={v!r}" for k, v in (self.per_call or {}).items()]
        )
        body = steps.tensor_lines if tensors else steps.lines
        lines = [f"def launch_ptrs({args}):", "    st = stream", "    try:", *("    " + x for x in body)]
        lines += ["    except _struct_error as e:", "        raise _bad_word(e) from None"]
        gencode.run("\n".join(lines), scope, "prepared call (unchecked)")
        return scope["launch_ptrs"]

    def _mismatch(self, i: int, obj: Any) -> None:
        name = self.arg_names[i]
        refuse_unlike(name, as_device_tensor(obj, name), self._tensors[i])
        raise ArgumentError(f"{name}: does not match the prepared call")

    def _misaligned(self, ptrs: tuple[int, ...]) -> None:
        for name, p, need in zip(self.arg_names, ptrs, self._aligns):
            if p % need:
                raise ArgumentError(f"{name}: base address 0x{p:x} is not {need}-byte aligned")
        raise ArgumentError("a tensor address is misaligned")

    def close(self) -> None:
        """Free the buffers this call owns."""
        with self._lock:
            for item in self._owned:
                if isinstance(item, SchedulerMetadata):
                    item.close()
                else:
                    self.runtime.driver.free(item)
            self._owned = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def refuse_unlike(name: str, got: DeviceTensor, want: DeviceTensor, free_length: bool = False) -> None:
    """Raise :class:`ArgumentError` naming the first of shape, strides, dtype, device and kind in
    which tensor ``got`` differs from the prepared call's ``want`` (``free_length``: a 1-D
    tensor's length may differ)."""
    shape = tuple(got[1])
    if free_length and len(shape) == len(want[1]) == 1:
        shape = tuple(want[1])
    for what, a, b in (
        ("shape", shape, tuple(want[1])),
        ("strides", tuple(got[2]), tuple(want[2])),
        ("dtype", got[3], want[3]),
        ("device", got[4], want[4]),
        ("kind", got[5], want[5]),
    ):
        if a != b:
            raise ArgumentError(f"{name}: {what} {a} differs from the prepared call's {b}; prepare another call")


def misaligned_test(ptrs: Sequence[str], masks: Sequence[int]) -> str:
    """Generated code, true when an address of ``ptrs`` (expressions) has a bit of its mask
    (alignment - 1) set: one test per distinct mask; "" where no mask is set."""
    by_mask: dict[int, list[str]] = {}
    for p, m in zip(ptrs, masks):
        if m:
            by_mask.setdefault(m, []).append(p)
    return " or ".join(f"({' | '.join(ps)}) & {m}" for m, ps in sorted(by_mask.items()))


def _tensor_path(
    args: Sequence[str],
    aligns: Sequence[int],
    torch_keys: TorchKeys | None,
    steps: _Steps,
    scope: dict[str, Any],
    prologue: Sequence[str],
) -> list[str]:
    """The generated branch that launches torch tensors which passed torch's check with the
    compiled hop reading their addresses itself (one C call per launch, 0.1 us a tensor less on
    the CI box than ``data_ptr()`` in Python), returning; none where the hop, torch's check or its
    address reader is missing, a step is not a compiled hop, or an alignment needs more than a byte
    of mask."""
    if torch_keys is None or torch_keys.guard is None or steps.tensor_lines is None or max(aligns) > 256:
        return []
    if not tensor_reader(torch_keys.cls):
        return []
    g = torch_keys.guard
    scope["_A"], scope["_m"] = HOP.aligned, bytes(aligns[i] - 1 for i in g.unique)
    alias = dict(g.aliases)
    unique = ", ".join(args[i] for i in g.unique)
    ptrs = ", ".join(f"{a}.data_ptr()" for a in args)
    lines = [
        f"    if {g.expression(args, scope, '_G')}:",
        f"        if not _A(_m, {unique}): _misaligned(({ptrs},))",
        *("    " + x for x in prologue),
        *(f"        p{i} = {args[alias.get(i, i)]}" for i in range(len(args))),
        *("    " + x for x in steps.tensor_lines),
        "        return",
    ]
    return lines


def tensor_reader(cls: type) -> bool:
    """Whether the compiled hop reads the addresses of tensors of class ``cls``: exactly
    torch.Tensor, with torch's reader (``_torchinductor_pyobject_tensor_data_ptr``, what Inductor's
    generated C++ calls; registered with the hop once)."""
    torch = sys.modules.get("torch")
    if HOP is None or torch is None or cls is not torch.Tensor:
        return False
    addr = getattr(
        getattr(getattr(torch._C, "_dynamo", None), "guards", None), "_torchinductor_pyobject_tensor_data_ptr", None
    )
    if not isinstance(addr, int) or not addr:
        return False
    if _READER[0] != addr:
        HOP.tensor_reader(addr, cls)
        _READER[0] = addr
    return True


#: the address reader registered with the compiled hop (0: none yet)
_READER = [0]


def _bad_word(e: Exception) -> ArgumentError:
    """What ``launch_ptrs`` raises for an address, word or stream that is no 64-bit unsigned int
    (the compiled hop raises the same class itself)."""
    return ArgumentError(f"a tensor address, per-call word or stream is not a 64-bit unsigned int: {e}")


def _torch_current_stream(torch_keys: TorchKeys | None) -> Callable[[int], int] | None:
    """torch's fast current-stream accessor when the bound tensors are torch's (else None)."""
    if torch_keys is None:
        return None
    return getattr(sys.modules["torch"]._C, "_cuda_getCurrentRawStream", None)


def torch_contiguous(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether torch calls a tensor of this shape and these strides contiguous: every dimension
    of extent above 1 strided as in a row-major array (an extent-1 dimension's stride is never
    multiplied by a non-zero index, so it does not change which addresses the kernel reads)."""
    want = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size > 1 and stride != want:
            return False
        want *= size
    return True


def torch_mismatch(obj: str, meta: tuple[Any, Any, Any, Any], name: str, scope: dict[str, Any]) -> str:
    """The expression (generated code) that is true when torch tensor ``obj`` differs from the
    bound (shape, strides, dtype, device) ``meta``; the constants go into ``scope`` under
    ``name``. One accessor per property, cheapest test first: dtypes are singletons (``is``),
    and a tensor bound contiguous is checked with ``is_contiguous()`` (one call, no tuple) - a
    tensor of the same shape that torch calls contiguous reads the same addresses."""
    shape, strides, dtype, device = meta
    scope[f"{name}s"], scope[f"{name}d"], scope[f"{name}t"] = shape, dtype, strides
    stride_test = f"not {obj}.is_contiguous()" if torch_contiguous(shape, strides) else f"{obj}.stride() != {name}t"
    test = f"{obj}.dtype is not {name}d or {obj}.shape != {name}s or {stride_test} or {obj}.get_device() != {device!r}"
    strided = getattr(sys.modules.get("torch"), "strided", None)
    if strided is None:
        return test
    scope["_strided"] = strided  # (a sparse tensor of the same shape has no address: its full path's error)
    return f"{obj}.layout is not _strided or {test}"


class TorchGuard(NamedTuple):
    """torch's C++ check of tensors against the ones it was built from (:func:`torch_guard`):
    ``check(*tensors)`` over the arguments at ``unique`` (the others alias an earlier one,
    ``aliases``: (position, position of the same object))."""

    check: Callable[..., bool]
    unique: tuple[int, ...]
    aliases: tuple[tuple[int, int], ...]

    def expression(self, names: Sequence[str], scope: dict[str, Any], const: str) -> str:
        """Generated code over the variables ``names`` (one per argument), true when they pass:
        the same arguments aliased, and torch's check of the others."""
        scope[const] = self.check
        same = [f"{names[i]} is {names[j]}" for i, j in self.aliases]
        return " and ".join([*same, f"{const}({', '.join(names[i] for i in self.unique)})"])


def torch_guard(objs: Sequence[Any], sizes: Sequence[Sequence[int | None]]) -> TorchGuard | None:
    """torch's own check (``torch._C._dynamo.guards.TensorGuards``, the C++ check behind
    torch.compile's guards) of tensors like ``objs``: each exactly of its class, dtype, device
    and dispatch keys, requires_grad, ``sizes`` (None: any extent) and strides - stricter than
    :func:`torch_mismatch` and one C call for all of them (0.43 us for four tensors on the CI
    box against 1.06 through their accessors). It refuses a tensor passed twice, so an argument
    that is the same object as an earlier one in ``objs`` is checked by identity instead. None
    where this torch has no such check or it does not pass ``objs`` themselves."""
    guards = getattr(getattr(getattr(sys.modules.get("torch"), "_C", None), "_dynamo", None), "guards", None)
    cls = getattr(guards, "TensorGuards", None)
    if cls is None:
        return None
    first: dict[int, int] = {}
    unique, aliases = [], []
    for i, o in enumerate(objs):
        j = first.setdefault(id(o), i)
        if j == i:
            unique.append(i)
        else:
            aliases.append((i, j))
    mine = [objs[i] for i in unique]
    try:
        g = cls(*mine, dynamic_dims_sizes=[list(sizes[i]) for i in unique],
                dynamic_dims_strides=[list(o.stride()) for o in mine])  # fmt: skip
        if g.check(*mine) is not True:
            return None
    except Exception:  # noqa: BLE001 - another torch's signature: the accessors check instead
        return None
    return TorchGuard(g.check, tuple(unique), tuple(aliases))


class TorchKeys(NamedTuple):
    """Bound PyTorch tensors: their class, each one's (shape, strides, dtype object, device),
    and torch's check of all of them (None where torch has none)."""

    cls: type
    metas: tuple[tuple[Any, Any, Any, Any], ...]
    guard: TorchGuard | None


def _torch_keys(objs: Sequence[Any], descs: Sequence[DeviceTensor]) -> TorchKeys | None:
    """The bound tensors' :class:`TorchKeys` when every one is a plain torch.Tensor; else None."""
    cls = objs[0].__class__
    if framework(objs[0]) != "torch" or any(o.__class__ is not cls for o in objs):
        return None
    metas = tuple((o.shape, o.stride(), o.dtype, o.get_device()) for o in objs)
    return TorchKeys(cls, metas, torch_guard(objs, [m[0] for m in metas]))


def _owned_tensor(ptr: int, shape: tuple[int, ...], dev: int) -> DeviceTensor:
    return DeviceTensor(ptr, shape, contiguous_strides(shape), "fp32", dev, "raw")


_NOTHING_TO_PREPARE = (
    "prepare_forward: the call has no keys or no queries (an empty q, k or page pool); prepare it with the buffers "
    "it will run on, or call flash_attn_func, which returns FA4's result"
)


def prepare_forward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    *,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    seqused_q: Any = None,
    seqused_k: Any = None,
    page_table: Any = None,
    learnable_sink: Any = None,
    softcap: float = 0.0,
    lse: Any = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int | None, int | None] = (None, None),
    num_splits: int = 1,
    pack_gqa: bool | None = None,
    scheduler_metadata: SchedulerMetadata | None = None,
    scales: Any = None,
    runtime: Runtime | None = None,
    own: bool = True,
    varying: bool = False,
) -> Prepared | VaryingForward:
    """Prepare FA4's forward for tensors shaped like these (arguments as in
    :func:`fa4aot.flash_attn_varlen_func`; ``lse`` given means return_lse). The prepared call
    takes ``(q, k, v, out[, lse][, cu_seqlens_q][, cu_seqlens_k][, seqused_q][, seqused_k]
    [, page_table][, learnable_sink])`` (those given here, in this order: ``arg_names``) and
    ``stream=``. It owns split-KV partials and, for split-KV varlen without ``scheduler_metadata``
    (recompute that per batch; the call zeroes its semaphore), metadata recomputed per call.
    ``scales`` are bound (write new values into the same tensors). ``varying=True``: a
    :class:`~fa4aot.runtime.varying.VaryingForward`, called with sequence tensors of any batch
    and ``max_seqlen_q=`` / ``max_seqlen_k=`` per call. ``own=False`` (the fast path's forms):
    raise :class:`NeedsBuffers` instead of allocating, take FA4's tensor-map workspace as a last
    argument, and with ``varying`` the batch, max_seqlens and workspace slots as per-call values
    of one decision (:data:`PER_CALL`, keywords of ``launch_ptrs``).
    """
    arguments = dict(locals())  # (for the varying form)
    if varying and own and (lse is not None or scales is not None or scheduler_metadata is not None):
        raise ArgumentError("prepare_forward: varying=True takes no lse, scales or scheduler_metadata")
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    fc = analyse(
        rt, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q, seqused_k, softmax_scale, causal,
        window_size, num_splits, pack_gqa, lse is not None, metadata_kind(scheduler_metadata), page_table, learnable_sink,
        softcap, scales=scales,
    )  # fmt: skip
    if fc.lv is None:
        raise ArgumentError(_NOTHING_TO_PREPARE)
    if not own:
        _refuse_owned(fc, scheduler_metadata)
    out_shape, od = _checked_out(rt, fc, out)
    if varying and own:
        from fa4aot.runtime import varying  # (it builds on the fast path, which imports this module)

        return varying.VaryingForward.bind(fc, od, arguments)
    given = {n: arguments[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "page_table",
                                       "learnable_sink")}  # fmt: skip
    names, objs, descs, aligns, ld = _call_tensors(rt, fc, (q, k, v, out), od, lse, given)
    ws_slots = 0 if own else _workspace_argument(rt, fc, q, names, objs, descs, aligns)
    src = {n: f"p{i}" for i, n in enumerate(names)}
    src_fwd: dict[str, Any] = dict(src)
    owned: list[Any] = []
    steps = _Steps()
    fwd_args: dict[str, Any] = dict(zip(names, descs))
    for name, d in zip(SCALE_NAMES, fc.scales):
        if d is not None:  # bound: the same tensors on every call
            fwd_args[name] = d
            src_fwd[name] = d[0]
    variants = [fc.lv.variant]
    try:
        plan = fc.plan
        md = _bind_scheduler(rt, fc, scheduler_metadata, names, src, steps, owned, fwd_args, src_fwd)
        if fc.split:
            op, lp, comb_lv, comb_named = _bind_split(rt, fc, out_shape, od, ld, md, owned, fwd_args, src_fwd)
        _bind_forward(fc, fwd_args, src_fwd, steps, varying)
        if fc.split:
            nsd_ptr = md.buffers[0].ptr if (md is not None and plan.num_splits_dynamic) else None
            src_comb = {"out_partial": op.ptr, "lse_partial": lp.ptr, "out": src["out"], "lse": src.get("lse"),
                        "cu_seqlens": src.get("cu_seqlens_q"), "seqused": src.get("seqused_q"),
                        "num_splits_dynamic": nsd_ptr}  # fmt: skip
            steps.bound(comb_lv.plan.bind(dict(comb_named, stream=0)), src_comb)
            variants.append(comb_lv.variant)
        if scheduler_metadata is not None and md is scheduler_metadata and plan.tile_count_semaphore:
            sem_ptr = md.tile_count_semaphore.ptr
            memset = rt.driver.memset_d32
            steps.python(lambda st: memset(sem_ptr, 0, 1, st), "st")  # zero the semaphore for the next use
    except BaseException:
        for item in owned:
            item.close() if isinstance(item, SchedulerMetadata) else rt.driver.free(item)
        raise
    defaults = dict(zip(PER_CALL, (fc.batch, fc.max_q, fc.max_k, ws_slots))) if varying else None
    prepared = Prepared(rt, names, descs, aligns, _torch_keys(objs, descs), steps, owned, defaults)
    prepared.variants = tuple(variants)
    prepared.workspace_slots = ws_slots
    prepared.fc = fc if varying else None  # what it decided on, for the fast path's checks
    return prepared


def _bind_forward(fc: Any, fwd_args: dict[str, Any], src_fwd: dict[str, Any], steps: _Steps, varying: bool) -> None:
    """The forward kernel's step: its host scalars bound, and with ``varying`` the batch,
    max_seqlens and workspace slots as per-call words (:data:`PER_CALL_WORDS`)."""
    fwd_args.update(softmax_scale=fc.scale, stream=0)
    if fc.wl is not None:
        fwd_args.update(window_size_left=fc.wl, window_size_right=fc.wr)
    takes = {a.name for a in fc.lv.plan.signature}
    if "max_seqlen_q" in takes:
        fwd_args["max_seqlen_q"] = fc.max_q
    per_call = [w for w in PER_CALL_WORDS if w[0] in takes] if varying else []
    steps.bound(fc.lv.plan.bind(fwd_args, [w[:2] for w in per_call]), src_fwd, [w[2] for w in per_call])


def _checked_out(rt: Runtime, fc: Any, out: Any) -> tuple[tuple[int, ...], DeviceTensor]:
    """(the output's shape, ``out`` described and checked against it)."""
    out_shape = (*fc.rows, fc.nheads, fc.head_dim_v)
    od = as_device_tensor(out, "out")
    if od[3] != fc.out_dtype:
        raise ArgumentError(f"out: dtype must be {fc.out_dtype} (q's; bf16 for FP8 inputs), got {od[3]}")
    validate.io(od, "out", len(out_shape), rt.device, rt, writable=True)
    validate.shape(od, "out", out_shape, "q's shape with head_dim_v")
    return out_shape, od


def _refuse_owned(fc: Any, scheduler_metadata: SchedulerMetadata | None) -> None:
    """:class:`NeedsBuffers` for a call whose prepared form would own device buffers (split-KV
    partials, its own scheduler metadata, the dynamic route's semaphore): raised before anything
    is allocated."""
    if fc.split or (scheduler_metadata is None and fc.plan.prepare) or fc.plan.dynamic_route:
        raise NeedsBuffers("the call needs buffers of its own")


def _workspace_argument(
    rt: Runtime, fc: Any, q: Any, names: list[str], objs: list[Any], descs: list[Any], aligns: list[int]
) -> int:
    """FA4's tensor-map workspace as the prepared call's last argument (each call passes its own: a
    buffer of ``q``'s framework, or the stream's for raw pointers, as on the full path); its slots,
    or 0 where the call takes none."""
    if not fc.plan.tensormap_workspace:
        return 0
    slots = workspace_slots(rt, fc)
    try:
        ws = alloc_like(q, (slots, TENSORMAP_WORDS), "int64")
        desc = as_device_tensor(ws, "tensormap_workspace")
    except ArgumentError:  # raw pointers: the runtime's buffer of the legacy stream stands in (only its
        # layout is bound; each call passes its own stream's, as the full path gives such callers)
        ptr, _ = stream_workspace(rt, 0, slots)
        ws = desc = DeviceTensor(ptr, (slots, TENSORMAP_WORDS), (TENSORMAP_WORDS, 1), "int64", rt.device, "raw")
    names.append("tensormap_workspace")
    objs.append(ws)
    descs.append(desc)
    aligns.append(16)
    return slots


def _call_tensors(
    rt: Runtime, fc: Any, qkvo: tuple[Any, ...], od: DeviceTensor, lse: Any, given: dict[str, Any]
) -> tuple[list[str], list[Any], list[DeviceTensor], list[int], DeviceTensor | None]:
    """(names, objects, descriptors, alignments, lse's descriptor) of the tensors each prepared
    call takes, in their order: q, k, v, out, then lse and the optional ones given at bind time."""
    dev = rt.device
    names, objs, descs, aligns = ["q", "k", "v", "out"], list(qkvo), [fc.q, fc.k, fc.v, od], [16, 16, 16, 16]
    ld = None
    if lse is not None:
        ld = validate.tensor(
            lse, "lse", dtypes=("fp32",), rank=len(fc.lse_shape), device=dev, rt=rt, align=4, writable=True
        )
        validate.shape(ld, "lse", fc.lse_shape, "FA4's (batch, nheads, seqlen_q) or (nheads, total_q)")
        names.append("lse"), objs.append(lse), descs.append(ld), aligns.append(4)
    bound = dict(cu_seqlens_q=fc.cu_q, cu_seqlens_k=fc.cu_k, seqused_q=fc.su_q, seqused_k=fc.su_k,
                 page_table=fc.page_table, learnable_sink=fc.learnable_sink)  # fmt: skip
    for name, obj in given.items():
        if obj is not None:
            names.append(name), objs.append(obj), descs.append(bound[name]), aligns.append(4)
    return names, objs, descs, aligns, ld


def _bind_scheduler(
    rt: Runtime,
    fc: Any,
    scheduler_metadata: SchedulerMetadata | None,
    names: list[str],
    src: dict[str, str],
    steps: _Steps,
    owned: list[Any],
    fwd_args: dict[str, Any],
    src_fwd: dict[str, Any],
) -> SchedulerMetadata | None:
    """The scheduler-side arguments a prepared forward binds: the caller's metadata, or its own
    recomputed before each call (FA4's prepare kernel); a zeroed semaphore for FA4's dynamic
    varlen route; the tensor-map workspace. Returns the metadata in use (None: none)."""
    dev = rt.device
    md = None
    plan, c = fc.plan, fc.config
    if scheduler_metadata is not None or plan.prepare:
        if scheduler_metadata is not None:
            md = scheduler_metadata
        else:
            f = fc.lv.fields
            md = SchedulerMetadata(
                fc.batch,
                fc.nheads,
                fc.nheads // f["qhead_per_kvhead"],
                f["head_dim"],
                f["head_dim_v"],
                causal=plan.num_nheads_in_l2,
                pack_gqa=c.pack_gqa,
                tile_m=c.tile_m,
                tile_n=c.tile_n,
                semaphore=plan.prepare_semaphore,
                options=forward_prepare_options(rt.selector, c, f["head_dim"]),
                runtime=rt,
            )
            owned.append(md)
            steps.python(_metadata_step(md, fc, names), ", ".join(["st"] + [src[n] for n in names]))
            md.num_splits = fc.num_splits  # compute() sets it on every call; check_metadata wants it
        check_metadata(md, fc)
        nsd, sem, l2 = md.buffers
        for name, buf, on in (
            ("num_splits_dynamic", nsd, plan.num_splits_dynamic),
            ("tile_count_semaphore", sem, plan.tile_count_semaphore),
            ("num_nheads_in_l2", l2, plan.num_nheads_in_l2),
        ):
            if on:
                fwd_args[name] = buf
                src_fwd[name] = buf.ptr
    elif plan.dynamic_route:
        # FA4 allocates a zeroed semaphore per call; the kernel resets it at exit, so one zeroed
        # at bind time serves every call
        sem_ptr = rt.driver.alloc(4)
        owned.append(sem_ptr)
        rt.driver.memset_d32(sem_ptr, 0, 1, 0)
        rt.driver.synchronize(0)
        fwd_args["tile_count_semaphore"] = DeviceTensor(sem_ptr, (1,), (1,), "int32", dev, "raw")
        src_fwd["tile_count_semaphore"] = sem_ptr
    if plan.tensormap_workspace and "tensormap_workspace" not in fwd_args:  # (else a call argument)
        slots = workspace_slots(rt, fc)
        ws_ptr = rt.driver.alloc(slots * WORKSPACE_SLOT_BYTES)
        owned.append(ws_ptr)
        ws = DeviceTensor(ws_ptr, (slots, TENSORMAP_WORDS), (TENSORMAP_WORDS, 1), "int64", dev, "raw")
        fwd_args["tensormap_workspace"] = ws
        src_fwd["tensormap_workspace"] = ws_ptr
    return md


def _bind_split(
    rt: Runtime,
    fc: Any,
    out_shape: tuple[int, ...],
    od: DeviceTensor,
    ld: DeviceTensor | None,
    md: SchedulerMetadata | None,
    owned: list[Any],
    fwd_args: dict[str, Any],
    src_fwd: dict[str, Any],
) -> tuple[DeviceTensor, DeviceTensor, Any, dict[str, Any]]:
    """A split-KV prepared forward's fp32 partials (owned, allocated now) and its combine."""
    dev, plan = rt.device, fc.plan
    op_shape = (fc.num_splits, *out_shape)
    lp_shape = (fc.num_splits, *fc.lse_shape)
    op_bytes = 4 * _numel(op_shape) + (-4 * _numel(op_shape) % OWNED_ALIGN)
    base = rt.driver.alloc(op_bytes + 4 * _numel(lp_shape))
    owned.append(base)
    op = _owned_tensor(base, op_shape, dev)
    lp = _owned_tensor(base + op_bytes, lp_shape, dev)
    fwd_args["out"], fwd_args["lse"] = op, lp
    src_fwd.update(out=op.ptr, lse=lp.ptr)
    comb_lv, comb_named, _ = combine_mod.analyse(
        rt,
        op,
        transposed(lp),
        od,
        transposed(ld) if ld is not None else None,
        fc.cu_q,
        fc.su_q if fc.cu_q is not None else None,
        md.buffers[0] if (md is not None and plan.num_splits_dynamic) else None,
    )
    return op, lp, comb_lv, comb_named


def _metadata_step(md: SchedulerMetadata, fc: Any, names: Sequence[str]) -> Callable[..., None]:
    """Recompute the prepared call's own scheduler metadata from this call's sequence tensors."""
    shapes = {"cu_seqlens_q": fc.cu_q, "cu_seqlens_k": fc.cu_k, "seqused_q": fc.su_q, "seqused_k": fc.su_k}
    dev = fc.rt.device

    def run(st: int, *ptrs: int) -> None:
        got = dict(zip(names, ptrs))
        kw = {n: DeviceTensor(got[n], d[1], d[2], "int32", dev, "raw") for n, d in shapes.items() if d is not None}
        md.compute(max_seqlen_q=fc.max_q, max_seqlen_k=fc.max_k, num_splits=fc.num_splits, stream=st, **kw)

    return run


def prepare_combine(
    out_partial: Any,
    lse_partial: Any,
    out: Any,
    lse: Any = None,
    cu_seqlens: Any = None,
    seqused: Any = None,
    num_splits_dynamic: Any = None,
    *,
    runtime: Runtime | None = None,
) -> Prepared:
    """Prepare FA4's split-KV combine for tensors shaped like these (layouts as in
    :func:`fa4aot.combine`). The prepared call takes the tensors given here, in this order
    (see ``arg_names``), and ``stream=``."""
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    lv, named, aligns = combine_mod.analyse(
        rt, out_partial, lse_partial, out, lse, cu_seqlens, seqused, num_splits_dynamic
    )
    given = {
        "out_partial": out_partial,
        "lse_partial": lse_partial,
        "out": out,
        "lse": lse,
        "cu_seqlens": cu_seqlens,
        "seqused": seqused,
        "num_splits_dynamic": num_splits_dynamic,
    }
    names = [n for n, obj in given.items() if obj is not None]
    objs = [given[n] for n in names]
    descs = [named[n] for n in names]
    steps = _Steps()
    steps.bound(lv.plan.bind(dict(named, stream=0)), {n: f"p{i}" for i, n in enumerate(names)})
    prepared = Prepared(rt, names, descs, [aligns[n] for n in names], _torch_keys(objs, descs), steps, [])
    prepared.variants = (lv.variant,)
    return prepared


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
