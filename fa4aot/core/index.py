"""Reading a cache: the full index (for the CLI), the packed per-target index (for the runtime)
and blobs, every byte hash-checked. Writing lives in :mod:`fa4aot.build.store`.

Layout under the cache root::

    FORMAT                      "fa4aot-cache <version>"
    index/                      diskcache (SQLite): key -> entry metadata (JSON text), every entry
    packed/<arch>-<sms>-<host>.idx
                                one file per target and host arch, rewritten at the end of every
                                build and gc: the entries the runtime may load, read in one go
    blobs/<aa>/<sha256>.<ext>   raw, immutable artifact bytes (launch plan .so, header)
    tmp/                        staging for atomic writes

Each entry stores its launch plan (FA4's exported host code linked with the shim) and the header
``export_to_c`` wrote. The plan embeds the cubin; the entry records where (``meta["cubin"]``:
offset, size, sha256), so the cubin is stored once and the runtime reads and hashes one blob per
variant. ``fa4aot show KEY --cubin-out FILE`` extracts it for cuobjdump and friends.

The packed index::

    FA4AOT-PACKED <version>\\n
    <sha256 of the header JSON> <length of the header JSON>\\n
    <header JSON>: {"format", "target", "host_arch", "records": {variant_id: [key, offset, length, sha256]}}
    <records>: the entries' metadata JSON, back to back (offsets count from the end of the header)

Opening reads and hashes only the header; a record is read, hashed and parsed when its variant is
first used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from fa4aot.core.errors import CacheError, CorruptArtifactError
from fa4aot.core.variant import CACHE_FORMAT_VERSION, Target, Variant, sha256_hex

FORMAT_LINE = f"fa4aot-cache {CACHE_FORMAT_VERSION}"
#: File extension of each blob role.
BLOB_EXT = {"plan": "so", "header": "h"}
DEFAULT_CACHE_ENV = "FA4AOT_CACHE"
PACKED_DIR = "packed"
PACKED_MAGIC = b"FA4AOT-PACKED 1\n"


def default_cache_dir() -> Path:
    """``$FA4AOT_CACHE``, else ``./cache``."""
    return Path(os.environ.get(DEFAULT_CACHE_ENV, "cache"))


class BlobRef(NamedTuple):
    sha256: str
    size: int
    ext: str

    @property
    def filename(self) -> str:
        return f"{self.sha256}.{self.ext}"


class CubinRef(NamedTuple):
    """Where an entry's cubin lies inside its plan blob."""

    offset: int
    size: int
    sha256: str


class Entry(NamedTuple):
    """One built variant: its key, variant, target, metadata and blob references."""

    key: str
    variant: Variant
    target: Target
    meta: dict[str, Any]
    blobs: dict[str, BlobRef]

    @classmethod
    def from_json(cls, key: str, text: str | bytes) -> Entry:
        try:
            meta = json.loads(text)
            blobs = {
                role: BlobRef(b["sha256"], int(b["size"]), BLOB_EXT.get(role, "bin"))
                for role, b in meta["blobs"].items()
            }
            return cls(key, Variant.from_dict(meta["variant"]), Target.from_dict(meta["target"]), meta, blobs)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CacheError(f"index record {key} is malformed: {e!r}") from None

    @property
    def variant_id(self) -> str:
        return self.variant.variant_id

    @property
    def cubin(self) -> CubinRef | None:
        c = self.meta.get("cubin")
        return CubinRef(int(c["offset"]), int(c["size"]), c["sha256"]) if isinstance(c, dict) else None

    @property
    def host_arch(self) -> str:
        return str(self.meta.get("host_arch"))


def packed_name(target: Target, host_arch: str) -> str:
    """File name of the packed index for ``target`` on ``host_arch`` hosts."""
    return f"{target.arch}-{target.num_sms}-{host_arch}.idx"


def parse_packed_name(name: str) -> tuple[str, int, str] | None:
    """(arch, num_sms, host_arch) from a packed index file name, or None."""
    if not name.endswith(".idx"):
        return None
    parts = name[:-4].split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def pack_index(target: Target, host_arch: str, records: list[tuple[str, str]]) -> bytes:
    """The packed index bytes for ``records`` ((key, metadata JSON) pairs, one per variant)."""
    table: dict[str, list[Any]] = {}
    body = bytearray()
    for key, text in records:
        raw = text.encode()
        vid = Entry.from_json(key, raw).variant_id
        table[vid] = [key, len(body), len(raw), sha256_hex(raw)]
        body += raw
    header = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "target": target.to_dict(), "host_arch": host_arch, "records": table},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return PACKED_MAGIC + f"{sha256_hex(header)} {len(header)}\n".encode() + header + bytes(body)


