"""Shipping a cache as one file: ``fa4aot pack`` and ``fa4aot install``.

An archive is an xz-compressed POSIX tar whose first member, ``fa4aot-archive.json``, lists every
entry (its key and index record) and every blob (sha256, size), with the cache format, the fa4aot
version, the host arch and the toolchains that built the entries; then one member per blob,
``blobs/<sha256>.<ext>``. Packing is deterministic: members sorted, no timestamps or owners, fixed
compression settings, so one cache packs to the same bytes every time.

Installing trusts nothing: the archive is read as a stream, header by header by this module (tarfile
only parses one 512-byte header at a time), decompressed incrementally and never past a bound
derived from the sizes its document lists; a member that is not a regular file with a listed name
is refused (absolute paths, ``..``, links, devices), every blob's size and sha256 is checked,
every record must have the fields a served entry needs and recompute to its key, and every cubin
is parsed before anything is written; only then are the entries published through
:class:`fa4aot.compile.store.CacheWriter` (blobs first, index record last), which is safe against
concurrent installs, builds and gc. Entries the cache already holds under the same record are
skipped, so installing twice changes nothing; a different record under a key the cache holds is
refused unless the caller asks to replace it.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from fa4aot import __version__
from fa4aot.core import cubin as cubin_mod
from fa4aot.core import safejson
from fa4aot.core.errors import CacheError, Fa4aotError
from fa4aot.core.index import BLOB_EXT, Cache, Entry
from fa4aot.core.records import key_problem, record_problems
from fa4aot.core.signing import MAX_SIGNATURE_BYTES, Policy, Signer
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Variant, canonical_json, sha256_hex

#: Version of the archive layout (the JSON member's "format").
ARCHIVE_FORMAT = "fa4aot-archive/1"
MANIFEST_MEMBER = "fa4aot-archive.json"
#: The optional second member: an ed25519 signature over the first member's exact bytes.
SIGNATURE_MEMBER = "fa4aot-archive.sig"
#: xz preset used by pack: 9 gives the smallest archives of the presets measured
#: (benchmarks/pack.py) at a cost of seconds, paid once in CI; decompression speed barely varies.
XZ_PRESET = 9
#: Limits an installer applies before reading a member (a hostile archive cannot exhaust memory).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_BLOB_BYTES = 256 << 20  # a launch plan is 0.1-1 MB
MAX_TOTAL_BYTES = 4 << 30
#: tar's header and padding unit (POSIX ustar).
TAR_BLOCK = 512
#: Largest pax extended header or GNU long-name/long-link member read. fa4aot pack writes none
#: (USTAR); other tar writers put a path or a fractional mtime there, a few hundred bytes. The
#: CVE-2024-6232 pax shape and issue 23's 1 GiB long-name probe need far more.
MAX_EXT_HEADER_BYTES = 64 << 10
#: Extension headers in a row before one member (pax global + pax + GNU long name + long link).
MAX_EXT_HEADERS = 4
#: Unpacked bytes allowed beyond the members' listed sizes and their headers: the end-of-archive
#: blocks, tar's 10 KiB record padding, and a pax or long-name header per member from a tar
#: writer other than fa4aot pack.
ARCHIVE_SLACK_BYTES = 1 << 20
#: Bound on what may be unpacked before the archive's document has been read.
PRE_DOC_BYTES = MAX_MANIFEST_BYTES + MAX_EXT_HEADERS * (MAX_EXT_HEADER_BYTES + TAR_BLOCK) + 2 * TAR_BLOCK
#: Compressed bytes read from the source at a time (and what a decompressor may hold unread).
READ_CHUNK = 64 << 10
#: Most bytes one decompressor call may produce: the expansion ratio is checked between calls.
DECOMPRESS_PIECE = 1 << 20
#: Largest ratio of unpacked to compressed bytes accepted once more than EXPANSION_FLOOR bytes are
#: unpacked. fa4aot archives measure 13 overall and 25 for their most compressible blob (the CI
#: cache, xz -9); a run of zeros reaches about 7000 under xz and 1032 under gzip (a bomb).
MAX_EXPANSION = 500
EXPANSION_FLOOR = 64 << 20
#: Overall limit on downloading an archive: a server trickling bytes never keeps install waiting
#: past it (4 GiB, the largest archive, at about 1.2 MB/s). Each read also times out after
#: HTTP_READ_TIMEOUT_S.
DOWNLOAD_DEADLINE_S = 3600.0
HTTP_READ_TIMEOUT_S = 60.0
#: Stream magics: xz (its file format spec, 2.1.1.1) and gzip (RFC 1952, ID1 ID2).
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
#: Extension member types whose payload describes the next member.
_EXT_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
#: Member types whose payload is the file's bytes (regular, old-style regular, contiguous).
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


class ArchiveError(Fa4aotError):
    """An archive is malformed, tampered with, or not for this machine or fa4aot; nothing was written."""


class ArchiveLimitError(ArchiveError):
    """An archive passes a size bound (a decompression bomb, an oversized tar header or member):
    refused as soon as the bound is passed, before it is unpacked further."""


class RecordError(ArchiveError):
    """An entry's record lacks a field a served entry needs, or has one of the wrong type."""


