"""The drop-in's wrappers (:mod:`fa4aot.dropin`), generated per FA4 function: each has its
original's exact parameter list (names, kinds, default objects), so a call binds as it would to
the original, with no per-call ``inspect`` binding. The body passes every argument fa4aot's
function knows on by name, refuses an argument it does not know unless it is at the original's
default, and hands what fa4aot cannot serve to the drop-in's policy with a way to call the
original with the very arguments it got.

Parameter names come from the (already imported) FA4 functions; each is checked to be a plain
identifier before it goes into generated source. Default values never do: they are bound in the
generated function's scope.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable
from typing import Any

from fa4aot.core import gencode
from fa4aot.core.errors import ArgumentError

_P = inspect.Parameter


class CannotRoute(Exception):
    """The original's signature cannot be mapped onto fa4aot's function."""


def refuse(qualname: str, name: str, value: Any, default: Any) -> None:
    """Raise ArgumentError for an argument fa4aot's function does not take, unless ``value``
    equals the original's ``default`` (same type and equal: ``0`` is not ``False``)."""
    if value is default or (default is not None and type(value) is type(default) and value == default):
        return
    shown = repr(value) if not hasattr(value, "shape") else f"a tensor of shape {tuple(value.shape)}"
    raise ArgumentError(
        f"{name}: fa4aot does not build {qualname}'s {name} argument (got {shown[:80]}); "
        f"leave it at {default!r} or let FA4 run this call"
    )


def _tuple_arity(text: str) -> int | None:
    """Items of the outermost ``Tuple[...]`` / ``tuple[...]`` in an annotation's text."""
    start = text.find("[")
    if start < 0 or not text[:start].rstrip().lower().endswith("tuple"):
        return None
    depth, items = 0, 1
    for ch in text[start:]:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return items
        elif ch == "," and depth == 1:
            items += 1
    return None


def result_adapter(name: str, original: Callable[..., Any]) -> Callable[[Any], Any] | None:
    """How fa4aot's result becomes the original's: FA4 4.0.0b40's ``_flash_attn_fwd`` returns
    (out, lse, and three MLA outputs), older FA4s and the copies vLLM and SGLang vendor return
    (out, lse). Read from the original's return annotation; without one, a copy that takes
    ``config`` (b40 and later) returns five."""
    if name != "_flash_attn_fwd":
        return None
    try:
        sig = inspect.signature(original)
    except (TypeError, ValueError):
        return None
    ann = sig.return_annotation
    arity = None if ann is sig.empty else _tuple_arity(ann if isinstance(ann, str) else repr(ann))
    if arity is None:
        arity = 5 if "config" in sig.parameters else 2
    if arity >= 5:
        return None
    if arity < 2:
        raise CannotRoute(f"it returns {arity} value(s); fa4aot's _flash_attn_fwd returns (out, lse, ...)")
    return lambda res: res[:arity]


def _params_source(sig: inspect.Signature, scope: dict[str, Any]) -> str:
    """The original's parameter list as source; its defaults go into ``scope``."""
    parts: list[str] = []
    seen_star = seen_posonly = False
    for i, p in enumerate(sig.parameters.values()):
        if not p.name.isidentifier() or keyword.iskeyword(p.name) or p.name.startswith("__w_"):
            raise CannotRoute(f"parameter name {p.name!r}")
        if p.kind is _P.POSITIONAL_ONLY:
            seen_posonly = True
        elif seen_posonly:
            parts.append("/")
            seen_posonly = False
        if p.kind is _P.KEYWORD_ONLY and not seen_star:
            parts.append("*")
            seen_star = True
        text = p.name
        if p.kind is _P.VAR_POSITIONAL:
            text, seen_star = "*" + p.name, True
        elif p.kind is _P.VAR_KEYWORD:
            text = "**" + p.name
        elif p.default is not p.empty:
            scope[f"__w_d{i}"] = p.default
            text = f"{p.name}=__w_d{i}"
        parts.append(text)
    if seen_posonly:
        parts.append("/")
    return ", ".join(parts)


