"""Shipping a cache as one file: ``fa4aot pack`` and ``fa4aot install``.

An archive is an xz-compressed POSIX tar whose first member, ``fa4aot-archive.json``, lists every
entry (its key and index record) and every blob (sha256, size), with the cache format, the fa4aot
version, the host arch and the toolchains that built the entries; then one member per blob,
``blobs/<sha256>.<ext>``. Packing is deterministic: members sorted, no timestamps or owners, fixed
compression settings, so one cache packs to the same bytes every time.

Installing trusts nothing: the archive is read as a stream, a member that is not a regular file
with a listed name is refused (absolute paths, ``..``, links, devices), every blob's size and
sha256 is checked and every cubin parsed before anything is written; only then are the entries
published through :class:`fa4aot.build.store.CacheWriter` (blobs first, index record last), which
is safe against concurrent installs, builds and gc. Entries the cache already holds are skipped,
so installing twice changes nothing.
"""

from __future__ import annotations

import io
import json
import lzma
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fa4aot import __version__
from fa4aot.core import cubin as cubin_mod
from fa4aot.core.errors import CacheError, Fa4aotError
from fa4aot.core.index import BLOB_EXT, Cache, Entry
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Variant, canonical_json, sha256_hex

#: Version of the archive layout (the JSON member's "format").
ARCHIVE_FORMAT = "fa4aot-archive/1"
MANIFEST_MEMBER = "fa4aot-archive.json"
#: xz preset used by pack: 9 gives the smallest archives of the presets measured
#: (benchmarks/pack.py) at a cost of seconds, paid once in CI; decompression speed barely varies.
XZ_PRESET = 9
#: Limits an installer applies before reading a member (a hostile archive cannot exhaust memory).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_BLOB_BYTES = 256 << 20  # a launch plan is 0.1-1 MB
MAX_TOTAL_BYTES = 4 << 30


class ArchiveError(Fa4aotError):
    """An archive is malformed, tampered with, or not for this machine or fa4aot; nothing was written."""


def version_tuple(v: str) -> tuple[int, ...]:
    """Numeric release part of a version string (``0.1.0.dev3`` -> (0, 1, 0))."""
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits or digits != part[: len(digits)]:
            if digits:
                out.append(int(digits))
            break
        out.append(int(digits))
    return tuple(out)


# -- selecting entries --------------------------------------------------------------------------


def cache_entries(cache: Cache) -> list[Entry]:
    """Every well-formed entry of a cache (``fa4aot verify`` reports malformed ones; they are
    never shipped)."""
    out = []
    for key, text in cache.records():
        try:
            out.append(Entry.from_json(key, text))
        except CacheError:
            continue
    return out


