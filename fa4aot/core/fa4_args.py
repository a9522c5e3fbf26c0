"""FA4's public arguments in one table: for each entry point fa4aot mirrors, every parameter of
FA4 4.0.0b40's signature in FA4's order with FA4's default, and what fa4aot does with it.

* ``SERVED``: fa4aot takes it as FA4 does.
* ``REFUSED``: a path fa4aot does not build; a value other than FA4's default is an
  :class:`~fa4aot.core.errors.ArgumentError` naming the parameter and why (:func:`refuse`).
* ``IGNORED``: FA4 itself ignores it on the paths fa4aot builds (the reason says why).
* ``INFERENCE``: served by the runtime's forward, refused by the autograd ops (``fa4aot.torch``,
  and the drop-in under autograd): FA4 has no backward for it.

The mirrors' signatures, their refusals and messages, the drop-in's autograd refusals and the
upgrade report (``fa4aot.tools.fa4_upgrade``, which compares a new FA4's source with this table)
all read it; tests/test_fa4_args.py checks FA4's source and every mirror against it.
"""

from __future__ import annotations

import dataclasses
import functools
import textwrap
from collections.abc import Mapping
from typing import Any, NamedTuple

from fa4aot.core.errors import ArgumentError

SERVED = "served"
REFUSED = "refused"
IGNORED = "ignored"
INFERENCE = "inference"


class _Required:
    def __repr__(self) -> str:
        return "<required>"


#: The default of a parameter FA4 requires.
REQUIRED: Any = _Required()
#: FA4's ``torch.bfloat16`` default (get_scheduler_metadata's ``dtype``), by name: no torch here.
TORCH_BFLOAT16 = "torch.bfloat16"


class Param(NamedTuple):
    """One parameter of an FA4 entry point."""

    name: str
    default: Any = REQUIRED
    use: str = SERVED
    why: str = ""
    keyword_only: bool = False


#: Why fa4aot refuses each FA4 path (shared by the entry points that take the parameter).
WHY = {
    "qv": "FA4's MLA path (qv)",
    "gather_kv_indices": "FA4's sparse path (gathered K/V)",
    "score_mod": "a score_mod (fa4aot compiles FA4's softcap one: pass softcap=)",
    "score_mod_bwd": "a score_mod's backward",
    "mask_mod": "a mask_mod",
    "aux_tensors": "a score/mask mod's aux tensors",
    "aux_scalars": "a score/mask mod's aux scalars",
    "block_sparse_tensors": "block sparsity",
    "block_sparse_tensors_bwd": "block sparsity",
    "gather_bwd_recompute_p": "the gathered backward",
    "gather_bwd_token_chunk": "the gathered backward",
    "seqlen_k_per_split": "a fixed seqlen_k_per_split",
    "disable_scheduler_metadata": "FA4 without its scheduler metadata",
    "V_in_regs": "SM80's V-in-registers backward",
    "q_stage": "the prepare kernel for two Q stages",
    "cluster_shape_m": "the prepare kernel for clusters",
    "enable_pdl": "programmatic dependent launch",
    "sort": "sorted (LPT) scheduler metadata",
    "seqlen_k_new": "appended K/V (seqlen_k_new)",
    "cu_seqlens_k_new": "appended K/V (cu_seqlens_k_new)",
    "leftpad_k": "left-padded K",
    "virtual_batch_idx": "MLA's virtual batches",
    "semaphore_to_reset": "a combine that resets a semaphore",
    "config_bwd": "an explicit BwdConfig",
}
#: Why the autograd ops refuse an inference-only path.
NO_BACKWARD = "FA4 has no backward for it"


def _p(name: str, default: Any = REQUIRED, use: str = SERVED, why: str = "", *, kw: bool = False) -> Param:
    if use == REFUSED and not why:
        why = WHY[name]
    return Param(name, default, use, why, kw)


def _refused(*names: str, default: Any = None) -> tuple[Param, ...]:
    return tuple(_p(n, default, REFUSED) for n in names)


