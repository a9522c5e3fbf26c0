"""FA4's SM90 backward (``FlashAttentionBackwardSm90``) for one variant, built as
``flash_attn.cute.interface._flash_attn_bwd`` builds it on Hopper (``_tile_size_bwd_sm90``'s
configuration; tensors as ``to_cute_tensor`` describes them: every extent dynamic, every stride
dynamic but the innermost, 16-byte alignment, 4 for the int32 vectors)."""

from __future__ import annotations

from fa4aot_kernels.common import EntryArgs, KernelEntry, Signature, attention_kwargs, config_kwargs, sym
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90
from flash_attn.cute.utils import AuxData

from fa4aot.core.backward import config_from_fields, dkv_postprocess
from fa4aot.core.variant import Target, Variant


def softcap_score_mod_bwd(softcap: float):
    """FA4's softcap backward score_mod (``utils.create_softcap_scoremod_bwd``), or None for 0."""
    if not softcap:
        return None
    from flash_attn.cute.utils import create_softcap_scoremod_bwd

    return create_softcap_scoremod_bwd(float(softcap))


def fa4_config(variant: Variant):
    """FA4's ``BwdConfig`` a main backward variant's fields stand for (FA4's own class)."""
    from flash_attn.cute import config as fa4_config_module

    return config_from_fields(fa4_config_module, variant.fields, variant.arch)


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's SM90 main backward kernel for this variant."""
    f = variant.fields
    c = fa4_config(variant)
    kernel = FlashAttentionBackwardSm90(
        **main_kwargs(f, c, dtype=True),
        **config_kwargs(c, f"{SM80_MMA_CONFIG} num_threads dQ_single_wg", PdS_stage="num_stages_PdS"),
    )
    return entry_for(kernel, variant)


#: FA4's ``bwd_q_subtile_factor`` without block sparsity (config.py 2577-2580: "the legacy
#: factor of 2").
BWD_Q_SUBTILE_FACTOR = 2

#: The ``BwdConfig`` attributes the SM90 and SM120 backward classes take under the same names:
#: which GEMMs swap A/B, the MMA atom layouts, whether V stays in registers.
SM80_MMA_CONFIG = "SdP_swapAB dKV_swapAB dQ_swapAB AtomLayoutMSdP AtomLayoutNdKV AtomLayoutMdQ V_in_regs"


def backward_kwargs(f: dict, *, dtype: bool, mask_mod: bool = True) -> dict:
    """:func:`~fa4aot_kernels.common.attention_kwargs` and the softcap's backward
    ``score_mod_bwd``: what every FA4 main backward class takes from the variant's fields."""
    return dict(
        **attention_kwargs(f, dtype=dtype, mask_mod=mask_mod), score_mod_bwd=softcap_score_mod_bwd(f["softcap"])
    )


def main_kwargs(f: dict, c, *, dtype: bool) -> dict:
    """The constructor arguments FA4's SM90 and SM100 main backward classes share: the fields'
    (:func:`backward_kwargs`), determinism, the query subtile factor, and the config's tiles,
    stages, scheduler and registers."""
    return dict(
        **backward_kwargs(f, dtype=dtype),
        deterministic=f["deterministic"],
        q_subtile_factor=BWD_Q_SUBTILE_FACTOR,
        **config_kwargs(c, "tile_m tile_n spt registers", Q_stage="num_stages_Q", dO_stage="num_stages_dO"),
    )


def add_backward_tensors(sig: Signature, f: dict) -> None:
    """The main backward kernel's tensors and scalars in FA4's argument order (shared with SM100)."""
    dt = f["dtype"]
    gqa = dkv_postprocess(f)  # fp32 dK/dV accumulators (several query-head tiles share a KV head)

    def dims(n: int) -> tuple:
        return tuple(sym() for _ in range(n))

    q_rank = 3 if f["varlen_q"] else 4
    k_rank = 3 if f["varlen_k"] else 4
    sig.tensor("q", dt, dims(q_rank))
    sig.tensor("k", dt, dims(k_rank))
    sig.tensor("v", dt, dims(k_rank))
    sig.tensor("dout", dt, dims(q_rank))
    sig.tensor("lse_log2", "fp32", dims(q_rank - 1))
    sig.tensor("dpsum", "fp32", dims(q_rank - 1))
    sig.tensor("dq_accum", "fp32", dims(q_rank - 1))
    if gqa:  # fp32 accumulators (batch, h_kv, seqlen_k_rounded * d) or (h_kv, total_k_padded * d)
        sig.tensor("dk", "fp32", dims(k_rank - 1))
        sig.tensor("dv", "fp32", dims(k_rank - 1))
    else:
        sig.tensor("dk", dt, dims(k_rank))
        sig.tensor("dv", dt, dims(k_rank))
    sig.scalar("softmax_scale", "f32")
    sig.seqlen_vectors(f)
    sig.window_sizes(f)
    # FA4's semaphores, deterministic only (dK / dV's only with the fp32 accumulators): int32
    # (batch, heads, blocks, n) row-major, n static (the dQ one's the cluster size, dK/dV's 2),
    # the rest dynamic (convert_from_dlpack_leading_static)
    det = f["deterministic"]
    for name, present, n in (
        ("dq_semaphore", det, f["cluster_size"]),
        ("dk_semaphore", det and gqa, 2),
        ("dv_semaphore", det and gqa, 2),
    ):
        if present:
            sig.compact_tensor(name, "int32", (sym(), sym(), sym(), n), align=4, optional=True)
        else:
            sig.absent(name)


def entry_for(kernel, variant: Variant, workspace: bool = True) -> KernelEntry:
    """The entry of an FA4 main backward kernel (SM90, SM100 and SM120 take the same arguments;
    FA4 hands SM120's no tensor-map workspace: ``workspace=False``, interface.py 2764-2769)."""
    f = variant.fields
    sig = Signature()
    add_backward_tensors(sig, f)
    # the per-CTA K / V (and SM100 2-CTA Kt) descriptors (to_cute_tensor(..., assumed_align=128,
    # leading_dim=2)): FA4 passes it to varlen-K and seqused_k calls
    present = workspace and (f["varlen_k"] or f["seqused_k"])
    sig.optional_tensor("tensormap_workspace", present, "int64", (sym(), sym(), sym()), leading_dim=2, align=128)
    sig.stream()

    def call(a: EntryArgs) -> None:
        kernel(
            *a.span("q", "dv_semaphore"),
            AuxData(None, None),
            None,  # blocksparse_tensors
            None,  # cu_total_m_blocks (FA4's batch-lookup aid above 256 varlen batches: not built)
            *((a["tensormap_workspace"],) if workspace else ()),
            a["stream"],
        )

    return sig.entry("bwd_entry", call)
