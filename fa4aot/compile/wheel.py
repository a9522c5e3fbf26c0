"""``fa4aot wheel``: pip-installable wheels holding a verified cache.

Each wheel is built by setuptools (its PEP 517 backend, run in a subprocess) from a generated
project: a package ``fa4aot_cache_<name>`` whose ``cache/`` directory is a fresh cache holding
exactly the selected entries (installed through the archive verifier), and an entry point in the
``fa4aot.caches`` group that returns that directory. The runtime finds installed cache wheels
through that group (after ``$FA4AOT_CACHE``, before ``./cache``) and opens them read-only, with
the same hash checks as any cache.

What pip sees of a cache wheel:

* its version: the one given, or :func:`content_version` - ``1.0.<UTC time of the newest
  entry>+<hash of the records>``. pip installs a wheel file over an installed distribution only
  when the versions differ ("already installed" otherwise), so the version must change whenever
  the content does, and must not when it does not;
* its tag, ``py3-none-manylinux_2_<N>_<host arch>`` (:func:`platform_tag`): the launch plans are
  native code of one host CPU arch, so pip on another arch refuses the wheel;
* ``Requires-Dist: fa4aot`` from this version up to the next major (:func:`fa4aot_requirement`);
* a license file (``fa4aot/compile/licenses``: what the wheel contains and under which terms).

With ``max_size`` the selection is split into one wheel per GPU target (arch and SM count: the
runtime reads one wheel per target, so a target's entries are never split across wheels), each
checked against the limit, with an index (``<name>-<version>.wheels.json``) of which wheel serves
which target and kernel families.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path

from fa4aot import __version__
from fa4aot.compile.archive import Archive, ArchiveError, install, version_tuple
from fa4aot.core.index import CACHE_ENTRY_POINT_GROUP, Cache, Entry
from fa4aot.core.signing import CACHE_FILES_DOC, Signer, sign_cache_files

_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
# PEP 440 in the normalized form setuptools writes into the file name (a local label included)
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?(\+[a-z0-9]+(\.[a-z0-9]+)*)?")
#: Suffix of the wheel's staging copy in the output directory (renamed to the wheel when complete).
STAGING_SUFFIX = "part"
#: Part of the derived version: bumped when what a cache wheel holds around its cache changes
#: (metadata, license file, layout), so that a wheel of the same cache made by the new layout
#: is installed over the old one.
WHEEL_LAYOUT = 2
#: The oldest glibc a manylinux tag names here: manylinux2014's (pip maps it on x86_64 and aarch64).
MANYLINUX_GLIBC_FLOOR = 17
#: A symbol version a launch plan needs from glibc, as its dynamic string table names it.
_GLIBC_NEED = re.compile(rb"GLIBC_2\.([0-9]+)")
INDEX_FORMAT = "fa4aot-wheels/1"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
#: The latest time a version stamp can hold (the end of year 9999, UTC).
_LAST_STAMP = 253402300799.0
#: (name, file under fa4aot/compile/licenses) of the license texts every cache wheel carries.
LICENSE_TEXTS = (
    ("fa4aot (BSD 3-Clause License)", "fa4aot.txt"),
    ("flash-attn-4 (BSD 3-Clause License)", "flash-attn-4.txt"),
    ("quack-kernels (Apache License 2.0)", "quack-kernels.txt"),
)
#: Toolchain components named in a cache wheel's license file (from its entries' records).
_LICENSED_TOOLCHAIN = ("flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels")


@dataclass(frozen=True)
class BuiltWheel:
    """One wheel written by :func:`build_wheels`: its path, distribution name and entries."""

    path: Path
    name: str
    entries: list[Entry]


@dataclass(frozen=True)
class WheelSet:
    """What :func:`build_wheels` wrote: the wheels (one version for all), and the index of
    which wheel serves which target when the selection was split (None otherwise)."""

    version: str
    wheels: list[BuiltWheel]
    index: Path | None


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names: a number and an optional unit, B, kB, MB, GB (powers
    of 1000) or KiB, MiB, GiB (powers of 1024), in any case (``100MB``, ``1.5 GiB``, ``4096``).
    :class:`ValueError` for anything else, or for zero."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise ValueError(f"{text!r} is not a size: use a number and B, kB, MB, GB, KiB, MiB or GiB (100MB, 1.5GiB)")
    n = int(Decimal(m.group(1)) * unit)  # Decimal: "1.1GB" is exactly 1_100_000_000, not a float's rounding
    if n <= 0:
        raise ValueError(f"{text!r} is not a size above zero")
    return n


def content_version(entries: list[Entry], records: dict[str, str], signer_key: str | None) -> str:
    """The version of a wheel of ``entries`` when none is given: ``1.0.<UTC time of the newest
    entry, YYYYMMDDHHMMSS>+<12 hex digits of a sha256>``, over each entry's record (which names
    its blobs' sha256), the signing key, this fa4aot's version and :data:`WHEEL_LAYOUT`.

    The hash makes a rebuilt cache (any changed record, added or removed entry) a new version, so
    ``pip install`` of its wheel replaces the installed one, while the same cache gives the same
    version (pip leaves it). The time part orders rebuilds for ``pip install -U`` from an index,
    where local labels alone compare arbitrarily, and exceeds the former fixed 1.0.0."""
    material = {
        "layout": WHEEL_LAYOUT,
        "fa4aot": __version__,
        "signer": signer_key,
        "records": sorted([e.key, hashlib.sha256(records[e.key].encode()).hexdigest()] for e in entries),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    newest = max(float(e.meta.get("created", 0)) for e in entries)
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(min(max(newest, 0.0), _LAST_STAMP)))
    return f"1.0.{stamp}+{digest}"


def platform_tag(host_arch: str, plans: Iterable[bytes]) -> str:
    """The wheel platform tag of launch plans (ELF shared objects) for ``host_arch``:
    ``manylinux_2_<N>_<arch>``, N the newest glibc symbol version the plans reference (at least
    :data:`MANYLINUX_GLIBC_FLOOR`), so pip installs the wheel only where they can load."""
    if not re.fullmatch(r"[a-z0-9_]+", host_arch):
        raise ArchiveError(f"host arch {host_arch!r} has no wheel platform tag")
    glibc = max([MANYLINUX_GLIBC_FLOOR, *(int(n) for plan in plans for n in _GLIBC_NEED.findall(plan))])
    return f"manylinux_2_{glibc}_{host_arch}"


def fa4aot_requirement() -> str:
    """``Requires-Dist`` of a cache wheel: this fa4aot version up to the next major (a cache
    wheel's format and plan ABI are read by the fa4aot line that wrote it)."""
    return f"fa4aot>={__version__},<{version_tuple(__version__)[0] + 1}"


def build_wheel(
    cache: Cache,
    entries: list[Entry],
    out_dir: Path,
    *,
    name: str,
    version: str | None = None,
    host_arch: str,
    signer: Signer | None = None,
) -> Path:
    """Build one wheel of ``entries`` into ``out_dir``; returns its path (:func:`build_wheels`
    without a size limit)."""
    built = build_wheels(cache, entries, out_dir, name=name, version=version, host_arch=host_arch, signer=signer)
    return built.wheels[0].path


def build_wheels(
    cache: Cache,
    entries: list[Entry],
    out_dir: Path,
    *,
    name: str,
    host_arch: str,
    version: str | None = None,
    signer: Signer | None = None,
    max_size: int | None = None,
) -> WheelSet:
    """Build the wheels of ``entries`` (all for ``host_arch``) into ``out_dir``. ``name`` is the
    distribution name (``fa4aot-cache-b200``); ``version`` None derives it from the content
    (:func:`content_version`); ``signer`` signs each wheel's cache files (a runtime with
    ``$FA4AOT_TRUSTED_KEYS`` loads only wheels signed by one of those keys). ``max_size``
    (bytes): one wheel per GPU target, named ``<name>-<target names>``, each at most this size,
    and the index of the set; a target whose wheel is larger raises :class:`ArchiveError`.

    An error (a full disk, a read-only ``out_dir``, a wheel over the limit) raises
    :class:`ArchiveError` and leaves no wheel of this call in ``out_dir``, not even a partial
    one: each wheel appears there by a rename only when complete, and all are built before any
    is published."""
    _check_request(name, version, entries, host_arch)
    blobs = {}
    for e in entries:
        for role, b in e.blobs.items():
            blobs[b.sha256] = cache.read_blob(e, role)  # hash-checked
    records = {e.key: next(iter(cache.records(e.key)))[1] for e in entries}
    version = version or content_version(entries, records, None if signer is None else signer.public)
    plat = platform_tag(host_arch, (blobs[e.blobs["plan"].sha256] for e in entries if "plan" in e.blobs))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fa4aot-wheel-") as tmp:
            built = []
            for i, (dist, group) in enumerate(_groups(name, entries, split=max_size is not None)):
                proj = Path(tmp) / str(i)
                proj.mkdir()
                archive = Archive({}, group, {e.key: records[e.key] for e in group}, blobs)
                _write_project(proj, dist, version, plat, archive, host_arch, signer)
                path = _run_setuptools(proj)
                _check_size(path, group, max_size, out_dir)
                built.append(BuiltWheel(path, dist, group))
            return _publish_set(built, out_dir, name, version, host_arch, index=max_size is not None)
    except OSError as e:
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        where = f" ({e.filename})" if e.filename else ""
        raise ArchiveError(f"cannot build the wheel: {why}{where}; no wheel written to {out_dir}") from None


def _check_request(name: str, version: str | None, entries: list[Entry], host_arch: str) -> None:
    """Refuse what no wheel can be built from, before any blob is read."""
    if not _NAME.fullmatch(name):
        raise ArchiveError(f"--name {name!r}: use lowercase letters, digits and single dashes")
    if version is not None and not _VERSION.fullmatch(version):
        raise ArchiveError(f"--version {version!r}: use a normalized PEP 440 version like 1.0.0 or 2.1.0.post1")
    if not entries:
        raise ArchiveError("nothing to put in the wheel: no entry matches the selection")
    arches = sorted({e.host_arch for e in entries})
    if arches != [host_arch]:
        # a wheel has one platform tag: plans of another host arch in it could never load
        raise ArchiveError(
            f"the selection holds launch plans for host arch(es) {', '.join(arches)}, not only {host_arch}: "
            "build one wheel per host arch (--host-arch)"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _groups(name: str, entries: list[Entry], split: bool) -> list[tuple[str, list[Entry]]]:
    """(distribution name, entries) of each wheel: all in ``name``, or with ``split`` one wheel
    per GPU target (arch, SM count), named ``<name>-<its target names>``."""
    if not split:
        return [(name, entries)]
    by_target: dict[tuple[str, int], list[Entry]] = {}
    for e in entries:
        by_target.setdefault((e.target.arch, e.target.num_sms), []).append(e)
    labels = {k: _slug("-".join(sorted({e.target.name for e in es}))) for k, es in by_target.items()}
    out = []
    for (arch, sms), group in sorted(by_target.items()):
        label = labels[(arch, sms)]
        if list(labels.values()).count(label) > 1:  # one SKU name built for two SM counts
            label = f"{label}-{_slug(arch)}-{sms}"
        out.append((f"{name}-{label}", group))
    return out


def _describe(entries: list[Entry]) -> str:
    return ", ".join(sorted({f"{e.target.name} ({e.target.arch}, {e.target.num_sms} SMs)" for e in entries}))


def _check_size(path: Path, group: list[Entry], max_size: int | None, out_dir: Path) -> None:
    size = path.stat().st_size
    if max_size is not None and size > max_size:
        raise ArchiveError(
            f"the wheel of {_describe(group)} ({len(group)} entries) is {size:,} bytes, over --max-size "
            f"({max_size:,} bytes); the entries of one GPU target cannot be split across wheels (the runtime "
            f"reads one wheel per target): select fewer variants (--manifest) or raise --max-size. "
            f"No wheel written to {out_dir}"
        )


def _toolchain(e: Entry, component: str) -> str:
    tc = e.meta.get("toolchain")
    return str(tc.get(component, "(version not recorded)")) if isinstance(tc, dict) else "(version not recorded)"


def license_text(entries: list[Entry]) -> str:
    """The license file of a wheel of ``entries``: the toolchain versions they were compiled with,
    fa4aot's notice on what cache wheels contain and under which terms, and the license texts
    that redistributing them in binary form requires."""
    used = {name: sorted({_toolchain(e, name) for e in entries}) for name in _LICENSED_TOOLCHAIN}
    licenses = resources.files("fa4aot.compile") / "licenses"
    parts = [
        "This fa4aot cache wheel holds kernels compiled with "
        + ", ".join(f"{name} {' / '.join(v)}" for name, v in used.items())
        + ".\n",
        (licenses / "NOTICE").read_text(encoding="utf-8"),
    ]
    for title, file in LICENSE_TEXTS:
        parts.append(f"{'=' * 78}\n{title}\n{'=' * 78}\n\n" + (licenses / file).read_text(encoding="utf-8"))
    return "\n".join(parts)


def _write_project(
    proj: Path, name: str, version: str, plat: str, archive: Archive, host_arch: str, signer: Signer | None
) -> None:
    """The setuptools project of the wheel, under ``proj``: the package with its cache (installed
    through the archive verifier), its license file, ``pyproject.toml`` and ``setup.cfg``."""
    module = name.replace("-", "_")
    pkg = proj / module
    pkg.mkdir()
    install(pkg / "cache", archive)
    for junk in ("tmp", "LOCK", "packed/.lock"):
        p = pkg / "cache" / junk
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    if signer is not None:
        sign_cache_files(pkg / "cache", signer)
    entries = archive.entries
    targets = _describe(entries)
    (pkg / "__init__.py").write_text(
        f'"""fa4aot kernel cache: {len(entries)} entries for {targets}, {host_arch} hosts."""\n\n'
        "from pathlib import Path\n\n\n"
        "def cache_dir() -> Path:\n"
        '    """The cache directory this wheel installs (read-only; open it with fa4aot)."""\n'
        '    return Path(__file__).resolve().parent / "cache"\n'
    )
    (proj / "LICENSE").write_text(license_text(entries), encoding="utf-8")
    # bdist_wheel tags a project without extension modules py3-none-any; the launch plans are
    # native code of one host arch (and glibc), which plat_name tells pip
    (proj / "setup.cfg").write_text(f"[bdist_wheel]\npython_tag = py3\nplat_name = {plat}\n")
    (proj / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=77"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{version}"\n'
        f'description = "fa4aot kernel cache: {targets}"\n'
        'requires-python = ">=3.10"\n'
        f'dependencies = ["{fa4aot_requirement()}"]\n'
        'license-files = ["LICENSE"]\n\n'
        f'[project.entry-points."{CACHE_ENTRY_POINT_GROUP}"]\n'
        f'{module} = "{module}:cache_dir"\n\n'
        "[tool.setuptools]\n"
        f'packages = ["{module}"]\n'
        "include-package-data = false\n\n"
        "[tool.setuptools.package-data]\n"
        f'{module} = ["cache/FORMAT", "cache/{CACHE_FILES_DOC}*", "cache/index/*", "cache/packed/*", "cache/blobs/*/*"]\n'
    )


def _run_setuptools(proj: Path) -> Path:
    """Build the wheel of the project at ``proj`` (setuptools' PEP 517 backend, in a subprocess);
    its path under ``proj/dist``."""
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(proj / "dist")], cwd=proj, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArchiveError(f"setuptools could not build the wheel:\n{proc.stderr[-2000:]}")
    return proj / "dist" / proc.stdout.strip().splitlines()[-1]


def _index(built: list[BuiltWheel], name: str, version: str, host_arch: str) -> bytes:
    """The index of a split set: each wheel's file, sha256, size and what it serves."""
    wheels = [
        {
            "file": w.path.name,
            "distribution": w.name,
            "sha256": hashlib.sha256(w.path.read_bytes()).hexdigest(),
            "size": w.path.stat().st_size,
            "entries": len(w.entries),
            "targets": [
                {"name": n, "arch": a, "num_sms": s}
                for n, a, s in sorted({(e.target.name, e.target.arch, e.target.num_sms) for e in w.entries})
            ],
            "families": sorted({e.variant.family for e in w.entries}),
        }
        for w in built
    ]
    doc = {"format": INDEX_FORMAT, "name": name, "version": version, "host_arch": host_arch, "wheels": wheels}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _publish_set(
    built: list[BuiltWheel], out_dir: Path, name: str, version: str, host_arch: str, index: bool
) -> WheelSet:
    """Publish every wheel of ``built`` (and, with ``index``, the index after them) into
    ``out_dir``; on any error remove those this call added, so no incomplete set is left."""
    added: list[Path] = []
    try:
        published = []
        for w in built:
            existed = (out_dir / w.path.name).exists()
            dest = _publish(w.path, out_dir)
            if not existed:
                added.append(dest)
            published.append(BuiltWheel(dest, w.name, w.entries))
        index_path = None
        if index:
            index_path = out_dir / f"{name.replace('-', '_')}-{version}.wheels.json"
            existed = index_path.exists()
            _publish_bytes(_index(published, name, version, host_arch), index_path)
            if not existed:
                added.append(index_path)
        return WheelSet(version, published, index_path)
    except BaseException:
        for p in added:
            p.unlink(missing_ok=True)
        raise


def _publish(built: Path, out_dir: Path) -> Path:
    """Copy the wheel ``built`` into ``out_dir`` so that it appears there complete or not at all
    (a copy cut short by a full disk would be a corrupt wheel that pip later fails on)."""
    dest = out_dir / built.name
    # not *.whl: nothing that lists wheels takes the staging file for one
    staged = out_dir / f".{built.name}.{os.getpid()}.{STAGING_SUFFIX}"
    try:
        shutil.copyfile(built, staged)
        with open(staged, "rb") as f:
            os.fsync(f.fileno())  # a delayed-allocation filesystem reports ENOSPC here, not at write
        os.replace(staged, dest)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return dest


def _publish_bytes(data: bytes, dest: Path) -> None:
    """Write ``data`` to ``dest`` complete or not at all (as :func:`_publish`)."""
    staged = dest.with_name(f".{dest.name}.{os.getpid()}.{STAGING_SUFFIX}")
    try:
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, dest)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
