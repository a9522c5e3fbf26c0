"""fa4aot command line: build FA4 kernels ahead of time into a verified cache, inspect it, and
show the launches its plans make - all without a GPU."""

from __future__ import annotations

import functools
import json
import logging
import platform
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

try:
    import click
except ImportError:  # the runtime-only install has no CLI stack
    sys.exit("fa4aot's command line needs the cli extra: pip install 'fa4aot[cli]' ('fa4aot[build]' to compile)")

from fa4aot.core import env, logs
from fa4aot.core.errors import Fa4aotError
from fa4aot.core.index import Cache, default_cache_dir

if TYPE_CHECKING:
    from fa4aot.core.signing import Policy

_log = logs.get("fa4aot.cli")

#: Exit status of a command stopped by Ctrl-C: 128 + SIGINT, as a shell reports a process it killed.
INTERRUPTED_EXIT = 130
#: ``ctx.meta`` keys: whether the command line asks for --json, and the command it names.
_JSON_META = "fa4aot.json"
_COMMAND_META = "fa4aot.command"


class _Cli(click.Group):
    """The fa4aot group. Ctrl-C anywhere in a command ends it with one line on stderr and exit
    status 130 (no traceback). With --json on the command line, an error (a usage error included)
    is a JSON document on stdout too (docs/cli-json.md)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        words = args[: args.index("--")] if "--" in args else args  # what follows -- is a workload's
        ctx.meta[_JSON_META] = "--json" in words
        ctx.meta[_COMMAND_META] = next((w for w in words if w in self.commands), None)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()
        except click.ClickException as e:
            if not ctx.meta.get(_JSON_META):
                raise
            _json_error(ctx.meta.get(_COMMAND_META), e)


def _interrupted() -> NoReturn:
    """Ctrl-C: one line, exit 130 (the build's workers ignore SIGINT; the build stops them)."""
    click.echo("fa4aot: interrupted", err=True)
    sys.exit(INTERRUPTED_EXIT)


def _json_error(command: str | None, e: click.ClickException) -> NoReturn:
    """An error under --json: ``{"command", "error": {"type", "message"}}`` on stdout, the usual
    line on stderr, the usual exit status (1; 2 for a usage error). ``type`` is the fa4aot error
    class behind it (commands raise ClickException ``from None``; the context keeps the cause)."""
    cause = e.__context__
    kind = type(cause).__name__ if isinstance(cause, Fa4aotError) else type(e).__name__
    doc = {
        "command": command,
        "error": {"type": "Error" if kind == "ClickException" else kind, "message": e.format_message()},
    }
    click.echo(json.dumps(doc, indent=1))
    click.echo(f"Error: {e.format_message()}", err=True)
    sys.exit(e.exit_code)


def _emit(
    command: str, cache: Path | str | None, records: list[dict[str, Any]], summary: dict[str, Any], **extra: Any
) -> None:
    """A command's --json document (docs/cli-json.md): the command, the cache it read or wrote
    (an absolute path; None when it used none), its records and a summary, then anything the
    command adds."""
    doc: dict[str, Any] = {
        "command": command,
        "cache": None if cache is None else str(Path(cache).absolute()),
        "records": records,
        "summary": summary,
        **extra,
    }
    click.echo(json.dumps(doc, indent=1, default=str))


JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead (docs/cli-json.md)."
)


def _progress(total: int, what: str, *, quiet: bool = False, lines: bool = True) -> Any:
    """A progress display on stderr (fa4aot.tools.progress), off under -q (the command's or the
    group's: the fa4aot logger then skips INFO)."""
    from fa4aot.tools.progress import Progress

    return Progress(total, what, enabled=not quiet and _log.isEnabledFor(logging.INFO), lines=lines)


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows as lines of aligned columns (widths from the widest cell; columns in ``right``
    right-aligned; the last column left unpadded)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = set(right)
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        cells[-1] = r[-1].rjust(widths[-1]) if len(r) - 1 in right else r[-1]
        out.append("  ".join(cells).rstrip())
    return out


def _text(value: Any) -> str:
    """A value as a person reads it: None as 'none' (at any depth), a sequence as '[a, b, c]' or
    '(a, b, c)' (grid, block, cluster: as Python writes numbers), a mapping as 'k=v, k=v', else
    str()."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_text(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) if value else "none"
    return str(value)


#: --host-arch's values: the arch names fa4aot builds plans for, and the aliases other tools use.
HOST_ARCHES = ("x86_64", "aarch64")
HOST_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _host_arch_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--host-arch: x86_64 or aarch64 (amd64 / arm64 accepted and normalised); else a usage error."""
    if value is None:
        return None
    arch = HOST_ARCH_ALIASES.get(value.lower(), value.lower())
    if arch not in HOST_ARCHES:
        known = ", ".join(HOST_ARCHES) + f" (or {', '.join(HOST_ARCH_ALIASES)})"
        raise click.BadParameter(f"unknown host arch {value!r}; one of {known}")
    return arch


def _family_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --family of a reading command: a family fa4aot knows, else a usage error listing them."""
    if value is None:
        return None
    from fa4aot.core.families import FAMILIES

    if value not in FAMILIES:
        raise click.BadParameter(f"unknown family {value!r}; known: {', '.join(sorted(FAMILIES))}")
    return value


def _version_text() -> str:
    """fa4aot's version, the FA4 and CUTLASS DSL versions it builds with (the build extra's
    pins) and those installed here."""
    import importlib.metadata

    from fa4aot import __version__
    from fa4aot.compile.toolchain import PINNED

    def installed(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    pins = ", ".join(f"{d} {v}" for d, v in PINNED.items())
    here = ", ".join(f"{d} {installed(d)}" for d in PINNED)
    return f"fa4aot {__version__}\nbuilds kernels with {pins} (the build extra's pins)\ninstalled here: {here}"


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--version (eager: before any command is looked at)."""
    if value and not ctx.resilient_parsing:
        click.echo(_version_text())
        ctx.exit()


def _log_level(verbose: int, quiet: int) -> int:
    """The CLI's level: $FA4AOT_LOG (default INFO), each -v one level down, each -q one up."""
    try:
        base = env.log_level()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    level = (logging.INFO if base is None else base) + 10 * (quiet - verbose)
    return min(max(level, logging.DEBUG), logging.CRITICAL)


CACHE_OPTION = click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache directory [default: $FA4AOT_CACHE, else ./cache; commands that only read also look "
    "in installed cache wheels first, as the runtime does].",
)


#: Caches already named on stderr by this process (a command resolving its cache twice says it once).
_ANNOUNCED: set[str] = set()


def _announce(what: str) -> None:
    """Say on stderr (an INFO record: -q hides it) which cache a command uses when --cache was not
    given (once per cache); its summary line and --json document name it in any case."""
    if what not in _ANNOUNCED:
        _ANNOUNCED.add(what)
        _log.info("using the cache %s (--cache to choose another)", what)


def _cache_dir(cache_dir: Path | None) -> Path:
    """The cache a writing command uses: --cache, else $FA4AOT_CACHE, else ./cache (named on stderr)."""
    if cache_dir is not None:
        return cache_dir
    from fa4aot.core.index import DEFAULT_CACHE_ENV

    path = default_cache_dir()
    _announce(f"{path} (from ${DEFAULT_CACHE_ENV})" if env.get(DEFAULT_CACHE_ENV) else f"{path} (the default)")
    return path


def _open(cache_dir: Path | None) -> Cache:
    """The cache a read-only command inspects: --cache, else the one the runtime would read on
    this machine (the same function chooses: ``choose_cache``, by this GPU when one is visible,
    else by this host), named on stderr with whatever the choice warned about."""
    if cache_dir is not None:
        return Cache(cache_dir)
    import warnings

    from fa4aot.core.index import cache_search_path
    from fa4aot.runtime.loader import choose_cache, host_arch, visible_device, warn_if_untrusted

    cache: Cache | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        places = cache_search_path()
        try:
            where, cache, index = choose_cache(visible_device(), host_arch(), places=places)
            index.close()
            warn_if_untrusted(cache, f"{where} at {cache.root}")
        except Fa4aotError:
            cache = None
    for w in caught:
        _log.warning("%s", str(w.message).removeprefix("fa4aot: "))
    if cache is None:  # nothing serves this machine: inspect the first cache there is, as before
        where, cache = _first_cache(places)
    _announce(f"{cache.root} ({where})")
    return cache


def _first_cache(places: list[tuple[str, Path]]) -> tuple[str, Cache]:
    """The first place holding a cache at all (the last place's error is raised)."""
    for where, path in places[:-1]:
        try:
            return where, Cache(path)
        except Fa4aotError:
            continue
    return places[-1][0], Cache(places[-1][1])


