"""Every environment variable fa4aot reads, in one table, and the functions that read them.

No other module of fa4aot reads ``os.environ`` (tests/test_cli.py checks): a variable's name,
type, default and meaning live here once, ``fa4aot show-config`` prints their current values and
docs/environment.md's table is generated from :data:`VARS` (:func:`markdown_table`).

Standard library only: the runtime imports this module, and it must stay free of torch, the
CUTLASS DSL and even click.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

# -- names (other modules import these instead of spelling the strings) ------------------------

CACHE = "FA4AOT_CACHE"
TUNING = "FA4AOT_TUNING"
MISS_LOG = "FA4AOT_MISS_LOG"
RECORD = "FA4AOT_RECORD"
REQUIRE = "FA4AOT_REQUIRE"
ALLOW_SM_MISMATCH = "FA4AOT_ALLOW_SM_MISMATCH"
LOG = "FA4AOT_LOG"
TRUSTED_KEYS = "FA4AOT_TRUSTED_KEYS"
SIGNING_KEY = "FA4AOT_SIGNING_KEY"
STORE = "FA4AOT_STORE"
STORE_DEADLINE = "FA4AOT_STORE_DEADLINE"
STORE_CROSS_ORIGIN = "FA4AOT_STORE_CROSS_ORIGIN"
PATCH = "FA4AOT_PATCH"
RECORD_NO_COMPILE = "FA4AOT_RECORD_NO_COMPILE"
RECORD_HOOK = "FA4AOT_RECORD_HOOK"
RECORD_PREFIX = "FA4AOT_RECORD_PREFIX"
PATCH_MODULES = "FA4AOT_PATCH_MODULES"
DRIVER = "FA4AOT_DRIVER"
DECISION_REGIONS = "FA4AOT_DECISION_REGIONS"
HOP = "FA4AOT_HOP"
#: The runtime's CUDA driver bindings (fa4aot.runtime.driver.make_driver).
DRIVERS = ("ctypes", "cuda-bindings")
CC = "CC"
#: A pattern: ``CC_`` and a host arch in upper case (``CC_AARCH64``).
CC_ARCH = "CC_<ARCH>"
XDG_CACHE_HOME = "XDG_CACHE_HOME"
XDG_CONFIG_HOME = "XDG_CONFIG_HOME"
PYTHONPATH = "PYTHONPATH"

#: FA4's own selection knobs: the runtime reads them as FA4 does, so it picks the kernels FA4
#: would (fa4aot.core.fa4_interface.knobs_from_env, fa4aot.core.backward.bwd_knobs_from_env).
FA4_KNOBS = (
    "FLASH_ATTENTION_SM100_BACKEND",
    "FA_DISABLE_2CTA",
    "FA_DISABLE_S_PING_PONG",
    "FLASH_ATTENTION_BWD_TILE_N",
    "FLASH_ATTENTION_BWD_PACK_GQA",
    "FLASH_ATTENTION_BWD_HEAD_LOOP",
)


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, the kind of value, the default when unset (as a user
    would read it), who reads it and what it does."""

    name: str
    kind: str
    default: str
    scope: str
    doc: str


