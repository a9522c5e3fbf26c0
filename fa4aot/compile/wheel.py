"""``fa4aot wheel``: a pip-installable wheel holding a verified cache.

The wheel is built by setuptools (its PEP 517 backend, run in a subprocess) from a generated
project: a package ``fa4aot_cache_<name>`` whose ``cache/`` directory is a fresh cache holding
exactly the selected entries (installed through the archive verifier), and an entry point in the
``fa4aot.caches`` group that returns that directory. The runtime finds installed cache wheels
through that group (after ``$FA4AOT_CACHE``, before ``./cache``) and opens them read-only, with
the same hash checks as any cache.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fa4aot.compile.archive import Archive, ArchiveError, install
from fa4aot.core.index import CACHE_ENTRY_POINT_GROUP, Cache, Entry
from fa4aot.core.signing import CACHE_FILES_DOC, Signer, sign_cache_files

_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
#: Suffix of the wheel's staging copy in the output directory (renamed to the wheel when complete).
STAGING_SUFFIX = "part"


def build_wheel(
    cache: Cache,
    entries: list[Entry],
    out_dir: Path,
    *,
    name: str,
    version: str,
    host_arch: str,
    signer: Signer | None = None,
) -> Path:
    """Build the wheel of ``entries`` into ``out_dir``; returns its path. ``name`` is the
    distribution name (``fa4aot-cache-b200``); ``signer`` signs its cache's files (a runtime
    with ``$FA4AOT_TRUSTED_KEYS`` loads only wheels signed by one of those keys).

    A write error (a full disk, a read-only ``out_dir``) raises :class:`ArchiveError` and leaves
    no wheel, not even a partial one, in ``out_dir``: the wheel appears there by a rename only
    when complete."""
    if not _NAME.fullmatch(name):
        raise ArchiveError(f"--name {name!r}: use lowercase letters, digits and single dashes")
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", version):
        raise ArchiveError(f"--version {version!r}: use a release number like 1.0.0")
    if not entries:
        raise ArchiveError("nothing to put in the wheel: no entry matches the selection")
    blobs = {}
    for e in entries:
        for role, b in e.blobs.items():
            blobs[b.sha256] = cache.read_blob(e, role)  # hash-checked
    records = {e.key: next(iter(cache.records(e.key)))[1] for e in entries}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fa4aot-wheel-") as tmp:
            proj = Path(tmp)
            _write_project(proj, name, version, Archive({}, entries, records, blobs), host_arch, signer)
            return _publish(_run_setuptools(proj), out_dir)
    except OSError as e:
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        where = f" ({e.filename})" if e.filename else ""
        raise ArchiveError(f"cannot build the wheel: {why}{where}; no wheel written to {out_dir}") from None


def _write_project(
    proj: Path, name: str, version: str, archive: Archive, host_arch: str, signer: Signer | None
) -> None:
    """The setuptools project of the wheel, under ``proj``: the package with its cache (installed
    through the archive verifier) and ``pyproject.toml``."""
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
    targets = sorted({f"{e.target.name} ({e.target.arch}, {e.target.num_sms} SMs)" for e in entries})
    (pkg / "__init__.py").write_text(
        f'"""fa4aot kernel cache: {len(entries)} entries for {", ".join(targets)}, {host_arch} hosts."""\n\n'
        "from pathlib import Path\n\n\n"
        "def cache_dir() -> Path:\n"
        '    """The cache directory this wheel installs (read-only; open it with fa4aot)."""\n'
        '    return Path(__file__).resolve().parent / "cache"\n'
    )
    (proj / "pyproject.toml").write_text(
        "[build-system]\n"
        'requires = ["setuptools>=64"]\n'
        'build-backend = "setuptools.build_meta"\n\n'
        "[project]\n"
        f'name = "{name}"\n'
        f'version = "{version}"\n'
        f'description = "fa4aot kernel cache: {", ".join(targets)}"\n'
        'requires-python = ">=3.10"\n\n'
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
    # the wheel is platform-specific in truth (launch plans are host-arch ELF objects), but
    # holds no Python extension; the host arch is checked by the runtime when it opens it
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(proj / "dist")], cwd=proj, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ArchiveError(f"setuptools could not build the wheel:\n{proc.stderr[-2000:]}")
    return proj / "dist" / proc.stdout.strip().splitlines()[-1]


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
