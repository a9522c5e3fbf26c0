"""FA4's forward decision reused across shapes it cannot tell apart: a call whose shapes change
every time (a serving engine's max_seqlen_k grows by one each decode step, its batch changes)
pays FA4's selection once per *region*, not once per shape.

FA4's selection is a pure function of the call's facts. Tracing runs it once with the changing
facts (batch, token totals and capacities, max_seqlen_q/k) as :class:`Sym` numbers that behave
like the ints they hold and note what the selection does with them: every comparison and its
outcome, and every value that leaves arithmetic (``int()``, ``hash()``, formatting, a field of the
chosen config or plan) pinned to what it was. Another call whose facts satisfy every note follows
the same path through FA4's code and gets the same decision - checked by a function generated
from the notes (straight-line arithmetic and comparisons, a few microseconds). Nothing is
restated from FA4: its own code draws the regions.

Tracing costs about four plain selections (CPU: ~110-145 us against ~35-40 us), so a rule whose
regions are seldom reused (a new region for most new shapes) stops tracing after
:data:`GIVE_UP_AFTER` traces (its regions still answer). Any failure while tracing (an exception, an
operation a :class:`Sym` cannot follow) falls back to the plain decision.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import threading
from collections.abc import Callable
from typing import Any

from fa4aot.core import gencode
from fa4aot.core.bounded import BoundedDict

#: The shape facts traced as numbers (the rest - window, page size, requested splits, which facts
#: are None - is part of the region's key).
TRACED = ("batch", "total_q", "total_k", "q_capacity", "k_capacity", "max_seqlen_q", "max_seqlen_k")
#: Regions a rule keeps per key (most recently used first), and keys it keeps.
MAX_REGIONS = 16
MAX_KEYS = 64
#: Traces after which a rule stops tracing unless its regions were reused REUSES_PER_TRACE times
#: per trace (a trace costs about four plain selections; a warm-up's distinct shapes fit below).
GIVE_UP_AFTER = 32
REUSES_PER_TRACE = 2
#: Notes a trace may take before it is abandoned (a selection that loops over its inputs).
MAX_NOTES = 400

_NUMBER = (int, float, bool)


class Untraceable(Exception):
    """The selection did something with a traced number that a region cannot capture."""


class _Tape:
    """What one trace saw: arithmetic (``t3 = t1 * 8``) and conditions that must hold."""

    __slots__ = ("ops", "conds")

    def __init__(self) -> None:
        self.ops: list[tuple[str, str]] = []  # (name, expression)
        self.conds: list[str] = []

    def value(self, expr: str, v: Any) -> Sym:
        name = f"t{len(self.ops)}"
        self.ops.append((name, expr))
        if len(self.ops) + len(self.conds) > MAX_NOTES:
            raise Untraceable("too many operations")
        return Sym(v, name, self)

    def cond(self, text: str) -> None:
        self.conds.append(text)
        if len(self.ops) + len(self.conds) > MAX_NOTES:
            raise Untraceable("too many conditions")


def _operand(x: Any) -> tuple[Any, str] | None:
    if isinstance(x, Sym):
        return x.v, x.r
    if x.__class__ in _NUMBER:
        return x, repr(x)
    return None


def _binary(sym: str, fn: Callable[[Any, Any], Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def fwd(a: Sym, b: Any) -> Any:
        o = _operand(b)
        if o is None:
            return NotImplemented
        return a.t.value(f"{a.r} {sym} {o[1]}", fn(a.v, o[0]))

    def rev(a: Sym, b: Any) -> Any:
        o = _operand(b)
        if o is None:
            return NotImplemented
        return a.t.value(f"{o[1]} {sym} {a.r}", fn(o[0], a.v))

    return fwd, rev


def _compare(sym: str, fn: Callable[[Any, Any], bool]) -> Callable[..., Any]:
    def cmp(a: Sym, b: Any) -> Any:
        o = _operand(b)
        if o is None:
            return NotImplemented
        result = fn(a.v, o[0])
        text = f"{a.r} {sym} {o[1]}"
        a.t.cond(text if result else f"not ({text})")
        return result

    return cmp


#: The arithmetic a :class:`Sym` traces: each operator's symbol in the generated check, and the
#: stem of its methods (``__add__`` and the reflected ``__radd__`` for ``+``) and of its function
#: in :mod:`operator`.
_ARITHMETIC = {
    "+": "add",
    "-": "sub",
    "*": "mul",
    "//": "floordiv",
    "/": "truediv",
    "%": "mod",
    "**": "pow",
    "&": "and",
    "|": "or",
    "^": "xor",
    "<<": "lshift",
    ">>": "rshift",
}


def _with_arithmetic(cls: type) -> type:
    """``cls`` given the traced :data:`_ARITHMETIC` (set after its body: a loop there cannot bind
    computed names)."""
    for sym, stem in _ARITHMETIC.items():
        fwd, rev = _binary(sym, getattr(operator, f"__{stem}__"))
        setattr(cls, f"__{stem}__", fwd)
        setattr(cls, f"__r{stem}__", rev)
    return cls


@_with_arithmetic
class Sym:
    """A traced number: its value ``v``, its name ``r`` in the generated check, its tape ``t``.
    ``isinstance(sym, int)`` holds for an int value (``__class__``), as the selection expects."""

    __slots__ = ("v", "r", "t")

    def __init__(self, v: Any, r: str, t: _Tape):
        self.v, self.r, self.t = v, r, t

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - isinstance() sees the value's type
        return type(self.v)

    def pin(self) -> Any:
        """The value, with the condition that it stays this value."""
        self.t.cond(f"{self.r} == {self.v!r}")
        return self.v

    __lt__ = _compare("<", operator.lt)
    __le__ = _compare("<=", operator.le)
    __gt__ = _compare(">", operator.gt)
    __ge__ = _compare(">=", operator.ge)
    __eq__ = _compare("==", operator.eq)  # type: ignore[assignment]
    __ne__ = _compare("!=", operator.ne)  # type: ignore[assignment]

    def __neg__(self) -> Sym:
        return self.t.value(f"-{self.r}", -self.v)

    def __pos__(self) -> Sym:
        return self

    def __abs__(self) -> Sym:
        return self.t.value(f"abs({self.r})", abs(self.v))

    def __bool__(self) -> bool:
        result = bool(self.v)
        self.t.cond(f"{self.r} != 0" if result else f"{self.r} == 0")
        return result

    def __ceil__(self) -> Sym:
        return self.t.value(f"_ceil({self.r})", math.ceil(self.v))

    def __floor__(self) -> Sym:
        return self.t.value(f"_floor({self.r})", math.floor(self.v))

    # leaving arithmetic: the value is pinned
    def __index__(self) -> int:
        return operator.index(self.pin())

    def __int__(self) -> int:
        return int(self.pin())

    def __float__(self) -> float:
        return float(self.pin())

    def __hash__(self) -> int:
        return hash(self.pin())

    def __repr__(self) -> str:
        return repr(self.pin())

    def __format__(self, spec: str) -> str:
        return format(self.pin(), spec)

    def __round__(self, n: int | None = None) -> Any:
        return round(self.pin(), n)


def concrete(obj: Any, depth: int = 0) -> Any:
    """``obj`` with every :class:`Sym` inside (dataclass fields, NamedTuple and tuple items, dict
    values) replaced by its pinned value."""
    if depth > 6:
        raise Untraceable("nested too deep")
    if isinstance(obj, Sym):
        return obj.pin()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            c = concrete(v, depth + 1)
            if c is not v:
                changes[f.name] = c
        return dataclasses.replace(obj, **changes) if changes else obj
    if isinstance(obj, tuple):
        items = [concrete(x, depth + 1) for x in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return obj._make(items) if hasattr(obj, "_make") else tuple(items)
    if isinstance(obj, dict):
        return {k: concrete(v, depth + 1) for k, v in obj.items()}
    return obj


def _needed(tape: _Tape) -> list[tuple[str, str]]:
    """The operations the conditions depend on, in order."""
    want = set(re.findall(r"\bt\d+\b", " ".join(tape.conds)))
    keep = []
    for name, expr in reversed(tape.ops):
        if name in want:
            keep.append((name, expr))
            want.update(re.findall(r"\bt\d+\b", expr))
    return keep[::-1]


def checker(tape: _Tape, names: tuple[str, ...]) -> Callable[..., bool]:
    """A function of the traced facts that is True where every condition of ``tape`` holds."""
    lines = [f"def check({', '.join(names)}):"]
    lines += [f"    {name} = {expr}" for name, expr in _needed(tape)]
    lines.append("    return " + (" and ".join(f"({c})" for c in tape.conds) or "True"))
    scope: dict[str, Any] = {"_ceil": math.ceil, "_floor": math.floor, "inf": math.inf, "nan": math.nan}
    gencode.run("\n".join(lines) + "\n", scope, "decision region")
    return scope["check"]


def trace(decide: Callable[[dict[str, Any]], Any], facts: dict[str, Any]) -> tuple[Any, Callable[..., bool]]:
    """Run ``decide`` on ``facts`` with the :data:`TRACED` ones as :class:`Sym` numbers: returns
    its concrete result and the region's check (a function of the traced facts, by name)."""
    tape = _Tape()
    names = tuple(n for n in TRACED if facts.get(n) is not None)
    traced = dict(facts)
    for n in names:
        tape.ops.append((n, n))  # inputs are named after the facts in the check
        traced[n] = Sym(facts[n], n, tape)
    result = concrete(decide(traced))
    return result, checker(tape, names)


