"""Plain calls at a prepared call's cost: PyTorch calls that repeat (same shapes, strides,
dtypes, devices and scalar arguments) are served by a :class:`~fa4aot.Prepared` made for them,
launched unchecked on the new addresses - the forward with ``out`` given and no LSE
(:func:`forward`, :func:`dense`), and the backward with its gradients allocated as the full path
allocates them (:func:`backward`).

The key holds every input the full path decides with: each tensor's (shape, strides, dtype,
device) and each scalar argument with its class (``True`` is not ``1`` to the argument checks).
Equal keys mean the full path would validate, dispatch and pack the same way, so only the
addresses (alignment checked here) and the stream change. Two inputs of :func:`forward` are left
out: the batch (the length of cu_seqlens / seqused) and max_seqlen_q/k, which a serving engine
changes on every call. For those it takes FA4's decision from the rule's memo or a traced region
(:mod:`fa4aot.runtime.regions`), launches the prepared form made for that decision with the
values as per-call words, and leaves a decision not yet made to the full path. A key is prepared
on its second sighting (one-off shapes stay on the full path). The next call is first offered to
the entry of the key served last: code generated from that key compares each argument with it,
attribute by attribute, and launches in the same frame (:func:`_conditions`); only a call of
another key builds its key. A forward whose prepared form
would own buffers (split-KV partials, scheduler metadata, the route semaphore) is not served
here: a plain call allocates those per call and concurrent calls must not share them. FA4's
tensor-map workspace is a buffer per launch stream kept by the runtime (:mod:`.workspaces`),
and a new one from torch's allocator per call while the stream is being captured into a CUDA
graph; the backward's scratch is a new buffer per call, as on the full path. Anything unusual -
other tensor classes, a misaligned address, an unhashable argument, sequence tensors whose
lengths disagree - takes the full path, which raises the typed error. Threads may share an
entry: a prepared call packs into a block per thread.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from fa4aot.core import gencode
from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.fa4_interface import TENSORMAP_WORDS, tensormap_workspace_terms
from fa4aot.plan.library import HOP
from fa4aot.runtime import backward as bwd
from fa4aot.runtime import loader
from fa4aot.runtime.dispatch import region_key
from fa4aot.runtime.prepared import (
    NeedsBuffers,
    misaligned_test,
    prepare_forward,
    tensor_reader,
    torch_guard,
    torch_mismatch,
)
from fa4aot.runtime.validate import INT32_MAX
from fa4aot.runtime.workspaces import stream_workspace, stream_workspaces

#: Prepared plain calls per runtime (a model's layers repeat a handful of signatures).
MAX_FAST_CALLS = 64
#: Keys remembered for their first sighting.
MAX_SIGHTED = 256
#: Decisions (FA4's, for the batches and max_seqlens a forward key sees) prepared per key.
MAX_DECISIONS = 8
#: Sightings after which a key is prepared (the first call of a shape runs the full path only).
SIGHTINGS_TO_PREPARE = 2
#: A window of this many calls none of which was served pauses the fast path for SKIP calls.
WINDOW = 256
SKIP = 1024

#: a key whose prepared form is not served here (it owns buffers, or preparing it failed)
_NOT_SERVED = False


class _Entry:
    """A prepared form the fast path launches (``launch``: its ``launch_ptrs``); ``serve``
    (:func:`_serve_dense`, :func:`_serve_backward`) answers the calls of its key."""

    __slots__ = ("launch", "launch_tensors", "masks", "scratch_bytes", "ws_slots", "names", "serve", "rt")

    def __init__(self, prepared: Any):
        self.rt = prepared.runtime
        self.launch = prepared.launch_ptrs  # it holds the bound call blocks it writes
        #: its launches of tensors that passed torch's check, or None (Prepared.launch_tensors)
        self.launch_tensors = getattr(prepared, "launch_tensors", None)
        self.masks = tuple(a - 1 for a in prepared._aligns)
        self.scratch_bytes = getattr(prepared, "scratch_bytes", 0)
        self.ws_slots = getattr(prepared, "workspace_slots", 0)
        #: the fast path's names of the tensors the prepared call takes, in its order
        self.names = tuple(PARAM_OF.get(n, n) for n in prepared.arg_names if n != "tensormap_workspace")
        self.serve: Any = None


#: prepare_forward's tensor names -> the fast path's parameters
PARAM_OF = {"cu_seqlens_q": "cu_q", "cu_seqlens_k": "cu_k", "seqused_q": "su_q", "seqused_k": "su_k",
             "learnable_sink": "sink"}  # fmt: skip


class _Calls:
    """One runtime's fast plain calls: key -> _Entry (or _NOT_SERVED), and keys seen once."""

    __slots__ = ("entries", "sighted", "hits", "tries", "window_hits", "skip", "dense", "fwd", "bwd")

    def __init__(self) -> None:
        #: per function tag (an attribute each, read by the public functions' mirrors in
        #: runtime/entry.py): the ``serve`` of the entry or _Family its last keyed call found, or
        #: None (none yet, or the fast path is paused)
        self.dense: Any = None
        self.fwd: Any = None
        self.bwd: Any = None
        self.entries: BoundedDict = BoundedDict(MAX_FAST_CALLS)
        self.sighted: BoundedDict = BoundedDict(MAX_SIGHTED)
        self.hits = 0
        self.tries = 0  # calls looked up in the current window
        self.window_hits = 0  # hits when the window started (a served call counts once, in hits)
        self.skip = 0  # calls to pass straight to the full path

    def __len__(self) -> int:  # (rt.cache_sizes())
        return len(self.entries)

    def missed(self) -> None:
        """A call not served (a new key, or one that is never served). A window of
        :data:`WINDOW` calls without one served - every call's shapes new, as in a decode loop
        whose max_seqlen_k grows - sends the next :data:`SKIP` calls straight to the full path, so
        such a workload pays the key (a few microseconds) on a fifth of its calls at most."""
        self.tries += 1
        if self.tries >= WINDOW:
            if self.hits == self.window_hits:
                self.skip = SKIP
                self.dense = self.fwd = self.bwd = None  # (each is offered the next call first)
            self.tries, self.window_hits = 0, self.hits


#: (torch.Tensor, torch's current-stream accessor by device ordinal), once torch is imported
_API: list[tuple[type, Any]] = []


