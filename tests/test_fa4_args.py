"""FA4's argument table (fa4aot.core.fa4_args) against FA4's own source and against every fa4aot
mirror: same parameters in FA4's order with FA4's defaults, and every refused parameter refused
by name, with the table's reason, before anything runs."""

from __future__ import annotations

import ast
import importlib
import inspect
import re

import pytest

from fa4aot.core import fa4_args
from fa4aot.core.errors import ArgumentError
from fa4aot.tools import fa4_upgrade
from fa4aot.tools.fa4_keys import interface_source


def _default_text(value):
    if value is fa4_args.REQUIRED:
        return None
    return fa4_args.TORCH_BFLOAT16 if value == fa4_args.TORCH_BFLOAT16 else repr(value)


@pytest.mark.parametrize("entry", sorted(fa4_args.ENTRY_POINTS))
def test_the_table_is_fa4s_signature(entry):
    """Names, order, keyword-only-ness and defaults, read from the installed FA4's interface.py."""
    sig = fa4_upgrade.signatures(interface_source())[entry]
    table = fa4_args.ENTRY_POINTS[entry]
    assert [p.name for p in table if not p.keyword_only] == sig["positional"]
    assert [p.name for p in table if p.keyword_only] == sig["keyword_only"]
    for p in table:
        text = sig["defaults"].get(p.name)
        want = _default_text(p.default)
        if want is None:
            assert text is None, p.name
        elif want == fa4_args.TORCH_BFLOAT16:
            assert text == want, p.name
        else:
            assert ast.literal_eval(text) == p.default and type(ast.literal_eval(text)) is type(p.default), p.name


def _mirror(entry):
    module, _, attr = fa4_args.MIRRORS[entry].rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("entry", sorted(fa4_args.MIRRORS))
def test_every_mirror_takes_fa4s_parameters_in_fa4s_order(entry):
    params = list(inspect.signature(_mirror(entry)).parameters.values())
    table = fa4_args.ENTRY_POINTS[entry]
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [p.name for p in table if not p.keyword_only]
    kw = {p.name: p for p in params if p.kind is p.KEYWORD_ONLY}
    for t in table:
        mine = next(p for p in params if p.name == t.name)
        if t.keyword_only:
            assert t.name in kw, t.name
        if t.default is fa4_args.REQUIRED:
            assert mine.default is inspect.Parameter.empty, t.name
        elif t.default != fa4_args.TORCH_BFLOAT16:
            assert fa4_args.is_default(mine.default, t.default), (t.name, mine.default, t.default)


class _Marker:
    """A value no FA4 default equals."""


CALLS = [(e, p.name) for e, table in sorted(fa4_args.ENTRY_POINTS.items()) for p in table if p.use == fa4_args.REFUSED]


@pytest.mark.parametrize("entry, name", CALLS)
def test_every_refused_parameter_is_refused_by_name_before_anything_runs(entry, name):
    """A refused parameter given a value other than FA4's default raises ArgumentError naming it
    and the table's reason; the required arguments are placeholders nothing may touch first."""
    table = fa4_args.ENTRY_POINTS[entry]
    args = {p.name: object() for p in table if p.default is fa4_args.REQUIRED}
    args[name] = _Marker()
    why = next(p.why for p in table if p.name == name)
    with pytest.raises(ArgumentError, match=rf"^{name}: fa4aot does not build FA4's {name} path \({re.escape(why)}"):
        _mirror(entry)(**args, runtime=object())


@pytest.mark.parametrize("entry", ["flash_attn_func", "flash_attn_varlen_func"])
def test_the_autograd_ops_also_refuse_inference_only_parameters(entry):
    fa4aot_torch = pytest.importorskip("fa4aot.torch")
    fn = getattr(fa4aot_torch, entry)
    assert list(inspect.signature(fn).parameters) == [p.name for p in fa4_args.ENTRY_POINTS[entry]]
    for name in fa4_args.refused_names(entry, autograd=True):
        with pytest.raises(ArgumentError, match=rf"^{name}: fa4aot"):
            fn(object(), object(), object(), **{name: _Marker()})


def test_defaults_pass_through_the_refusal():
    """FA4's own defaults, passed explicitly (as engines do), are not refusals."""
    for entry, table in fa4_args.ENTRY_POINTS.items():
        fa4_args.refuse(entry, {p.name: p.default for p in table}, autograd=True)


def test_autograd_paths_name_every_refused_argument():
    """The autograd paths (traced by torch.compile, which cannot trace ``locals()``) pass the
    arguments they refuse by name, and their generated source is what a traceback shows."""
    fa4aot_torch = pytest.importorskip("fa4aot.torch")
    for entry in ("flash_attn_func", "flash_attn_varlen_func"):
        fn = getattr(fa4aot_torch, entry)
        assert "locals" not in fn.__code__.co_names, entry
        source = inspect.getsource(fn)
        for name in fa4_args.refused_names(entry, autograd=True):
            assert f"{name}={name}" in source, (entry, name)
