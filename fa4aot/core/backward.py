"""FA4 4.0.0b36's backward pass, restated as pure functions: its per-arch configuration, validity
rules and the kernels one backward call launches.

FA4's ``_flash_attn_bwd`` launches up to five kernels: the preprocess (dot(O, dO), LSE * log2(e),
zeroing the fp32 dQ accumulator), the main kernel (dK, dV, and dQ accumulated in fp32), and the
postprocess that converts the dQ accumulator (and, for GQA, the dK and dV accumulators) to
bf16/fp16. A manifest group of ``bwd_sm90`` / ``bwd_sm100`` names the *call* (dtype, head dims,
GQA ratio, masks, varlen, ...); :func:`parts` turns it into the kernel variants that call needs,
so the manifest expander, the runtime's dispatch and the tests share one definition.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fa4aot.core.rules import sm90_head_dims_ok, sm100_head_dims_ok

#: The main-kernel family per arch (FA4: 9.x FlashAttentionBackwardSm90, 10.x
#: FlashAttentionBackwardSm100). SM120's backward (the SM80 kernel) is not built.
BACKWARD_FAMILY = {"sm_90a": "bwd_sm90", "sm_100a": "bwd_sm100", "sm_103a": "bwd_sm100"}
BACKWARD_FAMILIES = ("bwd_sm90", "bwd_sm100")
#: Families of the helper kernels a backward call also launches.
BACKWARD_HELPERS = ("bwd_pre", "bwd_post")
#: FA4's SM100 backward tiles (``_flash_attn_bwd``: m_block_size = n_block_size = 128).
SM100_BWD_TILE = 128
#: Threads of FA4's SM100 main backward kernel and of its postprocess.
SM100_BWD_THREADS = 384
SM100_POST_THREADS = 128
#: Threads of one warp group (FA4's SM90 backward runs num_wg MMA warp groups plus one producer).
WARP_GROUP_THREADS = 128


class Sm90BwdConfig(NamedTuple):
    """FA4's ``BwdConfig`` (``_tile_size_bwd_sm90``), field for field (a NamedTuple: the runtime
    imports this module at start-up, and dataclass creation costs milliseconds)."""

    m_block_size: int
    n_block_size: int
    num_stages_Q: int
    num_stages_dO: int
    num_stages_PdS: int
    SdP_swapAB: bool
    dKV_swapAB: bool
    dQ_swapAB: bool
    AtomLayoutMSdP: int
    AtomLayoutNdKV: int
    AtomLayoutMdQ: int
    num_wg: int = 2
    dQ_single_wg: bool = False


def sm90_bwd_config(head_dim: int, head_dim_v: int, causal: bool, local: bool) -> Sm90BwdConfig:
    """FA4's SM90 backward configuration (``_tile_size_bwd_sm90`` without block sparsity)."""
    if head_dim <= 64:
        return Sm90BwdConfig(128, 128, 2, 2, 2, True, False, False, 1, 2, 2)
    if head_dim <= 96:
        return Sm90BwdConfig(64, 128, 2, 2, 2, True, False, False, 1, 2, 1, dQ_single_wg=True)
    if head_dim <= 128:
        m = 64 if (causal or local) else 80
        return Sm90BwdConfig(m, 128, 2, 2, 2, True, False, m % 64 != 0, 1, 2, 1)
    if head_dim <= 192:
        stages_do = 2 if head_dim_v <= 128 else 1
        return Sm90BwdConfig(64, 96, 2, stages_do, 1, False, True, False, 1, 2, 1)
    return Sm90BwdConfig(64, 48, 2, 1, 1, False, True, False, 1, 1, 1)


#: The call fields of a backward group (what the runtime computes from a call).
CALL_FIELDS = (
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
    "deterministic",
    "softcap",
    "has_dlse",
    "learnable_sink",
)