def _torch_api() -> tuple[type, Any] | None:
    if not _API:
        torch = sys.modules.get("torch")
        stream = getattr(getattr(torch, "_C", None), "_cuda_getCurrentRawStream", None)
        if stream is None:
            return None
        _API.append((torch.Tensor, stream))
    return _API[0]


#: a runtime's fast calls (made on first use)
_calls = loader.api_cache("fast_calls", lambda rt: _Calls())


def calls_of(rt: Any) -> _Calls | None:
    """``rt``'s fast calls, None before its first call that looked one up (stats, tests)."""
    return rt.api_caches.get("fast_calls")


def forward(
    rt: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    cu_q: Any,
    cu_k: Any,
    max_q: Any,
    max_k: Any,
    su_q: Any,
    su_k: Any,
    page_table: Any,
    sink: Any,
    softmax_scale: Any,
    causal: Any,
    window_size: Any,
    softcap: Any,
    num_splits: Any,
    pack_gqa: Any,
) -> bool:
    """Launch this forward call (``out`` given, no LSE, no caller metadata, torch's current
    stream) from a prepared form; False: not served here, the caller runs the full path. The
    mirrors (runtime/entry.py) offer the call to ``_Calls.fwd`` first, the serve of the key
    served last; this is the path of a call it did not answer: the call's key.

    The batch (the sequence tensors' length) and max_seqlen_q/k may change from call to call:
    they are not in the key. A call whose (batch, max_seqlen_q, max_seqlen_k) differs from the
    last one's takes FA4's decision for them from the rule's memo or a traced region (never
    deciding here) and launches the prepared form made for that decision with the new values
    (:class:`_Family`)."""
    started = _start(rt)
    if started is None:
        return False
    api, calls = started
    given = (cu_q is not None, cu_k is not None, su_q is not None, su_k is not None, page_table is not None,
             sink is not None)  # fmt: skip
    args = (q, k, v, out, cu_q, cu_k, su_q, su_k, page_table, sink, max_q, max_k, softmax_scale, causal, window_size,
            softcap, num_splits, pack_gqa)  # fmt: skip
    fam = _keyed(api, calls, _FWD, given, args, lambda: _Family(prepare_from(rt, args)))
    return fam is not None and decided(rt, fam, args)


def decided(rt: Any, fam: _Family, args: tuple[Any, ...]) -> bool:
    """Launch a call of ``fam``'s key (``args``: its serve's parameters) whose (batch,
    max_seqlen_q, max_seqlen_k) take a decision that may have no prepared form yet: prepared now
    (:meth:`_Family.step`); False: not served (the full path decides it, or serves it)."""
    batch = fam.batch_of(*args[4:8])
    if batch < 0:
        return False  # the sequence tensors' lengths disagree: the full path names the mismatch
    t = (batch, args[10], args[11])
    if fam.last[0] != t:  # a decision for these values, prepared now if it has no prepared form
        last = fam.step(t, lambda: prepare_from(rt, args))
        if last is None:
            calls = calls_of(rt)
            if calls is not None:
                calls.missed()
            return False
    return fam.serve(*args) == 1


def bind_forward(rt: Any, args: tuple[Any, ...]) -> _Family | None:
    """The family of forward calls like ``args`` (its serve's parameters), prepared now, without
    waiting for sightings (:func:`~fa4aot.runtime.prepared.prepare_forward` with
    ``varying=True``). None where the fast path does not serve them: torch not imported,
    tensors that are not all torch.Tensor, an unhashable argument, a call whose prepared form
    would own buffers or that preparing refuses."""
    api = _torch_api()
    if api is None:
        return None
    calls = _calls(rt)
    found = _lookup(api, calls, _FWD, tuple(a is not None for a in args[4:10]), args)
    if found is None:
        return None
    key, got = found
    if got is None:
        got = _store(calls, key, api, args, lambda: _Family(prepare_from(rt, args)))
    return got or None


def bind_family(rt: Any, args: tuple[Any, ...]) -> _Family | None:
    """The family of forward calls like ``args`` (its serve's parameters) for tensors of any
    framework, unkeyed: the caller checks each call's tensors itself
    (:class:`~fa4aot.runtime.varying.VaryingForward`). None where the fast path would not serve
    it: a prepared form that would own buffers, or one that preparing refuses."""
    try:
        return _Family(prepare_from(rt, args))
    except (Fa4aotError, NeedsBuffers, _Unserved):
        return None


_OPTIONAL = ("cu_q", "cu_k", "su_q", "su_k", "page_table", "sink")
#: the first item of each function's keys (one's never equal another's)
_DENSE, _FWD, _BWD = "dense", "fwd", "bwd"
#: the backward's optional tensors, in its key's and its prepared call's order
_BWD_OPTIONAL = ("dlse", "cu_q", "cu_k", "su_q", "su_k")
_FWD_SCALARS = ("softmax_scale", "causal", "window_size", "softcap", "num_splits", "pack_gqa")


class _Spec(NamedTuple):
    """What one function's key holds: tensors always given, optional tensors, the parameter
    list (tensors and scalars not in the key's own scalars), scalars (value and class), names
    whose class only counts, and tensors whose shape is checked per call instead. Whether a
    tensor requires grad is not in it: the runtime's calls have no autograd (the integrations
    route those calls to :mod:`fa4aot.torch`), so the full path launches the same either way."""

    always: tuple[str, ...]
    optional: tuple[str, ...]
    params: tuple[str, ...]
    scalars: tuple[str, ...]
    class_only: tuple[str, ...] = ()
    shapeless: tuple[str, ...] = ()


_SPECS = {
    # flash_attn_func's usual call: four tensors, no other
    _DENSE: _Spec(("q", "k", "v", "out"), (), ("q", "k", "v", "out"), _FWD_SCALARS),
    # the batch (sequence tensors' lengths) and max_seqlen_q/k are checked per call (_Family)
    _FWD: _Spec(
        ("q", "k", "v", "out"),
        _OPTIONAL,
        ("q", "k", "v", "out", *_OPTIONAL, "max_q", "max_k"),
        _FWD_SCALARS,
        ("max_q", "max_k"),
        ("cu_q", "cu_k", "su_q", "su_k"),
    ),  # fmt: skip
    _BWD: _Spec(
        ("dout", "q", "k", "v", "out", "lse"),
        _BWD_OPTIONAL,
        ("dout", "q", "k", "v", "out", "lse", *_BWD_OPTIONAL),
        ("max_q", "max_k", "softmax_scale", "causal", "window_size", "softcap", "deterministic"),
    ),  # fmt: skip
}
#: (function tag, given pattern of its optional tensors) -> its generated key function (forward:
#: 2**6 patterns at most, backward: 2**5, dense: 1)
_KEYS: dict[tuple[str, tuple[bool, ...]], Any] = {}


