"""The record of one validated forward call, which the forward path builds and the APIs beside it
(scheduler metadata, tensor-map workspaces, prepared calls) read."""

from __future__ import annotations

from typing import Any, NamedTuple

from fa4aot.runtime.dispatch import ForwardRule, Shape
from fa4aot.runtime.loader import Runtime
from fa4aot.runtime.tensors import DeviceTensor


class ForwardCall(NamedTuple):
    """One validated forward call: the descriptors, the chosen variant and its arguments (what
    :func:`forward` launches and :func:`fa4aot.prepare_forward` binds). Built with one tuple
    construction: it is made on every call."""

    rt: Runtime
    lv: Any  # LoadedVariant
    num_splits: int
    split: bool
    plan: Any  # fa4_interface.FwdPlan: scheduler metadata and the tensor-map workspace
    config: Any  # FA4's FwdConfig for the call
    q: DeviceTensor
    k: DeviceTensor
    v: DeviceTensor
    cu_q: DeviceTensor | None
    cu_k: DeviceTensor | None
    su_q: DeviceTensor | None
    su_k: DeviceTensor | None
    batch: int
    rows: tuple[int, ...]  # (batch, seqlen_q), or (total_q,) for varlen queries
    nheads: int
    head_dim_v: int
    dtype: str
    max_q: int
    max_k: int
    scale: float
    wl: int | None  # window edges as the local variants take them (None: not local)
    wr: int | None
    page_table: DeviceTensor | None
    learnable_sink: DeviceTensor | None
    scales: tuple[DeviceTensor | None, ...]  # FA4's scales= as launch arguments (fa4aot.runtime.scales.NAMES)
    out_dtype: str  # q's, or bf16 for FP8 / MXFP8 inputs
    rule: ForwardRule | None  # the static call's decisions (None: an empty call)
    shape: Shape | None  # the per-call facts it decided on

    @property
    def dynamic(self) -> bool:
        """The variant reads scheduler metadata (split counts or a tile semaphore)."""
        p = self.plan
        return p is not None and (p.num_splits_dynamic or p.tile_count_semaphore or p.num_nheads_in_l2)

    @property
    def lse_shape(self) -> tuple[int, ...]:
        """FA4's LSE layout: (nheads, total_q) for varlen queries, else (batch, nheads, seqlen_q)."""
        rows = self.rows
        return (self.nheads, rows[0]) if len(rows) == 1 else (self.batch, self.nheads, rows[1])