_IGNORED_MIN_SEQLEN_K = _p("min_seqlen_k", None, IGNORED, "only FA4's sparse path reads it")
_FWD_DETERMINISTIC = _p("deterministic", False, SERVED, "concerns the backward (fa4aot.torch takes it)")

#: FA4 4.0.0b40 interface.py ``flash_attn_func``.
FLASH_ATTN_FUNC = (
    _p("q"), _p("k"), _p("v"), *_refused("qv", "gather_kv_indices"), _p("softmax_scale", None), _p("causal", False),
    _p("window_size", (None, None)), _p("learnable_sink", None), _p("softcap", 0.0), _p("num_splits", 1),
    _p("pack_gqa", None), _FWD_DETERMINISTIC,
    *_refused("score_mod", "score_mod_bwd", "mask_mod", "aux_tensors", "aux_scalars", "block_sparse_tensors",
              "block_sparse_tensors_bwd"),
    _p("return_lse", False), _p("gather_bwd_recompute_p", False, REFUSED), *_refused("gather_bwd_token_chunk"),
    _p("config", None, INFERENCE, NO_BACKWARD), _p("scales", None, INFERENCE, "FP8 and MXFP8 are forward-only"),
)  # fmt: skip

#: FA4 4.0.0b40 interface.py ``flash_attn_varlen_func``.
FLASH_ATTN_VARLEN_FUNC = (
    _p("q"), _p("k"), _p("v"), *_refused("qv"), _p("cu_seqlens_q", None), _p("cu_seqlens_k", None),
    _p("max_seqlen_q", None), _p("max_seqlen_k", None), _IGNORED_MIN_SEQLEN_K, _p("seqused_q", None),
    _p("seqused_k", None), *_refused("gather_kv_indices"), _p("page_table", None, INFERENCE, NO_BACKWARD),
    _p("softmax_scale", None), _p("causal", False), _p("window_size", (None, None)), _p("learnable_sink", None),
    _p("softcap", 0.0), _p("num_splits", 1), _p("pack_gqa", None), _FWD_DETERMINISTIC,
    *_refused("score_mod", "score_mod_bwd", "mask_mod", "block_sparse_tensors", "aux_tensors", "aux_scalars"),
    _p("return_lse", False), _p("scheduler_metadata", None), *_refused("seqlen_k_per_split"),
    _p("disable_scheduler_metadata", False, REFUSED), _p("gather_bwd_recompute_p", False, REFUSED),
    *_refused("gather_bwd_token_chunk"), _p("config", None, INFERENCE, NO_BACKWARD),
    _p("scales", None, INFERENCE, "FP8 and MXFP8 are forward-only"),
)  # fmt: skip

#: FA4 4.0.0b40 interface.py ``_flash_attn_fwd`` (the engines' entry point; inference only).
FLASH_ATTN_FWD = (
    _p("q"), _p("k"), _p("v"), *_refused("qv"), _p("cu_seqlens_q", None), _p("cu_seqlens_k", None),
    _p("seqused_q", None), _p("seqused_k", None), _p("max_seqlen_q", None), _p("max_seqlen_k", None),
    _IGNORED_MIN_SEQLEN_K, _p("page_table", None), _p("softmax_scale", None), _p("causal", False),
    _p("softcap", None), _p("window_size_left", None), _p("window_size_right", None), _p("learnable_sink", None),
    _p("tile_mn", None), _p("mma_pv_is_rs", None), _p("intra_wg_overlap", None), _p("num_splits", 1),
    _p("pack_gqa", None), _p("_arch", None), *_refused("score_mod", "mask_mod", "block_sparse_tensors"),
    _p("return_lse", False), _p("out", None), _p("lse", None), *_refused("aux_tensors", "aux_scalars"),
    _p("scales", None), *_refused("gather_kv_indices"), _p("scheduler_metadata", None),
    *_refused("seqlen_k_per_split"), _p("disable_scheduler_metadata", False, REFUSED),
    _p("gather_bwd_recompute_p", False, REFUSED), _p("config", None, kw=True),
)  # fmt: skip

