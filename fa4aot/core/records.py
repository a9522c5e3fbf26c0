"""What an index record must hold to be served, and whether its key is the one it hashes to: the
checks that installing, packing, verifying and checking plans share (a damaged or moved record is
refused wherever it is met)."""

from __future__ import annotations

from typing import Any

from fa4aot.core.index import Entry, is_timestamp
from fa4aot.core.variant import Variant, cache_key

#: The fields of an index record, and their JSON types, that installing, verifying, checking and
#: serving an entry read (what :mod:`fa4aot.compile.worker` writes for every entry). A record that
#: lacks one is damaged: pack and install refuse it, verify and check-plans report it.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "variant": dict,
    "target": dict,
    "toolchain": dict,
    "host_arch": str,
    "shim_abi": int,
    "created": (int, float),
    "blobs": dict,
    "cubin": dict,
    "signature": dict,
    "kernels": list,
    "launch": dict,
}
#: Fields of the nested records the plan loader and the checks index directly.
REQUIRED_NESTED = {
    "signature": ("args", "entry", "init", "load"),
    "launch": ("smem",),
    "cubin": ("offset", "size", "sha256"),
}
#: Fields of each ``kernels`` item that verify, check-plans and the plan loader read.
KERNEL_FIELDS = ("symbol", "params", "cbank_param_size", "reqntid")


def record_problems(meta: Any) -> list[str]:
    """What is missing or of the wrong type in an entry's record (empty if nothing): the fields of
    :data:`REQUIRED_FIELDS` and their nested ones, and ``created`` a finite number."""
    if not isinstance(meta, dict):
        return [f"record is a JSON {type(meta).__name__}, not an object"]
    out = []
    for name, kind in REQUIRED_FIELDS.items():
        value = meta.get(name)
        if name not in meta:
            out.append(f"record lacks its {name!r} field")
        elif name == "created" and not is_timestamp(value):
            out.append(f"record field 'created' ({str(value)[:40]!r}) is not a finite number of seconds")
        elif not isinstance(value, kind) or isinstance(value, bool):
            out.append(f"record field {name!r} is a JSON {type(value).__name__}")
        elif name in REQUIRED_NESTED:
            out.extend(f"record lacks {name}.{sub}" for sub in REQUIRED_NESTED[name] if sub not in value)
    kernels = meta.get("kernels")
    for i, k in enumerate(kernels if isinstance(kernels, list) else []):
        if not isinstance(k, dict) or any(f not in k for f in KERNEL_FIELDS):
            out.append(f"record's kernels[{i}] lacks one of {', '.join(KERNEL_FIELDS)}")
    return out


def key_problem(entry: Entry) -> str | None:
    """Why ``entry.key`` is not the key its record hashes to (variant, toolchain, host arch and
    cache format, :func:`fa4aot.core.variant.cache_key`), or None when it is. A record moved
    under another key would be served for a variant it was not built for."""
    meta = entry.meta
    try:
        recomputed = cache_key(Variant.from_dict(meta["variant"]), meta["toolchain"], meta["host_arch"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"key cannot be recomputed: the record lacks {e}"
    if recomputed != entry.key:
        return f"key does not match the recorded variant/toolchain (recomputes to {recomputed})"
    return None