def _given_names(spec: _Spec, given: tuple[bool, ...]) -> list[str]:
    return [*spec.always, *(n for n, there in zip(spec.optional, given) if there)]


def _key_function(tag: str, given: tuple[bool, ...]) -> Any:
    """The key function of ``tag``'s function for one pattern of given optional tensors, written
    out (it runs on a call the last one served did not match): ``key(C, <params>, <scalars>)`` is
    None for a tensor of another class than ``C``, else a tuple of every given tensor's shape (not for ``shapeless``), strides, dtype and device,
    every scalar and its class, the classes of ``class_only`` and of a tuple window's items."""
    spec = _SPECS[tag]
    names = _given_names(spec, given)
    parts = []
    for n in names:
        parts += ([] if n in spec.shapeless else [f"{n}.shape"]) + [f"{n}.stride()", f"{n}.dtype", f"{n}.get_device()"]
    parts += [*spec.scalars, *(f"{x}.__class__" for x in (*spec.scalars, *spec.class_only))]
    parts.append("tuple(map(type, window_size)) if window_size.__class__ is tuple else None")
    lines = [
        f"def key(C, {', '.join(spec.params)}, {', '.join(spec.scalars)}):",
        f"    if {' or '.join(f'{n}.__class__ is not C' for n in names)}:",
        "        return None",
    ]
    lines.append(f"    return ({tag!r}, {given!r}, {', '.join(parts)})")
    scope: dict[str, Any] = {}
    gencode.run("\n".join(lines), scope, f"fast-path {tag} key")
    _KEYS[tag, given] = scope["key"]
    return scope["key"]


def _conditions(cls: type, key: tuple[Any, ...], scope: dict[str, Any], objs: dict[str, Any]) -> str | None:
    """The expression (generated code, over the key function's parameters) that is false
    exactly for calls whose key would be ``key`` - checked attribute by attribute against the
    key's values, cheapest first, with no tuple built or hashed; its constants go into
    ``scope``. One relaxation: a tensor keyed contiguous matches any tensor of its shape that
    torch calls contiguous (:func:`~fa4aot.runtime.prepared.torch_mismatch`: it reads the same
    addresses). None when a scalar of the key is of a class this does not write out (the key
    lookup serves those calls). ``objs``: the call's tensors by parameter name, of this key: the
    tensors are first offered to torch's C++ check built from them
    (:func:`~fa4aot.runtime.prepared.torch_guard`), which passes only tensors that match exactly."""
    spec = _SPECS[key[0]]
    metas, rest = _metas(key)
    values = iter(rest)
    scope["_C"] = cls
    conds = [f"{n} is not None" for n, there in zip(spec.optional, key[1]) if not there]
    tensors = [f"{n}.__class__ is not _C" for n, _ in metas]  # (torch's check tests the class itself)
    for i, (n, (shape, strides, dtype, device)) in enumerate(metas):
        scope.setdefault("_device", device)  # (the first tensor's: the launch's stream is that device's)
        if shape is None:  # (the per-call batch check reads its length)
            scope[f"_s{i}"], scope[f"_d{i}"] = strides, dtype
            tensors.append(f"{n}.dtype is not _d{i} or {n}.stride() != _s{i} or {n}.get_device() != {device!r}")
        else:
            tensors.append(torch_mismatch(n, (shape, strides, dtype, device), f"_t{i}", scope))
    names = [n for n, _ in metas]
    guard = torch_guard([objs[n] for n in names], [(None,) * len(m[1]) if m[0] is None else m[0] for _, m in metas])
    tensor_cond = " or ".join(tensors)
    if guard is not None:
        # (_ok: whether torch's check passed them - the launch may then read their addresses in C)
        tensor_cond = f"not (_ok := {guard.expression(names, scope, '_G')}) and ({tensor_cond})"
    for i, name in enumerate(spec.scalars):
        cond = _scalar_mismatch(name, next(values), f"_v{i}", scope)
        if cond is None:
            return None
        conds.append(cond)
    # after the scalars: their classes (implied above), class_only's classes, the window's items'
    classes = key[len(key) - 1 - len(spec.class_only) : len(key) - 1]
    for i, (name, c) in enumerate(zip(spec.class_only, classes)):
        scope[f"_k{i}"] = c
        conds.append(f"{name}.__class__ is not _k{i}")
    return " or ".join([*conds, tensor_cond])


def _metas(key: tuple[Any, ...]) -> tuple[list[tuple[str, tuple[Any, Any, Any, Any]]], tuple[Any, ...]]:
    """Each given tensor of ``key`` with its (shape - None for a shapeless one -, strides, dtype,
    device), in the key's order (:func:`_key_function`), and the key's items after them."""
    spec = _SPECS[key[0]]
    values = iter(key[2:])
    out = []
    for n in _given_names(spec, key[1]):
        shape = None if n in spec.shapeless else next(values)
        out.append((n, (shape, next(values), next(values), next(values))))
    return out, tuple(values)