class EntryKeyError(ArchiveError):
    """An entry's key is not the key its record hashes to (a record moved under another key)."""


class RecordConflictError(ArchiveError):
    """The cache holds a different record under an entry's key (replace it explicitly, or not at all)."""


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


def pack_bytes(
    cache: Cache,
    entries: list[Entry],
    host_arch: str,
    signer: Signer | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[bytes, PackResult]:
    """The archive of ``entries`` (every blob re-read and hash-checked) and what it holds;
    ``signer`` adds its signature over the manifest member (which names every byte).
    ``progress(done, total)``: after each blob read, and after the compression (the last step)."""
    if not entries:
        raise ArchiveError("nothing to pack: no entry matches the selection")
    blobs: dict[str, tuple[int, str, Entry, str]] = {}
    for e in entries:
        check_record(e, f"the cache {cache.root}")  # what install would refuse is never shipped
        for role, b in e.blobs.items():
            blobs.setdefault(b.sha256, (b.size, b.ext, e, role))
    toolchains = {canonical_json(e.meta.get("toolchain", {})): e.meta.get("toolchain", {}) for e in entries}
    doc = {
        "format": ARCHIVE_FORMAT,
        "cache_format": CACHE_FORMAT_VERSION,
        "fa4aot": __version__,
        "host_arch": host_arch,
        "toolchains": [toolchains[t] for t in sorted(toolchains)],
        "targets": sorted({canonical_json(e.target._asdict()) for e in entries}),
        "entries": [{"key": e.key, "record": _record_text(cache, e)} for e in entries],
        "blobs": [{"sha256": s, "size": blobs[s][0], "ext": blobs[s][1]} for s in sorted(blobs)],
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        doc_bytes = json.dumps(doc, sort_keys=True, indent=0).encode()
        _add(tar, MANIFEST_MEMBER, doc_bytes)
        if signer is not None:
            _add(tar, SIGNATURE_MEMBER, signer.sign(doc_bytes))
        for i, sha in enumerate(sorted(blobs), 1):
            size, ext, e, role = blobs[sha]
            data = cache.read_blob(e, role)  # sha256 and size checked
            _add(tar, f"blobs/{sha}.{ext}", data)
            if progress is not None:
                progress(i, len(blobs) + 1)
    payload = raw.getvalue()
    data = lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    if progress is not None:
        progress(len(blobs) + 1, len(blobs) + 1)
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


# -- reading an archive, bounded ------------------------------------------------------------------


class _Decompressor(Protocol):
    """What :class:`_Unpacked` needs of ``lzma.LZMADecompressor`` and :class:`_Gunzip`."""

    needs_input: bool
    eof: bool

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Gunzip:
    """zlib's gzip decompressor behind ``lzma.LZMADecompressor``'s interface (zlib keeps the input
    that ``max_length`` left unprocessed in ``unconsumed_tail`` instead of inside)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # +16: gzip header and trailer
        self._tail = b""

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def eof(self) -> bool:
        return self._d.eof

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._d.decompress(self._tail + data, max(max_length, 0))
        self._tail = self._d.unconsumed_tail
        return out


class _Unpacked:
    """The tar bytes of an archive stream (xz, gzip or plain tar, told by its magic), decompressed
    only as far as they are read: each decompressor call is capped at the bytes asked for, and
    asking for more than ``limit`` bytes in all raises :class:`ArchiveLimitError` before anything
    past the limit is decompressed. Compressed input beyond the limit (plus slack) is refused too:
    xz and gzip never grow data that much, so it is padding meant to keep a reader busy."""

    def __init__(self, raw: IO[bytes], what: str, limit: int):
        self.what, self.limit = what, limit
        self.produced = 0  # uncompressed bytes handed out
        self._raw, self._ended = raw, False
        self._head = b""  # sniffed, then handed out by the first read (a pipe may give less at once)
        while len(self._head) < len(XZ_MAGIC) and (more := raw.read(len(XZ_MAGIC) - len(self._head))):
            self._head += more
        self._consumed = len(self._head)  # compressed bytes read
        self._dec: _Decompressor | None = None
        if self._head.startswith(XZ_MAGIC):
            self._dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        elif self._head.startswith(GZIP_MAGIC):
            self._dec = _Gunzip()

    def _raw_read(self, n: int) -> bytes:
        if self._consumed > self.limit + ARCHIVE_SLACK_BYTES + READ_CHUNK:
            raise ArchiveLimitError(
                f"{self.what}: more than {self._consumed} compressed bytes for at most {self.limit} unpacked; refused"
            )
        if self._head:
            head, self._head = self._head[:n], self._head[n:]
            return head
        data = self._raw.read(n)
        self._consumed += len(data)
        return data

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer where the stream ends."""
        if self.produced + n > self.limit:
            raise ArchiveLimitError(
                f"{self.what} unpacks to more than {self.limit} bytes, beyond what its members and their "
                "listed sizes can take (a decompression bomb?); refused"
            )
        parts, left = [], n
        while left and not self._ended:
            chunk = self._next(min(left, DECOMPRESS_PIECE))
            parts.append(chunk)
            left -= len(chunk)
            self.produced += len(chunk)
            bomb = self.produced > EXPANSION_FLOOR and self.produced > MAX_EXPANSION * self._consumed
            if self._dec is not None and bomb:
                raise ArchiveLimitError(
                    f"{self.what}: {self._consumed} compressed bytes unpack to more than {self.produced} (over "
                    f"{MAX_EXPANSION} times as many; fa4aot archives unpack to about 13 times): a decompression "
                    "bomb, refused"
                )
        return b"".join(parts)

    def _next(self, most: int) -> bytes:
        """Up to ``most`` bytes (at least one unless the stream has ended)."""
        if self._dec is None:
            data = self._raw_read(min(most, 16 * READ_CHUNK))
            self._ended = not data
            return data
        while True:
            data = b""
            if self._dec.needs_input:
                data = self._raw_read(READ_CHUNK)
                if not data:
                    self._ended = True  # the compressed stream stops short: the tar reader says so
                    return b""
            out = self._dec.decompress(data, most)
            if self._dec.eof:
                self._ended = True  # anything after the compressed stream is not read
            if out or self._ended:
                return out


class _TarReader:
    """The members of a tar stream, one 512-byte header at a time (``tarfile.TarInfo.frombuf``
    parses a single header block and reads nothing). pax and GNU long-name/long-link payloads are
    read here, each at most :data:`MAX_EXT_HEADER_BYTES`, and applied to the member they
    precede; tarfile's own reader would read them whole first (CVE-2024-6232: 30 s and 9.5 GB
    for a 2.8 KB archive)."""

    def __init__(self, src: _Unpacked, what: str):
        self.src, self.what = src, what

    def next(self) -> tarfile.TarInfo | None:
        """The next member's header (extension headers applied), or None at the end of the archive."""
        name = link = None
        pax: dict[str, str] = {}
        for _ in range(MAX_EXT_HEADERS + 1):
            block = self.src.read(TAR_BLOCK)
            if not block.strip(b"\0"):
                if name or link or pax:
                    raise ArchiveError(f"{self.what} is truncated: an extension header ends the archive")
                return None  # end-of-archive blocks, or the end of the stream at a member boundary
            if len(block) < TAR_BLOCK:
                raise ArchiveError(f"{self.what} is truncated inside a tar header")
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as e:
                raise ArchiveError(f"{self.what} is damaged: bad tar header ({e})") from None
            if info.type not in _EXT_TYPES:
                break
            if info.size > MAX_EXT_HEADER_BYTES:
                raise ArchiveLimitError(
                    f"{self.what}: a tar extension header (type {info.type!r}) of {info.size} bytes, more than the "
                    f"{MAX_EXT_HEADER_BYTES} accepted; refused before reading it"
                )
            payload = self.data(info.size)
            if info.type == tarfile.GNUTYPE_LONGNAME:
                name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                link = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type != tarfile.XGLTYPE:  # a global header changes nothing fa4aot reads
                pax.update(_pax_fields(payload, self.what))
        else:
            raise ArchiveLimitError(f"{self.what}: more than {MAX_EXT_HEADERS} tar extension headers before a member")
        return self._apply(info, name, link, pax)

    def _apply(self, info: tarfile.TarInfo, name: str | None, link: str | None, pax: dict[str, str]) -> tarfile.TarInfo:
        if any(k.startswith("GNU.sparse") for k in pax):
            raise ArchiveError(f"{self.what}: member {info.name!r} is a sparse file (refused)")
        info.name = pax.get("path", name or info.name)
        info.linkname = pax.get("linkpath", link or info.linkname)
        if "size" in pax:
            if not re.fullmatch(r"[0-9]{1,20}", pax["size"]):
                raise ArchiveError(f"{self.what}: member {info.name!r} has a malformed pax size {pax['size'][:40]!r}")
            info.size = int(pax["size"])
        return info

    def data(self, size: int) -> bytes:
        """The ``size`` bytes of the current member, and past its padding to the next header."""
        data = self.src.read(size)
        pad = self.src.read(-size % TAR_BLOCK)
        if len(data) < size or len(pad) < -size % TAR_BLOCK:
            raise ArchiveError(f"{self.what} is truncated inside a member")
        return data


def _pax_fields(payload: bytes, what: str) -> dict[str, str]:
    """The records of a pax extended header, ``"<length> <key>=<value>\\n"`` each (POSIX pax),
    parsed in one linear pass: a malformed record is refused, never searched for."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        space = payload.find(b" ", pos, pos + 21)
        length = int(payload[pos:space]) if space > pos and payload[pos:space].isdigit() else 0
        end = pos + length
        if length <= space - pos or end > len(payload) or payload[end - 1 : end] != b"\n":
            raise ArchiveError(f"{what}: malformed pax extended header")
        key, eq, value = payload[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ArchiveError(f"{what}: malformed pax extended header")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


# -- install ----------------------------------------------------------------------------------


@dataclass
class Archive:
    """A fully read and verified archive: its manifest, entries and blob bytes."""

    doc: dict[str, Any]
    entries: list[Entry]
    records: dict[str, str]
    blobs: dict[str, bytes] = field(repr=False)
    what: str = "archive"

    def blobs_of(self, e: Entry) -> dict[str, bytes]:
        """The bytes of each of ``e``'s blobs, by role."""
        return {role: self.blobs[b.sha256] for role, b in e.blobs.items()}


def read_archive(stream: IO[bytes], *, host_arch: str, what: str = "archive", policy: Policy | None = None) -> Archive:
    """Read and verify an archive from ``stream`` (nothing is written). ``policy``: who must
    vouch for it (a trusted signature, checked before any blob is read, or a pinned sha256 of
    the whole stream, checked at its end); None checks contents only. Raises
    :class:`ArchiveError` (or a subclass) or :class:`TrustError` saying what is wrong."""
    hashed = _Hashing(stream) if policy is not None and policy.pinned else None
    try:
        archive = _read(hashed or stream, host_arch, what, policy)
        if hashed is not None:
            assert policy is not None
            hashed.drain(what)
            policy.check_pinned(hashed.hexdigest(), what)
        return archive
    except ArchiveError:
        raise
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise ArchiveError(f"{what} is damaged or truncated ({type(e).__name__}: {e})") from None


def _read(stream: IO[bytes], host_arch: str, what: str, policy: Policy | None) -> Archive:
    src = _Unpacked(stream, what, PRE_DOC_BYTES)
    tar = _TarReader(src, what)
    m = _next_file(tar, what)
    if m is None:
        raise ArchiveError(f"{what} is empty")
    if m.name != MANIFEST_MEMBER:
        raise ArchiveError(f"{what}: the first member must be {MANIFEST_MEMBER}, got {m.name!r}")
    if m.size > MAX_MANIFEST_BYTES:
        raise ArchiveLimitError(f"{what}: {MANIFEST_MEMBER} is {m.size} bytes (limit {MAX_MANIFEST_BYTES})")
    raw = tar.data(m.size)
    doc = _check_doc(safejson.loads(raw, f"{what}: {MANIFEST_MEMBER}", error=ArchiveError), host_arch, what)
    listed = _listed(doc, what)
    entries, records = _doc_entries(doc, what)  # records and keys checked before any blob is read
    used = {b.sha256 for e in entries for b in e.blobs.values()}
    # From here on nothing unpacks past the blobs the entries use, every listed member's header,
    # and some slack: a listed blob no entry uses cannot make the installer hold gigabytes.
    src.limit = src.produced + ARCHIVE_SLACK_BYTES
    src.limit += sum(TAR_BLOCK + (size + -size % TAR_BLOCK if sha in used else 0) for size, sha in listed.values())
    src.limit += TAR_BLOCK + MAX_SIGNATURE_BYTES
    first = _next_file(tar, what)
    signature = None
    if first is not None and first.name == SIGNATURE_MEMBER:
        if first.size > MAX_SIGNATURE_BYTES:
            raise ArchiveLimitError(f"{what}: {SIGNATURE_MEMBER} is {first.size} bytes (limit {MAX_SIGNATURE_BYTES})")
        signature, first = tar.data(first.size), _next_file(tar, what)
    if policy is not None:
        policy.check_signature(raw, signature, what)  # before any blob is read
    blobs = _read_blobs(tar, listed, what, first)
    missing = sorted(n for n, (_, sha) in listed.items() if sha not in blobs)
    if missing:
        raise ArchiveError(f"{what} is truncated: {len(missing)} listed blob(s) missing, e.g. {missing[0]}")
    for e in entries:
        _check_entry(e, blobs, host_arch, what)
    unused = sorted(set(blobs) - used)
    if unused:
        raise ArchiveError(
            f"{what}: blob {unused[0][:12]} is listed, but no entry uses it (an archive holds its entries' blobs only)"
        )
    return Archive(doc, entries, records, blobs, what)


def _next_file(tar: _TarReader, what: str) -> tarfile.TarInfo | None:
    """The next member, which must be a regular file with a safe relative path, or None at the end."""
    m = tar.next()
    if m is None:
        return None
    if m.type not in _FILE_TYPES:
        raise ArchiveError(f"{what}: member {m.name!r} is not a regular file (links and devices are refused)")
    if m.name.startswith("/") or ".." in m.name.split("/") or "\\" in m.name:
        raise ArchiveError(f"{what}: member {m.name!r} has an unsafe path")
    return m


def _read_blobs(
    tar: _TarReader, listed: dict[str, tuple[int, str]], what: str, m: tarfile.TarInfo | None
) -> dict[str, bytes]:
    """sha256 -> bytes of every member from ``m`` (the first after the document and signature)
    on: each listed, of its listed size, read once, and matching its sha256."""
    blobs: dict[str, bytes] = {}
    while m is not None:
        if m.name not in listed:
            raise ArchiveError(f"{what}: member {m.name!r} is not listed in {MANIFEST_MEMBER}")
        size, sha = listed[m.name]
        if m.size != size:
            raise ArchiveError(f"{what}: {m.name} is {m.size} bytes, the manifest says {size}")
        if sha in blobs:
            raise ArchiveError(f"{what}: {m.name} appears twice")
        data = tar.data(m.size)
        if sha256_hex(data) != sha:
            raise ArchiveError(f"{what}: {m.name} does not match its sha256 (tampered or damaged)")
        blobs[sha] = data
        m = _next_file(tar, what)
    return blobs


def _listed(doc: dict[str, Any], what: str) -> dict[str, tuple[int, str]]:
    """Member name -> (size, sha256) of every blob the document lists, within the size limits."""
    listed = {f"blobs/{b['sha256']}.{b['ext']}": (int(b["size"]), b["sha256"]) for b in doc["blobs"]}
    total = sum(size for size, _ in listed.values())
    if total > MAX_TOTAL_BYTES or any(size > MAX_BLOB_BYTES for size, _ in listed.values()):
        raise ArchiveLimitError(f"{what}: its blobs add up to {total} bytes, beyond the installer's limits")
    return listed


def _doc_entries(doc: dict[str, Any], what: str) -> tuple[list[Entry], dict[str, str]]:
    """The document's entries, each record checked (:func:`parse_record`), and their texts."""
    entries, records = [], {}
    for item in doc["entries"]:
        key, text = (item.get("key"), item.get("record")) if isinstance(item, dict) else (None, None)
        if not isinstance(key, str) or not isinstance(text, str):
            raise ArchiveError(f"{what}: malformed entry listing {str(item)[:200]}")
        if not re.fullmatch(r"[0-9a-f]{16,64}", key):
            raise ArchiveError(f"{what}: entry key {key[:80]!r} is not a cache key")
        if key in records:
            raise ArchiveError(f"{what}: entry {key} is listed twice")
        entries.append(parse_record(key, text, what))
        records[key] = text
    return entries, records


def parse_record(key: str, text: str, what: str) -> Entry:
    """The entry of an index record from outside this cache, with :func:`check_record`'s checks:
    :class:`RecordError` or :class:`EntryKeyError` naming the entry when it fails them."""
    try:
        e = Entry.from_json(key, text)
    except CacheError as err:
        raise RecordError(f"{what}: {err}") from None
    check_record(e, what)
    return e


def check_record(e: Entry, what: str) -> None:
    """Refuse an entry whose record lacks a field a served entry needs (its plan's signature, its
    kernels, a finite ``created``...) or whose key does not recompute from the record: the key is
    what the runtime and ``fa4aot build`` trust to name the variant."""
    damaged = record_problems(e.meta)
    if damaged:
        raise RecordError(f"{what}: entry {e.key} ({e.variant.label()}): {'; '.join(damaged)}; refused")
    wrong = key_problem(e)
    if wrong:
        raise EntryKeyError(f"{what}: entry {e.key} ({e.variant.label()}): {wrong}; refused")


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
    _check_blobs(e, blobs, what)
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


def _check_blobs(e: Entry, blobs: dict[str, bytes], what: str, *, rehash: bool = False) -> None:
    """Every blob ``e`` references is in ``blobs`` with its size (and, with ``rehash``, its sha256)."""
    for role, b in e.blobs.items():
        data = blobs.get(b.sha256)
        if data is None or len(data) != b.size:
            raise ArchiveError(f"{what}: entry {e.key} needs blob {b.sha256[:12]} ({role}), which the archive lacks")
        if rehash and sha256_hex(data) != b.sha256:
            raise ArchiveError(f"{what}: entry {e.key}: blob {b.sha256[:12]} ({role}) does not match its sha256")


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` added, found present (the same record) and replaced (``replace``)."""

    added: list[str]
    present: list[str]
    archive: Archive
    replaced: list[str] = field(default_factory=list)


def present_records(root: str | Path) -> dict[str, str]:
    """key -> record text of every entry the cache at ``root`` holds (empty if there is none)."""
    root = Path(root)
    return dict(Cache(root).records()) if (root / "index" / "cache.db").exists() else {}


def install(root: str | Path, archive: Archive, *, dry_run: bool = False, replace: bool = False) -> InstallResult:
    """Publish a verified archive's entries into the cache at ``root`` (created if needed): blobs
    first, each index record last. This is the path of both ``install`` and ``pull``, so it
    checks again, before writing anything, that each record recomputes to its key and has what a
    served entry needs, and that its blobs are there with their sha256. Entries the cache holds
    under the same record are skipped; a different record under a key the cache holds raises
    :class:`RecordConflictError` unless ``replace`` (then it is replaced and listed in
    ``replaced``)."""
    from fa4aot.compile.store import CacheWriter

    what = str(archive.doc.get("source") or archive.what)
    checked: list[Entry] = []  # parsed from the very record text that is written
    for e in archive.entries:
        text = archive.records.get(e.key)
        if text is None:
            raise ArchiveError(f"{what}: entry {e.key} has no record")
        checked.append(parse_record(e.key, text, what))
        _check_blobs(checked[-1], archive.blobs, what, rehash=True)
    if dry_run:
        return _sort(root, archive, checked, present_records(root), replace, what)
    writer = CacheWriter(root)
    try:
        writer.check_writable()  # opens (or, racing other writers, creates) the index first
        res = _sort(root, archive, checked, dict(writer.records()), replace, what)
        todo = set(res.added) | set(res.replaced)
        for e in checked:
            if e.key in todo:
                meta = {k: v for k, v in e.meta.items() if k != "blobs"}  # put lists the blobs it stores
                writer.put(e.key, meta, archive.blobs_of(e))
        if todo:
            writer.write_packed()
    finally:
        writer.close()
    return res


def _sort(
    root: str | Path, archive: Archive, checked: list[Entry], existing: dict[str, str], replace: bool, what: str
) -> InstallResult:
    """Split ``checked`` into added / present / replaced against ``existing``; a differing record
    without ``replace`` raises :class:`RecordConflictError`."""
    added, present, differ = [], [], []
    for e in checked:
        have = existing.get(e.key)
        (added if have is None else differ if record_differs(have, e) else present).append(e)
    if differ and not replace:
        raise conflict_error(differ, root, what)
    return InstallResult([e.key for e in added], [e.key for e in present], archive, [e.key for e in differ])


def record_differs(installed: str, e: Entry) -> bool:
    """Whether ``e``'s record is not the one a cache holds under its key (``installed``, its text).
    Records compare as canonical JSON with each blob by sha256 and size (the file path the cache
    adds is derived from them): byte-identical for records ``fa4aot pack`` and ``push`` ship."""
    try:
        have = safejson.loads(installed, f"the installed record {e.key}")
    except CacheError:
        return True  # a damaged installed record is replaced only on request too
    return _comparable(have) != _comparable(e.meta)


def _comparable(meta: Any) -> str:
    blobs = meta.get("blobs") if isinstance(meta, dict) else None
    if isinstance(blobs, dict):
        by_hash = {role: [b.get("sha256"), b.get("size")] if isinstance(b, dict) else b for role, b in blobs.items()}
        meta = {**meta, "blobs": by_hash}
    return canonical_json(meta)


def conflict_error(differ: list[Entry], root: str | Path, what: str) -> RecordConflictError:
    """The error refusing records that differ from the ones the cache at ``root`` holds."""
    head = "; ".join(f"{e.key} ({e.variant.label()})" for e in differ[:5])
    return RecordConflictError(
        f"{what}: {len(differ)} entr{'y' if len(differ) == 1 else 'ies'} differ from the record the cache {root} "
        f"holds under the same key: {head}{' ...' if len(differ) > 5 else ''}. Nothing was installed; pass "
        "--replace to take the new records (each replacement is reported)"
    )


def open_source(source: str) -> tuple[IO[bytes], str]:
    """A readable stream for ``source``: a regular file, an http(s) URL (each read times out after
    :data:`HTTP_READ_TIMEOUT_S`, the whole download after :data:`DOWNLOAD_DEADLINE_S`), or ``-``
    (stdin). A FIFO, device or directory path is refused before it is read."""
    import sys

    if source == "-":
        return sys.stdin.buffer, "stdin"
    if source.startswith(("http://", "https://")):
        import urllib.request

        try:
            response = urllib.request.urlopen(source, timeout=HTTP_READ_TIMEOUT_S)  # noqa: S310 (http(s) only)
        except OSError as e:
            raise ArchiveError(f"cannot download {source}: {e}") from None
        return _Deadline(response, source, DOWNLOAD_DEADLINE_S), source
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as e:
        raise ArchiveError(f"cannot read {source}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArchiveError(f"cannot read {source}: not a regular file (an archive is a file, a URL or -)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), source


class _Hashing(io.RawIOBase):
    """A stream that hashes what is read through it (an archive's pinned sha256 covers every byte
    of the file, so the bytes after the tar's end are read too, boundedly)."""

    def __init__(self, inner: IO[bytes]):
        super().__init__()
        self._inner, self._sha, self.size = inner, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def drain(self, what: str) -> None:
        """Read to the end: at most :data:`ARCHIVE_SLACK_BYTES` more (an xz index, tar padding)."""
        left = ARCHIVE_SLACK_BYTES
        while data := self.read(min(READ_CHUNK, left + 1)):
            left -= len(data)
            if left < 0:
                raise ArchiveLimitError(f"{what}: more than {ARCHIVE_SLACK_BYTES} bytes after its end; refused")

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class _Deadline(io.RawIOBase):
    """A download that raises :class:`ArchiveLimitError` once it has taken ``seconds`` in all."""

    def __init__(self, inner: IO[bytes], what: str, seconds: float):
        super().__init__()
        self._inner, self._what, self._seconds = inner, what, seconds
        self._deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if time.monotonic() > self._deadline:
            raise ArchiveLimitError(f"{self._what}: the download took longer than {self._seconds:.0f} s; abandoned")
        # read1: whatever has arrived (read() would wait for the whole buffer, past the deadline)
        data = self._inner.read1(len(buffer)) if hasattr(self._inner, "read1") else self._inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()
