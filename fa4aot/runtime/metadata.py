"""``fa4aot.SchedulerMetadata``: FA4's varlen scheduler metadata, computed once per batch.

FA4's prepare kernel (``FlashPrepareScheduler``) turns a batch's sequence lengths into the buffers
its varlen schedulers read: ``num_m_blocks`` and ``num_splits_dynamic`` (per batch entry),
``num_nheads_in_l2`` (per batch entry, causal only: the head swizzle that keeps K/V in L2) and the
``tile_count_semaphore`` the dynamic persistent scheduler's CTAs take work from.

Without a prepare kernel (``prepare=False``: what FA4's ``get_scheduler_metadata`` returns for a
call that is neither split nor causal) the object holds no buffers; the forward then runs the
kernel FA4 runs for such metadata, which reads none.

When to recompute: whenever anything the kernel read changes - the batch size, the sequence
lengths (``cu_seqlens_*`` / ``seqused_*`` contents), ``max_seqlen_*`` or ``num_splits``. It does not
depend on the layer, so one object serves every layer of a forward pass (the upstream PR's "compute
once per batch, pass to every layer").

The semaphore: the prepare kernel zeroes it; each forward that uses it counts it up; so it must be
zero again before the next forward. fa4aot's forward resets it on the same stream right after each
use (a ``cuMemsetD32Async``, capturable in a CUDA graph); call :meth:`reset_semaphore` yourself only
if you launch FA4 kernels with these buffers some other way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError, Fa4aotError
from fa4aot.core.fa4_interface import (
    DEFAULT_PREPARE_OPTIONS,
    UNPREPARED,
    PrepareOptions,
    forward_prepare_options,
    prepare_fields,
)
from fa4aot.core.signature import TensorDesc
from fa4aot.runtime import loader, validate
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import DeviceTensor, RawTensor, stream_handle

if TYPE_CHECKING:
    from fa4aot.runtime.calls import ForwardCall


class SchedulerMetadata:
    """Device buffers of FA4's scheduler metadata for one batch configuration.

    The buffers are allocated once (one ``cuMemAlloc``) and owned by this object; ``close()`` (or
    garbage collection) frees them. ``tile_m``/``tile_n`` are those of the forward kernel the
    metadata serves (FA4: 128 x 128 on SM100). ``semaphore``: allocate the tile semaphore (FA4:
    unless the forward runs its CLC scheduler); ``options``: FA4's options of the prepare
    kernel's split rule (:class:`fa4aot.core.fa4_interface.PrepareOptions`; FA4's forward passes
    ``SWAPAB.split_policy`` for its SwapAB decode kernel, the defaults otherwise).
    ``prepare=False``: no buffers and no prepare kernel (FA4's ``get_scheduler_metadata`` for
    calls that need none). Buffers are exposed as :class:`RawTensor`,
    also under FA4's names (``num_m_blocks_ptr``, ...); fa4aot never computes FA4's batch-lookup
    aid, so ``cu_total_m_blocks``, ``cu_total_splits_m_blocks`` and ``blocks_to_batch_idx`` are None.
    """

    #: FA4's ``SchedulerMetadataTensorsTorch`` fields fa4aot never fills (its batch-lookup aid for
    #: batches above BIN_BATCH_SEARCH_THRESH, and LPT sorting)
    virtual_batch_idx_ptr = None
    cu_total_m_blocks = None
    cu_total_splits_m_blocks = None
    blocks_to_batch_idx = None

    def __init__(
        self,
        batch_size: int,
        nheads: int,
        nheads_kv: int,
        headdim: int,
        headdim_v: int | None = None,
        *,
        causal: bool = False,
        pack_gqa: bool | None = None,
        tile_m: int = 128,
        tile_n: int = 128,
        semaphore: bool = True,
        options: PrepareOptions = DEFAULT_PREPARE_OPTIONS,
        prepare: bool = True,
        runtime: Runtime | None = None,
        buffer: tuple[int, int] | None = None,
    ):
        if batch_size < 1:
            raise ArgumentError(f"batch_size must be >= 1, got {batch_size}")
        if nheads % nheads_kv:
            raise ArgumentError(f"nheads ({nheads}) must be a multiple of nheads_kv ({nheads_kv})")
        self.runtime = runtime or loader._DEFAULT or loader.default_runtime()
        self.batch_size = batch_size
        self.fields = prepare_fields(
            batch_size, (nheads, nheads_kv), (headdim, headdim if headdim_v is None else headdim_v), (tile_m, tile_n),
            causal, (nheads > nheads_kv) if pack_gqa is None else pack_gqa, semaphore, options,
        )  # fmt: skip
        #: what the forward's dispatch key says of this metadata (fa4_interface.FwdFacts.caller_prepared)
        self.kind: bool | str = True if prepare else UNPREPARED
        self.num_splits: int | None = None
        self._prepare: dict[tuple[bool, ...], Any] = {}
        self.max_seqlen_q: int | None = None
        self.max_seqlen_k: int | None = None
        self._ptr = 0
        if not prepare:
            self.tile_count_semaphore = self.num_m_blocks = self.num_splits_dynamic = self.num_nheads_in_l2 = None
            self.buffers: tuple[DeviceTensor | None, ...] = (None, None, None)
            return
        b = batch_size
        if buffer is None:  # its own allocation, freed by close()
            self._stride = _stride(b)
            self._ptr = base = self.runtime.driver.alloc(metadata_bytes(b, 3 if causal else 2))
        else:  # a MetadataPool's (of at least metadata_bytes(capacity, 3)): the pool frees it
            base, capacity = buffer
            if capacity < b:
                raise ArgumentError(f"a metadata buffer for {capacity} sequences cannot serve {b}")
            self._stride = _stride(capacity)
        # [semaphore, pad to 16 B][num_m_blocks][num_splits_dynamic][num_nheads_in_l2], int32 vectors
        dev = self.runtime.device
        self.tile_count_semaphore = RawTensor(base, (1,), "int32", device=dev)
        self.num_m_blocks = RawTensor(base + 16, (b,), "int32", device=dev)
        self.num_splits_dynamic = RawTensor(base + 16 + 4 * self._stride, (b,), "int32", device=dev)
        self.num_nheads_in_l2 = RawTensor(base + 16 + 8 * self._stride, (b,), "int32", device=dev) if causal else None
        #: (num_splits_dynamic, tile_count_semaphore, num_nheads_in_l2) as the forward's launcher takes them
        self.buffers = tuple(
            None if t is None else DeviceTensor(t.ptr, t.shape, t.strides, "int32", dev, "raw")
            for t in (self.num_splits_dynamic, self.tile_count_semaphore, self.num_nheads_in_l2)
        )

    @property
    def num_m_blocks_ptr(self) -> RawTensor | None:
        """FA4's name for :attr:`num_m_blocks`."""
        return self.num_m_blocks

    @property
    def num_splits_dynamic_ptr(self) -> RawTensor | None:
        """FA4's name for :attr:`num_splits_dynamic`."""
        return self.num_splits_dynamic

    @property
    def num_nheads_in_l2_ptr(self) -> RawTensor | None:
        """FA4's name for :attr:`num_nheads_in_l2`."""
        return self.num_nheads_in_l2

    def compute(
        self,
        *,
        max_seqlen_q: int,
        max_seqlen_k: int,
        num_splits: int,
        cu_seqlens_q: Any = None,
        cu_seqlens_k: Any = None,
        seqused_q: Any = None,
        seqused_k: Any = None,
        stream: Any = None,
    ) -> SchedulerMetadata:
        """Launch the prepare kernel to fill the buffers (and zero the semaphore) on ``stream``
        (without buffers: check the arguments and note them, launching nothing)."""
        rt = self.runtime
        dev, b = rt.device, self.batch_size
        named: dict[str, Any] = {}
        for name, obj, length in (
            ("cu_seqlens_q", cu_seqlens_q, b + 1),
            ("cu_seqlens_k", cu_seqlens_k, b + 1),
            ("seqused_q", seqused_q, b),
            ("seqused_k", seqused_k, b),
        ):
            if obj is not None:
                named[name] = validate.int32_vector(obj, name, length, dev, rt)
        if not named:
            raise ArgumentError("give at least one of cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k")
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ArgumentError(f"num_splits must be an int >= 1, got {num_splits!r}")
        if self.kind is not True:
            self.num_splits, self.max_seqlen_q, self.max_seqlen_k = num_splits, max_seqlen_q, max_seqlen_k
            return self
        for name in ("num_m_blocks", "num_splits_dynamic", "num_nheads_in_l2", "tile_count_semaphore"):
            t = getattr(self, name)
            if t is not None:
                named[name] = TensorDesc(t.ptr, t.shape, (1,))
        named.update(
            max_seqlen_q=validate.seqlen(max_seqlen_q, "max_seqlen_q"),
            max_seqlen_k=validate.seqlen(max_seqlen_k, "max_seqlen_k"),
            seqlen_k_new=0,
            num_batch=b,
            num_splits=validate.fits_int32(num_splits, "num_splits"),
            stream=stream_handle(stream),
        )
        flags = (cu_seqlens_q is not None, seqused_q is not None, cu_seqlens_k is not None, seqused_k is not None)
        lv = self._prepare.get(flags)
        if lv is None:
            variant = rt.variant_for(
                "prepare",
                varlen_q=flags[0],
                seqused_q=flags[1],
                varlen_k=flags[2],
                seqused_k=flags[3],
                **self.fields,
            )
            lv = self._prepare[flags] = rt.load(variant)  # at most 16 flag combinations
        lv.plan.call_launch(lv.plan.pack(named))
        self.num_splits, self.max_seqlen_q, self.max_seqlen_k = num_splits, max_seqlen_q, max_seqlen_k
        return self

    def reset_semaphore(self, stream: Any = None) -> None:
        """Zero ``tile_count_semaphore`` on ``stream`` (stream-ordered, graph-capturable)."""
        if self.tile_count_semaphore is None:
            return
        self.runtime.driver.memset_d32(self.tile_count_semaphore.ptr, 0, 1, stream_handle(stream))

    def close(self) -> None:
        """Free the buffers (after the work that uses them has finished)."""
        if self._ptr:
            self.runtime.driver.free(self._ptr)
            self._ptr = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _stride(batch: int) -> int:
    """Elements of one metadata vector (a multiple of 4: each starts 16-byte aligned)."""
    return (batch + 3) // 4 * 4