def select_entries(
    available: Iterable[Entry],
    where: str,
    *,
    host_arch: str,
    targets: Iterable[str] = (),
    variants: Iterable[Variant] | None = None,
    shim_abi: int | None = None,
) -> list[Entry]:
    """Entries to ship from ``available`` (a cache's or a store's, named by ``where``), sorted
    by key: this cache format and host arch; with ``targets`` only those target names; with
    ``variants`` (a manifest's) exactly one entry per variant - the one the runtime would load
    (newest of the plan ABI ``shim_abi``) - and an :class:`ArchiveError` naming every variant
    that is missing."""
    want_targets = set(targets)
    pool: list[Entry] = []
    for e in available:
        if e.meta.get("format") != CACHE_FORMAT_VERSION or e.host_arch != host_arch:
            continue
        if want_targets and e.target.name not in want_targets:
            continue
        pool.append(e)
    if variants is None:
        if want_targets - {e.target.name for e in pool}:
            missing = sorted(want_targets - {e.target.name for e in pool})
            raise ArchiveError(f"{where} has no {host_arch} entries for target(s) {', '.join(missing)}")
        return sorted(pool, key=lambda e: e.key)
    best: dict[str, Entry] = {}
    for e in pool:
        if shim_abi is not None and e.meta.get("shim_abi") != shim_abi:
            continue
        prev = best.get(e.variant_id)
        if prev is None or float(e.meta.get("created", 0)) >= float(prev.meta.get("created", 0)):
            best[e.variant_id] = e
    chosen, missing = [], []
    for v in variants:
        e = best.get(v.variant_id)
        if e is None:
            missing.append(v)
        else:
            chosen.append(e)
    if missing:
        head = "; ".join(v.label() for v in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ArchiveError(
            f"{where} lacks {len(missing)} variant(s) the manifest needs: {head}{more}; "
            "run `fa4aot build` with the manifest first"
        )
    return sorted({e.key: e for e in chosen}.values(), key=lambda e: e.key)


# -- pack -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    entries: int
    blobs: int
    raw_bytes: int
    archive_bytes: int
    sha256: str


def _blob_refs(e: Entry) -> list[tuple[str, int, str]]:
    return [(b.sha256, b.size, b.ext) for b in e.blobs.values()]


def pack_bytes(cache: Cache, entries: list[Entry], host_arch: str) -> tuple[bytes, PackResult]:
    """The archive of ``entries`` (every blob re-read and hash-checked) and what it holds."""
    if not entries:
        raise ArchiveError("nothing to pack: no entry matches the selection")
    blobs: dict[str, tuple[int, str, Entry, str]] = {}
    for e in entries:
        for role, b in e.blobs.items():
            blobs.setdefault(b.sha256, (b.size, b.ext, e, role))
    toolchains = sorted({canonical_json(e.meta.get("toolchain", {})) for e in entries})
    doc = {
        "format": ARCHIVE_FORMAT,
        "cache_format": CACHE_FORMAT_VERSION,
        "fa4aot": __version__,
        "host_arch": host_arch,
        "toolchains": [json.loads(t) for t in toolchains],
        "targets": sorted({canonical_json(e.target._asdict()) for e in entries}),
        "entries": [{"key": e.key, "record": _record_text(cache, e)} for e in entries],
        "blobs": [{"sha256": s, "size": blobs[s][0], "ext": blobs[s][1]} for s in sorted(blobs)],
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, MANIFEST_MEMBER, json.dumps(doc, sort_keys=True, indent=0).encode())
        for sha in sorted(blobs):
            size, ext, e, role = blobs[sha]
            data = cache.read_blob(e, role)  # sha256 and size checked
            _add(tar, f"blobs/{sha}.{ext}", data)
    payload = raw.getvalue()
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    return data, PackResult(len(entries), len(blobs), len(payload), len(data), sha256_hex(data))


def _record_text(cache: Cache, e: Entry) -> str:
    (_, text), *_ = cache.records(e.key)
    return text


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


# -- install ----------------------------------------------------------------------------------


@dataclass
class Archive:
    """A fully read and verified archive: its manifest, entries and blob bytes."""

    doc: dict[str, Any]
    entries: list[Entry]
    records: dict[str, str]
    blobs: dict[str, bytes] = field(repr=False)

    def blobs_of(self, e: Entry) -> dict[str, bytes]:
        return {role: self.blobs[b.sha256] for role, b in e.blobs.items()}


def read_archive(stream: IO[bytes], *, host_arch: str, what: str = "archive") -> Archive:
    """Read and verify an archive from ``stream`` (nothing is written). Raises
    :class:`ArchiveError` saying what is wrong."""
    try:
        return _read(stream, host_arch, what)
    except ArchiveError:
        raise
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"{what} is damaged or truncated ({type(e).__name__}: {e})") from None


