"""Test helpers. The session's caches: ``built_cache`` (tests/fast.yaml, the fast tier's: about 40
seconds of compiling on 2 cores) and ``ci_cache`` (manifests/ci.yaml, for the full tier, built with
``--reuse`` of the first). Set FA4AOT_TEST_CACHE_DIR to keep them between runs: a later run finds
their entries cached (keys include the toolchain and the kernel sources, so edits rebuild)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from fa4aot.core.variant import Variant

ROOT = Path(__file__).resolve().parent.parent
CI_MANIFEST = ROOT / "manifests" / "ci.yaml"
FAST_MANIFEST = ROOT / "tests" / "fast.yaml"
HAS_DSL = importlib.util.find_spec("cutlass") is not None and importlib.util.find_spec("flash_attn") is not None

needs_dsl = pytest.mark.skipif(not HAS_DSL, reason="needs the build extra (CUTLASS DSL + flash-attn-4)")


def run_cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the fa4aot CLI in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fa4aot.tools.cli", *args], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"fa4aot {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _cache_path(tmp_path_factory, name: str) -> Path:
    keep = os.environ.get("FA4AOT_TEST_CACHE_DIR")
    return Path(keep) / name if keep else tmp_path_factory.mktemp(name)


def _build_command(path: Path, manifest: Path, reuse: tuple[Path, ...]) -> list[str]:
    args = [arg for r in reuse for arg in ("--reuse", str(r))]
    return [sys.executable, "-m", "fa4aot.tools.cli", "build", str(manifest), "--cache", str(path), "-q", *args]


class BackgroundBuild:
    """A session cache compiled by the CLI in a child process while the tests that need no
    cache run (the build keeps both cores busy only part of the time; the tests use one)."""

    def __init__(self, tmp_path_factory, name: str, manifest: Path) -> None:
        self.path = _cache_path(tmp_path_factory, name)
        # (its own process group: its pool workers hold the output pipe, so stop() kills them too)
        self.proc = subprocess.Popen(
            _build_command(self.path, manifest, ()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

    def wait(self) -> Path:
        """The built cache (the build's output in the failure message if it failed)."""
        out, _ = self.proc.communicate()
        assert self.proc.returncode == 0, out
        return self.path

    def stop(self) -> None:
        """Kill the build and its workers if it is still running."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def build_session_cache(tmp_path_factory, name: str, manifest: Path, reuse: tuple[Path, ...] = ()) -> Path:
    """A cache holding every variant of ``manifest``, compiled by the CLI (entries another session
    cache holds under the same key are copied with ``--reuse``)."""
    if not HAS_DSL:
        pytest.skip("needs the build extra (CUTLASS DSL + flash-attn-4) to compile kernels")
    path = _cache_path(tmp_path_factory, name)
    proc = subprocess.run(_build_command(path, manifest, reuse), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def run_threads(worker: Callable[..., object], args: Iterable[object]) -> None:
    """Run ``worker(arg)`` for every ``arg`` at once, one thread each, and wait for all of them."""
    threads = [threading.Thread(target=worker, args=(arg,)) for arg in args]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def assert_imports_none_of(statement: str, packages: tuple[str, ...], modules: tuple[str, ...] = ()) -> None:
    """Run ``statement`` in a fresh interpreter; fail if that imported a module of one of
    ``packages`` (top-level names) or one whose name starts with one of ``modules``."""
    code = (
        f"import sys\n{statement}\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {packages!r} or m.startswith({modules!r})]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def combine_variant(i: int, arch: str = "sm_100a", sms: int = 148) -> Variant:
    """A combine variant, distinct for each ``i`` (its head count): what fake cache entries stand for."""
    return Variant.make(
        "combine",
        arch,
        sms,
        dtype="bf16",
        head_dim=128,
        num_head=i,
        log_max_splits=7,
        varlen=False,
        seqused=False,
        has_lse=False,
        num_splits_dynamic=False,
    )


#: The split-KV varlen decode the forward tests make: batch, heads, KV heads, head dim, then the
#: packed query and key token counts (16 one-token queries against 40000 keys, GQA 4).
SPLIT_DECODE = (16, 16, 4, 128, 16, 40000)


def split_decode_tensors(t: Callable[..., object]) -> tuple:
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k, out)`` of SPLIT_DECODE, made by a test module's fake
    tensor factory ``t(i, shape, dtype="bf16")`` (buffers 0 to 5)."""
    b, h, hk, d, total_q, total_k = SPLIT_DECODE
    q, k, v = t(0, (total_q, h, d)), t(1, (total_k, hk, d)), t(2, (total_k, hk, d))
    cu_q, cu_k = t(4, (b + 1,), "int32"), t(5, (b + 1,), "int32")
    return q, k, v, cu_q, cu_k, t(3, (total_q, h, d))
