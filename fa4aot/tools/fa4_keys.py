"""FA4's compile keys, named, and fa4aot's prediction of them from its variants.

FA4 keys each JIT cache on a tuple (``compile_key = (...)`` in ``interface.py``); one key is one
kernel. The element names are read from FA4's source (no import), so a key becomes a dict such
as ``{"causal": True, "cu_seqlens_q is None": False, ...}``. :func:`fwd_key`, :func:`combine_key`
and :func:`prepare_key` say what key FA4 uses for the kernel an fa4aot variant stands for: the
fake-mode parity tests compare them with the keys FA4 itself computes for the same calls, and
``fa4aot.tools.fa4_upgrade`` lists the names a new FA4 adds that fa4aot does not model.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from fa4aot.core.fa4_interface import PrepareOptions, arch_number, combine_geometry
from fa4aot.core.families.forward import needs_workspace
from fa4aot.core.variant import Variant

#: The functions whose keys fa4aot models, and the kind of kernel each compiles.
KEYED = {
    "_flash_attn_fwd": "fwd",
    "_flash_attn_fwd_combine": "combine",
    "_get_scheduler_metadata": "prepare",
    "_flash_attn_bwd": "bwd",
    "_bwd_preprocess": "bwd_pre",
    "_bwd_postprocess_convert": "bwd_post",
}
#: How FA4's config element of the forward key reads in its source.
FWD_CONFIG = "replace(fwd_codegen_config(config), use_dynamic_varlen=False) if isinstance(config, FwdConfig) else fwd_codegen_config(config)"
#: Forward key elements fa4aot does not predict: how the caller's tensors broadcast (fa4aot takes
#: no stride-0 inputs) and FA4's logging level.
FWD_UNMODELED = ("tensor_broadcast_patterns", "fa_logging.get_fa_log_level()")
#: cutlass dtype names of fa4aot's dtypes (``torch2cute_dtype_map``).
CUTE_DTYPES = {"bf16": "BFloat16", "fp16": "Float16", "fp32": "Float32", "e4m3": "Float8E4M3FN", "e5m2": "Float8E5M2"}
#: Starred key elements of a known width: FA4's forward key spreads one presence flag per
#: TensorwiseScales member (q, k, v); elements appended after the tuple (MXFP8's) are ``+i``.
STAR_WIDTHS = {"*(t is not None for t in descales)": 3}


def interface_source(path: str | Path | None = None) -> str:
    """The text of FA4's ``flash_attn/cute/interface.py`` (the installed one, found without
    importing it, or ``path``)."""
    if path is not None:
        return Path(path).read_text()
    spec = importlib.util.find_spec("flash_attn")
    for root in list(spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(root) / "cute" / "interface.py"
        if p.is_file():
            return p.read_text()
    raise FileNotFoundError("flash-attn-4 is not installed (no flash_attn/cute/interface.py)")


@lru_cache(maxsize=8)
def key_names(source: str) -> dict[str, list[str]]:
    """Per keyed function, the source text of each element of its ``compile_key`` / ``cache_key``
    tuple; a starred element keeps its ``*`` (it stands for several)."""
    out: dict[str, list[str]] = {}
    for fn in ast.parse(source).body:
        if not isinstance(fn, ast.FunctionDef) or fn.name not in KEYED:
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("compile_key", "cache_key")
                and isinstance(node.value, ast.Tuple)
            ):
                out[fn.name] = [ast.unparse(e) for e in node.value.elts]
                break
    return out


def name_key(names: list[str], key: tuple) -> dict[str, Any]:
    """A key tuple as a dict by element name; a starred name takes what the other names leave
    (named ``<name>[i]``); elements past the names (appended to the tuple later) are ``+i``."""
    star = [i for i, n in enumerate(names) if n.startswith("*")]
    if len(star) > 1:
        raise ValueError("more than one starred key element")
    if not star:
        named = dict(zip(names, key))
        named.update({f"+{i}": v for i, v in enumerate(key[len(names) :])})
        return named
    s = star[0]
    width = STAR_WIDTHS.get(names[s], len(key) - (len(names) - 1))
    out = dict(zip(names[:s], key[:s]))
    out.update({f"{names[s]}[{i}]": key[s + i] for i in range(width)})
    rest = key[s + width :]
    out.update(zip(names[s + 1 :], rest))
    out.update({f"+{i}": v for i, v in enumerate(rest[len(names) - s - 1 :])})
    return out


def plain(v: Any) -> Any:
    """A key element as JSON-able data: dataclasses as dicts, classes and dtypes by name."""
    import dataclasses

    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [plain(x) for x in v]
    if hasattr(v, "name") and hasattr(v, "value") and not isinstance(v, type):  # an Enum
        return str(v.name)
    name = getattr(v, "__name__", None)
    return name if isinstance(name, str) else str(v)


def softcap_hash(value: float) -> str:
    """FA4's ``score_mod_hash`` of the softcap score_mod it compiles for ``value``
    (``utils.hash_callable(create_softcap_scoremod(value))``; needs FA4 and the DSL)."""
    from flash_attn.cute import utils

    return utils.hash_callable(utils.create_softcap_scoremod(value))


def fwd_config(fields: dict[str, Any], arch: str, sel: Any = None) -> dict[str, Any]:
    """The forward key's config element (FA4's ``FwdConfig`` as a dict) a variant stands for
    (``sel``: FA4's selector module, default the installed FA4's)."""
    from fa4aot.core import fa4_interface, selector

    return plain(fa4_interface.config_from_fields(sel or selector.installed(), fields, arch))


def fwd_key(v: Variant, descales: int = 3, sel: Any = None) -> dict[str, Any]:
    """The key FA4's ``_flash_attn_fwd`` compiles the kernel of forward variant ``v`` under
    (fa4aot calls: no qv, score_mod other than softcap, mask_mod, block sparsity, aux tensors,
    fp8 descales; window sides both given or neither)."""
    f = v.fields
    paged = f["paged_kv"] != "none"
    key: dict[str, Any] = {
        FWD_CONFIG: fwd_config(f, v.arch, sel),
        "dtype": CUTE_DTYPES[f["dtype"]],
        "head_dim": f["head_dim"],
        "head_dim_v": f["head_dim_v"],
        "qhead_per_kvhead": f["qhead_per_kvhead"],
        "num_head_kv if qv is not None else None": None,
        "causal": f["causal"],
        "score_mod_hash": softcap_hash(f["softcap"]) if f["softcap"] else False,
        "mask_mod_hash": False,
        "use_block_sparsity": False,
        "block_sparse_broadcast_pattern": None,
        "aux_tensor_metadata": None,
        "aux_scalar_metadata": None,
        "lse is None": not f["has_lse"],
        "cu_seqlens_q is None": not f["varlen_q"],
        "cu_seqlens_k is None": not f["varlen_k"],
        "seqused_q is None": not f["seqused_q"],
        "seqused_k is None": not f["seqused_k"],
        "page_table is not None": paged,
        "window_size_left is not None": f["local"],
        "window_size_right is not None": f["local"],
        "torch2cute_dtype_map[learnable_sink.dtype] if learnable_sink is not None else None": (
            None if f["learnable_sink"] == "none" else CUTE_DTYPES[f["learnable_sink"]]
        ),
        "block_sparse_tensors is None or block_sparse_tensors.cu_total_m_blocks is None": True,
        "block_sparse_tensors is None or block_sparse_tensors.cu_block_idx_offsets is None": True,
        "arch": arch_number(v.arch),
        "paged_kv_tma": (f["paged_kv"] == "tma") if paged else None,
        "q_subtile_factor": 1,
        "kv_subtile_factor": 1,
        "num_splits_dynamic is not None": f["num_splits_dynamic"],
        "mla_fwd_rescale_threshold": 8.0,
        "o_lo is not None": False,
        "virtual_batch_idx is not None": False,
        "num_nheads_in_l2 is not None": f["num_nheads_in_l2"],
        "tile_count_semaphore is not None": f["tile_count_semaphore"],
        "cu_total_m_blocks is not None": False,
        "cu_total_splits_m_blocks is not None": False,
        "blocks_to_batch_idx is not None": False,
        "seqlen_k_per_split": None,
        "q is not None": True,
        "qv is not None": False,
        "p is not None": False,
        "row_max is not None": False,
        "gather_kv_length": None,
        "sparse_kv": None,
        "disable_sparse_kv_bitmask": None,
        "tensormap_workspace is not None": needs_workspace(v),
    }
    layouts = (f.get("descales") or "none,none,none").split(",")
    for i in range(descales):
        key[f"*(t is not None for t in descales)[{i}]"] = layouts[i] != "none"
    if f.get("mxfp8"):  # interface.py 1295-1296
        pv = f["mxfp8"] == "pv"
        key.update({"+0": "mxfp8_qk", "+1": "torch.float8_e4m3fn" if pv else "torch.bfloat16", "+2": pv})
    return key


def combine_key(v: Variant) -> dict[str, Any]:
    """The key of FA4's ``_flash_attn_fwd_combine`` for combine variant ``v``."""
    f = v.fields
    tile_m, k_block, _ = combine_geometry(f["head_dim"], 1 << f["log_max_splits"])
    return {
        "_get_device_arch() if _arch is None else _arch": arch_number(v.arch),
        "dtype": CUTE_DTYPES[f["dtype"]],
        "dtype_partial": "Float32",
        "head_dim": f["head_dim"],
        "num_head": f["num_head"],
        "tile_m": tile_m,
        "k_block_size": k_block,
        "log_max_splits": f["log_max_splits"],
        "cu_seqlens is not None": f["varlen"],
        "seqused is not None": f["seqused"],
        "lse is not None": f["has_lse"],
        "virtual_batch_idx is not None": False,
        "num_splits_dynamic_ptr is not None": f["num_splits_dynamic"],
        "semaphore_to_reset is not None": False,
    }


