"""The manifest's axis vocabulary: how one YAML key of a family group expands into variant fields.

Every family home (:mod:`fa4aot.core.families`) builds its axis tuples from these parsers; each
parser turns one YAML item into field values or raises ValueError with the reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fa4aot.core.fa4_interface import COMBINE_MAX_SPLITS, DESCALE_LAYOUTS, FP8_DTYPES

DTYPES = ("bf16", "fp16")
#: The SM100-family forward also takes FP8 q, k, v (FA4 interface.py 746, 858).
SM100_FWD_DTYPES = DTYPES + FP8_DTYPES
#: The ``scales`` axis's shorthands: FA4's TensorwiseScales with every descale in one layout, or
#: its MXFP8 BlockScales (``mxfp8_qk``: Q and K; ``mxfp8_pv``: Q, K and V).
SCALES_SHORTHANDS = {
    "none": {},
    "tensorwise": {"descales": "full,full,full"},
    "per_head": {"descales": "per_head,per_head,per_head"},
    "mxfp8_qk": {"mxfp8": "qk"},
    "mxfp8_pv": {"mxfp8": "pv"},
}
#: Out dtypes of the combine kernel (FA4: fp16, bf16 or fp32).
COMBINE_DTYPES = ("bf16", "fp16", "fp32")
#: The tile schedulers a forward group may filter on (static persistent, single-tile, dynamic
#: persistent, cluster launch control).
SCHEDULERS = ("static", "single", "dynamic", "clc")
#: learnable_sink dtypes FA4 takes (``_LEARNABLE_SINK_DTYPES``).
SINK_DTYPES = ("bf16", "fp16", "fp32")
#: Bounds for the page-size and softcap axes (far above any engine's: vLLM pages are 16-128 tokens,
#: Gemma-2's softcap is 50).
MAX_PAGE_SIZE = 1 << 16
MAX_SOFTCAP = 1e6


@dataclass(frozen=True)
class Axis:
    """One manifest key of a family group.

    ``parse`` turns one YAML item into a dict of field values (or raises ValueError with a
    reason); ``default`` is the list used when the group omits the key. The value ``"auto"``
    (where allowed) means "derive from the other fields the way FA4 does".
    """

    name: str
    parse: Callable[[Any], dict[str, Any]]
    default: tuple[Any, ...]
    doc: str
    #: the item that builds a variant's fields (``parse``'s inverse), where a field dict does not
    #: say it plainly; :func:`fa4aot.core.families.group_for` reads it for error messages
    unparse: Callable[[dict[str, Any]], Any] | None = None

    def item_of(self, f: dict[str, Any]) -> Any:
        """The YAML item of this axis that builds the variant fields ``f``."""
        if self.unparse is not None:
            return self.unparse(f)
        try:
            probe = self.parse([11, 22])  # a pair axis: learn which field is first
            return [f[k] for k, _ in sorted(probe.items(), key=lambda kv: kv[1])]
        except ValueError:
            (key,) = self.parse(self.default[0]).keys()
            return f[key]


def boolean(field: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if not isinstance(v, bool):
            raise ValueError(f"expected true/false, got {v!r}")
        return {field: v}

    return parse


def flag(name: str, default: bool, doc: str, field: str | None = None) -> Axis:
    """A true/false axis setting the variant field ``field`` (by default the axis's name)."""
    return Axis(name, boolean(field or name), (default,), doc)


def bool_or_auto(field: str, auto: Any = "auto") -> Callable[[Any], dict[str, Any]]:
    """true, false or auto; auto sets the field to ``auto`` (by default the string itself, for the
    family's resolve step to decide)."""

    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {field: auto}
        if not isinstance(v, bool):
            raise ValueError(f"expected true, false or auto, got {v!r}")
        return {field: v}

    return parse


def bool_or(field: str, other: str) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if v != other and not isinstance(v, bool):
            raise ValueError(f"expected true, false or {other}, got {v!r}")
        return {field: v}

    return parse


def choice(field: str, choices: Iterable[Any]) -> Callable[[Any], dict[str, Any]]:
    choices = tuple(choices)

    def parse(v: Any) -> dict[str, Any]:
        if v not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return {field: v}

    return parse


def posint(field: str, lo: int = 1, hi: int = 1 << 20) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v!r}")
        return {field: v}

    return parse


def pair(f1: str, f2: str, lo: int = 1, hi: int = 1024) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v, v]
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v)
        ):
            raise ValueError(f"expected an integer or a pair [{f1}, {f2}] in {lo}..{hi}, got {v!r}")
        return {f1: v[0], f2: v[1]}

    return parse


