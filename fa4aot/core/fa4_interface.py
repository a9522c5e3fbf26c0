"""What fa4aot restates of FA4's ``flash_attn/cute/interface.py`` (4.0.0b40): the host glue around
FA4's selector. Every decision FA4 states in ``config.py`` is taken from FA4 itself
(:mod:`fa4aot.core.selector`); this module holds only what ``interface.py`` computes around it -
the selector's inputs, the window handling, the scheduler-metadata route, the tensor-map
workspace bound, the compile key - each function naming the lines it mirrors. The fake-mode parity
tests (tests/test_dispatch.py) run FA4's interface and this module on the same calls.

Pure Python: no FA4, torch or DSL import (the runtime uses it on every call's first sight).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from fa4aot.core.bounded import BoundedDict
from fa4aot.core.errors import ArgumentError

#: FA4 4.0.0b40 ``tile_scheduler.py`` 1508: the semaphore's low bits count claimed tiles.
SEMAPHORE_CLAIM_BITS = 24
#: FA4 4.0.0b40 ``interface.py`` 99: above this batch size FA4's single-tile varlen scheduler
#: gets a batch-lookup aid (extra kernels); fa4aot runs the same scheduler without it.
BIN_BATCH_SEARCH_THRESH = 256
#: ``SchedulerMetadata.kind`` of metadata from FA4's ``_get_scheduler_metadata`` that skipped its
#: prepare kernel: no buffers at all (the forward runs its kernel without them).
UNPREPARED = "unprepared"


def kernel_takes_metadata(arch_major: int) -> bool:
    """FA4 4.0.0b40 ``interface.py`` 1690-1712: only its SM100-family forwards (10.x, 11.x) get the
    scheduler metadata tensors; the SM80 / SM90 / SM120 kernels take none (their compile key
    still names them, so FA4 compiles one identical kernel per combination: fa4aot builds one)."""
    return arch_major in (10, 11)


def needs_prepare_kernel(num_splits: int, causal: bool) -> bool:
    """FA4 4.0.0b40 ``interface.py`` 4381-4382 (``_get_scheduler_metadata``): the prepare kernel
    runs for split-KV or causal calls (or LPT sort, which FA4 does not implement); otherwise the
    metadata holds no buffers (``needs_prepare_kernel = is_split_kv or causal or sort``)."""
    return num_splits > 1 or causal


#: The call features FA4's forward and backward both key their kernels on (fa4aot's names):
#: the head of each family's call fields (fwd.CALL_FIELDS, backward.CALL_FIELDS).
ATTENTION_CALL_FIELDS = (
    "dtype",
    "head_dim",
    "head_dim_v",
    "qhead_per_kvhead",
    "causal",
    "local",
    "varlen_q",
    "varlen_k",
    "seqused_q",
    "seqused_k",
)
#: ``str(torch dtype)`` of each fa4aot dtype: what FA4 puts in ``FwdHeuristicInputs.dtype``.
TORCH_DTYPE_NAMES = {
    "bf16": "torch.bfloat16",
    "fp16": "torch.float16",
    "fp32": "torch.float32",
    "e4m3": "torch.float8_e4m3fn",
    "e5m2": "torch.float8_e5m2",
}
#: FA4's FP8 element types (interface.py 746: q, k, v in one of them, or bf16 / fp16).
FP8_DTYPES = ("e4m3", "e5m2")
#: The per-tensor layouts of a ``TensorwiseScales`` descale as the kernel takes it: one fp32 per
#: (batch, kv_head) with the heads contiguous (``full``), or one per KV head broadcast over the
#: batch (``per_head``: strides (0, 1), which CuTe keeps static - FA4's compile key holds
#: ``get_broadcast_dims``). FA4 copies any other layout to a contiguous tensor per call
#: (``maybe_contiguous``); fa4aot allocates nothing per call, so it refuses them.
DESCALE_LAYOUTS = ("none", "full", "per_head")
#: MXFP8 ``BlockScales`` paths (FwdHeuristicInputs.mxfp8_path): ``qk`` scales e4m3 Q and K (V
#: bf16), ``pv`` also e4m3 V.
MXFP8_PATHS = ("qk", "pv")
#: Head dims MXFP8 takes (interface.py 567-568).
MXFP8_HEAD_DIMS = (64, 128)
#: UE8M0 scales per (batch, head, 128 MN x 128 K tile) of an interleave_sf buffer (interface.py 580).
MXFP8_SCALES_PER_TILE = 512
MXFP8_TILE = 128
#: ``FwdConfig`` fields that never reach a forward kernel's code: the device family (the arch
#: says it) and the dynamic-varlen route (only who allocates the semaphore; FA4 keys it out).
NOT_CODEGEN = ("device_capacity", "use_dynamic_varlen")


class DynamicPersistentVarlenScheduler:
    """The host half of FA4's ``tile_scheduler.DynamicPersistentVarlenScheduler`` that
    ``config.py`` imports (4.0.0b40 ``tile_scheduler.py`` 1524-1543)."""

    MAX_TILES = 1 << SEMAPHORE_CLAIM_BITS

    @staticmethod
    def max_claimable_tiles(
        total_q: int, batch_size: int, m_tile: int, num_head: int, num_head_kv: int, pack_gqa: bool, num_splits: int
    ) -> int:
        rows_per_token = num_head // num_head_kv if pack_gqa else 1
        heads = num_head_kv if pack_gqa else num_head
        requests = min(batch_size, total_q)
        return (total_q * rows_per_token // m_tile + requests + 1) * heads * max(num_splits, 1)


def resolve_window(causal: bool, left: int | None, right: int | None) -> tuple[bool, bool, int | None, int | None]:
    """``_resolve_causal_local_window`` (interface.py 279-300, without a mask_mod):
    (causal, local, left, right)."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    if left is not None or right is not None:
        if left is None and right == 0:
            return True, False, None, None
        return False, True, left, right
    return causal, False, left, right