def _finite(value: float, name: str) -> float:
    if value != value:  # NaN
        raise click.BadParameter("must be a number, got nan", param_hint=name)
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print fa4aot's version and the FA4 / CUTLASS DSL versions it builds with, and exit.",
)
@click.option(
    "-v", "--verbose", count=True, help="More messages on stderr (-v: debug) [default: $FA4AOT_LOG, else INFO]."
)
@click.option("-q", "--quiet", count=True, help="Fewer messages on stderr (-q: warnings, no progress; -qq: errors).")
def main(verbose: int, quiet: int) -> None:
    """Ahead-of-time FlashAttention-4 kernel cache.

    Build every kernel a deployment needs from a YAML manifest (no GPU needed), ship the cache,
    and launch the kernels with the zero-JIT runtime (`import fa4aot`). Ctrl-C stops any command
    (exit status 130).
    """
    logs.configure(_log_level(verbose, quiet))
    click.get_current_context().call_on_close(logs.unconfigure)
    _ANNOUNCED.clear()  # once per command run (a test runs many in one process)


@main.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CACHE_OPTION
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 256),
    default=None,
    help="Parallel compiles [default: bounded by CPUs and memory].",
)
@click.option("--family", multiple=True, help="Build only these families (repeatable).")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines or bar.")
@JSON_OPTION
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where compiles run: a local process pool, or Ray tasks (fa4aot[ray]; -j = tasks in flight).",
)
@click.option("--ray-address", default=None, help="Ray cluster to join [default: start a local one].")
@click.option(
    "--reuse",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A cache (read-only) to copy entries of the same key from instead of compiling them (repeatable).",
)
def build(
    manifest: Path,
    cache_dir: Path | None,
    jobs: int | None,
    family: tuple[str, ...],
    quiet: bool,
    as_json: bool,
    executor: str,
    ray_address: str | None,
    reuse: tuple[Path, ...],
) -> None:
    """Compile every variant MANIFEST asks for into the cache.

    Variants already in the cache (same variant, target, toolchain and sources) are skipped; one
    failing variant is reported and does not stop the others. Exits 1 if any variant failed.
    Whatever the executor, this process alone writes the cache.

    With --reuse, an entry another cache holds under the same key (variant, target, toolchain
    fingerprint, host arch) is copied from it, blobs hash-checked, instead of compiled: builds are
    byte-reproducible, so it is what this build would produce.
    """
    from fa4aot.compile.executors import executor_factory
    from fa4aot.compile.orchestrate import build as run_build

    bar: list[Any] = []  # made at the first step, when the total is known

    def progress(done: int, total: int, row: Any) -> None:
        if not bar:
            bar.append(_progress(total, "build", quiet=quiet))
        extra = f"{row.seconds:5.1f}s" if row.status in ("built", "failed") else "     "
        host = f" ({row.host} host)" if row.host and row.host != platform.machine() else ""
        bar[0].step(f"{row.status:<6} {extra} {row.key[:12]} {row.variant.label()}{host}")
        if row.error:
            bar[0].note(f"    error: {row.error}")

    root = _cache_dir(cache_dir)
    try:
        report = run_build(
            manifest,
            root,
            jobs,
            progress=progress,
            families=family,
            pool_factory=executor_factory(executor, ray_address),
            reuse=reuse,
        )
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    finally:
        for b in bar:
            b.close()
    if as_json:
        _build_json(report, root)
    else:
        _build_summary(report, root)
    if not report.ok:
        sys.exit(1)


#: The statuses of a build's rows, in the order its summary counts them.
BUILD_STATUSES = ("built", "cached", "reused", "failed")


def _build_summary(report: Any, root: Path) -> None:
    """The table of a build per family (stdout), its failures and why it stopped (stderr)."""
    rows = report.rows
    table = [["family", *BUILD_STATUSES, "compile s", "size"]]
    for fam in sorted({r.variant.family for r in rows}):
        rs = [r for r in rows if r.variant.family == fam]
        counts = [str(sum(r.status == st for r in rs)) for st in BUILD_STATUSES]
        table.append([fam, *counts, f"{sum(r.seconds for r in rs):.1f}", _human(sum(r.size for r in rs))])
    counts = [str(report.count(st)) for st in BUILD_STATUSES]
    table.append(["total", *counts, f"{sum(r.seconds for r in rows):.1f}", _human(sum(r.size for r in rows))])
    click.echo("")
    for line in _table(table, right=range(1, 7)):
        click.echo(line)
    click.echo(f"wall {report.wall_seconds:.1f} s, peak worker RSS {report.peak_rss_mb:.0f} MiB, cache {root}")
    for r in rows:
        if r.status == "failed":
            click.echo(f"FAILED {r.variant.label()}: {r.error}", err=True)
    if report.stopped:
        stored = report.count("built") + report.count("reused")
        click.echo(
            f"build stopped: {report.stopped}; {stored} variants were stored before it, the rest were not", err=True
        )


def _build_json(report: Any, root: Path) -> None:
    """``build --json``: a record per variant and host arch, counts in the summary."""
    records = [
        {
            "key": r.key,
            "variant_id": r.variant.variant_id,
            "family": r.variant.family,
            "label": r.variant.label(),
            "host_arch": r.host,
            "status": r.status,
            "seconds": round(r.seconds, 3),
            "size": r.size,
            "error": r.error,
        }
        for r in report.rows
    ]
    summary = {st: report.count(st) for st in BUILD_STATUSES}
    summary.update(
        wall_seconds=round(report.wall_seconds, 3),
        peak_worker_rss_mb=round(report.peak_rss_mb, 1),
        stopped=report.stopped,
        ok=report.ok,
    )
    _emit("build", root, records, summary)


@main.command("plan")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--skipped/--no-skipped", default=True, help="List skipped combinations and why.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--against",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Coverage: which of the variants this cache has and lacks (exit 1 if it lacks any).",
)
@click.option(
    "--write-require",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the requirements file strict mode reads (Runtime(require=...) / $FA4AOT_REQUIRE).",
)
def plan_cmd(manifest: Path, skipped: bool, as_json: bool, against: Path | None, write_require: Path | None) -> None:
    """Show the variants MANIFEST expands to, and what was skipped and why (no compiling)."""
    from fa4aot.compile import manifest as manifest_mod
    from fa4aot.core.families import is_tuning_candidate

    try:
        plan = manifest_mod.load(manifest)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    if write_require is not None:
        doc = {
            "format": "fa4aot-require/1",
            "manifest": str(manifest),
            "variants": [
                {
                    "id": pv.variant.variant_id,
                    "label": pv.variant.label(),
                    "arch": pv.target.arch,
                    "num_sms": pv.target.num_sms,
                }
                for pv in plan.variants
            ],
        }
        write_require.write_text(json.dumps(doc, indent=1) + "\n")
        click.echo(f"wrote {write_require}: {len(plan.variants)} variants a strict runtime will require")
        return
    if against is not None:
        from fa4aot.compile.archive import cache_entries
        from fa4aot.runtime.loader import host_arch

        try:
            have = {e.variant_id for e in cache_entries(Cache(against)) if e.host_arch == host_arch()}
        except Fa4aotError as e:
            raise click.ClickException(str(e)) from None
        lacks = [pv for pv in plan.variants if pv.variant.variant_id not in have]
        if as_json:
            _coverage_json(plan, lacks, against)
        else:
            for t in plan.targets:
                mine = [pv for pv in plan.variants if pv.target == t]
                miss = [pv for pv in lacks if pv.target == t]
                click.echo(f"target {t.name}: {against} has {len(mine) - len(miss)} of {len(mine)} variants")
            for pv in lacks:
                click.echo(f"  lacks {pv.variant.variant_id[:12]} {pv.variant.label()}   <- {pv.origin}")
        if lacks:
            sys.exit(1)
        return
    if as_json:
        _plan_json(plan)
        return
    for t in plan.targets:
        hosts = ", ".join(plan.hosts(t, platform.machine()))
        click.echo(f"target {t.name}: {t.arch}, {t.num_sms} SMs; launch plans for {hosts} hosts")
    click.echo(f"{len(plan.variants)} variants: " + ", ".join(f"{k} {v}" for k, v in sorted(plan.counts().items())))
    candidates = 0
    for pv in plan.variants:
        mark = "T" if is_tuning_candidate(pv.variant.family, pv.variant.fields) else " "
        candidates += mark == "T"
        click.echo(f" {mark}{pv.variant.variant_id[:12]} {pv.variant.label()}   <- {pv.origin}")
    if candidates:
        click.echo(f"{candidates} variants marked T exist only as tuning candidates (`fa4aot tune` measures them)")
    if skipped and plan.skipped:
        reasons: dict[str, int] = {}
        for s in plan.skipped:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        click.echo(f"{len(plan.skipped)} combinations skipped:")
        for reason, count in sorted(reasons.items(), key=lambda x: -x[1]):
            click.echo(f"  {count:>5}  {reason}")


