"""Write tests/fa4_suite/cases.txt: a fixed-seed sample of FA4's test_flash_attn.py cases that run
on SM90 (H100).

    FA4AOT_FA4_SUITE=1 python tests/fa4_suite/make_cases.py [--seed 0] [-o tests/fa4_suite/cases.txt]

Collects the file (on a CPU box the conftest answers sm_90 for the device), drops what FA4's test
file itself skips on SM90 (skipif marks; the SM100-only tests that skip in their body; the
parameter combinations its bodies skip at once: local with causal, a page size that does not
divide seqlen_k, split-KV metadata), then draws, with ``random.Random(seed)``, a fixed number of
cases from each of the three big parametrized forward tests (each also runs the backward where
its condition holds) and takes every remaining SM90 case of the small tests (sinks' backward,
LSE gradients, preallocated backward outputs, empty inputs, invalid head dims...).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
#: cases drawn from each big test (the rest: every SM90 case of the small tests)
DRAW = {"test_flash_attn_output": 75, "test_flash_attn_varlen_output": 45, "test_flash_attn_kvcache": 130}
#: tests whose body skips on SM90 (or on anything but SM100) before calling FA4
SM90_BODY_SKIPS = {
    "test_flash_attn_hd256_sm100_noncontiguous_transpose",
    "test_flash_attn_paged_deepseek",
    "test_flash_attn_paged_hd256_sm100_tma",
    "test_flash_attn_paged_hd256_sm100_tma_gqa",
    "test_flash_attn_paged_hd256_sm100_tma_shuffled",
    "test_flash_attn_mla_absorbed",
    "test_flash_attn_mla_sparse_bwd_sentinel",
    "test_flash_attn_mla_sparse_bwd_sentinel_varlen",
    "test_flash_attn_mla_absorbed_varlen",
    "test_flash_attn_mla_paged",
    "test_flash_attn_seqlen_k_zero",
    "test_flash_attn_ex2_emu_decode_prefill_consistency",
}


def skipped_on_sm90(fn: str, params: dict, marks: list) -> str | None:
    """Why FA4's file skips this case on SM90 before it calls FA4 (None: it runs)."""
    for m in marks:
        if m.name == "skipif" and m.args and m.args[0] is True:
            return m.kwargs.get("reason", "skipif")
    if fn in SM90_BODY_SKIPS:
        return "skips on SM90 in its body"
    if fn in ("test_flash_attn_output", "test_flash_attn_varlen_output"):
        if params["local_enum"] > 0 and params["causal"]:
            return "local and causal"
    if fn == "test_flash_attn_kvcache":
        if params["page_size"] is not None and params["seqlen_k"] % params["page_size"]:
            return "page size does not divide seqlen_k"
    if fn == "test_flash_attn_varlen_cumsum_metadata_paths" and params.get("cumsum_mode") == "metadata_full":
        return "split-KV metadata: not on SM90"
    return None


class Collect:
    def __init__(self):
        self.items: list[tuple[str, str, dict]] = []
        self.skipped: Counter[str] = Counter()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            fn = item.originalname
            params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
            why = skipped_on_sm90(fn, params, list(item.iter_markers()))
            if why:
                self.skipped[fn] += 1
                continue
            self.items.append((fn, item.name, params))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(HERE / "cases.txt"))
    a = ap.parse_args()
    if os.environ.get("FA4AOT_FA4_SUITE") != "1" or os.environ.get("FA4SUITE_CASES"):
        print("run with FA4AOT_FA4_SUITE=1 and FA4SUITE_CASES unset", file=sys.stderr)
        return 2
    col = Collect()
    rc = pytest.main(
        ["--collect-only", "-qq", "-p", "no:cacheprovider", str(HERE / "test_flash_attn.py")], plugins=[col]
    )
    if rc != 0:
        return rc
    by_fn: dict[str, list[str]] = {}
    for fn, name, _ in col.items:
        by_fn.setdefault(fn, []).append(name)
    rng = random.Random(a.seed)
    chosen: list[str] = []
    for fn, names in by_fn.items():  # the file's order
        n = DRAW.get(fn)
        chosen += [names[i] for i in sorted(rng.sample(range(len(names)), n))] if n is not None else names
    counts = Counter(c.partition("[")[0] for c in chosen)
    lines = [
        "# FA4's tests/cute/test_flash_attn.py: SM90 cases drawn by tests/fa4_suite/make_cases.py",
        f"# --seed {a.seed}: {len(chosen)} cases; per test function:",
        *(f"#   {fn}: {n} (of {len(by_fn[fn])} that run on SM90)" for fn, n in counts.items()),
        *chosen,
    ]
    Path(a.output).write_text("\n".join(lines) + "\n")
    print(f"{len(chosen)} cases -> {a.output}", file=sys.stderr)
    for fn, n in counts.items():
        print(f"  {fn}: {n} of {len(by_fn[fn])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
