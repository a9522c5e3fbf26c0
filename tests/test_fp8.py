"""FA4's FP8 (TensorwiseScales) and MXFP8 (BlockScales) forward on the CPU (fake driver): which
variant a call runs, that the scale tensors reach the kernel's parameters, and the refusals
(FA4's, and the layouts fa4aot would have to copy per call) before anything launches."""

from __future__ import annotations

import struct

import pytest
from fake_driver import FakeDriver

import fa4aot
from fa4aot.core import fa4_interface as fi
from fa4aot.core.errors import ArgumentError
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import RawTensor

B = 0x7F30_0000_0000
b, s, hk, qh, d = 2, 1024, 4, 4, 128
h = hk * qh


def t(i, shape, dtype="e4m3", strides=None):
    return RawTensor(B + i * (1 << 36), tuple(shape), dtype, strides)


def _qkv(v_dtype="e4m3", heads=h, kv_heads=hk):
    return t(0, (b, s, heads, d)), t(1, (b, s, kv_heads, d)), t(2, (b, s, kv_heads, d), v_dtype)


def _params(drv) -> bytes:
    return b"".join(drv.launches[-1].params)


def _has_pointer(drv, ptr: int) -> bool:
    return struct.pack("<Q", ptr) in _params(drv)


def test_fp8_tensorwise_runs_the_descale_variant_and_passes_the_descales(sm100):
    rt, drv = sm100
    q, k, v = _qkv()
    dq, dk, dv = t(10, (b, hk), "fp32"), t(11, (b, hk), "fp32"), t(12, (b, hk), "fp32")
    out = t(3, (b, s, h, d), "bf16")
    res, _ = fa4aot.flash_attn_func(
        q, k, v, causal=True, scales=fa4aot.TensorwiseScales(dq, dk, dv), out=out, runtime=rt
    )
    assert res is out and len(drv.launches) == 1
    (lv,) = rt._loaded.values()
    f = lv.variant.fields
    assert (f["dtype"], f["descales"], f["causal"]) == ("e4m3", "full,full,full", True)
    for x in (dq, dk, dv):
        assert _has_pointer(drv, x.ptr)


def test_a_per_head_descale_is_its_own_variant_and_a_missing_one_is_absent(sm100):
    rt, drv = sm100
    q, k, v = _qkv()
    dq = t(10, (b, hk), "fp32")
    dk = t(11, (b, hk), "fp32", strides=(0, 1))  # one value per KV head, broadcast over the batch
    fa4aot.flash_attn_func(
        q, k, v, causal=True, scales=fa4aot.TensorwiseScales(dq, dk), out=t(3, (b, s, h, d), "bf16"), runtime=rt
    )
    (lv,) = rt._loaded.values()
    assert lv.variant.fields["descales"] == "full,per_head,none"
    assert _has_pointer(drv, dq.ptr) and _has_pointer(drv, dk.ptr)


def test_fp8_needs_a_bf16_out(sm100):
    rt, drv = sm100
    q, k, v = _qkv()
    scales = fa4aot.TensorwiseScales(*(t(10 + i, (b, hk), "fp32") for i in range(3)))
    with pytest.raises(ArgumentError, match="out: dtype must be bf16"):
        fa4aot.flash_attn_func(q, k, v, causal=True, scales=scales, out=t(3, (b, s, h, d), "e4m3"), runtime=rt)
    assert drv.launches == []


@pytest.mark.parametrize(
    "strides, why",
    [((1, 0), "KV heads contiguous"), ((0, 0), "KV heads contiguous"), ((1, 2), "KV heads contiguous")],
)
def test_descale_layouts_fa4_would_copy_are_refused_before_launch(sm100, strides, why):
    rt, drv = sm100
    q, k, v = _qkv()
    bad = t(10, (b, hk), "fp32", strides=strides)
    with pytest.raises(ArgumentError, match=why):
        fa4aot.flash_attn_func(
            q, k, v, causal=True, scales=fa4aot.TensorwiseScales(bad), out=t(3, (b, s, h, d), "bf16"), runtime=rt
        )
    assert drv.launches == []


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: t(10, (b, hk + 1), "fp32"), r"expected shape \(2, 4\)"),
        (lambda: t(10, (b, hk), "bf16"), "dtype must be fp32"),
        (lambda: t(10, (b,), "fp32"), "expected 2 dimensions"),
        (lambda: RawTensor(B + 10 * (1 << 36) + 2, (b, hk), "fp32"), "4-byte aligned"),
    ],
)
def test_bad_descales_are_typed_errors(sm100, make, why):
    rt, drv = sm100
    q, k, v = _qkv()
    with pytest.raises(ArgumentError, match=why):
        fa4aot.flash_attn_func(
            q, k, v, causal=True, scales=fa4aot.TensorwiseScales(make()), out=t(3, (b, s, h, d), "bf16"), runtime=rt
        )
    assert drv.launches == []


