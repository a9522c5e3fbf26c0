"""FA4's backward postprocess (``FlashAttentionBackwardPostprocess``): the fp32 dQ accumulator (or,
for GQA, the dK / dV accumulators) scaled and converted to bf16/fp16, and, with a learnable sink,
dsink. Built from fake tensors exactly as FA4's ``_compile_bwd_postprocess`` builds it."""

from __future__ import annotations

from fa4aot_kernels.bwd_pre import DIV16, DIV32
from fa4aot_kernels.common import CUTLASS_DTYPES, EntryArgs, KernelEntry, Signature, sym
from flash_attn.cute.bwd_accum_tile import AccumTileOrder
from flash_attn.cute.flash_bwd_postprocess import FlashAttentionBackwardPostprocess, LearnableSinkBwdTensors

from fa4aot.core.variant import Target, Variant


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's backward postprocess for this variant."""
    f = variant.fields
    dt = f["dtype"]
    major, minor = target.compute_capability
    order = None if f["accum_order"] == "none" else AccumTileOrder[f["accum_order"]]
    kernel = FlashAttentionBackwardPostprocess(
        CUTLASS_DTYPES[dt],
        f["head_dim"],
        major * 10 + minor,
        f["tile"],
        f["num_threads"],
        f["atom_layout"],
        f["swap_ab"],
        use_2cta_instrs=f["two_cta"],
        cluster_size=f["cluster_size"],
        hdim_multiple_of=f["hdim_multiple_of"],
        accum_order=order,
        pack_factor=f["pack_factor"],
    )
    sig = Signature()
    varlen, sink = f["varlen"], f["learnable_sink"] != "none"
    # make_fake_bwd_tensors: extents shared between tensors are one symbol, as there
    b, h, d, sq, sq_r, sq_dr = sym(), sym(), sym(), sym(), sym(), sym()
    rows = (sq,) if varlen else (b, sq)

    def per_head(n):
        return (h, n) if varlen else (b, h, n)

    if f["pack_factor"] > 1:  # the dQ accumulator per scratch head (its own head symbol)
        accum = (sym(), sym()) if varlen else (b, sym(), sym())
    else:
        accum = per_head(sq_dr)
    sig.tensor("accum", "fp32", accum, align=16, stride_divisibility=DIV32)
    sig.tensor("out", dt, (*rows, h, d), align=16, stride_divisibility=DIV16)
    sig.scalar("scale", "f32")
    sig.optional_tensor("cu_seqlens", varlen, "int32", (sym(),), align=4)
    batch = sym() if varlen else b
    sig.optional_tensor("seqused", f["seqused"], "int32", (batch,), align=4)
    if sink:  # LearnableSinkBwdTensors(dpsum, lse, sink, dsink): always passed together
        sig.tensor("dpsum", "fp32", per_head(sq_r), align=16, stride_divisibility=DIV32)
        sig.tensor("lse", "fp32", per_head(sq), align=4)
        sink_dt = f["learnable_sink"]
        sink_align = 4 if sink_dt == "fp32" else 2  # one element (divisibility 1)
        sig.tensor("learnable_sink", sink_dt, (h,), align=sink_align)
        sig.tensor("dsink", sink_dt, (h,), align=sink_align)
    else:
        for name in ("dpsum", "lse", "learnable_sink", "dsink"):
            sig.absent(name)
    sig.stream()

    def call(a: EntryArgs) -> None:
        sinks = LearnableSinkBwdTensors(*a.span("dpsum", "dsink")) if sink else None
        kernel(*a.span("accum", "seqused"), sinks, None, a["stream"])

    return sig.entry("bwd_post_sink_entry" if sink else "bwd_post_entry", call)
