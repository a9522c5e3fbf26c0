"""Compile executors (CPU): a Ray build on a local 2-CPU cluster stores exactly the blobs a
local-pool build stores, and a Ray task whose worker is killed mid-compile is retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, needs_dsl, run_cli

from fa4aot.core.index import Cache

pytest.importorskip("ray", reason="the ray executor needs ray (the dev extra installs it)")
pytestmark = pytest.mark.slow  # a local Ray cluster starts in each test (about 13 s)

SMALL = (
    "target: {name: h100, arch: sm_90a, num_sms: 132}\nfamilies:\n  combine:\n    - head_dim: [64, 128]\n"
    "      num_head: 8\n  prepare:\n    - heads: [8, 2]\n      max_batch: 31\n"
)


def blobs(root) -> dict[str, list[str]]:
    return {k: sorted(b["sha256"] for b in json.loads(t)["blobs"].values()) for k, t in Cache(root).records()}


@needs_dsl
def test_a_ray_build_stores_exactly_the_blobs_of_a_local_build(tmp_path):
    m = tmp_path / "small.yaml"
    m.write_text(SMALL)
    run_cli("build", str(m), "--cache", str(tmp_path / "local"), "-j", "2", "-q")
    out = run_cli("build", str(m), "--cache", str(tmp_path / "ray"), "--executor", "ray", "-j", "2", timeout=900)
    total = next(ln for ln in out.stdout.splitlines() if ln.startswith("total")).split()[1:5]
    assert total == ["3", "0", "0", "0"]  # the same final table: built, cached, reused, failed
    assert "[3/3] built" in out.stderr  # and the same progress lines
    assert blobs(tmp_path / "ray") == blobs(tmp_path / "local") and len(blobs(tmp_path / "local")) == 3
    assert "0 bad" in run_cli("verify", "--cache", str(tmp_path / "ray")).stdout


@needs_dsl
def test_a_ray_task_whose_worker_is_killed_is_retried(tmp_path):
    m = tmp_path / "small.yaml"
    m.write_text(SMALL)
    crash = tmp_path / "crashes"
    crash.mkdir()
    code = (
        "import sys\n"
        "from fa4aot.compile.executors import executor_factory\n"
        "from fa4aot.compile.orchestrate import build\n"
        "from ray_jobs import crash_once\n"
        "r = build(sys.argv[1], sys.argv[2], 2, compile_fn=crash_once, pool_factory=executor_factory('ray'))\n"
        "print([row.status for row in r.rows]); sys.exit(0 if r.ok else 1)\n"
    )
    env = dict(
        os.environ,
        FA4AOT_TEST_CRASH_DIR=str(crash),
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(m), str(tmp_path / "c")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "['built', 'built', 'built']" in proc.stdout
    assert len(list(crash.iterdir())) == 3  # every task's first worker was killed
    assert blobs(tmp_path / "c").keys() and len(blobs(tmp_path / "c")) == 3