def _launch_lines(entry: str, names: Sequence[str], masks: Sequence[int], ws_slots: str | None, device: str,
                  words: str = "", indent: str = "    ", objects: bool = False, buffer: bool = False) -> list[str]:  # fmt: skip
    """Generated code that reads the addresses of tensors ``names`` (a prepared call's, in its
    order), returns 0 when one is misaligned for it (``masks``: alignment - 1; the full path
    names the tensor) and launches ``entry`` (its ``launch_ptrs``) on torch's current stream of
    ``device`` with ``words`` after the stream. With ``ws_slots`` (an expression), FA4's
    tensor-map workspace of that many slots comes first: when torch's current device is the
    tensors', the stream's buffer (:func:`~fa4aot.runtime.workspaces.stream_workspace`), or
    while the stream is being captured into a CUDA graph a raw block from torch's caching
    allocator on it, freed once launched (the graph's pool keeps it); on another current device
    a new torch tensor on the tensors'. ``objects``: the tensors passed torch's check, so the
    compiled hop reads their addresses (``_A``, ``_mk``: :func:`_objects_scope`) and ``entry``'s
    ``launch_tensors`` launches them. ``buffer``: the compiled hop answers first whether the
    stream's buffer serves the call (``_sb``, :func:`_buffer_query`): enough slots and the launch
    stream itself not being captured (whatever torch's current device)."""
    if objects:
        lines = [f"if not _A(_mk, {', '.join(names)}):", "    return 0"]
        ptrs, launch = ", ".join(names), f"{entry}.launch_tensors"
    else:
        lines = [f"p{i} = {n}.data_ptr()" for i, n in enumerate(names)]
        cond = misaligned_test([f"p{i}" for i in range(len(names))], masks[: len(names)])
        lines += [f"if {cond}:", "    return 0"] if cond else []
        ptrs, launch = ", ".join(f"p{i}" for i in range(len(names))), f"{entry}.launch"
    lines.append(f"st = _cur({device})")
    tail = f"st{', ' + words if words else ''}"
    if ws_slots is None:
        lines.append(f"{launch}({ptrs}, {tail})")
    else:
        if buffer:  # the stream's buffer, when it is large enough and the stream not being captured
            lines += [
                f"pw = _sb(_csf, _wss, st, {ws_slots})",
                "if pw is not None:",
                f"    {launch}({ptrs}, pw, {tail})",
            ]
        lines += [
            f"{'elif' if buffer else 'if'} _wss is not None and _current_device() == {device}:",
            "    if _capturing():",
            f"        pw = _raw_alloc(({ws_slots}) * _SLOT_BYTES, st)",
            "        try:",
            f"            {launch}({ptrs}, pw, {tail})",
            "        finally:",
            "            _raw_free(pw)",
            "    else:",
            "        w = _wss.get(st)",
            f"        pw = w[0] if w is not None and w[1] >= {ws_slots} else _grow(st, {ws_slots})",
            f"        {launch}({ptrs}, pw, {tail})",
            "else:",
            f"    ws = {names[0]}.new_empty(({ws_slots}, _W), dtype=_i64)",
            f"    {launch}({ptrs}, ws.data_ptr(), {tail})",
        ]
    return [indent + x for x in lines]


def _objects_scope(names: Sequence[str], masks: Sequence[int], scope: dict[str, Any]) -> bool:
    """Whether a served call's tensors that passed torch's check (``_ok``, :func:`_conditions`)
    may be launched as objects, their addresses read by the compiled hop
    (:func:`~fa4aot.runtime.prepared.tensor_reader`); if so the names that needs go into
    ``scope``."""
    masks = masks[: len(names)]  # (a workspace's mask comes last)
    if "_G" not in scope or max(masks, default=0) > 255 or not tensor_reader(scope["_C"]):
        return False
    scope.update(_A=HOP.aligned, _mk=bytes(masks))
    return True


def _entry_launch(entry: _Entry, ws_slots: str | None, scope: dict[str, Any]) -> list[str]:
    """:func:`_launch_lines` of a served call's entry ``_e``: where its tensors may go to the hop
    as objects (:func:`_objects_scope`), that launch when torch's check passed them (``_ok``),
    else the addresses' launch."""
    names, masks, dev, buf = entry.names, entry.masks, _device(scope), scope.get("_sb") is not None
    if entry.launch_tensors is None or not _objects_scope(names, masks, scope):
        return _launch_lines("_e", names, masks, ws_slots, dev, buffer=buf)
    return ["    if _ok:", *_launch_lines("_e", names, masks, ws_slots, dev, indent="        ", objects=True, buffer=buf),
            "    else:", *_launch_lines("_e", names, masks, ws_slots, dev, indent="        ", buffer=buf)]  # fmt: skip


def _torch_memory() -> tuple[Any, Any, Any, Any]:
    """torch's caching allocator's raw ``alloc(nbytes, stream)`` and ``free(ptr)``, its check
    whether the current stream is being captured, and its current device (each None where this
    torch has none: a CPU build)."""
    c = getattr(sys.modules.get("torch"), "_C", None)
    names = ("_cuda_cudaCachingAllocator_raw_alloc", "_cuda_cudaCachingAllocator_raw_delete",
             "_cuda_isCurrentStreamCapturing", "_cuda_getDevice")  # fmt: skip
    return tuple(getattr(c, n, None) for n in names)  # type: ignore[return-value]


def _allocator(rt: Any) -> dict[str, Any]:
    """The generated launches' names for FA4's tensor-map workspace (:func:`_launch_lines`):
    ``rt``'s per-stream buffers (:func:`~fa4aot.runtime.workspaces.stream_workspace`) and torch's
    caching allocator's raw entry points (where this torch has none, ``_wss`` is None: the
    workspace is then a torch tensor); ``_sb``: the compiled hop's check of a stream's buffer
    (:func:`_buffer_query`), or None."""
    alloc, free, capturing, device = _torch_memory()
    served = alloc is not None and free is not None and device is not None
    return {
        "_raw_alloc": alloc,
        "_raw_free": free,
        "_wss": stream_workspaces(rt) if served else None,
        "_grow": lambda stream, slots: stream_workspace(rt, stream, slots)[0],
        "_capturing": capturing or (lambda: True),  # (no check: every call takes a block of its own)
        "_current_device": device,
        "_SLOT_BYTES": TENSORMAP_WORDS * 8,
        "_W": TENSORMAP_WORDS,
        "_i64": _dtype("int64"),
        **(_buffer_query(rt) if served else {"_sb": None}),
    }


def _buffer_query(rt: Any) -> dict[str, Any]:
    """``_sb`` (the hop's ``stream_buffer``) and ``_csf`` (the driver's ``cuStreamIsCapturing``):
    a served call's workspace is its launch stream's buffer when that holds enough slots and the
    driver says the stream is not being captured - one C call. ``_sb`` is None without the
    compiled hop or the driver's function (the Python checks then decide every call)."""
    query = getattr(rt.driver, "capture_status_function", None)
    if HOP is None or not hasattr(HOP, "stream_buffer") or query is None:
        return {"_sb": None}
    try:
        return {"_sb": HOP.stream_buffer, "_csf": query()}
    except Fa4aotError:  # (a driver without it)
        return {"_sb": None}