def metadata_bytes(batch: int, vectors: int) -> int:
    """Bytes of metadata buffers for ``batch`` sequences: the semaphore (padded to 16 bytes) and
    ``vectors`` int32 vectors (num_m_blocks, num_splits_dynamic, and num_nheads_in_l2 if causal)."""
    return 4 * (4 + vectors * _stride(batch))


#: The smallest metadata pool (sequences): a few hundred bytes, so small batches never regrow it.
MIN_POOL_CAPACITY = 64
#: Metadata views a pool keeps (one per batch size seen; a view is a few Python objects).
MAX_POOL_VIEWS = 256


class MetadataPool:
    """Scheduler-metadata buffers for one (stream, forward configuration), shared by every batch
    size: one device allocation, doubled (the old one freed after a stream synchronisation) when a
    larger batch arrives, so calls cycling through batch sizes allocate nothing after warm-up, and
    a CUDA graph captured after warm-up launches with no allocation. ``make(batch, buffer)``
    builds the :class:`SchedulerMetadata` view of ``batch`` sequences over ``buffer``."""

    def __init__(self, runtime: Runtime, stream: int, make: Any):
        self.runtime, self.stream, self._make = runtime, stream, make
        self._ptr, self.capacity = 0, 0
        self._views: dict[int, SchedulerMetadata] = {}

    def get(self, batch: int) -> SchedulerMetadata:
        """The metadata view for ``batch`` sequences (allocating only to grow)."""
        md = self._views.get(batch)
        if md is not None:
            return md
        if batch > self.capacity:
            self._grow(batch)
        if len(self._views) >= MAX_POOL_VIEWS:
            self._views.clear()
        md = self._views[batch] = self._make(batch, (self._ptr, self.capacity))
        return md

    def _grow(self, batch: int) -> None:
        capacity = max(MIN_POOL_CAPACITY, 2 * self.capacity, 1 << (batch - 1).bit_length())
        ptr = self.runtime.driver.alloc(metadata_bytes(capacity, 3))
        self.close()
        self._ptr, self.capacity = ptr, capacity

    def close(self) -> None:
        """Free the buffers once the work queued on the pool's stream has finished."""
        self._views.clear()
        if self._ptr:
            drv = self.runtime.driver
            try:
                drv.synchronize(self.stream)
            except Fa4aotError:  # the stream is gone (destroyed: its work completes before it is released)
                pass
            drv.free(self._ptr)
            self._ptr, self.capacity = 0, 0