_LEGACY_TILE = "FA4 ignores its legacy tile arguments: its BwdConfig owns them (interface.py 2116-2118)"
#: FA4 4.0.0b40 interface.py ``_flash_attn_bwd``.
FLASH_ATTN_BWD = (
    _p("q"), _p("k"), _p("v"), _p("out"), _p("dout"), _p("lse"), _p("softmax_scale", None), _p("causal", False),
    _p("softcap", 0.0), _p("window_size_left", None), _p("window_size_right", None),
    _p("m_block_size", 64, IGNORED, _LEGACY_TILE), _p("n_block_size", 128, IGNORED, _LEGACY_TILE),
    _p("num_threads", 256, IGNORED, _LEGACY_TILE), _p("pack_gqa", False, IGNORED, _LEGACY_TILE),
    _p("num_stages_Q", 2, IGNORED, _LEGACY_TILE),
    _p("num_stages_dO", 2, IGNORED, _LEGACY_TILE), _p("SdP_swapAB", False, IGNORED, _LEGACY_TILE),
    _p("dKV_swapAB", False, IGNORED, _LEGACY_TILE), _p("dQ_swapAB", False, IGNORED, _LEGACY_TILE),
    _p("AtomLayoutMSdP", 2, IGNORED, _LEGACY_TILE), _p("AtomLayoutNdKV", 2, IGNORED, _LEGACY_TILE),
    _p("AtomLayoutMdQ", 2, IGNORED, _LEGACY_TILE), _p("V_in_regs", False, REFUSED),
    _p("cu_seqlens_q", None), _p("cu_seqlens_k", None), _p("seqused_q", None), _p("seqused_k", None),
    _p("max_seqlen_q", None), _p("max_seqlen_k", None), _p("deterministic", False), _p("dq", None), _p("dk", None),
    _p("dv", None), *_refused("score_mod", "score_mod_bwd", "mask_mod", "aux_tensors", "aux_scalars",
                              "block_sparse_tensors"),
    _p("dlse", None), _p("learnable_sink", None), _p("config", None, REFUSED, WHY["config_bwd"], kw=True),
)  # fmt: skip

#: FA4 4.0.0b40 interface.py ``_get_scheduler_metadata``.
GET_SCHEDULER_METADATA_PRIVATE = (
    _p("num_batch"), _p("max_seqlen_q"), _p("max_seqlen_k"), _p("nheads"), _p("nheads_kv"), _p("headdim"),
    _p("num_splits"), _p("tile_m"), _p("tile_n"), _p("headdim_v", None), _p("pack_gqa", False),
    _p("q_stage", 1, REFUSED), _p("cluster_shape_m", 1, REFUSED), _p("causal", False),
    _p("enable_pdl", False, REFUSED), _p("sort", False, REFUSED), _p("seqlen_k_new", 0, REFUSED),
    _p("cu_seqlens_q", None), _p("cu_seqlens_k", None), *_refused("cu_seqlens_k_new"), _p("seqused_q", None),
    _p("seqused_k", None), *_refused("leftpad_k", "seqlen_k_per_split"), _p("zfill_padded_output", True),
    _p("total_q", None), _p("use_clc_scheduler", False), _p("ctas_per_sm", 1), _p("min_blocks_floor", None),
)  # fmt: skip

#: FA4 4.0.0b40 interface.py ``get_scheduler_metadata`` (the public helper).
GET_SCHEDULER_METADATA = (
    _p("max_seqlen_q"), _p("max_seqlen_k"), _p("nheads"), _p("nheads_kv"), _p("headdim"), _p("num_splits"),
    _p("headdim_v", None), _p("pack_gqa", None), _p("causal", False), _p("window_size_left", None),
    _p("window_size_right", None), _p("seqlen_k_new", 0, REFUSED), _p("cu_seqlens_q", None), _p("cu_seqlens_k", None),
    *_refused("cu_seqlens_k_new"), _p("seqused_q", None), _p("seqused_k", None),
    *_refused("leftpad_k", "seqlen_k_per_split"), _p("_arch", None), _p("dtype", TORCH_BFLOAT16, kw=True),
)  # fmt: skip