class Regions:
    """A rule's regions: key -> [(check, decision)], most recently used first; thread-safe."""

    __slots__ = ("by_key", "traces", "reuses", "failures", "lock", "enabled")

    def __init__(self) -> None:
        self.by_key: BoundedDict = BoundedDict(MAX_KEYS)
        self.traces = 0
        self.reuses = 0
        self.failures = 0
        self.lock = threading.Lock()
        self.enabled = True

    def failed(self) -> None:
        """A trace that did not finish (FA4 rejected the call, or a step it cannot follow)."""
        self.failures += 1
        if self.failures >= GIVE_UP_AFTER and self.reuses < REUSES_PER_TRACE * (self.traces + self.failures):
            self.enabled = False

    def find(self, key: Any, values: tuple[int, ...]) -> Any:
        """The decision of a region holding ``values`` (the traced facts in order), or None."""
        got = self.match(key, values)
        return None if got is None else got[1]

    def match(self, key: Any, values: tuple[int, ...]) -> tuple[Callable[..., bool], Any] | None:
        """(check, decision) of a region holding ``values``, or None (:meth:`find`)."""
        regions = self.by_key.get(key)
        if not regions:
            return None
        for i, (check, decision) in enumerate(regions):
            try:
                hit = check(*values)
            except Exception:  # noqa: BLE001 - arithmetic outside the region (a zero divisor): not in it
                hit = False
            if hit:
                if i:
                    with self.lock:
                        if i < len(regions) and regions[i][0] is check:
                            regions.insert(0, regions.pop(i))
                self.reuses += 1
                return check, decision
        return None

    def add(self, key: Any, check: Callable[..., bool], decision: Any) -> None:
        with self.lock:
            regions = self.by_key.setdefault(key, [])
            regions.insert(0, (check, decision))
            del regions[MAX_REGIONS:]
            self.traces += 1
            if self.traces >= GIVE_UP_AFTER and self.reuses < REUSES_PER_TRACE * self.traces:
                self.enabled = False