def clamp_window(local: bool, left: int | None, right: int | None, q_capacity: int, k_capacity: int):
    """``_clamp_local_window`` (interface.py 303-318): each side at most the longest sequence it
    can see (the kernels add the sides to positions in 32 bits)."""
    if local:
        if left is not None:
            left = min(left, k_capacity)
        if right is not None:
            right = min(right, q_capacity)
    return left, right


def out_dtype(dtype: str, mxfp8: str | None = None) -> str:
    """The output dtype of a forward (interface.py 808): bf16 for FP8 or MXFP8 inputs, else q's."""
    return "bf16" if dtype in FP8_DTYPES or mxfp8 else dtype


def fp8_problem(
    arch_major: int, dtype: str, requires_grad: bool, descales: str | None, mxfp8: str | None
) -> str | None:
    """Why FA4 refuses a forward with FP8 inputs, descales or MXFP8 block scales (None: it takes
    it): interface.py 801-803 (MXFP8 needs SM100-family hardware), 805-807 (no FP8 backward),
    502-504 (descales only for FP8 inputs), 858-859 (FP8 only on SM100-family), and the
    :data:`DESCALE_LAYOUTS` fa4aot builds."""
    if mxfp8 is not None:
        if mxfp8 not in MXFP8_PATHS:
            return f"mxfp8 must be one of {MXFP8_PATHS}, got {mxfp8!r}"
        if arch_major != 10:
            return "QK MXFP8 requires SM100-family hardware"
        if dtype != "e4m3":
            return "Native MXFP8 PV requires e4m3 Q/K/V" if mxfp8 == "pv" else "QK MXFP8 requires e4m3 Q/K and bf16 V"
        if requires_grad:
            return f"{'Native MXFP8 PV' if mxfp8 == 'pv' else 'QK MXFP8'} is forward-only"
        if descales is not None:
            return "scales are TensorwiseScales or BlockScales, not both"
        return None
    if descales is not None:
        layouts = descales.split(",")
        if len(layouts) != 3 or any(x not in DESCALE_LAYOUTS for x in layouts):
            return f"descales must be three of {DESCALE_LAYOUTS} (q, k, v), got {descales!r}"
        if dtype not in FP8_DTYPES and any(x != "none" for x in layouts):
            return "TensorwiseScales are only supported for FP8 inputs"
    if dtype in FP8_DTYPES:
        if requires_grad:
            return "FA4 CuTe FP8 backward is not supported yet (forward-only)."
        if arch_major != 10:
            return "FP8 is only supported on SM100 (compute capability 10.x) for FA4 CuTe."
    return None