@main.command("tune")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CACHE_OPTION
@click.option(
    "--shapes",
    default="sweep24",
    show_default=True,
    help="sweep24 (dense and varlen, d64/d128, causal or not, GQA 1/4/8, 512-16k), a file with one "
    "shape per line, or shapes separated by ';' - each like b=16,s=2048,h=32,hk=8,d=128,causal=1,varlen=0.",
)
@click.option(
    "-o", "output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the table here."
)
@click.option("--rounds", type=click.IntRange(2, 1000), default=7, show_default=True, help="Interleaved timing rounds.")
@click.option("--reps", type=click.IntRange(1, 1000), default=3, show_default=True, help="Timed calls per round.")
@click.option("--dry-run", is_flag=True, help="List each shape's default and candidates; measure nothing.")
def tune_cmd(
    manifest: Path, cache_dir: Path | None, shapes: str, output: Path | None, rounds: int, reps: int, dry_run: bool
) -> None:
    """Measure, on this GPU, every candidate variant MANIFEST built into the cache against FA4's
    own choice for each shape, and store the winners as the cache's tuning table for this
    device (the runtime applies it from then on; FA4AOT_TUNING=0 turns it off).

    A candidate wins only when its median time beats FA4's by more than the measured noise. Needs
    torch and a CUDA GPU; the table lands in CACHE/tuning/. FA4's choices come from the selector
    the cache was built with, as the runtime's do (flash-attn-4 need not be installed here;
    --dry-run reads the installed one).
    """
    from fa4aot.compile import manifest as manifest_mod
    from fa4aot.core import selector
    from fa4aot.tools import tune as tune_mod

    try:
        shape_list = tune_mod.parse_shapes(shapes)
        if dry_run:
            _tune_dry_run(manifest_mod.load(manifest), shape_list)
            return
        from fa4aot.runtime.loader import Runtime

        rt = Runtime(_cache_dir(cache_dir), tuned=False)
        with selector.using(rt.selector):
            plan = manifest_mod.load(manifest)
            pool = [
                pv.variant
                for pv in plan.variants
                if (pv.target.arch, pv.target.num_sms) == (rt.target.arch, rt.target.num_sms)
            ]
            if not pool:
                raise click.ClickException(
                    f"{manifest} has no target for this GPU ({rt.target.arch}, {rt.target.num_sms} SMs)"
                )
            flush = 2 * rt.target.l2_bytes if rt.target.l2_bytes else tune_mod.DEFAULT_FLUSH_BYTES
            table = tune_mod.tune(rt, pool, shape_list, rounds=rounds, reps=reps, flush_bytes=flush, log=click.echo)
        path = tune_mod.write_table(rt.cache.root, table, output)
    except ImportError as e:
        raise click.ClickException(f"tuning measures on the GPU with torch: {e}") from None
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    sp = [m["speedup"] for m in table.measured]
    click.echo(
        f"{len(table.entries)} tuned entries over {len(table.measured)} shapes; geometric mean speedup over "
        f"FA4's choice {tune_mod.geomean(sp):.3f}; table {path} (sha256 {table.sha256[:16]})"
    )


def _plan_json(plan: Any) -> None:
    """``plan --json``: a record per variant (also under ``variants``, the name earlier readers
    use), the targets with their host archs, and what was skipped and why."""
    from fa4aot.core.families import is_tuning_candidate

    variants = [
        {
            "id": pv.variant.variant_id,
            "origin": pv.origin,
            "tuning_candidate": is_tuning_candidate(pv.variant.family, pv.variant.fields),
            **pv.variant.to_dict(),
        }
        for pv in plan.variants
    ]
    summary = {"variants": len(plan.variants), "skipped": len(plan.skipped), "families": plan.counts()}
    _emit(
        "plan",
        None,
        variants,
        summary,
        targets=[dict(t.to_dict(), host_arch=list(plan.hosts(t, platform.machine()))) for t in plan.targets],
        variants=variants,
        skipped=[{"origin": s.origin, "axes": s.axes, "reason": s.reason} for s in plan.skipped],
    )


def _coverage_json(plan: Any, lacks: list[Any], against: Path) -> None:
    """``plan --against --json``: one record per variant the manifest builds, whether the cache
    has it; per target, how many it has."""
    missing = {id(pv) for pv in lacks}
    records = [
        {
            "id": pv.variant.variant_id,
            "label": pv.variant.label(),
            "target": pv.target.name,
            "origin": pv.origin,
            "present": id(pv) not in missing,
        }
        for pv in plan.variants
    ]
    targets = {
        t.name: {
            "has": sum(r["present"] for r in records if r["target"] == t.name),
            "of": sum(r["target"] == t.name for r in records),
        }
        for t in plan.targets
    }
    summary = {"variants": len(records), "lacks": len(lacks), "targets": targets, "ok": not lacks}
    _emit("plan", against, records, summary)


def _tune_dry_run(plan, shape_list) -> None:
    """Each shape's default variant (the installed FA4's choice) and its candidates, per target."""
    from fa4aot.tools import tune as tune_mod

    for t in plan.targets:
        pool = [pv.variant for pv in plan.variants if pv.target == t]
        click.echo(f"target {t.name}: {t.arch}, {t.num_sms} SMs")
        for shape in shape_list:
            try:
                dv = tune_mod.default_variant(shape, t)
            except Fa4aotError as e:
                click.echo(f"  {shape.label():<44} not served on this target: {e}")
                continue
            cands = tune_mod.candidates(dv, pool)
            built = "" if any(pv.variant == dv for pv in plan.variants) else " (not in the manifest!)"
            click.echo(
                f"  {shape.label():<44} FA4: {dv.fields['tile_m']}x{dv.fields['tile_n']}{built}, {len(cands)} candidates"
            )


@main.command("show-tuning")
@CACHE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the tables' JSON.")
def show_tuning_cmd(cache_dir: Path | None, as_json: bool) -> None:
    """Print the cache's tuning tables (one per target and device): each entry's shape bucket,
    FA4's variant and the measured choice, and every measured shape. Needs no GPU."""
    from fa4aot.core.index import read_regular
    from fa4aot.core.tuning import MAX_TABLE_BYTES, TuningTable, TuningTableError
    from fa4aot.tools.tune import table_lines

    cache = _open(cache_dir)
    d = cache.root / "tuning"
    files = sorted(d.glob("*.json")) if d.is_dir() else []
    if not files:
        click.echo(f"no tuning tables in {cache.root} (run `fa4aot tune` on the GPU)")
        return
    labels: dict[str, str] = {}
    try:
        for e in cache.entries():
            labels[e.variant_id] = e.variant.label()
    except Fa4aotError:
        pass
    bad = 0
    for f in files:
        try:
            size = f.stat().st_size
            if size > MAX_TABLE_BYTES:
                raise TuningTableError(f"{size} bytes, more than {MAX_TABLE_BYTES}")
            # as the runtime reads it: a FIFO, device or link is refused, never read
            table = TuningTable.from_bytes(read_regular(cache.root, ("tuning", f.name), size))
        except (TuningTableError, OSError) as e:
            click.echo(f"{f.name}: ignored by the runtime: {e}", err=True)
            bad += 1
            continue
        if as_json:
            click.echo(json.dumps(table.payload(), indent=1))
            continue
        click.echo(
            f"{f.name}: {table.device_name} ({table.arch}, {table.num_sms} SMs), {table.created}, sha256 {table.sha256[:16]}"
        )
        for line in table_lines(table, labels):
            click.echo(line)
    if bad:
        sys.exit(1)


@main.command()
def axes() -> None:
    """List every kernel family and the manifest axes it takes, with defaults."""
    from fa4aot.core.families import FAMILIES

    for fam in FAMILIES.values():
        click.echo(f"{fam.name}  ({', '.join(fam.arches)}): {fam.doc}")
        for a in fam.axes:
            default = ", ".join(str(list(d)) if isinstance(d, tuple) else str(d) for d in a.default)
            click.echo(f"  {a.name:<20} default [{default}]  {a.doc}")


@main.command("ls")
@CACHE_OPTION
@click.option("--family", default=None, callback=_family_option, help="Only this family (one fa4aot knows).")
@JSON_OPTION
def ls_cmd(cache_dir: Path | None, family: str | None, as_json: bool) -> None:
    """List cache entries: key, variant id, target, host CPU arch of the plan, size, label; then,
    on stderr, how many and the cache they are in."""
    try:
        cache = _open(cache_dir)
        entries = [e for e in cache.entries() if not family or e.variant.family == family]
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    sizes = [sum(b.size for b in e.blobs.values()) for e in entries]
    if as_json:
        records = [
            {
                "key": e.key,
                "variant_id": e.variant_id,
                "family": e.variant.family,
                "label": e.variant.label(),
                "target": e.target.name,
                "arch": e.target.arch,
                "num_sms": e.target.num_sms,
                "host_arch": e.host_arch,
                "size": size,
            }
            for e, size in zip(entries, sizes)
        ]
        _emit("ls", cache.root, records, {"entries": len(entries), "bytes": sum(sizes), "family": family})
        return
    rows = [
        [e.key[:12], e.variant_id[:12], e.target.name, e.host_arch, _human(size), e.variant.label()]
        for e, size in zip(entries, sizes)
    ]
    for line in _table(rows, right=(4,)):
        click.echo(line)
    of = f" {family}" if family else ""
    click.echo(f"{len(entries)}{of} entries, {_human(sum(sizes))}, in the cache {cache.root}", err=True)