#: FA4 4.0.0b40 interface.py ``_flash_attn_fwd_combine``.
FLASH_ATTN_FWD_COMBINE = (
    _p("out_partial"), _p("lse_partial"), _p("out"), _p("lse", None), _p("cu_seqlens", None), _p("seqused", None),
    _p("num_splits_dynamic_ptr", None), *_refused("virtual_batch_idx", "semaphore_to_reset"),
    _p("_arch", None, kw=True),
)  # fmt: skip

#: FA4's entry point name -> its table.
ENTRY_POINTS: dict[str, tuple[Param, ...]] = {
    "flash_attn_func": FLASH_ATTN_FUNC,
    "flash_attn_varlen_func": FLASH_ATTN_VARLEN_FUNC,
    "_flash_attn_fwd": FLASH_ATTN_FWD,
    "_flash_attn_bwd": FLASH_ATTN_BWD,
    "_get_scheduler_metadata": GET_SCHEDULER_METADATA_PRIVATE,
    "get_scheduler_metadata": GET_SCHEDULER_METADATA,
    "_flash_attn_fwd_combine": FLASH_ATTN_FWD_COMBINE,
}
#: FA4's entry point -> fa4aot's torch-free mirror (same parameters in the same order; fa4aot's
#: extras keyword-only after them).
MIRRORS = {
    "flash_attn_func": "fa4aot.runtime.entry.flash_attn_func",
    "flash_attn_varlen_func": "fa4aot.runtime.entry.flash_attn_varlen_func",
    "_flash_attn_fwd": "fa4aot.runtime.interface._flash_attn_fwd",
    "_flash_attn_bwd": "fa4aot.runtime.fa4_entries._flash_attn_bwd",
    "_get_scheduler_metadata": "fa4aot.runtime.interface._get_scheduler_metadata",
    "get_scheduler_metadata": "fa4aot.runtime.fa4_entries.get_scheduler_metadata",
    "_flash_attn_fwd_combine": "fa4aot.runtime.fa4_entries._flash_attn_fwd_combine",
}


def is_default(value: Any, default: Any) -> bool:
    """``value`` is FA4's default (the same object, or an equal value of the same type)."""
    return value is default or (default is not None and type(value) is type(default) and value == default)


def _short(value: Any) -> str:
    text = repr(value) if not hasattr(value, "shape") else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 80 else text[:77] + "..."


def refuse(entry: str, values: Mapping[str, Any], *, autograd: bool = False) -> None:
    """Raise ArgumentError for the first parameter of FA4's ``entry`` that fa4aot refuses and
    ``values`` (the call's arguments by name: ``locals()`` of a mirror) gives a value other than
    FA4's default; ``autograd``: the autograd ops also refuse the inference-only ones."""
    for p in ENTRY_POINTS[entry]:
        if p.use == REFUSED or (autograd and p.use == INFERENCE):
            value = values.get(p.name, p.default)
            if is_default(value, p.default):
                continue
            if p.use == REFUSED:
                raise ArgumentError(
                    f"{p.name}: fa4aot does not build FA4's {p.name} path ({p.why}; got {_short(value)}); "
                    f"call FA4 itself for it, or leave it at {p.default!r}"
                )
            raise ArgumentError(
                f"{p.name}: fa4aot's autograd ops do not take FA4's {p.name} ({p.why}); call the inference "
                f"forward (no input requiring grad), or leave it at {p.default!r}"
            )


def refused_names(entry: str, autograd: bool = False) -> tuple[str, ...]:
    """The parameters of ``entry`` fa4aot refuses (with ``autograd``, the inference-only ones too)."""
    return tuple(p.name for p in ENTRY_POINTS[entry] if p.use == REFUSED or (autograd and p.use == INFERENCE))