def _scalar_mismatch(name: str, value: Any, const: str, scope: dict[str, Any]) -> str | None:
    """The condition under which scalar ``name`` differs from the key's ``value`` (in value or
    class: ``True`` is not ``1`` to the argument checks); None for a class not written out."""
    if value is None or value is True or value is False:
        return f"{name} is not {value!r}"
    cls = value.__class__
    # (the key's own object first: a default argument, or a small int, is the same object on
    # every call, and an int, float (not NaN) or tuple of ints and Nones is equal to itself)
    same = f"{name} is not {const} and "
    if cls is int or cls is float:
        scope[const] = value
        return f"{same if value == value else ''}({name}.__class__ is not {cls.__name__} or {name} != {const})"
    if cls is tuple:
        scope[const] = value
        items = []
        for j, item in enumerate(value):
            if item is None:
                items.append(f"{name}[{j}] is not None")
            elif item.__class__ is int:
                items.append(f"{name}[{j}].__class__ is not int")
            else:
                return None
        return f"{same}({' or '.join([f'{name}.__class__ is not tuple or {name} != {const}', *items])})"
    return None


def _serve_dense(entry: _Entry, cond: str, scope: dict[str, Any], calls: _Calls, current_stream: Any) -> Any:
    """``serve(<dense's parameters>)``: -1 when the call is not of the entry's key (``cond``,
    :func:`_conditions`), 0 when it is not served (a misaligned address: the full path names
    it), else 1: launched on torch's current stream."""
    spec = _SPECS[_DENSE]
    scope.update(_e=entry, _calls=calls, _cur=current_stream, **_allocator(entry.rt))
    lines = [f"def serve({', '.join((*spec.params, *spec.scalars))}):", f"    if {cond}:", "        return -1"]
    lines += _entry_launch(entry, str(entry.ws_slots) if entry.ws_slots else None, scope)
    lines += ["    _calls.hits += 1", "    return 1"]
    gencode.run("\n".join(lines), scope, "fast-path dense call")
    return scope["serve"]


def _serve_backward(entry: _Entry, key: tuple[Any, ...], cond: str, scope: dict[str, Any], calls: _Calls,
                    current_stream: Any) -> Any:  # fmt: skip
    """``serve(<backward's parameters>)``: -1 when the call is not of the entry's key (``cond``), 0
    when it is not served (a misaligned address), else ``(dq, dk, dv)``: the gradients allocated
    as the full path allocates them (like q, k and v in q's dtype) and FA4's fp32 scratch a new
    buffer per call (torch's allocator orders its reuse on the stream), launched."""
    spec = _SPECS[_BWD]
    shapes = {name: meta[0] for name, meta in _metas(key)[0]}
    scope.update(_e=entry, _calls=calls, _cur=current_stream, _f32=_dtype("float32"), _gq=shapes["q"],
                 _gk=shapes["k"], _gv=shapes["v"])  # fmt: skip
    lines = [f"def serve({', '.join((*spec.params, *spec.scalars))}):", f"    if {cond}:", "        return -1"]
    lines += ["    dq, dk, dv = q.new_empty(_gq), q.new_empty(_gk), q.new_empty(_gv)",
              f"    scratch = q.new_empty(({entry.scratch_bytes // 4},), dtype=_f32)"]  # fmt: skip
    lines += _entry_launch(entry, None, scope)
    lines += ["    _calls.hits += 1", "    return dq, dk, dv"]
    gencode.run("\n".join(lines), scope, "fast-path backward call")
    return scope["serve"]


def _device(scope: dict[str, Any]) -> str:
    """The bound device (q's, from :func:`_conditions`' constants: every tensor's is checked)."""
    return repr(scope.get("_device", 0))


def batch_lines(pinned: int | None, seqs: Sequence[str], fail: str, length: str = "{}.shape[0]") -> list[str]:
    """Generated code setting ``b``, the call's batch - ``pinned`` (fixed by a tensor's shape in
    the key), else the first sequence tensor's - and returning ``fail`` when a given sequence
    tensor's length disagrees with it (cu_seqlens: batch + 1, seqused: batch). ``length``: the
    expression of a sequence tensor's length (``{}``: its name)."""
    extra = {"cu_q": 1, "cu_k": 1, "su_q": 0, "su_k": 0}
    first = repr(pinned) if pinned is not None else f"{length.format(seqs[0])} - {extra[seqs[0]]}"
    checks = []
    for n in seqs:
        if pinned is None and n == seqs[0]:
            continue
        same = pinned is None and extra[n] == extra[seqs[0]]  # (the same tensor: its length agrees)
        checks.append(f"({n} is not {seqs[0]} and {length.format(n)} != b + {extra[n]})" if same else
                      f"{length.format(n)} != b + {extra[n]}")  # fmt: skip
    return [f"    b = {first}"] + ([f"    if {' or '.join(checks)}:", f"        return {fail}"] if checks else [])


def _serve_family(fam: _Family, key: tuple[Any, ...], cond: str, scope: dict[str, Any], calls: _Calls,
                  current_stream: Any) -> Any:  # fmt: skip
    """``serve(<forward's parameters>)``: -1 when the call is not of the family's key (``cond``),
    -2 when its decision has no prepared form yet (:func:`decided`), 0 when it is not served
    (sequence tensors whose lengths disagree, a decision not served here, a misaligned address:
    the full path), else 1: the prepared form of FA4's decision for the call's (batch,
    max_seqlen_q, max_seqlen_k) launched with them (and its workspace slots) as per-call words."""
    spec = _SPECS[_FWD]
    scope.update(_F=fam, _calls=calls, _cur=current_stream, _PREPARE=_PREPARE, **_allocator(fam.rt))
    lines = [f"def serve({', '.join((*spec.params, *spec.scalars))}):", f"    if {cond}:", "        return -1"]
    lines += batch_lines(fam.pinned, fam.seqs, "0", "{}.numel()")  # (1-D: the key's strides; numel() is cheapest)
    lines += ["    t = (b, max_q, max_k)", "    last = _F.last", "    if last[0] != t:"]
    classes = key[len(key) - 1 - len(_SPECS[_FWD].class_only) : len(key) - 1]  # max_q's, max_k's
    region = _region_lines(fam, classes, scope)
    step = [
        "last = _F.step(t, None)",
        "if last is None:",
        "    _calls.missed()",
        "    return 0",
        "if last is _PREPARE:",
        "    return -2",
    ]
    if region:  # new values in the last decision's region: its decision, without step()
        lines += ["        " + x for x in region]
        lines += ["        else:", *("            " + x for x in step)]
    else:
        lines += ["        " + x for x in step]
    lines += ["    e = last[1]", "    vb, vq, vk, vs = last[2]"]
    words, dev, buf = "vb, vq, vk, vs", _device(scope), scope.get("_sb") is not None
    if _objects_scope(fam.names, fam.masks, scope):  # (every decision's form may have them: checked per call)
        lines += ["    if _ok and e.launch_tensors is not None:", "        if e.ws_slots:"]
        lines += _launch_lines("e", fam.names, fam.masks, "vs", dev, words, " " * 12, objects=True, buffer=buf)
        lines.append("        else:")
        lines += _launch_lines("e", fam.names, fam.masks, None, dev, words, " " * 12, objects=True)
        lines.append("    elif e.ws_slots:")
    else:
        lines.append("    if e.ws_slots:")
    lines += _launch_lines("e", fam.names, fam.masks, "vs", dev, words, "        ", buffer=buf)
    lines.append("    else:")
    lines += _launch_lines("e", fam.names, fam.masks, None, dev, words, "        ")
    lines += ["    _calls.hits += 1", "    return 1"]
    gencode.run("\n".join(lines), scope, "fast-path forward call")
    return scope["serve"]


