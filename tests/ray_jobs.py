"""Compile functions for the Ray executor tests (imported by Ray workers through PYTHONPATH)."""

from __future__ import annotations

import os
from pathlib import Path


def crash_once(variant, target, host_arch):
    """Kill this worker process the first time a variant is compiled, then compile normally."""
    from fa4aot.compile.worker import build_variant

    marker = Path(os.environ["FA4AOT_TEST_CRASH_DIR"]) / variant.variant_id
    if not marker.exists():
        marker.write_text("killed once")
        os._exit(9)  # what the OOM killer or a segfaulting compiler does to a worker
    return build_variant(variant, target, host_arch)
