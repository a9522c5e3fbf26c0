"""Per-call scratch of FA4's forward that fa4aot provides: the tensor-map workspace (SM90 /
SM100 varlen-K calls) and the zeroed tile semaphore of FA4's dynamic varlen route - from the
caller's torch allocator (capture-safe), or for other frameworks (and the fast path's torch calls
outside graph capture) one buffer per stream that only grows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_interface import TENSORMAP_WORDS, tensormap_workspace_ctas
from fa4aot.runtime import loader
from fa4aot.runtime.driver import CudaError
from fa4aot.runtime.frameworks import alloc_like, framework
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor

if TYPE_CHECKING:
    from fa4aot.runtime.calls import ForwardCall
    from fa4aot.runtime.loader import Runtime


#: Bytes of one tensor-map workspace slot (FA4: int64 (n_ctas, 16), a 128-byte TMA descriptor per CTA).
WORKSPACE_SLOT_BYTES = TENSORMAP_WORDS * 8

#: FA4's tensor-map workspace of non-torch callers: stream -> (device pointer, slots)
stream_workspaces = loader.api_cache(
    "stream_workspaces",
    lambda rt: BoundedDict(loader.MAX_PER_STREAM, on_evict=lambda stream, ws: rt.free_after(stream, ws[0])),
)
#: the zeroed tile semaphore of FA4's dynamic varlen route for non-torch callers, per stream
route_semaphores = loader.api_cache(
    "route_semaphores",
    lambda rt: BoundedDict(loader.MAX_PER_STREAM, on_evict=lambda stream, ptr: rt.free_after(stream, ptr)),
)


def workspace(rt: Runtime, fc: ForwardCall, ref: Any, stream: int) -> DeviceTensor | Any:
    """FA4's tensor-map workspace for this call, at least the slots FA4 sizes for the grid
    (interface.py 1255-1272). Torch callers get FA4's own: a fresh ``torch.empty`` from the caching
    allocator (stream-ordered, and safe inside CUDA-graph capture). Others get one buffer per
    stream that only grows, so repeated calls allocate nothing and keep its address."""
    slots = workspace_slots(rt, fc)
    if framework(ref) == "torch":
        return alloc_like(ref, (slots, TENSORMAP_WORDS), "int64")
    ptr, have = stream_workspace(rt, stream, slots)
    return DeviceTensor(ptr, (have, TENSORMAP_WORDS), (TENSORMAP_WORDS, 1), "int64", rt.device, "raw")


def stream_workspace(rt: Runtime, stream: int, slots: int) -> tuple[int, int]:
    """``stream``'s tensor-map workspace (address, slots), grown to hold at least ``slots``:
    kernels on a stream run in its order, so its calls share one buffer."""
    kept = stream_workspaces(rt)
    have = kept.get(stream)
    if have is None or have[1] < slots:
        # a little headroom, so a growing batch does not reallocate at every step
        ptr = stream_alloc(rt, (slots + slots // 4) * WORKSPACE_SLOT_BYTES, stream, "tensor-map workspace")
        if have is not None:
            rt.free_after(stream, have[0])  # after the stream's queued work, which may use it
            del kept[stream]
        kept[stream] = have = (ptr, slots + slots // 4)
    return have


def workspace_slots(rt: Runtime, fc: ForwardCall) -> int:
    """The workspace slots for the kernel this call launches: sized by its own tile and GQA
    packing, which a tuned choice may change from FA4's config (a smaller tile_m has more CTAs)."""
    f = fc.lv.fields
    # FA4 counts query rows as q.shape[0] for packed queries, batch * seqlen_q for batched ones
    rows = fc.rows[0] if len(fc.rows) == 1 else fc.rows[0] * fc.rows[1]
    return tensormap_workspace_ctas(
        bool(f.get("pack_gqa")), f["tile_m"], fc.nheads, fc.k[1][-2], rt.target.num_sms, rows, fc.batch, fc.num_splits
    )  # fmt: skip


def route_semaphore(rt: Runtime, ref: Any, stream: int) -> DeviceTensor | Any:
    """The zeroed tile semaphore FA4 allocates for its dynamic varlen route (interface.py 1061):
    torch callers get FA4's own (``torch.zeros(1)``, capture-safe); others one per stream, zeroed
    once (the kernel resets it at exit, so launches ordered on the stream reuse it)."""
    if framework(ref) == "torch":
        return alloc_like(ref, (1,), "int32").zero_()
    kept = route_semaphores(rt)
    ptr = kept.get(stream)
    if ptr is None:
        ptr = stream_alloc(rt, 4, stream, "tile semaphore")
        rt.driver.memset_d32(ptr, 0, 1, stream)
        kept[stream] = ptr
    return DeviceTensor(ptr, (1,), (1,), "int32", rt.device, "raw")


def described(t: Any, keep: list[Any]) -> DeviceTensor:
    """A scratch buffer as the launcher takes it; a framework tensor is kept in ``keep``."""
    if isinstance(t, DeviceTensor):
        return t
    keep.append(t)
    return as_device_tensor(t, "scratch")


def stream_alloc(rt: Runtime, nbytes: int, stream: int, what: str) -> int:
    """``cuMemAlloc`` for a per-stream scratch buffer, with a specific error where the stream is
    being captured into a CUDA graph (the driver refuses allocations there)."""
    try:
        return rt.driver.alloc(nbytes)
    except CudaError as e:
        if "STREAM_CAPTURE" not in str(e):
            raise
        raise ArgumentError(
            f"this call needs a new {what} ({nbytes} bytes) and its stream is being captured into a CUDA graph, "
            "where memory cannot be allocated: make the same call (with the largest bounds) once on the capturing "
            "stream before capture, or pass torch tensors (their scratch comes from torch's graph-safe allocator)"
        ) from e