def advance_function(fam: _Family, classes: tuple[type, type]) -> Any:
    """``advance(b, max_q, max_k)``: ``fam``'s ``last`` for a call of these values (``classes``:
    max_seqlen_q's and max_seqlen_k's, as bound) - the last one's, or the last decision's region
    holding them (:func:`_region_lines`, as a served call takes it) - else None: the caller steps
    (:meth:`_Family.step`)."""
    scope: dict[str, Any] = {"_F": fam}
    region = _region_lines(fam, classes, scope)
    lines = ["def advance(b, max_q, max_k):", "    t = (b, max_q, max_k)", "    last = _F.last", "    if last[0] == t:",
             "        return last"]  # fmt: skip
    lines += ["    " + x for x in region] + (["    else:", "        return None"] if region else ["    return None"])
    lines.append("    return last")
    gencode.run("\n".join(lines), scope, "fast-path decision for new values")
    return scope["advance"]


def _region_lines(fam: _Family, classes: tuple[type, type], scope: dict[str, Any]) -> list[str]:
    """Generated code (in :func:`_serve_family`, after ``last[0] != t``) that serves new values
    ``t`` held by the region of the last decision (``last[3]``: its check and workspace terms,
    :meth:`_Family._last`) as :meth:`_Family.step` would - the same facts, range checks and
    values - and sets ``last``; the lines open an ``if`` whose ``else`` the caller writes. Empty
    where step() never serves new values (``exact``) or the rule has no regions."""
    if fam.exact is not None or fam.rule.regions is None:
        return []
    given = [name for name, c in zip(("max_q", "max_k"), classes) if c is not type(None)]
    scope.update(_R=fam.rule.regions, _IMAX=INT32_MAX, _dq=fam.default_q, _dk=fam.default_k)
    facts = ["b", *map(repr, fam.fixed), *given]
    held = " and ".join(["r is not None", "b > 0", *(f"0 <= {n} <= _IMAX" for n in given), f"r[0]({', '.join(facts)})"])
    mq = "max_q" if "max_q" in given else "_dq"
    mk = "max_k" if "max_k" in given else "_dk"
    return [
        "r = last[3]",
        "try:",
        f"    held = {held}",
        "except Exception:  # (arithmetic outside the region, as Regions.match)",
        "    held = False",
        "if held:",
        "    _R.reuses += 1",
        "    vs = r[1] + r[2] * b",  # (FA4's workspace slots: max(r[1] + r[2] * b, r[3]), without a call)
        "    if vs < r[3]:",
        "        vs = r[3]",
        f"    last = _F.last = (t, last[1], (b, {mq}, {mk}, vs), r)",
    ]


#: :meth:`_Family.step` without a prepare function, for a decision that has no prepared form yet
_PREPARE = object()


