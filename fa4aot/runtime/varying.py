"""Prepared forwards whose batch and max_seqlen_q/k change from call to call
(``prepare_forward(..., varying=True)``): a serving engine's layer call, bound once for its
tensors' shapes and its scalar arguments, then called with new sequence tensors (any batch) and
new max_seqlens on every step, without a prepared call per bucket.

PyTorch calls are served by the fast path's family of the bound call (:mod:`.fastpath`): FA4's
decision for the call's (batch, max_seqlen_q, max_seqlen_k) is the last one while the values stay
in its traced region (:mod:`.regions`), and is taken again - from the rule's memo or another
region, or by the full path's selection - only when they cross one of its boundaries; each
decision's prepared form is made once and launched with the values as per-call words. Calls of
another framework's tensors (CuPy, JAX, raw pointers) are launched from a family of their own the
same way, their tensors described and compared with the bound ones on every call, FA4's tensor-map
workspace the launch stream's buffer (:func:`~fa4aot.runtime.workspaces.stream_workspace`), as the
full path gives such calls. A call neither serves (a decision whose launch would own buffers -
split-KV partials, scheduler metadata - or a local window's exact edges, a PyTorch call given a
``stream``) runs the full path, which checks everything and allocates what the call needs, as
:func:`fa4aot.flash_attn_varlen_func` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fa4aot.core import gencode
from fa4aot.runtime import fastpath
from fa4aot.runtime.forward import forward
from fa4aot.runtime.frameworks import default_stream, framework
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.prepared import misaligned_test, refuse_unlike
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor, stream_handle
from fa4aot.runtime.workspaces import stream_workspace

#: The sequence tensors, whose length (the batch) may change from call to call.
SEQUENCES = ("cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k")
#: The optional tensors in the order a call takes them (those given at prepare time).
OPTIONAL = (*SEQUENCES, "page_table", "learnable_sink")
#: The fast path's tensor parameters of a forward call, in its serve's order.
_SERVE_TENSORS = ("q", "k", "v", "out", "cu_q", "cu_k", "su_q", "su_k", "page_table", "sink")


class VaryingForward:
    """``prepared(q, k, v, out[, cu_seqlens_q][, cu_seqlens_k][, seqused_q][, seqused_k]
    [, page_table][, learnable_sink], max_seqlen_q=, max_seqlen_k=, stream=None)``: the bound
    forward for this call's tensors (shaped like the prepared ones, the sequence tensors of any
    common batch) and max_seqlens (default: the values given at prepare time). A tensor whose
    shape (but a sequence tensor's length), strides, dtype or device differ from the prepared
    one raises :class:`~fa4aot.ArgumentError` and launches nothing."""

    def __init__(self, rt: Runtime, tensors: dict[str, Any], descs: dict[str, DeviceTensor], scalars: tuple[Any, ...],
                 max_q: int | None, max_k: int | None):  # fmt: skip
        self.runtime = rt
        self.arg_names = ("q", "k", "v", "out", *(n for n in OPTIONAL if n in tensors))
        self._descs = [descs[n] for n in self.arg_names]
        args = (*(tensors.get(n) for n in ("q", "k", "v", "out", *OPTIONAL)), max_q, max_k, *scalars)
        #: the fast path's family serving this call's PyTorch calls (None: every call takes the full path)
        self.family = fastpath.bind_forward(rt, args)
        #: the family serving calls of another framework's tensors (None: PyTorch's, or none served)
        torch = self.family is not None or framework(tensors["q"]) == "torch"
        self.other = None if torch else fastpath.bind_family(rt, args)
        self._served_other = [0]
        run = self._generate(scalars, max_q, max_k)
        self.__class__ = type("VaryingForward", (VaryingForward,), {"__call__": staticmethod(run), "__slots__": ()})

    @classmethod
    def bind(cls, fc: Any, od: DeviceTensor, given: dict[str, Any]) -> VaryingForward:
        """The varying form of prepare_forward's checked call ``fc`` (``od``: out's descriptor;
        ``given``: prepare_forward's arguments by name)."""
        descs = dict(q=fc.q, k=fc.k, v=fc.v, out=od, cu_seqlens_q=fc.cu_q, cu_seqlens_k=fc.cu_k, seqused_q=fc.su_q,
                     seqused_k=fc.su_k, page_table=fc.page_table, learnable_sink=fc.learnable_sink)  # fmt: skip
        tensors = {n: given[n] for n in descs if given[n] is not None}
        scalars = tuple(
            given[n] for n in ("softmax_scale", "causal", "window_size", "softcap", "num_splits", "pack_gqa")
        )
        return cls(fc.rt, tensors, descs, scalars, given["max_seqlen_q"], given["max_seqlen_k"])

    def __call__(self, *tensors: Any, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                 stream: Any = None) -> None:  # fmt: skip
        """(replaced per instance by the generated function)"""
        raise NotImplementedError

    @property
    def other_calls(self) -> int:
        """Calls of another framework's tensors launched from :attr:`other` (the rest took the
        full path)."""
        return self._served_other[0]

    @property
    def served(self) -> bool:
        """Whether PyTorch calls are launched from the fast path's family (else the full path)."""
        return self.family is not None

    def _generate(self, scalars: tuple[Any, ...], max_q: int | None, max_k: int | None) -> Callable[..., None]:
        """``run(<tensors>, max_seqlen_q=, max_seqlen_k=, stream=None)``: the family's serve, the
        decision made for new values, else the checks and the full path."""
        given = self.arg_names[4:]
        params = ["q", "k", "v", "out", *(f"a_{n}" for n in given)]
        by_name = dict(zip(self.arg_names, params))
        opt = [by_name.get(n, "None") for n in OPTIONAL]
        cu_q, cu_k, su_q, su_k, pt, sink = opt
        scope: dict[str, Any] = {
            "_mq": max_q, "_mk": max_k, "_rt": self.runtime, "_check": self._check, "_forward": forward,
            "_decided": fastpath.decided, "_fam": self.family, "_sc": scalars,
            "_serve": None if self.family is None else self.family.serve,
            "_other": None if self.other is None else self._other_function(scalars, (max_q.__class__, max_k.__class__)),
        }  # fmt: skip
        sc = ", ".join(f"_sc[{i}]" for i in range(len(scalars)))
        served = f"q, k, v, out, {', '.join(opt)}, max_seqlen_q, max_seqlen_k, {sc}"
        softmax_scale, causal, window, softcap, num_splits, pack_gqa = (f"_sc[{i}]" for i in range(6))
        lines = [f"def run({', '.join(params)}, max_seqlen_q=_mq, max_seqlen_k=_mk, stream=None):"]
        if self.family is not None:
            lines += [
                "    if stream is None:",
                f"        r = _serve({served})",
                "        if r == 1 or r == -2 and _decided(_rt, _fam, (" + served + ")):",
                "            return None",
                "        if r == -1:",
                f"            _check({', '.join(params)})",
            ]
        elif self.other is not None:
            lines += [
                f"    if _other({', '.join(params)}, max_seqlen_q, max_seqlen_k, stream):",
                "        return None",
                f"    _check({', '.join(params)})",
            ]
        else:
            lines.append(f"    _check({', '.join(params)})")
        lines += [
            f"    _forward(_rt, q, k, v, {cu_q}, {cu_k}, max_seqlen_q, max_seqlen_k, {su_q}, {su_k}, {softmax_scale},",
            f"             {causal}, {window}, {num_splits}, {pack_gqa}, False, out, None, stream, {pt}, {sink},",
            f"             {softcap})",
            "    return None",
        ]
        gencode.run("\n".join(lines), scope, "varying prepared forward")
        return scope["run"]

    def _other_function(self, scalars: tuple[Any, ...], classes: tuple[type, type]) -> Callable[..., bool]:
        """``other(<tensors>, max_q, max_k, stream) -> bool``: launch a call of another
        framework's tensors from :attr:`other`'s prepared form of FA4's decision for its (batch,
        max_seqlen_q, max_seqlen_k) - each tensor described and compared with the bound one, the
        workspace the launch stream's buffer, as the full path gives such calls; False: the full
        path takes it (a tensor unlike the bound one, sequence lengths that disagree, a max_seqlen
        of another class than the bound one's, a decision not served here, a misaligned address)
        and names what is wrong."""
        fam = self.other
        names = [fastpath.PARAM_OF.get(n, n) for n in self.arg_names]  # (the fast path's: q, cu_q, ...)
        scope: dict[str, Any] = {
            "_desc": as_device_tensor, "_fam": fam, "_advance": fastpath.advance_function(fam, classes),
            "_prepare": fastpath.prepare_from, "_rt": self.runtime, "_sc": scalars, "_cq": classes[0], "_ck": classes[1],
            "_default": default_stream, "_handle": stream_handle, "_ws": stream_workspace, "_n": self._served_other,
        }  # fmt: skip
        lines = [f"def other({', '.join(f'a_{n}' for n in names)}, max_q, max_k, stream):",
                 "    if max_q.__class__ is not _cq or max_k.__class__ is not _ck:", "        return False"]  # fmt: skip
        for i, (name, n, want) in enumerate(zip(self.arg_names, names, self._descs)):
            lines.append(f"    {n} = _desc(a_{n}, {name!r})")
            if name in SEQUENCES:  # (any length)
                scope[f"_g{i}"] = (want[2], want[3], want[4], want[5])
                lines.append(f"    if len({n}[1]) != 1 or ({n}[2], {n}[3], {n}[4], {n}[5]) != _g{i}:")
            else:
                scope[f"_g{i}"] = (want[1], want[2], want[3], want[4], want[5])
                lines.append(f"    if ({n}[1], {n}[2], {n}[3], {n}[4], {n}[5]) != _g{i}:")
            lines.append("        return False")
        lines += fastpath.batch_lines(fam.pinned, fam.seqs, "False")
        serve_args = ", ".join(n if n in names else "None" for n in _SERVE_TENSORS)
        lines += [
            "    last = _advance(b, max_q, max_k)  # (the last decision, or its region's)",
            "    if last is None:",
            "        if b < 1:",
            "            return False",
            f"        last = _fam.step((b, max_q, max_k), lambda: _prepare(_rt, ({serve_args}, max_q, max_k, *_sc)))",
            "        if last is None:",
            "            return False",
            "    e = last[1]",
            "    vb, vq, vk, vs = last[2]",
        ]
        ptrs = [f"{n}[0]" for n in fam.names]
        cond = misaligned_test(ptrs, fam.masks)
        lines += [f"    if {cond}:", "        return False"] if cond else []
        lines += [
            f"    st = _default(a_{names[0]}) if stream is None else _handle(stream)",
            "    if e.ws_slots:",
            f"        e.launch({', '.join(ptrs)}, _ws(_rt, st, vs)[0], st, vb, vq, vk, vs)",
            "    else:",
            f"        e.launch({', '.join(ptrs)}, st, vb, vq, vk, vs)",
            "    _n[0] += 1",
            "    return True",
        ]
        gencode.run("\n".join(lines), scope, "varying prepared forward, other frameworks")
        return scope["other"]

    def _check(self, *tensors: Any) -> None:
        """Raise :class:`~fa4aot.ArgumentError` for the first tensor that differs from the
        prepared one (a sequence tensor: but for its length); the full path checks the rest."""
        for name, obj, want in zip(self.arg_names, tensors, self._descs):
            refuse_unlike(name, as_device_tensor(obj, name), want, free_length=name in SEQUENCES)

    def close(self) -> None:
        """Nothing to free (the family's prepared forms own no buffers)."""