def metadata_kind(md: Any) -> bool | str:
    """What a forward's dispatch key records of its ``scheduler_metadata`` argument: False (none),
    True (a prepare kernel's buffers) or :data:`fa4aot.core.fa4_interface.UNPREPARED`."""
    return False if md is None else getattr(md, "kind", True)


def check_metadata(md: SchedulerMetadata, fc: ForwardCall) -> None:
    """``md`` fits the call (batch, computed, causal)."""
    if not isinstance(md, SchedulerMetadata):
        raise ArgumentError("scheduler_metadata must be a fa4aot.SchedulerMetadata")
    if md.batch_size != fc.batch:
        raise ArgumentError(f"scheduler_metadata was made for batch {md.batch_size}, this call has {fc.batch}")
    if md.num_splits is None:
        raise ArgumentError("scheduler_metadata has not been computed (call .compute(...))")
    if fc.plan.num_nheads_in_l2 and md.num_nheads_in_l2 is None:
        raise ArgumentError("scheduler_metadata was made with causal=False for a causal call")


#: (stream, configuration) -> MetadataPool of split-KV varlen calls without caller metadata (each
#: holds device buffers: closed when evicted)
metadata_pools = loader.api_cache(
    "metadata_pools", lambda rt: BoundedDict(loader.MAX_PER_STREAM, on_evict=lambda key, pool: pool.close())
)