class PackedIndex:
    """One target's packed index, opened read-only: the header is hashed and parsed now, each record
    when :meth:`entry` first asks for it. The file stays open, so a concurrent rewrite (an atomic
    rename) never mixes two versions."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CacheError(f"cannot open the packed index {path}: {e.strerror or e}") from None
        try:
            head = os.pread(self._fd, 256, 0)
            if not head.startswith(PACKED_MAGIC):
                raise CorruptArtifactError(f"{path} is not an fa4aot packed index (bad magic)")
            line_end = head.find(b"\n", len(PACKED_MAGIC))
            try:
                digest, length = head[len(PACKED_MAGIC) : line_end].decode().split()
                length = int(length)
            except ValueError:
                raise CorruptArtifactError(f"{path}: malformed packed index header line") from None
            start = line_end + 1
            header = os.pread(self._fd, length, start)
            if len(header) != length or sha256_hex(header) != digest:
                raise CorruptArtifactError(
                    f"{path} is corrupt (its header does not match its sha256); run `fa4aot reindex` or rebuild"
                )
            doc = json.loads(header)
            if doc.get("format") != CACHE_FORMAT_VERSION:
                raise CacheError(
                    f"{path} has cache format {doc.get('format')}; this fa4aot reads {CACHE_FORMAT_VERSION}. "
                    "Rebuild the cache with this fa4aot."
                )
            self.target = Target.from_dict(doc["target"])
            self.host_arch: str = doc["host_arch"]
            self.records: dict[str, list[Any]] = doc["records"]
            self._body = start + length
        except BaseException:
            os.close(self._fd)
            raise

    def __contains__(self, variant_id: str) -> bool:
        return variant_id in self.records

    def __len__(self) -> int:
        return len(self.records)

    def entry(self, variant_id: str) -> Entry:
        """The entry for ``variant_id`` (KeyError if absent), its record hash-checked."""
        key, offset, length, digest = self.records[variant_id]
        raw = os.pread(self._fd, length, self._body + offset)
        if len(raw) != length or sha256_hex(raw) != digest:
            raise CorruptArtifactError(
                f"{self.path}: the record of {variant_id} is corrupt; run `fa4aot reindex` or rebuild"
            )
        return Entry.from_json(key, raw)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class MemoryIndex:
    """The packed-index interface over entries read from the full index (caches without packed
    indexes). The newest entry of each variant wins."""

    def __init__(self, entries: list[Entry]):
        self.target = entries[0].target
        self.host_arch = entries[0].host_arch
        self._by_id: dict[str, Entry] = {}
        for e in entries:
            prev = self._by_id.get(e.variant_id)
            if prev is None or e.meta.get("created", 0) >= prev.meta.get("created", 0):
                self._by_id[e.variant_id] = e
        self.records = {vid: e.key for vid, e in self._by_id.items()}

    def __contains__(self, variant_id: str) -> bool:
        return variant_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def entry(self, variant_id: str) -> Entry:
        return self._by_id[variant_id]

    def close(self) -> None:
        pass


class Cache:
    """A cache directory, read-only. See the module docstring for the layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "index" / "cache.db").exists() and not (self.root / PACKED_DIR).is_dir():
            raise CacheError(f"{self.root} is not an fa4aot cache (no index); build one with `fa4aot build MANIFEST`")
        self._check_format()

    def _check_format(self) -> None:
        try:
            line = (self.root / "FORMAT").read_text().strip()
        except OSError:
            raise CacheError(f"{self.root} is not an fa4aot cache (no FORMAT file)") from None
        if line != FORMAT_LINE:
            raise CacheError(
                f"{self.root} has cache format {line!r}; this fa4aot reads {FORMAT_LINE!r}. "
                "Rebuild it (or build into a new directory) with this fa4aot."
            )

    # ---- full index (CLI, verify, gc) --------------------------------------------------------

    def records(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        """(key, JSON) index records read with plain sqlite3 (works read-only)."""
        import sqlite3  # only the CLI and the fallback path read the full index

        db = self.root / "index" / "cache.db"
        if not db.exists():
            return iter(())
        rows: list[tuple[str, str]] = []
        for uri in (f"file:{db}?mode=ro", f"file:{db}?immutable=1"):
            try:
                con = sqlite3.connect(uri, uri=True, timeout=60)
                try:
                    if key is None:
                        cur = con.execute("SELECT key, value FROM Cache WHERE raw = 1 ORDER BY rowid")
                    else:
                        cur = con.execute("SELECT key, value FROM Cache WHERE raw = 1 AND key = ?", (key,))
                    rows = [(k, v) for k, v in cur.fetchall() if isinstance(k, str) and isinstance(v, str)]
                finally:
                    con.close()
                break
            except sqlite3.OperationalError as e:
                last = e
                continue
        else:
            raise CacheError(f"cannot read the cache index {db}: {last}")
        return iter(rows)

    def get(self, key: str) -> Entry | None:
        """The entry for ``key``, or None. Blobs are not read (see :meth:`read_blob`)."""
        for k, text in self.records(key):
            return Entry.from_json(k, text)
        return None

    def entries(self) -> list[Entry]:
        """Every entry, in insertion order."""
        return [Entry.from_json(k, text) for k, text in self.records()]

    def resolve(self, prefix: str) -> Entry:
        """The entry whose key (or variant id) starts with ``prefix``; error if none or several."""
        matches = [e for e in self.entries() if e.key.startswith(prefix) or e.variant_id.startswith(prefix)]
        if not matches:
            raise CacheError(f"no entry in {self.root} has a key or variant id starting with {prefix!r}")
        if len({e.key for e in matches}) > 1:
            raise CacheError(f"{prefix!r} is ambiguous: {len(matches)} entries match; give more digits")
        return matches[0]

    # ---- packed indexes (runtime) --------------------------------------------------------------

    def packed_targets(self) -> list[tuple[str, int, str]]:
        """(arch, num_sms, host_arch) of every packed index present."""
        try:
            names = os.listdir(self.root / PACKED_DIR)
        except FileNotFoundError:
            return []
        return sorted(p for p in map(parse_packed_name, names) if p is not None)

    def open_packed(self, arch: str, num_sms: int, host_arch: str) -> PackedIndex:
        return PackedIndex(self.root / PACKED_DIR / f"{arch}-{num_sms}-{host_arch}.idx")

    # ---- blobs ---------------------------------------------------------------------------

    def blob_path(self, ref: BlobRef) -> Path:
        return self.root / "blobs" / ref.sha256[:2] / ref.filename

    def read_blob(self, entry: Entry, role: str) -> bytes:
        """The bytes of one blob, after checking size and sha256 against the entry."""
        ref = entry.blobs.get(role)
        if ref is None:
            raise CacheError(f"entry {entry.key} has no {role} blob")
        path = self.blob_path(ref)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CorruptArtifactError(
                f"{role} of entry {entry.key} ({entry.variant.label()}) is missing: {path}: "
                f"{e.strerror or e}. Rebuild it with `fa4aot build`."
            ) from None
        if len(data) != ref.size or sha256_hex(data) != ref.sha256:
            raise CorruptArtifactError(
                f"{role} of entry {entry.key} ({entry.variant.label()}) is corrupt: {path} has "
                f"{len(data)} bytes and sha256 {sha256_hex(data)[:16]}..., the index records "
                f"{ref.size} bytes and {ref.sha256[:16]}.... Refusing to use it; run "
                "`fa4aot verify` and rebuild."
            )
        return data

    def read_cubin(self, entry: Entry, plan_bytes: bytes | None = None) -> bytes:
        """The entry's cubin: a slice of its (verified) plan, checked against the cubin's own sha256."""
        return cubin_of(entry, self.read_blob(entry, "plan") if plan_bytes is None else plan_bytes)


def cubin_of(entry: Entry, plan_bytes: bytes) -> bytes:
    """Slice ``entry``'s cubin out of its verified plan bytes. The plan's sha256 already covers
    these bytes; the cubin's own sha256 is checked too, since it names the cubin FA4 built."""
    ref = entry.cubin
    if ref is None:
        raise CacheError(f"entry {entry.key} records no cubin location (built by an older fa4aot?)")
    data = plan_bytes[ref.offset : ref.offset + ref.size]
    if len(data) != ref.size or sha256_hex(data) != ref.sha256:
        raise CorruptArtifactError(
            f"cubin of entry {entry.key} ({entry.variant.label()}) does not match its recorded sha256 at "
            f"offset {ref.offset} of the plan; run `fa4aot verify` and rebuild."
        )
    return data