def _read(stream: IO[bytes], host_arch: str, what: str) -> Archive:
    tar = tarfile.open(fileobj=stream, mode="r|xz")
    doc: dict[str, Any] | None = None
    listed: dict[str, tuple[int, str]] = {}
    blobs: dict[str, bytes] = {}
    total = 0
    for m in tar:
        name = m.name
        if not m.isreg():
            raise ArchiveError(f"{what}: member {name!r} is not a regular file (links and devices are refused)")
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise ArchiveError(f"{what}: member {name!r} has an unsafe path")
        if doc is None:
            if name != MANIFEST_MEMBER:
                raise ArchiveError(f"{what}: the first member must be {MANIFEST_MEMBER}, got {name!r}")
            if m.size > MAX_MANIFEST_BYTES:
                raise ArchiveError(f"{what}: {MANIFEST_MEMBER} is {m.size} bytes (limit {MAX_MANIFEST_BYTES})")
            doc = _check_doc(json.loads(_read_member(tar, m)), host_arch, what)
            for b in doc["blobs"]:
                listed[f"blobs/{b['sha256']}.{b['ext']}"] = (int(b["size"]), b["sha256"])
            total = sum(size for size, _ in listed.values())
            if total > MAX_TOTAL_BYTES or any(size > MAX_BLOB_BYTES for size, _ in listed.values()):
                raise ArchiveError(f"{what}: its blobs add up to {total} bytes, beyond the installer's limits")
            continue
        if name not in listed:
            raise ArchiveError(f"{what}: member {name!r} is not listed in {MANIFEST_MEMBER}")
        size, sha = listed[name]
        if m.size != size:
            raise ArchiveError(f"{what}: {name} is {m.size} bytes, the manifest says {size}")
        if sha in blobs:
            raise ArchiveError(f"{what}: {name} appears twice")
        data = _read_member(tar, m)
        if sha256_hex(data) != sha:
            raise ArchiveError(f"{what}: {name} does not match its sha256 (tampered or damaged)")
        blobs[sha] = data
    if doc is None:
        raise ArchiveError(f"{what} is empty")
    missing = sorted(n for n, (_, sha) in listed.items() if sha not in blobs)
    if missing:
        raise ArchiveError(f"{what} is truncated: {len(missing)} listed blob(s) missing, e.g. {missing[0]}")
    entries, records = [], {}
    for item in doc["entries"]:
        key, text = str(item["key"]), str(item["record"])
        if not re.fullmatch(r"[0-9a-f]{16,64}", key):
            raise ArchiveError(f"{what}: entry key {key[:80]!r} is not a cache key")
        try:
            e = Entry.from_json(key, text)
        except CacheError as err:
            raise ArchiveError(f"{what}: {err}") from None
        _check_entry(e, blobs, host_arch, what)
        entries.append(e)
        records[key] = text
    return Archive(doc, entries, records, blobs)


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(m)
    assert f is not None  # a regular file
    data = f.read()
    if len(data) != m.size:
        raise ArchiveError(f"member {m.name} is truncated")
    return data