#: The leading elements of FA4's prepare key: variant fields of the same name.
PREPARE_KEY_FIELDS = (
    "num_warps",
    "tile_m",
    "tile_n",
    "nheads",
    "nheads_kv",
    "headdim",
    "headdim_v",
    "causal",
    "pack_gqa",
)


def prepare_key(v: Variant) -> dict[str, Any]:
    """The key of FA4's ``_get_scheduler_metadata`` prepare kernel for prepare variant ``v``."""
    f = v.fields
    return {
        **{name: f[name] for name in PREPARE_KEY_FIELDS},
        "enable_pdl": False,
        "sort": False,
        "cu_seqlens_q is not None": f["varlen_q"],
        "cu_seqlens_k is not None": f["varlen_k"],
        "cu_seqlens_k_new is not None": False,
        "seqused_q is not None": f["seqused_q"],
        "seqused_k is not None": f["seqused_k"],
        "leftpad_k is not None": False,
        "num_m_blocks is not None": True,
        "num_splits_dynamic is not None": True,
        "virtual_batch_idx is not None": False,
        "num_nheads_in_l2 is not None": f["causal"],
        "tile_count_semaphore is not None": f["has_semaphore"],
        "n_blocks_per_split is not None": False,
        # FA4's key holds the options under their own names (a tuple reads back as a list)
        **{n: list(x) if isinstance(x, tuple) else x for n, x in PrepareOptions.of_fields(f).kwargs().items()},
    }


def differences(fa4: dict[str, Any], ours: dict[str, Any], unmodeled: tuple[str, ...] = ()) -> list[str]:
    """Where FA4's named key and fa4aot's prediction differ (names either lacks included)."""
    out = []
    for name in sorted(set(fa4) | set(ours)):
        if name in unmodeled:
            continue
        if name not in ours:
            out.append(f"{name}: FA4 {fa4[name]!r}, not modeled by fa4aot")
        elif name not in fa4:
            out.append(f"{name}: fa4aot {ours[name]!r}, not in FA4's key")
        elif plain(fa4[name]) != plain(ours[name]):
            out.append(f"{name}: FA4 {plain(fa4[name])!r}, fa4aot {plain(ours[name])!r}")
    return out