@main.command()
@click.argument("key")
@CACHE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw metadata record.")
@click.option(
    "--cubin-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the entry's cubin (verified) to this file, for cuobjdump/nvdisasm.",
)
def show(key: str, cache_dir: Path | None, as_json: bool, cubin_out: Path | None) -> None:
    """Show one entry (KEY: a prefix of its key or variant id)."""
    try:
        cache = _open(cache_dir)
        e = cache.resolve(key)
        if cubin_out is not None:
            cubin_out.write_bytes(cache.read_cubin(e))
    except Fa4aotError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"cannot write {cubin_out}: {err.strerror or err}") from None
    m = e.meta
    if as_json:
        click.echo(json.dumps(m, indent=1, sort_keys=True))
        return
    click.echo(f"key         {e.key}")
    click.echo(f"variant id  {e.variant_id}")
    click.echo(f"variant     {e.variant.label()}")
    click.echo(f"target      {e.target.name} {e.target.arch} {e.target.num_sms} SMs; host {_text(m.get('host_arch'))}")
    cref = e.cubin
    where = f"inside the plan at offset {cref.offset}, {cref.size} B, sha256 {cref.sha256[:16]}..." if cref else "?"
    click.echo(f"cubin       {_text(m.get('cubin_arch'))} (toolkit {_text(m.get('cubin_toolkit'))}), {where}")
    launch = m.get("launch", {})
    click.echo(
        f"launch      block {_text(launch.get('block'))} smem {_text(launch.get('smem'))} "
        f"cluster {_text(launch.get('cluster'))}"
    )
    click.echo(f"            sample {_text(launch.get('sample'))}: grid {_text(launch.get('sample_grid'))}")
    for k in m.get("kernels", []):
        click.echo(f"kernel      {k['symbol']}")
        click.echo(
            f"            {len(k['params'])} params, {k['cbank_param_size']} bytes, block {_text(k['reqntid'])}, "
            f"{k['registers']} registers"
        )
        for o, off, size in k["params"]:
            click.echo(f"              param {o:>2}  offset 0x{off:03x}  size {size}")
    click.echo("arguments   " + ", ".join(_arg_text(a) for a in m["signature"]["args"]))
    for role, ref in e.blobs.items():
        click.echo(f"blob        {role:<12} {ref.size:>8} B  {cache.blob_path(ref)}")
    click.echo(f"toolchain   {_text(m.get('toolchain'))}")
    click.echo(f"built       {_built_text(m.get('build'))} from {_text(m.get('origin'))}")


def _built_text(build: Any) -> str:
    """An entry's build record as text: 'in 0.7 s, peak RSS 687 MiB' ('reused' entries have none)."""
    if not isinstance(build, dict):
        return _text(build)
    parts = []
    if isinstance(build.get("seconds"), (int, float)):
        parts.append(f"in {build['seconds']:.1f} s")
    if isinstance(build.get("peak_rss_mb"), (int, float)):
        parts.append(f"peak RSS {build['peak_rss_mb']:.0f} MiB")
    rest = {k: v for k, v in build.items() if k not in ("seconds", "peak_rss_mb")}
    return ", ".join(parts + ([_text(rest)] if rest else [])) or "none"


def _arg_text(a: dict[str, Any]) -> str:
    if a["kind"] == "tensor":
        dims = ",".join("?" if s is None else str(s) for s in a["shape"])
        return f"{a['name']}:{a['dtype']}[{dims}]"
    if a["kind"] == "scalar":
        return f"{a['name']}:{a['ctype']}"
    return a["name"]


# -- delivery: archives, wheels, remote stores --------------------------------------------------

MANIFEST_SELECT = click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Exactly the variants this manifest builds (fails, naming them, if any is missing).",
)
TARGET_SELECT = click.option(
    "--target", "targets", multiple=True, help="Only entries of this target name (repeatable)."
)
HOST_SELECT = click.option(
    "--host-arch",
    default=None,
    callback=_host_arch_option,
    help="Entries whose launch plans are for this host CPU arch: x86_64 or aarch64 (amd64, arm64 accepted) "
    "[default: this host].",
)


def _select(available, where: str, manifest: Path | None, targets: tuple[str, ...], host: str | None):
    from fa4aot.compile.archive import select_entries
    from fa4aot.plan.abi import SHIM_ABI
    from fa4aot.runtime.loader import host_arch

    variants = None
    if manifest is not None:
        from fa4aot.compile import manifest as manifest_mod

        plan = manifest_mod.load(manifest)
        variants = [pv.variant for pv in plan.variants if not targets or pv.target.name in targets]
    host = host or host_arch()
    return select_entries(available, where, host_arch=host, targets=targets, variants=variants, shim_abi=SHIM_ABI), host


SIGN_OPTION = click.option(
    "--sign",
    "sign_key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar="FA4AOT_SIGNING_KEY",
    help="Sign with this ed25519 private key (fa4aot keygen) [default: $FA4AOT_SIGNING_KEY].",
)


def _signer(path: Path | None):
    from fa4aot.core.signing import Signer

    return None if path is None else Signer.load(path)


@dataclass(frozen=True)
class _Receive:
    """The options install and pull share: --replace, what the source must satisfy (a signature
    by a key the cache trusts, else --sha256 or --insecure) and --json."""

    replace: bool
    pinned: str | None
    insecure: bool
    as_json: bool

    def policy(self, root: Path) -> Policy:
        """What an install or pull into ``root`` requires: a signature by a key it trusts, the
        pinned sha256, or --insecure."""
        from fa4aot.core.signing import Policy, trusted_keys

        if self.pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.pinned):
            raise click.BadParameter("--sha256 takes 64 hex digits")
        return Policy(tuple(trusted_keys(root)), self.pinned, self.insecure)