def mxfp8_problem(f: FwdFacts) -> str | None:
    """The call shapes MXFP8 takes (``_validate_block_scales``, interface.py 548-569): dense
    (no varlen, seqused or page table), unsplit, head dims 64 / 128; the PV path also non-causal,
    non-local, without sink or softcap."""
    mode = "Native MXFP8 PV" if f.mxfp8 == "pv" else "QK MXFP8"
    if f.mxfp8 == "pv":
        causal, local, _, _ = resolve_window(f.causal, f.window_left, f.window_right)
        if causal or local:
            return "Native MXFP8 PV supports only noncausal, nonlocal attention"
    if f.varlen_q or f.varlen_k or f.seqused_q or f.seqused_k or f.page_size is not None or f.num_splits != 1:
        return f"{mode} supports only dense, unsplit attention"
    if f.mxfp8 == "pv" and (f.learnable_sink or f.softcap):
        return "Native MXFP8 PV does not support sinks, softcap, modifiers, or auxiliary data"
    if f.head_dim not in MXFP8_HEAD_DIMS or f.head_dim_v not in MXFP8_HEAD_DIMS:
        return f"{mode} supports head dimensions 64 and 128"
    return None


def mxfp8_scale_count(batch: int, heads: int, mn: int, k_extent: int) -> int:
    """Elements of an interleave_sf scale buffer for an operand (interface.py 579-582)."""
    tiles = -(-mn // MXFP8_TILE) * -(-k_extent // MXFP8_TILE)
    return batch * heads * tiles * MXFP8_SCALES_PER_TILE


class FwdFacts(NamedTuple):
    """The host facts ``_flash_attn_fwd`` derives from a call's tensors and arguments (what its
    config selection reads), for calls without qv, score_mod, mask_mod, block sparsity or aux
    tensors. ``max_seqlen_q`` / ``max_seqlen_k``: the caller's host bounds, or None."""

    arch: int  # e.g. 100 for sm_100a
    num_sms: int
    dtype: str  # fa4aot dtype name
    head_dim: int
    head_dim_v: int
    num_heads: int
    num_heads_kv: int
    batch: int
    total_q: int
    total_k: int  # K/V tokens stored: math.prod(v.shape[:-2])
    q_capacity: int  # seqlen_q, or total_q with cu_seqlens_q
    k_capacity: int  # seqlen_k, total_k with cu_seqlens_k, max_pages * page_size with a page table
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    causal: bool = False
    window_left: int | None = None
    window_right: int | None = None
    varlen_q: bool = False
    varlen_k: bool = False
    seqused_q: bool = False
    seqused_k: bool = False
    page_size: int | None = None
    caller_metadata: bool = False
    caller_semaphore: bool = False
    #: the caller's metadata came from a prepare kernel (False: FA4's get_scheduler_metadata skipped it)
    caller_prepared: bool = True
    softcap: bool = False
    learnable_sink: bool = False
    has_lse: bool = False
    pack_gqa: bool | None = None
    num_splits: int = 1
    requires_grad: bool = False
    #: FA4's tile_mn / mma_pv_is_rs / intra_wg_overlap arguments (requests its selector honours)
    requested_tile: tuple[int, int] | None = None
    requested_mma_pv_is_rs: bool | None = None
    requested_intra_wg_overlap: bool | None = None
    #: FP8 descale layouts "q,k,v" (each of DESCALE_LAYOUTS; None: no TensorwiseScales given)
    descales: str | None = None
    #: MXFP8 BlockScales path (MXFP8_PATHS; None: none)
    mxfp8: str | None = None


class Knobs(NamedTuple):
    """FA4's environment knobs that steer selection (``utils._get_disable_2cta_default``,
    ``_get_disable_s_ping_pong_default``, ``_get_sm100_backend_override``)."""

    disable_2cta: bool = False
    disable_s_ping_pong: bool = False
    use_swapab: bool | None = None  # FLASH_ATTENTION_SM100_BACKEND: None auto, True swapab, False standard


def knobs_from_env(environ: Any) -> Knobs:
    """The knobs as FA4 reads them (``FA_DISABLE_2CTA``, ``FA_DISABLE_S_PING_PONG``,
    ``FLASH_ATTENTION_SM100_BACKEND``); a bad backend value raises ValueError as FA4 does."""
    backend = environ.get("FLASH_ATTENTION_SM100_BACKEND", "auto")
    overrides = {"auto": None, "swapab": True, "standard": False}
    if backend not in overrides:
        raise ValueError("FLASH_ATTENTION_SM100_BACKEND must be auto, standard, or swapab")
    return Knobs(
        environ.get("FA_DISABLE_2CTA", "0") == "1",
        environ.get("FA_DISABLE_S_PING_PONG", "0") == "1",
        overrides[backend],
    )


NO_KNOBS = Knobs()


def problem_inputs(f: Any) -> dict[str, Any]:
    """The problem's sizes as both of FA4's heuristics inputs name them (``FwdHeuristicInputs``,
    ``BwdHeuristicInputs``), from a call's facts (:class:`FwdFacts` or the backward's ``BwdFacts``)."""
    return dict(
        device_arch=f.arch,
        dtype=TORCH_DTYPE_NAMES[f.dtype],
        head_dim=f.head_dim,
        head_dim_v=f.head_dim_v,
        num_heads=f.num_heads,
        num_heads_kv=f.num_heads_kv,
        batch_size=f.batch,
        total_q=f.total_q,
        total_k=f.total_k,
    )


def fwd_inputs(sel: Any, f: FwdFacts, knobs: Knobs = NO_KNOBS) -> Any:
    """``FwdHeuristicInputs`` as ``_flash_attn_fwd`` builds them (interface.py 860-935 with
    ``_get_fwd_config`` 200-263 and ``_get_fwd_inputs`` 176-197); ``sel``: FA4's selector module.
    The window is the one given (FA4 selects on the unclamped sides)."""
    causal, local, wl, wr = resolve_window(f.causal, f.window_left, f.window_right)
    max_q = f.q_capacity if f.max_seqlen_q is None else f.max_seqlen_q
    max_k = f.k_capacity if f.max_seqlen_k is None else f.max_seqlen_k
    return sel.FwdHeuristicInputs(
        **problem_inputs(f),
        num_sms=f.num_sms,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        has_max_seqlen_q_hint=f.max_seqlen_q is not None,
        causal=causal,
        local=local,
        window_size_left=wl,
        window_size_right=wr,
        has_cu_seqlens_q=f.varlen_q,
        has_cu_seqlens_k=f.varlen_k,
        has_seqused_q=f.seqused_q,
        has_seqused_k=f.seqused_k,
        has_caller_scheduler_metadata=f.caller_metadata,
        has_tile_count_semaphore=f.caller_metadata and f.caller_semaphore,
        pack_gqa=f.pack_gqa,
        page_size=f.page_size,
        has_score_mod=f.softcap,
        has_learnable_sink=f.learnable_sink,
        has_lse=f.has_lse,
        requested_num_splits=None if f.num_splits < 1 else f.num_splits,
        disable_2cta=knobs.disable_2cta,
        disable_s_ping_pong=knobs.disable_s_ping_pong,
        requested_use_swapab=knobs.use_swapab,
        seqlen_k_capacity=f.k_capacity,
        requires_grad=f.requires_grad,
        requested_tile_m=None if f.requested_tile is None else f.requested_tile[0],
        requested_tile_n=None if f.requested_tile is None else f.requested_tile[1],
        requested_mma_pv_is_rs=f.requested_mma_pv_is_rs,
        requested_intra_wg_overlap=f.requested_intra_wg_overlap,
        mxfp8_path=f.mxfp8,
    )


class FwdPlan(NamedTuple):
    """What ``_flash_attn_fwd`` does with a selected config beyond the kernel: the split count,
    who provides the scheduler metadata, and which metadata tensors reach the kernel."""

    num_splits: int
    prepare: bool  # run the prepare kernel (``needs_split_metadata``)
    prepare_semaphore: bool  # the prepare kernel zeroes a tile semaphore (FA4: unless CLC)
    dynamic_route: bool  # allocate a zeroed tile semaphore, no prepare (``use_dynamic_varlen``)
    num_splits_dynamic: bool
    tile_count_semaphore: bool
    num_nheads_in_l2: bool
    tensormap_workspace: bool


def fwd_plan(sel: Any, config: Any, inputs: Any, f: FwdFacts) -> FwdPlan:
    """interface.py 938-1102 for a non-MLA call: the prepare decision (``needs_split_metadata``),
    the dynamic-varlen route, the metadata tensors the kernel gets (SwapAB keeps only the split
    counts) and whether a tensor-map workspace is passed (SM90 / SM100 varlen-K or seqused_k calls
    without a page table)."""
    causal, _, _, _ = resolve_window(f.causal, f.window_left, f.window_right)
    prepare = bool(sel.needs_split_metadata(config, inputs))
    route = bool(config.use_dynamic_varlen) and not f.caller_metadata
    # _get_scheduler_metadata allocates the semaphore unless CLC (interface.py 4395-4399); SwapAB drops it
    # from the forward's arguments afterwards (1138-1140), not from the prepare kernel's.
    prepare_semaphore = prepare and not config.use_clc_scheduler
    if prepare:
        nsd, sem, l2 = True, not config.use_clc_scheduler, causal and not config.use_swapab
    elif route:
        nsd, sem, l2 = False, True, False
    elif f.caller_metadata and f.caller_prepared:
        nsd, sem, l2 = True, f.caller_semaphore, causal  # fa4aot's SchedulerMetadata: FA4's prepare outputs
    else:
        nsd = sem = l2 = False
    if config.use_swapab:
        sem = l2 = False
    if not kernel_takes_metadata(f.arch // 10):
        nsd = sem = l2 = False
    workspace = f.arch // 10 in (9, 10, 11) and f.page_size is None and (f.varlen_k or f.seqused_k)
    return FwdPlan(config.num_splits, prepare, prepare_semaphore, route, nsd, sem, l2, workspace)


class PrepareOptions(NamedTuple):
    """The options of FA4's ``_get_scheduler_metadata`` that shape its prepare kernel's split rule
    (``prepare_scheduler.num_splits_for_sequence``), under FA4's names - the same in its signature
    (interface.py 4350-4352), its compile key (4425-4427) and ``FlashPrepareScheduler``'s
    constructor (4470-4474). ``min_blocks_floor``: (low CTAs, min blocks), or None;
    ``zfill_padded_output``: every sequence gets at least one split, so the forward writes (zeros
    to) the output rows of an empty one (False: FA4 may give it none, leaving them untouched)."""

    ctas_per_sm: int = 1
    min_blocks_floor: tuple[int, int] | None = None
    zfill_padded_output: bool = True

    def fields(self) -> dict[str, Any]:
        """As a prepare variant's fields (the floor as ``floor_ctas`` / ``floor_blocks``; 0: none)."""
        d = self._asdict()
        d["floor_ctas"], d["floor_blocks"] = d.pop("min_blocks_floor") or (0, 0)
        return d

    @classmethod
    def of_fields(cls, f: Mapping[str, Any]) -> PrepareOptions:
        """The options a prepare variant was built with (the inverse of :meth:`fields`)."""
        floor = (f["floor_ctas"], f["floor_blocks"]) if f["floor_ctas"] else None
        return cls(**{n: f[n] for n in cls._fields if n != "min_blocks_floor"}, min_blocks_floor=floor)

    @classmethod
    def of_call(cls, args: Any) -> PrepareOptions:
        """The options among an FA4 call's arguments (any object with FA4's parameter names as
        attributes), checked."""
        return cls(**{n: getattr(args, n) for n in cls._fields}).checked()

    def kwargs(self) -> dict[str, Any]:
        """The options as FA4's ``_get_scheduler_metadata`` and ``FlashPrepareScheduler`` take them."""
        return self._asdict()

    def checked(self) -> PrepareOptions:
        """These options, or ArgumentError naming the first one FA4's kernel cannot take."""
        if self.ctas_per_sm.__class__ is not int or self.ctas_per_sm < 1:
            raise ArgumentError(f"ctas_per_sm: expected an int >= 1, got {self.ctas_per_sm!r}")
        floor = self.min_blocks_floor
        if floor is not None and not (
            isinstance(floor, tuple) and len(floor) == 2 and all(x.__class__ is int and x > 0 for x in floor)
        ):
            raise ArgumentError(f"min_blocks_floor: expected (low_ctas, min_blocks), got {floor!r}")
        if self.zfill_padded_output.__class__ is not bool:
            raise ArgumentError(f"zfill_padded_output: expected True or False, got {self.zfill_padded_output!r}")
        return self


#: FA4's defaults of every prepare option.
DEFAULT_PREPARE_OPTIONS = PrepareOptions()


def forward_prepare_options(sel: Any, config: Any, head_dim: int) -> PrepareOptions:
    """The prepare kernel's options FA4's forward passes for ``config`` (interface.py 1096:
    ``SWAPAB.split_policy`` for its SwapAB kernel, FA4's defaults otherwise)."""
    if not config.use_swapab:
        return DEFAULT_PREPARE_OPTIONS
    return PrepareOptions(**sel.SWAPAB.split_policy(head_dim))


def prepare_fields(
    num_batch: int,
    heads: tuple[int, int],
    head_dims: tuple[int, int],
    tile: tuple[int, int],
    causal: bool,
    pack_gqa: bool,
    semaphore: bool,
    options: PrepareOptions,
) -> dict[str, Any]:
    """A prepare variant's fields but its varlen inputs (what FA4's compile key holds,
    interface.py 4402-4428): ``causal`` adds the L2 head swizzle, ``semaphore`` resets the tile
    semaphore (FA4: unless its CLC scheduler runs)."""
    return dict(
        num_warps=prepare_num_warps(num_batch),
        nheads=heads[0],
        nheads_kv=heads[1],
        headdim=head_dims[0],
        headdim_v=head_dims[1],
        tile_m=tile[0],
        tile_n=tile[1],
        causal=causal,
        pack_gqa=pack_gqa,
        has_semaphore=semaphore,
        **options.fields(),
    )


def tensormap_workspace_ctas(
    pack_gqa: bool,
    tile_m: int,
    num_heads: int,
    num_heads_kv: int,
    num_sms: int,
    q_rows: int,
    q_batch: int,
    num_splits: int,
) -> int:
    """The workspace's slot count FA4 allocates (interface.py 1220-1231): an upper bound on the
    grid's CTAs. ``q_rows``: q.shape[0] for varlen Q, else batch * seqlen_q; ``q_batch``: the
    batch (cu_seqlens_q's length - 1, or q.shape[0])."""
    base, per_batch, least = tensormap_workspace_terms(pack_gqa, tile_m, num_heads, num_heads_kv, num_sms, q_rows,
                                                       num_splits)  # fmt: skip
    return max(base + per_batch * q_batch, least)


def tensormap_workspace_terms(
    pack_gqa: bool, tile_m: int, num_heads: int, num_heads_kv: int, num_sms: int, q_rows: int, num_splits: int
) -> tuple[int, int, int]:
    """FA4's slot count (:func:`tensormap_workspace_ctas`) as a function of the batch: ``(base,
    per_batch, least)`` with slots ``max(base + per_batch * q_batch, least)``, so a call whose
    batch changes computes it in one expression. FA4's lines: ``m_blocks_bound = q_rows * q_mult
    // tile_m + 2 * q_batch + 1``, ``max(m_blocks_bound * heads * num_splits, 2 * num_sms) + 8``."""
    qhead_per_kvhead = num_heads // num_heads_kv
    q_mult = qhead_per_kvhead if pack_gqa and qhead_per_kvhead > 1 else 1
    heads = num_heads_kv if q_mult > 1 else num_heads
    per_block = heads * num_splits
    return ((q_rows * q_mult // tile_m + 1) * per_block + TENSORMAP_SLACK, 2 * per_block,
            2 * num_sms + TENSORMAP_SLACK)  # fmt: skip


#: Slots FA4 adds to its bound (interface.py: ``... + 8``).
TENSORMAP_SLACK = 8


#: int64 words per slot of the workspace (one 128-byte TMA descriptor).
TENSORMAP_WORDS = 16


#: FwdConfig -> its codegen fields (a call with new shapes re-selects, and FA4 returns one of a
#: few configs: converting it again cost ~11 us of dataclass walking per call).
_CODEGEN_FIELDS: BoundedDict = BoundedDict(256)


def codegen_fields(config: Any) -> dict[str, Any]:
    """The variant fields of a selected ``FwdConfig``: what its compile key holds
    (``fwd_codegen_config``, interface.py 270: the split count only as split or not; and
    ``use_dynamic_varlen`` keyed out, 1237), every other field as FA4 names it. Registers become
    ``regs_<role>`` ints (or nothing, for SwapAB and SM120). ``config``: a FwdConfig, or its
    fields as a dict (a recorded key's)."""
    if not isinstance(config, dict) and (known := _CODEGEN_FIELDS.get(config)) is not None:
        return dict(known)  # a config seen before: FA4's configs are frozen dataclasses, equal by value
    out = {}
    items = config.items() if isinstance(config, dict) else config_fields(config).items()
    for name, value in items:
        if name in NOT_CODEGEN:
            continue
        if name == "num_splits":
            value = min(value, 2)
        if name == "registers":
            if value is not None:
                out.update({f"regs_{k}": v for k, v in value.items()})
            continue
        out[name] = value
    if not isinstance(config, dict):
        _CODEGEN_FIELDS[config] = dict(out)
    return out


def config_from_fields(sel: Any, fields: dict[str, Any], arch: str) -> Any:
    """The ``FwdConfig`` a variant's fields stand for (the inverse of :func:`codegen_fields`), for
    the kernel constructor."""
    names = {f.name for f in dataclasses.fields(sel.FwdConfig)}
    kw = {k: v for k, v in fields.items() if k in names}
    regs = {k[5:]: v for k, v in fields.items() if k.startswith("regs_")}
    major = int(arch.removeprefix("sm_").rstrip("af")) // 10
    if not regs:
        registers = None
    elif major == 9:
        registers = sel.Sm90Registers(**regs)
    else:
        registers = sel.Sm100Registers(**regs)
    return sel.FwdConfig(device_capacity=major, registers=registers, use_dynamic_varlen=False, **kw)


def arch_number(arch: str) -> int:
    """FA4's integer arch (``_parse_arch_str``): sm_100a -> 100."""
    return int(arch.removeprefix("sm_").rstrip("af"))


def combine_geometry(head_dim: int, num_splits: int) -> tuple[int, int, int]:
    """``combine_kernel_geometry`` (interface.py 4129-4140): (tile_m, k_block_size, log_max_splits)."""
    import math

    k_block_size = 64 if head_dim <= 64 else 128
    tile_m = 16 if k_block_size == 64 else 8
    log_max_splits = max(math.ceil(math.log2(max(num_splits, 1))), 5 if tile_m == 8 else 4)
    return tile_m, k_block_size, log_max_splits


#: The combine kernel's largest split count: its LSE buffer in shared memory holds 2**8 splits
#: (fa4aot's bound on ``log_max_splits``; FA4's combine ``can_implement``, interface.py 4088).
COMBINE_MAX_LOG_SPLITS = 8
COMBINE_MAX_SPLITS = 1 << COMBINE_MAX_LOG_SPLITS
#: The prepare kernel's warp counts (interface.py 4399-4400: 31 batches a warp, a power of two).
PREPARE_WARPS = (1, 2, 4, 8, 16, 32)


def prepare_num_warps(num_batch: int) -> int:
    """The prepare kernel's warp count for a batch (interface.py 4399-4400)."""
    num_warps = min((num_batch + 30) // 31, 32)
    return 1 << max(num_warps - 1, 0).bit_length()


#: Bytes per element of fa4aot's dtypes (FA4's alignment is 16 bytes of them, interface.py 790).
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "e4m3": 1, "e5m2": 1}


def head_dims_problem(arch_major: int, head_dim: int, head_dim_v: int, dtype: str) -> str | None:
    """``_validate_head_dims`` (interface.py 134-151, called at 791-792 and 2317: not on SM80 or
    SM120), plus the one shape fa4aot refuses on its own: head_dim_v 512, FA4's MLA path (qv)."""
    if head_dim_v == 512:
        return "head_dim_v 512 is FA4's MLA path (qv), which fa4aot does not build"
    alignment = 16 // DTYPE_BYTES[dtype]
    aligned = head_dim % alignment == 0 and head_dim_v % alignment == 0
    if arch_major == 9:
        if not (8 <= head_dim <= 256 and 8 <= head_dim_v <= 256 and aligned):
            return (
                f"(head_dim, head_dim_v)=({head_dim}, {head_dim_v}) is not supported on SM90: FA4 takes "
                f"8..256, multiples of {alignment}"
            )
    elif arch_major in (10, 11):
        standard = 8 <= head_dim <= 128 and 8 <= head_dim_v <= 128
        if not ((standard or (head_dim, head_dim_v) in ((192, 128), (256, 256))) and aligned):
            return (
                f"(head_dim, head_dim_v)=({head_dim}, {head_dim_v}) is not supported on SM100: FA4 "
                f"takes 8..128 (multiples of {alignment}), (192, 128) or (256, 256)"
            )
    return None


#: SM120's shared memory per block (``get_smem_capacity_in_bytes("sm_120")``, 99 KiB).
SM120_SMEM_CAPACITY = 101376
#: FA4 builds its SM120 forward with one K/V stage and 128 threads (interface.py 1531-1532).
SM120_STAGES = 1
SM120_THREADS = 128


def sm120_problem(f: dict[str, Any]) -> str | None:
    """Why FA4's SM120 forward cannot compile a selected config (None: it can):
    ``FlashAttentionForwardSm120.can_implement`` (flash_fwd_sm120.py 22-62) and the SM80 kernel's
    refusal of a learnable sink (flash_fwd.py 651). FA4's interface checks neither before it
    compiles (interface.py 1543), so fa4aot refuses these calls up front."""
    if f["dtype"] not in ("bf16", "fp16"):
        return f"FA4's SM120 forward takes bf16 or fp16, not {f['dtype']}"
    if f["learnable_sink"] != "none":
        return "FA4's SM120 forward (its SM80 kernel) takes no learnable sink"
    hd, hdv, tile_m, tile_n = f["head_dim"], f["head_dim_v"], f["tile_m"], f["tile_n"]
    if hd % 8 or hdv % 8:
        return "head dims must be multiples of 8 (FlashAttentionForwardSm120.can_implement)"
    smem = 2 * (tile_m * hd + SM120_STAGES * tile_n * (hd + hdv))
    if smem > SM120_SMEM_CAPACITY:
        return (
            f"(head_dim, head_dim_v)=({hd}, {hdv}) is not supported on SM120: FA4's {tile_m}x{tile_n} "
            f"tiles need {smem} bytes of shared memory, more than SM120's {SM120_SMEM_CAPACITY}"
        )
    return None


def config_fields(config: Any) -> dict[str, Any]:
    """A FwdConfig's fields (``registers`` a mapping, or None)."""
    return {
        f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v := getattr(config, f.name)) else v)
        for f in dataclasses.fields(config)
    }


def as_fwd_config(sel: Any, config: Any) -> Any:
    """An explicit forward config (FA4's ``config=`` argument) as the selector module's
    ``FwdConfig``: FA4's own ``FwdConfig`` (or any dataclass with its fields) or a mapping of its
    fields (``registers`` a mapping of the register roles, or None)."""
    if isinstance(config, sel.FwdConfig):
        return config
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, dict):
        fields = dict(config)
    else:
        raise TypeError(f"config must be a FwdConfig (or a mapping of its fields), got {type(config).__name__}")
    regs = fields.get("registers")
    if regs is not None and not isinstance(regs, (sel.Sm90Registers, sel.Sm100Registers)):
        regs = dataclasses.asdict(regs) if dataclasses.is_dataclass(regs) else dict(regs)
        cls = sel.Sm90Registers if set(regs) == {"mma", "producer"} else sel.Sm100Registers
        fields["registers"] = cls(**regs)
    names = {f.name for f in dataclasses.fields(sel.FwdConfig)}
    unknown = set(fields) - names
    if unknown:
        raise TypeError(f"config: unknown FwdConfig fields {sorted(unknown)}")
    return sel.FwdConfig(**fields)
