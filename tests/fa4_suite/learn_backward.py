"""The backward half of the suite's record: ``fa4aot record`` learns FA4's forward, combine and
prepare kernels from FA4's compile keys, but not its backward (its hook wraps no backward cache).
While the suite runs FA4 on fake tensors for the record (conftest.py, FA4SUITE_RECORD=1), each
call of FA4's ``_flash_attn_bwd`` is turned here into the ``bwd_sm90`` / ``bwd_sm100`` group
fa4aot's runtime will ask for when it serves that call (the call fields of
:data:`fa4aot.core.backward.CALL_FIELDS`, computed as ``fa4aot.runtime.backward.flash_attn_backward``
computes its dispatch key), and appended to the record log as a variant line - the line fa4aot's
own runtime writes there for a call it serves - so ``fa4aot record`` puts the group in the manifest.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fa4aot.core.backward import BACKWARD_FAMILY, CALL_FIELDS, check_call
from fa4aot.core.fa4_interface import resolve_window
from fa4aot.core.targets import arch_of_compute_capability
from fa4aot.core.variant import Variant
from fa4aot.tools.record import DEFAULT_TARGET, TARGETS

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def call_fields(a: dict[str, Any]) -> dict[str, Any]:
    """fa4aot's backward call fields for the bound arguments ``a`` of FA4's ``_flash_attn_bwd``
    (fa4aot/runtime/backward.py: the ``key`` tuple of ``flash_attn_backward``)."""
    q, v = a["q"], a["v"]
    wl, wr = a.get("window_size_left"), a.get("window_size_right")
    if wl is None and wr is None:
        causal, local = bool(a.get("causal")), False
    else:
        causal, local, _, _ = resolve_window(bool(a.get("causal")), wl, wr)
    sink = a.get("learnable_sink")
    key = (
        DTYPES[str(q.dtype).removeprefix("torch.")],
        int(q.shape[-1]),
        int(v.shape[-1]),
        int(q.shape[-2]) // int(v.shape[-2]),
        causal,
        local,
        a.get("cu_seqlens_q") is not None,
        a.get("cu_seqlens_k") is not None,
        a.get("seqused_q") is not None,
        a.get("seqused_k") is not None,
        bool(a.get("deterministic")),
        float(a.get("softcap") or 0.0),
        a.get("dlse") is not None,
        DTYPES[str(sink.dtype).removeprefix("torch.")] if sink is not None else "none",
    )
    return dict(zip(CALL_FIELDS, key))


def group(a: dict[str, Any], arch: str, num_sms: int) -> Variant | str:
    """The backward group fa4aot's runtime asks for to serve this FA4 backward call, or why it
    refuses the call (fa4aot.core.backward.check_call, as the runtime's ``pick``)."""
    family = BACKWARD_FAMILY.get(arch)
    if family is None:
        return f"fa4aot builds no backward for {arch}"
    fields = call_fields(a)
    if reason := check_call(family, fields):
        return reason
    return Variant.make(family, arch, num_sms, **fields)


def log_call(a: dict[str, Any]) -> None:
    """Append the call's group to ``$FA4AOT_RECORD`` (set by ``fa4aot record``) as a variant line;
    a call fa4aot refuses goes to ``$FA4SUITE_BWD_REFUSED`` (when set) with the reason."""
    arch_env = os.environ.get("FLASH_ATTENTION_ARCH", "sm_90a").removeprefix("sm_").rstrip("af")
    arch = arch_of_compute_capability((int(arch_env[:-1]), int(arch_env[-1])))
    num_sms = int(os.environ.get("FLASH_ATTENTION_NUM_SMS") or TARGETS[DEFAULT_TARGET[arch]][1])
    got = group(a, arch, num_sms)
    if isinstance(got, str):
        path, line = os.environ.get("FA4SUITE_BWD_REFUSED"), {"test": _test(), "why": got}
    else:
        path, line = os.environ.get("FA4AOT_RECORD"), {"variant": got.to_dict(), "from": "fa4_suite backward"}
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def _test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
