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
on its second sighting (one-off shapes stay on the full path). A forward whose prepared form
would own buffers (split-KV partials, scheduler metadata, the route semaphore) is not served
here: a plain call allocates those per call and concurrent calls must not share them. FA4's
tensor-map workspace and the backward's scratch are new buffers from torch's allocator per call,
as on the full path. Anything unusual - other tensor classes, a misaligned address, an
unhashable argument, sequence tensors whose lengths disagree - takes the full path, which raises
the typed error. Threads may share an entry: a prepared call packs into a block per thread.
"""

from __future__ import annotations

import sys
from typing import Any

from fa4aot.core import gencode
from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.fa4_interface import TENSORMAP_WORDS, tensormap_workspace_ctas
from fa4aot.runtime import backward as bwd
from fa4aot.runtime import loader
from fa4aot.runtime.dispatch import region_key
from fa4aot.runtime.prepared import NeedsBuffers, prepare_forward
from fa4aot.runtime.validate import INT32_MAX

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
    __slots__ = ("launch", "mask", "masks", "scratch_bytes", "ws_slots")

    def __init__(self, prepared: Any):
        self.launch = prepared.launch_ptrs  # it holds the bound call blocks it writes
        self.mask = max(prepared._aligns) - 1
        self.masks = tuple(a - 1 for a in prepared._aligns)
        self.scratch_bytes = getattr(prepared, "scratch_bytes", 0)
        self.ws_slots = getattr(prepared, "workspace_slots", 0)


class _Calls:
    """One runtime's fast plain calls: key -> _Entry (or _NOT_SERVED), and keys seen once."""

    __slots__ = ("entries", "sighted", "hits", "tries", "recent_hits", "skip")

    def __init__(self) -> None:
        self.entries: BoundedDict = BoundedDict(MAX_FAST_CALLS)
        self.sighted: BoundedDict = BoundedDict(MAX_SIGHTED)
        self.hits = 0
        self.tries = 0  # calls looked up in the current window
        self.recent_hits = 0  # of them, served
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
            if not self.recent_hits:
                self.skip = SKIP
            self.tries = self.recent_hits = 0


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
    stream) from a prepared form; False: not served here, the caller runs the full path.

    The batch (the sequence tensors' length) and max_seqlen_q/k may change from call to call:
    they are not in the key. A call whose (batch, max_seqlen_q, max_seqlen_k) differs from the
    last one's takes FA4's decision for them from the rule's memo or a traced region (never
    deciding here) and launches the prepared form made for that decision with the new values
    (:class:`_Family`)."""
    started = _start(rt)
    if started is None:
        return False
    api, calls = started
    cls, current_stream = api
    given = (cu_q is not None, cu_k is not None, su_q is not None, su_k is not None, page_table is not None,
             sink is not None)  # fmt: skip
    make_key = _KEYS.get((_FWD, given)) or _forward_key(given)
    try:
        k_ = make_key(cls, q, k, v, out, cu_q, cu_k, su_q, su_k, page_table, sink, max_q, max_k, softmax_scale, causal,
                      window_size, softcap, num_splits, pack_gqa)  # fmt: skip
        if k_ is None:  # another tensor class, or a tensor that requires grad
            return False
        fam = calls.entries.get(k_)
    except TypeError:  # an unhashable or unusual argument (a list window): the full path decides
        return False
    # the prepared call's tensor order (prepare_forward): q, k, v, out, then those given
    tensors = [q, k, v, out] + [t for t in (cu_q, cu_k, su_q, su_k, page_table, sink) if t is not None]
    seqs = tensors[4 : 4 + sum(given[:4])]
    if fam is None:
        _sight(calls, k_, lambda: _Family(_prepare(rt, tensors[:4], cu_q, cu_k, max_q, max_k, su_q, su_k, page_table,
                                                  sink, softmax_scale, causal, window_size, softcap, num_splits,
                                                  pack_gqa, varying=True)))  # fmt: skip
        return False
    if fam is _NOT_SERVED:
        calls.missed()
        return False
    # the batch: the sequence tensors' lengths must agree with it (the key leaves them out)
    batch = fam.pinned if fam.pinned is not None else seqs[0].shape[0] - 1
    for t, extra in zip(seqs, fam.extras):
        if t.shape[0] != batch + extra:
            return False  # the full path names the mismatch
    t = (batch, max_q, max_k)
    last = fam.last
    if last[0] != t:
        last = fam.step(t, lambda: _prepare(rt, tensors[:4], cu_q, cu_k, max_q, max_k, su_q, su_k, page_table, sink,
                                            softmax_scale, causal, window_size, softcap, num_splits, pack_gqa,
                                            varying=True))  # fmt: skip
        if last is None:
            calls.missed()
            return False
    _, entry, vals = last
    ptrs = [t.data_ptr() for t in tensors]
    mask = entry.mask
    for p in ptrs:
        if p & mask:
            return False  # the full path names the misaligned tensor
    if entry.ws_slots:  # FA4's tensor-map workspace: a new torch buffer per call, as on the full path
        ws = q.new_empty((vals[3], TENSORMAP_WORDS), dtype=_dtype("int64"))
        ptrs.append(ws.data_ptr())
    entry.launch(*ptrs, stream=current_stream(q.get_device()), vb=vals[0], vq=vals[1], vk=vals[2], vs=vals[3])
    calls.hits += 1
    calls.recent_hits += 1
    return True


_OPTIONAL = ("cu_q", "cu_k", "su_q", "su_k", "page_table", "sink")
#: (function tag, given pattern of its optional tensors) -> its generated key function (forward:
#: 2**6 patterns at most, backward: 2**5)
_KEYS: dict[tuple[str, tuple[bool, ...]], Any] = {}


def _forward_key(given: tuple[bool, ...]) -> Any:
    """The key function of :func:`forward` for one pattern of given optional tensors: None for
    another tensor class or a tensor that requires grad; the sequence tensors (cu_seqlens,
    seqused) without their shape (the batch is checked per call), max_seqlen_q/k by class only."""
    scalars = ("softmax_scale", "causal", "window_size", "softcap", "num_splits", "pack_gqa")
    return _key_function(
        _FWD, given, ("q", "k", "v", "out"), _OPTIONAL, f"q, k, v, out, {', '.join(_OPTIONAL)}, max_q, max_k",
        scalars, ("max_q", "max_k"), shapeless=("cu_q", "cu_k", "su_q", "su_k"), no_grad=True,
    )  # fmt: skip


def _key_function(
    tag: str, given: tuple[bool, ...], always: tuple[str, ...], optional: tuple[str, ...], params: str,
    scalars: tuple[str, ...], class_only: tuple[str, ...], shapeless: tuple[str, ...] = (), no_grad: bool = False,
) -> Any:  # fmt: skip
    """A fast-path key function written out (it runs on every call): ``key(C, <params>,
    <scalars>)`` is None for a tensor of another class than ``C`` (or, with ``no_grad``, one
    that requires grad), else a tuple of every given tensor's shape (not for ``shapeless``),
    strides, dtype and device, every scalar and its class, the classes of ``class_only`` and of
    a tuple window's items."""
    names = [*always, *(n for n, there in zip(optional, given) if there)]
    parts = []
    for n in names:
        parts += ([] if n in shapeless else [f"{n}.shape"]) + [f"{n}.stride()", f"{n}.dtype", f"{n}.get_device()"]
    parts += [*scalars, *(f"{x}.__class__" for x in (*scalars, *class_only))]
    parts.append("tuple(map(type, window_size)) if window_size.__class__ is tuple else None")
    lines = [
        f"def key(C, {params}, {', '.join(scalars)}):",
        f"    if {' or '.join(f'{n}.__class__ is not C' for n in names)}:",
        "        return None",
    ]
    if no_grad:
        lines += [f"    if {' or '.join(f'{n}.requires_grad' for n in names)}:", "        return None"]
    lines.append(f"    return ({tag!r}, {given!r}, {', '.join(parts)})")
    scope: dict[str, Any] = {}
    gencode.run("\n".join(lines), scope, f"fast-path {tag} key")
    _KEYS[tag, given] = scope["key"]
    return scope["key"]


