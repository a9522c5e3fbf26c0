"""fa4aot command line: build FA4 kernels ahead of time into a verified cache, inspect it, and
show the launches its plans make - all without a GPU."""

from __future__ import annotations

import json
import os
import platform
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import click
except ImportError:  # the runtime-only install has no CLI stack
    sys.exit("fa4aot's command line needs the cli extra: pip install 'fa4aot[cli]' ('fa4aot[build]' to compile)")

from fa4aot.core.errors import Fa4aotError
from fa4aot.core.index import Cache, default_cache_dir

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
    """Say on stderr which cache a command uses when --cache was not given (once per cache)."""
    if what not in _ANNOUNCED:
        _ANNOUNCED.add(what)
        click.echo(f"fa4aot: using the cache {what} (--cache to choose another)", err=True)


def _cache_dir(cache_dir: Path | None) -> Path:
    """The cache a writing command uses: --cache, else $FA4AOT_CACHE, else ./cache (named on stderr)."""
    if cache_dir is not None:
        return cache_dir
    from fa4aot.core.index import DEFAULT_CACHE_ENV

    path = default_cache_dir()
    _announce(f"{path} (from ${DEFAULT_CACHE_ENV})" if os.environ.get(DEFAULT_CACHE_ENV) else f"{path} (the default)")
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
        click.echo(f"fa4aot: warning: {w.message}", err=True)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Ahead-of-time FlashAttention-4 kernel cache.

    Build every kernel a deployment needs from a YAML manifest (no GPU needed), ship the cache,
    and launch the kernels with the zero-JIT runtime (`import fa4aot`).
    """


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
@click.option("--quiet", "-q", is_flag=True, help="No per-variant progress lines.")
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

    def progress(done: int, total: int, row: Any) -> None:
        if quiet:
            return
        extra = f"{row.seconds:5.1f}s" if row.status in ("built", "failed") else "     "
        host = f" ({row.host} host)" if row.host and row.host != platform.machine() else ""
        click.echo(
            f"[{done:>{len(str(total))}}/{total}] {row.status:<6} {extra} {row.key[:12]} {row.variant.label()}{host}",
            err=True,
        )
        if row.error:
            click.echo(f"    error: {row.error}", err=True)

    try:
        report = run_build(
            manifest,
            _cache_dir(cache_dir),
            jobs,
            progress=progress,
            families=family,
            pool_factory=executor_factory(executor, ray_address),
            reuse=reuse,
        )
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    rows = report.rows
    click.echo("")
    statuses = ("built", "cached", "reused", "failed")
    click.echo(f"{'family':<10} {'built':>6} {'cached':>7} {'reused':>7} {'failed':>7} {'compile s':>10} {'size':>10}")
    for fam in sorted({r.variant.family for r in rows}):
        rs = [r for r in rows if r.variant.family == fam]
        counts = [sum(r.status == st for r in rs) for st in statuses]
        click.echo(
            f"{fam:<10} {counts[0]:>6} {counts[1]:>7} {counts[2]:>7} {counts[3]:>7} "
            f"{sum(r.seconds for r in rs):>10.1f} {_human(sum(r.size for r in rs)):>10}"
        )
    counts = [report.count(st) for st in statuses]
    click.echo(
        f"{'total':<10} {counts[0]:>6} {counts[1]:>7} {counts[2]:>7} {counts[3]:>7} "
        f"wall {report.wall_seconds:.1f}s, peak worker RSS {report.peak_rss_mb:.0f} MiB, "
        f"cache {_cache_dir(cache_dir)}"
    )
    for r in rows:
        if r.status == "failed":
            click.echo(f"FAILED {r.variant.label()}: {r.error}", err=True)
    if report.stopped:
        stored = report.count("built") + report.count("reused")
        click.echo(
            f"build stopped: {report.stopped}; {stored} variants were stored before it, the rest were not", err=True
        )
    if not report.ok:
        sys.exit(1)


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
        click.echo(
            json.dumps(
                {
                    "targets": [
                        dict(t.to_dict(), host_arch=list(plan.hosts(t, platform.machine()))) for t in plan.targets
                    ],
                    "variants": [
                        {
                            "id": pv.variant.variant_id,
                            "origin": pv.origin,
                            "tuning_candidate": is_tuning_candidate(pv.variant.family, pv.variant.fields),
                            **pv.variant.to_dict(),
                        }
                        for pv in plan.variants
                    ],
                    "skipped": [{"origin": s.origin, "axes": s.axes, "reason": s.reason} for s in plan.skipped],
                },
                indent=1,
                default=str,
            )
        )
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
@click.option("--family", default=None, help="Only this family.")
def ls_cmd(cache_dir: Path | None, family: str | None) -> None:
    """List cache entries: key, variant id, target, host CPU arch of the plan, size, label."""
    try:
        cache = _open(cache_dir)
        entries = cache.entries()
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    total = 0
    for e in entries:
        if family and e.variant.family != family:
            continue
        size = sum(b.size for b in e.blobs.values())
        total += size
        click.echo(
            f"{e.key[:12]}  {e.variant_id[:12]}  {e.target.name:<6} {e.host_arch:<7} {_human(size):>10}  {e.variant.label()}"
        )
    click.echo(f"{len(entries)} entries, {_human(total)}", err=True)


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
    click.echo(f"target      {e.target.name} {e.target.arch} {e.target.num_sms} SMs; host {m.get('host_arch')}")
    cref = e.cubin
    where = f"inside the plan at offset {cref.offset}, {cref.size} B, sha256 {cref.sha256[:16]}..." if cref else "?"
    click.echo(f"cubin       {m.get('cubin_arch')} (toolkit {m.get('cubin_toolkit')}), {where}")
    launch = m.get("launch", {})
    click.echo(f"launch      block {launch.get('block')} smem {launch.get('smem')} cluster {launch.get('cluster')}")
    click.echo(f"            sample {launch.get('sample')}: grid {launch.get('sample_grid')}")
    for k in m.get("kernels", []):
        click.echo(f"kernel      {k['symbol']}")
        click.echo(
            f"            {len(k['params'])} params, {k['cbank_param_size']} bytes, block {k['reqntid']}, {k['registers']} registers"
        )
        for o, off, size in k["params"]:
            click.echo(f"              param {o:>2}  offset 0x{off:03x}  size {size}")
    click.echo("arguments   " + ", ".join(_arg_text(a) for a in m["signature"]["args"]))
    for role, ref in e.blobs.items():
        click.echo(f"blob        {role:<12} {ref.size:>8} B  {cache.blob_path(ref)}")
    click.echo(f"toolchain   {json.dumps(m.get('toolchain'))}")
    click.echo(f"built       {m.get('build')} from {m.get('origin')}")


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
    "--host-arch", default=None, help="Entries whose launch plans are for this host CPU arch [default: this host]."
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
SHA256_OPTION = click.option(
    "--sha256", "pinned", default=None, help="Accept the source unsigned if its sha256 is this (given out of band)."
)
INSECURE_OPTION = click.option(
    "--insecure",
    is_flag=True,
    help="Accept a source no trusted key signed and no --sha256 pins (contents still checked).",
)


def _signer(path: Path | None):
    from fa4aot.core.signing import Signer

    return None if path is None else Signer.load(path)


def _policy(root: Path, pinned: str | None, insecure: bool):
    """What an install or pull into ``root`` requires: a signature by a key it trusts, the
    pinned sha256, or --insecure."""
    from fa4aot.core.signing import Policy, trusted_keys

    if pinned is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", pinned):
        raise click.BadParameter("--sha256 takes 64 hex digits")
    return Policy(tuple(trusted_keys(root)), pinned, insecure)


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
        data, res = pack_bytes(cache, entries, host, _signer(sign_key))
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(output)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    click.echo(
        f"packed {res.entries} entries ({res.blobs} blobs, {_human(res.raw_bytes)}) into {output}: "
        f"{_human(res.archive_bytes)}, sha256 {res.sha256}, {time.perf_counter() - t0:.1f} s"
        + ("" if sign_key is None else f", signed by {_signer(sign_key).public}")
    )


REPLACE_OPTION = click.option(
    "--replace",
    is_flag=True,
    help="Replace entries whose record differs from the one the cache holds under the same key "
    "(refused otherwise); each replacement is listed.",
)


@main.command("install")
@click.argument("source")
@CACHE_OPTION
@click.option("--dry-run", is_flag=True, help="Verify the archive and list what would be added; write nothing.")
@REPLACE_OPTION
@SHA256_OPTION
@INSECURE_OPTION
def install_cmd(
    source: str, cache_dir: Path | None, dry_run: bool, replace: bool, pinned: str | None, insecure: bool
) -> None:
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
        policy = _policy(root, pinned, insecure)
        stream, what = open_source(source)
        with stream:
            archive = read_archive(stream, host_arch=host_arch(), what=what, policy=policy)
        res = install(root, archive, dry_run=dry_run, replace=replace)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    by_key = {e.key: e for e in archive.entries}
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
@click.option("--name", default=None, help="Distribution name [default: fa4aot-cache-<target names>].")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Wheel version.")
@SIGN_OPTION
def wheel_cmd(
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    out_dir: Path,
    name: str | None,
    version: str,
    sign_key: Path | None,
) -> None:
    """Build a pip-installable wheel holding the selected entries as a verified, read-only cache.
    Installed, it registers under the fa4aot.caches entry point; the runtime finds it when no
    cache path and no $FA4AOT_CACHE is given. With --sign its cache files are signed: a runtime
    with $FA4AOT_TRUSTED_KEYS loads only wheels one of those keys signed."""
    from fa4aot.compile.archive import cache_entries
    from fa4aot.compile.wheel import build_wheel

    try:
        cache = _open(cache_dir)
        entries, host = _select(cache_entries(cache), f"the cache {cache.root}", manifest, targets, host_arch)
        name = name or "fa4aot-cache-" + "-".join(sorted({e.target.name.lower() for e in entries}))
        path = build_wheel(
            cache, entries, out_dir, name=name, version=version, host_arch=host, signer=_signer(sign_key)
        )
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"built {path} ({_human(path.stat().st_size)}): {len(entries)} entries; pip install {path}")


STORE_ARG = click.argument("store", required=False)


@main.command("push")
@STORE_ARG
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@SIGN_OPTION
def push_cmd(
    store: str | None,
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    sign_key: Path | None,
) -> None:
    """Upload the selected entries to STORE (a directory, s3://, gs://, memory://... with the
    remote extra; default $FA4AOT_STORE): only the blobs and records it lacks, then its index of
    record hashes (INDEX.json), signed with --sign."""
    from fa4aot.compile.archive import cache_entries
    from fa4aot.compile.stores import open_store, push

    try:
        cache = _open(cache_dir)
        st = open_store(store)
        entries, _ = _select(cache_entries(cache), f"the cache {cache.root}", manifest, targets, host_arch)
        written, n = push(cache, st, entries, _signer(sign_key))
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"pushed {n} entries to {st.url}: {written} objects uploaded, the rest were there")


@main.command("pull")
@STORE_ARG
@CACHE_OPTION
@TARGET_SELECT
@MANIFEST_SELECT
@HOST_SELECT
@click.option("--dry-run", is_flag=True, help="List what would be downloaded; write nothing.")
@REPLACE_OPTION
@SHA256_OPTION
@INSECURE_OPTION
def pull_cmd(
    store: str | None,
    cache_dir: Path | None,
    targets: tuple[str, ...],
    manifest: Path | None,
    host_arch: str | None,
    dry_run: bool,
    replace: bool,
    pinned: str | None,
    insecure: bool,
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
        policy = _policy(root, pinned, insecure)
        st = open_store(store)
        hashes = authenticated_hashes(st, policy)
        entries, host = _select(store_entries(st, hashes), st.url, manifest, targets, host_arch)
        have = present_records(root)
        differ = [e for e in entries if e.key in have and record_differs(have[e.key], e)]
        if differ and not replace:
            raise conflict_error(differ, root, st.url)  # before anything is downloaded
        todo = [e.key for e in entries if e.key not in have] + [e.key for e in differ]
        if dry_run:
            for e in entries:
                if e.key in todo:
                    click.echo(f"would {'pull' if e.key not in have else 'replace'} {e.key[:12]} {e.variant.label()}")
            click.echo(f"{len(todo)} of {len(entries)} entries to pull from {st.url}")
            return
        archive = fetch_entries(st, todo, host_arch=host, hashes=hashes)
        res = install(root, archive, replace=replace)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    labels = {e.key: e.variant.label() for e in entries}
    for key in res.replaced:
        click.echo(f"replaced {key} {labels.get(key, '')} (--replace)")
    click.echo(
        f"pulled {len(res.added)} entries from {st.url} into {root}; {len(entries) - len(todo)} were present"
        + (f"; {len(res.replaced)} replaced" if res.replaced else "")
    )


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
def show_config_cmd() -> None:
    """Versions, the runtime's cache search path and what each cache there holds, the remote
    store configured, the host arch and the GPU (if one is present)."""
    import importlib.metadata
    import os
    import platform

    from fa4aot import __version__
    from fa4aot.compile.stores import STORE_ENV
    from fa4aot.core.index import cache_search_path
    from fa4aot.runtime.loader import host_arch

    click.echo(f"fa4aot {__version__}, Python {platform.python_version()}, host {host_arch()}")
    for dist in ("cuda-python", "cuda-bindings", "torch", "nvidia-cutlass-dsl", "flash-attn-4", "fsspec"):
        try:
            click.echo(f"  {dist:<22} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            click.echo(f"  {dist:<22} not installed")
    click.echo("cache search path (the runtime opens the first that serves this GPU):")
    for where, path in cache_search_path():
        try:
            keys = Cache(path).packed_targets()
            have = ", ".join(k.describe() for k in keys) or "no packed index (run fa4aot reindex)"
        except Fa4aotError as e:
            have = f"unusable: {e}"
        click.echo(f"  {where:<12} {path}: {have}")
    click.echo(f"remote store (${STORE_ENV}): {os.environ.get(STORE_ENV) or 'none'}")
    try:
        from fa4aot.runtime.driver import CudaDriver

        drv = CudaDriver()
        info = drv.device_info(drv.current_device())
        cc = info.compute_capability
        click.echo(f"GPU: {info.name} (sm_{cc[0]}{cc[1]}, {info.num_sms} SMs), driver {info.driver_version}")
    except Exception as e:  # no driver, no device: say so
        click.echo(f"GPU: none ({str(e).splitlines()[0][:120]})")
        info = None
    click.echo(_targets_line(info))


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
    "FA4's _compile_misses probe, compiling nothing (no GPU, seconds instead of minutes).",
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def record_cmd(output: Path, target: str | None, merge: bool, no_compile: bool, cmd: tuple[str, ...]) -> None:
    """Run CMD (after --) and write a manifest covering every forward, combine and prepare
    configuration it asked for, through FA4's own interface (flash_attn.cute) or fa4aot's API.
    Configurations fa4aot cannot build are listed as comments saying why. The workload runs
    unchanged; the command exits with its exit code (128+N if signal N killed it). SIGINT, SIGTERM
    and SIGHUP go to the workload's process group, and what it recorded until then is written.

    Example: fa4aot record -o manifests/mine.yaml -- python serve_smoke_test.py
    """
    import shlex
    import time

    from fa4aot.compile import manifest as manifest_mod
    from fa4aot.tools.record import exit_on_signals, manifest_text, python_cmd, read_log, run_recorded

    # SIGTERM/SIGHUP unwind (the temporary directory goes) instead of killing record outright
    with exit_on_signals(), tempfile.TemporaryDirectory(prefix="fa4aot-record-") as tmp:
        log = Path(tmp) / "record.jsonl"
        try:
            rc = run_recorded(python_cmd(list(cmd)), log, no_compile=no_compile)
            rec = read_log([log] if log.exists() else [], target)
            existing = []
            if merge and output.exists():
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
            text = manifest_text(rec, header, target, existing)
            output.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tmp) / "manifest.yaml"
            staged.write_text(text)
            manifest_mod.load(staged)  # what we write, `fa4aot plan` accepts
            output.write_text(text)
        except Fa4aotError as e:
            raise click.ClickException(str(e)) from None
    click.echo(
        f"{output}: {len(rec.variants)} recorded variants ({len(new)} new), {len(rec.unsupported)} configurations "
        f"fa4aot cannot build (listed as comments); the workload exited {rc}"
    )
    sys.exit(rc)


@main.group("manifest")
def manifest_group() -> None:
    """Write manifests from what ran (see also `fa4aot record`)."""


@manifest_group.command("from-misses")
@click.argument("logs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Manifest to write.")
def from_misses_cmd(logs: tuple[Path, ...], output: Path) -> None:
    """Turn miss logs ($FA4AOT_MISS_LOG of any number of nodes) into one manifest building every
    variant they name."""
    from fa4aot.compile import manifest as manifest_mod
    from fa4aot.tools.record import manifest_text, read_log

    try:
        rec = read_log(logs)
        text = manifest_text(rec, f"from the miss logs {', '.join(str(p) for p in logs)}")
        output.write_text(text)
        manifest_mod.load(output)
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
def verify_cmd(
    cache_dir: Path | None, plans: bool, rebuild_sample: int, against_fa4: bool, sample: int | None, seed: int | None
) -> None:
    """Re-hash every blob, re-parse every cubin, check arch and parameter tables against the
    metadata, and run every plan on sample shapes. Exits 1 on any mismatch."""
    from fa4aot.tools.verify import verify

    try:
        cache = _open(cache_dir)
        skipped: dict[str, str] = {}
        n, problems = verify(cache, plans, skipped)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    for host, why in sorted(skipped.items()):
        click.echo(f"SKIPPED running the {host} launch plans (this host cannot run them: {why})", err=True)
    for p in problems:
        click.echo(f"BAD {p.key[:12]} {p.label}: {p.what}", err=True)
    packed = [p for p in problems if p.key.startswith("packed/")]
    bad = len({p.key for p in problems if p not in packed})
    click.echo(f"verified {n} entries: {n - bad} ok, {bad} bad")
    click.echo(f"packed indexes: {len(packed)} problem{'s' * (len(packed) != 1)}")
    failed = bool(problems)
    if rebuild_sample:
        from fa4aot.compile.rebuild import rebuild_sample as rebuild

        try:
            results = rebuild(cache, rebuild_sample, seed)
        except Fa4aotError as e:
            raise click.ClickException(str(e)) from None
        for r in results:
            if r.status != "identical":
                click.echo(
                    f"REBUILD {r.status.upper()} {r.entry.key[:12]} {r.entry.variant.label()}: {r.detail}", err=True
                )
        same = sum(r.status == "identical" for r in results)
        click.echo(f"rebuilt {len(results)} sampled entries: {same} byte-identical")
        failed = failed or same != len(results)
    if against_fa4:
        import random

        from fa4aot.compile.archive import cache_entries
        from fa4aot.tools.against_fa4 import compare

        # one entry per variant (a variant built for two host archs shares its cubin)
        picked = list({e.variant_id: e for e in cache_entries(cache)}.values())
        if sample is not None:
            picked = random.Random(seed).sample(picked, min(sample, len(picked)))
        res = compare(cache, picked)
        for r in res:
            if r.status != "identical":
                stream = r.status in ("different", "failed")
                click.echo(
                    f"FA4 {r.status.upper()} {r.entry.variant_id[:12]} {r.entry.variant.label()}: {r.detail}",
                    err=stream,
                )
        same = sum(r.status == "identical" for r in res)
        checked = sum(r.status in ("identical", "different", "failed") for r in res)
        click.echo(f"against FA4's JIT: {same} of {checked} cubins identical ({len(res) - checked} skipped)")
        failed = failed or same != checked
    if failed:
        sys.exit(1)


@main.command("check-plans")
@CACHE_OPTION
@click.option(
    "-n", "runs", type=click.IntRange(1, 100000), default=30, show_default=True, help="Random calls per variant."
)
def check_plans_cmd(cache_dir: Path | None, runs: int) -> None:
    """Run every forward and backward variant's launch plan on random argument sets (CPU) and
    check block, smem, grid (against FA4's scheduler formulas), cluster and where the tensors
    land. Exits 1 on any mismatch."""
    from fa4aot.tools.plancheck import check_cache

    try:
        reports = check_cache(_open(cache_dir), runs)
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    bad = 0
    for r in reports:
        status = "ok" if not r.problems else f"{len(r.problems)} problems"
        click.echo(f"{r.entry.key[:12]} {r.runs:>4} calls {status:<12} {r.entry.variant.label()}")
        for p in r.problems[:5]:
            click.echo(f"    {p}", err=True)
        bad += bool(r.problems)
    click.echo(f"{len(reports)} variants, {sum(r.runs for r in reports)} plan calls, {bad} with problems")
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
def gc(cache_dir: Path | None, manifest: Path | None, grace: float, other_toolchains: bool) -> None:
    """Remove unreferenced blobs and stale staging files (and, with --manifest, stale entries).

    With --manifest, only entries this installation's toolchain built are candidates: a cache
    shared by several fa4aot versions keeps the others' entries unless --other-toolchains is given.
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
        from fa4aot.compile.store import CacheWriter

        cache = CacheWriter(_cache_dir(cache_dir), create=False)
        stats = cache.gc(keep, grace, owned)
        cache.close()
    except Fa4aotError as e:
        raise click.ClickException(str(e)) from None
    click.echo(
        f"removed {stats['entries_removed']} entries and {stats['files_removed']} files, "
        f"freed {_human(stats['bytes_freed'])}"
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
    from fa4aot.core.layouts import dims_for
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
        click.echo(f"launch {i}: grid {launch.grid} block {launch.block} smem {launch.smem} cluster {launch.cluster}")
        click.echo(f"  attributes {launch.attribute_values()}")
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
