"""Every GPU architecture fa4aot builds for and every GPU model it names: one table each. A new
arch is one :data:`ARCHES` row (and its manifest); a new product name is one :data:`MODELS` row.
Manifests, the runtime's dispatch, record, the parity oracle and show-config all read these."""

from __future__ import annotations

from typing import NamedTuple

#: cudaDevAttrMaxSharedMemoryPerBlockOptin of H100 and B200: 227 KiB (CUDA programming guide,
#: compute capability 9.0 and 10.0 tables).
SMEM_OPTIN_227_KIB = 227 * 1024
#: ... of compute capability 12.0 (RTX PRO 6000, RTX 50): 99 KiB (same guide, 12.0 table).
SMEM_OPTIN_99_KIB = 99 * 1024


class Arch(NamedTuple):
    """One architecture: what FA4 runs on it (FA4 ``_flash_attn_fwd`` / ``_flash_attn_bwd``
    dispatch on ``arch // 10``) and what a GPU of it offers."""

    name: str  # the arch a manifest target names (ptxas's -arch)
    compute_capability: tuple[int, int]
    smem_optin: int  # default opt-in shared memory per block, bytes
    forward: str  # the forward family FA4 runs there
    backward: str | None  # the backward family, None where fa4aot builds none
    scheduler_metadata: bool  # FA4's forward takes scheduler metadata there (the prepare kernel)
    default_model: str  # the MODELS name a recorded call of this arch maps to without --target


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sm_100a", (10, 0), SMEM_OPTIN_227_KIB, "fwd_sm100", "bwd_sm100", True, "b200"),
        # B300 / GB300 (compute capability 10.3): B200's kernels built for sm_103a, B200's 227 KiB
        Arch("sm_103a", (10, 3), SMEM_OPTIN_227_KIB, "fwd_sm100", "bwd_sm100", True, "b300"),
        Arch("sm_90a", (9, 0), SMEM_OPTIN_227_KIB, "fwd_sm90", "bwd_sm90", True, "h100"),
        # Jetson Thor (compute capability 11.0): FA4 runs its SM100 classes there (arch // 10 in
        # [10, 11]); 228 KiB of shared memory per SM as on B200, so 227 KiB a block
        Arch("sm_110a", (11, 0), SMEM_OPTIN_227_KIB, "fwd_sm100", "bwd_sm100", True, "thor"),
        # FA4's SM120 forward takes no scheduler metadata (no split-KV)
        Arch("sm_120a", (12, 0), SMEM_OPTIN_99_KIB, "fwd_sm120", "bwd_sm120", False, "rtx-pro-6000"),
    )
}


class Model(NamedTuple):
    """A GPU product: the target a manifest or record names for it."""

    name: str
    arch: str
    num_sms: int
    product: str  # what the driver calls it (cuDeviceGetName), for people reading show-config


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("h100", "sm_90a", 132, "NVIDIA H100 80GB HBM3"),
        Model("h200", "sm_90a", 132, "NVIDIA H200"),
        Model("b200", "sm_100a", 148, "NVIDIA B200"),
        Model("gb200", "sm_100a", 152, "NVIDIA GB200"),
        Model("b300", "sm_103a", 148, "NVIDIA B300"),
        Model("rtx-pro-6000", "sm_120a", 188, "NVIDIA RTX PRO 6000 Blackwell"),
        # Jetson AGX Thor (T5000): the driver reports 20 SMs and the name "NVIDIA Thor"
        Model("thor", "sm_110a", 20, "NVIDIA Thor"),
    )
}


def arch_of_compute_capability(cc: tuple[int, int]) -> str | None:
    """The arch fa4aot builds for a device of compute capability ``cc`` (None: none)."""
    return next((a.name for a in ARCHES.values() if a.compute_capability == tuple(cc)), None)


def model_name(arch: str, num_sms: int) -> str:
    """The name fa4aot gives a target it writes: the first model of that arch and SM count, else
    ``sm100a-150sms``."""
    return next(
        (m.name for m in MODELS.values() if (m.arch, m.num_sms) == (arch, num_sms)),
        f"{arch.replace('_', '')}-{num_sms}sms",
    )


def arches_running(family: str) -> tuple[str, ...]:
    """The arches whose forward or backward is ``family``."""
    return tuple(a.name for a in ARCHES.values() if family in (a.forward, a.backward))