class _Family:
    """The calls of one key of :func:`forward`: same tensors but for the sequence tensors'
    lengths, same arguments but for max_seqlen_q/k. Each decision FA4 makes for them has its
    prepared form (bound with those values as per-call words); ``last`` is the last call's
    ((batch, max_seqlen_q, max_seqlen_k), entry, per-call values)."""

    __slots__ = (
        "rule", "base", "rkey", "fixed", "pinned", "seqs", "batch_of", "default_q", "default_k", "exact", "ws",
        "by_pick", "last", "names", "masks", "serve", "rt",
    )  # fmt: skip

    def __init__(self, prepared: Any):
        fc = prepared.fc
        if fc.rule is None or prepared._owned:  # (not expected: the probe refuses buffers first)
            prepared.close()
            raise _Unserved
        self.rule, self.base, self.rt = fc.rule, fc.shape, fc.rt
        self.serve: Any = None  # (_serve_family's function, once keyed)
        self.rkey = region_key(fc.shape)  # the same for every call of the key (its None-ness is in it)
        s = fc.shape  # the traced facts the key fixes (regions: Shape's facts, those not None, in order)
        self.fixed = (s.total_q, s.total_k, s.q_capacity, s.k_capacity)
        varlen_q = fc.cu_q is not None
        # a batched q or k, or a page table (batch, pages), is in the key: it pins the batch
        free = varlen_q and fc.cu_k is not None and fc.page_table is None
        self.pinned = None if free else fc.batch
        self.seqs = [n for n, d in zip(("cu_q", "cu_k", "su_q", "su_k"), (fc.cu_q, fc.cu_k, fc.su_q, fc.su_k))
                     if d is not None]  # fmt: skip
        self.batch_of = _batch_of(self.pinned, self.seqs)
        # max_seqlen given as None: the full path's defaults (fixed by the key's shapes)
        self.default_q = fc.max_q if s.max_seqlen_q is None else None
        self.default_k = fc.max_k if s.max_seqlen_k is None else None
        t = (fc.batch, s.max_seqlen_q, s.max_seqlen_k)
        pick = fc.rule.memo.get(s)
        # the kernel's window edges (local calls) and a tuned variant follow max_seqlen: those
        # calls are served for the values they were prepared with only
        self.exact = t if (fc.wl is not None or pick is None or pick.lv is not fc.lv) else None
        self.ws = (fc.nheads, fc.k[1][-2], fc.rt.target.num_sms, fc.rows[0] * (1 if varlen_q else fc.rows[1]))
        self.by_pick: BoundedDict = BoundedDict(MAX_DECISIONS)
        entry = _Entry(prepared)
        self.names, self.masks = entry.names, entry.masks  # (every decision's prepared form has them)
        if pick is not None:
            self.by_pick[id(pick)] = (pick, entry)
        self.last = self._last(t, entry, fc.lv.fields, None)

    def _last(self, t: tuple[Any, Any, Any], entry: Any, fields: dict[str, Any], check: Any) -> tuple[Any, ...]:
        """``last`` for values ``t`` and the decision of ``fields`` (its prepared form ``entry``):
        (t, entry, (batch, max_seqlen_q, max_seqlen_k, workspace slots) as the kernel takes them,
        region) - region: (its check, the workspace terms) when the decision came from a traced
        region, so the next call that region holds is served without :meth:`step`."""
        batch, mq, mk = t
        nheads, nheads_kv, num_sms, rows = self.ws
        terms = tensormap_workspace_terms(bool(fields.get("pack_gqa")), fields["tile_m"], nheads, nheads_kv, num_sms,
                                          rows, 1)  # fmt: skip
        values = (batch, self.default_q if mq is None else mq, self.default_k if mk is None else mk,
                  max(terms[0] + terms[1] * batch, terms[2]))  # fmt: skip
        return t, entry, values, None if check is None else (check, *terms)

    def step(self, t: tuple[Any, Any, Any], prepare: Any) -> Any:
        """``last`` for a call of new values ``t``; None: the full path serves it (no decision
        known for them yet, out-of-range values, or a decision not served here); :data:`_PREPARE`
        when the decision has no prepared form yet and ``prepare`` is None."""
        batch, mq, mk = t
        if batch < 1 or self.exact is not None:
            return None
        for m in (mq, mk):
            if m is not None and not 0 <= m <= INT32_MAX:
                return None  # the full path raises, saying why
        rule = self.rule
        pick = check = None
        if rule.regions is not None:
            if mq is not None and mk is not None:
                values = (batch, *self.fixed, mq, mk)
            else:
                values = (batch, *self.fixed) + (mq,) * (mq is not None) + (mk,) * (mk is not None)
            found = rule.regions.match(self.rkey, values)
            if found is not None:
                check, pick = found
        if pick is None:
            pick = rule.memo.get(self.base._replace(batch=batch, max_seqlen_q=mq, max_seqlen_k=mk))
            if pick is None:
                return None  # the full path decides (and memoises) it
        got = self.by_pick.get(id(pick))
        if got is None or got[0] is not pick:
            if prepare is None:
                return _PREPARE
            try:
                prepared = prepare()
            except (Fa4aotError, NeedsBuffers, _Unserved):
                self.by_pick[id(pick)] = (pick, _NOT_SERVED)
                return None
            fc = prepared.fc
            if prepared._owned or fc.lv is not pick.lv or fc.wl is not None:
                self.by_pick[id(pick)] = (pick, _NOT_SERVED)
                return None
            entry = _Entry(prepared)
            if (entry.names, entry.masks) != (self.names, self.masks):  # (not expected: the same tensors)
                self.by_pick[id(pick)] = (pick, _NOT_SERVED)
                return None
            got = self.by_pick[id(pick)] = (pick, entry)
        if got[1] is _NOT_SERVED:
            return None
        last = self.last = self._last(t, got[1], pick.lv.fields, check)
        return last


def _batch_of(pinned: int | None, seqs: list[str]) -> Any:
    """``batch_of(cu_q, cu_k, su_q, su_k)``: the call's batch (:func:`_batch_lines`), -1 when the
    sequence tensors' lengths disagree with it."""
    lines = ["def batch_of(cu_q, cu_k, su_q, su_k):", *batch_lines(pinned, seqs, "-1"), "    return b"]
    scope: dict[str, Any] = {}
    gencode.run("\n".join(lines), scope, "fast-path batch")
    return scope["batch_of"]


class _Unserved(Exception):
    """A prepared form the fast path does not serve."""


def _start(rt: Any) -> tuple[tuple[type, Any], _Calls] | None:
    """(torch's API, ``rt``'s fast calls) for a call the fast path looks up; None: torch is not
    imported, or the fast path is paused (:meth:`_Calls.missed`)."""
    api = _API[0] if _API else _torch_api()
    if api is None:
        return None
    calls = rt.api_caches.get("fast_calls")
    if calls is None:
        calls = _calls(rt)
    if calls.skip:
        calls.skip -= 1
        return None
    return api, calls


def _lookup(api: tuple[type, Any], calls: _Calls, tag: str, given: tuple[bool, ...], args: tuple[Any, ...]) -> Any:
    """(key, what ``calls`` holds for it or None) for a call of ``tag``'s function (``args``: its
    serve's parameters); None for a tensor of another class, or an unhashable or unusual
    argument (a list window): the full path decides those."""
    make_key = _KEYS.get((tag, given)) or _key_function(tag, given)
    try:
        key = make_key(api[0], *args)
        return None if key is None else (key, calls.entries.get(key))
    except TypeError:
        return None


def _keyed(api: tuple[type, Any], calls: _Calls, tag: str, given: tuple[bool, ...], args: tuple[Any, ...],
           prepare: Any) -> Any:  # fmt: skip
    """The entry (or :class:`_Family`) for a call the last one served did not match, by the
    call's key (it becomes the last one); None: not served (a key sighted now, one never
    served, another tensor class, an unhashable argument)."""
    found = _lookup(api, calls, tag, given, args)
    if found is None:
        return None
    key, got = found
    if got is None:
        _sight(calls, key, prepare, api, args)
        return None
    if got is _NOT_SERVED:
        calls.missed()
        return None
    setattr(calls, tag, got.serve)  # (tag: "dense", "fwd" or "bwd", _Calls' attributes)
    return got


def dense(
    rt: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    softmax_scale: Any,
    causal: Any,
    window_size: Any,
    softcap: Any,
    num_splits: Any,
    pack_gqa: Any,
) -> bool:
    """:func:`forward` for a batched call with no other tensor (``flash_attn_func``'s usual call),
    written out: it is the call most often repeated (after ``_Calls.dense``, as there)."""
    started = _start(rt)
    if started is None:
        return False
    api, calls = started
    entry = _keyed(api, calls, _DENSE, (), (q, k, v, out, softmax_scale, causal, window_size, softcap, num_splits,
                                            pack_gqa),
                   lambda: _prepare(rt, [q, k, v, out], None, None, None, None, None, None, None, None, softmax_scale,
                                    causal, window_size, softcap, num_splits, pack_gqa))  # fmt: skip
    return entry is not None and entry.serve(q, k, v, out, softmax_scale, causal, window_size, softcap, num_splits,
                                             pack_gqa) == 1  # fmt: skip