#: The table (docs/environment.md is generated from it; show-config prints it).
VARS: tuple[Var, ...] = (
    Var(
        CACHE,
        "path",
        "unset: installed cache wheels, then ./cache",
        "runtime, CLI",
        "The cache the runtime opens and the CLI uses. When set it is the only place the runtime looks.",
    ),
    Var(
        TUNING,
        "0 or 1",
        "1",
        "runtime",
        "0: ignore the cache's tuning table (launch FA4's own choice). `Runtime(tuned=...)` overrides.",
    ),
    Var(
        ALLOW_SM_MISMATCH,
        "0 or 1",
        "0",
        "runtime",
        "1: use kernels built for another SM count of the same arch (with a warning) instead of refusing. "
        "`Runtime(allow_sm_mismatch=...)` overrides.",
    ),
    Var(
        MISS_LOG,
        "path",
        "unset",
        "runtime",
        "Append a JSON line per variant a call needed and the cache lacked (`fa4aot manifest from-misses`).",
    ),
    Var(
        REQUIRE,
        "path",
        "unset",
        "runtime",
        "Strict mode: a requirements file (`fa4aot plan --write-require`); opening fails unless the cache "
        "holds every variant it lists for this GPU.",
    ),
    Var(
        LOG,
        "level name",
        "unset (CLI: INFO)",
        "runtime, CLI",
        "Level of the `fa4aot` loggers: DEBUG, INFO, WARNING, ERROR or CRITICAL. Set, the runtime logs to "
        "stderr (unless the application configured logging); the CLI's -v/-q override it.",
    ),
    Var(
        PATCH,
        "1, error, warn or fallback",
        "unset",
        "runtime (.pth)",
        "Set, the `fa4aot_patch.pth` line installed with fa4aot routes FA4's entry points to fa4aot at "
        "interpreter start, with that miss policy (docs/drop-in.md). Read by that line itself.",
    ),
    Var(
        TRUSTED_KEYS,
        "keys",
        "unset",
        "runtime, CLI",
        "Public keys (space or comma separated) a cache wheel must be signed by; with "
        "$XDG_CONFIG_HOME/fa4aot/trusted_keys.",
    ),
    Var(XDG_CONFIG_HOME, "path", "~/.config", "runtime, CLI", "Where `fa4aot/trusted_keys` is read from."),
    Var(
        "FLASH_ATTENTION_SM100_BACKEND",
        "FA4 knob",
        "auto",
        "runtime",
        "FA4's SM100 forward backend choice, read as FA4 reads it (the runtime picks what FA4 would).",
    ),
    Var("FA_DISABLE_2CTA", "FA4 knob", "0", "runtime", "FA4's knob: 1 disables its 2-CTA kernels."),
    Var("FA_DISABLE_S_PING_PONG", "FA4 knob", "0", "runtime", "FA4's knob: 1 disables its S ping-pong."),
    Var("FLASH_ATTENTION_BWD_TILE_N", "FA4 knob", "auto", "runtime", "FA4's backward tile_n override (64, 128)."),
    Var(
        "FLASH_ATTENTION_BWD_PACK_GQA", "FA4 knob", "auto", "runtime", "FA4's backward pack_gqa override (0, 1, 2, 4)."
    ),
    Var("FLASH_ATTENTION_BWD_HEAD_LOOP", "FA4 knob", "auto", "runtime", "FA4's backward head loop override (0, 1)."),
    Var(
        STORE,
        "URL or path",
        "unset",
        "CLI",
        "The store `fa4aot push` and `fa4aot pull` use when none is given.",
    ),
    Var(
        STORE_DEADLINE,
        "seconds",
        "3600",
        "CLI",
        "Seconds all HTTP transfers of one pull may take in all.",
    ),
    Var(
        STORE_CROSS_ORIGIN,
        "0 or 1",
        "0",
        "CLI",
        "1: HTTP stores may follow redirects to another scheme, host or port.",
    ),
    Var(
        SIGNING_KEY,
        "path",
        "unset",
        "CLI",
        "The private key `pack`, `push` and `wheel` sign with when --sign is not given.",
    ),
    Var(CC, "command", "cc, gcc or clang", "build", "The C compiler that links launch plans for this host."),
    Var(
        CC_ARCH,
        "command",
        "the Debian cross compiler",
        "build",
        "The C compiler for another host arch's launch plans (e.g. CC_AARCH64).",
    ),
    Var(
        XDG_CACHE_HOME,
        "path",
        "~/.cache",
        "CLI",
        "Where `fa4aot verify` keeps the plan runner it compiles for emulated host archs (fa4aot/).",
    ),
    Var(
        RECORD,
        "path",
        "unset",
        "runtime, record",
        "Set by `fa4aot record`: the log the workload's calls are recorded to.",
    ),
    Var(
        RECORD_NO_COMPILE,
        "0 or 1",
        "unset",
        "record",
        "Set by `fa4aot record --no-compile`: FA4 records its keys and compiles nothing.",
    ),
    Var(RECORD_HOOK, "path", "unset", "record", "Set by `fa4aot record`: the directory of its sitecustomize hook."),
    Var(RECORD_PREFIX, "path", "unset", "record", "Set by `fa4aot record`: the interpreter prefix it records."),
    Var(
        PATCH_MODULES,
        "module names",
        "unset",
        "runtime (.pth)",
        "More FA4 package roots (comma separated, e.g. a vendored `mypkg.flash_attn.cute`) for $FA4AOT_PATCH "
        "(docs/drop-in.md).",
    ),
    Var(
        DRIVER,
        " or ".join(DRIVERS),
        "ctypes",
        "runtime",
        "How the runtime calls the CUDA driver: `ctypes` (libcuda directly, the fastest start) or "
        "`cuda-bindings` (cuda-python's cuda.bindings.driver; needs cuda-python). Launches go through the "
        "plans' C code either way (benchmarks/driver_bindings.py compares them).",
    ),
    Var(
        DECISION_REGIONS,
        "0 or 1",
        "1",
        "runtime",
        "0: decide every new call shape with FA4's selector (no decision regions, "
        "fa4aot/runtime/regions.py); for comparisons and debugging.",
    ),
    Var(
        HOP,
        "0 or 1",
        "1",
        "runtime",
        "0: launch through ctypes even where fa4aot's compiled hop (fa4aot/plan/_hop.c, built by "
        "`pip install` when a C compiler is there) is installed; for comparisons and debugging.",
    ),
    Var(
        PYTHONPATH,
        "paths",
        "unset",
        "record, tools",
        "Extended, never replaced, for the processes `fa4aot record` and the FA4 comparisons start.",
    ),
)