def max_splits(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= COMBINE_MAX_SPLITS:
        raise ValueError(f"expected the largest split count to support, 1..{COMBINE_MAX_SPLITS}, got {v!r}")
    return {"log_max_splits": max(math.ceil(math.log2(v)), 0), "_min_log": True}


#: The prepare kernel takes the batch size as an int32.
MAX_BATCH = 2**31 - 1


def max_batch(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BATCH:
        raise ValueError(f"expected the largest batch size to support, 1..{MAX_BATCH}, got {v!r}")
    return {"_max_batch": v}


def paged_kv(v: Any) -> dict[str, Any]:
    if v is False:
        return {"_page_size": None}
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_PAGE_SIZE:
        raise ValueError(f"expected false or a page size in 1..{MAX_PAGE_SIZE}, got {v!r}")
    return {"_page_size": v}


def sink(v: Any) -> dict[str, Any]:
    if v is False:
        return {"learnable_sink": "none"}
    if v not in SINK_DTYPES:
        raise ValueError(f"expected false or one of {list(SINK_DTYPES)}, got {v!r}")
    return {"learnable_sink": v}


def sink_value(f: dict[str, Any]) -> Any:
    """The ``learnable_sink`` item that builds a variant's sink field (:func:`sink`'s inverse)."""
    return False if f["learnable_sink"] == "none" else f["learnable_sink"]


def softcap(v: Any) -> dict[str, Any]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_SOFTCAP:
        raise ValueError(f"expected a softcap value in 0..{MAX_SOFTCAP} (0: off), got {v!r}")
    return {"softcap": float(v)}


def num_splits(v: Any) -> dict[str, Any]:
    if v == "auto":
        return {"num_splits": 0}
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SPLITS_REQUEST:
        raise ValueError(f"expected auto (FA4's heuristic) or a split count in 1..{MAX_SPLITS_REQUEST}, got {v!r}")
    return {"num_splits": v}


def backend(v: Any) -> dict[str, Any]:
    choices = {"auto": None, "swapab": True, "standard": False}
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"expected one of {list(choices)} (FLASH_ATTENTION_SM100_BACKEND), got {v!r}")
    return {"sm100_backend": choices[v]}


def scales(v: Any) -> dict[str, Any]:
    """FA4's ``scales=``: a shorthand of :data:`SCALES_SHORTHANDS`, or a mapping {q, k, v} of
    descale layouts (:data:`fa4aot.core.fa4_interface.DESCALE_LAYOUTS`; a missing one: none)."""
    if isinstance(v, str) and v in SCALES_SHORTHANDS:
        return {"descales": None, "mxfp8": None, **SCALES_SHORTHANDS[v]}
    if isinstance(v, Mapping) and v and set(v) <= {"q", "k", "v"}:
        layouts = [v.get(n, "none") for n in "qkv"]
        if all(x in DESCALE_LAYOUTS for x in layouts):
            return {"descales": ",".join(layouts), "mxfp8": None}
    raise ValueError(
        f"expected one of {list(SCALES_SHORTHANDS)} or a mapping {{q, k, v}} of descale layouts "
        f"{list(DESCALE_LAYOUTS)}, got {v!r}"
    )


def scales_value(f: dict[str, Any]) -> Any:
    """The ``scales`` axis value that builds a forward variant's scales (the inverse of :func:`_scales`)."""
    if f.get("mxfp8"):
        return f"mxfp8_{f['mxfp8']}"
    layouts = f.get("descales")
    if not layouts or layouts == "none,none,none":
        return "none"
    same = {x for x in layouts.split(",")}
    if len(same) == 1:
        return {"full": "tensorwise", "per_head": "per_head"}[same.pop()]
    return dict(zip("qkv", layouts.split(",")))


def request_pair(field: str) -> Callable[[Any], dict[str, Any]]:
    inner = pair("tile_m", "tile_n", 1, 1024)

    def parse(v: Any) -> dict[str, Any]:
        if v == "auto":
            return {field: None}
        d = inner(v)
        return {field: (d["tile_m"], d["tile_n"])}

    return parse


def config(v: Any) -> dict[str, Any]:
    """An explicit FwdConfig (FA4's ``config=``): a mapping of its fields (``registers`` a mapping
    of the register roles or null; ``device_capacity`` may be left out), kept as sorted pairs.
    FA4's ``validate_fwd_config`` checks it when the group expands."""
    if v == "auto":
        return {"config": None}
    if not isinstance(v, Mapping) or not v or not all(isinstance(k, str) for k in v):
        raise ValueError(f"expected auto or a mapping of FwdConfig fields, got {v!r}")
    items = []
    for k, x in v.items():
        if k == "registers" and isinstance(x, Mapping):
            x = tuple(sorted(x.items()))
        elif not isinstance(x, (bool, int)) and not (k == "registers" and x is None):
            raise ValueError(f"config.{k}: expected an integer or true/false, got {x!r}")
        items.append((k, x))
    return {"config": tuple(sorted(items))}


def request_bool(field: str) -> Callable[[Any], dict[str, Any]]:
    """An FA4 argument that is true, false or auto: auto is None, FA4 deciding."""
    return bool_or_auto(field, auto=None)


def ints(lo: int, hi: int) -> Callable[[Any], dict[str, Any]]:
    def parse(v: Any) -> dict[str, Any]:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"expected an integer in {lo}..{hi}, got {v!r}")
        return {"value": v}

    return parse


