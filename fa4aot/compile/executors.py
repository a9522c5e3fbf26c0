"""Where compile jobs run. The orchestrator submits ``compile_fn(variant, target, host_arch)`` jobs to an
executor (a :class:`concurrent.futures.Executor`) and stays the only writer into the cache: it
stores each returned :class:`~fa4aot.compile.worker.BuildOutput` (blob bytes and metadata) itself.

* ``local`` (default): a spawn process pool per target (:func:`fa4aot.compile.orchestrate._pool`).
* ``ray`` (fa4aot's ``ray`` extra): Ray tasks. Each asks for one CPU and the memory a
  compile measurably peaks at (:data:`COMPILE_MEMORY_BYTES`), is retried when its worker dies,
  and its worker is recycled after :data:`MAX_CALLS_PER_WORKER` compiles (MLIR compiles leak).
  Workers get the target arch in their environment (``runtime_env``), never from a device query;
  one Ray worker pool per target. ``ray.init()`` without an address starts a local cluster, so
  the Ray path also runs on one machine.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any

from fa4aot.core.errors import ToolchainError
from fa4aot.core.variant import Target, Variant

#: Memory a Ray compile task reserves: one FA4 forward compile peaks at ~700 MB RSS (build
#: reports, "peak worker RSS"), plus headroom for the worker's Python and DSL import.
COMPILE_MEMORY_BYTES = 1 << 30
#: Compiles per Ray worker process before Ray replaces it (bounds leaked compiler memory;
#: the local pool recycles on the same count, orchestrate.TASKS_PER_WORKER).
MAX_CALLS_PER_WORKER = 16
#: Times Ray re-runs a task whose worker died (killed, OOM) before the build records a failure.
TASK_RETRIES = 3

EXECUTORS = ("local", "ray")


def _run(fn: Callable[[Variant, Target, str], Any], variant: dict, target: dict, host_arch: str) -> Any:
    from fa4aot.compile.worker import configure

    t = Target.from_dict(target)
    configure(t)
    return fn(Variant.from_dict(variant), t, host_arch)


class RayExecutor(cf.Executor):
    """Compile jobs as Ray tasks (see the module doc)."""

    def __init__(self, target: Target, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise ToolchainError(
                "the ray executor needs Ray: install fa4aot's ray extra (pip install '.[ray]' in its checkout)"
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=workers, **kw)
        self._remote = ray.remote(
            num_cpus=1, memory=COMPILE_MEMORY_BYTES, max_retries=TASK_RETRIES, max_calls=MAX_CALLS_PER_WORKER
        )(_run).options(runtime_env={"env_vars": {"CUTE_DSL_ARCH": target.arch, "CUTE_DSL_LOG_LEVEL": "0"}})

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:  # type: ignore[override]
        variant, target, host_arch = args
        return self._remote.remote(fn, variant.to_dict(), target.to_dict(), host_arch).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """The cluster stays up for the next target (and for the caller's other work)."""


def executor_factory(name: str, address: str | None = None) -> Callable[[Target, int], cf.Executor] | None:
    """The orchestrator's ``pool_factory`` for an executor name (None: the local pool)."""
    if name == "local":
        if address:
            raise ToolchainError("--ray-address needs --executor ray")
        return None
    if name == "ray":
        return lambda target, workers: RayExecutor(target, workers, address)
    raise ToolchainError(f"unknown executor {name!r}; one of {', '.join(EXECUTORS)}")