_BY_NAME = {v.name: v for v in VARS}


def _known(name: str) -> str:
    """``name``, if the table has it (a read of an undocumented variable is a bug)."""
    if name not in _BY_NAME and not (name.startswith("CC_") and CC_ARCH in _BY_NAME):
        raise KeyError(f"{name} is not in fa4aot.core.env.VARS: add it there (name, type, default, doc)")
    return name


def get(name: str, default: str | None = None) -> str | None:
    """The variable's value as set (an empty string included), else ``default``: what
    ``os.environ.get`` gives, for a name the table documents."""
    return os.environ.get(_known(name), default)


def flag(name: str) -> bool:
    """True when the variable is ``1`` (spaces around it ignored)."""
    return (get(name) or "").strip() == "1"


def decision_regions() -> bool:
    """Whether forward rules reuse FA4's decisions by region (anything but ``0``)."""
    return (get(DECISION_REGIONS, "1") or "").strip() != "0"


def hop() -> bool:
    """Whether launches may use the compiled hop (anything but ``0``)."""
    return (get(HOP, "1") or "").strip() != "0"


def tuning() -> bool:
    """Whether the runtime applies the cache's tuning table (anything but ``0``)."""
    return get(TUNING, "1") != "0"


def allow_sm_mismatch() -> bool:
    """Whether a runtime not told otherwise uses kernels built for another SM count."""
    return flag(ALLOW_SM_MISMATCH)


def driver() -> str:
    """The runtime's driver binding (:data:`DRIVERS`); an unknown value is an error naming them."""
    value = get(DRIVER) or DRIVERS[0]
    if value not in DRIVERS:
        raise ValueError(f"${DRIVER} must be one of {', '.join(DRIVERS)}, got {value!r}")
    return value


def fa4_knobs() -> dict[str, str]:
    """FA4's selection knobs that are set, by name (for ``knobs_from_env``)."""
    return {k: v for k in FA4_KNOBS if (v := get(k)) is not None}


def cc_for(host_arch: str) -> str | None:
    """``$CC_<ARCH>`` for ``host_arch`` hosts, if set."""
    return get(f"CC_{host_arch.upper()}")


#: Level names FA4AOT_LOG takes.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level() -> int | None:
    """FA4AOT_LOG as a logging level (None: unset or empty). A name outside
    :data:`LOG_LEVELS` (or a number) raises ValueError naming the choices."""
    raw = (get(LOG) or "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    if raw.upper() not in LOG_LEVELS:
        raise ValueError(f"${LOG}={raw!r}: expected one of {', '.join(LOG_LEVELS)}")
    return logging.getLevelName(raw.upper())


def child_environ(**overrides: str) -> dict[str, str]:
    """The environment a child process gets: this one's, with ``overrides``."""
    return {**os.environ, **overrides}


def with_path_first(entry: str, var: str = PYTHONPATH, environ: Mapping[str, str] | None = None) -> str:
    """``var`` (a path list, default ``$PYTHONPATH``) with ``entry`` first."""
    rest = (environ if environ is not None else os.environ).get(_known(var), "")
    return os.pathsep.join(p for p in (entry, rest) if p)


def current() -> list[tuple[Var, str | None]]:
    """Each variable of the table with its value here (None: unset); ``CC_<ARCH>`` once per
    ``CC_*`` variable set (unset: once, None)."""
    out: list[tuple[Var, str | None]] = []
    for v in VARS:
        if v.name == CC_ARCH:
            set_ = sorted(k for k in os.environ if re.fullmatch(r"CC_[A-Z0-9_]+", k))
            out += [(Var(k, v.kind, v.default, v.scope, v.doc), os.environ[k]) for k in set_] or [(v, None)]
        else:
            out.append((v, os.environ.get(v.name)))
    return out


def markdown_table() -> str:
    """docs/environment.md's table (tests/test_cli.py checks the doc holds exactly this)."""
    rows = ["| variable | type | default | read by | what it does |", "| --- | --- | --- | --- | --- |"]
    for v in VARS:
        cells = (f"`{v.name}`", v.kind, v.default, v.scope, v.doc)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