def _call_original_source(sig: inspect.Signature) -> str:
    """Arguments that call the original exactly as the wrapper was called."""
    out = []
    for p in sig.parameters.values():
        if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD):
            out.append(p.name)
        elif p.kind is _P.VAR_POSITIONAL:
            out.append("*" + p.name)
        elif p.kind is _P.KEYWORD_ONLY:
            out.append(f"{p.name}={p.name}")
        else:
            out.append("**" + p.name)
    return ", ".join(out)


def _forward_source(sig: inspect.Signature, target: inspect.Signature) -> tuple[list[str], list[str]]:
    """(lines checking the arguments fa4aot does not take, keyword arguments for fa4aot's function)."""
    takes = {n for n, p in target.parameters.items() if p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)}
    target_varkw = any(p.kind is _P.VAR_KEYWORD for p in target.parameters.values())
    # the leading arguments both functions take in the same positions go positionally (a call with
    # ~40 keywords costs microseconds; FA4's and fa4aot's functions share their parameter order)
    positional = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
    prefix = 0
    for p, tp in zip(sig.parameters.values(), target.parameters.values()):
        if p.name != tp.name or p.kind not in positional or tp.kind not in positional:
            break
        prefix += 1
    checks, passed = [], []
    for i, p in enumerate(sig.parameters.values()):
        if i < prefix:
            passed.append(p.name)
            continue
        if p.kind is _P.VAR_POSITIONAL:
            checks.append(f"        if {p.name}: __w_refuse(__w_q, '*{p.name}', {p.name}, ())")
        elif p.kind is _P.VAR_KEYWORD:
            if target_varkw:
                passed.append("**" + p.name)
            else:
                checks.append(f"        if {p.name}: __w_refuse(__w_q, next(iter({p.name})), {p.name}, {{}})")
        elif p.name in takes:
            passed.append(f"{p.name}={p.name}")
        elif p.default is p.empty:
            raise CannotRoute(f"fa4aot's function has no parameter for the required argument {p.name!r}")
        else:
            checks.append(f"        if {p.name} is not __w_d{i}: __w_refuse(__w_q, {p.name!r}, {p.name}, __w_d{i})")
    required = [
        n for n, p in target.parameters.items()
        if p.default is p.empty and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)
    ]  # fmt: skip
    missing = [n for n in required if n not in sig.parameters]
    if missing:
        raise CannotRoute(f"fa4aot's function needs {', '.join(missing)}, which the original does not take")
    return checks, passed