def check_call(family: str, f: dict[str, Any]) -> str | None:
    """Why FA4's backward on this arch family cannot run this call (None: it can)."""
    hd, hdv, qh = f["head_dim"], f["head_dim_v"], f["qhead_per_kvhead"]
    if qh < 1:
        return "qhead_per_kvhead must be >= 1"
    if f["causal"] and f["local"]:
        return "causal and local are exclusive (FA4 resolves a causal window to causal)"
    if f["seqused_q"] and not f["varlen_q"] or f["seqused_k"] and not f["varlen_k"]:
        return "fa4aot builds seqused_q/k only together with cu_seqlens_q/k (varlen)"
    if family == "bwd_sm90":
        if qh > 1 and hd != hdv:
            return "FA4's SM90 backward: GQA backward requires head_dim == head_dim_v"
        return sm90_head_dims_ok(hd, hdv)
    if family == "bwd_sm100":
        if reason := sm100_head_dims_ok(hd, hdv, f["dtype"]):
            return reason
        if hd == 256:
            return "FA4 runs head_dim 256 on SM100 with its dedicated backward kernel, which fa4aot does not build"
        return None
    return f"unknown backward family {family!r}"


def sm100_two_cta(head_dim: int) -> bool:
    """FA4's SM100 backward uses 2-CTA MMA from head_dim 128 up (``use_2cta_instrs``)."""
    return head_dim >= 128


class Part(NamedTuple):
    """One kernel of a backward call: its family, compile-time fields and role."""

    role: str  # main, pre, post_dq, post_dk, post_dv
    family: str
    fields: tuple[tuple[str, Any], ...]

    @property
    def field_dict(self) -> dict[str, Any]:
        return dict(self.fields)


def _part(role: str, family: str, **fields: Any) -> Part:
    return Part(role, family, tuple(sorted(fields.items())))


def parts(family: str, f: dict[str, Any]) -> tuple[Part, ...]:
    """The kernels FA4's ``_flash_attn_bwd`` launches for a call with fields ``f``, in launch
    order: preprocess, main, dQ postprocess, and for GQA the dK and dV postprocesses."""
    hd, hdv, qh = f["head_dim"], f["head_dim_v"], f["qhead_per_kvhead"]
    main_common = dict(
        dtype=f["dtype"],
        head_dim=hd,
        head_dim_v=hdv,
        qhead_per_kvhead=qh,
        causal=f["causal"],
        local=f["local"],
        varlen_q=f["varlen_q"],
        varlen_k=f["varlen_k"],
        seqused_q=f["seqused_q"],
        seqused_k=f["seqused_k"],
        deterministic=f["deterministic"],
        softcap=float(f["softcap"]),
    )
    if family == "bwd_sm90":
        c = sm90_bwd_config(hd, hdv, f["causal"], f["local"])
        tile_m, tile_n = c.m_block_size, c.n_block_size
        multiple = 64 if c.dKV_swapAB else 32
        main = _part("main", family, tile_m=tile_m, tile_n=tile_n, **main_common)
        dq = dict(
            num_threads=WARP_GROUP_THREADS if c.dQ_single_wg else c.num_wg * WARP_GROUP_THREADS,
            atom_layout=c.AtomLayoutMdQ,
            swap_ab=c.dQ_swapAB,
            two_cta=False,
            accum_order="none",
        )
        dkv = dict(
            num_threads=c.num_wg * WARP_GROUP_THREADS,
            atom_layout=c.AtomLayoutNdKV,
            swap_ab=c.dKV_swapAB,
            two_cta=False,
            accum_order="none",
        )
        cluster_size = 1
    elif family == "bwd_sm100":
        tile_m = tile_n = SM100_BWD_TILE
        two_cta = sm100_two_cta(hd)
        cluster_size = 2 if two_cta else 1
        multiple = 32
        main = _part("main", family, tile_m=tile_m, tile_n=tile_n, two_cta=two_cta, **main_common)
        # FlashAttentionBackwardSm100.accum_tile_orders (tile_n 128: no M=64 accumulator)
        dq = dict(
            num_threads=SM100_POST_THREADS,
            atom_layout=1,
            swap_ab=False,
            two_cta=two_cta,
            accum_order="TMEM_FRAG_2CTA" if two_cta else "TMEM_FRAG_1CTA",
        )
        dkv = dict(
            num_threads=SM100_POST_THREADS, atom_layout=1, swap_ab=False, two_cta=False, accum_order="TMEM_FRAG_1CTA"
        )
    else:
        raise KeyError(family)
    pre = _part(
        "pre",
        "bwd_pre",
        dtype=f["dtype"],
        head_dim=hd,
        head_dim_v=hdv,
        tile_m=tile_m,
        varlen_q=f["varlen_q"],
        seqused_q=f["seqused_q"],
        has_dlse=f["has_dlse"],
        hdim_multiple_of=multiple,
    )
    post_q = dict(dtype=f["dtype"], varlen=f["varlen_q"], seqused=f["seqused_q"], hdim_multiple_of=multiple)
    post_k = dict(dtype=f["dtype"], varlen=f["varlen_k"], seqused=f["seqused_k"], hdim_multiple_of=multiple)
    out = [
        pre,
        main,
        _part(
            "post_dq",
            "bwd_post",
            head_dim=hd,
            tile=tile_m,
            cluster_size=1,
            learnable_sink=f["learnable_sink"],
            **post_q,
            **dq,
        ),
    ]
    if qh > 1:
        for role, dim in (("post_dk", hd), ("post_dv", hdv)):
            out.append(
                _part(
                    role,
                    "bwd_post",
                    head_dim=dim,
                    tile=tile_n,
                    cluster_size=cluster_size,
                    learnable_sink="none",
                    **post_k,
                    **dkv,
                )
            )
    return tuple(out)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class Scratch(NamedTuple):
    """Sizes of the buffers FA4's ``_flash_attn_bwd`` allocates for one call (elements)."""

    seqlen_q_rounded: int  # batched: per sequence; varlen: total_q padded per sequence
    seqlen_k_rounded: int
    head_dim_rounded: int
    head_dim_v_rounded: int
    #: blocks per sequence of the deterministic backward's semaphores: (batch, nheads, q_blocks,
    #: cluster) for dQ, (batch, nheads_kv, k_blocks, 2) for dK / dV (from the longest sequence)
    q_blocks: int = 0
    k_blocks: int = 0


