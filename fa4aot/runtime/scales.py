"""FA4's ``scales=`` on the zero-JIT runtime: FP8 descales (``TensorwiseScales``) and MXFP8 block
scales (``BlockScales``), checked against the call and described for the launch.

FA4 tells the two formats apart by their type (``match scales``, interface.py 696-715); fa4aot
accepts FA4's own NamedTuples (recognised by name: flash_attn is never imported here) and the
look-alikes below, for callers without FA4. The checks are FA4's (``_validate_tensorwise_scales``,
``_validate_block_scales``) plus what FA4 leaves to a per-call copy (``maybe_contiguous``): fa4aot
allocates nothing per call, so a descale or scale buffer in another layout is refused, naming
the layouts the kernels take.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fa4aot.core.errors import ArgumentError
from fa4aot.core.fa4_interface import mxfp8_scale_count
from fa4aot.runtime import validate
from fa4aot.runtime.tensors import DeviceTensor, as_device_tensor, contiguous_strides

#: FA4's scale buffers are 16-byte aligned (``to_cute_tensor``'s default), descales 4 (fp32).
SF_ALIGN = 16
DESCALE_ALIGN = 4
#: The launch arguments the scales fill, in :data:`fa4aot.runtime.loader.FORWARD_ORDER`.
NAMES = ("q_descale", "k_descale", "v_descale", "sf_q", "sf_k", "sf_v")


class TensorwiseScales(NamedTuple):
    """FP8 dequantization scales, FA4's ``TensorwiseScales``: one fp32 per (batch, kv_head) for
    each of Q, K and V (a missing member is 1)."""

    q: Any = None
    k: Any = None
    v: Any = None


class BlockScales(NamedTuple):
    """MXFP8 UE8M0 scales, FA4's ``BlockScales``: contiguous interleave_sf buffers for e4m3 Q and
    K (32-element head_dim blocks) and, for native PV, e4m3 V (32-key blocks)."""

    q: Any
    k: Any
    v: Any = None


class Scales(NamedTuple):
    """A call's scales as the dispatch and the launch take them."""

    descales: str | None  # "q,k,v" descale layouts (fa4_interface.DESCALE_LAYOUTS); None: none given
    mxfp8: str | None  # "qk" or "pv"; None: no block scales
    tensors: tuple[DeviceTensor | None, ...]  # one per NAMES


NO_SCALES = Scales(None, None, (None,) * len(NAMES))


def kind(scales: Any) -> str:
    """``tensorwise`` or ``block``: which of FA4's formats ``scales`` is (by its type, as FA4 asks)."""
    name = type(scales).__name__
    if isinstance(scales, TensorwiseScales) or name == "TensorwiseScales":
        return "tensorwise"
    if isinstance(scales, BlockScales) or name == "BlockScales":
        return "block"
    raise ArgumentError(f"scales must be TensorwiseScales, BlockScales or None, got {name}")


def check(scales: Any, q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, batch: int, dev: int, rt: Any) -> Scales:
    """The call's scales, checked against its q, k, v (before the dispatch: their layouts pick
    the kernel)."""
    if kind(scales) == "tensorwise":
        return _tensorwise(scales, v, batch, dev, rt)
    return _block(scales, q, k, v, dev, rt)


def _tensorwise(scales: Any, v: DeviceTensor, batch: int, dev: int, rt: Any) -> Scales:
    members = (scales.q, scales.k, scales.v)
    if all(t is None for t in members):
        return NO_SCALES  # FA4: all-unset scales pass through, for any dtype
    if v[3] not in validate.FP8_DTYPES:
        raise ArgumentError("scales: TensorwiseScales are only supported for FP8 inputs (e4m3 or e5m2 q, k, v)")
    hk = v[1][-2]
    layouts, tensors = [], []
    for obj, name in zip(members, ("scales.q", "scales.k", "scales.v")):
        if obj is None:
            layouts.append("none")
            tensors.append(None)
            continue
        t = validate.tensor(
            obj, name, dtypes=("fp32",), rank=2, device=dev, rt=rt, align=DESCALE_ALIGN, contiguous_dim=None
        )
        validate.shape(t, name, (batch, hk), "(batch, nheads_kv)")
        s0, s1 = t[2]
        if s1 != 1 and hk > 1:
            raise ArgumentError(
                f"{name}: strides {tuple(t[2])}: the kernels take the KV heads contiguous, with the batch "
                "strided or broadcast (stride 0); FA4 copies other layouts on every call, fa4aot allocates "
                "nothing per call - pass it contiguous"
            )
        # FA4 keys the broadcast pattern (stride 0 stays static in the kernel)
        layouts.append("per_head" if s0 == 0 else "full")
        tensors.append(DeviceTensor(t[0], t[1], (s0, 1), "fp32", t[4], t[5]))
    return Scales(",".join(layouts), None, (*tensors, None, None, None))


def _block(scales: Any, q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, dev: int, rt: Any) -> Scales:
    pv = scales.v is not None
    mode = "Native MXFP8 PV" if pv else "QK MXFP8"
    if scales.q is None or scales.k is None:
        raise ArgumentError(f"scales: {mode} requires both scales.q and scales.k")
    if len(q[1]) != 4 or len(k[1]) != 4 or len(v[1]) != 4:
        raise ArgumentError(f"scales: {mode} requires Q/K/V in (batch, seqlen, heads, dim) layout")
    if q[3] != "e4m3" or k[3] != "e4m3" or v[3] != ("e4m3" if pv else "bf16"):
        why = "Native MXFP8 PV requires e4m3 Q/K/V" if pv else "QK MXFP8 requires e4m3 Q/K and bf16 V"
        raise ArgumentError(f"scales: {why}, got {q[3]}, {k[3]}, {v[3]}")
    # (buffer, name, operand, MN extent, K extent): K is the scaled (reduction) axis (interface.py 572-578)
    layouts = [(scales.q, "scales.q", q, q[1][1], q[1][3]), (scales.k, "scales.k", k, k[1][1], k[1][3])]
    if pv:
        layouts.append((scales.v, "scales.v", v, v[1][3], v[1][1]))
    out: list[DeviceTensor | None] = []
    for obj, name, x, mn, k_extent in layouts:
        t = as_device_tensor(obj, name)
        expected = mxfp8_scale_count(x[1][0], x[1][2], mn, k_extent)
        if t[3] != "e8m0":
            raise ArgumentError(f"{name}: must be UE8M0 (float8_e8m0fnu), got {t[3]}")
        size = 1
        for n in t[1]:
            size *= n
        if tuple(t[2]) != contiguous_strides(t[1]) or size != expected:
            raise ArgumentError(
                f"{name}: must be the contiguous interleave_sf buffer with MN={mn}, K={k_extent} ({expected} "
                f"elements), got shape {tuple(t[1])} strides {tuple(t[2])}"
            )
        flat = DeviceTensor(t[0], (size,), (1,), "e8m0", t[4], t[5])
        validate.device_of(flat, name, dev, rt)
        if flat[0] % SF_ALIGN:
            raise ArgumentError(f"{name}: base address 0x{flat[0]:x} is not {SF_ALIGN}-byte aligned")
        out.append(flat)
    if not pv:
        out.append(None)
    return Scales(None, "pv" if pv else "qk", (None, None, None, *out))