def _check_doc(doc: Any, host_arch: str, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("format") != ARCHIVE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ArchiveError(f"{what}: archive format {got!r}; this fa4aot reads {ARCHIVE_FORMAT!r}")
    if doc.get("cache_format") != CACHE_FORMAT_VERSION:
        raise ArchiveError(
            f"{what} holds cache format {doc.get('cache_format')!r}; this fa4aot uses {CACHE_FORMAT_VERSION} "
            "(pack it again with a matching fa4aot)"
        )
    made_by = str(doc.get("fa4aot", ""))
    if version_tuple(made_by) > version_tuple(__version__):
        raise ArchiveError(f"{what} was packed by fa4aot {made_by}, newer than this {__version__}: upgrade fa4aot")
    if doc.get("host_arch") != host_arch:
        raise ArchiveError(
            f"{what} is for {doc.get('host_arch')!r} hosts; this host is {host_arch} (its launch plans could not load here)"
        )
    if not isinstance(doc.get("entries"), list) or not isinstance(doc.get("blobs"), list):
        raise ArchiveError(f"{what}: {MANIFEST_MEMBER} lacks its entries or blobs list")
    for b in doc["blobs"]:
        if not (
            isinstance(b, dict)
            and isinstance(b.get("sha256"), str)
            and len(b["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in b["sha256"])
            and b.get("ext") in set(BLOB_EXT.values()) | {"bin"}
            and type(b.get("size")) is int
            and b["size"] >= 0
        ):
            raise ArchiveError(f"{what}: malformed blob listing {str(b)[:200]}")
    return doc


def _check_entry(e: Entry, blobs: dict[str, bytes], host_arch: str, what: str) -> None:
    if e.meta.get("format") != CACHE_FORMAT_VERSION:
        raise ArchiveError(f"{what}: entry {e.key} has cache format {e.meta.get('format')!r}")
    if e.host_arch != host_arch:
        raise ArchiveError(f"{what}: entry {e.key} is for {e.host_arch} hosts")
    for role, b in e.blobs.items():
        data = blobs.get(b.sha256)
        if data is None or len(data) != b.size:
            raise ArchiveError(f"{what}: entry {e.key} needs blob {b.sha256[:12]} ({role}), which the archive lacks")
    if "plan" not in e.blobs or "cubin" not in e.blobs or e.cubin is None:
        raise ArchiveError(f"{what}: entry {e.key} has no launch plan, cubin or cubin record")
    if e.cubin.sha256 != e.blobs["cubin"].sha256:
        raise ArchiveError(f"{what}: entry {e.key}: its cubin blob is not the cubin it records")
    try:
        parsed = cubin_mod.parse(blobs[e.blobs["cubin"].sha256])
    except (Fa4aotError, ValueError) as err:
        raise ArchiveError(f"{what}: entry {e.key} ({e.variant.label()}): cubin invalid: {err}") from None
    if parsed.arch != e.target.arch:
        raise ArchiveError(f"{what}: entry {e.key}: cubin is for {parsed.arch}, the entry says {e.target.arch}")


@dataclass(frozen=True)
class InstallResult:
    added: list[str]
    present: list[str]
    archive: Archive


def install(root: str | Path, archive: Archive, *, dry_run: bool = False) -> InstallResult:
    """Publish a verified archive's entries into the cache at ``root`` (created if needed):
    blobs first, each index record last; entries already present are skipped."""
    from fa4aot.build.store import CacheWriter

    root = Path(root)
    if dry_run:
        existing: dict[str, str] = {}
        if (root / "index" / "cache.db").exists():
            existing = dict(Cache(root).records())
        added = [e.key for e in archive.entries if existing.get(e.key) != archive.records[e.key]]
        return InstallResult(added, [e.key for e in archive.entries if e.key not in added], archive)
    writer = CacheWriter(root)
    writer.check_writable()  # opens (or, racing other writers, creates) the index first
    existing = dict(writer.records())
    added = [e.key for e in archive.entries if existing.get(e.key) != archive.records[e.key]]
    present = [e.key for e in archive.entries if e.key not in added]
    if not added:
        writer.close()
        return InstallResult(added, present, archive)
    try:
        for e in archive.entries:
            if e.key in added:
                meta = json.loads(archive.records[e.key])
                meta.pop("blobs")
                writer.put(e.key, meta, archive.blobs_of(e))
        writer.write_packed()
    finally:
        writer.close()
    return InstallResult(added, present, archive)


def open_source(source: str) -> tuple[IO[bytes], str]:
    """A readable stream for ``source``: a file path, an http(s) URL, or ``-`` (stdin)."""
    import sys

    if source == "-":
        return sys.stdin.buffer, "stdin"
    if source.startswith(("http://", "https://")):
        import urllib.request

        try:
            return urllib.request.urlopen(source, timeout=60), source  # noqa: S310 (http(s) only)
        except OSError as e:
            raise ArchiveError(f"cannot download {source}: {e}") from None
    try:
        return open(source, "rb"), source
    except OSError as e:
        raise ArchiveError(f"cannot read {source}: {e.strerror or e}") from None