def scratch(
    main: Part,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    total_q: int | None,
    total_k: int | None,
) -> Scratch:
    """FA4's padded extents of dpsum / lse_log2 / the dQ accumulator (per query row) and of the
    GQA dK / dV accumulators (per key row), for a call of the main kernel ``main``: batched
    lengths round up to the tile; varlen totals add one tile per sequence (``(total +
    (batch + 1) * tile - 1) // tile * tile``); a 2-CTA SM100 call pads K to whole CTA pairs.
    ``seqlen_q``/``seqlen_k``: the (longest) sequence lengths."""
    f = main.field_dict
    tm, tn = f["tile_m"], f["tile_n"]
    cluster = 2 if f.get("two_cta") else 1
    mult = hdim_multiple_of(main)
    # per-sequence rounding (FA4's seqlen_*_rounded, from max_seqlen with varlen)
    q_r = round_up(seqlen_q, tm)
    k_r = round_up(seqlen_k, tn)
    if cluster == 2 and (k_r // tn) % 2:
        k_r += tn
    if total_q is not None:
        sq_r = (total_q + (batch + 1) * tm - 1) // tm * tm
    else:
        sq_r = q_r
    if total_k is not None:
        ct = cluster * tn
        sk_r = (total_k + (batch + 1) * ct - 1) // ct * ct
    else:
        sk_r = k_r
    return Scratch(sq_r, sk_r, round_up(f["head_dim"], mult), round_up(f["head_dim_v"], mult), q_r // tm, k_r // tn)


def hdim_multiple_of(main: Part) -> int:
    """FA4: accumulators are padded to multiples of 64 of the head dim with SM90's dKV_swapAB, else 32."""
    f = main.field_dict
    if main.family == "bwd_sm90":
        return 64 if sm90_bwd_config(f["head_dim"], f["head_dim_v"], f["causal"], f["local"]).dKV_swapAB else 32
    return 32