def auto_metadata(fc: ForwardCall, stream: int) -> SchedulerMetadata:
    """Prepare-kernel metadata for a split-KV varlen call, as FA4's forward prepares it
    (interface.py 1064-1090). The buffers come from a pool per (stream, configuration) shared by
    every batch size (:class:`fa4aot.runtime.metadata.MetadataPool`): after warm-up no call
    allocates device memory, whatever its batch."""
    rt, f, c, plan = fc.rt, fc.lv.fields, fc.config, fc.plan
    nheads_kv = fc.nheads // f["qhead_per_kvhead"]
    options = forward_prepare_options(rt.selector, c, f["head_dim"])
    key = (stream, fc.nheads, nheads_kv, f["head_dim"], f["head_dim_v"], plan.num_nheads_in_l2, c.pack_gqa,
           c.tile_m, c.tile_n, plan.prepare_semaphore, options)  # fmt: skip
    pool = metadata_pools(rt).get(key)
    if pool is None:

        def make(batch: int, buffer: tuple[int, int]) -> SchedulerMetadata:
            return SchedulerMetadata(
                batch, fc.nheads, nheads_kv, f["head_dim"], f["head_dim_v"], causal=plan.num_nheads_in_l2,
                pack_gqa=c.pack_gqa, tile_m=c.tile_m, tile_n=c.tile_n, semaphore=plan.prepare_semaphore,
                options=options, runtime=rt, buffer=buffer,
            )  # fmt: skip

        pool = metadata_pools(rt)[key] = MetadataPool(rt, stream, make)
    md = pool.get(fc.batch)
    md.compute(
        max_seqlen_q=fc.max_q,
        max_seqlen_k=fc.max_k,
        num_splits=fc.num_splits,
        cu_seqlens_q=fc.cu_q,
        cu_seqlens_k=fc.cu_k,
        seqused_q=fc.su_q,
        seqused_k=fc.su_k,
        stream=stream,
    )
    return md
