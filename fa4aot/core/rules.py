"""FA4 4.0.0b36's own rules, restated as pure functions: head-dim limits, tile choices, the combine
kernel's tiling, the prepare kernel's warp count, window resolution and the split heuristic.

Shared by the manifest expander (which variants exist), the runtime's dispatch (which variant a call
needs) and the tests, which check them against FA4 itself.
"""

from __future__ import annotations

import math

#: Prepare kernel warp counts: FA4 sizes the CTA by batch (31 batches per warp), rounded up to a
#: power of two; above 31 * 32 = 992 batches it launches several CTAs of 32 warps.
PREPARE_WARPS = (1, 2, 4, 8, 16, 32)
#: The combine kernel's largest split count: FA4 compiles it with log_max_splits <= 8 (its LSE
#: buffer in shared memory holds 2**8 splits).
COMBINE_MAX_LOG_SPLITS = 8
COMBINE_MAX_SPLITS = 1 << COMBINE_MAX_LOG_SPLITS
#: Minimum KV blocks per split for S ping-pong (FA4 ``S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT``).
S_PING_PONG_MIN_N_BLOCKS_PER_SPLIT = {64: 16, 128: 64}


def prepare_num_warps(num_batch: int) -> int:
    """FA4's warp count for the prepare kernel at this batch size."""
    num_warps = min((num_batch + 30) // 31, 32)
    return 1 << max(num_warps - 1, 0).bit_length()


def combine_tiling(head_dim: int) -> tuple[int, int, int]:
    """(k_block_size, tile_m, min log_max_splits) FA4 uses for the combine kernel at head_dim."""
    k_block_size = 64 if head_dim <= 64 else 128
    tile_m = 8 if k_block_size % 128 == 0 else (16 if k_block_size % 64 == 0 else 32)
    min_log = 5 if tile_m == 8 else 4
    return k_block_size, tile_m, min_log


def combine_log_max_splits(num_splits: int, head_dim: int) -> int:
    """FA4's log_max_splits for a call with ``num_splits`` splits."""
    _, _, min_log = combine_tiling(head_dim)
    return max(math.ceil(math.log2(max(num_splits, 1))), min_log)


def sm90_tile(head_dim: int, head_dim_v: int, causal: bool, local: bool) -> tuple[int, int, bool, bool]:
    """FA4's SM90 forward config: (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap)."""
    if head_dim <= 64:
        return 192, 128, True, True
    if head_dim <= 96:
        return (192, 128, False, True) if (causal or local) else (192, 144, False, True)
    if head_dim <= 128:
        return 128, 128, True, True
    if head_dim <= 192:
        tile_n = 96 if local else (128 if head_dim_v <= 128 else 112)
        return 128, tile_n, True, True
    return 128, (64 if local else 80), True, True


#: FA4's SM90 forward double-buffers K and V (``num_stages`` 2) and reserves 1 KiB for its
#: mbarriers; Q, K and V tiles are 2-byte elements. Checked against the smem FA4's host code
#: records in every SM90 launch plan (tests/test_tuning.py).
SM90_KV_STAGES = 2
SM90_SMEM_RESERVED = 1024
#: tile_m values FA4's SM90 forward uses (one MMA warp group per 64 rows, at most 3 of them),
#: and the tile_n step of its warpgroup MMA.
SM90_TILE_MS = (128, 192)
SM90_TILE_N_STEP = 16
SM90_TILE_N_RANGE = (64, 256)
#: Registers FA4's SM90 forward gives each MMA thread by warp-group count (``setmaxregister``,
#: flash_fwd_sm90.py), and what the rest of the kernel needs beyond the accumulators: ptxas
#: rejects 192x256 at head_dim 64 (160 accumulator registers of 160).
SM90_MMA_REGS = {1: 256, 2: 240, 3: 160}
SM90_REG_HEADROOM = 32


def sm90_smem_bytes(tile_m: int, tile_n: int, head_dim: int, head_dim_v: int, mma_pv_is_rs: bool = True) -> int:
    """Dynamic shared memory FA4's SM90 forward asks for with these tiles (bf16/fp16); without
    ``mma_pv_is_rs`` P goes through a (tile_m, tile_n) shared buffer."""
    p = 0 if mma_pv_is_rs else tile_m * tile_n
    return 2 * (tile_m * head_dim + SM90_KV_STAGES * tile_n * (head_dim + head_dim_v) + p) + SM90_SMEM_RESERVED


def sm90_candidate_tile_problem(
    tile_m: int, tile_n: int, head_dim: int, head_dim_v: int, smem_limit: int, mma_pv_is_rs: bool = True
) -> str | None:
    """Why (tile_m, tile_n) cannot be a tuning candidate of FA4's SM90 forward (None: it can).
    tile_m 192 (three MMA warp groups) is what FA4 runs only up to head dim 96: above that the
    accumulators do not fit the registers FA4 gives each warp group."""
    if tile_m not in SM90_TILE_MS:
        return f"tile_m must be one of {SM90_TILE_MS}"
    if tile_m == 192 and head_dim > 96:
        return "tile_m 192 is FA4's SM90 tile only up to head_dim 96"
    lo, hi = SM90_TILE_N_RANGE
    if tile_n % SM90_TILE_N_STEP or not lo <= tile_n <= hi:
        return f"tile_n must be a multiple of {SM90_TILE_N_STEP} in {lo}..{hi}"
    wgs = tile_m // 64
    regs = tile_n // 2 + head_dim_v // 2  # fp32 S and O accumulators per MMA thread
    if regs > SM90_MMA_REGS[wgs] - SM90_REG_HEADROOM:
        return (
            f"the S and O accumulators ({regs} registers a thread) leave too few of the "
            f"{SM90_MMA_REGS[wgs]} FA4 gives each of {wgs} MMA warp groups"
        )
    smem = sm90_smem_bytes(tile_m, tile_n, head_dim, head_dim_v, mma_pv_is_rs)
    if smem > smem_limit:
        return f"needs {smem} bytes of shared memory, more than the {smem_limit} an SM90 block can have"
    return None


def _pad16(x: int) -> int:
    return int(math.ceil(x / 16) * 16)


def sm100_head_dims_ok(head_dim: int, head_dim_v: int, dtype: str) -> str | None:
    """FA4 ``_validate_head_dims`` for SM100 (without the MLA shapes fa4aot does not build)."""
    alignment = 8  # 16 bytes of a 2-byte dtype
    standard = 8 <= head_dim <= 128 and 8 <= head_dim_v <= 128
    deepseek = head_dim == 192 and head_dim_v == 128
    hd256 = head_dim == 256 and head_dim_v == 256
    if head_dim_v == 512:
        return "head_dim_v 512 is FA4's MLA path (qv), which fa4aot does not build"
    if not (standard or deepseek or hd256):
        return (
            f"(head_dim, head_dim_v)=({head_dim}, {head_dim_v}) is not supported on SM100: FA4 "
            "takes 8..128, (192, 128) or (256, 256)"
        )
    if head_dim % alignment or head_dim_v % alignment:
        return f"head dims must be multiples of {alignment} for {dtype}"
    return None


def sm90_head_dims_ok(head_dim: int, head_dim_v: int) -> str | None:
    """FA4 ``_validate_head_dims`` for SM90."""
    if not (8 <= head_dim <= 256 and 8 <= head_dim_v <= 256):
        return f"(head_dim, head_dim_v)=({head_dim}, {head_dim_v}) is not supported on SM90 (8..256)"
    if head_dim % 8 or head_dim_v % 8:
        return "head dims must be multiples of 8"
    return None


#: SM120's shared memory per block, what FA4's ``FlashAttentionForwardSm120.can_implement`` checks
#: against (``cutlass.utils.get_smem_capacity_in_bytes("sm_120")``: 99 KiB).
SM120_SMEM_CAPACITY = 101376
#: FA4 runs its SM120 forward (the SM80 kernel with SM120's smem) with 4 warps and one K/V stage.
SM120_THREADS = 128
SM120_STAGES = 1


def sm120_tile(head_dim: int) -> tuple[int, int]:
    """FA4's SM120 forward tiles (``_get_fwd_config``): 128x128 up to head_dim 64, else 128x64
    (sized for SM120's 99 KiB of shared memory)."""
    return (128, 64) if head_dim > 64 else (128, 128)


def sm120_head_dims_ok(head_dim: int, head_dim_v: int) -> str | None:
    """FA4's limits on SM120: its interface skips ``_validate_head_dims`` there, so the limit is
    the kernel's ``can_implement`` (head dims multiples of 8, Q + K + V tiles within 99 KiB)."""
    if head_dim < 8 or head_dim_v < 8:
        return "head dims must be >= 8"
    if head_dim % 8 or head_dim_v % 8:
        return "head dims must be multiples of 8 (FlashAttentionForwardSm120.can_implement)"
    tile_m, tile_n = sm120_tile(head_dim)
    smem = 2 * (tile_m * head_dim + SM120_STAGES * tile_n * (head_dim + head_dim_v))
    if smem > SM120_SMEM_CAPACITY:
        return (
            f"(head_dim, head_dim_v)=({head_dim}, {head_dim_v}) is not supported on SM120: FA4's "
            f"{tile_m}x{tile_n} tiles need {smem} bytes of shared memory, more than SM120's {SM120_SMEM_CAPACITY}"
        )
    return None


def resolve_window(causal: bool, left: int | None, right: int | None) -> tuple[bool, bool, int | None, int | None]:
    """FA4's ``_resolve_causal_local_window``: (causal, local, left, right)."""
    if left is not None and right is not None and left < 0 and right < 0:
        left = right = None
    if causal:
        right = 0
    if left is not None or right is not None:
        if left is None and right == 0:
            return True, False, None, None
        return False, True, left, right
    return causal, False, left, right


def num_splits_heuristic(total_mblocks: int, num_sms: int, num_n_blocks: int, max_splits: int) -> int:
    """FA4's split heuristic."""
    if num_n_blocks <= 4 or total_mblocks == 0:
        return 1
    return max(1, min(num_sms // total_mblocks, max_splits, num_n_blocks))


def paged_kv_class(page_size: int | None, tile_n: int) -> str:
    """FA4's K/V path for a page size (``paged_kv_non_tma = page_size not in [None, tile_n]``):
    ``none`` (no page table), ``tma`` (page size == tile_n), ``cpasync`` (any other size)."""
    if page_size is None:
        return "none"
    return "tma" if page_size == tile_n else "cpasync"