def _receive_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the options of :class:`_Receive` (in --help in its field order), handed to
    it as one ``receive`` argument."""

    @functools.wraps(command)
    def receiving(*, replace: bool, pinned: str | None, insecure: bool, as_json: bool, **kwargs: Any) -> None:
        command(receive=_Receive(replace, pinned, insecure, as_json), **kwargs)

    options = (
        click.option(
            "--replace",
            is_flag=True,
            help="Replace entries whose record differs from the one the cache holds under the same key "
            "(refused otherwise); each replacement is listed.",
        ),
        click.option(
            "--sha256",
            "pinned",
            default=None,
            help="Accept the source unsigned if its sha256 is this (given out of band).",
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="Accept a source no trusted key signed and no --sha256 pins (contents still checked).",
        ),
        JSON_OPTION,
    )
    for option in reversed(options):  # the last applied is listed first, as with stacked decorators
        receiving = option(receiving)
    return receiving


@main.command("pack")
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Archive to write.")
@SIGN_OPTION
def pack_cmd(
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    output: Path,
    sign_key: Path | None,
) -> None:
    """Write the selected cache entries into one verified archive (xz-compressed tar with a JSON
    manifest of every blob's sha256), signed with --sign. The same cache always packs to the
    same bytes."""
    import time

    from fa4aot.compile.archive import cache_entries, pack_bytes

    t0 = time.perf_counter()
    try:
        cache = _open(cache_dir)
        entries, host = _select(cache_entries(cache), f"the cache {cache.root}", manifest, targets, host_arch)
        with _progress(len(entries), "pack", lines=False) as bar:
            data, res = pack_bytes(cache, entries, host, _signer(sign_key), progress=bar.callback())
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(output)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(
        f"packed {res.entries} entries ({res.blobs} blobs, {_human(res.raw_bytes)}) of {cache.root} into {output}: "
        f"{_human(res.archive_bytes)}, sha256 {res.sha256}, {time.perf_counter() - t0:.1f} s"
        + ("" if sign_key is None else f", signed by {_signer(sign_key).public}")
    )


@main.command("install")
@click.argument("source")
@CACHE_OPTION
@click.option("--dry-run", is_flag=True, help="Verify the archive and list what would be added; write nothing.")
@_receive_options
def install_cmd(source: str, cache_dir: Path | None, dry_run: bool, receive: _Receive) -> None:
    """Verify the archive SOURCE (a file, an http(s) URL, or - for stdin) completely - every
    sha256, every cubin, every key recomputed from its record, host arch, formats, member paths,
    sizes - and only then add its entries to the cache (blobs first, index last). Entries already
    present with the same record are skipped; a different record under a key the cache holds is
    refused unless --replace. The archive must be signed by a key the cache trusts (fa4aot trust
    add), or match --sha256, or --insecure must be given."""
    from fa4aot.compile.archive import install, open_source, read_archive
    from fa4aot.runtime.loader import host_arch

    root = _cache_dir(cache_dir)
    try:
        policy = receive.policy(root)
        stream, what = open_source(source)
        with stream:
            archive = read_archive(stream, host_arch=host_arch(), what=what, policy=policy)
        res = install(root, archive, dry_run=dry_run, replace=receive.replace)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    by_key = {e.key: e for e in archive.entries}
    if receive.as_json:
        actions = [("added", res.added), ("replaced", res.replaced), ("present", res.present)]
        records = [
            {"key": key, "label": by_key[key].variant.label(), "action": action, "dry_run": dry_run}
            for action, keys in actions
            for key in keys
        ]
        summary = {"verified": len(archive.entries), **{action: len(keys) for action, keys in actions}}
        _emit("install", root, records, {**summary, "dry_run": dry_run}, source=what)
        return
    for key in res.added:
        click.echo(f"{'would add' if dry_run else 'added'} {key[:12]} {by_key[key].variant.label()}")
    for key in res.replaced:
        click.echo(f"{'would replace' if dry_run else 'replaced'} {key} {by_key[key].variant.label()} (--replace)")
    click.echo(
        f"{what}: {len(archive.entries)} entries verified; {len(res.added)} {'to add' if dry_run else 'added'}, "
        f"{len(res.present)} already present in {root}"
        + (f"; {len(res.replaced)} {'to replace' if dry_run else 'replaced'}" if res.replaced else "")
    )


@main.command("wheel")
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@click.option(
    "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"), show_default=True
)
@click.option(
    "--name",
    default=None,
    help="Distribution name [default: fa4aot-cache-<target names>; with --max-size, fa4aot-cache, each wheel "
    "adding its target names].",
)
@click.option(
    "--version",
    "version",
    default=None,
    help="Wheel version [default: from the content, 1.0.<UTC time of the newest entry>+<hash of the entries>: "
    "a rebuilt cache gets a new version, so pip installs it over the old one]. PyPI refuses +local versions: "
    "give one there.",
)
@click.option(
    "--max-size",
    default=None,
    metavar="SIZE",
    help="Split: one wheel per GPU target, each at most SIZE (100MB, 1.5GiB; PyPI takes 100 MiB a file), and "
    "an index <name>-<version>.wheels.json of which wheel serves which target; a target larger than SIZE is "
    "an error.",
)
@SIGN_OPTION
def wheel_cmd(
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    out_dir: Path,
    name: str | None,
    version: str | None,
    max_size: str | None,
    sign_key: Path | None,
) -> None:
    """Build a pip-installable wheel holding the selected entries as a verified, read-only cache
    (tagged for the host arch of its launch plans, requiring this fa4aot's major version).
    Installed, it registers under the fa4aot.caches entry point; the runtime finds it when no
    cache path and no $FA4AOT_CACHE is given. With --sign its cache files are signed: a runtime
    with $FA4AOT_TRUSTED_KEYS loads only wheels one of those keys signed. With --max-size, one
    wheel per GPU target."""
    from fa4aot.compile.archive import cache_entries
    from fa4aot.compile.wheel import build_wheels, parse_size

    try:
        limit = None if max_size is None else parse_size(max_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-size") from None
    try:
        cache = _open(cache_dir)
        entries, host = _select(cache_entries(cache), f"the cache {cache.root}", manifest, targets, host_arch)
        if name is None:  # split wheels add their target names to it
            by_target = "-".join(sorted({e.target.name.lower() for e in entries}))
            name = "fa4aot-cache" if limit is not None else f"fa4aot-cache-{by_target}"
        built = build_wheels(
            cache,
            entries,
            out_dir,
            name=name,
            version=version,
            host_arch=host,
            signer=_signer(sign_key),
            max_size=limit,
        )
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    for w in built.wheels:
        click.echo(f"built {w.path} ({_human(w.path.stat().st_size)}): {len(w.entries)} entries")
    if built.index is not None:
        click.echo(f"index of the {len(built.wheels)} wheels (which serves which target): {built.index}")
    click.echo(f"version {built.version}; pip install {' '.join(str(w.path) for w in built.wheels)}")


STORE_ARG = click.argument("store", required=False)


@main.command("push")
@STORE_ARG
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@SIGN_OPTION
@click.option("--dry-run", is_flag=True, help="List the objects it would upload, with sizes; upload nothing.")
def push_cmd(
    store: str | None,
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    sign_key: Path | None,
    dry_run: bool,
) -> None:
    """Upload the selected entries to STORE (a directory, s3://, gs://, memory://... with the
    remote extra; default $FA4AOT_STORE): only the blobs and records it lacks, then its index of
    record hashes (INDEX.json), signed with --sign."""
    from fa4aot.compile.archive import cache_entries
    from fa4aot.compile.stores import open_store, push

    uploads: list[tuple[str, int]] = []
    try:
        cache = _open(cache_dir)
        st = open_store(store)
        entries, _ = _select(cache_entries(cache), f"the cache {cache.root}", manifest, targets, host_arch)
        with _progress(len(entries), "push", quiet=dry_run, lines=False) as bar:
            written, n = push(
                cache, st, entries, _signer(sign_key), dry_run=dry_run, uploads=uploads, progress=bar.callback()
            )
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        for line in _table([[_human(size), name] for name, size in uploads], right=(0,)):
            click.echo(f"would upload {line}")
        total = _human(sum(size for _, size in uploads))
        click.echo(f"would push {n} entries from {cache.root} to {st.url}: {written} objects ({total}) to upload")
        return
    click.echo(f"pushed {n} entries from {cache.root} to {st.url}: {written} objects uploaded, the rest were there")


@main.command("pull")
@STORE_ARG
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@click.option("--dry-run", is_flag=True, help="List what would be downloaded; write nothing.")
@_receive_options
def pull_cmd(
    store: str | None,
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    dry_run: bool,
    receive: _Receive,
) -> None:
    """Download from STORE (a directory, an http(s) URL, s3://...; default $FA4AOT_STORE) the
    selected entries the cache lacks, verifying every byte (sha256, size, cubin, each key
    recomputed from its record) before adding them (blobs first, index last). A store record that
    differs from the one the cache holds under the same key is refused unless --replace. The
    store's INDEX.json (each record's sha256) must be signed by a key the cache trusts, or match
    --sha256, or --insecure must be given."""
    from fa4aot.compile.archive import conflict_error, install, present_records, record_differs
    from fa4aot.compile.stores import authenticated_hashes, fetch_entries, open_store, store_entries

    root = _cache_dir(cache_dir)
    try:
        policy = receive.policy(root)
        st = open_store(store)
        hashes = authenticated_hashes(st, policy)
        entries, host = _select(store_entries(st, hashes), st.url, manifest, targets, host_arch)
        have = present_records(root)
        differ = [e for e in entries if e.key in have and record_differs(have[e.key], e)]
        if differ and not receive.replace:
            raise conflict_error(differ, root, st.url)  # before anything is downloaded
        todo = [e.key for e in entries if e.key not in have] + [e.key for e in differ]
        if dry_run:
            _pull_listing(entries, todo, have, st.url, root, receive.as_json)
            return
        with _progress(len(todo), "pull", lines=False) as bar:
            archive = fetch_entries(st, todo, host_arch=host, hashes=hashes, progress=bar.callback())
        res = install(root, archive, replace=receive.replace)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    labels = {e.key: e.variant.label() for e in entries}
    if receive.as_json:
        pulled = set(res.added) | set(res.replaced)
        records = [
            {
                "key": e.key,
                "label": e.variant.label(),
                "action": "replaced" if e.key in res.replaced else "pulled" if e.key in pulled else "present",
            }
            for e in entries
        ]
        summary = {
            "selected": len(entries),
            "pulled": len(res.added),
            "replaced": len(res.replaced),
            "present": len(entries) - len(todo),
            "dry_run": False,
        }
        _emit("pull", root, records, summary, store=st.url)
        return
    for key in res.replaced:
        click.echo(f"replaced {key} {labels.get(key, '')} (--replace)")
    click.echo(
        f"pulled {len(res.added)} entries from {st.url} into {root}; {len(entries) - len(todo)} were present"
        + (f"; {len(res.replaced)} replaced" if res.replaced else "")
    )


def _pull_listing(
    entries: list[Any], todo: list[str], have: dict[str, str], url: str, root: Path, as_json: bool
) -> None:
    """pull --dry-run: what would be pulled or replaced."""
    action = {key: "pull" if key not in have else "replace" for key in todo}
    if as_json:
        records = [{"key": e.key, "label": e.variant.label(), "action": action.get(e.key, "present")} for e in entries]
        summary = {"selected": len(entries), "to_pull": len(todo), "present": len(entries) - len(todo), "dry_run": True}
        _emit("pull", root, records, summary, store=url)
        return
    for e in entries:
        if e.key in action:
            click.echo(f"would {action[e.key]} {e.key[:12]} {e.variant.label()}")
    click.echo(f"{len(todo)} of {len(entries)} entries to pull from {url} into {root}")


@main.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen_cmd(path: Path) -> None:
    """Make an ed25519 signing key: the private key in PATH (mode 0600, never overwritten), the
    public key in PATH.pub and on stdout. Sign with `pack --sign PATH` / `push --sign PATH`;
    nodes trust it with `fa4aot trust add KEY`."""
    from fa4aot.core.signing import generate

    try:
        click.echo(generate(path))
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None


@main.group("trust")
def trust_group() -> None:
    """The public keys a cache accepts signed archives and stores from (<cache>/trust/keys)."""


@trust_group.command("add")
@click.argument("key")
@CACHE_OPTION
@click.option("--comment", default="", help="Who the key belongs to (kept next to it).")
def trust_add_cmd(key: str, cache_dir: Path | None, comment: str) -> None:
    """Trust KEY (ed25519:<base64>, as keygen prints it; check it out of band) for installs and
    pulls into the cache."""
    from fa4aot.core.signing import parse_key, trust_lines, write_trusted

    root = _cache_dir(cache_dir)
    try:
        parse_key(key)
        lines = trust_lines(root)
        if key in (k for k, _ in lines):
            click.echo(f"{root} already trusts {key}")
            return
        path = write_trusted(root, [*lines, (key, comment.replace("\n", " "))])
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write the trust file of {root}: {e.strerror or e}") from None
    click.echo(f"{path}: trusts {key}")


@trust_group.command("list")
@CACHE_OPTION
def trust_list_cmd(cache_dir: Path | None) -> None:
    """The keys the cache trusts."""
    from fa4aot.core.signing import trust_lines

    root = _cache_dir(cache_dir)
    lines = trust_lines(root)
    for key, comment in lines:
        click.echo(f"{key}  {comment}".rstrip())
    if not lines:
        click.echo(f"{root} trusts no key: installs and pulls need --sha256 or --insecure")


@trust_group.command("remove")
@click.argument("key")
@CACHE_OPTION
def trust_remove_cmd(key: str, cache_dir: Path | None) -> None:
    """Stop trusting KEY."""
    from fa4aot.core.signing import trust_lines, write_trusted

    root = _cache_dir(cache_dir)
    lines = trust_lines(root)
    if key not in (k for k, _ in lines):
        raise click.ClickException(f"{root} does not trust {key}")
    write_trusted(root, [(k, c) for k, c in lines if k != key])
    click.echo(f"{root} no longer trusts {key}")


def _targets_line(info) -> str:
    """The known GPU models (core/targets.py), the visible GPU's marked: what a manifest's
    ``target`` names and the SM count it must carry."""
    from fa4aot.core.targets import ARCHES, MODELS, arch_of_compute_capability

    arch = arch_of_compute_capability(info.compute_capability) if info is not None else None
    models = ", ".join(
        f"{m.name} ({m.product}: {m.arch}, {m.num_sms} SMs){' <- this GPU' if (m.arch, m.num_sms) == (arch, getattr(info, 'num_sms', None)) else ''}"
        for m in MODELS.values()
    )
    return f"targets fa4aot knows (arches {', '.join(ARCHES)}): {models}"


@main.command("show-config")
@JSON_OPTION
def show_config_cmd(as_json: bool) -> None:
    """Versions, the runtime's cache search path and what each cache there holds, the remote
    store configured, the host arch, the GPU (if one is present), and every environment variable
    fa4aot reads with its value here (docs/environment.md)."""
    config = _config()
    info = config.pop("_info")
    if as_json:
        records = [
            {"name": v.name, "value": value, "type": v.kind, "default": v.default, "read_by": v.scope, "doc": v.doc}
            for v, value in env.current()
        ]
        _emit(
            "show-config",
            None,
            records,
            {"variables": len(records), "set": sum(r["value"] is not None for r in records)},
            **config,
        )
        return
    click.echo(f"fa4aot {config['fa4aot']}, Python {config['python']}, host {config['host_arch']}")
    for line in _table([[f"  {d}", v or "not installed"] for d, v in config["versions"].items()]):
        click.echo(line)
    click.echo("cache search path (the runtime opens the first that serves this GPU):")
    for line in _table([[f"  {p['where']}", f"{p['path']}:", p["holds"]] for p in config["search_path"]]):
        click.echo(line)
    click.echo(f"remote store (${env.STORE}): {config['store'] or 'none'}")
    gpu = config["gpu"]
    if "name" in gpu:
        click.echo(f"GPU: {gpu['name']} ({gpu['arch']}, {gpu['num_sms']} SMs), driver {gpu['driver']}")
    else:
        click.echo(f"GPU: none ({gpu['error']})")
    click.echo(_targets_line(info))
    click.echo("environment (fa4aot show-config --json, docs/environment.md):")
    rows = [
        [f"  {v.name}", "(unset)" if value is None else repr(value), f"default {v.default}"]
        for v, value in env.current()
    ]
    for line in _table(rows):
        click.echo(line)


def _config() -> dict[str, Any]:
    """What show-config reports (JSON-ready, but for ``_info``: the GPU's DeviceInfo or None)."""
    import importlib.metadata

    from fa4aot import __version__
    from fa4aot.core.index import cache_search_path
    from fa4aot.core.targets import MODELS
    from fa4aot.runtime.loader import host_arch

    versions: dict[str, str | None] = {}
    for dist in ("cuda-python", "cuda-bindings", "torch", "nvidia-cutlass-dsl", "flash-attn-4", "fsspec", "tqdm"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    places = []
    for where, path in cache_search_path():
        try:
            keys = Cache(path).packed_targets()
            have = ", ".join(k.describe() for k in keys) or "no packed index (run fa4aot reindex)"
        except Fa4aotError as e:
            have = f"unusable: {e}"
        places.append({"where": where, "path": str(path), "holds": have})
    info = None
    try:
        from fa4aot.runtime.loader import make_driver

        drv = make_driver()
        info = drv.device_info(drv.current_device())
        cc = info.compute_capability
        gpu: dict[str, Any] = {
            "name": info.name,
            "arch": f"sm_{cc[0]}{cc[1]}",
            "num_sms": info.num_sms,
            "driver": info.driver_version,
        }
    except Exception as e:  # no driver, no device: say so
        gpu = {"error": str(e).splitlines()[0][:120] if str(e) else type(e).__name__}
    return {
        "fa4aot": __version__,
        "python": platform.python_version(),
        "host_arch": host_arch(),
        "versions": versions,
        "search_path": places,
        "store": env.get(env.STORE),
        "gpu": gpu,
        "targets": [m._asdict() for m in MODELS.values()],
        "_info": info,
    }


# -- learning manifests from workloads -------------------------------------------------------


@main.command("record", context_settings={"ignore_unknown_options": True})
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
@click.option(
    "--target", default=None, help="Target name for the manifest (b200, h100, ...) [default: from the recorded arch]."
)
@click.option("--merge", is_flag=True, help="Add to the manifest at -o instead of replacing it (no duplicate groups).")
@click.option(
    "--no-compile",
    is_flag=True,
    help="The workload calls FA4 on fake tensors (torch FakeTensorMode): record what it would compile through "
    "FA4's _compile_misses probe, compiling nothing (no GPU, seconds instead of minutes); FA4's backward, which "
    "has no such probe, is recorded and not called.",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def record_cmd(output: Path, target: str | None, merge: bool, no_compile: bool, cmd: tuple[str, ...]) -> None:
    """Run CMD (after --) and write a manifest covering every forward, combine, prepare and
    backward configuration it asked for, through FA4's own interface (flash_attn.cute) or
    fa4aot's API.
    Configurations fa4aot cannot build are listed as comments saying why. The workload runs
    unchanged; the command exits with its exit code (128+N if signal N killed it). SIGINT, SIGTERM
    and SIGHUP go to the workload's process group, and what it recorded until then is written.

    Example: fa4aot record -o manifests/mine.yaml -- python serve_smoke_test.py
    """
    import shlex
    import time

    from fa4aot.compile import manifest as manifest_mod
    from fa4aot.core.manifest_text import kept_groups
    from fa4aot.tools.record import exit_on_signals, manifest_text, python_cmd, read_log, run_recorded

    # SIGTERM/SIGHUP unwind (the temporary directory goes) instead of killing record outright
    with exit_on_signals(), tempfile.TemporaryDirectory(prefix="fa4aot-record-") as tmp:
        log = Path(tmp) / "record.jsonl"
        try:
            rc = run_recorded(python_cmd(list(cmd)), log, no_compile=no_compile)
            rec = read_log([log] if log.exists() else [], target)
            existing, kept = [], []
            if merge and output.exists():  # its groups stay as written (their shapes with them)
                kept = kept_groups(manifest_mod.parse_yaml(output.read_bytes(), str(output)))
                existing = [pv.variant for pv in manifest_mod.load(output).variants]
            header = f"recorded by fa4aot record on {time.strftime('%Y-%m-%d')}: {shlex.join(cmd)}"
            if merge and existing:
                header += f"\nmerged into {output}"
            new = set(rec.variants) - {v.variant_id for v in existing}
            if merge and existing and not new and not rec.unsupported:
                click.echo(f"{output}: nothing new ({len(rec.variants)} recorded variants already in it)")
                sys.exit(rc)
            if not rec.variants and not existing:
                notes = f" ({len(rec.unsupported)} configurations fa4aot cannot build)" if rec.unsupported else ""
                click.echo(
                    f"the workload made no attention call fa4aot can build{notes}; {output} not written "
                    f"(the workload exited {rc}; Python processes of environments other than {sys.prefix} "
                    "are not recorded)",
                    err=True,
                )
                sys.exit(rc or 1)
            text = manifest_text(rec, header, target, kept, [v.variant_id for v in existing])
            output.parent.mkdir(parents=True, exist_ok=True)
            _write_manifest(text, output, Path(tmp))
        except Fa4aotError as e:
            raise click.ClickException(str(e)) from None
    click.echo(
        f"{output}: {len(rec.variants)} recorded variants ({len(new)} new), {len(rec.unsupported)} configurations "
        f"fa4aot cannot build (listed as comments); the workload exited {rc}"
    )
    sys.exit(rc)


def _write_manifest(text: str, output: Path, tmp: Path) -> None:
    """Write the manifest ``text`` to ``output`` once a copy staged in the directory ``tmp`` loads:
    what record and from-misses write, `fa4aot plan` accepts (a ManifestError writes nothing)."""
    from fa4aot.compile import manifest as manifest_mod

    staged = tmp / "manifest.yaml"
    staged.write_text(text)
    manifest_mod.load(staged)
    output.write_text(text)


@main.group("manifest")
def manifest_group() -> None:
    """Write manifests from what ran (see also `fa4aot record`)."""


@manifest_group.command("from-misses")
@click.argument("logs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
def from_misses_cmd(logs: tuple[Path, ...], output: Path) -> None:
    """Turn miss logs ($FA4AOT_MISS_LOG of any number of nodes) into one manifest building every
    variant they name."""
    from fa4aot.tools.record import manifest_text, read_log

    try:
        rec = read_log(logs)
        if not rec.variants:  # a manifest with no group is one `plan` and `build` refuse: write none
            notes = f" ({len(rec.unsupported)} configurations fa4aot cannot build)" if rec.unsupported else ""
            raise click.ClickException(
                f"the miss log(s) {', '.join(str(p) for p in logs)} name no variant to build{notes}; {output} not written"
            )
        text = manifest_text(rec, f"from the miss logs {', '.join(str(p) for p in logs)}")
        with tempfile.TemporaryDirectory(prefix="fa4aot-misses-") as tmp:
            _write_manifest(text, output, Path(tmp))
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{output}: {len(rec.variants)} variants from {len(logs)} log(s)")


@main.command("verify")
@CACHE_OPTION
@click.option(
    "--plans/--no-plans",
    default=True,
    help="Also load and call every launch plan (another host CPU's under emulation where qemu is installed).",
)
@click.option(
    "--rebuild-sample",
    type=click.IntRange(0, 100000),
    default=0,
    help="Also recompile N random entries (built by this toolchain, for a host arch this machine can build for) "
    "and compare every blob byte for byte.",
)
@click.option(
    "--against-fa4",
    is_flag=True,
    help="Also compile each entry (forward, combine, prepare, backward) through FA4's own interface (fake tensors, CPU) "
    "and compare cubin bytes (needs the build extra).",
)
@click.option(
    "--sample", type=click.IntRange(1, 100000), default=None, help="With --against-fa4: only N random entries."
)
@click.option("--seed", type=int, default=None, help="Seed of the samples.")
@JSON_OPTION
def verify_cmd(
    cache_dir: Path | None,
    plans: bool,
    rebuild_sample: int,
    against_fa4: bool,
    sample: int | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Re-hash every blob, re-parse every cubin, check arch and parameter tables against the
    metadata, and run every plan on sample shapes. Exits 1 on any mismatch."""
    from fa4aot.tools.verify import verify

    if against_fa4 and (missing := _missing_modules(BUILD_EXTRA_MODULES)):
        raise click.ClickException(
            f"--against-fa4 compiles through FA4 itself, which needs the build extra ({', '.join(missing)} "
            "missing): pip install '.[build]' (or 'fa4aot[build]')"
        )
    try:
        cache = _open(cache_dir)
        skipped: dict[str, str] = {}
        n, problems = verify(cache, plans, skipped)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    packed = [p for p in problems if p.key.startswith("packed/")]
    bad = len({p.key for p in problems if p not in packed})
    summary: dict[str, Any] = {"entries": n, "ok": n - bad, "bad": bad, "packed_problems": len(packed)}
    summary["skipped_plans"] = dict(sorted(skipped.items()))
    records = [{"check": "verify", "key": p.key, "label": p.label, "status": "bad", "detail": p.what} for p in problems]
    if not as_json:
        for host, why in sorted(skipped.items()):
            click.echo(f"SKIPPED running the {host} launch plans (this host cannot run them: {why})", err=True)
        for p in problems:
            click.echo(f"BAD {p.key[:12]} {p.label}: {p.what}", err=True)
        click.echo(f"verified {n} entries: {n - bad} ok, {bad} bad (cache {cache.root})")
        click.echo(f"packed indexes: {len(packed)} problem{'s' * (len(packed) != 1)}")
    failed = bool(problems)
    if rebuild_sample:
        failed = _verify_rebuild(cache, rebuild_sample, seed, records, summary, as_json) or failed
    if against_fa4:
        failed = _verify_against_fa4(cache, sample, seed, records, summary, as_json) or failed
    if as_json:
        _emit("verify", cache.root, records, {**summary, "passed": not failed})
    if failed:
        sys.exit(1)


#: What --against-fa4 imports (in the FA4 process it starts): the build extra's stack.
BUILD_EXTRA_MODULES = ("torch", "flash_attn", "cutlass")


def _missing_modules(names: Iterable[str]) -> list[str]:
    """Those of ``names`` this interpreter cannot import (looked up, not imported)."""
    import importlib.util

    out = []
    for name in names:
        try:
            if sys.modules.get(name, ...) is None or importlib.util.find_spec(name) is None:
                out.append(name)  # None in sys.modules: imports of it fail
        except (ImportError, ValueError):
            out.append(name)
    return out


def _verify_rebuild(
    cache: Cache, count: int, seed: int | None, records: list[dict[str, Any]], summary: dict[str, Any], as_json: bool
) -> bool:
    """verify --rebuild-sample: recompile ``count`` entries and compare; True if any differs."""
    from fa4aot.compile.rebuild import rebuild_sample as rebuild

    try:
        results = rebuild(cache, count, seed)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    for r in results:
        records.append(
            {
                "check": "rebuild",
                "key": r.entry.key,
                "label": r.entry.variant.label(),
                "status": r.status,
                "detail": r.detail,
            }
        )
        if r.status != "identical" and not as_json:
            click.echo(f"REBUILD {r.status.upper()} {r.entry.key[:12]} {r.entry.variant.label()}: {r.detail}", err=True)
    same = sum(r.status == "identical" for r in results)
    summary["rebuild"] = {"sampled": len(results), "identical": same}
    if not as_json:
        click.echo(f"rebuilt {len(results)} sampled entries: {same} byte-identical")
    return same != len(results)


def _verify_against_fa4(
    cache: Cache,
    sample: int | None,
    seed: int | None,
    records: list[dict[str, Any]],
    summary: dict[str, Any],
    as_json: bool,
) -> bool:
    """verify --against-fa4: compile each (sampled) entry through FA4 and compare cubins; True if
    any differs or failed."""
    import random

    from fa4aot.compile.archive import cache_entries
    from fa4aot.tools.against_fa4 import compare

    # one entry per variant (a variant built for two host archs shares its cubin)
    picked = list({e.variant_id: e for e in cache_entries(cache)}.values())
    if sample is not None:
        picked = random.Random(seed).sample(picked, min(sample, len(picked)))
    with _progress(len(picked), "against FA4") as bar:
        res = compare(cache, picked, progress=bar.callback())
    for r in res:
        records.append(
            {
                "check": "against_fa4",
                "key": r.entry.key,
                "label": r.entry.variant.label(),
                "status": r.status,
                "detail": r.detail,
            }
        )
        if r.status != "identical" and not as_json:
            stream = r.status in ("different", "failed")
            click.echo(
                f"FA4 {r.status.upper()} {r.entry.variant_id[:12]} {r.entry.variant.label()}: {r.detail}", err=stream
            )
    same = sum(r.status == "identical" for r in res)
    checked = sum(r.status in ("identical", "different", "failed") for r in res)
    summary["against_fa4"] = {"checked": checked, "identical": same, "skipped": len(res) - checked}
    if not as_json:
        click.echo(f"against FA4's JIT: {same} of {checked} cubins identical ({len(res) - checked} skipped)")
    return same != checked


@main.command("check-plans")
@CACHE_OPTION
@click.option(
    "-n", "runs", type=click.IntRange(1, 100000), default=30, show_default=True, help="Random calls per variant."
)
@JSON_OPTION
def check_plans_cmd(cache_dir: Path | None, runs: int, as_json: bool) -> None:
    """Run every forward and backward variant's launch plan on random argument sets (CPU) and
    check block, smem, grid (against FA4's scheduler formulas), cluster and where the tensors
    land. Exits 1 on any mismatch."""
    from fa4aot.tools.plancheck import check_cache

    try:
        cache = _open(cache_dir)
        reports = check_cache(cache, runs)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    bad = sum(bool(r.problems) for r in reports)
    calls = sum(r.runs for r in reports)
    if as_json:
        records = [
            {
                "key": r.entry.key,
                "label": r.entry.variant.label(),
                "calls": r.runs,
                "problems": [str(p) for p in r.problems],
            }
            for r in reports
        ]
        _emit("check-plans", cache.root, records, {"variants": len(reports), "calls": calls, "with_problems": bad})
    else:
        for r in reports:  # fixed widths: a key prefix, up to 4 digits of calls, the status
            status = "ok" if not r.problems else f"{len(r.problems)} problems"
            click.echo(f"{r.entry.key[:12]} {r.runs:>4} calls {status:<12} {r.entry.variant.label()}")
            for p in r.problems[:5]:
                click.echo(f"    {p}", err=True)
        click.echo(f"{len(reports)} variants, {calls} plan calls, {bad} with problems (cache {cache.root})")
    if bad:
        sys.exit(1)


@main.command()
@CACHE_OPTION
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also drop entries this manifest (with the installed toolchain) would not build.",
)
@click.option(
    "--grace",
    type=click.FloatRange(0, 10 * 365 * 86400),
    callback=lambda ctx, param, v: _finite(v, "--grace"),  # FloatRange lets NaN through
    default=3600.0,
    show_default=True,
    help="Keep unreferenced files younger than this many seconds (a concurrent build's).",
)
@click.option(
    "--other-toolchains",
    is_flag=True,
    help="With --manifest, also drop entries built by other toolchains (other fa4aot or FA4 versions).",
)
@click.option("--dry-run", is_flag=True, help="List the entries and files it would remove, with sizes; change nothing.")
def gc(cache_dir: Path | None, manifest: Path | None, grace: float, other_toolchains: bool, dry_run: bool) -> None:
    """Remove unreferenced blobs and stale staging files (and, with --manifest, stale entries).

    With --manifest, only entries this installation's toolchain built are candidates: a cache
    shared by several fa4aot versions keeps the others' entries unless --other-toolchains is given.
    The blobs of the entries it drops go at once (--grace protects only files nothing referenced).
    Refuses a directory that is not an fa4aot cache and creates nothing.
    """
    keep = owned = None
    try:
        if manifest is not None:
            from fa4aot.compile import manifest as manifest_mod
            from fa4aot.compile.toolchain import fingerprint, host_arch
            from fa4aot.core.variant import cache_key

            plan = manifest_mod.load(manifest)
            tc, host = fingerprint(), host_arch()
            keep = {cache_key(pv.variant, tc, host) for pv in plan.variants}
            if not other_toolchains:
                owned = lambda e: e.meta.get("toolchain") == tc  # noqa: E731
        from fa4aot.compile.store import CacheWriter, GcListing

        cache = CacheWriter(_cache_dir(cache_dir), create=False)
        listing = GcListing()
        stats = cache.gc(keep, grace, owned, dry_run=dry_run, listing=listing)
        cache.close()
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    if dry_run:
        rows = [
            ["entry", e.key[:12], _human(sum(b.size for b in e.blobs.values())), e.variant.label()]
            for e in listing.entries
        ]
        rows += [["file", "", _human(size), path] for path, size in sorted(listing.files)]
        for line in _table(rows, right=(2,)):
            click.echo(f"would remove {line}")
    click.echo(
        f"{'would remove' if dry_run else 'removed'} {stats['entries_removed']} entries and "
        f"{stats['files_removed']} files, {'would free' if dry_run else 'freed'} {_human(stats['bytes_freed'])} "
        f"(cache {cache.root})"
    )


@main.command()
@CACHE_OPTION
def reindex(cache_dir: Path | None) -> None:
    """Rewrite the packed per-target indexes the runtime reads from the full index.

    `fa4aot build` and `fa4aot gc` do this themselves; run it after copying entries into a cache
    by other means.
    """
    from fa4aot.compile.store import CacheWriter

    try:
        cache = CacheWriter(_cache_dir(cache_dir), create=False)
        written = cache.write_packed()
        cache.close()
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    for path in written:
        click.echo(f"wrote {path}")


@main.command("launch-plan")
@click.argument("key")
@CACHE_OPTION
@click.option(
    "--shape",
    "shape",
    default="",
    help="Problem sizes, e.g. batch=8,seqlen_q=4096,seqlen_k=4096,nheads=32,nheads_kv=8,num_splits=4 (total_q/total_k for varlen).",
)
@click.option("--params/--no-params", default=True, help="Decode every kernel parameter.")
def launch_plan_cmd(key: str, cache_dir: Path | None, shape: str, params: bool) -> None:
    """Print the launch a cached variant makes for given shapes: grid, block, smem, cluster and
    every kernel parameter, computed by FA4's own host code with no GPU.

    Tensors are placed at fake, distinct device addresses; a parameter holding one of them is
    labelled with the tensor's name.
    """
    from fa4aot.core import samples
    from fa4aot.core.families import dims_for
    from fa4aot.plan.library import open_plan, target_answers

    try:
        cache = _open(cache_dir)
        e = cache.resolve(key)
        if e.host_arch != platform.machine():
            raise Fa4aotError(
                f"entry {e.key[:12]} is a launch plan for {e.host_arch} hosts; this one is {platform.machine()} "
                "(`fa4aot verify` runs it under emulation)"
            )
        dims = dims_for(e.variant, **_shape_overrides(shape))
        plan = open_plan(cache.read_plan(e), e.meta)
        dev, ker = target_answers(e.target.optin_smem())
        plan.load(list(range(1, len(plan.kernels) + 1)), dev, ker)
        named = samples.named_args(e.variant, dims)
        launches = plan.plan(plan.order(named))
    except Fa4aotError as err:
        raise click.ClickException(str(err)) from None
    pointers = {v.ptr: k for k, v in named.items() if hasattr(v, "ptr")}
    click.echo(f"{e.variant.label()}  ({e.target.name}, {e.target.num_sms} SMs)")
    click.echo(f"shape: {samples.describe(e.variant, dims)}")
    kernels = {k["symbol"]: k for k in e.meta["kernels"]}
    for i, launch in enumerate(launches):
        click.echo(
            f"launch {i}: grid {_text(launch.grid)} block {_text(launch.block)} smem {launch.smem} "
            f"cluster {_text(launch.cluster)}"
        )
        click.echo(f"  attributes {_text(launch.attribute_values())}")
        click.echo(f"  kernel {launch.kernel}")
        if not params:
            continue
        for o, off, size in kernels[launch.kernel]["params"]:
            raw = launch.param_bytes[off : off + size]
            click.echo(f"  param {o:>2} @0x{off:03x} [{size:>3}] {_decode(raw, pointers)}")


#: Largest value of a --shape size: the kernels take sizes as int32.
MAX_SHAPE = 2**31 - 1


def _shape_overrides(shape: str) -> dict[str, int]:
    """Parse --shape name=value,...: known names only, integers in 1..2^31-1."""
    from fa4aot.core.layouts import Dims

    known = list(Dims.__dataclass_fields__)
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in shape.split(","))):
        name, eq, value = (x.strip() for x in item.partition("="))
        if name not in known:
            raise click.BadParameter(f"unknown size {name!r}; known: {', '.join(known)}", param_hint="--shape")
        try:
            n = int(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected {name}=<integer>", param_hint="--shape") from None
        if not eq or not 1 <= n <= MAX_SHAPE:
            raise click.BadParameter(f"{name} must be in 1..{MAX_SHAPE}, got {value!r}", param_hint="--shape")
        if name in out:
            raise click.BadParameter(f"{name} is given twice", param_hint="--shape")
        out[name] = n
    return out


def _decode(raw: bytes, pointers: dict[int, str]) -> str:
    """Readable view of a parameter: known pointers named, then 32-bit words."""
    notes = []
    for off in range(0, len(raw) - 7, 8):
        (v,) = struct.unpack_from("<Q", raw, off)
        if v in pointers:
            notes.append(f"+{off}: &{pointers[v]}")
    words = [struct.unpack_from("<i", raw, i)[0] for i in range(0, len(raw) - len(raw) % 4, 4)]
    shown = " ".join(str(w) for w in words[:12]) + (" ..." if len(words) > 12 else "")
    return (" ".join(notes) + "  " if notes else "") + f"i32[{shown}]"


if __name__ == "__main__":
    main()