def test_descales_need_fp8_inputs_and_unknown_scale_types_are_refused(sm100):
    rt, drv = sm100
    q, k, v = (t(i, x.shape, "bf16") for i, x in enumerate(_qkv()))
    with pytest.raises(ArgumentError, match="only supported for FP8 inputs"):
        fa4aot.flash_attn_func(
            q, k, v, scales=fa4aot.TensorwiseScales(t(10, (b, hk), "fp32")), out=t(3, (b, s, h, d), "bf16"), runtime=rt
        )
    with pytest.raises(ArgumentError, match="TensorwiseScales, BlockScales or None, got tuple"):
        fa4aot.flash_attn_func(q, k, v, scales=(None, None, None), out=t(3, (b, s, h, d), "bf16"), runtime=rt)
    assert drv.launches == []


def test_fp8_is_sm100_family_only_and_forward_only(built_cache):
    drv = FakeDriver(cc=(9, 0), num_sms=132)
    rt = Runtime(built_cache, driver=drv)
    q, k, v = _qkv()
    with pytest.raises(ArgumentError, match="FP8 is only supported on SM100"):
        fa4aot.flash_attn_func(q, k, v, out=t(3, (b, s, h, d), "bf16"), runtime=rt)
    assert drv.launches == []
    problem = fi.fp8_problem(10, "e4m3", True, None, None)
    assert problem is not None and "backward" in problem


def _sf(i, heads, mn, k_extent, dtype="e8m0"):
    return t(i, (fi.mxfp8_scale_count(b, heads, mn, k_extent),), dtype)


def test_mxfp8_qk_runs_the_block_scaled_variant(sm100):
    rt, drv = sm100
    q, k, v = _qkv("bf16", heads=hk, kv_heads=hk)
    sf_q, sf_k = _sf(10, hk, s, d), _sf(11, hk, s, d)
    fa4aot.flash_attn_func(q, k, v, scales=fa4aot.BlockScales(sf_q, sf_k), out=t(3, (b, s, hk, d), "bf16"), runtime=rt)
    (lv,) = rt._loaded.values()
    assert lv.variant.fields["mxfp8"] == "qk" and "descales" not in lv.variant.fields
    assert _has_pointer(drv, sf_q.ptr) and _has_pointer(drv, sf_k.ptr)


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(sf_k=lambda: _sf(11, hk, s, d + 128)), "contiguous interleave_sf buffer"),
        (dict(sf_k=lambda: _sf(11, hk, s, d, "uint8")), "must be UE8M0"),
        (dict(v_dtype="e4m3"), "QK MXFP8 requires e4m3 Q/K and bf16 V"),
        (dict(causal=True, sf_v=lambda: _sf(12, hk, d, s), v_dtype="e4m3"), "only noncausal"),
        (dict(num_splits=2), "only dense, unsplit"),
    ],
)
def test_mxfp8_refusals(sm100, change, why):
    rt, drv = sm100
    q, k, v = _qkv(change.get("v_dtype", "bf16"), heads=hk, kv_heads=hk)
    sf_q = _sf(10, hk, s, d)
    sf_k = change.get("sf_k", lambda: _sf(11, hk, s, d))()
    sf_v = change["sf_v"]() if "sf_v" in change else None
    with pytest.raises(ArgumentError, match=why):
        fa4aot.flash_attn_func(
            q,
            k,
            v,
            causal=change.get("causal", False),
            num_splits=change.get("num_splits", 1),
            scales=fa4aot.BlockScales(sf_q, sf_k, sf_v),
            out=t(3, (b, s, hk, d), "bf16"),
            runtime=rt,
        )
    assert drv.launches == []


def test_prepared_fp8_call_binds_its_descales(sm100):
    rt, drv = sm100
    q, k, v = _qkv()
    dq, dk, dv = t(10, (b, hk), "fp32"), t(11, (b, hk), "fp32"), t(12, (b, hk), "fp32")
    out = t(3, (b, s, h, d), "bf16")
    p = fa4aot.prepare_forward(q, k, v, out, causal=True, scales=fa4aot.TensorwiseScales(dq, dk, dv), runtime=rt)
    p(q, k, v, out)
    assert len(drv.launches) == 1 and _has_pointer(drv, dv.ptr)


def test_missing_fp8_variant_names_the_scales_axis(sm100):
    rt, drv = sm100
    q, k, v = _qkv()
    dv = t(12, (b, hk), "fp32", strides=(0, 1))
    with pytest.raises(fa4aot.VariantNotFoundError, match=r"scales: \[\{q: none, k: none, v: per_head\}\]"):
        fa4aot.flash_attn_func(
            q,
            k,
            v,
            causal=True,
            scales=fa4aot.TensorwiseScales(None, None, dv),
            out=t(3, (b, s, h, d), "bf16"),
            runtime=rt,
        )
    assert drv.launches == []
