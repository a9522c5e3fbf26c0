"""``fa4aot.combine``: FA4's split-KV combine kernel on partial outputs from any runtime."""

from __future__ import annotations

from typing import Any

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_interface import COMBINE_MAX_LOG_SPLITS, COMBINE_MAX_SPLITS, combine_geometry
from fa4aot.runtime import loader, validate
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import stream_handle

#: Combine call signatures a runtime remembers the variant of.
MAX_COMBINE_PICKS = 256
#: call signature -> LoadedVariant
combine_picks = loader.api_cache("combine_picks", lambda rt: BoundedDict(MAX_COMBINE_PICKS))


def combine(
    out_partial: Any,
    lse_partial: Any,
    out: Any,
    lse: Any = None,
    cu_seqlens: Any = None,
    seqused: Any = None,
    num_splits_dynamic: Any = None,
    stream: Any = None,
    *,
    runtime: Runtime | None = None,
) -> None:
    """Combine split-KV partial results into ``out`` (and ``lse``), as FA4's combine kernel does.

    Layouts (FA4's): batched ``out_partial`` (splits, batch, seqlen, heads, head_dim) fp32,
    ``lse_partial`` (splits, batch, seqlen, heads) fp32 with the seqlen dimension contiguous,
    ``out`` (batch, seqlen, heads, head_dim) in bf16/fp16/fp32, ``lse`` (batch, seqlen, heads)
    fp32 seqlen-contiguous. Varlen (``cu_seqlens`` (batch+1,) int32 given): drop the batch
    dimension, seqlen becomes total_q. ``seqused`` (batch,) limits rows per batch;
    ``num_splits_dynamic`` (batch,) int32 gives each batch's split count (from the prepare kernel).
    Nothing is launched if any argument is invalid.
    """
    rt = runtime or loader._DEFAULT or loader.default_runtime()
    lv, named, _ = analyse(rt, out_partial, lse_partial, out, lse, cu_seqlens, seqused, num_splits_dynamic)
    named["stream"] = stream_handle(stream)
    lv.plan.call_launch(lv.plan.pack(named))


def analyse(
    rt: Runtime,
    out_partial: Any,
    lse_partial: Any,
    out: Any,
    lse: Any,
    cu_seqlens: Any,
    seqused: Any,
    num_splits_dynamic: Any,
) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """Validate a combine call and pick its variant: (loaded variant, the plan's tensor
    arguments by name, each tensor's required base alignment in bytes)."""
    dev = rt.device
    varlen = cu_seqlens is not None
    rank = 4 if varlen else 5  # out_partial's; lse_partial and out one less, lse two less

    def check(obj: Any, name: str, dims: int, **kw: Any) -> Any:
        return validate.tensor(obj, name, rank=rank - dims, device=dev, rt=rt, **kw)

    op = check(out_partial, "out_partial", 0, dtypes=("fp32",), align=16, stride_multiple=4)
    splits, head_dim, heads = op.shape[0], op.shape[-1], op.shape[-2]
    rows = op.shape[1:-2]  # (batch, seqlen) or (total_q,)
    if not 1 <= splits <= COMBINE_MAX_SPLITS:
        raise ArgumentError(f"out_partial: {splits} splits; FA4's combine takes 1..{COMBINE_MAX_SPLITS}")
    # the LSEs are contiguous along the rows (seqlen or total_q)
    lp = check(lse_partial, "lse_partial", 1, dtypes=("fp32",), align=4, contiguous_dim=1 if varlen else 2)
    validate.shape(lp, "lse_partial", (splits, *rows, heads), "out_partial's shape without head_dim")
    o = check(out, "out", 1, dtypes=("bf16", "fp16", "fp32"), align=8, stride_multiple=4, writable=True)
    if o.dtype == "fp32" and o.ptr % 16:
        raise ArgumentError(f"out: base address 0x{o.ptr:x} is not 16-byte aligned")
    validate.shape(o, "out", (*rows, heads, head_dim), "out_partial's shape without splits")
    named: dict[str, Any] = {"out_partial": op, "lse_partial": lp, "out": o}
    if lse is not None:
        ls = check(lse, "lse", 2, dtypes=("fp32",), align=4, contiguous_dim=0 if varlen else 1, writable=True)
        validate.shape(ls, "lse", (*rows, heads), "out's shape without head_dim")
        named["lse"] = ls
    if varlen:
        cu = validate.int32_vector_any(cu_seqlens, "cu_seqlens", dev, rt)
        if cu.shape[0] < 2:
            raise ArgumentError("cu_seqlens: needs batch + 1 >= 2 entries")
        batch = cu.shape[0] - 1
        named["cu_seqlens"] = cu
    else:
        batch = rows[0]
    if seqused is not None:
        if not varlen:
            raise ArgumentError("seqused: fa4aot's combine takes seqused only with cu_seqlens (varlen)")
        su = validate.int32_vector(seqused, "seqused", batch, dev, rt)
        named["seqused"] = su
    if num_splits_dynamic is not None:
        nsd = validate.int32_vector(num_splits_dynamic, "num_splits_dynamic", batch, dev, rt)
        named["num_splits_dynamic"] = nsd
    has = (seqused is not None, lse is not None, num_splits_dynamic is not None)
    lv = pick(rt, o.dtype, head_dim, heads, splits, varlen, *has)
    aligns = {name: 4 for name in named}
    aligns["out_partial"] = 16
    aligns["out"] = 16 if o.dtype == "fp32" else 8
    return lv, named, aligns


#: The combine variant's fields a call decides (log_max_splits is searched).
_CALL_FIELDS = ("dtype", "head_dim", "num_head", "varlen", "seqused", "has_lse", "num_splits_dynamic")


def pick(
    rt: Runtime,
    dtype: str,
    head_dim: int,
    heads: int,
    splits: int,
    varlen: bool,
    seqused: bool,
    has_lse: bool,
    num_splits_dynamic: bool,
) -> Any:
    """The loaded combine variant for a call: FA4's log_max_splits for this split count if
    cached, else the next larger one cached (a kernel built for more splits handles fewer
    correctly). Remembered per call signature in :data:`combine_picks`."""
    key = (dtype, head_dim, heads, splits, varlen, seqused, has_lse, num_splits_dynamic)
    lv = combine_picks(rt).get(key)
    if lv is not None:
        return lv
    fields = dict(zip(_CALL_FIELDS, (dtype, head_dim, heads, varlen, seqused, has_lse, num_splits_dynamic)))
    first = combine_geometry(head_dim, splits)[2]
    for log in range(first, COMBINE_MAX_LOG_SPLITS + 1):
        v = rt.variant_for("combine", log_max_splits=log, **fields)
        if rt.has(v):
            lv = rt.load(v)
            break
    else:
        lv = rt.load(rt.variant_for("combine", log_max_splits=first, **fields))  # raises, naming the manifest entry
    combine_picks(rt)[key] = lv
    return lv