def _original_caller(
    sig: inspect.Signature, original: Callable[..., Any], fixup: Callable[[dict[str, Any]], dict[str, Any]] | None
) -> Callable[..., Any]:
    """``call(named, varargs, varkw)``: the original called with a call's arguments by name
    (``fixup`` first adapts them for FA4: the fallback path only)."""
    ps = list(sig.parameters.values())
    positional = [p.name for p in ps if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    kwonly = [p.name for p in ps if p.kind is _P.KEYWORD_ONLY]

    def call(named: dict[str, Any], varargs: tuple = (), varkw: dict[str, Any] | None = None) -> Any:
        if fixup is not None:
            named = fixup(named)
        kwargs = {n: named[n] for n in kwonly}
        kwargs.update(varkw or {})
        return original(*[named[n] for n in positional], *varargs, **kwargs)

    return call


def passes_through(sig: inspect.Signature, target: inspect.Signature) -> bool:
    """Whether a call to the original can go to ``target`` unchanged (``*args, **kwargs``): every
    parameter of the original is the target's, in the same place, of the same kind and with the
    same default. True for FA4 4.0.0b40 and fa4aot's functions (fa4aot adds keyword-only ones)."""
    tparams = list(target.parameters.values())
    for i, p in enumerate(sig.parameters.values()):
        if p.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
            return False
        tp = target.parameters.get(p.name)
        if tp is None or tp.kind is not p.kind or (p.kind is not _P.KEYWORD_ONLY and tparams[i] is not tp):
            return False
        d, td = p.default, tp.default
        if not (d is td or (type(d) is type(td) and d == td)):
            return False
    return True


def _passthrough_lines(adapt_result: bool) -> list[str]:
    call = "__w_target(*args, **kwargs)"
    return [
        "def wrapper(*args, **kwargs):",
        "    if __w_local.__dict__.get('in_fa4'):",
        "        return __w_orig(*args, **kwargs)",
        "    try:",
        f"        return {'__w_result(' + call + ')' if adapt_result else call}",
        "    except __w_misses as __w_e:",
        "        return __w_on_miss(__w_q, __w_e, lambda: __w_call(args, kwargs))",
    ]


def _bound_caller(
    sig: inspect.Signature, original: Callable[..., Any], fixup: Callable[[dict[str, Any]], dict[str, Any]] | None
) -> Callable[..., Any]:
    """``call(args, kwargs)``: the original called as the wrapper was (``fixup`` adapting the
    arguments by name first: the fallback path only, so binding here costs nothing per call)."""

    def call(args: tuple, kwargs: dict[str, Any]) -> Any:
        if fixup is None:
            return original(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        bound.arguments.update(fixup(dict(bound.arguments)))
        return original(*bound.args, **bound.kwargs)

    return call


def make_wrapper(
    qualname: str,
    original: Callable[..., Any],
    target: Callable[..., Any],
    *,
    result: Callable[[Any], Any] | None,
    fixup: Callable[[dict[str, Any]], dict[str, Any]] | None,
    on_miss: Callable[[str, BaseException, Callable[[], Any]], Any],
    local: Any,
    misses: tuple[type[BaseException], ...],
) -> Callable[..., Any]:
    """A function with ``original``'s signature that calls ``target`` (``result`` adapts what it
    returns), hands an exception in ``misses`` to ``on_miss`` with a way to call ``original``, and
    calls ``original`` directly while ``local.in_fa4`` is set (FA4 running its own code)."""
    try:
        sig, tsig = inspect.signature(original), inspect.signature(target)
    except (TypeError, ValueError) as e:
        raise CannotRoute(f"no signature: {e}") from None
    scope: dict[str, Any] = {
        "__w_target": target, "__w_orig": original, "__w_local": local, "__w_misses": misses,
        "__w_on_miss": on_miss, "__w_refuse": refuse, "__w_result": result, "__w_q": qualname,
        "__w_call": _original_caller(sig, original, fixup),
    }  # fmt: skip
    if passes_through(sig, tsig):
        lines = _passthrough_lines(result is not None)
        scope["__w_call"] = _bound_caller(sig, original, fixup)
        return _finish(lines, scope, qualname, original, target, sig)
    params = _params_source(sig, scope)
    checks, passed = _forward_source(sig, tsig)
    ps = list(sig.parameters.values())
    named = ", ".join(f"{p.name!r}: {p.name}" for p in ps if p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD))
    varargs = next((p.name for p in ps if p.kind is _P.VAR_POSITIONAL), "()")
    varkw = next((p.name for p in ps if p.kind is _P.VAR_KEYWORD), "None")
    call = f"__w_target({', '.join(passed)})"
    lines = [
        f"def wrapper({params}):",
        "    if __w_local.__dict__.get('in_fa4'):",
        f"        return __w_orig({_call_original_source(sig)})",
        "    try:",
        *checks,
        f"        return {'__w_result(' + call + ')' if result is not None else call}",
        "    except __w_misses as __w_e:",
        f"        return __w_on_miss(__w_q, __w_e, lambda: __w_call({{{named}}}, {varargs}, {varkw}))",
    ]
    return _finish(lines, scope, qualname, original, target, None)


def _finish(
    lines: list[str],
    scope: dict[str, Any],
    qualname: str,
    original: Callable[..., Any],
    target: Callable[..., Any],
    signature: inspect.Signature | None,
) -> Callable[..., Any]:
    """Compile the wrapper and give it the original's names (and, for a pass-through wrapper, its
    signature for introspection)."""
    gencode.run("\n".join(lines) + "\n", scope, "drop-in wrapper")
    wrapper = scope["wrapper"]
    if signature is not None:
        wrapper.__signature__ = signature
    wrapper.__name__ = getattr(original, "__name__", "wrapper")
    wrapper.__qualname__ = getattr(original, "__qualname__", wrapper.__name__)
    wrapper.__module__ = getattr(target, "__module__", __name__)
    wrapper.__doc__ = f"{qualname}, routed to fa4aot ({wrapper.__module__}.{target.__name__}) by fa4aot.patch()."
    wrapper.__fa4aot_original__ = original
    wrapper.__fa4aot_target__ = target
    return wrapper