def backward(
    rt: Any,
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dlse: Any,
    cu_q: Any,
    cu_k: Any,
    su_q: Any,
    su_k: Any,
    max_q: Any,
    max_k: Any,
    softmax_scale: Any,
    causal: Any,
    window_size: Any,
    softcap: Any,
    deterministic: Any,
) -> tuple[Any, Any, Any] | None:
    """The backward's fast path (no outputs given, no sink, torch's current stream): ``(dq, dk,
    dv)`` allocated as the full path allocates them, FA4's scratch a new buffer from torch's
    allocator per call (as the full path's), launched from the call's prepared form; None: not
    served here (after ``_Calls.bwd``, as in :func:`forward`)."""
    started = _start(rt)
    if started is None:
        return None
    api, calls = started
    given = (dlse is not None, cu_q is not None, cu_k is not None, su_q is not None, su_k is not None)
    scalars = (max_q, max_k, softmax_scale, causal, window_size, softcap, deterministic)
    optional = [x for x in (dlse, cu_q, cu_k, su_q, su_k) if x is not None]
    entry = _keyed(api, calls, _BWD, given, (dout, q, k, v, out, lse, dlse, cu_q, cu_k, su_q, su_k, *scalars),
                   lambda: _prepare_backward(rt, [dout, q, k, v, out, lse, *optional], given, scalars))  # fmt: skip
    if entry is None:
        return None
    r = entry.serve(dout, q, k, v, out, lse, dlse, cu_q, cu_k, su_q, su_k, *scalars)
    return r if r.__class__ is tuple else None


def _dtype(name: str) -> Any:
    """torch's dtype of that name (the tensors are torch's, so torch is imported)."""
    return getattr(sys.modules.get("torch"), name, name)


def _prepare_backward(rt: Any, tensors: list[Any], given: tuple[bool, ...], scalars: tuple[Any, ...]) -> Any:
    dout, q, k, v, out, lse, *rest = tensors
    opt = iter(rest)
    dlse, cu_q, cu_k, su_q, su_k = (next(opt) if there else None for there in given)
    max_q, max_k, softmax_scale, causal, window_size, softcap, deterministic = scalars
    c = bwd.analyse(rt, bwd.BwdArgs(
        dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap, cu_q, cu_k, su_q, su_k, max_q, max_k,
        deterministic, dlse=dlse,
    ))  # fmt: skip
    nbytes = bwd.scratch_bytes(rt, c) if c.kern is not None else 0
    example = q.new_empty((max(nbytes, 4) // 4,), dtype=_dtype("float32"))
    dq, dk, dv, _ = c.outputs
    names = dict(dlse=dlse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=su_q, seqused_k=su_k)
    run = bwd.bind_backward(rt, c, [dout, q, k, v, out, lse, dq, dk, dv], names, example)
    run.scratch_bytes = nbytes
    return run


def _prepare(rt: Any, qkvo: list[Any], cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, su_q: Any, su_k: Any,
             page_table: Any, sink: Any, softmax_scale: Any, causal: Any, window_size: Any, softcap: Any,
             num_splits: Any, pack_gqa: Any, varying: bool = False) -> Any:  # fmt: skip
    return prepare_forward(
        *qkvo, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, seqused_q=su_q,
        seqused_k=su_k, page_table=page_table, learnable_sink=sink, softcap=softcap, softmax_scale=softmax_scale,
        causal=causal, window_size=window_size, num_splits=num_splits, pack_gqa=pack_gqa, runtime=rt, own=False,
        varying=varying,
    )  # fmt: skip


def prepare_from(rt: Any, args: tuple[Any, ...]) -> Any:
    """:func:`_prepare` (``varying``) for a forward call given as its serve's parameters."""
    q, k, v, out, cu_q, cu_k, su_q, su_k, page_table, sink, max_q, max_k = args[:12]
    return _prepare(rt, [q, k, v, out], cu_q, cu_k, max_q, max_k, su_q, su_k, page_table, sink, *args[12:],
                    varying=True)  # fmt: skip


def _sight(calls: _Calls, key: tuple[Any, ...], prepare: Any, api: tuple[type, Any], args: tuple[Any, ...]) -> None:
    """Count a sighting of ``key``; on the one that prepares it, store its entry (or family)
    with the function that answers the calls of its key, or :data:`_NOT_SERVED`."""
    calls.missed()
    seen = calls.sighted.get(key, 0) + 1
    if seen < SIGHTINGS_TO_PREPARE:
        calls.sighted[key] = seen
        return
    calls.sighted.pop(key, None)
    _store(calls, key, api, args, prepare)


def _store(calls: _Calls, key: tuple[Any, ...], api: tuple[type, Any], args: tuple[Any, ...], prepare: Any) -> Any:
    """Prepare ``key`` and store its entry (or family) with the function that answers the
    calls of its key (:func:`_serve_family` ...), or :data:`_NOT_SERVED`; returns what it stored."""
    try:
        got = prepare()
    except (Fa4aotError, NeedsBuffers, _Unserved):  # the full path raises the error / allocates per call
        calls.entries[key] = _NOT_SERVED
        return _NOT_SERVED
    if not isinstance(got, _Family):
        if got._owned:  # not expected (the forward's probe refuses first; the backward binds its scratch)
            got.close()
            calls.entries[key] = _NOT_SERVED
            return _NOT_SERVED
        got = _Entry(got)
    scope: dict[str, Any] = {}
    cond = _conditions(api[0], key, scope, dict(zip(_SPECS[key[0]].params, args)))
    if cond is None:  # a scalar of a class not written out (a NumPy float): the full path serves it
        calls.entries[key] = _NOT_SERVED
        return _NOT_SERVED
    if key[0] == _FWD:
        got.serve = _serve_family(got, key, cond, scope, calls, api[1])
    elif key[0] == _DENSE:
        got.serve = _serve_dense(got, cond, scope, calls, api[1])
    else:
        got.serve = _serve_backward(got, key, cond, scope, calls, api[1])
    calls.entries[key] = got
    return got


def clear(rt: Any) -> None:
    """Forget ``rt``'s fast calls (tests; a runtime closing)."""
    rt.api_caches.pop("fast_calls", None)