def window(v: Any) -> dict[str, Any]:
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEQLEN for x in v)
    ):
        raise ValueError(f"expected a pair [left, right] of window sizes in 0..{MAX_SEQLEN}, got {v!r}")
    return {"value": (v[0], v[1])}


def filter_values(choices: Iterable[Any]) -> Callable[[Any], dict[str, Any]]:
    choices = tuple(choices)

    def parse(v: Any) -> dict[str, Any]:
        if v not in choices or isinstance(v, bool) != isinstance(choices[0], bool):
            raise ValueError(f"expected one of {list(choices)}, got {v!r}")
        return {"value": v}

    return parse


#: Largest split count a forward request may name (FA4's validate_fwd_config: 1..256).
MAX_SPLITS_REQUEST = 256
#: Largest sequence length a manifest's shape axes may name (FA4 counts positions in 32 bits).
MAX_SEQLEN = 2**31 - 1


#: The axes of an attention call that the forward and backward families share.
HEAD_DIMS = Axis("head_dims", pair("head_dim", "head_dim_v"), ((128, 128),), "(head_dim, head_dim_v) pairs")
QHEAD_PER_KVHEAD = Axis(
    "qhead_per_kvhead", posint("qhead_per_kvhead", 1, 256), (1,), "query heads per KV head (GQA ratio)"
)
CAUSAL = flag("causal", False, "causal mask")
VARLEN_Q = flag("varlen_q", False, "cu_seqlens_q (packed variable-length queries)")
VARLEN_K = flag("varlen_k", False, "cu_seqlens_k (packed variable-length keys)")
SEQUSED_Q = flag("seqused_q", False, "seqused_q (per-batch used query length)")
SEQUSED_K = flag("seqused_k", False, "seqused_k (per-batch used key length, e.g. a KV cache)")
SOFTCAP = Axis("softcap", softcap, (0,), "softcap value, baked into the kernels: one variant per value (0: off)")
LEARNABLE_SINK = Axis(
    "learnable_sink", sink, (False,), "learnable sink logits (nheads,) in this dtype; false: none", sink_value
)


def shape_axes(
    batch: tuple[int, ...], seqlen_q: tuple[int, ...], seqlen_k: tuple[int, ...], nheads_kv: tuple[int, ...]
) -> tuple[Axis, ...]:
    """The shapes a selector family's group expects, with the family's defaults: FA4's selector
    runs on every point of their product."""
    return (
        Axis("batch", ints(1, 1 << 20), batch, "batch sizes to expect"),
        Axis("seqlen_q", ints(1, MAX_SEQLEN), seqlen_q, "query lengths (max_seqlen_q) to expect"),
        Axis("seqlen_k", ints(1, MAX_SEQLEN), seqlen_k, "key lengths (max_seqlen_k) to expect"),
        Axis("nheads_kv", ints(1, 1 << 16), nheads_kv, "KV head counts to expect"),
    )


def product(axes: tuple[Axis, ...], values: dict[str, list[Any]]) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield (raw field dict, {axis name: item}) for every point of the axes' product."""
    names = [a.name for a in axes]
    lists = [values[n] for n in names]
    for combo in itertools.product(*lists):
        raw: dict[str, Any] = {}
        picked = {}
        for axis, item in zip(axes, combo):
            raw.update(axis.parse(item))
            picked[axis.name] = item
        yield raw, picked