def _fast_check(entry: str) -> str:
    """A one-expression test that every refused argument of ``entry`` is at FA4's default (the
    usual call pays this, not the table walk of :func:`refuse`)."""
    terms = []
    for p in ENTRY_POINTS[entry]:
        if p.use != REFUSED:
            continue
        if p.default is None or p.default is False or p.default is True:
            terms.append(f"{p.name} is {p.default!r}")
        else:
            terms.append(f"_is_default({p.name}, _d_{p.name})")
    return " and ".join(terms) or "True"


@functools.cache
def arguments(entry: str) -> type:
    """A dataclass of FA4's ``entry`` parameters in FA4's order (``{args}`` in a mirror's body
    builds one): the argument object a mirror hands the code that serves it. Built per call, so
    not frozen (a frozen one's per-field ``__setattr__`` costs ten times as much); read only."""
    names = [p.name for p in ENTRY_POINTS[entry]]
    return dataclasses.make_dataclass(f"{entry.strip('_')}_args", names, slots=True)


def mirror(
    entry: str,
    body: str,
    scope: dict[str, Any],
    *,
    extras: tuple[tuple[str, Any], ...] = (),
    check: str = "fast",
    doc: str = "",
) -> Any:
    """A function with FA4's ``entry`` parameter list (names, order, defaults, keyword-only ones)
    plus fa4aot's keyword-only ``extras`` ((name, default) pairs), generated from this table so
    the signatures live in one place. ``body`` (its lines, unindented) is the function's body;
    ``{all}`` in it stands for every FA4 parameter passed on as received, ``{args}`` for them as
    one :func:`arguments` object and ``{refused}`` for a dict of the refused ones by name.
    ``check``: ``"fast"`` refuses non-default refused arguments first (:func:`refuse`),
    ``"autograd"`` also the inference-only ones, ``"none"`` leaves it to ``body``. Globals of the
    body are ``scope``'s (the defining module's)."""
    from fa4aot.core import gencode

    params = ENTRY_POINTS[entry]
    defaults = {f"_d_{p.name}": p.default for p in params if p.default is not REQUIRED}
    sig: list[str] = []
    for p in params:
        if p.keyword_only and "*" not in sig:
            sig.append("*")
        sig.append(p.name if p.default is REQUIRED else f"{p.name}=_d_{p.name}")
    if extras and "*" not in sig:
        sig.append("*")
    sig += [f"{n}=_d_{n}" for n, _ in extras]
    defaults.update({f"_d_{n}": d for n, d in extras})
    passed = ", ".join(p.name if not p.keyword_only else f"{p.name}={p.name}" for p in params)
    refused = ", ".join(f"{n}={n}" for n in refused_names(entry, autograd=check == "autograd"))
    # a factory, so the defaults are its locals and the function's globals are the module's
    # (names defined after the mirror resolve at call time)
    names = ", ".join(p.name for p in params)
    lines = [
        f"def _make({', '.join(['_refuse', '_is_default', '_Args', *defaults])}):",
        f"  def {entry}({', '.join(sig)}):",
    ]
    if check == "fast":
        lines.append(f"    if not ({_fast_check(entry)}):\n      _refuse({entry!r}, locals())")
    elif check == "autograd":  # by name, not locals(): torch.compile cannot trace locals()
        lines.append(f"    _refuse({entry!r}, dict({refused}), autograd=True)")
    lines += [
        "    " + line
        for line in textwrap.dedent(body)
        .strip()
        .format(all=passed, args=f"_Args({names})", refused=f"dict({refused})")
        .splitlines()
    ]
    lines.append(f"  return {entry}")
    made: dict[str, Any] = {}
    gencode.run("\n".join(lines) + "\n", scope, f"mirror {scope.get('__name__', '')}.{entry}", made)
    fn = made["_make"](refuse, is_default, arguments(entry), **defaults)
    fn.__doc__, fn.__qualname__ = doc, entry
    return fn
