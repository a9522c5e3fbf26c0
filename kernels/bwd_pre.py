"""FA4's backward preprocess (``FlashAttentionBackwardPreprocess``): dot(O, dO) (minus dLSE), the
LSE in log2 units, and the zeroed fp32 dQ accumulator. Built from fake tensors exactly as FA4's
``_compile_bwd_preprocess`` builds it (same shared extents, divisibility and alignment)."""

from __future__ import annotations

from fa4aot_kernels.common import CUTLASS_DTYPES, EntryArgs, KernelEntry, Signature, sym
from flash_attn.cute.flash_bwd_preprocess import FlashAttentionBackwardPreprocess, PackGQA

from fa4aot.core.variant import Target, Variant

#: quack's make_fake_tensor divisibility (elements) for 16-byte vectors of 16-bit and fp32 data
DIV16 = 8
DIV32 = 4


def make_entry(variant: Variant, target: Target) -> KernelEntry:
    """The entry of FA4's backward preprocess for this variant."""
    f = variant.fields
    dt = f["dtype"]
    packed = f["pack_factor"] > 1
    kernel = FlashAttentionBackwardPreprocess(
        CUTLASS_DTYPES[dt],
        f["head_dim"],
        f["head_dim_v"],
        f["tile_m"],
        use_padded_offsets=True,
        nheads_major=False,
        # NOTE [bwd pack_gqa]: FA4's query-head fold writes dPsum / LSElog2 / dQaccum per scratch
        # head in packed row order (interface.py 2448-2452)
        pack_gqa=PackGQA.PACKED_ROW_OUTPUTS if packed else PackGQA.OFF,
        qhead_per_kvhead=f["pack_factor"],
        nheads_kv=f["scratch_heads"],
        hdim_multiple_of=f["hdim_multiple_of"],
    )
    sig = Signature()
    # make_fake_bwd_tensors: extents shared between tensors are one symbol, as there
    b, h, dv, sq, sq_r, sq_dr = sym(), sym(), sym(), sym(), sym(), sym()
    rows = (sq,) if f["varlen_q"] else (b, sq)

    def per_head(n):  # (batch, nheads, n) or, varlen, (nheads, n)
        return (h, n) if f["varlen_q"] else (b, h, n)

    def scratch(n):  # packed: per scratch head in packed row order, their own symbols
        if not packed:
            return per_head(n)
        return (sym(), sym()) if f["varlen_q"] else (b, sym(), sym())

    sig.tensor("out", dt, (*rows, h, dv), align=16, stride_divisibility=DIV16)
    sig.tensor("dout", dt, (*rows, h, dv), align=16, stride_divisibility=DIV16)
    sig.tensor("dpsum", "fp32", scratch(sq_r), align=16, stride_divisibility=DIV32)
    sig.tensor("lse", "fp32", per_head(sq), align=4)
    sig.tensor("lse_log2", "fp32", scratch(sq_r), align=16, stride_divisibility=DIV32)
    sig.tensor("dq_accum", "fp32", scratch(sq_dr), align=16, stride_divisibility=DIV32)
    sig.optional_tensor("cu_seqlens_q", f["varlen_q"], "int32", (sym(),), align=4)
    batch = sym() if f["varlen_q"] else b
    sig.optional_tensor("seqused_q", f["seqused_q"], "int32", (batch,), align=4)
    sig.optional_tensor("dlse", f["has_dlse"], "fp32", per_head(sq), align=4)
    sig.scalar("softmax_scale", "f32")
    sig.stream()

    def call(a: EntryArgs) -> None:
        # row_max, scale_p (FA4's load-P mode), cu_total_m_blocks and o_lo are not used here
        kernel(*a.span("out", "dlse"), None, None, a["softmax_scale"], None, None, a["stream"])

    return sig.entry("bwd_pre_entry", call)