class _Family:
    """The calls of one key of :func:`forward`: same tensors but for the sequence tensors'
    lengths, same arguments but for max_seqlen_q/k. Each decision FA4 makes for them has its
    prepared form (bound with those values as per-call words); ``last`` is the last call's
    ((batch, max_seqlen_q, max_seqlen_k), entry, per-call values)."""

    __slots__ = (
        "rule", "base", "rkey", "pinned", "extras", "default_q", "default_k", "exact", "ws", "by_pick", "last",
    )  # fmt: skip

    def __init__(self, prepared: Any):
        fc = prepared.fc
        if fc.rule is None or prepared._owned:  # (not expected: the probe refuses buffers first)
            prepared.close()
            raise _Unserved
        self.rule, self.base = fc.rule, fc.shape
        self.rkey = region_key(fc.shape)  # the same for every call of the key (its None-ness is in it)
        varlen_q = fc.cu_q is not None
        # a batched q or k, or a page table (batch, pages), is in the key: it pins the batch
        free = varlen_q and fc.cu_k is not None and fc.page_table is None
        self.pinned = None if free else fc.batch
        self.extras = tuple(e for d, e in ((fc.cu_q, 1), (fc.cu_k, 1), (fc.su_q, 0), (fc.su_k, 0)) if d is not None)
        s = fc.shape
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
        if pick is not None:
            self.by_pick[id(pick)] = (pick, entry)
        self.last = (t, entry, self._values(t, fc.lv.fields))

    def _values(self, t: tuple[Any, Any, Any], fields: dict[str, Any]) -> tuple[int, int, int, int]:
        """(batch, max_seqlen_q, max_seqlen_k, workspace slots) as the kernel takes them."""
        batch, mq, mk = t
        nheads, nheads_kv, num_sms, rows = self.ws
        slots = tensormap_workspace_ctas(bool(fields.get("pack_gqa")), fields["tile_m"], nheads, nheads_kv, num_sms,
                                         rows, batch, 1)  # fmt: skip
        return batch, self.default_q if mq is None else mq, self.default_k if mk is None else mk, slots

    def step(self, t: tuple[Any, Any, Any], prepare: Any) -> tuple[Any, _Entry, tuple[int, ...]] | None:
        """``last`` for a call of new values ``t``; None: the full path serves it (no decision
        known for them yet, out-of-range values, or a decision not served here)."""
        batch, mq, mk = t
        if batch < 1 or self.exact is not None:
            return None
        for m in (mq, mk):
            if m is not None and not 0 <= m <= INT32_MAX:
                return None  # the full path raises, saying why
        rule, base = self.rule, self.base
        pick = None
        if rule.regions is not None:  # (Shape's traced facts, those not None, in order)
            values = (batch, base.total_q, base.total_k, base.q_capacity, base.k_capacity)
            values += (mq,) * (mq is not None) + (mk,) * (mk is not None)
            pick = rule.regions.find(self.rkey, values)
        if pick is None:
            pick = rule.memo.get(base._replace(batch=batch, max_seqlen_q=mq, max_seqlen_k=mk))
            if pick is None:
                return None  # the full path decides (and memoises) it
        got = self.by_pick.get(id(pick))
        if got is None or got[0] is not pick:
            try:
                prepared = prepare()
            except (Fa4aotError, NeedsBuffers, _Unserved):
                self.by_pick[id(pick)] = (pick, _NOT_SERVED)
                return None
            fc = prepared.fc
            if prepared._owned or fc.lv is not pick.lv or fc.wl is not None:
                self.by_pick[id(pick)] = (pick, _NOT_SERVED)
                return None
            got = self.by_pick[id(pick)] = (pick, _Entry(prepared))
        if got[1] is _NOT_SERVED:
            return None
        last = self.last = (t, got[1], self._values(t, pick.lv.fields))
        return last


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
    written out: it is the call most often repeated."""
    started = _start(rt)
    if started is None:
        return False
    api, calls = started
    cls = api[0]
    if q.__class__ is not cls or k.__class__ is not cls or v.__class__ is not cls or out.__class__ is not cls:
        return False
    if q.requires_grad or k.requires_grad or v.requires_grad or out.requires_grad:
        return False
    try:
        key = (
            _DENSE, q.shape, q.stride(), q.dtype, q.get_device(), k.shape, k.stride(), k.dtype, k.get_device(),
            v.shape, v.stride(), v.dtype, v.get_device(), out.shape, out.stride(), out.dtype, out.get_device(),
            softmax_scale, causal, window_size, softcap, num_splits, pack_gqa, softmax_scale.__class__,
            causal.__class__, softcap.__class__, num_splits.__class__, pack_gqa.__class__,
            window_size.__class__, *map(type, window_size),
        )  # fmt: skip
        entry = calls.entries.get(key)
    except TypeError:  # an unhashable or unusual argument: the full path decides
        return False
    if entry is None:
        _sight(calls, key, lambda: _prepare(rt, [q, k, v, out], None, None, None, None, None, None, None, None,
                                            softmax_scale, causal, window_size, softcap, num_splits, pack_gqa))  # fmt: skip
        return False
    if entry is _NOT_SERVED:
        calls.missed()
        return False
    pq, pk, pv, po = q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr()
    if (pq | pk | pv | po) & entry.mask:
        return False  # the full path names the misaligned tensor
    if entry.ws_slots:  # (a batched call binds no tensor-map workspace today; FA4's choice)
        ws = q.new_empty((entry.ws_slots, TENSORMAP_WORDS), dtype=_dtype("int64"))
        entry.launch(pq, pk, pv, po, ws.data_ptr(), stream=api[1](q.get_device()))
    else:
        entry.launch(pq, pk, pv, po, stream=api[1](q.get_device()))
    calls.hits += 1
    calls.recent_hits += 1
    return True


#: the first item of each function's keys (one's never equal another's)
_DENSE, _FWD, _BWD = "dense", "fwd", "bwd"
#: the backward's optional tensors, in its key's and its prepared call's order
_BWD_OPTIONAL = ("dlse", "cu_q", "cu_k", "su_q", "su_k")


def _backward_key(given: tuple[bool, ...]) -> Any:
    """The key function of :func:`backward` for one pattern of given optional tensors: every
    tensor's shape, strides, dtype and device, every scalar and its class."""
    scalars = ("max_q", "max_k", "softmax_scale", "causal", "window_size", "softcap", "deterministic")
    params = f"dout, q, k, v, out, lse, {', '.join(_BWD_OPTIONAL)}"
    return _key_function(_BWD, given, ("dout", "q", "k", "v", "out", "lse"), _BWD_OPTIONAL, params, scalars, ())


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
    served here."""
    started = _start(rt)
    if started is None:
        return None
    api, calls = started
    cls, current_stream = api
    given = (dlse is not None, cu_q is not None, cu_k is not None, su_q is not None, su_k is not None)
    make_key = _KEYS.get((_BWD, given)) or _backward_key(given)
    k_ = make_key(cls, dout, q, k, v, out, lse, dlse, cu_q, cu_k, su_q, su_k, max_q, max_k, softmax_scale, causal,
                  window_size, softcap, deterministic)  # fmt: skip
    if k_ is None:
        return None
    try:
        entry = calls.entries.get(k_)
    except TypeError:  # an unhashable argument (a list window): the full path decides
        return None
    # the prepared call's tensor order: the six always given, then the optional ones given
    tensors = [dout, q, k, v, out, lse] + [t for t in (dlse, cu_q, cu_k, su_q, su_k) if t is not None]
    if entry is None:
        scalars = (max_q, max_k, softmax_scale, causal, window_size, softcap, deterministic)
        _sight(calls, k_, lambda: _prepare_backward(rt, tensors, given, scalars, api))
        return None
    if entry is _NOT_SERVED:
        calls.missed()
        return None
    # the full path's allocations: gradients like q, k, v (q's dtype), fp32 scratch
    dq, dk, dv = q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)
    scratch = q.new_empty((entry.scratch_bytes // 4,), dtype=_dtype("float32"))
    ptrs = [t.data_ptr() for t in tensors]
    ptrs[6:6] = (dq.data_ptr(), dk.data_ptr(), dv.data_ptr())
    ptrs.append(scratch.data_ptr())
    for p, m in zip(ptrs, entry.masks):
        if p & m:
            return None  # the full path names the misaligned tensor
    entry.launch(*ptrs, stream=current_stream(q.get_device()))
    calls.hits += 1
    calls.recent_hits += 1
    return dq, dk, dv  # the scratch goes back to torch's allocator, ordered on this stream


def _dtype(name: str) -> Any:
    """torch's dtype of that name (the tensors are torch's, so torch is imported)."""
    return getattr(sys.modules.get("torch"), name, name)


def _prepare_backward(rt: Any, tensors: list[Any], given: tuple[bool, ...], scalars: tuple[Any, ...], api: Any) -> Any:
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


def _sight(calls: _Calls, key: tuple[Any, ...], prepare: Any) -> None:
    calls.missed()
    seen = calls.sighted.get(key, 0) + 1
    if seen < SIGHTINGS_TO_PREPARE:
        calls.sighted[key] = seen
        return
    calls.sighted.pop(key, None)
    try:
        prepared = prepare()
    except (Fa4aotError, NeedsBuffers, _Unserved):  # the full path raises the error / allocates per call
        calls.entries[key] = _NOT_SERVED
        return
    if isinstance(prepared, _Family):
        calls.entries[key] = prepared
        return
    if prepared._owned:  # not expected (the forward's probe refuses first; the backward binds its scratch)
        prepared.close()
        calls.entries[key] = _NOT_SERVED
        return
    calls.entries[key] = _Entry(prepared)


def clear(rt: Any) -> None:
    """Forget ``rt``'s fast calls (tests; a runtime closing)."""
    rt.api_caches.pop("fast_calls", None)
